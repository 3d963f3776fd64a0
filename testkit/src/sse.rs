//! A small Server-Sent Events client for tests, over reqwest and `eventsource-stream`.

use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};

use crate::http_client;

/// How long [`SseStream::collect_all`] waits for the server to end the stream.
pub const COLLECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Event names that [`SseStream::next`] treats as keep-alives and skips (comment lines, the
/// usual keep-alive, are never events at all).
pub const HEARTBEAT_EVENTS: &[&str] = &["heartbeat", "ping", "keepalive", "keep-alive"];

/// One event. `event` is `message` when the server named none; `id` is the last id the
/// server set (it carries over to later events without one, as in browsers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
    pub id: String,
}

impl SseEvent {
    /// The data parsed as JSON; panics with the event if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {self:?}"))
    }
}

type Events =
    Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send + Sync>>;

/// An open event stream.
pub struct SseStream {
    headers: HeaderMap,
    events: Events,
}

/// `GET url` with `Accept: text/event-stream` (and `Last-Event-ID` if given). Panics unless
/// the answer is 200 with content type `text/event-stream`.
pub async fn open(url: &str, last_event_id: Option<&str>) -> SseStream {
    open_with(url, last_event_id, &[]).await
}

/// Like [`open`], with more request headers (`Origin`, `X-Forwarded-For`, …).
pub async fn open_with(
    url: &str,
    last_event_id: Option<&str>,
    headers: &[(&str, &str)],
) -> SseStream {
    open_on(&http_client(), url, last_event_id, headers).await
}

/// Like [`open_with`], on `client`: a test that opens a thousand streams builds one client
/// for them all (each stream still has a connection of its own).
pub async fn open_on(
    client: &reqwest::Client,
    url: &str,
    last_event_id: Option<&str>,
    headers: &[(&str, &str)],
) -> SseStream {
    let mut request = client.get(url).header(ACCEPT, "text/event-stream");
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {}", with_causes(&e)));
    let status = response.status();
    let headers = response.headers().clone();
    if status != reqwest::StatusCode::OK {
        let body = response.text().await.unwrap_or_default();
        panic!("GET {url}: expected 200 for an event stream, got {status}: {body}");
    }
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("text/event-stream"),
        "GET {url}: expected content type text/event-stream, got {content_type:?}"
    );
    SseStream {
        headers,
        events: Box::pin(response.bytes_stream().eventsource()),
    }
}

impl SseStream {
    /// The response headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The next event, skipping keep-alives; None once the server has ended the stream.
    /// Panics if the connection fails (see [`SseStream::try_next`] to observe that).
    pub async fn next(&mut self) -> Option<SseEvent> {
        self.try_next()
            .await
            .unwrap_or_else(|e| panic!("SSE stream failed: {e}"))
    }

    /// Like [`SseStream::next`], but a broken connection or malformed stream is an Err.
    pub async fn try_next(&mut self) -> Result<Option<SseEvent>, String> {
        loop {
            match self.next_raw().await? {
                Some(event) if HEARTBEAT_EVENTS.contains(&event.event.as_str()) => continue,
                other => return Ok(other),
            }
        }
    }

    /// The next event, keep-alive events included.
    pub async fn next_raw(&mut self) -> Result<Option<SseEvent>, String> {
        match self.events.next().await {
            None => Ok(None),
            Some(Ok(event)) => Ok(Some(SseEvent {
                event: event.event,
                data: event.data,
                id: event.id,
            })),
            Some(Err(e)) => Err(e.to_string()),
        }
    }

    /// The next event within `timeout`; panics if none comes in time.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<SseEvent> {
        tokio::time::timeout(timeout, self.next())
            .await
            .unwrap_or_else(|_| panic!("no SSE event within {timeout:?}"))
    }

    /// The events up to and including the `n`th chunk; panics if the stream ends before it.
    pub async fn until_chunks(&mut self, n: usize) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let mut chunks = 0;
        while chunks < n {
            let event = self
                .next()
                .await
                .unwrap_or_else(|| panic!("the stream ended before chunk {n}: {events:?}"));
            chunks += usize::from(event.event == "chunk");
            events.push(event);
        }
        events
    }

    /// Every remaining event until the server ends the stream; panics if that takes more than
    /// 60 s (with the events so far) or the connection fails.
    pub async fn collect_all(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + COLLECT_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.try_next()).await {
                Ok(Ok(Some(event))) => events.push(event),
                Ok(Ok(None)) => return events,
                Ok(Err(e)) => panic!("SSE stream failed after {events:?}: {e}"),
                Err(_) => panic!(
                    "the server did not end the SSE stream within {COLLECT_TIMEOUT:?}; events so far: {events:?}"
                ),
            }
        }
    }
}

/// An error and its causes, `outer: inner: …` (reqwest's own message names neither the refused
/// connection nor the timeout behind "error sending request").
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(&format!(": {inner}"));
        cause = inner.source();
    }
    text
}
