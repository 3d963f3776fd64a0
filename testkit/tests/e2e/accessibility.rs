//! The page as everyone uses it: no accessibility violation that Deque's axe-core finds (WCAG
//! 2.1 A and AA, and best practices) in any state a person sees, on a desktop and a phone, in
//! the light and the dark colour scheme, and every control reachable and usable from the
//! keyboard, the Report controls included.

use std::time::Duration;

use fantoccini::key::Key;
use serde_json::{Value, json};
use versus_testkit::eventually;

use crate::browser::Browser;
use crate::{fight, http, json_of, quick, run};

/// Fails with axe-core's findings, if any, in `state`.
pub(crate) async fn assert_accessible(browser: &Browser, state: &str) {
    let violations = browser.accessibility_violations().await;
    if !violations.is_empty() {
        browser.screenshot(&format!("a11y-{state}")).await;
    }
    assert!(
        violations.is_empty(),
        "accessibility violations in the {state} page: {:#}",
        Value::Array(violations)
    );
}

async fn result_state(browser: &Browser) -> Value {
    browser
        .js("return document.getElementById('result').dataset.state;")
        .await
}

/// Chromium's flag for the dark colour scheme (`prefers-color-scheme: dark`).
const DARK: &str = "--blink-settings=preferredColorScheme=0";

#[test]
fn every_state_of_the_page_passes_axe_core_on_a_desktop_and_a_phone() {
    run(async {
        // Slow enough to catch the answer being written: 40 tokens at 20 a second.
        let sys = quick()
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "20")
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "100")
            .start()
            .await;
        let light = Browser::start().await;
        let dark = Browser::start_with(&[DARK]).await;
        let scheme = dark
            .js("return matchMedia('(prefers-color-scheme: dark)').matches;")
            .await;
        assert_eq!(
            scheme,
            json!(true),
            "the dark browser prefers the dark scheme"
        );
        let runs = [
            (&light, "desktop", 1280, 900, ("Batman", "Superman")),
            (&light, "phone", 390, 844, ("Godzilla", "King Kong")),
            (&dark, "dark desktop", 1280, 900, ("Tortoise", "Hare")),
            (&dark, "dark phone", 390, 844, ("Cat", "Dog")),
        ];
        for (browser, layout, width, height, (a, b)) in runs {
            browser
                .client
                .set_window_size(width, height)
                .await
                .unwrap_or_else(|e| panic!("resize the window: {e}"));
            browser.goto(&format!("{}/", sys.api_url())).await;
            assert_accessible(browser, &format!("{layout} empty")).await;

            // A new fight each time, so that every one streams.
            browser.tab_to("a", 10).await;
            browser.type_keys(a).await;
            browser.tab_to("b", 3).await;
            browser.type_keys(b).await;
            browser.type_keys(&char::from(Key::Enter).to_string()).await;
            browser
                .wait_for(
                    "the answer being written",
                    "document.getElementById('result').dataset.state === 'streaming' \
                     && document.getElementById('answer').textContent.length > 0",
                )
                .await;
            assert_accessible(browser, &format!("{layout} streaming")).await;

            browser
                .wait_for(
                    "the answer and its picture",
                    "document.getElementById('result').dataset.state === 'done' \
                     && document.getElementById('picture').dataset.state === 'ready'",
                )
                .await;
            assert_accessible(browser, &format!("{layout} finished")).await;
            browser
                .screenshot(&format!("a11y-{}-finished", layout.replace(' ', "-")))
                .await;
        }
        light.close().await;
        dark.close().await;
    });
}

#[test]
fn an_error_passes_axe_core_and_retry_works_from_the_keyboard() {
    run(async {
        let sys = quick()
            .worker_env("VERSUS_UPSTREAM_MAX_TRIES", "1")
            .start()
            .await;
        sys.sim.fail_every_chat().await;
        let browser = Browser::start().await;
        browser.goto(&format!("{}/", sys.api_url())).await;
        browser.tab_to("a", 10).await;
        browser.type_keys("Tortoise").await;
        browser.tab_to("b", 3).await;
        browser.type_keys("Hare").await;
        // The Fight button itself, from the keyboard.
        browser.tab_to("fight", 3).await;
        browser.type_keys(&char::from(Key::Enter).to_string()).await;
        browser
            .wait_for(
                "the error",
                "document.getElementById('result').dataset.state === 'error'",
            )
            .await;
        assert_accessible(&browser, "error").await;

        sys.sim.clear_faults().await;
        browser.tab_to("retry", 12).await;
        browser.type_keys(&char::from(Key::Enter).to_string()).await;
        browser
            .wait_for(
                "the answer after Retry",
                "document.getElementById('result').dataset.state === 'done'",
            )
            .await;
        assert_eq!(result_state(&browser).await, json!("done"));
        assert_eq!(
            sys.sim.chat_calls().await,
            2,
            "the failed call, then the retried one"
        );
        browser.close().await;
    });
}

/// The key pressed alone, as WebDriver types it.
fn key(key: Key) -> String {
    char::from(key).to_string()
}

/// `[id, name, value, checked]` of the focused element.
async fn focused(browser: &Browser) -> Value {
    browser
        .js("const e = document.activeElement; \
             return [e?.id ?? '', e?.name ?? '', e?.value ?? '', Boolean(e?.checked)];")
        .await
}

/// The report of `kind` and `key` in `GET /v1/admin/reports`, if listed.
async fn listed_report(api: &str, token: &str, kind: &str, key: &str) -> Option<Value> {
    let list = json_of(
        http()
            .get(format!("{api}/v1/admin/reports"))
            .bearer_auth(token),
    )
    .await;
    list["reports"]
        .as_array()?
        .iter()
        .find(|r| r["kind"] == json!(kind) && r["key"] == json!(key))
        .cloned()
}

/// The report of `kind` and `key` in `GET /v1/admin/reports`, once it is there.
async fn admin_report(api: &str, token: &str, kind: &str, key: &str) -> Value {
    eventually(
        "the report in the admin list",
        Duration::from_secs(10),
        || async { listed_report(api, token, kind, key).await.is_some() },
    )
    .await;
    listed_report(api, token, kind, key)
        .await
        .expect("the report is listed")
}

#[test]
fn the_answer_and_the_picture_are_reported_from_the_keyboard_and_the_form_passes_axe_core() {
    run(async {
        const TOKEN: &str = "t0ken-for-the-reports-0123456789abcdef";
        let sys = quick()
            .env("VERSUS_ADMIN_TOKEN", TOKEN)
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "100")
            .start()
            .await;
        let browser = Browser::start().await;
        browser.goto(&format!("{}/", sys.api_url())).await;
        browser.tab_to("a", 10).await;
        browser.type_keys("Tortoise").await;
        browser.tab_to("b", 3).await;
        browser.type_keys("Hare").await;
        browser.type_keys(&key(Key::Enter)).await;
        browser
            .wait_for(
                "the answer and its picture",
                "document.getElementById('result').dataset.state === 'done' \
                 && document.getElementById('picture').dataset.state === 'ready'",
            )
            .await;
        let answer = browser
            .js("return document.getElementById('answer').textContent;")
            .await;

        // The answer's Report control comes right after the Fight button.
        browser.tab_to("report-answer-open", 3).await;
        browser.type_keys(&key(Key::Enter)).await;
        assert_eq!(
            focused(&browser).await,
            json!(["", "answer-reason", "unsafe", false]),
            "the focus moves to the first reason, none chosen yet"
        );
        assert_eq!(
            browser
                .js("return document.getElementById('report-answer-open').ariaExpanded;")
                .await,
            json!("true")
        );
        // Escape closes the form, and the focus goes back to the control; Space opens it again.
        browser.type_keys(&key(Key::Escape)).await;
        assert_eq!(focused(&browser).await[0], json!("report-answer-open"));
        assert_eq!(
            browser
                .js("return document.getElementById('report-answer-form').hidden;")
                .await,
            json!(true)
        );
        browser.type_keys(" ").await;
        // The reasons are one radio group: an arrow key chooses the next one.
        browser.type_keys(&key(Key::Down)).await;
        assert_eq!(
            focused(&browser).await,
            json!(["", "answer-reason", "wrong", true])
        );
        // Tab leaves the group for Send.
        browser.tab_to("report-answer-send", 1).await;
        assert_accessible(&browser, "report form open").await;
        browser.screenshot("report-form-open").await;

        browser.type_keys(&key(Key::Enter)).await;
        browser
            .wait_for(
                "the thanks",
                "document.getElementById('report-answer-note').textContent \
                 === 'Thanks — reported.'",
            )
            .await;
        let after = browser
            .js("return [document.activeElement.id, \
                         document.getElementById('report-answer-form').hidden, \
                         document.getElementById('report-answer-note').getAttribute('role'), \
                         document.getElementById('answer').textContent];")
            .await;
        assert_eq!(
            after,
            json!(["report-answer-open", true, "status", answer]),
            "the form closes, the focus is back on the control, the thanks is in a polite \
             live region, and the answer stays on screen"
        );
        assert_accessible(&browser, "answer reported").await;

        // The server counted it, once for this client.
        let text_key = fight(&sys, "Tortoise", "Hare").await[0].json()["key"]
            .as_str()
            .unwrap()
            .to_owned();
        let listed = admin_report(sys.api_url(), TOKEN, "text", &text_key).await;
        assert_eq!(listed["counts"]["wrong"], json!(1), "{listed}");
        assert_eq!(listed["counts"]["unsafe"], json!(0), "{listed}");
        let again = browser
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 fetch(`/v1/fights/${arguments[0]}/report`, { method: 'POST',
                     headers: { 'Content-Type': 'application/json' },
                     body: JSON.stringify({ reason: 'wrong' }) })
                   .then(async (r) => done([r.status, await r.json()]))
                   .catch((e) => done(String(e)));",
                vec![json!(text_key)],
            )
            .await
            .unwrap();
        assert_eq!(again, json!([202, {"counted": false}]));

        // The stored picture of a page loaded again (its URL from the page's head) is reported
        // the same way: Space chooses the focused reason, Space on Send sends.
        browser
            .goto(&format!("{}/?a=Tortoise&b=Hare", sys.api_url()))
            .await;
        browser
            .wait_for(
                "the stored picture and its Report control",
                "document.getElementById('picture').dataset.state === 'ready' \
                 && !document.getElementById('report-picture').hidden",
            )
            .await;
        browser.tab_to("report-picture-open", 10).await;
        browser.type_keys(&key(Key::Enter)).await;
        browser.type_keys(" ").await;
        assert_eq!(
            focused(&browser).await,
            json!(["", "picture-reason", "unsafe", true])
        );
        browser.tab_to("report-picture-send", 1).await;
        assert_accessible(&browser, "picture report form open").await;
        browser.type_keys(" ").await;
        browser
            .wait_for(
                "the thanks for the picture",
                "document.getElementById('report-picture-note').textContent \
                 === 'Thanks — reported.'",
            )
            .await;
        assert_eq!(focused(&browser).await[0], json!("report-picture-open"));
        let src = browser
            .js("return document.querySelector('#picture img').src;")
            .await;
        let file = src.as_str().unwrap().rsplit('/').next().unwrap().to_owned();
        let image_key = &file[..32];
        let listed = admin_report(sys.api_url(), TOKEN, "image", image_key).await;
        assert_eq!(listed["counts"]["unsafe"], json!(1), "{listed}");
        assert_eq!(listed["a"], json!("Tortoise"), "{listed}");
        browser.close().await;
    });
}

/// The form's height, in CSS pixels.
async fn form_height(browser: &Browser) -> Value {
    browser
        .js("return document.getElementById('fight-form').getBoundingClientRect().height;")
        .await
}

#[test]
fn suggestions_open_as_one_types_are_picked_from_the_keyboard_and_pass_axe_core() {
    run(async {
        let sys = quick().start().await;
        for (a, b) in [("Spider-Man", "Hulk"), ("Spider-Woman", "Thor")] {
            let events = fight(&sys, a, b).await;
            assert_eq!(events.last().unwrap().event, "done", "{events:?}");
        }
        // The API's index has both names (it is built again within a second of a change).
        let url = format!("{}/v1/names/suggest?q=spid", sys.api_url());
        eventually(
            "both names are suggested",
            Duration::from_secs(10),
            || async {
                json_of(http().get(&url)).await["names"] == json!(["Spider-Man", "Spider-Woman"])
            },
        )
        .await;

        let browser = Browser::start().await;
        browser.goto(&format!("{}/", sys.api_url())).await;
        let closed_height = form_height(&browser).await;
        browser.tab_to("a", 10).await;
        browser.type_keys("spid").await;
        browser
            .wait_for(
                "the suggestions",
                "!document.getElementById('a-suggestions').hidden && \
                 document.querySelectorAll('#a-suggestions [role=option]').length === 2",
            )
            .await;
        let combo = "const a = document.getElementById('a'); \
                     return [a.getAttribute('aria-expanded'), \
                             a.getAttribute('aria-activedescendant'), a.value, \
                             [...document.querySelectorAll('#a-suggestions [role=option]')] \
                               .map((o) => [o.textContent, o.getAttribute('aria-selected')])];";
        assert_eq!(
            browser.js(combo).await,
            json!([
                "true",
                null,
                "spid",
                [["Spider-Man", "false"], ["Spider-Woman", "false"]]
            ])
        );
        assert_eq!(
            form_height(&browser).await,
            closed_height,
            "the open list moves nothing"
        );
        assert_accessible(&browser, "suggestions").await;

        // Down, down, up: the first name; Enter picks it and sends nothing.
        let moves = [Key::Down, Key::Down, Key::Up].map(key).concat();
        browser.type_keys(&moves).await;
        assert_eq!(
            browser.js(combo).await,
            json!([
                "true",
                "a-suggestion-0",
                "spid",
                [["Spider-Man", "true"], ["Spider-Woman", "false"]]
            ])
        );
        assert_accessible(&browser, "suggestions with an option chosen").await;
        browser.type_keys(&key(Key::Enter)).await;
        assert_eq!(
            browser.js(combo).await,
            json!(["false", null, "Spider-Man", []])
        );
        assert_eq!(
            browser
                .js("return document.getElementById('result').hidden;")
                .await,
            json!(true),
            "picking a name does not send the form"
        );
        assert_eq!(focused(&browser).await[0], json!("a"));

        // Escape closes the list, and the name typed stays.
        browser.tab_to("b", 3).await;
        browser.type_keys("hul").await;
        browser
            .wait_for(
                "the suggestions of b",
                "!document.getElementById('b-suggestions').hidden",
            )
            .await;
        browser.type_keys(&key(Key::Escape)).await;
        assert_eq!(
            browser
                .js("const b = document.getElementById('b'); \
                     return [document.getElementById('b-suggestions').hidden, \
                             b.getAttribute('aria-expanded'), b.value];")
                .await,
            json!([true, "false", "hul"])
        );

        // A click picks a name too.
        browser.type_keys("k").await;
        browser
            .wait_for(
                "the suggestions of b again",
                "!document.getElementById('b-suggestions').hidden",
            )
            .await;
        browser.find("#b-suggestion-0").await.click().await.unwrap();
        assert_eq!(
            browser
                .js("const b = document.getElementById('b'); \
                     return [document.getElementById('b-suggestions').hidden, b.value, \
                             document.activeElement.id];")
                .await,
            json!([true, "Hulk", "b"])
        );
        browser.close().await;
    });
}
