//! The picture routes: `GET /v1/images/stream`, `POST /v1/images`, and the URL that serves a
//! stored picture from our object store, immutable and CDN-ready.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use axum::{
    Json,
    body::Body,
    extract::{ConnectInfo, Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response, sse::Event as SseEvent},
};
use futures::{StreamExt, stream};
use object_store::ObjectStoreExt;
use versus_shared::{
    key::Key,
    objects::{self, IMAGE_CACHE_CONTROL},
    wire::{Degraded, ErrorCode, Event, ImageAnswer, Kind},
};

use crate::{
    app::App,
    body::{self, ImageBody},
    cache::Cached,
    error::{ApiError, ErrorBody, Refusals},
    http,
    matchup::{JsonFight, Name, Names, QueryFight},
    miss::{Found, Waiter},
    sse,
};

impl App {
    fn url_of(&self, answer: &ImageAnswer) -> String {
        body::image_url(self.inner.settings.public_image_base_url.as_deref(), answer)
    }

    /// Waits for the picture of `key`: Ok(stored picture) or the generation's error.
    async fn drawn(
        &self,
        key: Key,
        mut waiter: Waiter,
    ) -> Result<Arc<Cached<ImageAnswer>>, ApiError> {
        while let Some(event) = self.unless_stopping(waiter.next()).await? {
            match &*event {
                Event::Started { .. } | Event::Chunk { .. } => {}
                // Done is published after the KV write, so the bucket has it (unless purged).
                Event::Done { .. } => {
                    drop(waiter);
                    return self
                        .inner
                        .images
                        .finished(&key)
                        .await
                        .ok_or(ApiError::Unavailable);
                }
                Event::Error { .. } | Event::Purged => return Err(ApiError::ended(&event)),
            }
        }
        Err(ApiError::Unavailable)
    }
}

/// The picture of a matchup: `meta`, then where it is served once drawn.
#[utoipa::path(
    get,
    path = "/v1/images/stream",
    tag = "images",
    params(
        ("a" = Name, Query, description = "The first opponent.", example = "Batman"),
        ("b" = Name, Query, description = "The second opponent.", example = "Superman"),
    ),
    responses(
        (status = 200, description = "`meta`, then `done` with the picture's URL, or `error`.",
            content_type = "text/event-stream", body = String),
        Refusals,
    ),
)]
pub(crate) async fn stream_image(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    QueryFight(request): QueryFight,
) -> Result<Response, ApiError> {
    let ask = app.ask(&request, Kind::Image)?;
    let key = ask.key.clone();
    let miss = match app
        .find(&app.inner.images, &key, || app.client(peer, &headers))
        .await?
    {
        Found::Missing(miss) => miss,
        Found::Stored(cached) => {
            let v = &cached.value;
            ask.count_merged(&v.a, &v.b);
            let body = cached.sse.get_or_init(|| {
                sse::render(&[
                    sse::meta_hit(&key, &v.a, &v.b, &v.model, v.degraded()),
                    sse::image_done(&key, &app.url_of(v), &v.model, v.degraded()),
                ])
            });
            return Ok(sse::body(body.clone()));
        }
    };
    let client = app.client(peer, &headers);
    let slot = app.stream_slot(client)?;
    let job = app.job(ask);
    let meta: SseEvent = sse::meta(&key, &job.a, &job.b).into();
    let waiter = app.misses().wait_on(job, miss, &headers, client).await?;
    let waiting = app.clone();
    let events =
        stream::once(async { Ok::<_, Infallible>(meta) }).chain(stream::once(async move {
            let end = match waiting.drawn(key.clone(), waiter).await {
                Ok(cached) => {
                    let v = &cached.value;
                    sse::image_done(&key, &waiting.url_of(v), &v.model, v.degraded()).into()
                }
                Err(ApiError::Generation {
                    code,
                    message,
                    retryable,
                    retry_after_secs,
                }) => sse::error_until(&code, &message, retryable, retry_after_secs),
                Err(other) => sse::error(ErrorCode::Unavailable, &other.to_string()),
            };
            Ok(end)
        }));
    Ok(app.sse(slot, events))
}

/// The picture of a matchup, once it is stored.
#[utoipa::path(
    post,
    path = "/v1/images",
    tag = "images",
    request_body = Names,
    responses(
        (status = 200, description = "Where the stored picture is served.", body = ImageBody),
        (status = 502, description = "The picture failed and asking again now would not help.", body = ErrorBody),
        Refusals,
    ),
)]
pub(crate) async fn create_image(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonFight(request): JsonFight,
) -> Result<Response, ApiError> {
    let ask = app.ask(&request, Kind::Image)?;
    let found = app
        .find(&app.inner.images, &ask.key, || app.client(peer, &headers))
        .await?;
    let (cached, was_cached) = match found {
        Found::Stored(cached) => {
            ask.count_merged(&cached.value.a, &cached.value.b);
            (cached, true)
        }
        Found::Missing(miss) => {
            // Waiting for the picture takes one of the client's stream slots, as a stream does.
            let client = app.client(peer, &headers);
            let _slot = app.stream_slot(client)?;
            let key = ask.key.clone();
            let job = app.job(ask);
            let waiter = app.misses().wait_on(job, miss, &headers, client).await?;
            (app.drawn(key, waiter).await?, false)
        }
    };
    let url = app.url_of(&cached.value);
    Ok(Json(ImageBody::of(&cached.value, &url, was_cached)).into_response())
}

/// `GET|HEAD /v1/images/{key}-{digest}.{ext}`: the stored bytes. Only the path the key's
/// stored picture records is ever read, and only when the name rebuilds it from a valid key, a
/// digest and an extension, so nothing else in the store is reachable.
#[utoipa::path(
    get,
    path = "/v1/images/{file}",
    tag = "images",
    params(
        ("file" = String, Path, description = "`<key>-<digest>.png`, as a picture's `url` names it (`<key>.png` for pictures stored before names carried their content).", pattern = "^[0-9a-f]{32}(-[0-9a-f]{16})?\\.(png|jpg|webp)$"),
        ("If-None-Match" = Option<String>, Header, description = "An ETag of this picture: 304 if it still is."),
    ),
    responses(
        (status = 200, description = "The picture.", content_type = "image/png", body = Vec<u8>, headers(
            ("ETag" = String, description = "Strong validator (the picture's SHA-256)."),
            ("Cache-Control" = String, description = "`public, max-age=31536000, immutable`."),
        )),
        (status = 304, description = "Not modified.", headers(("ETag" = String), ("Cache-Control" = String))),
        (status = 404, description = "No stored picture has this name.", body = ErrorBody),
        (status = 429, description = "This client looked up more than it may past the API's memory (`VERSUS_CLIENT_LOOKUPS_PER_SECOND`).", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait."))),
        (status = 503, description = "The object store is unreachable.", body = ErrorBody),
    ),
)]
pub(crate) async fn serve_image(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (key, path) = objects::picture_file(&file).ok_or(ApiError::NotFound)?;
    if app.inner.images.in_memory(&key).is_none() {
        app.look_up(app.client(peer, &headers))?;
    }
    let cached = app
        .inner
        .images
        .lookup(&key)
        .await
        .ok_or(ApiError::NotFound)?;
    let picture = &cached.value;
    if path.as_ref() != picture.path {
        return Err(ApiError::NotFound);
    }
    let etag = format!("\"{}\"", picture.sha256);
    let validators = http::validators(&etag, IMAGE_CACHE_CONTROL);
    if http::if_none_match(&headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, validators).into_response());
    }
    let object = match app.inner.objects.get(&path).await {
        Ok(object) => object,
        Err(object_store::Error::NotFound { .. }) => {
            tracing::warn!(%key, %path, "a cached picture is missing from the object store");
            return Err(ApiError::NotFound);
        }
        Err(e) => {
            tracing::warn!(%key, error = %e, "reading a picture failed");
            return Err(ApiError::Unavailable);
        }
    };
    let length = object.meta.size;
    Ok((
        validators,
        [
            (header::CONTENT_TYPE, picture.content_type.clone()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        Body::from_stream(object.into_stream()),
    )
        .into_response())
}
