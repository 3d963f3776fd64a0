//! What a client sees of a generation: the contract's SSE events, with `Last-Event-ID` resume,
//! and the responses that carry them.
//!
//! A chunk's id is `<attempt>:<end offset>`. A client that reconnects with the id of the last
//! chunk it holds receives exactly the rest of that attempt's text; if the answer now comes
//! from another attempt, it receives `reset` and the whole text. That is also how a replica
//! that stops hands its streams over: it ends them with a `retry:` hint, and EventSource
//! clients reconnect (to another replica) with `Last-Event-ID`.

use std::{convert::Infallible, time::Duration};

use axum::{
    http::{HeaderName, HeaderValue, header},
    response::{
        IntoResponse, Response,
        sse::{Event as SseEvent, KeepAlive, Sse},
    },
};
use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use tokio_util::sync::CancellationToken;
use versus_shared::{
    key::Key,
    wire::{ErrorCode, Event},
};

/// How soon a client whose stream this replica ended at shutdown should reconnect.
pub const HANDOVER_RETRY: Duration = Duration::from_millis(500);

/// A whole event stream known in advance (a hit), as one body.
pub fn body(body: Bytes) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body,
    )
        .into_response()
}

/// A live event stream: a comment every `heartbeat` while idle, and when `shutdown` fires,
/// a `retry:` hint and the end, so that the client reconnects and resumes elsewhere.
pub fn live(
    events: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
    heartbeat: Duration,
    shutdown: CancellationToken,
) -> Response {
    let stopped = shutdown.clone();
    let handover = stream::once(async move { stopped.is_cancelled() }).filter_map(|stopped| {
        std::future::ready(stopped.then(|| {
            Ok(SseEvent::default()
                .retry(HANDOVER_RETRY)
                .comment("this server is stopping: reconnect with Last-Event-ID"))
        }))
    });
    let events = events
        .take_until(shutdown.cancelled_owned())
        .chain(handover);
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(heartbeat))
        .into_response();
    let headers = response.headers_mut();
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// A resume point parsed from `Last-Event-ID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub attempt: i32,
    pub offset: usize,
}

impl Resume {
    pub fn parse(id: &str) -> Option<Resume> {
        let (attempt, offset) = id.split_once(':')?;
        Some(Resume {
            attempt: attempt.parse().ok()?,
            offset: offset.parse().ok()?,
        })
    }
}

pub fn chunk_id(attempt: i32, end: usize) -> String {
    format!("{attempt}:{end}")
}

/// The data of each event, as the contract (and `/openapi.json`) names it.
pub mod data {
    use serde::Serialize;
    use utoipa::ToSchema;
    use versus_shared::key::Key;

    pub use crate::body::Fight;

    /// `meta`, first on every stream: which answer this is and whether it was cached.
    #[derive(Serialize, ToSchema)]
    pub struct MetaData<'a> {
        #[serde(flatten)]
        pub fight: Fight<'a>,
        /// Whether the answer was already stored.
        pub cached: bool,
        /// A stored answer's model (a fallback provider's when `degraded`); absent when the
        /// answer is not stored yet (`done` names it then).
        #[serde(skip_serializing_if = "Option::is_none")]
        #[schema(example = "gpt-4o-mini")]
        pub model: Option<&'a str>,
        /// Whether a fallback provider made the stored answer, while the primary could not;
        /// absent when the answer is not stored yet.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub degraded: Option<bool>,
    }

    /// `chunk`: the next piece of the text. Its SSE `id:` is `<attempt>:<end offset>`:
    /// reconnecting with it as `Last-Event-ID` resumes exactly after it.
    #[derive(Serialize, ToSchema)]
    pub struct ChunkData<'a> {
        pub delta: &'a str,
    }

    /// `reset`: the generation restarted; drop the text received so far.
    #[derive(Serialize, ToSchema)]
    pub struct ResetData<'a> {
        pub reason: &'a str,
    }

    /// `done` of a text answer, last: the answer is complete and stored.
    #[derive(Serialize, ToSchema)]
    pub struct DoneData<'a> {
        #[schema(value_type = String)]
        pub key: &'a Key,
        /// The chat model that wrote it: a fallback provider's when `degraded`.
        #[schema(example = "gpt-4o-mini")]
        pub model: &'a str,
        /// Whether a fallback provider wrote it, while the primary could not: it is served
        /// until the primary's answer replaces it.
        pub degraded: bool,
    }

    /// `done` of a picture, last: where the stored picture is served.
    #[derive(Serialize, ToSchema)]
    pub struct ImageDoneData<'a> {
        #[schema(value_type = String)]
        pub key: &'a Key,
        /// The picture's URL: this API's `/v1/images/{file}`, or under
        /// `VERSUS_PUBLIC_IMAGE_BASE_URL` when set.
        pub url: &'a str,
        /// The image model that drew it: a fallback provider's when `degraded`.
        #[schema(example = "gpt-image-1")]
        pub model: &'a str,
        /// Whether a fallback provider drew it, while the primary could not: it is served
        /// until the primary's picture replaces it.
        pub degraded: bool,
    }

    /// `error`, last: the generation cannot complete now.
    #[derive(Serialize, ToSchema)]
    pub struct ErrorData<'a> {
        /// Why (`ErrorCode` in the shared crate): `refused` (moderation), `busy`,
        /// `budget_exhausted`, `unavailable`, `timeout`, `purged`, `upstream_unavailable`,
        /// `upstream_refused`, `storage_unavailable`.
        #[schema(schema_with = crate::error::code_schema, example = "unavailable")]
        pub code: &'a str,
        pub message: &'a str,
        /// Whether asking again may succeed.
        pub retryable: bool,
        /// Seconds until asking again may succeed, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        pub retry_after: Option<u64>,
    }
}

/// One event before it is written: an axum event for streams, or bytes for a whole
/// pre-rendered body.
pub struct Frame {
    name: &'static str,
    /// The data, as JSON (which never holds a raw newline).
    data: String,
    id: Option<String>,
}

impl Frame {
    fn new(name: &'static str, data: &impl serde::Serialize) -> Frame {
        Frame {
            name,
            // Serializing borrowed strings and plain values cannot fail.
            data: serde_json::to_string(data).unwrap_or_default(),
            id: None,
        }
    }

    /// Appends the event as the wire has it.
    pub fn write(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = write!(out, "event: {}\ndata: {}\n", self.name, self.data);
        if let Some(id) = &self.id {
            let _ = writeln!(out, "id: {id}");
        }
        out.push('\n');
    }
}

impl From<Frame> for SseEvent {
    fn from(frame: Frame) -> SseEvent {
        let event = SseEvent::default().event(frame.name).data(frame.data);
        match frame.id {
            Some(id) => event.id(id),
            None => event,
        }
    }
}

/// `meta` of a miss: the answer is not stored yet.
pub fn meta(key: &Key, a: &str, b: &str) -> Frame {
    Frame::new(
        "meta",
        &data::MetaData {
            fight: data::Fight { key, a, b },
            cached: false,
            model: None,
            degraded: None,
        },
    )
}

/// `meta` of a hit: the stored answer, made by `model`, a fallback's when `degraded`.
pub fn meta_hit(key: &Key, a: &str, b: &str, model: &str, degraded: bool) -> Frame {
    Frame::new(
        "meta",
        &data::MetaData {
            fight: data::Fight { key, a, b },
            cached: true,
            model: Some(model),
            degraded: Some(degraded),
        },
    )
}

pub fn chunk(attempt: i32, end: usize, delta: &str) -> Frame {
    Frame {
        id: Some(chunk_id(attempt, end)),
        ..Frame::new("chunk", &data::ChunkData { delta })
    }
}

/// The end of a text answer's stream, written by `model`, a fallback's when `degraded`.
pub fn done(key: &Key, model: &str, degraded: bool) -> Frame {
    Frame::new(
        "done",
        &data::DoneData {
            key,
            model,
            degraded,
        },
    )
}

/// The end of a picture's stream: where to fetch it, and what drew it.
pub fn image_done(key: &Key, url: &str, model: &str, degraded: bool) -> Frame {
    Frame::new(
        "done",
        &data::ImageDoneData {
            key,
            url,
            model,
            degraded,
        },
    )
}

pub fn reset() -> SseEvent {
    Frame::new(
        "reset",
        &data::ResetData {
            reason: "the answer is being generated again",
        },
    )
    .into()
}

/// An `error` event of this process's own, as retryable as `code` is.
pub fn error(code: ErrorCode, message: &str) -> SseEvent {
    error_until(code.as_str(), message, code.retryable(), None)
}

/// An `error` event that also says in how many seconds asking again may succeed.
pub fn error_until(
    code: &str,
    message: &str,
    retryable: bool,
    retry_after: Option<u64>,
) -> SseEvent {
    let data = data::ErrorData {
        code,
        message,
        retryable,
        retry_after,
    };
    Frame::new("error", &data).into()
}

/// A whole event stream as one body.
pub fn render(frames: &[Frame]) -> bytes::Bytes {
    let mut out = String::new();
    for frame in frames {
        frame.write(&mut out);
    }
    out.into()
}

/// Translates one client's view of a generation: which chunks it still needs, and when it
/// must drop what it holds.
pub struct Translator {
    key: Key,
    /// The model the key was made with (the recipe's): a `done` naming another was written by
    /// a fallback provider, and is degraded.
    primary: String,
    /// Where the client's text ends, when it holds some.
    holds: Option<Resume>,
    attempt: Option<i32>,
}

impl Translator {
    pub fn new(key: Key, primary: String, resume: Option<Resume>) -> Translator {
        Translator {
            key,
            primary,
            holds: resume,
            attempt: None,
        }
    }

    /// The SSE events for one generation event, appended to `out`; true when the stream ends.
    pub fn translate(&mut self, event: &Event, out: &mut Vec<SseEvent>) -> bool {
        match event {
            Event::Started { attempt } => self.enter(*attempt, out),
            Event::Chunk {
                attempt,
                offset,
                delta,
            } => {
                self.enter(*attempt, out);
                self.chunk(*attempt, *offset, delta, out);
            }
            Event::Done { model, .. } => {
                out.push(done(&self.key, model, *model != self.primary).into());
                return true;
            }
            Event::Error {
                code,
                message,
                retryable,
                ..
            } => {
                let after = event.retry_after().map(|d| d.as_secs());
                out.push(error_until(code, message, *retryable, after));
                return true;
            }
            Event::Purged => {
                out.push(error(ErrorCode::Purged, ErrorCode::Purged.message()));
                return true;
            }
        }
        false
    }

    /// The whole finished text of `attempt`, minus what the client already holds.
    pub fn finished_text(&mut self, attempt: i32, text: &str, out: &mut Vec<SseEvent>) {
        self.enter(attempt, out);
        self.chunk(attempt, 0, text, out);
    }

    fn enter(&mut self, attempt: i32, out: &mut Vec<SseEvent>) {
        if self.attempt == Some(attempt) {
            return;
        }
        self.attempt = Some(attempt);
        if let Some(holds) = self.holds
            && holds.attempt != attempt
        {
            out.push(reset());
            self.holds = None;
        }
    }

    fn chunk(&mut self, attempt: i32, offset: usize, delta: &str, out: &mut Vec<SseEvent>) {
        let end = offset + delta.len();
        let held = self.holds.map_or(0, |h| h.offset);
        let rest = if held <= offset {
            delta
        } else if held >= end {
            ""
        } else {
            delta.get(held - offset..).unwrap_or(delta)
        };
        if !rest.is_empty() {
            out.push(chunk(attempt, end, rest).into());
        }
        self.holds = Some(Resume {
            attempt,
            offset: end.max(held),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events as the wire has them: `name data` per event (axum's events only show their
    /// bytes through `Debug`).
    fn wire(events: &[SseEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                let debug = format!("{e:?}");
                let field = |name: &str| {
                    debug
                        .split(&format!("{name}: "))
                        .nth(1)
                        .and_then(|rest| rest.split("\\n").next())
                        .unwrap_or_default()
                        .replace("\\\"", "\"")
                };
                format!("{} {} {}", field("event"), field("data"), field("id"))
                    .trim_end()
                    .to_owned()
            })
            .collect()
    }

    fn key() -> Key {
        Key::parse(&"a".repeat(32)).unwrap()
    }

    fn translator(resume: Option<Resume>) -> Translator {
        Translator::new(key(), "gpt-4o-mini".to_owned(), resume)
    }

    #[test]
    fn a_resume_of_the_answer_served_gets_exactly_the_rest() {
        let mut translator = translator(Resume::parse("7:5"));
        let mut out = Vec::new();
        translator.finished_text(7, "Hello, world", &mut out);
        assert_eq!(wire(&out), [r#"chunk {"delta":", world"} 7:12"#]);
    }

    #[test]
    fn a_resume_naming_another_answer_gets_reset_and_the_whole_stored_one() {
        // The client holds 5 bytes of attempt 1; the stored answer is attempt 2's (after a
        // purge, attempts go on from the purged one's).
        let mut translator = translator(Resume::parse("1:5"));
        let mut out = Vec::new();
        translator.finished_text(2, "Hello, world", &mut out);
        assert_eq!(
            wire(&out),
            [
                r#"reset {"reason":"the answer is being generated again"}"#,
                r#"chunk {"delta":"Hello, world"} 2:12"#,
            ]
        );
    }

    #[test]
    fn a_resume_naming_another_answer_gets_reset_and_the_whole_live_one() {
        let mut translator = translator(Resume::parse("1:5"));
        let mut out = Vec::new();
        for event in [
            Event::Started { attempt: 2 },
            Event::Chunk {
                attempt: 2,
                offset: 0,
                delta: "Hello".to_owned(),
            },
            Event::Chunk {
                attempt: 2,
                offset: 5,
                delta: ", world".to_owned(),
            },
        ] {
            assert!(!translator.translate(&event, &mut out));
        }
        assert_eq!(
            wire(&out),
            [
                r#"reset {"reason":"the answer is being generated again"}"#,
                r#"chunk {"delta":"Hello"} 2:5"#,
                r#"chunk {"delta":", world"} 2:12"#,
            ]
        );
    }

    #[test]
    fn a_done_names_its_model_and_is_degraded_when_a_fallback_wrote_it() {
        let done = |model: &str| {
            let mut out = Vec::new();
            let ended = translator(None).translate(
                &Event::Done {
                    attempt: 1,
                    model: model.to_owned(),
                    length: 0,
                },
                &mut out,
            );
            assert!(ended);
            wire(&out)
        };
        let key = "a".repeat(32);
        assert_eq!(
            done("gpt-4o-mini"),
            [format!(
                r#"done {{"key":"{key}","model":"gpt-4o-mini","degraded":false}}"#
            )]
        );
        assert_eq!(
            done("fallback-chat"),
            [format!(
                r#"done {{"key":"{key}","model":"fallback-chat","degraded":true}}"#
            )]
        );
    }

    #[test]
    fn only_a_hits_meta_names_the_model() {
        let key = key();
        let render = |frame: Frame| {
            let mut out = String::new();
            frame.write(&mut out);
            out
        };
        let k = key.as_str();
        assert_eq!(
            render(meta(&key, "Batman", "Superman")),
            format!(
                "event: meta\ndata: {{\"key\":\"{k}\",\"a\":\"Batman\",\"b\":\"Superman\",\"cached\":false}}\n\n"
            )
        );
        assert_eq!(
            render(meta_hit(&key, "Batman", "Superman", "fallback-chat", true)),
            format!(
                "event: meta\ndata: {{\"key\":\"{k}\",\"a\":\"Batman\",\"b\":\"Superman\",\"cached\":true,\"model\":\"fallback-chat\",\"degraded\":true}}\n\n"
            )
        );
    }
}
