//! The page opened from a link, in a real browser: a link from another site never spends the
//! visitor's money. It shows what is stored at once, but a fight that needs a new answer waits
//! for the visitor to press Fight (a click or the keyboard); a typed address starts the text
//! and no picture; a picture is drawn only when asked for.
//!
//! The other site is a page served by the test itself on a port of its own, reached as
//! `http://localhost:PORT` (another site than the API's `http://127.0.0.1:PORT`: a browser
//! sends `Sec-Fetch-Site: cross-site`) and as `http://127.0.0.1:PORT` (another origin of the
//! same site: `same-site`, with a `Referer` of that origin).

use std::{collections::HashMap, time::Duration};

use axum::{
    Router,
    extract::{Query, State},
    response::Html,
    routing::get,
};
use fantoccini::key::Key;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use versus_testkit::{System, eventually, sse};

use crate::accessibility::assert_accessible;
use crate::browser::{Browser, TIMEOUT};
use crate::page::watch_until_done;
use crate::{fight, http, image_stream_url, metric, metrics_of, quick, run, text_of};

/// Someone else's site: `/link?a=A&b=B[&policy=P]` is a page with one link (`#go`) to the
/// fight page of A and B, under the referrer policy P if given.
struct Elsewhere {
    port: u16,
    servers: Vec<JoinHandle<()>>,
}

impl Elsewhere {
    /// Serves the pages on a free port of 127.0.0.1, and of ::1 where there is one (browsers
    /// may try `localhost` there first).
    async fn start(api: &str) -> Elsewhere {
        let router = Router::new()
            .route("/link", get(link_page))
            .with_state(api.to_owned());
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the other site");
        let port = v4.local_addr().unwrap().port();
        let mut listeners = vec![v4];
        if let Ok(v6) = tokio::net::TcpListener::bind(("::1", port)).await {
            listeners.push(v6);
        }
        let servers = listeners
            .into_iter()
            .map(|listener| {
                let router = router.clone();
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, router).await {
                        eprintln!("the other site stopped: {e}");
                    }
                })
            })
            .collect();
        Elsewhere { port, servers }
    }

    /// The address of the page on `host` that links to the fight of `a` and `b`.
    fn link(&self, host: &str, a: &str, b: &str, policy: Option<&str>) -> String {
        let mut query = vec![("a", a), ("b", b)];
        query.extend(policy.map(|policy| ("policy", policy)));
        reqwest::Url::parse_with_params(&format!("http://{host}:{}/link", self.port), &query)
            .unwrap()
            .to_string()
    }
}

impl Drop for Elsewhere {
    fn drop(&mut self) {
        for server in &self.servers {
            server.abort();
        }
    }
}

async fn link_page(
    State(api): State<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Html<String> {
    let names = [("a", &query["a"]), ("b", &query["b"])];
    let target = reqwest::Url::parse_with_params(&format!("{api}/"), names).unwrap();
    let policy = query
        .get("policy")
        .map(|policy| format!("<meta name=\"referrer\" content=\"{policy}\">"))
        .unwrap_or_default();
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">{policy}\
         <title>Elsewhere</title></head><body><p><a id=\"go\" href=\"{}\">Who would win?</a>\
         </p></body></html>",
        target.as_str().replace('&', "&amp;")
    ))
}

/// Opens `page` and follows its link (a click, as a visitor does) to the fight page.
async fn follow(browser: &Browser, page: &str, api: &str) {
    browser.goto(page).await;
    browser
        .find("#go")
        .await
        .click()
        .await
        .expect("follow the link");
    eventually("the fight page to open", TIMEOUT, || async {
        browser
            .client
            .current_url()
            .await
            .is_ok_and(|url| url.as_str().starts_with(api))
    })
    .await;
}

/// What the simulator has been asked for: chat, image and moderation calls.
async fn calls(sys: &System) -> [u64; 3] {
    let stats = sys.sim.stats().await;
    ["chat_calls", "image_calls", "moderation_calls"].map(|calls| {
        stats[calls]
            .as_u64()
            .unwrap_or_else(|| panic!("{calls} in {stats}"))
    })
}

/// The jobs the API has published.
async fn jobs(sys: &System) -> f64 {
    metric(
        &metrics_of(sys.api_url()).await,
        "versus_jobs_published_total",
        "",
    )
}

/// The page's view of the fight: the result's state, the picture's state, whether the
/// picture's button is shown, the two names and the title.
async fn view(browser: &Browser) -> Value {
    browser
        .js("const $ = (id) => document.getElementById(id); \
             return { result: $('result').dataset.state, picture: $('picture').dataset.state, \
                      draw: !$('draw').hidden, a: $('a').value, b: $('b').value, \
                      title: $('title').textContent, cached: !$('cached').hidden, \
                      answer: $('answer').textContent };")
        .await
}

/// Waits until the page waits for Fight, then a while longer, and checks that nothing was
/// asked of anyone meanwhile: no call upstream, no job.
async fn assert_waits_for_fight(
    browser: &Browser,
    sys: &System,
    before: [u64; 3],
    jobs_before: f64,
) {
    browser
        .wait_for(
            "the page to wait for Fight",
            "document.getElementById('result')?.dataset.state === 'waiting'",
        )
        .await;
    // Long enough for anything the page would start to reach the simulator.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let view = view(browser).await;
    assert_eq!(view["result"], json!("waiting"), "{view}");
    assert_eq!(view["answer"], json!(""), "{view}");
    assert_eq!(view["picture"], json!("offered"), "{view}");
    assert_eq!(
        view["draw"],
        json!(true),
        "the picture's own button: {view}"
    );
    assert_eq!(
        calls(sys).await,
        before,
        "following a link asked for nothing (chat, image, moderation)"
    );
    assert_eq!(jobs(sys).await, jobs_before, "and published no job");
}

#[test]
fn a_link_from_another_site_starts_nothing_until_the_visitor_presses_fight() {
    run(async {
        // Slow enough to see the answer being written: 40 tokens at 20 a second.
        let sys = quick()
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "20")
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "100")
            .start()
            .await;
        let api = sys.api_url();
        let elsewhere = Elsewhere::start(api).await;
        let browser = Browser::start().await;

        // A link on another site (localhost is not 127.0.0.1's site).
        let page = elsewhere.link("localhost", "Kraken", "Leviathan", None);
        follow(&browser, &page, api).await;
        assert_waits_for_fight(&browser, &sys, [0, 0, 0], 0.0).await;
        let shown = view(&browser).await;
        assert_eq!(shown["a"], json!("Kraken"), "{shown}");
        assert_eq!(shown["b"], json!("Leviathan"), "{shown}");
        assert_eq!(shown["title"], json!("Kraken vs Leviathan"), "{shown}");
        assert_accessible(&browser, "waiting for Fight").await;
        browser.screenshot("fight-from-a-link").await;

        // Fight, from the keyboard: the answer streams, and the picture is drawn.
        browser.tab_to("fight", 10).await;
        browser.type_keys(&char::from(Key::Enter).to_string()).await;
        let (seen, text) = watch_until_done(&browser).await;
        assert!(
            seen.iter()
                .any(|partial| !partial.is_empty() && *partial != text),
            "the answer was written token by token"
        );
        assert_eq!(text, text_of(&fight(&sys, "Kraken", "Leviathan").await));
        browser
            .wait_for(
                "the picture",
                "document.getElementById('picture').dataset.state === 'ready'",
            )
            .await;
        let [chat, image, _] = calls(&sys).await;
        assert_eq!(
            (chat, image),
            (1, 1),
            "one answer and one picture, once asked"
        );

        // The linking page strips the Referer: Sec-Fetch-Site still tells. Fight, clicked.
        let before = calls(&sys).await;
        let jobs_before = jobs(&sys).await;
        let page = elsewhere.link("localhost", "Hydra", "Minotaur", Some("no-referrer"));
        follow(&browser, &page, api).await;
        assert_waits_for_fight(&browser, &sys, before, jobs_before).await;
        browser
            .find("#fight")
            .await
            .click()
            .await
            .expect("press Fight");
        let (_, text) = watch_until_done(&browser).await;
        assert_eq!(text, text_of(&fight(&sys, "Hydra", "Minotaur").await));
        // Fight draws the picture too: once it is shown, nothing of this fight is under way.
        browser
            .wait_for(
                "the picture",
                "document.getElementById('picture').dataset.state === 'ready'",
            )
            .await;
        assert_eq!(calls(&sys).await[..2], [2, 2]);

        // Another origin of the API's own site (another port of 127.0.0.1): `same-site`, but
        // not the API's origin.
        let before = calls(&sys).await;
        let jobs_before = jobs(&sys).await;
        let page = elsewhere.link("127.0.0.1", "Golem", "Yeti", None);
        follow(&browser, &page, api).await;
        assert_waits_for_fight(&browser, &sys, before, jobs_before).await;

        browser.close().await;
    });
}

#[test]
fn a_typed_address_starts_the_text_but_no_picture_until_asked() {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "100")
            .start()
            .await;
        let browser = Browser::start().await;
        // WebDriver's navigation is the browser's own, as a typed address: no Referer,
        // `Sec-Fetch-Site: none`.
        browser
            .goto(&format!("{}/?a=Phoenix&b=Dragon", sys.api_url()))
            .await;
        let (_, text) = watch_until_done(&browser).await;
        assert_eq!(text, text_of(&fight(&sys, "Phoenix", "Dragon").await));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let shown = view(&browser).await;
        assert_eq!(shown["picture"], json!("offered"), "{shown}");
        assert_eq!(shown["draw"], json!(true), "{shown}");
        assert_eq!(
            browser.find("#draw").await.text().await.expect("a label"),
            "Draw the picture"
        );
        let [chat, image, _] = calls(&sys).await;
        assert_eq!((chat, image), (1, 0), "the text, and no picture");
        assert_accessible(&browser, "picture offered").await;

        // The picture's own button, from the keyboard.
        browser.tab_to("draw", 12).await;
        browser.type_keys(&char::from(Key::Enter).to_string()).await;
        browser
            .wait_for(
                "the picture",
                "document.getElementById('picture').dataset.state === 'ready' \
                 && document.querySelector('#picture img')?.naturalWidth > 0",
            )
            .await;
        assert_eq!(calls(&sys).await[1], 1, "one picture, once asked");
        assert!(!view(&browser).await["draw"].as_bool().unwrap());

        // Opened again, typed: the stored picture is shown at once, and drawn no more.
        browser
            .goto(&format!("{}/?a=Dragon&b=Phoenix", sys.api_url()))
            .await;
        browser
            .wait_for(
                "the stored picture",
                "document.getElementById('picture').dataset.state === 'ready'",
            )
            .await;
        watch_until_done(&browser).await;
        let [chat, image, _] = calls(&sys).await;
        assert_eq!((chat, image), (1, 1));
        browser.close().await;
    });
}

#[test]
fn a_stored_fight_opened_from_another_site_shows_its_answer_and_picture_at_once() {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "50")
            .start()
            .await;
        let api = sys.api_url();
        let text = text_of(&fight(&sys, "Batman", "Superman").await);
        let picture = image_stream_url(&sys, "Batman", "Superman");
        let drawn = sse::open(picture.as_str(), None).await.collect_all().await;
        assert_eq!(drawn.last().unwrap().event, "done", "{drawn:?}");
        let before = calls(&sys).await;
        let jobs_before = jobs(&sys).await;

        // What the page is told, as the browser will ask for it.
        let page = http()
            .get(format!("{api}/?a=superman&b=batman"))
            .header("sec-fetch-site", "cross-site")
            .header("referer", "http://localhost:1/")
            .send()
            .await
            .unwrap();
        assert_eq!(page.headers()["cache-control"], "private, no-cache");
        let html = page.text().await.unwrap();
        assert!(
            html.contains("<meta name=\"versus:start\" content=\"wait\">"),
            "{html}"
        );
        assert!(html.contains("<meta name=\"versus:answer\""), "{html}");
        assert!(html.contains("<meta name=\"versus:picture\""), "{html}");

        let elsewhere = Elsewhere::start(api).await;
        let browser = Browser::start().await;
        follow(
            &browser,
            &elsewhere.link("localhost", "superman", "BATMAN", None),
            api,
        )
        .await;
        browser
            .wait_for(
                "the answer and the picture",
                "document.getElementById('result')?.dataset.state === 'done' \
                 && document.getElementById('picture').dataset.state === 'ready' \
                 && document.querySelector('#picture img')?.naturalWidth > 0",
            )
            .await;
        let shown = view(&browser).await;
        assert_eq!(shown["answer"], json!(text), "{shown}");
        assert_eq!(shown["title"], json!("Batman vs Superman"), "{shown}");
        assert_eq!(shown["cached"], json!(true), "{shown}");
        assert_eq!(shown["draw"], json!(false), "{shown}");
        assert_eq!(calls(&sys).await, before, "nothing was asked upstream");
        assert_eq!(jobs(&sys).await, jobs_before, "and no job published");
        assert_accessible(&browser, "stored fight from another site").await;
        browser.close().await;
    });
}
