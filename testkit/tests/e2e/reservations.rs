//! Spend is reserved before every paid call: however many clients and workers ask at once, the
//! day's spend never passes the budget, pictures never pass their share of it, and a call that
//! was dropped or timed out is paid for all the same.

use std::time::Duration;

use futures::future::join_all;
use serde_json::{Value, json};
use versus_shared::{config::ModelSettings, key::Matchup, recipe::Recipe, wire::Kind};
use versus_testkit::{System, eventually, sse};

use crate::{http, image_stream_url, json_of, quick, run, stream_url};

const TOKEN: &str = "reservations-admin-token-0123456789abcdef";

/// A system whose pictures cost $1 each and take half a second to draw (so that concurrent
/// misses overlap), under a daily budget of `budget_usd`, pictures at most `share` of it, with
/// clients told apart by `X-Forwarded-For`.
async fn priced(budget_usd: &str, share: &str) -> System {
    quick()
        .env("VERSUS_DAILY_BUDGET_USD", budget_usd)
        .env("VERSUS_PICTURE_BUDGET_SHARE", share)
        .env(
            "VERSUS_PRICES",
            json!({"gpt-image-1": {"per_image": 1.0}}).to_string(),
        )
        .env("VERSUS_ADMIN_TOKEN", TOKEN)
        .api_env("VERSUS_TRUSTED_PROXIES", "127.0.0.1/32")
        .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "500")
        .start()
        .await
}

/// Asks for `n` new pictures at once, each from a client of its own; returns each stream's
/// last event.
async fn pictures_at_once(sys: &System, n: usize, first_client: usize) -> Vec<sse::SseEvent> {
    let asks = (0..n).map(|i| {
        let url = image_stream_url(sys, &format!("Gladiator {i}"), "Minotaur");
        let client = format!("203.0.113.{}", first_client + i);
        async move {
            let events = sse::open_with(&url, None, &[("x-forwarded-for", &client)])
                .await
                .collect_all()
                .await;
            events.last().cloned().unwrap()
        }
    });
    join_all(asks).await
}

async fn spend(sys: &System) -> Value {
    json_of(
        http()
            .get(format!("{}/v1/admin/spend", sys.api_url()))
            .bearer_auth(TOKEN),
    )
    .await
}

/// Every stream ended with `done` or with `budget_exhausted`; returns how many were drawn.
fn drawn_or_refused(ends: &[sse::SseEvent]) -> usize {
    let mut drawn = 0;
    for end in ends {
        match end.event.as_str() {
            "done" => drawn += 1,
            "error" => {
                let error = end.json();
                assert_eq!(error["code"], json!("budget_exhausted"), "{error}");
                assert_eq!(error["retryable"], json!(true), "{error}");
            }
            other => panic!("a picture stream ended with {other}: {end:?}"),
        }
    }
    drawn
}

#[test]
fn thirty_two_concurrent_picture_misses_never_spend_past_a_budget_of_five_pictures() {
    run(async {
        let sys = priced("5", "1").await;
        let ends = pictures_at_once(&sys, 32, 10).await;
        let drawn = drawn_or_refused(&ends);
        let calls = sys.sim.image_calls().await;
        assert!(
            calls <= 5,
            "{calls} pictures were paid for under a budget of 5"
        );
        assert_eq!(drawn as u64, calls, "every picture paid for was delivered");
        assert!(drawn >= 1, "the budget had room for pictures");

        // What the operator sees is what the upstream was asked for, and nothing stays held.
        let spend = spend(&sys).await;
        let spent = spend["spent_usd"].as_f64().unwrap();
        assert!((spent - calls as f64).abs() < 1e-9, "{spend}");
        assert!(spent <= 5.0 + 1e-9, "{spend}");
        assert!(
            (spend["picture_spent_usd"].as_f64().unwrap() - spent).abs() < 1e-9,
            "{spend}"
        );
        assert_eq!(spend["reserved_usd"], json!(0.0), "{spend}");
        let images = spend["by_model"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["kind"] == json!("image"))
            .unwrap();
        assert_eq!(images["calls"], json!(calls), "{spend}");
    });
}

#[test]
fn pictures_stop_at_their_share_and_text_goes_on() {
    run(async {
        // $10 a day, pictures at most a tenth of it: one $1 picture.
        let sys = priced("10", "0.1").await;
        let ends = pictures_at_once(&sys, 10, 50).await;
        let drawn = drawn_or_refused(&ends);
        let calls = sys.sim.image_calls().await;
        assert!(
            calls <= 1,
            "{calls} pictures were paid for under a share of one"
        );
        assert_eq!(drawn as u64, calls);

        // An eleventh client's text is answered in full.
        let url = stream_url(&sys, "Gladiator 0", "Minotaur");
        let events = sse::open_with(&url, None, &[("x-forwarded-for", "198.51.100.11")])
            .await
            .collect_all()
            .await;
        assert_eq!(events.last().unwrap().event, "done", "{events:?}");
        let spend = spend(&sys).await;
        assert_eq!(spend["exhausted"], json!(false), "{spend}");
        assert_eq!(spend["pictures_exhausted"], json!(calls == 1), "{spend}");
    });
}

/// The rows of `spend` for `kind`: (calls, estimated calls, US dollars).
async fn spent_on(sys: &System, kind: &str) -> (i64, i64, f64) {
    sqlx::query_as(
        "SELECT COALESCE(sum(calls), 0)::int8, COALESCE(sum(estimated), 0)::int8,
                COALESCE(sum(usd), 0) FROM spend WHERE kind = $1",
    )
    .bind(kind)
    .fetch_one(&sys.db.pool().await)
    .await
    .unwrap()
}

#[test]
fn a_dropped_speculative_request_and_a_timed_out_picture_are_paid_for() {
    run(async {
        // Prompts cost $1,000 a million tokens, so that a dropped request's prompt shows; a
        // picture costs $1 and takes longer than a worker waits for it.
        let sys = quick()
            .env("VERSUS_DAILY_BUDGET_USD", "1000")
            .env(
                "VERSUS_PRICES",
                json!({
                    "gpt-4o-mini": {"input_per_mtok": 1000.0, "output_per_mtok": 1.0},
                    "gpt-image-1": {"per_image": 1.0},
                })
                .to_string(),
            )
            .worker_env("VERSUS_UPSTREAM_IMAGE_TIMEOUT_SECS", "1")
            .worker_env("VERSUS_UPSTREAM_MAX_TRIES", "2")
            .worker_env("VERSUS_UPSTREAM_BACKOFF_MS", "50")
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "3000")
            .sim_env("VERSUS_SIM_TTFT_MS", "10000")
            .start()
            .await;

        // Another worker holds the claim of Hydra vs Kraken (a live lease), and the test holds
        // its row's lock: the claim waits, the speculative request goes out meanwhile, and once
        // the lock goes the claim is lost and the request dropped.
        let models = ModelSettings {
            chat_model: "gpt-4o-mini".to_owned(),
            image_model: "gpt-image-1".to_owned(),
            image_size: "1024x1024".to_owned(),
            max_answer_tokens: 600,
        };
        let matchup = Matchup::parse(Some("Hydra"), Some("Kraken")).unwrap();
        let key = Recipe::of(Kind::Text, &models).key(&matchup);
        let pool = sys.db.pool().await;
        sqlx::query(
            "INSERT INTO generations (kind, key, a, b, model, prompt_version, status, attempt,
                                      lease_until, worker)
             VALUES ('text', $1, 'Hydra', 'Kraken', 'gpt-4o-mini', 2, 'running', 1,
                     now() + interval '1 hour', 'elsewhere')",
        )
        .bind(key.as_str())
        .execute(&pool)
        .await
        .unwrap();
        let mut lock = pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM generations WHERE kind = 'text' AND key = $1 FOR UPDATE")
            .bind(key.as_str())
            .execute(&mut *lock)
            .await
            .unwrap();
        let waiting = tokio::spawn(
            http()
                .get(stream_url(&sys, "Hydra", "Kraken"))
                .timeout(Duration::from_secs(3))
                .send(),
        );
        eventually(
            "the speculative request to reach the upstream",
            Duration::from_secs(10),
            || async { sys.sim.chat_calls().await == 1 },
        )
        .await;
        lock.rollback().await.unwrap();
        eventually(
            "the dropped request to be paid for",
            Duration::from_secs(10),
            || async { spent_on(&sys, "chat").await.0 == 1 },
        )
        .await;
        let (calls, estimated, usd) = spent_on(&sys, "chat").await;
        assert_eq!((calls, estimated), (1, 1), "its tokens are estimated");
        assert!(usd > 0.0, "its prompt costs something: {usd}");
        drop(waiting);

        // Both tries of a picture time out; the upstream may have drawn (and billed) each.
        let url = image_stream_url(&sys, "Hydra", "Kraken");
        let events = sse::open(&url, None).await.collect_all().await;
        let end = events.last().unwrap();
        assert_eq!(end.event, "error", "{events:?}");
        let tried = sys.sim.image_calls().await;
        assert_eq!(tried, 2, "two tries: {events:?}");
        eventually(
            "the timed-out pictures to be paid for",
            Duration::from_secs(10),
            || async { spent_on(&sys, "image").await.0 == 2 },
        )
        .await;
        let (_, _, usd) = spent_on(&sys, "image").await;
        assert!((usd - 2.0).abs() < 1e-9, "two pictures at $1: {usd}");
    });
}
