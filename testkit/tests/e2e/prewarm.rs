//! Pre-warming: batches through the admin routes, the priority of interactive requests,
//! popularity, and purging an answer from every layer.

use std::time::Duration;

use serde_json::{Value, json};
use versus_testkit::{System, eventually};

use crate::{fight, http, json_of, quick, run, text_of};

const TOKEN: &str = "s3cret-admin-token-0123456789abcdef";

fn admin() -> versus_testkit::SystemBuilder {
    quick().env("VERSUS_ADMIN_TOKEN", TOKEN)
}

async fn post_batch(sys: &System, matchups: &[(String, String)]) -> Value {
    let list: Vec<Value> = matchups
        .iter()
        .map(|(a, b)| json!({"a": a, "b": b}))
        .collect();
    let r = http()
        .post(format!("{}/v1/admin/prewarm", sys.api_url()))
        .bearer_auth(TOKEN)
        .json(&json!({"matchups": list, "images": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.json().await.unwrap()
}

async fn status(sys: &System, batch: &str) -> Value {
    json_of(
        http()
            .get(format!("{}/v1/admin/prewarm/{batch}", sys.api_url()))
            .bearer_auth(TOKEN),
    )
    .await
}

async fn finished(sys: &System, batch: &str) -> Value {
    eventually("the batch finishes", Duration::from_secs(120), || async {
        status(sys, batch).await["pending"] == json!(0)
    })
    .await;
    status(sys, batch).await
}

#[test]
fn a_batch_completes_once_per_unique_matchup_and_running_it_again_costs_nothing() {
    run(async {
        let sys = admin().start().await;
        // 200 unique matchups, 20 of them already answered, and 100 repeats (in other spellings).
        let unique: Vec<(String, String)> = (0..200)
            .map(|i| (format!("Fighter {i}"), format!("Rival {i}")))
            .collect();
        for (a, b) in &unique[..20] {
            fight(&sys, a, b).await;
        }
        let mut batch = unique.clone();
        batch.extend(
            unique[..100]
                .iter()
                .map(|(a, b)| (b.to_uppercase(), a.clone())),
        );
        assert_eq!(sys.sim.chat_calls().await, 20);

        let first = post_batch(&sys, &batch).await;
        assert_eq!(first["total"], 300);
        assert_eq!(
            first["already_cached"], 40,
            "20 cached, each also repeated: {first}"
        );
        assert_eq!(first["queued"], 180);
        let done = finished(&sys, first["batch"].as_str().unwrap()).await;
        assert_eq!(
            done,
            json!({"total": 300, "done": 300, "failed": 0, "pending": 0})
        );
        assert_eq!(
            sys.sim.chat_calls().await,
            200,
            "one call per unique matchup"
        );

        let again = post_batch(&sys, &batch).await;
        assert_eq!(again["already_cached"], 300, "{again}");
        assert_eq!(again["queued"], 0);
        let done = status(&sys, again["batch"].as_str().unwrap()).await;
        assert_eq!(done["done"], 300);
        assert_eq!(sys.sim.chat_calls().await, 200);
        // And every one of them is now a hit.
        let hit = fight(&sys, "rival 150", "FIGHTER 150").await;
        assert_eq!(hit[0].json()["cached"], json!(true));
    });
}

#[test]
fn an_interactive_miss_overtakes_a_running_batch() {
    run(async {
        let sys = admin().sim_env("VERSUS_SIM_TTFT_MS", "300").start().await;
        let batch: Vec<(String, String)> = (0..300)
            .map(|i| (format!("Knight {i}"), format!("Dragon {i}")))
            .collect();
        let posted = post_batch(&sys, &batch).await;
        let id = posted["batch"].as_str().unwrap().to_owned();
        eventually(
            "the batch is under way",
            Duration::from_secs(30),
            || async { status(&sys, &id).await["done"].as_i64().unwrap() > 0 },
        )
        .await;

        let events = fight(&sys, "Tortoise", "Achilles").await;
        assert_eq!(events.last().unwrap().event, "done");
        assert!(!text_of(&events).is_empty());
        let progress = status(&sys, &id).await;
        assert!(
            progress["pending"].as_i64().unwrap() > 0,
            "the interactive answer came while the batch still ran: {progress}"
        );
    });
}

#[test]
fn admin_routes_refuse_requests_without_the_token() {
    run(async {
        let sys = admin().start().await;
        let api = sys.api_url();
        let key = "0".repeat(32);
        // Wrong tokens of every length: shorter, as long, a prefix, the token and more, and long.
        let (as_long, longer, long) = (
            "x".repeat(TOKEN.len()),
            format!("{TOKEN}x"),
            "x".repeat(4096),
        );
        let wrong = [
            None,
            Some("wrong"),
            Some(""),
            Some(&TOKEN[..TOKEN.len() - 1]),
            Some(as_long.as_str()),
            Some(longer.as_str()),
            Some(long.as_str()),
        ];
        for token in wrong {
            let requests = [
                http()
                    .post(format!("{api}/v1/admin/prewarm"))
                    .json(&json!({"matchups": []})),
                http().get(format!("{api}/v1/admin/prewarm/x")),
                http().get(format!("{api}/v1/admin/popular")),
                http().delete(format!("{api}/v1/admin/fights/{key}")),
            ];
            for request in requests {
                let request = match token {
                    Some(t) => request.bearer_auth(t),
                    None => request,
                };
                let r = request.send().await.unwrap();
                assert_eq!(r.status(), 401, "{token:?}");
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "unauthorized");
            }
        }
        assert_eq!(sys.sim.chat_calls().await, 0);
    });
}

#[test]
fn popular_ranks_matchups_by_requests() {
    run(async {
        let sys = admin().start().await;
        for _ in 0..3 {
            fight(&sys, "Popular", "Hero").await;
        }
        fight(&sys, "hero", "POPULAR").await;
        fight(&sys, "Rare", "Villain").await;
        let popular = || async {
            http()
                .get(format!("{}/v1/admin/popular?limit=5", sys.api_url()))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        };
        eventually(
            "popularity is aggregated",
            Duration::from_secs(20),
            || async {
                let list = popular().await;
                list["matchups"][0]["requests"] == json!(4)
                    && list["matchups"][1]["requests"] == json!(1)
            },
        )
        .await;
        let list = popular().await;
        assert_eq!(list["matchups"][0]["a"], "Popular");
        assert_eq!(list["matchups"][0]["cached"], json!(true));
        assert_eq!(list["matchups"][1]["a"], "Rare");
    });
}

#[test]
fn a_purged_answer_is_gone_from_every_layer_and_regenerated_on_the_next_request() {
    run(async {
        let sys = admin().start().await;
        let first = fight(&sys, "Purge", "Me").await;
        let key = first[0].json()["key"].as_str().unwrap().to_owned();
        let replica = sys.spawn_api().await;
        for api in [sys.api_url(), replica.url.as_str()] {
            let r = http()
                .get(format!("{api}/v1/fights/{key}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "now in {api}'s memory");
        }

        let r = http()
            .delete(format!("{}/v1/admin/fights/{key}", sys.api_url()))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        for api in [sys.api_url(), replica.url.as_str()] {
            eventually(
                "the replica forgot the answer",
                Duration::from_secs(5),
                || async {
                    let r = http()
                        .get(format!("{api}/v1/fights/{key}"))
                        .send()
                        .await
                        .unwrap();
                    r.status() == 404
                },
            )
            .await;
        }
        // The row keeps only its attempt (the next answer's is a new one): no answer is left.
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM generations WHERE status <> 'purged'")
                .fetch_one(&sys.db.pool().await)
                .await
                .unwrap();
        assert_eq!(rows, 0);

        let again = fight(&sys, "Purge", "Me").await;
        assert_eq!(again[0].json()["cached"], json!(false));
        assert_eq!(again.last().unwrap().event, "done");
        assert_eq!(sys.sim.chat_calls().await, 2);
        let missing = http()
            .delete(format!(
                "{}/v1/admin/fights/{}",
                sys.api_url(),
                "f".repeat(32)
            ))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
    });
}
