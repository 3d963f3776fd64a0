//! A flight's log: the events of one generation, each taken once and in order, whatever mix
//! of stored history and live subscription they arrive from. Pure: no I/O, no clock.
//!
//! Architecture Invariant: the log holds `started` of an attempt newer than the one held,
//! chunks contiguous from offset 0 (a picture's partials contiguous from index 0), and at most
//! one terminal event, last.

use std::{
    ops::Deref,
    sync::{Arc, OnceLock},
};

use bytes::Bytes;
use versus_shared::wire::Event;

#[derive(Default)]
pub(crate) struct Log {
    /// What waiters replay, in order.
    pub(crate) events: Vec<Arc<Logged>>,
    /// No event follows (the generation ended, or the reader stopped).
    pub(crate) closed: bool,
    /// The attempt the log follows, and where its text ends (for a picture, how many of its
    /// partial images the log holds: a partial takes the place a chunk takes in a text).
    pub(crate) attempt: Option<i32>,
    end: usize,
    /// Whether the log follows a picture: only a picture's log takes partial images.
    pictures: bool,
}

/// What the log made of an event.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Logged; `ended` when it ends the generation.
    Taken { ended: bool },
    /// Already held, or from an attempt the log has left behind.
    Stale,
    /// It does not follow what the log holds: something before it is missing.
    Gap,
}

/// An event of a log, and the bytes every stream of the flight writes for it whole: rendered
/// by the first stream that needs them, shared by the rest (a viral fight's thousands of
/// viewers cost one rendering per chunk, not one each).
pub struct Logged {
    event: Event,
    frame: OnceLock<Bytes>,
}

impl Logged {
    pub(crate) fn new(event: Event) -> Logged {
        Logged {
            event,
            frame: OnceLock::new(),
        }
    }

    /// The event's frame as a stream writes it whole, `render`ed once for every stream.
    pub fn frame(&self, render: impl FnOnce(&Event) -> Bytes) -> Bytes {
        self.frame.get_or_init(|| render(&self.event)).clone()
    }
}

impl Deref for Logged {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.event
    }
}

impl Log {
    /// An empty log of a picture's generation (`Log::default()` is a text's).
    pub(crate) fn of_picture() -> Log {
        Log {
            pictures: true,
            ..Log::default()
        }
    }

    /// Takes `event` if it extends the generation. `stored` events come from the stream's
    /// history, in the stream's order: an operator's purge there ends the generation even if
    /// the log never saw it begin.
    pub(crate) fn offer(&mut self, event: Event, stored: bool) -> Offer {
        if self.closed {
            return Offer::Stale;
        }
        let event = match event {
            Event::Started { attempt } => match self.attempt {
                Some(current) if attempt <= current => return Offer::Stale,
                _ => {
                    self.attempt = Some(attempt);
                    self.end = 0;
                    event
                }
            },
            Event::Chunk {
                attempt,
                offset,
                delta,
            } => {
                let stop = offset + delta.len();
                match self.attempt {
                    Some(current) if attempt < current => return Offer::Stale,
                    Some(current) if attempt == current => {
                        if stop <= self.end {
                            return Offer::Stale;
                        }
                        if offset > self.end {
                            return Offer::Gap;
                        }
                        // Keep only the part after what the log holds.
                        let Some(rest) = delta.get(self.end - offset..) else {
                            return Offer::Gap;
                        };
                        let event = Event::Chunk {
                            attempt,
                            offset: self.end,
                            delta: rest.to_owned(),
                        };
                        self.end = stop;
                        event
                    }
                    _ if offset == 0 => {
                        self.attempt = Some(attempt);
                        self.end = stop;
                        Event::Chunk {
                            attempt,
                            offset,
                            delta,
                        }
                    }
                    _ => return Offer::Gap,
                }
            }
            // A partial image is taken by its place as a chunk is: once, in order.
            Event::Partial { attempt, index, .. } if self.pictures => {
                let index = index as usize;
                match self.attempt {
                    Some(current) if attempt < current => return Offer::Stale,
                    Some(current) if attempt == current => {
                        if index < self.end {
                            return Offer::Stale;
                        }
                        if index > self.end {
                            return Offer::Gap;
                        }
                        self.end = index + 1;
                        event
                    }
                    _ if index == 0 => {
                        self.attempt = Some(attempt);
                        self.end = 1;
                        event
                    }
                    _ => return Offer::Gap,
                }
            }
            // A text has no partial image: nothing to take, nothing missing.
            Event::Partial { .. } => return Offer::Stale,
            Event::Done {
                attempt, length, ..
            } => match self.attempt {
                Some(current) if attempt < current => return Offer::Stale,
                Some(current) if attempt == current && length <= self.end => event,
                _ => return Offer::Gap,
            },
            Event::Error { attempt, .. } => match self.attempt {
                Some(current) if attempt < current => return Offer::Stale,
                Some(current) if attempt == current => event,
                _ => return Offer::Gap,
            },
            Event::Purged if stored => event,
            Event::Purged => return Offer::Gap,
        };
        let ended = event.is_terminal();
        self.events.push(Arc::new(Logged::new(event)));
        self.closed = ended;
        Offer::Taken { ended }
    }
}

#[cfg(test)]
mod tests {
    use super::{Log, Offer};
    use versus_shared::wire::Event;

    fn chunk(attempt: i32, offset: usize, delta: &str) -> Event {
        Event::Chunk {
            attempt,
            offset,
            delta: delta.to_owned(),
        }
    }

    fn partial(attempt: i32, index: u32) -> Event {
        Event::Partial {
            attempt,
            index,
            path: format!("partials/k/{attempt}/{index}.png"),
        }
    }

    /// The partials the log holds, as (attempt, index), in the order waiters replay them.
    fn partials(log: &Log) -> Vec<(i32, u32)> {
        log.events
            .iter()
            .filter_map(|event| match &***event {
                Event::Partial { attempt, index, .. } => Some((*attempt, *index)),
                _ => None,
            })
            .collect()
    }

    fn done(attempt: i32, length: usize) -> Event {
        Event::Done {
            attempt,
            model: "m".to_owned(),
            length,
        }
    }

    fn error(attempt: i32) -> Event {
        Event::Error {
            attempt,
            code: "upstream".to_owned(),
            message: "no".to_owned(),
            retryable: true,
            retry_at_ms: None,
        }
    }

    fn text(log: &Log) -> String {
        let (mut text, mut current) = (String::new(), None);
        for event in &log.events {
            match &***event {
                Event::Started { attempt } | Event::Chunk { attempt, .. }
                    if current != Some(*attempt) =>
                {
                    current = Some(*attempt);
                    text.clear();
                }
                _ => {}
            }
            if let Event::Chunk { offset, delta, .. } = &***event {
                assert_eq!(*offset, text.len(), "chunks follow each other");
                text.push_str(delta);
            }
        }
        text
    }

    const TAKEN: Offer = Offer::Taken { ended: false };

    #[test]
    fn history_and_live_copies_of_the_same_events_are_logged_once() {
        let mut log = Log::default();
        let stored = [
            Event::Started { attempt: 1 },
            chunk(1, 0, "Thor "),
            chunk(1, 5, "wins"),
        ];
        for e in stored.clone() {
            assert_eq!(log.offer(e, true), TAKEN);
        }
        // The same events, live, then what follows them.
        for e in stored {
            assert_eq!(log.offer(e, false), Offer::Stale);
        }
        assert_eq!(log.offer(chunk(1, 9, "."), false), TAKEN);
        assert_eq!(log.offer(done(1, 10), false), Offer::Taken { ended: true });
        assert_eq!(text(&log), "Thor wins.");
        assert_eq!(log.events.len(), 5);
        assert_eq!(log.offer(chunk(1, 10, "more"), false), Offer::Stale);
    }

    #[test]
    fn a_chunk_overlapping_what_is_held_adds_only_the_rest() {
        let mut log = Log::default();
        log.offer(chunk(2, 0, "Zeus "), false);
        assert_eq!(log.offer(chunk(2, 0, "Zeus wins"), true), TAKEN);
        assert_eq!(text(&log), "Zeus wins");
        // A cut inside a character is a hole, not a broken string.
        let mut log = Log::default();
        log.offer(chunk(1, 0, "é"), false);
        log.end = 1;
        assert_eq!(log.offer(chunk(1, 0, "éa"), false), Offer::Gap);
    }

    #[test]
    fn what_does_not_follow_the_log_is_a_gap() {
        let mut log = Log::default();
        // Mid-answer, with nothing held.
        assert_eq!(log.offer(chunk(1, 4, "wins"), false), Offer::Gap);
        // An end of an attempt never seen beginning.
        assert_eq!(log.offer(error(1), false), Offer::Gap);
        assert_eq!(log.offer(done(1, 0), false), Offer::Gap);
        // A purge seen live may be stale; in the stored history it is the truth.
        assert_eq!(log.offer(Event::Purged, false), Offer::Gap);
        log.offer(Event::Started { attempt: 1 }, false);
        assert_eq!(log.offer(chunk(1, 0, "Thor "), false), TAKEN);
        // A chunk after a hole, and a `done` longer than the text held.
        assert_eq!(log.offer(chunk(1, 9, "."), false), Offer::Gap);
        assert_eq!(log.offer(done(1, 10), false), Offer::Gap);
        assert!(log.events.len() == 2 && !log.closed);
        assert_eq!(log.offer(Event::Purged, true), Offer::Taken { ended: true });
    }

    #[test]
    fn a_new_attempt_replaces_the_old_one_and_the_old_one_is_ignored_after() {
        let mut log = Log::default();
        log.offer(Event::Started { attempt: 1 }, false);
        log.offer(chunk(1, 0, "Thor"), false);
        assert_eq!(log.offer(Event::Started { attempt: 2 }, false), TAKEN);
        assert_eq!(log.offer(chunk(1, 4, " wins"), false), Offer::Stale);
        assert_eq!(log.offer(error(1), false), Offer::Stale);
        assert_eq!(log.offer(chunk(2, 0, "Zeus"), false), TAKEN);
        assert_eq!(text(&log), "Zeus");
        // A first chunk of a newer attempt starts it even if `started` was missed.
        assert_eq!(log.offer(chunk(3, 0, "Odin"), false), TAKEN);
        assert_eq!(log.offer(error(3), false), Offer::Taken { ended: true });
        assert_eq!(text(&log), "Odin");
    }

    #[test]
    fn a_pictures_partials_are_taken_once_and_in_order() {
        let mut log = Log::of_picture();
        assert_eq!(log.offer(Event::Started { attempt: 1 }, false), TAKEN);
        assert_eq!(log.offer(partial(1, 0), false), TAKEN);
        // The same partial from the history, and again live.
        assert_eq!(log.offer(partial(1, 0), true), Offer::Stale);
        assert_eq!(log.offer(partial(1, 0), false), Offer::Stale);
        assert_eq!(log.offer(partial(1, 1), true), TAKEN);
        assert_eq!(log.offer(partial(1, 1), false), Offer::Stale);
        assert_eq!(log.offer(partial(1, 2), false), TAKEN);
        assert_eq!(log.offer(done(1, 3), false), Offer::Taken { ended: true });
        assert_eq!(partials(&log), [(1, 0), (1, 1), (1, 2)]);
        assert_eq!(log.events.len(), 5);
    }

    #[test]
    fn a_partial_after_a_hole_or_a_done_counting_more_sends_to_the_history() {
        let mut log = Log::of_picture();
        // Mid-drawing, with nothing held.
        assert_eq!(log.offer(partial(1, 1), false), Offer::Gap);
        log.offer(Event::Started { attempt: 1 }, false);
        assert_eq!(log.offer(partial(1, 1), false), Offer::Gap);
        assert_eq!(log.offer(partial(1, 0), false), TAKEN);
        // Partial 1 was lost: 2 does not follow, nor does a done that counts 3.
        assert_eq!(log.offer(partial(1, 2), false), Offer::Gap);
        assert_eq!(log.offer(done(1, 3), false), Offer::Gap);
        assert!(!log.closed);
        // The history fills the hole; then what waited follows.
        assert_eq!(log.offer(partial(1, 1), true), TAKEN);
        assert_eq!(log.offer(partial(1, 2), false), TAKEN);
        assert_eq!(log.offer(done(1, 3), false), Offer::Taken { ended: true });
        assert_eq!(partials(&log), [(1, 0), (1, 1), (1, 2)]);
        // A picture drawn without partials (or by a worker before them) counts none.
        let mut log = Log::of_picture();
        log.offer(Event::Started { attempt: 4 }, false);
        assert_eq!(log.offer(done(4, 0), false), Offer::Taken { ended: true });
    }

    #[test]
    fn a_new_attempt_starts_its_partials_afresh() {
        let mut log = Log::of_picture();
        log.offer(Event::Started { attempt: 1 }, false);
        log.offer(partial(1, 0), false);
        log.offer(partial(1, 1), false);
        assert_eq!(log.offer(Event::Started { attempt: 2 }, false), TAKEN);
        // The old attempt's partials and end are left behind.
        assert_eq!(log.offer(partial(1, 2), false), Offer::Stale);
        assert_eq!(log.offer(error(1), false), Offer::Stale);
        // The new one counts from 0 again.
        assert_eq!(log.offer(partial(2, 1), false), Offer::Gap);
        assert_eq!(log.offer(partial(2, 0), false), TAKEN);
        assert_eq!(log.offer(done(2, 2), false), Offer::Gap);
        // A first partial of a newer attempt starts it even if `started` was missed.
        assert_eq!(log.offer(partial(3, 0), false), TAKEN);
        assert_eq!(log.offer(done(3, 1), false), Offer::Taken { ended: true });
        assert_eq!(partials(&log), [(1, 0), (1, 1), (2, 0), (3, 0)]);
    }

    #[test]
    fn a_text_takes_no_partial() {
        let mut log = Log::default();
        log.offer(Event::Started { attempt: 1 }, false);
        assert_eq!(log.offer(partial(1, 0), false), Offer::Stale);
        assert_eq!(log.offer(chunk(1, 0, "Thor"), false), TAKEN);
        assert_eq!(log.offer(partial(1, 4), true), Offer::Stale);
        assert_eq!(log.offer(done(1, 4), false), Offer::Taken { ended: true });
        assert!(partials(&log).is_empty());
    }
}
