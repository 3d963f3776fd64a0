//! The text routes of the public contract: `GET /v1/fights/stream`, `POST /v1/fights`,
//! `GET /v1/fights/{key}`.

use std::{collections::VecDeque, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{
        Path, Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event as SseEvent, KeepAlive, Sse},
    },
    routing::{get, post},
};
use bytes::Bytes;
use futures::{Stream, stream};
use serde::Deserialize;
use serde_json::{Value, json};
use versus_shared::{
    key::{Key, Matchup},
    prompt::{IMAGE_PROMPT_VERSION, TEXT_PROMPT_VERSION},
    wire::{Answer, Event, Job, Kind},
};

use crate::{
    App,
    cache::Cached,
    error::ApiError,
    flights::Waiter,
    sse::{self, Resume, Translator},
};

/// Answers are immutable per key; browsers keep them briefly, CDNs for a day.
const ANSWER_CACHE_CONTROL: &str = "public, max-age=300, s-maxage=86400";

pub fn routes() -> Router<App> {
    Router::new()
        .route("/v1/fights/stream", get(stream_fight))
        .route("/v1/fights", post(create_fight))
        .route("/v1/fights/{key}", get(get_fight))
}

#[derive(Debug, Deserialize)]
pub(crate) struct FightRequest {
    a: Option<String>,
    b: Option<String>,
}

impl FightRequest {
    pub(crate) fn new(a: String, b: String) -> FightRequest {
        FightRequest {
            a: Some(a),
            b: Some(b),
        }
    }

    /// Reads `{"a","b"}` from a JSON object; anything else in a name's place is refused.
    pub(crate) fn from_json(
        body: &serde_json::Map<String, Value>,
    ) -> Result<FightRequest, ApiError> {
        let field = |name: &str| match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::InvalidBody(format!("`{name}` must be a string"))),
        };
        Ok(FightRequest {
            a: field("a")?,
            b: field("b")?,
        })
    }
}

impl App {
    /// Validates the names and computes the key of the answer of `kind`.
    pub(crate) fn matchup(
        &self,
        request: &FightRequest,
        kind: Kind,
    ) -> Result<(Matchup, Key), ApiError> {
        let matchup = Matchup::parse(request.a.as_deref(), request.b.as_deref())?;
        let models = &self.inner.settings.models;
        let key = match kind {
            Kind::Text => matchup.key(kind, TEXT_PROMPT_VERSION, &models.chat_model),
            Kind::Image => matchup.key(kind, IMAGE_PROMPT_VERSION, &models.image_variant()),
        };
        Ok((matchup, key))
    }

    async fn cached(&self, key: &Key) -> Option<Arc<Cached<Answer>>> {
        self.inner.answers.lookup(key).await
    }

    pub(crate) fn text_job(&self, matchup: &Matchup, key: &Key) -> Job {
        Job {
            kind: Kind::Text,
            key: key.clone(),
            a: matchup.a.display().to_owned(),
            b: matchup.b.display().to_owned(),
            model: self.inner.settings.models.chat_model.clone(),
            prompt_version: TEXT_PROMPT_VERSION,
            size: None,
        }
    }

    fn follow(&self, matchup: &Matchup, key: &Key) -> Waiter {
        self.inner.flights.join(self.text_job(matchup, key))
    }

    /// Counts the request for popularity (in memory; see `popularity`).
    fn count(&self, matchup: &Matchup, key: &Key) {
        self.inner
            .popularity
            .record(key, matchup.a.display(), matchup.b.display());
    }
}

async fn stream_fight(
    State(app): State<App>,
    headers: HeaderMap,
    query: Result<Query<FightRequest>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(request) = query.map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
    let (matchup, key) = app.matchup(&request, Kind::Text)?;
    app.count(&matchup, &key);
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(Resume::parse);
    let mut translator = Translator::new(key.clone(), resume);
    if let Some(cached) = app.cached(&key).await {
        let answer = &cached.value;
        if resume.is_none() {
            // The common hit: the same bytes every time, rendered once per cached answer.
            let body = cached.sse.get_or_init(|| {
                sse::render(&[
                    sse::meta_frame(&key, &answer.a, &answer.b, true),
                    sse::chunk_frame(answer.attempt, answer.text.len(), &answer.text),
                    sse::done_frame(&key, &answer.model),
                ])
            });
            return Ok(sse_body(body.clone()));
        }
        let mut out = vec![sse::meta(&key, &answer.a, &answer.b, true)];
        translator.finished_text(answer.attempt, &answer.text, &mut out);
        out.push(sse::done(&key, &answer.model));
        return Ok(sse_response(&app, stream::iter(out.into_iter().map(Ok))));
    }
    let meta = sse::meta(&key, matchup.a.display(), matchup.b.display(), false);
    let follow = Follow {
        waiter: app.follow(&matchup, &key),
        translator,
        queue: VecDeque::from([meta]),
        ended: false,
    };
    Ok(sse_response(&app, stream::unfold(follow, Follow::step)))
}

/// One client's stream of a generation in progress.
struct Follow {
    waiter: Waiter,
    translator: Translator,
    queue: VecDeque<SseEvent>,
    ended: bool,
}

impl Follow {
    async fn step(mut self) -> Option<(Result<SseEvent, Infallible>, Follow)> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some((Ok(event), self));
            }
            if self.ended {
                return None;
            }
            let mut out = Vec::new();
            match self.waiter.next().await {
                Some(event) => self.ended = self.translator.translate(&event, &mut out),
                None => {
                    out.push(sse::error(
                        "unavailable",
                        "The answer stream was interrupted. Please try again.",
                        true,
                    ));
                    self.ended = true;
                }
            }
            self.queue.extend(out);
        }
    }
}

/// A whole event stream known in advance (a hit), as one body.
pub(crate) fn sse_body(body: Bytes) -> Response {
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

pub(crate) fn sse_response(
    app: &App,
    events: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
) -> Response {
    let heartbeat = Duration::from_secs(app.inner.settings.heartbeat_secs.max(1));
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(heartbeat))
        .into_response();
    let headers = response.headers_mut();
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn create_fight(
    State(app): State<App>,
    body: Result<Json<serde_json::Map<String, Value>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::InvalidBody(e.body_text()))?;
    let request = FightRequest::from_json(&body)?;
    let (matchup, key) = app.matchup(&request, Kind::Text)?;
    app.count(&matchup, &key);
    if let Some(cached) = app.cached(&key).await {
        return Ok(json_answer(&cached));
    }
    let mut waiter = app.follow(&matchup, &key);
    let mut attempt = None;
    let mut text = String::new();
    while let Some(event) = waiter.next().await {
        match &*event {
            Event::Started { attempt: a } | Event::Chunk { attempt: a, .. }
                if attempt != Some(*a) =>
            {
                attempt = Some(*a);
                text.clear();
                if let Event::Chunk { delta, .. } = &*event {
                    text.push_str(delta);
                }
            }
            Event::Started { .. } => {}
            Event::Chunk { delta, .. } => text.push_str(delta),
            Event::Done { model, .. } => {
                // The stored answer is authoritative (its display names are the first
                // request's); what we collected serves if it was purged meanwhile.
                drop(waiter);
                if let Some(cached) = app.cached(&key).await {
                    return Ok(json_answer_with(&cached, false));
                }
                let body = json!({
                    "key": key, "a": matchup.a.display(), "b": matchup.b.display(),
                    "text": text, "model": model, "cached": false,
                });
                return Ok(Json(body).into_response());
            }
            Event::Error { .. } | Event::Purged => return Err(ApiError::ended(&event)),
        }
    }
    Err(ApiError::Unavailable)
}

fn json_answer(cached: &Cached<Answer>) -> Response {
    json_answer_with(cached, true)
}

fn json_answer_with(cached: &Cached<Answer>, was_cached: bool) -> Response {
    if was_cached {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            cached.body.clone(),
        )
            .into_response();
    }
    let a = &cached.value;
    Json(json!({
        "key": a.key, "a": a.a, "b": a.b, "text": a.text, "model": a.model, "cached": false,
    }))
    .into_response()
}

async fn get_fight(
    State(app): State<App>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = Key::parse(&key).ok_or(ApiError::NotFound)?;
    let cached = match app.inner.answers.get(&key).await {
        Ok(Some((cached, _))) => cached,
        Ok(None) => return Err(ApiError::NotFound),
        Err(e) => {
            tracing::warn!(%key, error = format!("{e:#}"), "edge cache read failed");
            return Err(ApiError::Unavailable);
        }
    };
    let validators = [
        (header::ETAG, cached.etag.clone()),
        (header::CACHE_CONTROL, ANSWER_CACHE_CONTROL.to_owned()),
    ];
    if if_none_match(&headers, &cached.etag) {
        return Ok((StatusCode::NOT_MODIFIED, validators).into_response());
    }
    Ok((
        validators,
        [(header::CONTENT_TYPE, "application/json")],
        cached.body.clone(),
    )
        .into_response())
}

/// Whether `If-None-Match` names `etag` (or `*`); weak comparison, as RFC 9110 asks for GET.
pub(crate) fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    let Some(value) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    value
        .split(',')
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == etag)
}
