//! The server-sent-event body of a streamed chat completion, paced by timers.
//!
//! Tokens already due are batched into one frame, so an unpaced or late stream costs
//! one allocation per frame, not per token.

use std::io;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep_until};

use crate::answer::Answer;
use crate::config::Knobs;
use crate::state::Sim;

/// When each token is due: the first at `ttft`, then one every `interval`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    start: Instant,
    ttft: Duration,
    interval_nanos: u64,
}

impl Pace {
    pub fn from_knobs(knobs: &Knobs) -> Self {
        Self {
            start: Instant::now(),
            ttft: Duration::from_millis(knobs.ttft_ms),
            interval_nanos: 1_000_000_000u64
                .checked_div(knobs.tokens_per_sec)
                .unwrap_or(0),
        }
    }

    pub fn deadline(&self, token: usize) -> Instant {
        let spacing = Duration::from_nanos(self.interval_nanos.saturating_mul(token as u64));
        self.start + self.ttft + spacing
    }
}

/// The parts of a completion that every chunk repeats.
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub prompt_tokens: usize,
}

/// How the stream ends once the tokens it may send are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// `finish_reason` (`stop` for a whole answer), the usage if asked for, and `[DONE]`.
    Finish {
        include_usage: bool,
        reason: String,
    },
    Cut,
    Stall,
}

/// A `text/event-stream` response sending `limit` tokens of `answer`, then `ending`.
pub fn respond(
    meta: Meta,
    answer: Answer,
    limit: usize,
    pace: Pace,
    ending: Ending,
    sim: Sim,
) -> Response {
    let stop = sim.stop_token();
    let prefix = format!(
        r#"data: {{"id":{},"object":"chat.completion.chunk","created":{},"model":{},"choices":[{{"index":0,"delta":"#,
        Value::from(meta.id.as_str()),
        meta.created,
        Value::from(meta.model.as_str()),
    );
    let chunks = Chunks {
        prefix,
        limit: limit.min(answer.len()),
        answer,
        meta,
        pace,
        ending,
        next: 0,
        phase: Phase::Role,
        sim,
    };
    // At shutdown the body just ends, so graceful shutdown never waits on a stall.
    let frames =
        futures::stream::unfold(chunks, Chunks::next_frame).take_until(stop.cancelled_owned());
    event_stream(frames)
}

/// An SSE response (`text/event-stream`, not cached) whose body is `frames`.
pub(crate) fn event_stream(
    frames: impl futures::Stream<Item = Result<Bytes, io::Error>> + Send + 'static,
) -> Response {
    let mut response = Response::new(Body::from_stream(frames));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

enum Phase {
    Role,
    Tokens,
    Cut,
    Stalled,
    Done,
}

struct Chunks {
    /// Everything of a chunk before its delta object.
    prefix: String,
    answer: Answer,
    meta: Meta,
    pace: Pace,
    ending: Ending,
    limit: usize,
    next: usize,
    phase: Phase,
    sim: Sim,
}

impl Drop for Chunks {
    /// A stream dropped while its tokens still flow was abandoned by its client (a stream
    /// the simulator ends, cuts or stalls on purpose is not).
    fn drop(&mut self) {
        if matches!(self.phase, Phase::Role | Phase::Tokens)
            && !self.sim.stop_token().is_cancelled()
        {
            self.sim.note_abandoned_chat();
        }
    }
}

const TOKEN_SUFFIX: &[u8] = b"},\"finish_reason\":null}]}\n\n";

impl Chunks {
    async fn next_frame(mut self) -> Option<(Result<Bytes, io::Error>, Self)> {
        loop {
            match self.phase {
                Phase::Role => {
                    self.phase = Phase::Tokens;
                    let mut buf = Vec::with_capacity(self.prefix.len() + 64);
                    buf.extend_from_slice(self.prefix.as_bytes());
                    buf.extend_from_slice(br##"{"role":"assistant","content":"""##);
                    buf.extend_from_slice(TOKEN_SUFFIX);
                    return Some((Ok(buf.into()), self));
                }
                Phase::Tokens => {
                    if let Some(buf) = self.due_tokens().await {
                        return Some((Ok(buf.into()), self));
                    }
                }
                Phase::Cut => {
                    // Dying when the next token would have come, and never in the same
                    // instant as the last frame, lets that frame reach the socket first.
                    let floor = Instant::now() + Duration::from_millis(5);
                    sleep_until(self.pace.deadline(self.limit).max(floor)).await;
                    self.phase = Phase::Done;
                    let cut = io::Error::new(io::ErrorKind::ConnectionAborted, "simulated cut");
                    return Some((Err(cut), self));
                }
                Phase::Stalled => std::future::pending::<()>().await,
                Phase::Done => return None,
            }
        }
    }

    /// Waits for the next token, then takes every token due by now (and the ending, if reached).
    async fn due_tokens(&mut self) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        if self.next < self.limit {
            let due = self.pace.deadline(self.next);
            if due > Instant::now() {
                sleep_until(due).await;
            }
            let now = Instant::now();
            buf.reserve((self.prefix.len() + 48) * 2);
            // The token just waited for goes out even if the timer fired a hair early.
            self.push_token(&mut buf);
            while self.next < self.limit && self.pace.deadline(self.next) <= now {
                self.push_token(&mut buf);
            }
        }
        if self.next == self.limit {
            self.phase = match &self.ending {
                Ending::Finish {
                    include_usage,
                    reason,
                } => {
                    self.push_finish(&mut buf, *include_usage, reason);
                    Phase::Done
                }
                Ending::Cut => Phase::Cut,
                Ending::Stall => Phase::Stalled,
            };
        }
        (!buf.is_empty()).then_some(buf)
    }

    fn push_token(&mut self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.extend_from_slice(br#"{"content":"#);
        push_json_string(buf, self.answer.token(self.next));
        buf.extend_from_slice(TOKEN_SUFFIX);
        self.next += 1;
    }

    fn push_finish(&self, buf: &mut Vec<u8>, include_usage: bool, reason: &str) {
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.extend_from_slice(b"{},\"finish_reason\":");
        push_json_string(buf, reason);
        buf.extend_from_slice(b"}]}\n\n");
        if include_usage {
            let usage = json!({
                "id": self.meta.id,
                "object": "chat.completion.chunk",
                "created": self.meta.created,
                "model": self.meta.model,
                "choices": [],
                "usage": usage(self.meta.prompt_tokens, self.limit),
            });
            buf.extend_from_slice(b"data: ");
            buf.extend_from_slice(usage.to_string().as_bytes());
            buf.extend_from_slice(b"\n\n");
        }
        buf.extend_from_slice(b"data: [DONE]\n\n");
    }
}

/// The OpenAI `usage` object.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// Appends `s` as a JSON string literal without an intermediate allocation.
fn push_json_string(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    for ch in s.chars() {
        match ch {
            '"' => buf.extend_from_slice(b"\\\""),
            '\\' => buf.extend_from_slice(b"\\\\"),
            c if u32::from(c) < 0x20 => {
                buf.extend_from_slice(format!("\\u{:04x}", u32::from(c)).as_bytes());
            }
            c => buf.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    buf.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_round_trip_through_serde() {
        let mut buf = Vec::new();
        let text = "a \"quote\" \\ naïve 🥊 \n tab\t";
        push_json_string(&mut buf, text);
        let back: String = serde_json::from_slice(&buf).expect("valid JSON");
        assert_eq!(back, text);
    }
}
