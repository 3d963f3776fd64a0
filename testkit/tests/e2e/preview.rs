//! Link previews: the page's HTML, fetched without JavaScript as a crawler fetches it, names
//! the fight, starts its answer, shows its picture and gives its canonical address, and
//! rendering it never starts a generation.

use serde_json::Value;
use versus_testkit::{System, sse};

use crate::{fight, http, image_stream_url, metric, metrics_of, quick, run, text_of};

/// The HTML of `/?a=A&b=B`, as a crawler gets it.
async fn page(sys: &System, a: &str, b: &str) -> String {
    let url =
        reqwest::Url::parse_with_params(&format!("{}/", sys.api_url()), &[("a", a), ("b", b)])
            .unwrap();
    let response = http().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/html; charset=utf-8"
    );
    response.text().await.unwrap()
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
    });
}

#[test]
fn a_fight_never_asked_has_its_tags_and_starts_nothing() {
    run(async {
        let sys = quick().start().await;
        let api = sys.api_url();
        let html = page(&sys, "Godzilla", "King  Kong").await;
        assert_eq!(tag(&html, "og:title"), "Godzilla vs King Kong");
        let description = tag(&html, "og:description");
        assert!(
            description.contains("Godzilla") && description.contains("King Kong"),
            "{description}"
        );
        assert_eq!(tag(&html, "og:image"), format!("{api}/assets/og.png"));
        assert_serves_png(&tag(&html, "og:image")).await;
        assert_eq!(canonical(&html), format!("{api}/?a=godzilla&b=king%20kong"));
        assert_eq!(tag(&html, "twitter:card"), "summary_large_image");

        // Names are text in the page, never markup.
        let html = page(&sys, "<b>\"Bob\"</b>", "Al & Co").await;
        assert_eq!(tag(&html, "og:title"), "<b>\"Bob\"</b> vs Al & Co");
        assert!(!html.contains("<b>\"Bob\""), "{html}");

        // The page of bad names is the site's own.
        let html = page(&sys, "", "x").await;
        assert_eq!(tag(&html, "og:title"), "Versus: who would win?");
        assert_eq!(canonical(&html), format!("{api}/"));

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
