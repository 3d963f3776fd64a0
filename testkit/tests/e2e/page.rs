//! The fight page at `/` in a real browser: streaming, the cache marker, validation, errors
//! with retry, the picture, and a report the API refuses.

use std::time::Duration;

use fantoccini::key::Key;
use serde_json::{Value, json};
use versus_testkit::System;

use crate::browser::{Browser, TIMEOUT};
use crate::{fight, http, quick, run, stream_url, text_of};

/// What a person sees of the answer: the result's state and the answer's text.
async fn observe(browser: &Browser) -> (String, String) {
    let seen = browser
        .js("return [document.getElementById('result').dataset.state, \
                     document.getElementById('answer').textContent];")
        .await;
    let field = |i: usize| seen[i].as_str().unwrap_or_default().to_owned();
    (field(0), field(1))
}

/// Samples the answer until the page says `done`; returns every text seen before it and the
/// final text. Panics on an error state or after the timeout.
pub(crate) async fn watch_until_done(browser: &Browser) -> (Vec<String>, String) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let (state, text) = observe(browser).await;
        match state.as_str() {
            "done" => return (seen, text),
            "error" => panic!(
                "the page shows an error: {}",
                browser
                    .find("#error-message")
                    .await
                    .text()
                    .await
                    .unwrap_or_default()
            ),
            _ => seen.push(text),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fight did not finish within {TIMEOUT:?}; last text: {:?}",
            seen.last()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Types the two names and presses Fight.
async fn fight_in_page(browser: &Browser, a: &str, b: &str) {
    browser.find("#a").await.send_keys(a).await.expect("type A");
    browser.find("#b").await.send_keys(b).await.expect("type B");
    browser
        .find("#fight")
        .await
        .click()
        .await
        .expect("press Fight");
}

async fn is_shown(browser: &Browser, id: &str) -> bool {
    browser
        .js(&format!("return !document.getElementById('{id}').hidden;"))
        .await
        == json!(true)
}

/// Makes the page record every `EventSource` it creates in `window.streams` (test code
/// wrapping the browser's own class; the page itself exposes nothing for tests).
async fn track_streams(browser: &Browser) {
    browser
        .js("window.streams = []; \
             const Native = window.EventSource; \
             window.EventSource = class extends Native { \
               constructor(url, init) { super(url, init); window.streams.push(this); } \
             }; return true;")
        .await;
}

/// How many of the recorded streams are still open (connecting or connected).
async fn open_streams(browser: &Browser) -> u64 {
    let open = browser
        .js("return window.streams.filter((s) => s.readyState !== EventSource.CLOSED).length;")
        .await;
    open.as_u64().expect("a count")
}

/// The message of the API's 400 for this matchup.
async fn api_refusal(sys: &System, a: &str, b: &str) -> String {
    let response = http()
        .get(stream_url(sys, a, b))
        .send()
        .await
        .expect("ask the API");
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("a JSON error");
    body["error"]["message"]
        .as_str()
        .expect("an error message")
        .to_owned()
}

#[test]
fn the_page_and_its_assets_are_served_and_revalidated() {
    run(async {
        let sys = quick().workers(0).start().await;
        let client = http();
        for (path, kind) in [
            ("/", "text/html"),
            ("/assets/app.js", "text/javascript"),
            ("/assets/app.css", "text/css"),
            ("/favicon.svg", "image/svg+xml"),
        ] {
            let url = format!("{}{path}", sys.api_url());
            let response = client.get(&url).send().await.expect("GET an asset");
            assert_eq!(response.status(), 200, "{path}");
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            assert!(header("content-type").starts_with(kind), "{path}");
            // The page depends on who sent the visitor (page_links.rs): browsers keep it, CDNs
            // do not.
            let cache_control = if path == "/" {
                "private, no-cache"
            } else {
                "no-cache"
            };
            assert_eq!(header("cache-control"), cache_control, "{path}");
            let etag = header("etag");
            assert!(!etag.is_empty(), "{path} has an ETag");
            let again = client
                .get(&url)
                .header("if-none-match", &etag)
                .send()
                .await
                .expect("revalidate");
            assert_eq!(again.status(), 304, "{path}");
        }
        let page = client
            .get(format!("{}/?a=Batman&b=Superman", sys.api_url()))
            .send()
            .await
            .expect("GET the page");
        let policy = page.headers()["content-security-policy"]
            .to_str()
            .expect("ASCII");
        assert!(policy.contains("script-src 'self'"), "{policy}");
        // No other site may frame it, where a visitor could press Fight without seeing it.
        assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
        assert_eq!(page.headers()["x-frame-options"], "DENY");
        // Host too: without VERSUS_PUBLIC_URL, a request from loopback has its preview's URLs
        // made from it.
        assert_eq!(
            page.headers()["vary"],
            "Sec-Fetch-Site, Sec-Fetch-Dest, Referer, Host"
        );
    });
}

#[test]
fn the_answer_grows_token_by_token_in_the_page() {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "20")
            .start()
            .await;
        let browser = Browser::start().await;
        browser.goto(&format!("{}/", sys.api_url())).await;
        fight_in_page(&browser, "Batman", "Superman").await;

        let (seen, text) = watch_until_done(&browser).await;
        let mut lengths: Vec<usize> = seen.iter().map(|t| t.chars().count()).collect();
        lengths.dedup();
        lengths.retain(|&n| n > 0);
        assert!(
            lengths.len() >= 3 && lengths.is_sorted(),
            "the text grew in steps before done, not at once: lengths seen {lengths:?}"
        );
        assert!(
            seen.iter()
                .all(|partial| text.starts_with(partial.as_str())),
            "every partial text is a prefix of the answer"
        );
        let served = text_of(&fight(&sys, "Batman", "Superman").await);
        assert_eq!(text, served, "the page holds the answer, each token once");
        assert!(
            !is_shown(&browser, "cached").await,
            "a fresh answer is not marked cached"
        );
        assert_eq!(
            browser
                .js("return document.getElementById('answer').getAttribute('aria-live');")
                .await,
            json!("polite")
        );
        let url = browser.client.current_url().await.expect("the page's URL");
        assert_eq!(
            url.query(),
            Some("a=Batman&b=Superman"),
            "the URL names the fight"
        );

        let shot = browser.screenshot("fight").await;
        eprintln!("screenshot: {}", shot.display());
        // On a phone, nothing is wider than the screen.
        browser
            .client
            .set_window_size(390, 844)
            .await
            .expect("resize");
        assert_eq!(
            browser
                .js("return document.documentElement.scrollWidth <= window.innerWidth;")
                .await,
            json!(true),
            "the page fits a phone's width"
        );
        browser.screenshot("fight-phone").await;
        browser.close().await;
    });
}

#[test]
fn the_same_fight_again_is_marked_cached_and_shown_whole() {
    run(async {
        let sys = quick().start().await;
        let first = text_of(&fight(&sys, "Godzilla", "King Kong").await);
        assert!(!first.is_empty());
        let browser = Browser::start().await;
        browser.goto(&format!("{}/", sys.api_url())).await;
        fight_in_page(&browser, "Godzilla", "King Kong").await;

        let (seen, text) = watch_until_done(&browser).await;
        assert_eq!(text, first);
        assert!(
            seen.iter().all(|t| t.is_empty() || *t == first),
            "a hit arrives whole, never in pieces: {seen:?}"
        );
        assert!(is_shown(&browser, "cached").await, "the hit is marked");
        assert_eq!(
            browser.find("#cached").await.text().await.expect("badge"),
            "served from cache"
        );

        // A shared link, typed, names the same fight, in either order, and starts it on load.
        browser
            .goto(&format!("{}/?a=King+Kong&b=Godzilla", sys.api_url()))
            .await;
        let (_, text) = watch_until_done(&browser).await;
        assert_eq!(text, first);
        assert!(is_shown(&browser, "cached").await);
        let names = browser
            .js("return [document.getElementById('a').value, \
                 document.getElementById('b').value];")
            .await;
        assert_eq!(names, json!(["King Kong", "Godzilla"]));
        assert_eq!(sys.sim.chat_calls().await, 1, "hits cost no upstream call");
        browser.close().await;
    });
}

#[test]
fn an_invalid_name_shows_the_apis_message_and_opens_no_stream() {
    run(async {
        let sys = quick().start().await;
        let browser = Browser::start().await;
        browser.goto(&format!("{}/", sys.api_url())).await;
        track_streams(&browser).await;

        // Enter in the first field submits the form with the second one empty.
        let enter = char::from(Key::Enter).to_string();
        browser
            .find("#a")
            .await
            .send_keys(&format!("Batman{enter}"))
            .await
            .expect("type and press Enter");
        browser
            .wait_for(
                "the validation message",
                "!document.getElementById('form-error').hidden",
            )
            .await;
        let shown = browser
            .find("#form-error")
            .await
            .text()
            .await
            .expect("text");
        assert_eq!(
            shown,
            api_refusal(&sys, "Batman", "").await.replace('`', "")
        );
        assert_eq!(
            browser
                .js("return document.getElementById('b').getAttribute('aria-invalid');")
                .await,
            json!("true"),
            "the empty field is marked"
        );
        assert_eq!(
            browser.js("return document.activeElement.id;").await,
            json!("b"),
            "focus moves to the field to fix"
        );

        // A name that is too long, too.
        let long = "x".repeat(101);
        browser
            .find("#b")
            .await
            .send_keys(&format!("{long}{enter}"))
            .await
            .expect("type");
        browser
            .wait_for(
                "the message about the long name",
                "document.getElementById('form-error').textContent.includes('longer')",
            )
            .await;
        let shown = browser
            .find("#form-error")
            .await
            .text()
            .await
            .expect("text");
        assert_eq!(
            shown,
            api_refusal(&sys, "Batman", &long).await.replace('`', "")
        );

        assert!(
            !is_shown(&browser, "result").await,
            "no answer area for a refused fight"
        );
        assert_eq!(
            browser.js("return window.streams.length;").await,
            json!(0),
            "no stream was opened"
        );
        let url = browser.client.current_url().await.expect("the page's URL");
        assert_eq!(url.query(), None, "a refused fight is not put in the URL");
        assert_eq!(sys.sim.chat_calls().await, 0);
        browser.close().await;
    });
}

#[test]
fn a_failed_fight_shows_the_error_and_retry_finishes_it_once_the_upstream_recovers() {
    run(async {
        let sys = quick()
            .worker_env("VERSUS_UPSTREAM_MAX_TRIES", "1")
            .start()
            .await;
        sys.sim.fail_every_chat().await;
        let browser = Browser::start().await;
        // Opening a typed address starts the fight.
        browser
            .goto(&format!("{}/?a=Tortoise&b=Hare", sys.api_url()))
            .await;
        browser
            .wait_for(
                "the error",
                "document.getElementById('result').dataset.state === 'error'",
            )
            .await;
        assert!(is_shown(&browser, "error").await);
        let message = browser
            .find("#error-message")
            .await
            .text()
            .await
            .expect("text");
        assert!(!message.trim().is_empty(), "the error is said in words");
        assert!(
            is_shown(&browser, "retry").await,
            "a retryable error offers a retry"
        );
        browser.screenshot("fight-error").await;

        sys.sim.clear_faults().await;
        browser
            .find("#retry")
            .await
            .click()
            .await
            .expect("press Retry");
        let (_, text) = watch_until_done(&browser).await;
        assert_eq!(text, text_of(&fight(&sys, "Tortoise", "Hare").await));
        assert!(!is_shown(&browser, "error").await, "the error is gone");
        browser.close().await;
    });
}

#[test]
fn a_dropped_connection_resumes_without_repeating_text() {
    run(async {
        // The API listens on a fixed port, so that its replacement serves the same origin.
        let port = versus_testkit::free_port();
        let mut sys = quick()
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "10")
            .sim_env("VERSUS_SIM_ANSWER_TOKENS", "60")
            .api_env("VERSUS_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .start()
            .await;
        let browser = Browser::start().await;
        browser
            .goto(&format!("{}/?a=Bruce+Lee&b=Chuck+Norris", sys.api_url()))
            .await;
        browser
            .wait_for(
                "the answer to be under way",
                "document.getElementById('answer').textContent.length > 20",
            )
            .await;

        sys.api.kill().await;
        browser
            .wait_for(
                "the page to notice the lost connection",
                "document.getElementById('status').textContent.includes('reconnecting')",
            )
            .await;
        let (_, before) = observe(&browser).await;
        sys.api = sys.spawn_api().await;

        let (seen, text) = watch_until_done(&browser).await;
        assert!(
            seen.iter().chain([&text]).all(|t| t.starts_with(&before)),
            "the text held before the drop was kept, not restarted"
        );
        assert_eq!(
            text,
            text_of(&fight(&sys, "Bruce Lee", "Chuck Norris").await),
            "after the resume the page holds the answer, each token once"
        );
        assert_eq!(sys.sim.chat_calls().await, 1);
        browser.close().await;
    });
}

#[test]
fn a_new_fight_closes_the_streams_of_the_last_one() {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "20")
            .start()
            .await;
        let browser = Browser::start().await;
        browser.goto(&format!("{}/", sys.api_url())).await;
        track_streams(&browser).await;
        fight_in_page(&browser, "Cat", "Mouse").await;
        browser
            .wait_for(
                "the first answer to begin",
                "document.getElementById('answer').textContent.length > 0",
            )
            .await;

        for id in ["#a", "#b"] {
            browser.find(id).await.clear().await.expect("clear a name");
        }
        fight_in_page(&browser, "Shark", "Octopus").await;
        let opened = browser.js("return window.streams.length;").await;
        assert_eq!(opened, json!(4), "a text and a picture stream per fight");
        assert!(
            open_streams(&browser).await <= 2,
            "at most two streams are open"
        );

        let (_, text) = watch_until_done(&browser).await;
        assert_eq!(text, text_of(&fight(&sys, "Shark", "Octopus").await));
        assert_eq!(
            browser.find("#title").await.text().await.expect("title"),
            "Shark vs Octopus"
        );
        let url = browser.client.current_url().await.expect("the page's URL");
        assert_eq!(url.query(), Some("a=Shark&b=Octopus"));
        // Finished streams are closed, not left to reconnect.
        browser
            .wait_for(
                "every stream to be closed",
                "window.streams.every((s) => s.readyState === EventSource.CLOSED)",
            )
            .await;
        browser.close().await;
    });
}

/// Waits on the pictures (`/v1/images/stream`): until they land, the page says "picture
/// unavailable" and this test fails. Loading an address never draws a picture: the visitor
/// asks with the picture's own button (or Fight).
#[test]
fn the_picture_appears_when_it_is_drawn() {
    run(async {
        let sys = quick().start().await;
        let browser = Browser::start().await;
        browser
            .goto(&format!("{}/?a=Batman&b=Superman", sys.api_url()))
            .await;
        browser
            .wait_for(
                "the picture's own button",
                "!document.getElementById('draw').hidden",
            )
            .await;
        browser
            .find("#draw")
            .await
            .click()
            .await
            .expect("press Draw the picture");
        browser
            .wait_for(
                "the picture to be drawn or given up",
                "['ready', 'unavailable']\
                 .includes(document.getElementById('picture').dataset.state)",
            )
            .await;
        let picture = browser
            .js("const p = document.getElementById('picture'); \
                 const img = p.querySelector('img'); \
                 return [p.dataset.state, img ? img.naturalWidth : 0, p.textContent.trim()];")
            .await;
        assert_eq!(
            picture[0],
            json!("ready"),
            "the picture was not shown: {picture}"
        );
        assert!(
            picture[1].as_u64().unwrap_or(0) > 0,
            "the picture loaded: {picture}"
        );
        watch_until_done(&browser).await;
        browser.screenshot("fight-with-picture").await;
        browser.close().await;
    });
}

#[test]
fn a_client_over_its_limit_is_told_in_the_page_when_to_try_again() {
    run(async {
        let sys = quick()
            .api_env("VERSUS_CLIENT_MISSES_PER_MINUTE", "1")
            .start()
            .await;
        let browser = Browser::start().await;
        browser
            .goto(&format!("{}/?a=Tortoise&b=Hare", sys.api_url()))
            .await;
        watch_until_done(&browser).await;
        browser
            .js("for (const id of ['a', 'b']) document.getElementById(id).value = ''; return true;")
            .await;
        fight_in_page(&browser, "Achilles", "Hector").await;
        browser
            .wait_for(
                "the refusal",
                "document.getElementById('result').dataset.state === 'error'",
            )
            .await;
        let message = browser
            .find("#error-message")
            .await
            .text()
            .await
            .expect("text");
        assert!(
            message.contains("try again in") && message.chars().any(|c| c.is_ascii_digit()),
            "the page says when to try again: {message:?}"
        );
        assert!(is_shown(&browser, "retry").await, "and offers to");
        browser.screenshot("fight-rate-limited").await;
        assert_eq!(sys.sim.chat_calls().await, 1);
        browser.close().await;
    });
}

#[test]
fn a_report_the_api_refuses_is_explained_and_the_form_stays_open() {
    run(async {
        const TOKEN: &str = "t0ken-for-the-page-0123456789abcdef";
        let sys = quick().env("VERSUS_ADMIN_TOKEN", TOKEN).start().await;
        let browser = Browser::start().await;
        browser
            .goto(&format!("{}/?a=Cat&b=Dog", sys.api_url()))
            .await;
        watch_until_done(&browser).await;
        assert!(
            is_shown(&browser, "report-answer").await,
            "a finished answer can be reported"
        );
        assert!(
            !is_shown(&browser, "report-picture").await,
            "no picture, nothing to report"
        );

        // The answer is purged while the page shows it: there is nothing left to report.
        let key = fight(&sys, "Cat", "Dog").await[0].json()["key"]
            .as_str()
            .unwrap()
            .to_owned();
        let purged = http()
            .delete(format!("{}/v1/admin/fights/{key}", sys.api_url()))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(purged.status(), 204);
        let refusal = http()
            .post(format!("{}/v1/fights/{key}/report", sys.api_url()))
            .json(&json!({"reason": "poor"}))
            .send()
            .await
            .unwrap();
        assert_eq!(refusal.status(), 404);
        let refusal: Value = refusal.json().await.unwrap();
        let message = refusal["error"]["message"].as_str().unwrap().to_owned();

        browser
            .find("#report-answer-open")
            .await
            .click()
            .await
            .unwrap();
        // Send without a reason: the page asks for one and sends nothing.
        browser
            .find("#report-answer-send")
            .await
            .click()
            .await
            .unwrap();
        let note = "document.getElementById('report-answer-note').textContent";
        assert_eq!(
            browser.js(&format!("return {note};")).await,
            json!("Choose a reason first.")
        );
        browser
            .find("#report-answer-form label:nth-of-type(3)")
            .await
            .click()
            .await
            .unwrap();
        browser
            .find("#report-answer-send")
            .await
            .click()
            .await
            .unwrap();
        browser
            .wait_for(
                "the refusal",
                &format!("{note} !== 'Choose a reason first.'"),
            )
            .await;
        let seen = browser
            .js(&format!(
                "return [{note}, document.getElementById('report-answer-form').hidden, \
                         document.querySelector('input[name=answer-reason]:checked')?.value, \
                         document.getElementById('report-answer-open').textContent];"
            ))
            .await;
        assert_eq!(
            seen,
            json!([message, false, "poor", "Report this answer"]),
            "the API's words, with the form and its choice kept"
        );
        browser.close().await;
    });
}
