//! The picture routes: `GET /v1/images/stream`, `POST /v1/images`, the URL that serves a
//! stored picture from our object store, immutable and CDN-ready, and the one that serves a
//! partial image while its picture is drawn, briefly cached.

use bytes::Bytes;
use std::{collections::VecDeque, net::SocketAddr, sync::Arc};

use axum::{
    Json,
    body::Body,
    extract::{ConnectInfo, Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::stream;
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
            match &**event {
                Event::Started { .. } | Event::Chunk { .. } | Event::Partial { .. } => {}
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

/// The picture of a matchup: `meta`, partial images as it is drawn, then where it is served.
#[utoipa::path(
    get,
    path = "/v1/images/stream",
    tag = "images",
    params(
        ("a" = Name, Query, description = "The first opponent.", example = "Batman"),
        ("b" = Name, Query, description = "The second opponent.", example = "Superman"),
        ("Last-Event-ID" = Option<String>, Header, description = "The `id` of the last partial image received: the stream resumes with the next one (or says `reset` and starts over if the picture is being drawn again)."),
    ),
    responses(
        (status = 200, description = "`meta` first; while the picture is drawn, `partial` events (each with an `id`) and perhaps `reset`; last `done` with the picture's URL, or `error`. A stored picture is `meta` and `done` alone. Comment lines keep an idle stream open.",
            content_type = "text/event-stream", body = String, headers(("X-Accel-Buffering" = String, description = "`no`: proxies must not buffer the stream."))),
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
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(sse::Resume::parse);
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
    let meta: Bytes = sse::meta(&key, &job.a, &job.b).into();
    let waiter = app.misses().wait_on(job, miss, &headers, client).await?;
    let settings = &app.inner.settings;
    let translator = sse::Translator::of_picture(
        key.clone(),
        settings.models.image_model.clone(),
        resume,
        settings.public_image_base_url.clone(),
    );
    let drawing = Drawing {
        app: app.clone(),
        key,
        waiter: Some(waiter),
        translator,
        queue: VecDeque::from([meta]),
    };
    Ok(app.sse(slot, stream::unfold(drawing, Drawing::next_event)))
}

/// One client's stream of a picture being drawn: its partial images, then the stored picture.
struct Drawing {
    app: App,
    key: Key,
    /// None once the stream's last event is queued.
    waiter: Option<Waiter>,
    translator: sse::Translator,
    queue: VecDeque<Bytes>,
}

impl Drawing {
    async fn next_event(mut self) -> Option<(Bytes, Drawing)> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some((event, self));
            }
            let waiter = self.waiter.as_mut()?;
            let Some(event) = waiter.next().await else {
                self.waiter = None;
                self.queue.push_back(sse::error(
                    ErrorCode::Unavailable,
                    "The picture stream was interrupted. Please try again.",
                ));
                continue;
            };
            if let Event::Done { .. } = &**event {
                // Done is published after the KV write, so the bucket has it (unless purged).
                self.waiter = None;
                let end = match self.app.inner.images.finished(&self.key).await {
                    Some(cached) => {
                        let v = &cached.value;
                        let url = self.app.url_of(v);
                        sse::image_done(&self.key, &url, &v.model, v.degraded()).into()
                    }
                    None => sse::error(ErrorCode::Unavailable, &ApiError::Unavailable.to_string()),
                };
                self.queue.push_back(end);
                continue;
            }
            let mut out = Vec::new();
            if self.translator.translate(&event, &mut out) {
                self.waiter = None;
            }
            self.queue.extend(out);
        }
    }
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

/// Partial images are removed once their picture is done: browsers and CDNs keep one briefly,
/// and never take it for the picture (which has a URL of its own).
const PARTIAL_CACHE_CONTROL: &str = "public, max-age=60";

/// The content type of a partial image, by the extension its name was checked to have.
fn partial_content_type(file: &str) -> &'static str {
    match file.rsplit_once('.').map(|(_, extension)| extension) {
        Some("jpg") => "image/jpeg",
        Some("webp") => "image/webp",
        _ => "image/png",
    }
}

/// `GET|HEAD /v1/images/partials/{key}-{attempt}-{index}.{ext}`: a partial image of a picture
/// being drawn, as a `partial` event names it. Only paths under `partials/` that the name
/// rebuilds are read; a partial is never served at a picture's URL, nor a picture here.
#[utoipa::path(
    get,
    path = "/v1/images/partials/{file}",
    tag = "images",
    params(
        ("file" = String, Path, description = "`<key>-<attempt>-<index>.png`, as a `partial` event's `url` names it.", pattern = "^[0-9a-f]{32}-(0|[1-9][0-9]{0,8})-(0|[1-9][0-9]{0,8})\\.(png|jpg|webp)$"),
    ),
    responses(
        (status = 200, description = "The partial image, while its picture is drawn.", content_type = "image/png", body = Vec<u8>, headers(
            ("Cache-Control" = String, description = "`public, max-age=60`: partial images are removed once the picture is done."),
        )),
        (status = 404, description = "No partial image has this name (any more: they are removed once the picture is done).", body = ErrorBody),
        (status = 429, description = "This client looked up more than it may past the API's memory (`VERSUS_CLIENT_LOOKUPS_PER_SECOND`).", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait."))),
        (status = 503, description = "The object store is unreachable.", body = ErrorBody),
    ),
)]
pub(crate) async fn serve_partial(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (key, path) = objects::partial_file(&file).ok_or(ApiError::NotFound)?;
    // Every partial is read from the store: it counts as a look-up past memory.
    app.look_up(app.client(peer, &headers))?;
    let object = match app.inner.objects.get(&path).await {
        Ok(object) => object,
        Err(object_store::Error::NotFound { .. }) => return Err(ApiError::NotFound),
        Err(e) => {
            tracing::warn!(%key, error = %e, "reading a partial image failed");
            return Err(ApiError::Unavailable);
        }
    };
    let length = object.meta.size;
    Ok((
        [
            (header::CACHE_CONTROL, PARTIAL_CACHE_CONTROL.to_owned()),
            (header::CONTENT_TYPE, partial_content_type(&file).to_owned()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        Body::from_stream(object.into_stream()),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use versus_shared::objects;

    use super::partial_content_type;
    use crate::body::partial_url;

    const KEY: &str = "9a8b7c6d5e4f30211a2b3c4d5e6f7081";

    #[test]
    fn a_partial_is_served_only_under_the_name_its_event_gives() {
        let (key, path) = objects::partial_file(&format!("{KEY}-3-0.png")).unwrap();
        assert_eq!(key.as_str(), KEY);
        assert_eq!(path.as_ref(), format!("partials/{KEY}/3/0.png"));
        assert!(objects::partial_file(&format!("{KEY}-12-2.webp")).is_some());
        for file in [
            // Another spelling of the same partial.
            format!("{KEY}-03-0.png"),
            format!("{KEY}-3-00.png"),
            // Not a partial's name.
            format!("{KEY}-3.png"),
            format!("{KEY}-3-0-1.png"),
            format!("{KEY}-3-0.gif"),
            format!("{KEY}-3-0"),
            format!("{KEY}--0.png"),
            format!("{KEY}-x-0.png"),
            format!("{KEY}-3-0.png.png"),
            "..-3-0.png".to_owned(),
            format!("{}-3-0.png", KEY.to_uppercase()),
            // A picture's name.
            format!("{KEY}-0123456789abcdef.png"),
            format!("{KEY}.png"),
        ] {
            assert!(objects::partial_file(&file).is_none(), "{file}");
        }
    }

    #[test]
    fn a_partial_is_never_served_at_a_pictures_url() {
        // `/v1/images/{file}` reads only under `images/`: a partial's name is not a picture's.
        for file in [format!("{KEY}-3-0.png"), format!("{KEY}-1-2.webp")] {
            assert!(objects::picture_file(&file).is_none(), "{file}");
        }
        // And every partial URL an event gives is this route's, or the bucket's `partials/`.
        let path = format!("partials/{KEY}/1/2.jpg");
        assert_eq!(
            partial_url(None, &path).unwrap(),
            format!("/v1/images/partials/{KEY}-1-2.jpg")
        );
        assert_eq!(
            partial_url(Some("https://cdn.example/"), &path).unwrap(),
            format!("https://cdn.example/partials/{KEY}/1/2.jpg")
        );
        for path in [
            format!("images/{KEY}-0123456789abcdef.png"),
            format!("partials/{KEY}/1/2.gif"),
            format!("partials/{KEY}/1/2/3.png"),
            format!("partials/{KEY}/01/2.png"),
            "partials/nokey/1/2.png".to_owned(),
        ] {
            assert_eq!(partial_url(None, &path), None, "{path}");
            assert_eq!(
                partial_url(Some("https://cdn.example"), &path),
                None,
                "{path}"
            );
        }
    }

    #[test]
    fn a_partial_has_its_extensions_content_type() {
        assert_eq!(partial_content_type(&format!("{KEY}-1-0.png")), "image/png");
        assert_eq!(
            partial_content_type(&format!("{KEY}-1-0.jpg")),
            "image/jpeg"
        );
        assert_eq!(
            partial_content_type(&format!("{KEY}-1-0.webp")),
            "image/webp"
        );
    }
}
