//! The fight page at `/` and its assets: plain HTML, CSS and JavaScript from `api/assets/`,
//! embedded in the binary, so that the API needs no web server or build step beside it.
//!
//! Every asset is revalidated on each use (`no-cache` with a strong ETag, 304 when it has not
//! changed), so a new deploy is picked up at once and an unchanged page costs a 304.
//!
//! The page itself (`/`, `/?a=&b=`) is rendered for the request that asks for it: whether it
//! may start a new answer as it loads depends on who sent the visitor (`Sec-Fetch-Site`,
//! `Sec-Fetch-Dest`, `Referer`; see `preview`). It is therefore `private`: a CDN or a shared
//! proxy must not hand one visitor's variant (a typed address, which starts the text) to
//! another (a link from another site, which must wait for Fight), nor revalidate it with one
//! visitor's headers for another. Browsers revalidate it on each use all the same, and
//! `Vary` names the headers for any cache that keeps it.

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use sha2::{Digest, Sha256};

use crate::http::if_none_match;

/// The page's caching: revalidated on each use, by the browser alone (see the module's doc).
const PAGE_CACHE_CONTROL: &str = "private, no-cache";
/// The request headers the page's body depends on, besides its URL and `Host`.
const PAGE_VARY: &str = "Sec-Fetch-Site, Sec-Fetch-Dest, Referer";

/// What the page may load: its own scripts and styles, streams from this API, and pictures
/// from anywhere, since image URLs may point at a CDN or bucket (`VERSUS_PUBLIC_IMAGE_BASE_URL`).
/// No one may frame it (`frame-ancestors`, and `X-Frame-Options` for older browsers): a framed
/// page could be clicked by a visitor who does not see it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data: https: http:; connect-src 'self'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// The page itself; `preview` renders its head (the title, the description, the link
/// preview's tags).
pub const INDEX: &str = include_str!("../assets/index.html");

/// The page's static image: 1200 × 630, the size link previews crop to (`preview` points the
/// site's own preview at it).
pub const SITE_IMAGE: &str = "/assets/og.png";

const ASSETS: &[Asset] = &[
    Asset {
        path: "/assets/app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../assets/app.css"),
    },
    Asset {
        path: "/assets/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../assets/app.js"),
    },
    Asset {
        path: "/favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../assets/favicon.svg"),
    },
    Asset {
        path: SITE_IMAGE,
        content_type: "image/png",
        body: include_bytes!("../assets/og.png"),
    },
];

/// The page's routes; they need no state.
pub fn routes() -> Router {
    ASSETS.iter().fold(Router::new(), |router, asset| {
        let etag = etag(asset.body);
        router.route(
            asset.path,
            get(move |headers: HeaderMap| async move { serve(asset, &etag, &headers) }),
        )
    })
}

fn etag(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    format!("\"{}\"", hex::encode(&digest[..12]))
}

fn serve(asset: &Asset, etag: &str, request: &HeaderMap) -> Response {
    respond(asset.content_type, asset.body.into(), etag, request)
}

/// The page as `body` (rendered for its query), revalidated like the assets.
pub(crate) fn html(body: String, request: &HeaderMap) -> Response {
    let etag = etag(body.as_bytes());
    respond("text/html; charset=utf-8", body.into(), &etag, request)
}

fn respond(content_type: &'static str, body: Body, etag: &str, request: &HeaderMap) -> Response {
    let page = content_type.starts_with("text/html");
    let mut headers = HeaderMap::new();
    if page {
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static(PAGE_CACHE_CONTROL),
        );
        headers.insert(header::VARY, HeaderValue::from_static(PAGE_VARY));
    } else {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(value) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, value);
    }
    if if_none_match(request, etag) {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if page {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        );
        headers.insert(
            HeaderName::from_static("x-frame-options"),
            HeaderValue::from_static("DENY"),
        );
    }
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_links_to_is_served() {
        let html = INDEX;
        for link in ["/assets/app.css", "/assets/app.js", "/favicon.svg"] {
            assert!(html.contains(&format!("\"{link}\"")), "{link}");
            assert!(ASSETS.iter().any(|a| a.path == link), "{link}");
        }
    }

    #[test]
    fn the_page_is_kept_by_the_browser_alone_and_never_framed() {
        let page = html(INDEX.to_owned(), &HeaderMap::new());
        let header =
            |response: &Response, name: &str| response.headers()[name].to_str().unwrap().to_owned();
        assert_eq!(header(&page, "cache-control"), "private, no-cache");
        assert_eq!(
            header(&page, "vary"),
            "Sec-Fetch-Site, Sec-Fetch-Dest, Referer"
        );
        assert_eq!(header(&page, "x-frame-options"), "DENY");
        assert!(header(&page, "content-security-policy").contains("frame-ancestors 'none'"));
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, page.headers()[header::ETAG].clone());
        let unchanged = html(INDEX.to_owned(), &again);
        assert_eq!(unchanged.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(header(&unchanged, "cache-control"), "private, no-cache");
        assert_eq!(
            header(&unchanged, "vary"),
            "Sec-Fetch-Site, Sec-Fetch-Dest, Referer"
        );
        // The assets are the same for everyone.
        let script = &ASSETS[1];
        let asset = serve(script, &etag(script.body), &HeaderMap::new());
        assert_eq!(header(&asset, "cache-control"), "no-cache");
        assert!(asset.headers().get("vary").is_none());
    }

    #[test]
    fn the_page_runs_no_inline_script_the_policy_would_block() {
        let html = INDEX;
        assert_eq!(html.matches("<script").count(), 1);
        assert!(html.contains("<script src=\"/assets/app.js\" defer></script>"));
        let handlers = html.split(" on").skip(1).filter(|rest| {
            let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert_eq!(handlers.count(), 0, "no inline event handlers");
    }
}
