//! The page as everyone uses it: no accessibility violation that Deque's axe-core finds (WCAG
//! 2.1 A and AA, and best practices) in any state a person sees, on a desktop and a phone, in
//! the light and the dark colour scheme, and every control reachable and usable from the
//! keyboard.

use fantoccini::key::Key;
use serde_json::{Value, json};

use crate::browser::Browser;
use crate::{quick, run};

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
