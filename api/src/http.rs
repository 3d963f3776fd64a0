//! Conditional GETs, shared by every route that serves a stored representation (answers,
//! pictures, the page): strong ETags, `Cache-Control`, and 304 on `If-None-Match`.

use axum::http::{HeaderMap, HeaderName, header};

/// The headers that let a browser or a CDN keep a representation and revalidate it.
pub(crate) fn validators(etag: &str, cache_control: &str) -> [(HeaderName, String); 2] {
    [
        (header::ETAG, etag.to_owned()),
        (header::CACHE_CONTROL, cache_control.to_owned()),
    ]
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
