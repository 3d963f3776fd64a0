//! Coalescing within one API process: one reader of a key's events, however many HTTP requests
//! wait on that key. The reader keeps every event of the generation in a log, so a request
//! that joins late replays it from the first message; across API replicas, the job's
//! `Nats-Msg-Id` makes identical misses one job.
//!
//! A reader follows its key with a core NATS subscription on the key's events subject: the
//! server matches each published event against subscriptions through its subject tree, so a
//! thousand concurrent flights cost it nothing per event (a JetStream consumer per key made
//! every event visit every consumer's filter). What the stream held before the subscription
//! is read with batched direct gets. The log takes each event once, by its place in the
//! generation (attempt, then byte offset), so an event seen both in the history and live
//! counts once; an event that does not fit (a chunk after a hole, an end the log never saw
//! begin, a `done` longer than the text held) sends the reader back to the history, as does a
//! reconnect or a subscription overflow, the two ways core NATS loses messages. A `done` whose
//! text the history cannot complete (a nats-server restart empties the in-memory events
//! stream) is completed from the stored answer in the edge KV bucket.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use async_nats::{
    StatusCode,
    jetstream::{self, message::PublishMessage, stream::DirectGetErrorKind},
};
use backon::{ExponentialBuilder, Retryable};
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use versus_shared::{
    bus::Bus,
    key::Key,
    wire::{self, Answer, Event, ImageAnswer, Job, Kind},
};

/// Every flight of this process, by key.
pub struct Flights {
    bus: Bus,
    timeout: Duration,
    live: Mutex<HashMap<Key, Arc<Flight>>>,
}

/// One generation as this process sees it.
pub struct Flight {
    log: Mutex<Log>,
    notify: watch::Sender<usize>,
    /// Requests waiting on this flight; changed only under the `live` lock.
    waiters: AtomicUsize,
    stop: CancellationToken,
}

#[derive(Default)]
struct Log {
    events: Vec<Arc<Event>>,
    closed: bool,
    /// The attempt the log follows, and where its text ends.
    attempt: Option<i32>,
    end: usize,
}

/// What the log made of an event.
#[derive(Debug, PartialEq, Eq)]
enum Offer {
    /// Logged; `ended` when it ends the generation.
    Taken { ended: bool },
    /// Already held, or from an attempt the log has left behind.
    Known,
    /// It does not follow what the log holds: something before it is missing.
    Gap,
}

impl Log {
    /// Takes `event` if it extends the generation. `stored` events come from the stream's
    /// history, in the stream's order: an operator's purge there ends the generation even if
    /// the log never saw it begin.
    fn offer(&mut self, event: Event, stored: bool) -> Offer {
        if self.closed {
            return Offer::Known;
        }
        let event = match event {
            Event::Started { attempt } => match self.attempt {
                Some(current) if attempt <= current => return Offer::Known,
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
                    Some(current) if attempt < current => return Offer::Known,
                    Some(current) if attempt == current => {
                        if stop <= self.end {
                            return Offer::Known;
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
            Event::Done {
                attempt, length, ..
            } => match self.attempt {
                Some(current) if attempt < current => return Offer::Known,
                Some(current) if attempt == current && length <= self.end => event,
                _ => return Offer::Gap,
            },
            Event::Error { attempt, .. } => match self.attempt {
                Some(current) if attempt < current => return Offer::Known,
                Some(current) if attempt == current => event,
                _ => return Offer::Gap,
            },
            Event::Purged if stored => event,
            Event::Purged => return Offer::Gap,
        };
        let ended = event.is_terminal();
        self.events.push(Arc::new(event));
        self.closed = ended;
        Offer::Taken { ended }
    }
}

impl Flights {
    pub fn new(bus: Bus, timeout: Duration) -> Arc<Flights> {
        Arc::new(Flights {
            bus,
            timeout,
            live: Mutex::new(HashMap::new()),
        })
    }

    /// Waits on the generation of `job.key`, starting it if this process has no reader yet.
    pub fn join(self: &Arc<Self>, job: Job) -> Waiter {
        let mut live = lock(&self.live);
        let (flight, created) = match live.get(&job.key) {
            Some(flight) => (flight.clone(), false),
            None => {
                let (notify, _) = watch::channel(0);
                let flight = Arc::new(Flight {
                    log: Mutex::new(Log::default()),
                    notify,
                    waiters: AtomicUsize::new(0),
                    stop: CancellationToken::new(),
                });
                live.insert(job.key.clone(), flight.clone());
                (flight, true)
            }
        };
        flight.waiters.fetch_add(1, Ordering::SeqCst);
        drop(live);
        let key = job.key.clone();
        if created {
            metrics::counter!("versus_cache_misses_total").increment(1);
            tokio::spawn(read(self.clone(), flight.clone(), job));
        } else {
            metrics::counter!("versus_coalesced_total").increment(1);
        }
        Waiter {
            rx: flight.notify.subscribe(),
            flight,
            next: 0,
            flights: self.clone(),
            key,
        }
    }

    /// Forgets `flight` if it is still the live one for `key`.
    fn remove(&self, key: &Key, flight: &Arc<Flight>) {
        forget(&mut lock(&self.live), key, flight);
    }
}

fn forget(live: &mut HashMap<Key, Arc<Flight>>, key: &Key, flight: &Arc<Flight>) {
    if live.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
        live.remove(key);
    }
}

/// One request's place in a flight's log.
pub struct Waiter {
    flight: Arc<Flight>,
    rx: watch::Receiver<usize>,
    next: usize,
    flights: Arc<Flights>,
    key: Key,
}

impl Waiter {
    /// The next event, or None once the generation's last event was returned.
    pub async fn next(&mut self) -> Option<Arc<Event>> {
        loop {
            {
                let log = lock(&self.flight.log);
                if let Some(event) = log.events.get(self.next) {
                    self.next += 1;
                    return Some(event.clone());
                }
                if log.closed {
                    return None;
                }
            }
            if self.rx.changed().await.is_err() {
                // The reader is gone; whatever it logged was drained above on the next turn.
                let log = lock(&self.flight.log);
                if self.next >= log.events.len() {
                    return None;
                }
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut live = lock(&self.flights.live);
        if self.flight.waiters.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Nobody here waits any more: stop reading. The generation itself goes on in the
            // workers, and a later request starts a new reader that replays it.
            self.flight.stop.cancel();
            forget(&mut live, &self.key, &self.flight);
        }
    }
}

impl Flight {
    fn offer(&self, event: Event, stored: bool) -> Offer {
        let (offer, len) = {
            let mut log = lock(&self.log);
            let offer = log.offer(event, stored);
            (offer, log.events.len())
        };
        if matches!(offer, Offer::Taken { .. }) {
            self.notify.send_replace(len);
        }
        offer
    }

    /// Ends the flight with an event of this process's own (a timeout, a lost bus).
    fn end_with(&self, event: Event) {
        let len = {
            let mut log = lock(&self.log);
            if log.closed {
                return;
            }
            log.events.push(Arc::new(event));
            log.closed = true;
            log.events.len()
        };
        self.notify.send_replace(len);
    }
}

/// The reader of one flight: decides where the key's history starts, publishes the job, and
/// logs events until a terminal one, the timeout, or the last waiter leaves.
async fn read(flights: Arc<Flights>, flight: Arc<Flight>, job: Job) {
    let key = job.key.clone();
    let ending = tokio::select! {
        () = flight.stop.cancelled() => None,
        r = tokio::time::timeout(flights.timeout, follow(&flights.bus, &flight, job)) => match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                tracing::warn!(%key, error = format!("{e:#}"), "following a generation failed");
                Some(Event::Error {
                    attempt: 0,
                    code: "unavailable".to_owned(),
                    message: "The service could not follow this answer. Please try again.".to_owned(),
                    retryable: true,
                })
            }
            Err(_) => Some(Event::Error {
                attempt: 0,
                code: "timeout".to_owned(),
                message: "The answer took too long. Please try again.".to_owned(),
                retryable: true,
            }),
        },
    };
    if let Some(event) = ending {
        flight.end_with(event);
    }
    {
        let mut log = lock(&flight.log);
        log.closed = true;
    }
    flight.notify.send_modify(|_| {});
    flights.remove(&key, &flight);
}

/// How many times a reader reads the history again for one event that does not fit, and how
/// long it waits first: an event reaches subscribers just before the stream stores it.
const RESYNC_TRIES: u32 = 4;
const RESYNC_PAUSE: Duration = Duration::from_millis(2);

async fn follow(bus: &Bus, flight: &Flight, job: Job) -> anyhow::Result<()> {
    let began = std::time::Instant::now();
    let subject = wire::events_subject(job.kind, &job.key);
    let mut losses = bus.losses.clone();
    losses.mark_unchanged();
    // Subscribe first: the server takes this connection's messages in order, so the
    // subscription is in place before the history is read and before the job is published.
    let mut live = bus.client.subscribe(subject.clone()).await?;
    // The rare or one-off steps are boxed: the reader's future stays small while it waits,
    // which is most of its life (M1 in BENCHMARKS.md).
    let last = Box::pin(last_event(bus, &subject)).await?;
    // The subject holds at most one attempt (workers purge before a new one). If that attempt
    // ended badly, follow what comes after it and ask for a new job; otherwise read it all,
    // and ask for a job anyway: a no-op for a live or finished generation, and it restarts a
    // lost one.
    let (after, base) = match last {
        Some((seq, payload, Event::Error { .. } | Event::Purged)) => {
            // Whatever reached the subscription up to that end belongs to the failed attempt:
            // every copy of it arrived before the answer above, and it ends with that event.
            let mut early = Vec::new();
            while let Some(Some(msg)) = live.next().now_or_never() {
                early.push(msg.payload);
            }
            let stale = early
                .iter()
                .position(|p| *p == payload)
                .map_or(0, |i| i + 1);
            for payload in early.drain(stale..) {
                if offer_live(bus, flight, &job, &subject, seq, payload).await? {
                    return Ok(());
                }
            }
            (seq, seq)
        }
        Some((seq, ..)) => {
            if Box::pin(replay(bus, flight, &subject, 0)).await? {
                return Ok(());
            }
            (seq, 0)
        }
        None => (0, 0),
    };
    Box::pin(publish_job(&bus.js, &job, after)).await?;
    metrics::histogram!("versus_flight_setup_seconds").record(began.elapsed());
    loop {
        tokio::select! {
            msg = live.next() => {
                let msg = msg.context("the events subscription ended")?;
                if offer_live(bus, flight, &job, &subject, base, msg.payload).await? {
                    return Ok(());
                }
            }
            changed = losses.changed() => {
                changed.context("the NATS connection is gone")?;
                tracing::debug!(%subject, "messages may have been lost; reading the history");
                if Box::pin(replay(bus, flight, &subject, base)).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// Offers one live event to the log, reading the history (from after `after`) when it does
/// not fit. True once the generation has ended.
async fn offer_live(
    bus: &Bus,
    flight: &Flight,
    job: &Job,
    subject: &str,
    after: u64,
    payload: bytes::Bytes,
) -> anyhow::Result<bool> {
    let Some(event) = decode(subject, &payload) else {
        return Ok(false);
    };
    let mut pause = RESYNC_PAUSE;
    for _ in 0..RESYNC_TRIES {
        match flight.offer(event.clone(), false) {
            Offer::Taken { ended } => return Ok(ended),
            Offer::Known => return Ok(false),
            Offer::Gap => {}
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
        if Box::pin(replay(bus, flight, subject, after)).await? {
            return Ok(true);
        }
    }
    if let Event::Done { attempt, .. } = event {
        // The stream lost part of a finished attempt (a NATS restart empties the memory
        // stream), but the answer is whole in the edge KV bucket, written before `done`.
        return Box::pin(finish_from_store(bus, flight, job, attempt, event)).await;
    }
    // Still no place for it: it belongs to an attempt the history no longer holds.
    tracing::debug!(%subject, "dropping an event that fits no attempt");
    Ok(false)
}

/// Completes the log from the stored answer of `attempt`, then ends it with `done`.
async fn finish_from_store(
    bus: &Bus,
    flight: &Flight,
    job: &Job,
    attempt: i32,
    done: Event,
) -> anyhow::Result<bool> {
    let Some(bytes) = bus.answers.get(wire::kv_key(job.kind, &job.key)).await? else {
        return Ok(false);
    };
    let (stored, filler) = match job.kind {
        Kind::Text => {
            let answer: Answer = serde_json::from_slice(&bytes)?;
            let chunk = Event::Chunk {
                attempt,
                offset: 0,
                delta: answer.text,
            };
            (answer.attempt, chunk)
        }
        Kind::Image => {
            let answer: ImageAnswer = serde_json::from_slice(&bytes)?;
            (answer.attempt, Event::Started { attempt })
        }
    };
    if stored != attempt {
        return Ok(false);
    }
    tracing::info!(key = %job.key, attempt, "events were lost; finishing from the stored answer");
    flight.offer(filler, true);
    Ok(flight.offer(done, true) == Offer::Taken { ended: true })
}

/// Offers the stored events after sequence `after` to the log. True once the generation has
/// ended. A hole stops the replay: what follows it waits for a new attempt, or for a `done`
/// the stored answer completes.
async fn replay(bus: &Bus, flight: &Flight, subject: &str, after: u64) -> anyhow::Result<bool> {
    // Mid-generation, a NATS outage is worth waiting out (JetStream answers 503 for a moment
    // after a restart); the flight's own timeout bounds the wait.
    let stored = (|| history(bus, subject, after + 1))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(1))
                .without_max_times(),
        )
        .notify(|e, delay| {
            tracing::info!(%subject, error = format!("{e:#}"), ?delay, "reading stored events failed; retrying");
        })
        .await?;
    for event in stored {
        match flight.offer(event, true) {
            Offer::Taken { ended: true } => return Ok(true),
            Offer::Gap => {
                tracing::debug!(%subject, "the stored events have a hole");
                return Ok(false);
            }
            Offer::Taken { ended: false } | Offer::Known => {}
        }
    }
    Ok(false)
}

/// The last event stored on `subject`: its sequence, its bytes, and what they say.
async fn last_event(
    bus: &Bus,
    subject: &str,
) -> anyhow::Result<Option<(u64, bytes::Bytes, Event)>> {
    match bus.events.direct_get_last_for_subject(subject).await {
        Ok(msg) => Ok(decode(subject, &msg.payload).map(|e| (msg.sequence, msg.payload, e))),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("reading the last event"),
    }
}

/// How many events one direct get returns at most (the server's limit).
const HISTORY_BATCH: usize = 1000;
const HISTORY_TIMEOUT: Duration = Duration::from_secs(5);

/// The events stored on `subject` from stream sequence `from` on, in order: batched direct
/// gets (nats-server 2.11+), a thousand events per round trip, no consumer to create.
async fn history(bus: &Bus, subject: &str, mut from: u64) -> anyhow::Result<Vec<Event>> {
    let api = format!("$JS.API.DIRECT.GET.{}", wire::EVENTS_STREAM);
    let mut events = Vec::new();
    loop {
        let inbox = bus.client.new_inbox();
        let mut replies = bus.client.subscribe(inbox.clone()).await?;
        let request =
            serde_json::json!({"seq": from, "next_by_subj": subject, "batch": HISTORY_BATCH});
        bus.client
            .publish_with_reply(api.clone(), inbox, serde_json::to_vec(&request)?.into())
            .await?;
        let mut read = 0;
        loop {
            let msg = tokio::time::timeout(HISTORY_TIMEOUT, replies.next())
                .await
                .context("reading the stored events timed out")?
                .context("the stored events' subscription ended")?;
            match msg.status {
                None | Some(StatusCode::OK) => {}
                // Nothing stored from `from` on.
                Some(StatusCode::NOT_FOUND) => return Ok(events),
                // The end of this batch.
                Some(s) if s.as_u16() == 204 => break,
                Some(s) => anyhow::bail!(
                    "reading the stored events: {s} {}",
                    msg.description.unwrap_or_default()
                ),
            }
            let seq = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_SEQUENCE))
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .context("a stored event without its sequence")?;
            from = seq + 1;
            read += 1;
            events.extend(decode(subject, &msg.payload));
        }
        if read < HISTORY_BATCH {
            return Ok(events);
        }
    }
}

fn decode(subject: &str, payload: &[u8]) -> Option<Event> {
    serde_json::from_slice(payload)
        .inspect_err(|e| tracing::warn!(%subject, error = %e, "skipping an unreadable event"))
        .ok()
}

async fn publish_job(js: &jetstream::Context, job: &Job, after: u64) -> anyhow::Result<()> {
    let payload = serde_json::to_vec(job)?;
    let ack = js
        .send_publish(
            wire::job_subject(job.kind),
            PublishMessage::build()
                .payload(payload.into())
                .message_id(wire::job_msg_id(job.kind, &job.key, after)),
        )
        .await?
        .await?;
    if !ack.duplicate {
        metrics::counter!("versus_jobs_published_total").increment(1);
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
        }
    }

    fn text(log: &Log) -> String {
        let (mut text, mut current) = (String::new(), None);
        for event in &log.events {
            match &**event {
                Event::Started { attempt } | Event::Chunk { attempt, .. }
                    if current != Some(*attempt) =>
                {
                    current = Some(*attempt);
                    text.clear();
                }
                _ => {}
            }
            if let Event::Chunk { offset, delta, .. } = &**event {
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
            assert_eq!(log.offer(e, false), Offer::Known);
        }
        assert_eq!(log.offer(chunk(1, 9, "."), false), TAKEN);
        assert_eq!(log.offer(done(1, 10), false), Offer::Taken { ended: true });
        assert_eq!(text(&log), "Thor wins.");
        assert_eq!(log.events.len(), 5);
        assert_eq!(log.offer(chunk(1, 10, "more"), false), Offer::Known);
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
        assert_eq!(log.offer(chunk(1, 4, " wins"), false), Offer::Known);
        assert_eq!(log.offer(error(1), false), Offer::Known);
        assert_eq!(log.offer(chunk(2, 0, "Zeus"), false), TAKEN);
        assert_eq!(text(&log), "Zeus");
        // A first chunk of a newer attempt starts it even if `started` was missed.
        assert_eq!(log.offer(chunk(3, 0, "Odin"), false), TAKEN);
        assert_eq!(log.offer(error(3), false), Offer::Taken { ended: true });
        assert_eq!(text(&log), "Odin");
    }
}
