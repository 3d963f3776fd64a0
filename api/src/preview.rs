//! What a shared link shows: `GET /?a=A&b=B` renders the page with the tags link previews read
//! (Open Graph and the Twitter card), on the server, since crawlers run no JavaScript. The
//! title names the fight, the description starts the answer when it is stored, the image is
//! the fight's picture when it is drawn (else the site's own), and the address is the
//! matchup's canonical form. Rendering never starts a generation: it costs the cache look-ups
//! a hit costs, and nothing when the names are not valid.
//!
//! The same look-ups tell the page's script what it may do as it loads (`<meta
//! name="versus:…">`, see [`Landing`]): whether the text of a new answer may start at once
//! (only for an address the visitor typed and for this site's own navigation: a link from
//! another site waits for the visitor to press Fight, `origin::Origins::document_may_start`),
//! and what is stored already (the answer's key, a refusal, the picture's URL), which the page
//! shows at once whoever sent the visitor, without asking for anything that could cost money.
//! The page body therefore depends on `Sec-Fetch-Site`, `Sec-Fetch-Dest` and `Referer`:
//! `page::html` keeps it out of shared caches.

use std::{
    fmt::Write,
    net::{IpAddr, SocketAddr},
};

use axum::{
    extract::{ConnectInfo, RawQuery, State},
    http::{HeaderMap, header},
    response::Response,
};
use versus_shared::wire::{ErrorCode, Kind};

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
        ("a" = Option<String>, Query, description = "The first opponent: with `b`, the page opens on this fight, and its link preview (Open Graph and Twitter card tags) names it."),
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
    let start = app.inner.origins.document_may_start(&headers, &base);
    let request = query.as_deref().map(Names::from_query);
    let preview = match request {
        Some(Ok(request)) => {
            app.preview(&request, &base, start, || app.client(peer, &headers))
                .await
        }
        _ => None,
    }
    .unwrap_or_else(|| Preview::site(&base, start));
    page::html(preview.render(page::INDEX), &headers)
}

/// The tags of one page.
struct Preview {
    /// The fight's name, for previews.
    title: String,
    /// The page's `<title>`, as the page's script sets it.
    page_title: String,
    description: String,
    image: String,
    image_alt: String,
    url: String,
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
}

impl Preview {
    /// The site's own: no matchup.
    fn site(base: &str, start: bool) -> Preview {
        Preview {
            title: SITE_TITLE.to_owned(),
            page_title: SITE_TITLE.to_owned(),
            description: "Who would win, A or B? Ask Versus: the answer streams in as it is \
                          written, with a picture of the fight."
                .to_owned(),
            image: format!("{base}{SITE_IMAGE}"),
            image_alt: SITE_TITLE.to_owned(),
            url: format!("{base}/"),
            // The names may still be checked by the API when the script asks (a 400 costs
            // nothing): the page says whether it may ask on load.
            landing: Landing {
                start,
                ..Landing::default()
            },
        }
    }

    /// The page with its head's title, description and preview tags.
    fn render(&self, page: &str) -> String {
        let mut head = String::with_capacity(1024);
        let title = escape(&self.title);
        let description = escape(&self.description);
        let url = escape(&self.url);
        let _ = write!(
            head,
            "<title>{}</title>\n\
             <meta name=\"description\" content=\"{description}\">\n\
             <link rel=\"canonical\" href=\"{url}\">\n\
             <meta property=\"og:site_name\" content=\"Versus\">\n\
             <meta property=\"og:type\" content=\"website\">\n\
             <meta property=\"og:title\" content=\"{title}\">\n\
             <meta property=\"og:description\" content=\"{description}\">\n\
             <meta property=\"og:url\" content=\"{url}\">\n\
             <meta property=\"og:image\" content=\"{}\">\n\
             <meta property=\"og:image:alt\" content=\"{}\">\n\
             <meta name=\"twitter:card\" content=\"summary_large_image\">",
            escape(&self.page_title),
            escape(&self.image),
            escape(&self.image_alt),
        );
        let landing = &self.landing;
        let start = if landing.start { "text" } else { "wait" };
        let _ = write!(head, "\n<meta name=\"versus:start\" content=\"{start}\">");
        for (name, value) in [
            ("answer", landing.answer.as_deref()),
            ("refused", landing.refused),
            ("picture", landing.picture.as_deref()),
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
    /// The preview of the matchup `request` names, or none if its names are not valid.
    /// What is stored is looked up past memory only while `client` may
    /// (`VERSUS_CLIENT_LOOKUPS_PER_SECOND`); past its limit the page names the fight alone.
    async fn preview(
        &self,
        request: &Names,
        base: &str,
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
        let names = &text.matchup;
        let (a, b) = match &answer {
            // The names as the answer has them: the first request's spelling.
            Some(cached) => (cached.value.a.clone(), cached.value.b.clone()),
            None => (names.a.display().to_owned(), names.b.display().to_owned()),
        };
        let description = match &answer {
            Some(cached) => opening(&cached.value.text),
            None => format!(
                "Who would win in a fight between {a} and {b}? Ask Versus and watch the answer \
                 being written."
            ),
        };
        let picture = picture.map(|cached| {
            image_url(
                self.inner.settings.public_image_base_url.as_deref(),
                &cached.value,
            )
        });
        let image = match &picture {
            Some(url) if url.starts_with('/') => format!("{base}{url}"),
            Some(url) => url.clone(),
            None => format!("{base}{SITE_IMAGE}"),
        };
        // A refusal is stored like an answer, and shown at once like one; a page that may
        // start the text learns of it from the stream, at no cost either.
        let refused =
            !start && answer.is_none() && self.inner.refusals.refused(Kind::Text, &text.key).await;
        let (lo, hi) = names.canonical_pair();
        Some(Preview {
            title: format!("{a} vs {b}"),
            page_title: format!("{a} vs {b} · Versus"),
            description,
            image_alt: format!("{a} vs {b}, drawn by an AI"),
            image,
            url: format!("{base}/?a={}&b={}", encode(lo), encode(hi)),
            landing: Landing {
                start,
                answer: answer.map(|_| text.key.to_string()),
                refused: refused.then(|| ErrorCode::Refused.message()),
                picture,
            },
        })
    }

    /// The site's public address, `scheme://host[:port]`: `VERSUS_PUBLIC_URL` when set, else
    /// the `Host` the request was sent to (and the scheme a trusted proxy says it received).
    pub(crate) fn public_base(&self, peer: SocketAddr, headers: &HeaderMap) -> String {
        if let Some(base) = &self.inner.settings.public_url {
            return base.trim_end_matches('/').to_owned();
        }
        let forwarded = self.inner.limits.is_trusted(peer.ip());
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let scheme = match header("x-forwarded-proto") {
            Some("https") if forwarded => "https",
            _ => "http",
        };
        let host = header("x-forwarded-host")
            .filter(|_| forwarded)
            .or_else(|| header(header::HOST.as_str()))
            .filter(|h| is_host(h))
            .unwrap_or("localhost");
        format!("{scheme}://{host}")
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

    #[test]
    fn names_are_escaped_in_every_tag() {
        let preview = Preview {
            title: "<script>alert(1)</script> vs \"Bob\" & 'Al'".to_owned(),
            page_title: "<script>".to_owned(),
            description: "a > b".to_owned(),
            image: "http://h/x.png?a=\"".to_owned(),
            image_alt: "<b>".to_owned(),
            url: "http://h/?a=x&b=y".to_owned(),
            landing: Landing {
                start: false,
                answer: None,
                refused: None,
                picture: Some("http://h/x.png?a=\"<".to_owned()),
            },
        };
        let html = preview.render(page::INDEX);
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
    }

    #[test]
    fn the_page_is_told_whether_it_may_start_and_what_is_stored() {
        let wait = Preview::site("https://versus.example", false).render(page::INDEX);
        assert_eq!(
            wait.matches("<meta name=\"versus:start\" content=\"wait\">")
                .count(),
            1
        );
        assert!(!wait.contains("versus:answer") && !wait.contains("versus:picture"));
        let mut preview = Preview::site("https://versus.example", true);
        preview.landing.answer = Some("0123abcd".to_owned());
        preview.landing.refused = Some(ErrorCode::Refused.message());
        let html = preview.render(page::INDEX);
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
        let html = Preview::site("https://versus.example", true).render(page::INDEX);
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
