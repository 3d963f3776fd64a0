//! Pictures end to end, against a real S3-compatible server (s3s-fs) and a local folder:
//! generated once, stored in our object store, served CDN-ready.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use versus_testkit::{System, SystemBuilder, pictures_in, sse};

use crate::{http, image_stream_url, json_of, quick, run};

/// How long a queued picture may wait for a worker to claim it: at once when idle, and this
/// bounds a failing run.
const CLAIMED_WITHIN: Duration = Duration::from_secs(30);

/// Now, in Unix milliseconds, as the simulator stamps its calls (`at_ms`).
fn unix_ms() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(now.as_millis()).unwrap()
}

fn pictures(builder: SystemBuilder) -> SystemBuilder {
    builder.sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "100")
}

/// Streams the picture of a matchup; returns (meta, done or error) data. The partial images
/// a picture is streamed with (`partials.rs` tests them) are left out.
async fn draw(sys: &System, a: &str, b: &str) -> (Value, sse::SseEvent) {
    let events: Vec<sse::SseEvent> = sse::open(&image_stream_url(sys, a, b), None)
        .await
        .collect_all()
        .await
        .into_iter()
        .filter(|e| e.event != "partial")
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].event, "meta");
    (events[0].json(), events[1].clone())
}

/// How many pictures the system's local object folder holds.
fn stored_pictures(sys: &System) -> usize {
    pictures_in(sys.stored_objects())
}

/// The SHA-256 of every picture the simulator produced, in call order.
async fn produced(sys: &System) -> Vec<String> {
    let stats = sys.sim.stats().await;
    stats["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["image_sha256"].as_str().map(str::to_owned))
        .collect()
}

async fn a_new_picture_arrives_and_is_served_immutable(sys: &System) {
    let (meta, done) = draw(sys, "Batman", "Superman").await;
    assert_eq!(meta["cached"], json!(false));
    assert_eq!(done.event, "done", "{done:?}");
    let url = done.json()["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("/v1/images/"), "{url}");
    let full = format!("{}{url}", sys.api_url());

    let response = http().get(&full).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "image/png");
    assert_eq!(
        headers["cache-control"],
        "public, max-age=31536000, immutable"
    );
    let etag = headers["etag"].to_str().unwrap().to_owned();
    let bytes = response.bytes().await.unwrap();
    assert_eq!(produced(sys).await, [hex::encode(Sha256::digest(&bytes))]);

    let again = http()
        .get(&full)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    let head = http().head(&full).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        bytes.len().to_string().as_str()
    );

    let key = meta["key"].as_str().unwrap();
    for outside in [
        format!("/v1/images/{key}.txt"),
        format!("/v1/images/{}.png", "0".repeat(32)),
        "/v1/images/..%2F..%2Fetc%2Fpasswd".to_owned(),
        "/v1/images/%2E%2E%2Fimages%2Fx.png".to_owned(),
    ] {
        let r = http()
            .get(format!("{}{outside}", sys.api_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{outside}");
    }

    let (meta, done) = draw(sys, "superman", "BATMAN").await;
    assert_eq!(meta["cached"], json!(true));
    assert_eq!(done.json()["url"], json!(url));
    assert_eq!(sys.sim.image_calls().await, 1);
}

#[test]
fn a_new_picture_is_stored_in_s3_and_served_with_caching_headers() {
    run(async {
        let sys = pictures(quick()).s3().start().await;
        a_new_picture_arrives_and_is_served_immutable(&sys).await;
        assert_eq!(pictures_in(sys.s3.as_ref().unwrap().objects()), 1);
    });
}

#[test]
fn a_new_picture_is_stored_in_a_local_folder_and_served_with_caching_headers() {
    run(async {
        let sys = pictures(quick()).start().await;
        a_new_picture_arrives_and_is_served_immutable(&sys).await;
        assert_eq!(stored_pictures(&sys), 1);
    });
}

#[test]
fn fifty_concurrent_identical_picture_requests_make_one_upstream_call() {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "1000")
            .start()
            .await;
        let requests = (0..50).map(|_| async {
            let r = http()
                .post(format!("{}/v1/images", sys.api_url()))
                .json(&json!({"a": "Godzilla", "b": "Mothra"}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        });
        let answers = join_all(requests).await;
        let url = &answers[0]["url"];
        assert!(url.is_string());
        for answer in &answers {
            assert_eq!(&answer["url"], url);
        }
        assert_eq!(sys.sim.image_calls().await, 1);
    });
}

#[test]
fn a_provider_url_is_downloaded_and_never_stored_or_returned() {
    run(async {
        let sys = pictures(quick())
            .sim_env("VERSUS_SIM_IMAGE_MODE", "url")
            .start()
            .await;
        let (_, done) = draw(&sys, "Alien", "Predator").await;
        let url = done.json()["url"].as_str().unwrap().to_owned();
        assert!(
            url.starts_with("/v1/images/"),
            "ours, not the provider's: {url}"
        );
        let bytes = http()
            .get(format!("{}{url}", sys.api_url()))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(produced(&sys).await, [hex::encode(Sha256::digest(&bytes))]);
        let paths: Vec<String> = sqlx::query_scalar("SELECT image_path FROM generations")
            .fetch_all(&sys.db.pool().await)
            .await
            .unwrap();
        assert_eq!(paths.len(), 1);
        assert!(
            paths[0].starts_with("images/") && !paths[0].contains("http"),
            "{paths:?}"
        );
        assert_eq!(stored_pictures(&sys), 1);
    });
}

#[test]
fn an_object_store_outage_marks_nothing_done_and_a_later_request_succeeds() {
    run(async {
        let mut sys = pictures(quick())
            .worker_env("VERSUS_UPSTREAM_MAX_TRIES", "1")
            // The picture is kept and its upload tried again for this long (3 minutes unless set).
            .worker_env("VERSUS_STORE_RETRY_SECS", "2")
            .s3()
            .start()
            .await;
        sys.s3.as_mut().unwrap().stop().await;
        let (_, end) = draw(&sys, "Kirk", "Picard").await;
        assert_eq!(end.event, "error", "{end:?}");
        assert_eq!(end.json()["retryable"], json!(true));
        let status: Vec<String> = sqlx::query_scalar("SELECT status FROM generations")
            .fetch_all(&sys.db.pool().await)
            .await
            .unwrap();
        assert_eq!(status, ["failed"]);

        sys.s3.as_mut().unwrap().start_again().await;
        let (meta, done) = draw(&sys, "Kirk", "Picard").await;
        assert_eq!(meta["cached"], json!(false));
        assert_eq!(done.event, "done", "{done:?}");
        let url = done.json()["url"].as_str().unwrap().to_owned();
        let r = http()
            .get(format!("{}{url}", sys.api_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(pictures_in(sys.s3.as_ref().unwrap().objects()), 1);
    });
}

#[test]
fn a_cached_picture_is_served_with_every_worker_stopped() {
    run(async {
        let mut sys = pictures(quick()).s3().start().await;
        let (_, done) = draw(&sys, "Cat", "Mouse").await;
        let url = done.json()["url"].as_str().unwrap().to_owned();
        for worker in &mut sys.workers {
            worker.kill().await;
        }
        // A fresh replica has nothing in memory: the edge KV bucket answers.
        let fresh = sys.spawn_api().await;
        let answer = json_of(
            http()
                .post(format!("{}/v1/images", fresh.url))
                .json(&json!({"a": "mouse", "b": "cat"})),
        )
        .await;
        assert_eq!(answer["cached"], json!(true));
        assert_eq!(answer["url"], json!(url));
        let r = http()
            .get(format!("{}{url}", fresh.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "image/png");
    });
}

#[test]
fn a_worker_killed_mid_call_still_delivers_one_picture() {
    run(async {
        let mut sys = quick()
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "2500")
            .start()
            .await;
        let url = image_stream_url(&sys, "Hulk", "Thing");
        let waiting = tokio::spawn(async move { sse::open(&url, None).await.collect_all().await });
        let pool = sys.db.pool().await;
        // The owner, as soon as a worker has claimed the job (the call then lasts 2.5 s).
        let looking = Instant::now();
        let owner = loop {
            let running = sqlx::query_scalar::<_, String>(
                "SELECT worker FROM generations WHERE status = 'running'",
            )
            .fetch_optional(&pool)
            .await
            .unwrap();
            if let Some(owner) = running {
                break owner;
            }
            assert!(
                looking.elapsed() < CLAIMED_WITHIN,
                "no worker was seen drawing the picture within {CLAIMED_WITHIN:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        sys.workers
            .iter_mut()
            .find(|w| owner.starts_with(&format!("{}-", w.pid())))
            .expect("the owner is one of our workers")
            .kill()
            .await;
        // Whatever reaches the upstream from now on comes from the workers left.
        let killed_ms = unix_ms();
        let events = waiting.await.unwrap();
        assert_eq!(events.last().unwrap().event, "done", "{events:?}");
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT status, image_path FROM generations")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0, "done");
        assert_eq!(stored_pictures(&sys), 1);
        // One picture was paid for to replace the lost one. The killed worker's own call is
        // the only other: the simulator counts it if it drew it for nobody (as an upstream
        // may bill a call whose client went away), not if the call was dropped with the
        // connection.
        let calls = sys.sim.calls_of("image").await;
        let (after, before): (Vec<&Value>, Vec<&Value>) = calls
            .iter()
            .partition(|c| c["at_ms"].as_u64().unwrap() >= killed_ms);
        assert_eq!(after.len(), 1, "image calls after the kill: {calls:?}");
        assert_eq!(after[0]["status"], 200, "{calls:?}");
        assert!(before.len() <= 1, "image calls before the kill: {calls:?}");
    });
}
