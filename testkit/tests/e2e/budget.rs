//! The daily budget: once today's spend reaches it, no new answer starts anywhere, and hits go
//! on.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{fight, http, json_of, metric, metrics_of, quick, run, shape};

const TOKEN: &str = "budget-admin-token-0123456789abcdef";

#[test]
fn once_the_budget_is_spent_misses_are_refused_at_once_and_hits_are_still_served() {
    run(async {
        // An answer reports 40 completion tokens: at these prices it costs $1.20, and so does
        // its worst case (40 tokens at most, prompts free), which a worker reserves before the
        // call. Three answers meet $3.60 exactly; a fourth would pass it. Two workers: what one
        // spends, the other and the API learn through the bus.
        let (input, output) = (0.0, 30_000.0);
        let sys = quick()
            .env("VERSUS_DAILY_BUDGET_USD", "3.6")
            .env("VERSUS_MAX_ANSWER_TOKENS", "40")
            .env(
                "VERSUS_PRICES",
                json!({"gpt-4o-mini": {"input_per_mtok": input, "output_per_mtok": output}})
                    .to_string(),
            )
            .env("VERSUS_ADMIN_TOKEN", TOKEN)
            .start()
            .await;

        let names = ["Cobra", "Mongoose", "Eagle", "Falcon", "Orca", "Shark"];
        let mut refused = 0;
        for (i, a) in names.iter().enumerate() {
            let asked = Instant::now();
            let events = fight(&sys, a, "Wolf").await;
            let took = asked.elapsed();
            let last = events.last().unwrap();
            if i < 3 {
                assert_eq!(last.event, "done", "miss {i}: {events:?}");
                if i == 2 {
                    // From here on an answer would take seconds: a refusal that waited for
                    // anything would show (how fast a refusal is, R1 in BENCHMARKS.md measures).
                    sys.sim.config(json!({"ttft_ms": 10_000})).await;
                }
                continue;
            }
            refused += 1;
            assert_eq!(shape(&events), ["meta", "error"], "miss {i}");
            let error = last.json();
            assert_eq!(error["code"], json!("budget_exhausted"), "{error}");
            assert_eq!(error["retryable"], json!(true), "{error}");
            assert!(took < Duration::from_secs(5), "a refusal took {took:?}");
        }
        assert_eq!(refused, 3);
        assert_eq!(
            sys.sim.chat_calls().await,
            3,
            "only three answers were paid for"
        );
        let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM generations")
            .fetch_one(&sys.db.pool().await)
            .await
            .unwrap();
        assert_eq!(jobs, 3, "a refused miss makes no job");

        // POST says the same with a 503 and when the budget resets.
        let response = http()
            .post(format!("{}/v1/fights", sys.api_url()))
            .json(&json!({"a": "Lynx", "b": "Wolf"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=86_400).contains(&retry_after), "{retry_after}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], json!("budget_exhausted"), "{body}");
        assert_eq!(body["error"]["retryable"], json!(true), "{body}");

        // Hits cost nothing and go on.
        for a in &names[..3] {
            let events = fight(&sys, a, "Wolf").await;
            assert_eq!(events[0].json()["cached"], json!(true), "{events:?}");
            assert_eq!(events.last().unwrap().event, "done");
        }
        assert_eq!(sys.sim.chat_calls().await, 3);

        // Pre-warm waits for tomorrow: the batch is taken and stays pending, and costs nothing.
        let batch = json_of(
            http()
                .post(format!("{}/v1/admin/prewarm", sys.api_url()))
                .bearer_auth(TOKEN)
                .json(
                    &json!({"matchups": [{"a": "Bison", "b": "Yak"}, {"a": "Moose", "b": "Elk"}]}),
                ),
        )
        .await;
        assert_eq!(batch["queued"], json!(2), "{batch}");
        versus_testkit::eventually(
            "the workers to put both pre-warm jobs off",
            Duration::from_secs(10),
            || async {
                let mut refused = 0.0;
                for worker in &sys.workers {
                    refused += metric(
                        &metrics_of(&worker.url).await,
                        "versus_budget_refusals_total",
                        "",
                    );
                }
                refused >= 2.0
            },
        )
        .await;
        let status = json_of(
            http()
                .get(format!(
                    "{}/v1/admin/prewarm/{}",
                    sys.api_url(),
                    batch["batch"].as_str().unwrap()
                ))
                .bearer_auth(TOKEN),
        )
        .await;
        assert_eq!(status["pending"], json!(2), "{status}");
        assert_eq!(sys.sim.chat_calls().await, 3);

        // What the workers count is what the upstream reported, at the configured prices.
        let usage = sys.sim.stats().await["usage"].clone();
        let reported = usage["prompt_tokens"].as_f64().unwrap() * input / 1e6
            + usage["completion_tokens"].as_f64().unwrap() * output / 1e6;
        assert!((reported - 3.6).abs() < 1e-9, "{usage}");
        let mut counted = 0.0;
        for worker in &sys.workers {
            counted += metric(&metrics_of(&worker.url).await, "versus_spend_usd_total", "");
        }
        assert!((counted - reported).abs() < 1e-9, "{counted} != {reported}");
        let api = metrics_of(sys.api_url()).await;
        let remaining = metric(&api, "versus_budget_remaining_usd", "");
        assert!(remaining < 1e-9, "{remaining} left after $3.60 of $3.60");
        let spend = json_of(
            http()
                .get(format!("{}/v1/admin/spend", sys.api_url()))
                .bearer_auth(TOKEN),
        )
        .await;
        assert_eq!(spend["exhausted"], json!(true), "{spend}");
        assert!(
            (spend["spent_usd"].as_f64().unwrap() - reported).abs() < 1e-9,
            "{spend}"
        );
        assert_eq!(spend["by_model"][0]["calls"], json!(3), "{spend}");
    });
}
