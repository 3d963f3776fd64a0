//! Nothing unmetered: a client over its look-up rate (`VERSUS_CLIENT_LOOKUPS_PER_SECOND`) and
//! its new-answer limit is refused before anything past memory is asked, so a flood of random
//! matchups costs neither JetStream nor Postgres, and adds no popularity rows; hits from memory
//! are never limited.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

use crate::{fight, http, quick, run, shape, stream_url};

/// Requests of the flood, and how many are in flight at once.
const FLOOD: usize = 20_000;
const AT_ONCE: usize = 64;
/// JetStream API requests the flood may cost: the few look-ups the rate lets through (one a
/// second, three requests each) and the processes' own polls meanwhile.
const JETSTREAM_REQUESTS_AT_MOST: u64 = 150;

#[test]
fn a_flood_of_random_matchups_from_a_client_over_its_limits_costs_neither_jetstream_nor_postgres() {
    run(async {
        let sys = quick()
            .workers(1)
            .api_env("VERSUS_CLIENT_LOOKUPS_PER_SECOND", "1")
            .api_env("VERSUS_CLIENT_LOOKUPS_BURST", "1")
            .api_env("VERSUS_CLIENT_MISSES_PER_MINUTE", "1")
            .start()
            .await;
        // The client's one new answer of the minute, and its one look-up of the second.
        let first = fight(&sys, "Godzilla", "Kong").await;
        assert_eq!(shape(&first), ["meta", "chunk*", "done"], "{first:?}");
        let key = first[0].json()["key"].as_str().unwrap().to_owned();
        // Its next look-up (a second later) reads the answer from the bucket into memory.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let hit = fight(&sys, "Kong", "Godzilla").await;
        assert_eq!(shape(&hit), ["meta", "chunk*", "done"], "{hit:?}");
        assert_eq!(hit[0].json()["cached"], serde_json::json!(true), "{hit:?}");
        let pool = sys.db.pool().await;
        let rows = || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM popularity WHERE key <> $1")
                .bind(&key)
                .fetch_one(&pool)
                .await
                .unwrap()
        };
        let monitor = format!("http://127.0.0.1:{}/jsz", sys.nats.monitor_port);
        let api_requests = || async {
            let jsz: Value = http()
                .get(&monitor)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            jsz["api"]["total"]
                .as_u64()
                .expect("/jsz counts API requests")
        };

        let sys = &sys;
        let client = &http();
        let before = api_requests().await;
        let began = Instant::now();
        let statuses: Vec<u16> = futures::stream::iter(0..FLOOD)
            .map(|i| async move {
                let url = stream_url(sys, &format!("Random {i}"), &format!("Flood {}", i * 7));
                client.get(url).send().await.unwrap().status().as_u16()
            })
            .buffer_unordered(AT_ONCE)
            .collect()
            .await;
        let took = began.elapsed();
        let after = api_requests().await;
        let refused = statuses.iter().filter(|s| **s == 429).count();
        eprintln!(
            "{FLOOD} requests in {took:?}: {refused} refused (429), {} JetStream API requests",
            after - before
        );
        // The client's next new answer of the minute would be admitted (and counted).
        assert!(
            took < Duration::from_secs(50),
            "the flood took {took:?}: too slow to stay within the minute"
        );
        // Every one refused: by the look-up rate, before anything past memory, or (the few
        // look-ups it lets through, one a second) at admission, over the new-answer limit.
        assert_eq!(refused, FLOOD, "{:?}", statuses.iter().find(|s| **s != 429));
        assert!(
            after - before <= JETSTREAM_REQUESTS_AT_MOST,
            "the flood cost {} JetStream API requests",
            after - before
        );

        // Hits from memory are never limited, however far over its rate the client is.
        let hits: Vec<u16> = futures::stream::iter(0..200)
            .map(|_| async {
                let url = stream_url(sys, "Kong", "Godzilla");
                client.get(url).send().await.unwrap().status().as_u16()
            })
            .buffer_unordered(AT_ONCE)
            .collect()
            .await;
        assert!(hits.iter().all(|s| *s == 200), "{hits:?}");

        // Popularity: the counts go out once a second; nothing of the flood was counted.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(rows().await, 0, "the flood added popularity rows");
        let (requests,): (i64,) = sqlx::query_as("SELECT requests FROM popularity WHERE key = $1")
            .bind(&key)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(requests, 202, "the first answer and its 201 hits");
    });
}

#[test]
fn a_worker_prunes_matchups_rarely_asked_for_past_the_retention() {
    run(async {
        let mut sys = quick().workers(1).start().await;
        let pool = sys.db.pool().await;
        for (key, requests, days_ago) in [
            ("old and rare", 3_i64, 40_i32),
            ("old and popular", 500, 40),
            ("recent and rare", 1, 2),
        ] {
            sqlx::query(
                "INSERT INTO popularity (key, a, b, requests, last_requested_at)
                 VALUES ($1, 'A', 'B', $2, now() - make_interval(days => $3))",
            )
            .bind(key)
            .bind(requests)
            .bind(days_ago)
            .execute(&pool)
            .await
            .unwrap();
        }
        // A worker prunes as it starts (then hourly), as its own Postgres role.
        sys.spawn_worker().await;
        let keys = || async {
            sqlx::query_scalar::<_, String>("SELECT key FROM popularity ORDER BY key")
                .fetch_all(&pool)
                .await
                .unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while keys().await.len() == 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(keys().await, ["old and popular", "recent and rare"]);
    });
}
