//! The server-sent-event body of a streamed image generation: `image_generation.partial_image`
//! events, then `image_generation.completed`, spread over the image delay.
//!
//! Each event is `event: <type>` and `data: <json>`; the JSON repeats the type. With `partials`
//! partial images asked, the delay is split into `partials + 1` equal parts: partial `i` is due
//! at the end of part `i`, the completed image at the end of the last.

use std::io;
use std::time::Duration;

use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep_until};

use crate::state::Sim;

/// Output tokens each partial image adds to the usage, as OpenAI bills them.
pub const PARTIAL_IMAGE_TOKENS: u64 = 100;

/// What every event of one stream repeats, and what the completed event reports.
#[derive(Debug, Clone)]
pub struct Meta {
    pub created_at: u64,
    /// `"WxH"` of the images sent.
    pub size: String,
    pub quality: String,
    pub background: String,
    /// Tokens of the prompt.
    pub input_tokens: u64,
    /// Output tokens of the completed image alone (partials add [`PARTIAL_IMAGE_TOKENS`] each).
    pub image_tokens: u64,
}

/// When each event is due: `parts - 1` partials and the completed image, evenly over `delay`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub start: Instant,
    pub delay: Duration,
    /// Partial images asked.
    pub partials: u32,
}

impl Schedule {
    /// When event `index` is due: partial `index` below `partials`, the completed image at
    /// `partials`.
    pub fn due(&self, index: u32) -> Instant {
        let parts = self.partials + 1;
        self.start + self.delay * (index.min(self.partials) + 1) / parts
    }
}

/// How the stream ends once its partial images are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `image_generation.completed` with the image and the usage.
    Complete,
    /// The connection drops when the next event was due.
    Cut,
    /// Silence until the client gives up.
    Stall,
}

/// A `text/event-stream` response sending `partials` (the PNGs of the partial images to send,
/// in order), then `ending` (with `image`, the completed PNG).
pub fn respond(
    meta: Meta,
    partials: Vec<Vec<u8>>,
    image: Vec<u8>,
    schedule: Schedule,
    ending: Ending,
    sim: Sim,
) -> Response {
    let stop = sim.stop_token();
    let events = Events {
        meta,
        partials,
        image,
        schedule,
        ending,
        next: 0,
        done: false,
        sim,
    };
    // At shutdown the body just ends, so graceful shutdown never waits on a stall.
    let frames =
        futures::stream::unfold(events, Events::next_frame).take_until(stop.cancelled_owned());
    crate::stream::event_stream(frames)
}

struct Events {
    meta: Meta,
    partials: Vec<Vec<u8>>,
    image: Vec<u8>,
    schedule: Schedule,
    ending: Ending,
    /// Partial images sent so far.
    next: usize,
    done: bool,
    sim: Sim,
}

impl Events {
    async fn next_frame(mut self) -> Option<(Result<Bytes, io::Error>, Self)> {
        if self.done {
            return None;
        }
        let index = u32::try_from(self.next).unwrap_or(u32::MAX);
        if let Some(png) = self.partials.get(self.next) {
            sleep_until(self.schedule.due(index)).await;
            let event = partial_event(&self.meta, index, png);
            self.next += 1;
            self.sim.note_partial_sent();
            return Some((Ok(frame(&event)), self));
        }
        self.done = true;
        match self.ending {
            Ending::Complete => {
                sleep_until(self.schedule.due(self.schedule.partials)).await;
                let event = completed_event(&self.meta, &self.image, index);
                Some((Ok(frame(&event)), self))
            }
            Ending::Cut => {
                // Never in the same instant as the last frame, so that frame reaches the
                // socket first.
                let floor = Instant::now() + Duration::from_millis(5);
                sleep_until(self.schedule.due(index).max(floor)).await;
                let cut = io::Error::new(io::ErrorKind::ConnectionAborted, "simulated cut");
                Some((Err(cut), self))
            }
            Ending::Stall => std::future::pending().await,
        }
    }
}

/// The `image_generation.partial_image` event of partial `index`.
pub fn partial_event(meta: &Meta, index: u32, png: &[u8]) -> Value {
    json!({
        "type": "image_generation.partial_image",
        "b64_json": STANDARD.encode(png),
        "partial_image_index": index,
        "created_at": meta.created_at,
        "size": meta.size,
        "quality": meta.quality,
        "background": meta.background,
        "output_format": "png",
    })
}

/// The `image_generation.completed` event, after `partials_sent` partial images.
pub fn completed_event(meta: &Meta, png: &[u8], partials_sent: u32) -> Value {
    let output_tokens = meta.image_tokens + PARTIAL_IMAGE_TOKENS * u64::from(partials_sent);
    json!({
        "type": "image_generation.completed",
        "b64_json": STANDARD.encode(png),
        "created_at": meta.created_at,
        "size": meta.size,
        "quality": meta.quality,
        "background": meta.background,
        "output_format": "png",
        "usage": {
            "total_tokens": meta.input_tokens + output_tokens,
            "input_tokens": meta.input_tokens,
            "output_tokens": output_tokens,
            "input_tokens_details": { "text_tokens": meta.input_tokens, "image_tokens": 0 },
        },
    })
}

/// `event: <type>` and `data: <json>`, ended by a blank line.
fn frame(event: &Value) -> Bytes {
    let kind = event["type"].as_str().unwrap_or("message");
    Bytes::from(format!("event: {kind}\ndata: {event}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Knobs;

    fn meta() -> Meta {
        Meta {
            created_at: 1_700_000_000,
            size: "8x8".to_owned(),
            quality: "medium".to_owned(),
            background: "opaque".to_owned(),
            input_tokens: 7,
            image_tokens: 1056,
        }
    }

    fn schedule(millis: u64, partials: u32) -> Schedule {
        Schedule {
            start: Instant::now(),
            delay: Duration::from_millis(millis),
            partials,
        }
    }

    /// The body's events as (event line, data JSON), and whether it ended in an error.
    async fn collect(
        partials: usize,
        asked: u32,
        ending: Ending,
        sim: &Sim,
    ) -> (Vec<(String, Value)>, bool) {
        let pngs = (0..partials).map(|i| vec![i as u8; 4]).collect();
        let events = Events {
            meta: meta(),
            partials: pngs,
            image: vec![9; 4],
            schedule: schedule(30, asked),
            ending,
            next: 0,
            done: false,
            sim: sim.clone(),
        };
        let mut frames = std::pin::pin!(futures::stream::unfold(events, Events::next_frame));
        let (mut out, mut broken) = (Vec::new(), false);
        while let Some(frame) = frames.next().await {
            let Ok(bytes) = frame else {
                broken = true;
                continue;
            };
            let text = String::from_utf8(bytes.to_vec()).expect("UTF-8");
            let body = text.strip_suffix("\n\n").expect("ends with a blank line");
            let (event, data) = body.split_once('\n').expect("two lines");
            let event = event.strip_prefix("event: ").expect("an event line");
            let data = data.strip_prefix("data: ").expect("a data line");
            out.push((
                event.to_owned(),
                serde_json::from_str(data).expect("data is JSON"),
            ));
        }
        (out, broken)
    }

    #[tokio::test]
    async fn partials_come_in_order_then_the_completed_image_with_their_tokens() {
        let sim = Sim::new(Knobs::default());
        let (events, broken) = collect(2, 2, Ending::Complete, &sim).await;
        assert!(!broken);
        let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "image_generation.partial_image",
                "image_generation.partial_image",
                "image_generation.completed"
            ]
        );
        for (i, (kind, data)) in events.iter().take(2).enumerate() {
            assert_eq!(data["type"], kind.as_str());
            assert_eq!(data["partial_image_index"], i);
            assert_eq!(data["b64_json"], STANDARD.encode([i as u8; 4]));
            assert_eq!(data["size"], "8x8");
            assert_eq!(data["quality"], "medium");
            assert_eq!(data["background"], "opaque");
            assert_eq!(data["output_format"], "png");
            assert_eq!(data["created_at"], 1_700_000_000);
        }
        let completed = &events[2].1;
        assert_eq!(completed["type"], "image_generation.completed");
        assert_eq!(completed["b64_json"], STANDARD.encode([9u8; 4]));
        assert!(completed.get("partial_image_index").is_none());
        let usage = &completed["usage"];
        assert_eq!(usage["input_tokens"], 7);
        assert_eq!(usage["output_tokens"], 1056 + 200);
        assert_eq!(usage["total_tokens"], 7 + 1056 + 200);
        assert_eq!(usage["input_tokens_details"]["text_tokens"], 7);
        assert_eq!(usage["input_tokens_details"]["image_tokens"], 0);
        assert_eq!(sim.stats().partials_sent, 2);
    }

    #[tokio::test]
    async fn no_partials_asked_sends_only_the_completed_image() {
        let sim = Sim::new(Knobs::default());
        let (events, broken) = collect(0, 0, Ending::Complete, &sim).await;
        assert!(!broken);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, "image_generation.completed");
        assert_eq!(events[0].1["usage"]["output_tokens"], 1056);
        assert_eq!(sim.stats().partials_sent, 0);
    }

    #[tokio::test]
    async fn a_cut_stream_sends_its_partials_then_breaks_without_completing() {
        let sim = Sim::new(Knobs::default());
        let (events, broken) = collect(1, 3, Ending::Cut, &sim).await;
        assert!(broken);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].0, "image_generation.partial_image");
        assert_eq!(sim.stats().partials_sent, 1);
    }

    #[test]
    fn the_delay_is_split_evenly_between_the_partials_and_the_image() {
        let s = schedule(900, 2);
        assert_eq!(s.due(0) - s.start, Duration::from_millis(300));
        assert_eq!(s.due(1) - s.start, Duration::from_millis(600));
        assert_eq!(s.due(2) - s.start, Duration::from_millis(900));
        let none = schedule(900, 0);
        assert_eq!(none.due(0) - none.start, Duration::from_millis(900));
    }
}
