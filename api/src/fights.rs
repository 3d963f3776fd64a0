//! The text routes of the public contract: `GET /v1/fights/stream`, `POST /v1/fights`,
//! `GET /v1/fights/{key}`.

use bytes::Bytes;
use std::{collections::VecDeque, net::SocketAddr};

use axum::{
    Json,
    extract::{ConnectInfo, Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::stream;
use versus_shared::{
    key::Key,
    wire::{Answer, Degraded, ErrorCode, Event, Kind},
};

use crate::{
    app::App,
    body::{Fight, TextBody},
    cache::Cached,
    error::ApiError,
    error::{ErrorBody, Refusals},
    http,
    matchup::{Ask, JsonFight, Name, Names, QueryFight},
    miss::{Found, Waiter},
    sse::{self, Resume, Translator},
};

/// Answers are immutable per key; browsers keep them briefly, CDNs for a day.
const ANSWER_CACHE_CONTROL: &str = "public, max-age=300, s-maxage=86400";
/// A degraded answer (a fallback provider's) is replaced by the primary's once made: browsers
/// and CDNs may store it, but ask again (a 304 while it stands) before each use.
const DEGRADED_CACHE_CONTROL: &str = "public, no-cache";

impl App {
    /// Counts a hit for popularity (in memory; see `popularity`).
    fn count(&self, ask: &Ask) {
        let names = &ask.matchup;
        self.inner
            .popularity
            .record(&ask.key, names.a.display(), names.b.display());
    }

    /// Counts a miss for popularity once it was admitted (it started or joined a generation):
    /// a refused one (over a limit, moderation's refusal, no budget) counts nothing.
    fn count_admitted(&self, waiter: &Waiter, key: &Key, a: &str, b: &str) {
        if waiter.admitted() {
            self.inner.popularity.record(key, a, b);
        }
    }
}

/// The answer, streamed as it is written (a stored one at once).
#[utoipa::path(
    get,
    path = "/v1/fights/stream",
    tag = "fights",
    params(
        ("a" = Name, Query, description = "The first opponent.", example = "Batman"),
        ("b" = Name, Query, description = "The second opponent.", example = "Superman"),
        ("Last-Event-ID" = Option<String>, Header, description = "The `id` of the last chunk received: the stream resumes right after it (or says `reset` and starts over if the answer was generated again)."),
    ),
    responses(
        (status = 200, description = "`meta` first; then `chunk` events (each with an `id`) and perhaps `reset`; last `done` or `error`. Comment lines keep an idle stream open.",
            content_type = "text/event-stream", body = String, headers(("X-Accel-Buffering" = String, description = "`no`: proxies must not buffer the stream."))),
        Refusals,
    ),
)]
pub(crate) async fn stream_fight(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    QueryFight(request): QueryFight,
) -> Result<Response, ApiError> {
    let ask = app.ask(&request, Kind::Text)?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(Resume::parse);
    let key = ask.key.clone();
    // Who asks matters only to a stream that stays open: a whole hit is never limited.
    let client = || app.client(peer, &headers);
    let primary = app.inner.settings.models.chat_model.clone();
    let mut translator = Translator::new(key.clone(), primary, resume);
    let miss = match app.find(&app.inner.answers, &key, client).await? {
        Found::Missing(miss) => miss,
        Found::Stored(cached) => {
            app.count(&ask);
            ask.count_merged(&cached.value.a, &cached.value.b);
            let answer = &cached.value;
            let (model, degraded) = (answer.model.as_str(), answer.degraded());
            let meta = || sse::meta_hit(&key, &answer.a, &answer.b, model, degraded);
            if resume.is_none() {
                // The common hit: the same bytes every time, rendered once per cached answer.
                let body = cached.sse.get_or_init(|| {
                    sse::render(&[
                        meta(),
                        sse::chunk(answer.attempt, answer.text.len(), &answer.text),
                        sse::done(&key, model, degraded),
                    ])
                });
                return Ok(sse::body(body.clone()));
            }
            let mut out = vec![meta().into()];
            translator.finished_text(answer.attempt, &answer.text, &mut out);
            out.push(sse::done(&key, model, degraded).into());
            let slot = app.stream_slot(client())?;
            return Ok(app.sse(slot, stream::iter(out)));
        }
    };
    let client = client();
    let slot = app.stream_slot(client)?;
    let job = app.job(ask);
    let meta = sse::meta(&key, &job.a, &job.b).into();
    let (a, b) = (job.a.clone(), job.b.clone());
    let waiter = app.misses().wait_on(job, miss, &headers, client).await?;
    app.count_admitted(&waiter, &key, &a, &b);
    let generation = InProgress {
        waiter,
        translator,
        queue: VecDeque::from([meta]),
        ended: false,
    };
    Ok(app.sse(slot, stream::unfold(generation, InProgress::next_event)))
}

/// One client's stream of a generation in progress.
struct InProgress {
    waiter: Waiter,
    translator: Translator,
    queue: VecDeque<Bytes>,
    ended: bool,
}

impl InProgress {
    async fn next_event(mut self) -> Option<(Bytes, InProgress)> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some((event, self));
            }
            if self.ended {
                return None;
            }
            let mut out = Vec::new();
            match self.waiter.next().await {
                Some(event) => self.ended = self.translator.translate(&event, &mut out),
                None => {
                    out.push(sse::error(
                        ErrorCode::Unavailable,
                        "The answer stream was interrupted. Please try again.",
                    ));
                    self.ended = true;
                }
            }
            self.queue.extend(out);
        }
    }
}

/// The whole answer, once it is complete.
#[utoipa::path(
    post,
    path = "/v1/fights",
    tag = "fights",
    request_body = Names,
    responses(
        (status = 200, description = "The complete answer.", body = TextBody),
        (status = 502, description = "The generation failed and asking again now would not help.", body = ErrorBody),
        Refusals,
    ),
)]
pub(crate) async fn create_fight(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonFight(request): JsonFight,
) -> Result<Response, ApiError> {
    let ask = app.ask(&request, Kind::Text)?;
    let miss = match app
        .find(&app.inner.answers, &ask.key, || app.client(peer, &headers))
        .await?
    {
        Found::Stored(cached) => {
            app.count(&ask);
            ask.count_merged(&cached.value.a, &cached.value.b);
            return Ok(cached_body(&cached));
        }
        Found::Missing(miss) => miss,
    };
    // Waiting for the whole answer holds a connection as long as a stream does: it takes one
    // of the client's stream slots, until it returns.
    let client = app.client(peer, &headers);
    let _slot = app.stream_slot(client)?;
    let job = app.job(ask);
    let key = job.key.clone();
    let (a, b) = (job.a.clone(), job.b.clone());
    let mut waiter = app.misses().wait_on(job, miss, &headers, client).await?;
    app.count_admitted(&waiter, &key, &a, &b);
    let mut attempt = None;
    let mut text = String::new();
    while let Some(event) = app.unless_stopping(waiter.next()).await? {
        match &**event {
            Event::Started { attempt: a } | Event::Chunk { attempt: a, .. }
                if attempt != Some(*a) =>
            {
                attempt = Some(*a);
                text.clear();
                if let Event::Chunk { delta, .. } = &**event {
                    text.push_str(delta);
                }
            }
            // A text has no partial image (its flight's log never holds one).
            Event::Started { .. } | Event::Partial { .. } => {}
            Event::Chunk { delta, .. } => text.push_str(delta),
            Event::Done { model, .. } => {
                // The stored answer is authoritative (its display names are the first
                // request's); what we collected serves if it was purged meanwhile.
                drop(waiter);
                let body = match app.inner.answers.finished(&key).await {
                    Some(cached) => Json(TextBody::of(&cached.value, false)).into_response(),
                    None => Json(TextBody {
                        fight: Fight {
                            key: &key,
                            a: &a,
                            b: &b,
                        },
                        text: &text,
                        model,
                        degraded: *model != app.inner.settings.models.chat_model,
                        cached: false,
                    })
                    .into_response(),
                };
                return Ok(body);
            }
            Event::Error { .. } | Event::Purged => return Err(ApiError::ended(&event)),
        }
    }
    Err(ApiError::Unavailable)
}

/// A cached answer's public JSON, rendered once when it entered the cache.
fn cached_body(cached: &Cached<Answer>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        cached.body.clone(),
    )
        .into_response()
}

/// A stored answer, by key: immutable, so CDNs and browsers may keep it.
#[utoipa::path(
    get,
    path = "/v1/fights/{key}",
    tag = "fights",
    params(
        ("key" = String, Path, description = "An answer's key, as `meta` and the JSON answers give it.", pattern = "^[0-9a-f]{32}$"),
        ("If-None-Match" = Option<String>, Header, description = "An ETag of this answer: 304 if it still is."),
    ),
    responses(
        (status = 200, description = "The stored answer.", body = TextBody, headers(
            ("ETag" = String, description = "Strong validator of the answer."),
            ("Cache-Control" = String, description = "`public, max-age=300, s-maxage=86400`; `public, no-cache` for a degraded answer (a fallback provider's), which the primary's replaces once made."),
        )),
        (status = 304, description = "Not modified.", headers(("ETag" = String), ("Cache-Control" = String))),
        (status = 404, description = "No answer has this key (yet), or only a degraded one past its time.", body = ErrorBody),
        (status = 429, description = "This client looked up more than it may past the API's memory (`VERSUS_CLIENT_LOOKUPS_PER_SECOND`).", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait."))),
        (status = 503, description = "The answers bucket is unreachable.", body = ErrorBody),
    ),
)]
pub(crate) async fn get_fight(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = Key::parse(&key).ok_or(ApiError::NotFound)?;
    if app.inner.answers.in_memory(&key).is_none() {
        app.look_up(app.client(peer, &headers))?;
    }
    let cached = match app.inner.answers.get(&key).await {
        Ok(Some(cached)) => cached,
        Ok(None) => return Err(ApiError::NotFound),
        Err(e) => {
            // While NATS is down every such read fails: `/readyz` says so, not each request.
            if app.inner.bus.now().is_some() {
                tracing::warn!(%key, error = format!("{e:#}"), "edge cache read failed");
            }
            return Err(ApiError::Unavailable);
        }
    };
    let cache_control = if cached.value.degraded() {
        DEGRADED_CACHE_CONTROL
    } else {
        ANSWER_CACHE_CONTROL
    };
    let validators = http::validators(&cached.etag, cache_control);
    if http::if_none_match(&headers, &cached.etag) {
        return Ok((StatusCode::NOT_MODIFIED, validators).into_response());
    }
    Ok((validators, cached_body(&cached)).into_response())
}
