//! What a client sees of a generation: the contract's SSE events, with `Last-Event-ID` resume,
//! and the responses that carry them.
//!
//! A chunk's id is `<attempt>:<end offset>`. A client that reconnects with the id of the last
//! chunk it holds receives exactly the rest of that attempt's text; if the answer now comes
//! from another attempt, it receives `reset` and the whole text. That is also how a replica
//! that stops hands its streams over: it ends them with a `retry:` hint, and EventSource
//! clients reconnect (to another replica) with `Last-Event-ID`.
//!
//! A picture's partial images take the place chunks take in a text: a partial's id is
//! `<attempt>:<index + 1>`, the count of partials the client then holds, and resumes the same
//! way.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    http::{HeaderName, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use tokio_util::sync::CancellationToken;
use versus_shared::{
    key::Key,
    wire::{ErrorCode, Event},
};

use crate::miss::Logged;

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

/// A live event stream of rendered frames: a comment every `heartbeat` while idle, and when
/// `shutdown` fires, a `retry:` hint and the end, so that the client reconnects and resumes
/// elsewhere. Frames go out as they are, so the bytes of a flight's chunk, rendered once, are
/// written to every viewer without a copy.
pub fn live(
    events: impl Stream<Item = Bytes> + Send + 'static,
    heartbeat: Duration,
    shutdown: CancellationToken,
) -> Response {
    let stopped = shutdown.clone();
    let handover = stream::once(async move { stopped.is_cancelled() })
        .filter_map(|stopped| std::future::ready(stopped.then_some(Bytes::from_static(HANDOVER))));
    let events = events
        .take_until(shutdown.cancelled_owned())
        .chain(handover);
    let body = Heartbeats::new(events, heartbeat).map(Ok::<_, Infallible>);
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// What a stream ends with when this replica stops: reconnect in 500 ms, with `Last-Event-ID`.
const HANDOVER: &[u8] = b"retry: 500\n: this server is stopping: reconnect with Last-Event-ID\n\n";

/// What an idle stream sends every heartbeat: an empty comment.
const HEARTBEAT: &[u8] = b":\n\n";

pin_project_lite::pin_project! {
    /// A stream of frames with [`HEARTBEAT`] whenever `every` passes without one.
    struct Heartbeats<S> {
        #[pin]
        events: S,
        #[pin]
        timer: tokio::time::Sleep,
        every: Duration,
    }
}

impl<S> Heartbeats<S> {
    fn new(events: S, every: Duration) -> Heartbeats<S> {
        Heartbeats {
            events,
            timer: tokio::time::sleep(every),
            every,
        }
    }
}

impl<S: Stream<Item = Bytes>> Stream for Heartbeats<S> {
    type Item = Bytes;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut this = self.project();
        let next = match this.events.poll_next(cx) {
            Poll::Ready(next) => next,
            Poll::Pending => {
                std::task::ready!(this.timer.as_mut().poll(cx));
                Some(Bytes::from_static(HEARTBEAT))
            }
        };
        this.timer.reset(tokio::time::Instant::now() + *this.every);
        Poll::Ready(next)
    }
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

/// The id of partial image `index` of `attempt`: `<attempt>:<index + 1>`.
pub fn partial_id(attempt: i32, index: u32) -> String {
    chunk_id(attempt, index as usize + 1)
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

    /// `partial` (pictures only): partial image `index` (from 0) of the picture being drawn,
    /// shown until the next one or the picture; never the answer. Its SSE `id:` is
    /// `<attempt>:<index + 1>` (the count of partials then held): reconnecting with it as
    /// `Last-Event-ID` resumes with the next partial.
    #[derive(Serialize, ToSchema)]
    pub struct PartialData<'a> {
        /// Its place among the attempt's partials, from 0.
        pub index: u32,
        /// Where it is served while the picture is drawn: this API's
        /// `/v1/images/partials/{file}`, or under `VERSUS_PUBLIC_IMAGE_BASE_URL` when set.
        /// Short-lived: removed once the picture is done.
        #[schema(example = "/v1/images/partials/9a8b7c6d5e4f30211a2b3c4d5e6f7081-1-0.png")]
        pub url: &'a str,
    }

    /// `reset`: the generation restarted; drop the text (the partial image) received so far.
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

impl From<Frame> for Bytes {
    fn from(frame: Frame) -> Bytes {
        let mut out = String::with_capacity(frame.name.len() + frame.data.len() + 32);
        frame.write(&mut out);
        out.into()
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

/// Partial image `index` of `attempt`, served at `url`.
pub fn partial(attempt: i32, index: u32, url: &str) -> Frame {
    Frame {
        id: Some(partial_id(attempt, index)),
        ..Frame::new("partial", &data::PartialData { index, url })
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

pub fn reset() -> Bytes {
    Frame::new(
        "reset",
        &data::ResetData {
            reason: "the answer is being generated again",
        },
    )
    .into()
}

/// An `error` event of this process's own, as retryable as `code` is.
pub fn error(code: ErrorCode, message: &str) -> Bytes {
    error_until(code.as_str(), message, code.retryable(), None)
}

/// An `error` event that also says in how many seconds asking again may succeed.
pub fn error_until(code: &str, message: &str, retryable: bool, retry_after: Option<u64>) -> Bytes {
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

/// Translates one client's view of a generation: which chunks (partial images) it still
/// needs, and when it must drop what it holds.
pub struct Translator {
    key: Key,
    /// The model the key was made with (the recipe's): a `done` naming another was written by
    /// a fallback provider, and is degraded.
    primary: String,
    /// Where the client's text ends (for a picture, how many partials it holds), when it holds
    /// some.
    holds: Option<Resume>,
    attempt: Option<i32>,
    partials: Partials,
}

/// What becomes of partial images.
enum Partials {
    /// A text's stream: there are none.
    Ignored,
    /// A picture's: each becomes a `partial`, its URL under `public_base` when set.
    Forwarded { public_base: Option<String> },
}

impl Translator {
    /// A text's translator.
    pub fn new(key: Key, primary: String, resume: Option<Resume>) -> Translator {
        Translator {
            key,
            primary,
            holds: resume,
            attempt: None,
            partials: Partials::Ignored,
        }
    }

    /// A picture's translator: partial images become `partial` events whose URLs are under
    /// `public_base` (`VERSUS_PUBLIC_IMAGE_BASE_URL`) when set, else this API's. The caller
    /// answers `done` itself, with the stored picture.
    pub fn of_picture(
        key: Key,
        primary: String,
        resume: Option<Resume>,
        public_base: Option<String>,
    ) -> Translator {
        Translator {
            partials: Partials::Forwarded { public_base },
            ..Translator::new(key, primary, resume)
        }
    }

    /// The SSE events for one generation event, appended to `out`; true when the stream ends.
    pub fn translate(&mut self, event: &Logged, out: &mut Vec<Bytes>) -> bool {
        match &**event {
            Event::Started { attempt } => self.enter(*attempt, out),
            Event::Chunk {
                attempt,
                offset,
                delta,
            } => {
                self.enter(*attempt, out);
                self.chunk(*attempt, *offset, delta, Some(event), out);
            }
            Event::Partial {
                attempt,
                index,
                path,
            } => {
                let Partials::Forwarded { public_base } = &self.partials else {
                    return false;
                };
                let url = crate::body::partial_url(public_base.as_deref(), path);
                if url.is_none() {
                    tracing::debug!(%path, "a partial image stored under a name it may not have");
                }
                self.enter(*attempt, out);
                self.partial(*attempt, *index, url.as_deref(), event, out);
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
    pub fn finished_text(&mut self, attempt: i32, text: &str, out: &mut Vec<Bytes>) {
        self.enter(attempt, out);
        self.chunk(attempt, 0, text, None, out);
    }

    fn enter(&mut self, attempt: i32, out: &mut Vec<Bytes>) {
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

    /// Partial image `index` (served at `url`) unless the client holds it already.
    /// The frame is the same for every stream of this replica: `logged` renders it once.
    fn partial(
        &mut self,
        attempt: i32,
        index: u32,
        url: Option<&str>,
        logged: &Logged,
        out: &mut Vec<Bytes>,
    ) {
        let end = index as usize + 1;
        let held = self.holds.map_or(0, |h| h.offset);
        if let Some(url) = url.filter(|_| end > held) {
            out.push(logged.frame(|_| partial(attempt, index, url).into()));
        }
        self.holds = Some(Resume {
            attempt,
            offset: end.max(held),
        });
    }

    /// A chunk sent whole is the same for every stream: `logged`, when the chunk is one of a
    /// flight's, renders it once.
    fn chunk(
        &mut self,
        attempt: i32,
        offset: usize,
        delta: &str,
        logged: Option<&Logged>,
        out: &mut Vec<Bytes>,
    ) {
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
            let render = || chunk(attempt, end, rest).into();
            out.push(match logged.filter(|_| rest.len() == delta.len()) {
                Some(logged) => logged.frame(|_| render()),
                None => render(),
            });
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

    /// The events as the wire has them: `name data id` per event.
    fn wire(frames: &[Bytes]) -> Vec<String> {
        frames
            .iter()
            .map(|frame| {
                let text = std::str::from_utf8(frame).unwrap();
                let field = |name: &str| {
                    text.lines()
                        .find_map(|line| line.strip_prefix(&format!("{name}: ")))
                        .unwrap_or_default()
                        .to_owned()
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
            assert!(!translator.translate(&Logged::new(event), &mut out));
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
                &Logged::new(Event::Done {
                    attempt: 1,
                    model: model.to_owned(),
                    length: 0,
                }),
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

    fn picture(resume: Option<Resume>, public_base: Option<&str>) -> Translator {
        Translator::of_picture(
            key(),
            "gpt-image-1".to_owned(),
            resume,
            public_base.map(str::to_owned),
        )
    }

    fn partial_event(attempt: i32, index: u32) -> Event {
        Event::Partial {
            attempt,
            index,
            path: format!("partials/{}/{attempt}/{index}.png", "a".repeat(32)),
        }
    }

    /// What a picture's translator makes of `events`, as the wire has it.
    fn drawn(translator: &mut Translator, events: &[Event]) -> Vec<String> {
        let mut out = Vec::new();
        for event in events {
            assert!(!translator.translate(&Logged::new(event.clone()), &mut out));
        }
        wire(&out)
    }

    fn partial_wire(attempt: i32, index: u32) -> String {
        let k = "a".repeat(32);
        format!(
            r#"partial {{"index":{index},"url":"/v1/images/partials/{k}-{attempt}-{index}.png"}} {attempt}:{}"#,
            index + 1
        )
    }

    #[test]
    fn a_partials_id_counts_the_partials_the_client_then_holds() {
        let events = [
            Event::Started { attempt: 3 },
            partial_event(3, 0),
            partial_event(3, 1),
            partial_event(3, 2),
        ];
        assert_eq!(
            drawn(&mut picture(None, None), &events),
            [partial_wire(3, 0), partial_wire(3, 1), partial_wire(3, 2)]
        );
        // Under a public base, the URL is the bucket's path.
        let k = "a".repeat(32);
        assert_eq!(
            drawn(
                &mut picture(None, Some("https://cdn.example/")),
                &events[..2]
            ),
            [format!(
                r#"partial {{"index":0,"url":"https://cdn.example/partials/{k}/3/0.png"}} 3:1"#
            )]
        );
    }

    #[test]
    fn a_resume_gets_exactly_the_partials_after_the_one_it_names() {
        let events = [
            Event::Started { attempt: 3 },
            partial_event(3, 0),
            partial_event(3, 1),
            partial_event(3, 2),
        ];
        // A late viewer replays the log from its start: the resume skips what it holds.
        assert_eq!(
            drawn(&mut picture(Resume::parse("3:2"), None), &events),
            [partial_wire(3, 2)]
        );
        assert!(drawn(&mut picture(Resume::parse("3:3"), None), &events).is_empty());
        // A copy of a partial already sent is not sent again.
        let mut translator = picture(None, None);
        drawn(&mut translator, &events[..2]);
        assert!(drawn(&mut translator, &events[1..2]).is_empty());
        assert_eq!(drawn(&mut translator, &events[2..3]), [partial_wire(3, 1)]);
    }

    #[test]
    fn a_resume_of_another_attempt_gets_reset_and_all_the_new_partials() {
        let reset = r#"reset {"reason":"the answer is being generated again"}"#;
        let events = [
            Event::Started { attempt: 2 },
            partial_event(2, 0),
            partial_event(2, 1),
        ];
        assert_eq!(
            drawn(&mut picture(Resume::parse("1:2"), None), &events),
            [reset.to_owned(), partial_wire(2, 0), partial_wire(2, 1)]
        );
        // Live: a viewer of attempt 1 sees `reset` when attempt 2 begins, then its partials.
        let mut translator = picture(None, None);
        drawn(
            &mut translator,
            &[Event::Started { attempt: 1 }, partial_event(1, 0)],
        );
        assert_eq!(
            drawn(&mut translator, &events),
            [reset.to_owned(), partial_wire(2, 0), partial_wire(2, 1)]
        );
    }

    #[test]
    fn a_texts_translator_sends_no_partial() {
        let mut translator = translator(None);
        assert!(
            drawn(
                &mut translator,
                &[Event::Started { attempt: 1 }, partial_event(1, 0)]
            )
            .is_empty()
        );
        // Nor one stored under a name the partials route would not serve.
        let mut translator = picture(None, None);
        let stray = Event::Partial {
            attempt: 1,
            index: 0,
            path: format!("images/{}.png", "a".repeat(32)),
        };
        assert!(drawn(&mut translator, &[stray]).is_empty());
        // Its place is taken all the same: the next one follows it.
        assert_eq!(
            drawn(&mut translator, &[partial_event(1, 1)]),
            [partial_wire(1, 1)]
        );
    }

    #[test]
    fn every_viewer_of_a_flight_writes_one_rendering_of_a_whole_chunk_and_a_resume_its_own_rest() {
        let logged = Logged::new(Event::Chunk {
            attempt: 1,
            offset: 0,
            delta: "Hello, world".to_owned(),
        });
        let frames: Vec<Bytes> = [None, None, Resume::parse("1:5")]
            .into_iter()
            .map(|resume| {
                let mut out = Vec::new();
                translator(resume).translate(&logged, &mut out);
                out.pop().unwrap()
            })
            .collect();
        assert_eq!(
            wire(&frames),
            [
                r#"chunk {"delta":"Hello, world"} 1:12"#,
                r#"chunk {"delta":"Hello, world"} 1:12"#,
                r#"chunk {"delta":", world"} 1:12"#,
            ]
        );
        // The same bytes, not a copy.
        assert_eq!(frames[0].as_ptr(), frames[1].as_ptr());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_gets_a_comment_each_heartbeat_and_an_event_puts_it_off() {
        use tokio::time::{Duration, Instant, sleep};
        // One event 10 s in, then nothing until the end, 45 s in.
        let events = stream::unfold(0, |step| async move {
            match step {
                0 => {
                    sleep(Duration::from_secs(10)).await;
                    Some((Bytes::from_static(b"event: chunk\n\n"), 1))
                }
                _ => {
                    sleep(Duration::from_secs(35)).await;
                    None
                }
            }
        });
        let start = Instant::now();
        let seen: Vec<(u64, Bytes)> = Heartbeats::new(events, Duration::from_secs(15))
            .map(|frame| (start.elapsed().as_secs(), frame))
            .collect()
            .await;
        assert_eq!(
            seen,
            [
                (10, Bytes::from_static(b"event: chunk\n\n")),
                (25, Bytes::from_static(HEARTBEAT)),
                (40, Bytes::from_static(HEARTBEAT)),
            ]
        );
    }
}
