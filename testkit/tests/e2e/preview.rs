//! Link previews: the page's HTML, fetched without JavaScript as a crawler fetches it, names
//! a fight whose answer is stored, starts its answer, shows its picture and gives its canonical
//! address; any other fight (never asked, refused) gets the site's own tags, so no name that
//! nobody checked is printed on the site's domain. Absolute URLs come from `VERSUS_PUBLIC_URL`,
//! or from the `Host` of a request from loopback, never from `X-Forwarded-Host`; and
//! rendering never starts a generation.

use serde_json::Value;
use versus_testkit::{System, sse};

use crate::{fight, http, image_stream_url, metric, metrics_of, quick, run, text_of};

/// The HTML of `/?a=A&b=B`, as a crawler gets it.
async fn page(sys: &System, a: &str, b: &str) -> String {
    page_with(sys, a, b, &[]).await.1
}

/// The `Vary` and the HTML of `/?a=A&b=B`, asked with `headers`.
async fn page_with(
    sys: &System,
    a: &str,
    b: &str,
    headers: &[(&'static str, &str)],
) -> (String, String) {
    let url =
        reqwest::Url::parse_with_params(&format!("{}/", sys.api_url()), &[("a", a), ("b", b)])
            .unwrap();
    let mut request = http().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/html; charset=utf-8"
    );
    let vary = response.headers()["vary"].to_str().unwrap().to_owned();
    (vary, response.text().await.unwrap())
}

/// Checks that `html` carries the site's own tags, and none of `names`.
fn assert_site_tags(html: &str, names: &[&str], site: &str) {
    assert_eq!(tag(html, "og:title"), "Versus: who would win?");
    assert!(
        tag(html, "og:description").starts_with("Who would win, A or B?"),
        "{html}"
    );
    assert_eq!(tag(html, "og:image"), format!("{site}/assets/og.png"));
    assert_eq!(tag(html, "og:url"), format!("{site}/"));
    assert_eq!(canonical(html), format!("{site}/"));
    assert!(
        html.contains("<title>Versus: who would win?</title>"),
        "{html}"
    );
    for name in names {
        assert!(!html.contains(name), "{name:?} in {html}");
    }
}

/// The `content` of the one `<meta>` whose `property` or `name` is `name`, unescaped.
fn tag(html: &str, name: &str) -> String {
    let found: Vec<&str> = html
        .lines()
        .filter(|l| {
            l.starts_with("<meta ")
                && (l.contains(&format!("property=\"{name}\""))
                    || l.contains(&format!("name=\"{name}\"")))
        })
        .collect();
    assert_eq!(found.len(), 1, "one {name} tag: {found:?}");
    attribute(found[0], "content")
}

/// The `href` of `<link rel="canonical">`.
fn canonical(html: &str) -> String {
    let links: Vec<&str> = html
        .lines()
        .filter(|l| l.starts_with("<link rel=\"canonical\""))
        .collect();
    assert_eq!(links.len(), 1, "{links:?}");
    attribute(links[0], "href")
}

fn attribute(element: &str, name: &str) -> String {
    let start = element.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
    let value = &element[start..start + element[start..].find('"').unwrap()];
    value
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Fetches `url` and checks that it is a PNG picture.
async fn assert_serves_png(url: &str) {
    let response = http().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    assert_eq!(response.headers()["content-type"], "image/png", "{url}");
    let bytes = response.bytes().await.unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{url} is not a PNG"
    );
}

#[test]
fn a_shared_fight_shows_its_answer_and_picture_in_link_previews() {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "50")
            .start()
            .await;
        let api = sys.api_url();
        let text = text_of(&fight(&sys, "Batman", "Superman").await);
        let picture = image_stream_url(&sys, "Batman", "Superman");
        let drawn = sse::open(picture.as_str(), None).await.collect_all().await;
        let done: Value = drawn.last().unwrap().json();
        let picture_url = format!("{api}{}", done["url"].as_str().unwrap());

        // Shared as another person typed it: the same fight, the first request's names.
        let html = page(&sys, "superman ", "BATMAN").await;
        assert_eq!(tag(&html, "og:title"), "Batman vs Superman");
        let description = tag(&html, "og:description");
        let start: String = text
            .split_whitespace()
            .take(8)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            description.starts_with(&start),
            "{description:?} does not start the answer {text:?}"
        );
        assert_eq!(tag(&html, "og:image"), picture_url);
        assert_serves_png(&tag(&html, "og:image")).await;
        let address = format!("{api}/?a=batman&b=superman");
        assert_eq!(tag(&html, "og:url"), address);
        assert_eq!(canonical(&html), address);
        assert_eq!(tag(&html, "twitter:card"), "summary_large_image");
        assert!(
            html.contains("<title>Batman vs Superman · Versus</title>"),
            "{html}"
        );

        // Names are text in the page, never markup.
        let bob = "<b>\"Bob\"</b>";
        fight(&sys, bob, "Al & Co").await;
        let html = page(&sys, bob, "Al & Co").await;
        assert_eq!(tag(&html, "og:title"), "<b>\"Bob\"</b> vs Al & Co");
        assert!(!html.contains("<b>\"Bob\""), "{html}");
    });
}

#[test]
fn a_fight_never_asked_shows_the_site_s_tags_not_its_names_and_starts_nothing() {
    run(async {
        let sys = quick().start().await;
        let api = sys.api_url();
        // Any valid name could be put in a link: nobody checked these, so no tag prints them.
        let html = page(&sys, "Godzilla", "King  Kong").await;
        assert_site_tags(&html, &["Godzilla", "King Kong", "godzilla"], api);
        assert_serves_png(&tag(&html, "og:image")).await;
        assert_eq!(tag(&html, "twitter:card"), "summary_large_image");
        // The page itself still opens on the fight: its script reads the names from the
        // address, and may start it.
        assert_eq!(tag(&html, "versus:start"), "text");

        // The page of bad names is the site's own.
        let html = page(&sys, "", "x").await;
        assert_site_tags(&html, &[], api);

        // Nothing was generated, or even asked for.
        assert_eq!(
            metric(&metrics_of(api).await, "versus_jobs_published_total", ""),
            0.0
        );
        let stats = sys.sim.stats().await;
        for calls in ["chat_calls", "image_calls", "moderation_calls"] {
            assert_eq!(stats[calls], 0, "{calls}");
        }
    });
}

#[test]
fn a_refused_fight_shows_the_site_s_tags() {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_MODERATION_FLAGS", "villain=hate")
            .start()
            .await;
        let refused = fight(&sys, "Villain", "Hero").await;
        assert_eq!(
            refused.last().unwrap().json()["code"],
            "refused",
            "{refused:?}"
        );
        let html = page(&sys, "Villain", "Hero").await;
        assert_site_tags(&html, &["Villain", "villain", "Hero"], sys.api_url());
        // A page another site linked to is told of the refusal, to show it at once.
        let (_, linked) =
            page_with(&sys, "Villain", "Hero", &[("sec-fetch-site", "cross-site")]).await;
        assert_site_tags(&linked, &["Villain", "Hero"], sys.api_url());
        assert_eq!(
            tag(&linked, "versus:refused"),
            "Versus does not answer this matchup."
        );
    });
}

#[test]
fn preview_urls_are_the_public_url_whatever_host_the_request_names() {
    run(async {
        let sys = quick()
            .api_env("VERSUS_PUBLIC_URL", "https://versus.example/")
            .api_env("VERSUS_TRUSTED_PROXIES", "127.0.0.1/32")
            .start()
            .await;
        fight(&sys, "Batman", "Superman").await;
        for headers in [
            vec![("host", "evil.example")],
            // From a trusted proxy, which may pass a client's header through unchanged.
            vec![
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-proto", "http"),
            ],
        ] {
            let (vary, html) = page_with(&sys, "Batman", "Superman", &headers).await;
            assert_eq!(
                tag(&html, "og:url"),
                "https://versus.example/?a=batman&b=superman",
                "{headers:?}"
            );
            assert_eq!(
                canonical(&html),
                "https://versus.example/?a=batman&b=superman"
            );
            assert_eq!(
                tag(&html, "og:image"),
                "https://versus.example/assets/og.png"
            );
            assert!(!html.contains("evil.example"), "{headers:?}: {html}");
            assert!(!vary.contains("Host"), "{vary}");
            let (_, site) = page_with(&sys, "Nobody", "Asked", &headers).await;
            assert_site_tags(&site, &["Nobody", "Asked"], "https://versus.example");
        }
    });
}

#[test]
fn without_a_public_url_preview_urls_take_the_host_of_a_loopback_request_never_x_forwarded_host() {
    run(async {
        let sys = quick()
            .api_env("VERSUS_TRUSTED_PROXIES", "127.0.0.1/32")
            .start()
            .await;
        let api = sys.api_url();
        fight(&sys, "Batman", "Superman").await;
        // The address the request was sent to, and the page varies on it.
        let (vary, html) = page_with(&sys, "Batman", "Superman", &[]).await;
        assert_eq!(tag(&html, "og:url"), format!("{api}/?a=batman&b=superman"));
        assert!(vary.ends_with(", Host"), "{vary}");
        assert!(vary.contains("Referer"), "{vary}");
        // Never what a proxy forwards, trusted or not.
        let (_, html) = page_with(
            &sys,
            "Batman",
            "Superman",
            &[("x-forwarded-host", "evil.example")],
        )
        .await;
        assert_eq!(tag(&html, "og:url"), format!("{api}/?a=batman&b=superman"));
        assert!(!html.contains("evil.example"), "{html}");
        // On loopback the Host is this machine's own word (development): it is used as sent.
        let (vary, html) = page_with(&sys, "Batman", "Superman", &[("host", "evil.example")]).await;
        assert_eq!(
            tag(&html, "og:url"),
            "http://evil.example/?a=batman&b=superman"
        );
        assert!(vary.contains("Host"), "{vary}");
    });
}
