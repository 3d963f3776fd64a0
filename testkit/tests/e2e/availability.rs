//! The API's availability when NATS is not there: it listens at once, `/healthz` answers as
//! long as it runs, `/readyz` says what it can serve (and why not), memory hits are served
//! through a hung NATS, and misses work again once NATS is back.

use std::time::{Duration, Instant};

use serde_json::Value;
use versus_testkit::{Proc, System, sse};

use crate::{fight, http, quick, run, shape, stream_url, stream_url_at};

/// `GET url` within `limit`, as (status, body); panics if it takes longer.
async fn get_within(url: &str, limit: Duration) -> (u16, String) {
    let response = tokio::time::timeout(limit, http().get(url).send())
        .await
        .unwrap_or_else(|_| panic!("GET {url} took over {limit:?}"))
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// `/readyz` of the API at `api`: its status and its body.
async fn readyz(api: &str) -> (u16, Value) {
    let (status, body) = get_within(&format!("{api}/readyz"), Duration::from_secs(2)).await;
    let body = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, body)
}

/// Starts another API like `sys`'s without waiting for it to be ready.
async fn spawn_unready_api(sys: &System) -> Proc {
    let envs: Vec<(&str, String)> = sys
        .api_envs()
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    Proc::spawn("versus-api", &envs).await
}

/// That a miss asked at `asked` was refused with a retryable `unavailable`, within seconds.
fn refused_unavailable_within_seconds(refused: &[versus_testkit::sse::SseEvent], asked: Instant) {
    assert_eq!(shape(refused), ["meta", "error"], "{refused:?}");
    let error = refused[1].json();
    assert_eq!(error["code"], "unavailable", "{error}");
    assert_eq!(error["retryable"], true, "{error}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "refused after {:?}",
        asked.elapsed()
    );
}

#[test]
fn an_api_started_while_nats_is_down_answers_its_probes_and_serves_once_nats_is_back() {
    run(async {
        let mut sys = quick().workers(1).start().await;
        sys.nats.kill().await;

        let started = Instant::now();
        let api = spawn_unready_api(&sys).await;
        let (status, body) =
            get_within(&format!("{}/healthz", api.url), Duration::from_secs(2)).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "/healthz answered {:?} after the start",
            started.elapsed()
        );
        let (status, ready) = readyz(&api.url).await;
        assert_eq!(status, 503, "{ready}");
        assert_eq!(ready["ready"], false, "{ready}");
        assert_ne!(ready["nats"], "connected", "{ready}");
        assert!(
            ready["reason"].as_str().is_some_and(|r| r.contains("NATS")),
            "{ready}"
        );
        // A miss meanwhile is refused, retryably and soon, rather than left waiting.
        let asked = Instant::now();
        let refused = sse::open(&stream_url_at(&api.url, "Mercury", "Venus"), None)
            .await
            .collect_all()
            .await;
        refused_unavailable_within_seconds(&refused, asked);

        // NATS comes back (the worker declares the events stream again, which lives in memory).
        sys.nats.restart().await;
        api.until_ready().await;
        let (status, ready) = readyz(&api.url).await;
        assert_eq!(status, 200, "{ready}");
        assert_eq!(ready["nats"], "connected", "{ready}");
        assert_eq!(ready["streams"], "found", "{ready}");
        let (status, _) = get_within(&format!("{}/healthz", api.url), Duration::from_secs(2)).await;
        assert_eq!(status, 200);
        let events = sse::open(&stream_url_at(&api.url, "Mercury", "Venus"), None)
            .await
            .collect_all()
            .await;
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
    });
}

#[test]
fn a_miss_while_nats_is_down_gets_a_retryable_error_within_seconds_and_hits_go_on() {
    run(async {
        let mut sys = quick().workers(1).start().await;
        let first = fight(&sys, "Thor", "Loki").await;
        assert_eq!(shape(&first), ["meta", "chunk*", "done"], "{first:?}");
        // A hit from KV, which this replica's memory keeps.
        let again = fight(&sys, "Thor", "Loki").await;
        assert_eq!(again[0].json()["cached"], true, "{again:?}");
        sys.nats.kill().await;

        let asked = Instant::now();
        let refused = fight(&sys, "Ares", "Athena").await;
        refused_unavailable_within_seconds(&refused, asked);
        // The answer this replica read before is served from memory, and it stays ready.
        let hit = fight(&sys, "Thor", "Loki").await;
        assert_eq!(hit[0].json()["cached"], true, "{hit:?}");
        let (status, ready) = readyz(sys.api_url()).await;
        assert_eq!(status, 200, "{ready}");
        assert_eq!(ready["nats"], "disconnected", "{ready}");
    });
}

#[test]
fn a_hung_nats_leaves_memory_hits_and_probes_served_and_misses_work_after_it() {
    run(async {
        let sys = quick().workers(1).start().await;
        let api = sys.api_url();
        // Warm this replica's memory: the miss, then a hit from KV, which memory keeps.
        let first = fight(&sys, "Hercules", "Samson").await;
        assert_eq!(shape(&first), ["meta", "chunk*", "done"], "{first:?}");
        let key = first[0].json()["key"].as_str().unwrap().to_owned();
        let hit = fight(&sys, "Hercules", "Samson").await;
        assert_eq!(hit[0].json()["cached"], true, "{hit:?}");
        let (status, ready) = readyz(api).await;
        assert_eq!(status, 200, "{ready}");
        assert!(ready["memory_answers"].as_u64() >= Some(1), "{ready}");

        sys.nats.pause();
        let paused = Instant::now();
        let url = stream_url(&sys, "Hercules", "Samson");
        let mut rounds = 0;
        while paused.elapsed() < Duration::from_secs(15) {
            let events = tokio::time::timeout(Duration::from_secs(2), async {
                sse::open(&url, None).await.collect_all().await
            })
            .await
            .expect("a memory hit is served while NATS hangs");
            assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
            assert_eq!(events[0].json()["cached"], true, "{events:?}");
            let limit = Duration::from_secs(2);
            let (status, body) = get_within(&format!("{api}/v1/fights/{key}"), limit).await;
            assert_eq!(status, 200, "{body}");
            let (status, body) = get_within(&format!("{api}/healthz"), limit).await;
            assert_eq!(status, 200, "{body}");
            let (status, ready) = readyz(api).await;
            assert_eq!(status, 200, "{ready}");
            rounds += 1;
            // Spread the checks over the pause: the pause itself is what is tested.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(rounds >= 5, "only {rounds} rounds in 15 s");
        sys.nats.resume();

        let events = fight(&sys, "Goliath", "David").await;
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
    });
}
