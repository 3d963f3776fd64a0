//! What a shared link shows: `GET /?a=A&b=B` renders the page with the tags link previews read
//! (Open Graph and the Twitter card), on the server, since crawlers run no JavaScript. A
//! preview echoes only what was checked: when the fight's answer is stored (its names and its
//! text passed moderation), the title names the fight, the description starts the answer, the
//! image is the fight's picture when it is drawn (else the site's own), and the address is the
//! matchup's canonical form; any other fight (never asked, refused, or past the client's
//! look-up limit) gets the site's own tags, though the page still opens on it. Rendering never
//! starts a generation: it costs the cache look-ups a hit costs, and nothing when the names
//! are not valid.
//!
//! Absolute URLs (`og:url`, `og:image`, the canonical link) come from `VERSUS_PUBLIC_URL`, or,
//! on a request from loopback (development), from its `Host`; never from `X-Forwarded-Host`,
//! which a load balancer may pass through from the client. Off loopback and without
//! `VERSUS_PUBLIC_URL` there is no address to trust, so the page carries none: the canonical
//! link is relative, and `og:url` and a picture this API serves are left out (see
//! [`PublicBase`]).
//!
//! The same look-ups tell the page's script what it may do as it loads (`<meta
//! name="versus:…">`, see [`Landing`]): whether the text of a new answer may start at once
//! (only for an address the visitor typed and for this site's own navigation: a link from
//! another site waits for the visitor to press Fight, `origin::Origins::document_may_start`),
//! and what is stored already (the answer's key, a refusal, the picture's URL, and the model
//! that drew it when a fallback provider did), which the page shows at once whoever sent the
//! visitor, without asking for anything that could cost money.
//! The page body therefore depends on `Sec-Fetch-Site`, `Sec-Fetch-Dest` and `Referer`:
//! `page::html` keeps it out of shared caches.

use std::{
    fmt::Write,
    net::{IpAddr, SocketAddr},
};

use axum::{
    extract::{ConnectInfo, RawQuery, State},
    http::{HeaderMap, HeaderValue, header},
    response::Response,
};
use versus_shared::wire::{Degraded, ErrorCode, Kind};

use crate::{
    app::App,
    body::image_url,
    matchup::Names,
    page::{self, SITE_IMAGE},
};

/// Where the page's head takes its title, its description and the preview tags.
const MARKER: &str =
    "<!-- head: the title, the description and the link preview's tags (api/src/preview.rs) -->";
/// The site's title, in the page and in previews of it.
const SITE_TITLE: &str = "Versus: who would win?";
/// The longest description previews show whole.
const DESCRIPTION_CHARS: usize = 200;

/// `GET /`: the page, with the link preview of the matchup its query names, if any.
#[utoipa::path(
    get,
    path = "/",
    tag = "operations",
    summary = "The fight page",
    params(
        ("a" = Option<String>, Query, description = "The first opponent: with `b`, the page opens on this fight, and its link preview (Open Graph and Twitter card tags) names it once its answer is stored and not refused (the site's own tags otherwise)."),
        ("b" = Option<String>, Query, description = "The second opponent."),
        ("If-None-Match" = Option<String>, Header, description = "An ETag of this page: 304 if it still is."),
    ),
    responses(
        (status = 200, description = "The page. Rendering it never starts a generation.", content_type = "text/html; charset=utf-8", body = String),
        (status = 304, description = "Not modified."),
    ),
)]
pub(crate) async fn index(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let base = app.public_base(peer, &headers);
    let own = base.url.as_deref().unwrap_or_default();
    let start = app.inner.origins.document_may_start(&headers, own);
    let request = query.as_deref().map(Names::from_query);
    let preview = match request {
        Some(Ok(request)) => {
            app.preview(&request, start, || app.client(peer, &headers))
                .await
        }
        _ => None,
    }
    .unwrap_or_else(|| Preview::site(start));
    let mut response = page::html(preview.render(page::INDEX, base.url.as_deref()), &headers);
    if base.from_host {
        vary_on_host(&mut response);
    }
    response
}

/// Adds `Host` to the page's `Vary`: its URLs were read from it.
fn vary_on_host(response: &mut Response) {
    let headers = response.headers_mut();
    let vary = match headers.get(header::VARY).and_then(|v| v.to_str().ok()) {
        Some(vary) if !vary.is_empty() => format!("{vary}, Host"),
        _ => "Host".to_owned(),
    };
    if let Ok(value) = HeaderValue::from_str(&vary) {
        headers.insert(header::VARY, value);
    }
}

/// Where the absolute URLs of a page come from.
#[derive(Debug, PartialEq, Eq)]
struct PublicBase {
    /// The site's address, `scheme://host[:port]`; None when there is none to trust.
    url: Option<String>,
    /// Whether it was read from the request's `Host` (the response then varies on it).
    from_host: bool,
}

impl PublicBase {
    /// `VERSUS_PUBLIC_URL` (`public_url`) when set. Otherwise the `Host` the request was sent
    /// to, but only from loopback, where the sender is this machine (`scripts/dev`, tests),
    /// with the scheme a trusted proxy says it received. A request from anywhere else could
    /// name any host, and a cache in front (a CDN set to cache pages) would serve that host in
    /// every shared card: it gets no address. `X-Forwarded-Host` is never read, since many
    /// load balancers pass a client's through unchanged. (A proxy on this machine makes
    /// every request loopback: behind one, `VERSUS_PUBLIC_URL` is needed, as in production.)
    fn of(public_url: Option<&str>, peer: IpAddr, trusted: bool, headers: &HeaderMap) -> Self {
        if let Some(url) = public_url {
            return PublicBase {
                url: Some(url.trim_end_matches('/').to_owned()),
                from_host: false,
            };
        }
        if !peer.to_canonical().is_loopback() {
            return PublicBase {
                url: None,
                from_host: false,
            };
        }
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let scheme = match header("x-forwarded-proto") {
            Some("https") if trusted => "https",
            _ => "http",
        };
        let host = header(header::HOST.as_str())
            .filter(|h| is_host(h))
            .unwrap_or("localhost");
        PublicBase {
            url: Some(format!("{scheme}://{host}")),
            from_host: true,
        }
    }
}

/// The tags of one page.
struct Preview {
    /// The fight's name, for previews.
    title: String,
    /// The page's `<title>`, as the page's script sets it.
    page_title: String,
    description: String,
    /// The picture: a path on this site (`/assets/og.png`), or an absolute URL (a CDN's).
    image: String,
    image_alt: String,
    /// The page's address, as a path on this site (`/?a=…&b=…`).
    path: String,
    landing: Landing,
}

/// What the page's script may do with the fight its address names, as it loads.
#[derive(Debug, Default)]
struct Landing {
    /// The text of a new answer may start at once: the visitor typed the address, or came
    /// from this site (or an allowed origin). Otherwise only the Fight button starts it.
    start: bool,
    /// The key of the stored answer, which the page fetches (`GET /v1/fights/{key}`, never a
    /// generation) when it may not start the text.
    answer: Option<String>,
    /// Moderation refused the matchup: the message the page shows.
    refused: Option<&'static str>,
    /// The stored picture's URL. A picture that is not stored is drawn only when the visitor
    /// asks (the Fight button or the picture's own), whoever sent them.
    picture: Option<String>,
    /// The stored picture's key, which its Report control names.
    picture_key: Option<String>,
    /// The model that drew the stored picture, when a fallback provider did (it is degraded):
    /// the page says so under it.
    picture_fallback: Option<String>,
}

impl Preview {
    /// The site's own: no matchup, or one whose answer is not stored.
    fn site(start: bool) -> Preview {
        Preview {
            title: SITE_TITLE.to_owned(),
            page_title: SITE_TITLE.to_owned(),
            description: "Who would win, A or B? Ask Versus: the answer streams in as it is \
                          written, with a picture of the fight."
                .to_owned(),
            image: SITE_IMAGE.to_owned(),
            image_alt: SITE_TITLE.to_owned(),
            path: "/".to_owned(),
            // The names may still be checked by the API when the script asks (a 400 costs
            // nothing): the page says whether it may ask on load.
            landing: Landing {
                start,
                ..Landing::default()
            },
        }
    }

    /// The page with its head's title, description and preview tags, its URLs made absolute
    /// with `base` ([`PublicBase`]). Without one, the canonical link is relative (a browser or
    /// a crawler resolves it against the address it fetched), and the tags that must be
    /// absolute (`og:url`, an `og:image` on this site) are left out: a crawler then takes the
    /// address it fetched, and shows a card without a picture.
    fn render(&self, page: &str, base: Option<&str>) -> String {
        let absolute = |url: &str| match base {
            _ if !url.starts_with('/') => Some(url.to_owned()),
            Some(base) => Some(format!("{base}{url}")),
            None => None,
        };
        let url = absolute(&self.path);
        let image = absolute(&self.image);
        let mut head = String::with_capacity(1024);
        let title = escape(&self.title);
        let description = escape(&self.description);
        let _ = write!(
            head,
            "<title>{}</title>\n\
             <meta name=\"description\" content=\"{description}\">\n\
             <link rel=\"canonical\" href=\"{}\">\n\
             <meta property=\"og:site_name\" content=\"Versus\">\n\
             <meta property=\"og:type\" content=\"website\">\n\
             <meta property=\"og:title\" content=\"{title}\">\n\
             <meta property=\"og:description\" content=\"{description}\">",
            escape(&self.page_title),
            escape(url.as_deref().unwrap_or(&self.path)),
        );
        if let Some(url) = &url {
            let _ = write!(
                head,
                "\n<meta property=\"og:url\" content=\"{}\">",
                escape(url)
            );
        }
        if let Some(image) = &image {
            let _ = write!(
                head,
                "\n<meta property=\"og:image\" content=\"{}\">\n\
                 <meta property=\"og:image:alt\" content=\"{}\">",
                escape(image),
                escape(&self.image_alt),
            );
        }
        let card = if image.is_some() {
            "summary_large_image"
        } else {
            "summary"
        };
        let _ = write!(head, "\n<meta name=\"twitter:card\" content=\"{card}\">");
        let landing = &self.landing;
        let start = if landing.start { "text" } else { "wait" };
        let _ = write!(head, "\n<meta name=\"versus:start\" content=\"{start}\">");
        for (name, value) in [
            ("answer", landing.answer.as_deref()),
            ("refused", landing.refused),
            ("picture", landing.picture.as_deref()),
            ("picture-key", landing.picture_key.as_deref()),
            ("picture-fallback", landing.picture_fallback.as_deref()),
        ] {
            if let Some(value) = value {
                let _ = write!(
                    head,
                    "\n<meta name=\"versus:{name}\" content=\"{}\">",
                    escape(value)
                );
            }
        }
        page.replacen(MARKER, &head, 1)
    }
}

impl App {
    /// The preview of the matchup `request` names, or none if its names are not valid: its own
    /// tags when its answer is stored, else the site's (with what the page's script may do).
    /// What is stored is looked up past memory only while `client` may
    /// (`VERSUS_CLIENT_LOOKUPS_PER_SECOND`); past its limit the page gets the site's tags.
    async fn preview(
        &self,
        request: &Names,
        start: bool,
        client: impl FnOnce() -> IpAddr,
    ) -> Option<Preview> {
        let text = self.ask(request, Kind::Text).ok()?;
        let image = self.key_of(Kind::Image, &text.matchup);
        let in_memory = self.inner.answers.in_memory(&text.key).is_some()
            && self.inner.images.in_memory(&image).is_some();
        let (answer, picture) = if in_memory || self.look_up(client()).is_ok() {
            tokio::join!(
                self.inner.answers.lookup(&text.key),
                self.inner.images.lookup(&image)
            )
        } else {
            (None, None)
        };
        let picture_fallback = picture
            .as_ref()
            .filter(|cached| cached.value.degraded())
            .map(|cached| cached.value.model.clone());
        let picture = picture.map(|cached| {
            image_url(
                self.inner.settings.public_image_base_url.as_deref(),
                &cached.value,
            )
        });
        // A refusal is stored like an answer, and shown at once like one; a page that may
        // start the text learns of it from the stream, at no cost either.
        let refused =
            !start && answer.is_none() && self.inner.refusals.refused(Kind::Text, &text.key).await;
        let landing = Landing {
            start,
            answer: answer.as_ref().map(|_| text.key.to_string()),
            refused: refused.then(|| ErrorCode::Refused.message()),
            picture_key: picture.as_ref().map(|_| image.to_string()),
            picture,
            picture_fallback,
        };
        let Some(cached) = answer else {
            // Nothing checked to echo: names nobody moderated stay out of the tags.
            return Some(Preview {
                landing,
                ..Preview::site(start)
            });
        };
        // The names as the answer has them: the first request's spelling, which passed.
        let (a, b) = (&cached.value.a, &cached.value.b);
        let (lo, hi) = text.matchup.canonical_pair();
        Some(Preview {
            title: format!("{a} vs {b}"),
            page_title: format!("{a} vs {b} · Versus"),
            description: opening(&cached.value.text),
            image_alt: format!("{a} vs {b}, drawn by an AI"),
            image: landing
                .picture
                .clone()
                .unwrap_or_else(|| SITE_IMAGE.to_owned()),
            path: format!("/?a={}&b={}", encode(lo), encode(hi)),
            landing,
        })
    }

    /// Where the page's absolute URLs come from ([`PublicBase::of`]).
    fn public_base(&self, peer: SocketAddr, headers: &HeaderMap) -> PublicBase {
        PublicBase::of(
            self.inner.settings.public_url.as_deref(),
            peer.ip(),
            self.inner.limits.is_trusted(peer.ip()),
            headers,
        )
    }
}

/// A `Host` header's value: a name or an address, and a port.
fn is_host(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']'))
}

/// The start of an answer, cut at a word, for a description.
fn opening(text: &str) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.chars().count() <= DESCRIPTION_CHARS {
        return text;
    }
    let cut: String = text.chars().take(DESCRIPTION_CHARS).collect();
    let cut = match cut.rfind(' ') {
        Some(space) if space > DESCRIPTION_CHARS / 2 => &cut[..space],
        _ => cut.as_str(),
    };
    format!(
        "{}…",
        cut.trim_end_matches(|c: char| c.is_ascii_punctuation())
    )
}

/// Escapes text for an HTML attribute or element.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query value (all but unreserved characters).
fn encode(value: &str) -> String {
    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    const QUERY_VALUE: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = "https://versus.example";

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn absolute_urls_come_from_the_public_url_or_from_the_host_on_loopback_only() {
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let remote: IpAddr = "203.0.113.7".parse().unwrap();
        let evil = headers(&[
            ("host", "evil.example"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
        ]);
        let base = |public_url, peer, trusted, headers: &HeaderMap| {
            PublicBase::of(public_url, peer, trusted, headers)
        };
        // Configured: whatever the request says, from wherever it comes.
        for (peer, trusted) in [(loopback, true), (remote, true), (remote, false)] {
            assert_eq!(
                base(Some("https://versus.example/"), peer, trusted, &evil),
                PublicBase {
                    url: Some(SITE.to_owned()),
                    from_host: false
                }
            );
        }
        // On loopback, the Host (never X-Forwarded-Host, even from a trusted proxy).
        let dev = headers(&[
            ("host", "127.0.0.1:8080"),
            ("x-forwarded-host", "evil.example"),
        ]);
        for peer in [loopback, mapped] {
            assert_eq!(
                base(None, peer, true, &dev),
                PublicBase {
                    url: Some("http://127.0.0.1:8080".to_owned()),
                    from_host: true
                }
            );
        }
        assert_eq!(
            base(None, loopback, true, &evil).url.as_deref(),
            Some("https://evil.example")
        );
        assert_eq!(
            base(None, loopback, false, &evil).url.as_deref(),
            Some("http://evil.example")
        );
        // Anywhere else, no address at all, trusted proxy or not.
        for trusted in [true, false] {
            assert_eq!(
                base(None, remote, trusted, &evil),
                PublicBase {
                    url: None,
                    from_host: false
                }
            );
        }
    }

    #[test]
    fn without_an_address_the_page_has_a_relative_canonical_link_and_no_absolute_url() {
        let mut preview = Preview::site(false);
        preview.path = "/?a=batman&b=superman".to_owned();
        let html = preview.render(page::INDEX, None);
        assert_eq!(
            html.matches("<link rel=\"canonical\" href=\"/?a=batman&amp;b=superman\">")
                .count(),
            1,
            "{html}"
        );
        for absent in ["og:url", "og:image", "://"] {
            assert!(!html.contains(absent), "{absent}: {html}");
        }
        assert!(html.contains("<meta name=\"twitter:card\" content=\"summary\">"));
        // A picture at a CDN (`VERSUS_PUBLIC_IMAGE_BASE_URL`) is configured, not read from
        // the request: it stays.
        preview.image = "https://cdn.example/images/x.png".to_owned();
        let html = preview.render(page::INDEX, None);
        assert!(
            html.contains(
                "<meta property=\"og:image\" content=\"https://cdn.example/images/x.png\">"
            )
        );
        assert!(!html.contains("og:url"));
    }

    #[test]
    fn names_are_escaped_in_every_tag() {
        let preview = Preview {
            title: "<script>alert(1)</script> vs \"Bob\" & 'Al'".to_owned(),
            page_title: "<script>".to_owned(),
            description: "a > b".to_owned(),
            image: "http://h/x.png?a=\"".to_owned(),
            image_alt: "<b>".to_owned(),
            path: "/?a=x&b=y".to_owned(),
            landing: Landing {
                start: false,
                answer: None,
                refused: None,
                picture: Some("http://h/x.png?a=\"<".to_owned()),
                picture_key: Some("0123456789abcdef0123456789abcdef".to_owned()),
                picture_fallback: Some("<i>".to_owned()),
            },
        };
        let html = preview.render(page::INDEX, Some("http://h"));
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("\"Bob\""), "{html}");
        assert!(html.contains(
            "&lt;script&gt;alert(1)&lt;/script&gt; vs &quot;Bob&quot; &amp; &#39;Al&#39;"
        ));
        assert!(html.contains("<title>&lt;script&gt;"));
        assert!(html.contains("content=\"a &gt; b\""));
        assert!(html.contains("href=\"http://h/?a=x&amp;b=y\""));
        assert!(
            html.contains("<meta name=\"versus:picture\" content=\"http://h/x.png?a=&quot;&lt;\">")
        );
        assert!(html.contains(
            "<meta name=\"versus:picture-key\" content=\"0123456789abcdef0123456789abcdef\">"
        ));
        assert!(html.contains("<meta name=\"versus:picture-fallback\" content=\"&lt;i&gt;\">"));
    }

    #[test]
    fn the_page_is_told_whether_it_may_start_and_what_is_stored() {
        let wait = Preview::site(false).render(page::INDEX, Some(SITE));
        assert_eq!(
            wait.matches("<meta name=\"versus:start\" content=\"wait\">")
                .count(),
            1
        );
        assert!(!wait.contains("versus:answer") && !wait.contains("versus:picture"));
        let mut preview = Preview::site(true);
        preview.landing.answer = Some("0123abcd".to_owned());
        preview.landing.refused = Some(ErrorCode::Refused.message());
        let html = preview.render(page::INDEX, Some(SITE));
        for tag in [
            "<meta name=\"versus:start\" content=\"text\">",
            "<meta name=\"versus:answer\" content=\"0123abcd\">",
            "<meta name=\"versus:refused\" content=\"Versus does not answer this matchup.\">",
        ] {
            assert_eq!(html.matches(tag).count(), 1, "{tag}");
        }
    }

    #[test]
    fn the_site_preview_fills_every_tag_once() {
        let html = Preview::site(true).render(page::INDEX, Some(SITE));
        for tag in [
            "<link rel=\"canonical\" href=\"https://versus.example/\">",
            "<meta property=\"og:image\" content=\"https://versus.example/assets/og.png\">",
            "<meta name=\"twitter:card\" content=\"summary_large_image\">",
        ] {
            assert_eq!(html.matches(tag).count(), 1, "{tag}");
        }
        assert!(!html.contains(MARKER));
    }

    #[test]
    fn a_long_answer_is_cut_at_a_word() {
        let text = "Batman wins. ".repeat(40);
        let cut = opening(&text);
        assert!(cut.ends_with('…'), "{cut}");
        assert!(cut.chars().count() <= DESCRIPTION_CHARS + 1);
        assert!(cut.starts_with("Batman wins. Batman wins."));
        assert_eq!(
            opening("Short answer.\n\nTwo lines."),
            "Short answer. Two lines."
        );
    }
}
