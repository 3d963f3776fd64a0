//! Degraded answers as the API serves them (issue 31): an answer a fallback provider made, which
//! a worker stores under the fight's key with `degraded_until_ms`, written here straight into
//! the answers bucket as the admin user, as a worker would. Until its time it is a hit whose
//! `meta`, `done` and JSON bodies name the fallback's model and say `degraded: true`; it is
//! never kept in an API replica's memory, so the primary's answer, written over it, is served
//! at the very next request; past its time it is a miss, which a new generation answers. The
//! page says "Answered by MODEL" under such an answer, and "Drawn by MODEL" under such a
//! picture, and passes axe-core so.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::Serialize;
use serde_json::{Value, json};
use versus_shared::{
    key::{Key, Matchup},
    prompt::TEXT_PROMPT_VERSION,
    wire::{self, Answer, ImageAnswer, Kind},
};
use versus_testkit::System;

use crate::accessibility::assert_accessible;
use crate::browser::Browser;
use crate::{fight_at, http, json_of, metric, metrics_of, quick, run, shape, text_of};

/// The model the workers write text with (the default): the primary's.
const PRIMARY: &str = "gpt-4o-mini";
/// The model of a fallback provider, as a worker would record it.
const FALLBACK: &str = "fallback-chat";
const FALLBACK_IMAGE: &str = "fallback-image";

/// Chromium's flag for the dark colour scheme (`prefers-color-scheme: dark`).
const DARK: &str = "--blink-settings=preferredColorScheme=0";

/// The key of `a` vs `b`'s text answer, as every replica derives it.
fn text_key(a: &str, b: &str) -> Key {
    Matchup::parse(Some(a), Some(b))
        .unwrap()
        .key(Kind::Text, TEXT_PROMPT_VERSION, PRIMARY)
}

/// The answers bucket, as the admin user (who may write it).
async fn answers_bucket(sys: &System) -> kv::Store {
    jetstream::new(sys.admin_client().await)
        .get_key_value(wire::ANSWERS_BUCKET)
        .await
        .expect("the answers bucket")
}

async fn put(answers: &kv::Store, entry: String, value: &impl Serialize) {
    answers
        .put(entry, serde_json::to_vec(value).unwrap().into())
        .await
        .expect("write the answers bucket");
}

/// Stores `text` as `a` vs `b`'s answer, written by `model` in `attempt`, degraded until
/// `degraded_until_ms` when set.
async fn store_text(
    answers: &kv::Store,
    (a, b): (&str, &str),
    text: &str,
    model: &str,
    attempt: i32,
    degraded_until_ms: Option<u64>,
) -> Key {
    let key = text_key(a, b);
    let answer = Answer {
        key: key.clone(),
        a: a.to_owned(),
        b: b.to_owned(),
        text: text.to_owned(),
        model: model.to_owned(),
        attempt,
        degraded_until_ms,
    };
    put(answers, wire::kv_key(Kind::Text, &key), &answer).await;
    key
}

/// Asserts that `data` (a hit's `meta`, a `done`, a JSON body) names `model` and says whether
/// it is `degraded`.
#[track_caller]
fn assert_by(data: &Value, model: &str, degraded: bool) {
    assert_eq!(data["model"], json!(model), "{data}");
    assert_eq!(data["degraded"], json!(degraded), "{data}");
}

/// `GET /v1/fights/{key}` at `api`: its status, `Cache-Control` and body (null if not JSON).
async fn by_key(api: &str, key: &Key) -> (u16, String, Value) {
    let response = http()
        .get(format!("{api}/v1/fights/{key}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let cache_control = response
        .headers()
        .get("cache-control")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (
        status,
        cache_control,
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn post_fight(api: &str, a: &str, b: &str) -> Value {
    json_of(
        http()
            .post(format!("{api}/v1/fights"))
            .json(&json!({"a": a, "b": b})),
    )
    .await
}

/// Text hits this API served from its memory.
async fn memory_hits(api: &str) -> f64 {
    metric(
        &metrics_of(api).await,
        "versus_cache_hits_total",
        "layer=\"memory\"",
    )
}

#[test]
fn a_degraded_answer_is_a_hit_naming_its_model_and_the_primarys_written_over_it_is_served_at_once()
{
    run(async {
        let sys = quick().start().await;
        let api = sys.api_url();
        let answers = answers_bucket(&sys).await;
        let names = ("Tortoise", "Hare");
        let until = wire::unix_ms() + 300_000;
        let key = store_text(
            &answers,
            names,
            "A stand-in answer.",
            FALLBACK,
            7,
            Some(until),
        )
        .await;

        // A hit, which says who answered, in `meta` and `done`, whole.
        for _ in 0..3 {
            let events = fight_at(api, names.0, names.1).await;
            assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
            let meta = events[0].json();
            assert_eq!(meta["cached"], json!(true), "{meta}");
            assert_by(&meta, FALLBACK, true);
            assert_by(&events.last().unwrap().json(), FALLBACK, true);
            assert_eq!(text_of(&events), "A stand-in answer.");
        }
        let posted = post_fight(api, names.0, names.1).await;
        assert_by(&posted, FALLBACK, true);
        assert_eq!(posted["cached"], json!(true), "{posted}");
        assert_eq!(posted["text"], json!("A stand-in answer."), "{posted}");
        let (status, cache_control, body) = by_key(api, &key).await;
        assert_eq!(status, 200, "{body}");
        assert_by(&body, FALLBACK, true);
        assert_eq!(
            cache_control, "public, no-cache",
            "browsers and CDNs ask again before serving a degraded answer"
        );

        // Every one of those was read from the bucket: none was kept in memory.
        let metrics = metrics_of(api).await;
        assert_eq!(
            metric(&metrics, "versus_cache_hits_total", "layer=\"memory\""),
            0.0,
            "a degraded answer is never kept in memory"
        );
        assert!(
            metric(&metrics, "versus_cache_degraded_total", "use=\"served\"") >= 5.0,
            "{metrics}"
        );

        // The primary's answer written over it (as a worker's upgrade does): the very next
        // request at the same replica serves it, and says it is not degraded.
        store_text(&answers, names, "The primary's answer.", PRIMARY, 8, None).await;
        let events = fight_at(api, names.0, names.1).await;
        assert_eq!(text_of(&events), "The primary's answer.", "{events:?}");
        assert_by(&events[0].json(), PRIMARY, false);
        assert_by(&events.last().unwrap().json(), PRIMARY, false);
        let (status, cache_control, body) = by_key(api, &key).await;
        assert_eq!(status, 200, "{body}");
        assert_by(&body, PRIMARY, false);
        assert_eq!(cache_control, "public, max-age=300, s-maxage=86400");
        // That one is kept: the next hit comes from memory.
        let before = memory_hits(api).await;
        let events = fight_at(api, names.0, names.1).await;
        assert_eq!(text_of(&events), "The primary's answer.");
        assert!(
            memory_hits(api).await > before,
            "the primary's answer is kept"
        );
        assert_eq!(sys.sim.chat_calls().await, 0, "hits call no upstream");
    });
}

#[test]
fn a_degraded_answer_past_its_time_is_a_miss_which_a_new_generation_answers() {
    run(async {
        let sys = quick().start().await;
        let api = sys.api_url();
        let answers = answers_bucket(&sys).await;
        let names = ("Cat", "Dog");
        let lasts = Duration::from_secs(3);
        let until = wire::unix_ms() + lasts.as_millis() as u64;
        let key = store_text(
            &answers,
            names,
            "A stand-in answer.",
            FALLBACK,
            1,
            Some(until),
        )
        .await;
        let events = fight_at(api, names.0, names.1).await;
        assert_eq!(events[0].json()["cached"], json!(true), "{events:?}");
        assert_by(&events[0].json(), FALLBACK, true);

        // Past its time: the bucket still holds it, but no route serves it.
        let wait = Duration::from_millis(until.saturating_sub(wire::unix_ms()) + 100);
        tokio::time::sleep(wait).await;
        let (status, _, body) = by_key(api, &key).await;
        assert_eq!(status, 404, "{body}");
        let metrics = metrics_of(api).await;
        assert!(
            metric(&metrics, "versus_cache_degraded_total", "use=\"expired\"") >= 1.0,
            "{metrics}"
        );

        // A miss, whose `meta` knows nothing of a model yet; a new generation answers it, by
        // the primary, and that answer is then a hit.
        let events = fight_at(api, names.0, names.1).await;
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
        let meta = events[0].json();
        assert_eq!(meta["cached"], json!(false), "{meta}");
        assert!(
            meta.get("model").is_none() && meta.get("degraded").is_none(),
            "{meta}"
        );
        assert_by(&events.last().unwrap().json(), PRIMARY, false);
        let text = text_of(&events);
        assert_ne!(text, "A stand-in answer.");
        assert_eq!(sys.sim.chat_calls().await, 1);
        let again = fight_at(api, names.0, names.1).await;
        assert_eq!(again[0].json()["cached"], json!(true), "{again:?}");
        assert_by(&again[0].json(), PRIMARY, false);
        assert_eq!(text_of(&again), text);
    });
}

#[test]
fn the_page_says_which_fallback_model_answered_and_drew_and_passes_axe_core() {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "100")
            .start()
            .await;
        let answers = answers_bucket(&sys).await;
        let names = ("Godzilla", "King Kong");
        // A real picture, drawn by the primary, then marked as a fallback's in the bucket.
        let drawn = post_image(sys.api_url(), names.0, names.1).await;
        let image_key = Key::parse(drawn["key"].as_str().unwrap()).unwrap();
        let entry = wire::kv_key(Kind::Image, &image_key);
        let stored = answers.get(entry.as_str()).await.unwrap().unwrap();
        let mut picture: ImageAnswer = serde_json::from_slice(&stored).unwrap();
        picture.model = FALLBACK_IMAGE.to_owned();
        picture.degraded_until_ms = Some(wire::unix_ms() + 300_000);
        put(&answers, entry, &picture).await;
        store_text(
            &answers,
            names,
            "A stand-in answer.",
            FALLBACK,
            1,
            Some(wire::unix_ms() + 300_000),
        )
        .await;

        // Another replica, which never read either (the first kept the primary's picture).
        let replica = sys.spawn_api().await;
        let url = format!(
            "{}/?{}",
            replica.url,
            serde_urlencoded(&[("a", names.0), ("b", names.1)])
        );
        let posted = post_image(&replica.url, names.0, names.1).await;
        assert_by(&posted, FALLBACK_IMAGE, true);

        let light = Browser::start().await;
        let dark = Browser::start_with(&[DARK]).await;
        for (browser, layout, width, height) in [
            (&light, "desktop", 1280, 900),
            (&dark, "dark phone", 390, 844),
        ] {
            browser
                .client
                .set_window_size(width, height)
                .await
                .unwrap_or_else(|e| panic!("resize the window: {e}"));
            browser.goto(&url).await;
            browser
                .wait_for(
                    "the answer and its picture",
                    "document.getElementById('result').dataset.state === 'done' \
                     && document.getElementById('picture').dataset.state === 'ready'",
                )
                .await;
            let seen = browser
                .js("const by = document.getElementById('picture-by'); \
                     return [document.getElementById('answer').textContent, \
                             document.getElementById('status').textContent, \
                             by.hidden ? null : by.textContent];")
                .await;
            assert_eq!(
                seen,
                json!([
                    "A stand-in answer.",
                    format!("Answered by {FALLBACK}, a fallback model."),
                    format!("Drawn by {FALLBACK_IMAGE}, a fallback model."),
                ]),
                "{layout}"
            );
            assert_accessible(browser, &format!("{layout} degraded")).await;
            browser
                .screenshot(&format!("degraded-{}", layout.replace(' ', "-")))
                .await;
        }

        // The primary's answer and picture written back: the page says nothing of a fallback.
        picture.model = "gpt-image-1".to_owned();
        picture.degraded_until_ms = None;
        put(&answers, wire::kv_key(Kind::Image, &image_key), &picture).await;
        store_text(&answers, names, "The primary's answer.", PRIMARY, 2, None).await;
        light.goto(&url).await;
        light
            .wait_for(
                "the primary's answer and picture",
                "document.getElementById('result').dataset.state === 'done' \
                 && document.getElementById('picture').dataset.state === 'ready' \
                 && document.getElementById('answer').textContent === \"The primary's answer.\"",
            )
            .await;
        let seen = light
            .js("return [document.getElementById('status').textContent, \
                         document.getElementById('picture-by').hidden];")
            .await;
        assert_eq!(seen, json!([format!("Written by {PRIMARY}."), true]));
        light.close().await;
        dark.close().await;
    });
}

async fn post_image(api: &str, a: &str, b: &str) -> Value {
    let body = json_of(
        http()
            .post(format!("{api}/v1/images"))
            .json(&json!({"a": a, "b": b})),
    )
    .await;
    assert!(body["url"].is_string(), "{body}");
    body
}

/// `pairs` as a query string.
fn serde_urlencoded(pairs: &[(&str, &str)]) -> String {
    reqwest::Url::parse_with_params("http://x/", pairs)
        .unwrap()
        .query()
        .unwrap_or_default()
        .to_owned()
}
