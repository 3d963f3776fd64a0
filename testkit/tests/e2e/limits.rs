//! Safe on the open internet: what a request may start, and what it may cost.

use serde_json::{Value, json};

use versus_testkit::{
    System,
    sse::{self, SseEvent},
};

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{fight, http, metric, metrics_of, quick, run, shape, stream_url, text_of};

/// `GET url` with `headers`: the status and the whole body.
async fn get_with(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = http().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Every event of one fight, asked for with `headers`.
async fn fight_as(sys: &System, a: &str, b: &str, headers: &[(&str, &str)]) -> Vec<SseEvent> {
    sse::open_with(&stream_url(sys, a, b), None, headers)
        .await
        .collect_all()
        .await
}

#[test]
fn a_miss_from_another_site_gets_403_and_costs_nothing_while_hits_and_allowed_sites_work() {
    run(async {
        let sys = quick()
            .api_env("VERSUS_ALLOWED_ORIGINS", "https://versus.example")
            .start()
            .await;
        let api = sys.api_url().to_owned();
        let refused_by = [
            ("origin", "https://elsewhere.example"),
            ("sec-fetch-site", "cross-site"),
        ];
        for header in refused_by {
            for url in [
                stream_url(&sys, "Kraken", "Leviathan"),
                format!("{api}/v1/images/stream?a=Kraken&b=Leviathan"),
            ] {
                let (status, body) = get_with(&url, &[header]).await;
                assert_eq!(status, 403, "{header:?} {url}: {body}");
                let body: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(body["error"]["code"], json!("cross_site"), "{body}");
            }
            for route in ["fights", "images"] {
                let response = http()
                    .post(format!("{api}/v1/{route}"))
                    .header(header.0, header.1)
                    .json(&json!({"a": "Kraken", "b": "Leviathan"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 403, "{header:?} POST /v1/{route}");
            }
        }
        assert_eq!(sys.sim.chat_calls().await, 0);
        assert_eq!(sys.sim.image_calls().await, 0);
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM generations")
            .fetch_one(&sys.db.pool().await)
            .await
            .unwrap();
        assert_eq!(rows, 0, "nothing was claimed");

        // The page's own requests (its Origin is the API's), an allowed site's and curl's start
        // generations.
        let own = get_with(
            &stream_url(&sys, "Kraken", "Leviathan"),
            &[("origin", &api)],
        )
        .await;
        let allowed = get_with(
            &stream_url(&sys, "Golem", "Titan"),
            &[
                ("origin", "https://versus.example"),
                ("sec-fetch-site", "same-site"),
            ],
        )
        .await;
        for (status, body) in [&own, &allowed] {
            assert_eq!(*status, 200, "{body}");
            assert!(body.contains("event: done"), "{body}");
        }
        let curl = fight(&sys, "Hydra", "Cerberus").await;
        assert_eq!(curl.last().unwrap().event, "done", "{curl:?}");
        assert_eq!(sys.sim.chat_calls().await, 3);

        // A hit costs nothing: it is served whoever asks.
        let (status, body) = get_with(
            &stream_url(&sys, "Kraken", "Leviathan"),
            &[("origin", "https://elsewhere.example")],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"cached\":true"), "{body}");
        assert_eq!(sys.sim.chat_calls().await, 3);
    });
}

#[test]
fn a_client_over_its_limit_gets_429_while_its_hits_its_joins_and_other_clients_pass() {
    run(async {
        // An answer takes about a second, so that a generation can be joined while it runs.
        let sys = quick()
            .api_env("VERSUS_CLIENT_MISSES_PER_MINUTE", "5")
            .api_env("VERSUS_TRUSTED_PROXIES", "127.0.0.1/32")
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "40")
            .start()
            .await;
        let second = sys.spawn_api().await;
        let client = |address: &'static str| [("x-forwarded-for", address)];
        let (one, other) = (client("203.0.113.7"), client("198.51.100.9"));

        // 30 unique misses in a row: the burst of 5 (and what a minute refills meanwhile) starts,
        // the rest is refused before any stream starts.
        let mut started = 0;
        for i in 0..30 {
            let url = stream_url(&sys, &format!("Robot {i}"), "Dinosaur");
            let response = http()
                .get(url)
                .header(one[0].0, one[0].1)
                .send()
                .await
                .unwrap();
            match response.status().as_u16() {
                200 => started += 1,
                429 => {
                    let retry_after: u64 = response.headers()["retry-after"]
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    assert!(
                        (1..=13).contains(&retry_after),
                        "Retry-After: {retry_after}"
                    );
                    let body: Value = response.json().await.unwrap();
                    assert_eq!(body["error"]["code"], json!("rate_limited"), "{body}");
                }
                status => panic!("unexpected {status}"),
            }
        }
        assert!((5..=10).contains(&started), "{started} misses started");
        versus_testkit::eventually(
            "the started misses reach the upstream",
            Duration::from_secs(10),
            || async { sys.sim.chat_calls().await == started },
        )
        .await;

        // A generation another client started is joined, not started: on this replica (one
        // reader for both) and on another one (the events stream shows it in progress).
        let url = stream_url(&sys, "Golem", "Colossus");
        let mut starter = sse::open_with(&url, None, &other).await;
        let mut first = starter.until_chunks(1).await;
        let joined_here = get_with(&url, &one).await;
        let joined_there = get_with(&url.replace(sys.api_url(), &second.url), &one).await;
        first.extend(starter.collect_all().await);
        let text = text_of(&first);
        for (status, body) in [&joined_here, &joined_there] {
            assert_eq!(*status, 200, "{body}");
            assert!(body.contains("event: done"), "{body}");
        }
        assert_eq!(sys.sim.chat_calls().await, started + 1);

        // Hits never count: the limited client reads the answer a thousand times.
        for _ in 0..1000 {
            let (status, body) = get_with(&url, &one).await;
            assert_eq!(status, 200, "{body}");
        }
        let hit = fight_as(&sys, "Golem", "Colossus", &one).await;
        assert_eq!(text_of(&hit), text);

        // Another client behind the same proxy has a limit of its own.
        let fresh = fight_as(&sys, "Hydra", "Cerberus", &other).await;
        assert_eq!(fresh.last().unwrap().event, "done", "{fresh:?}");
        assert_eq!(sys.sim.chat_calls().await, started + 2);
    });
}

/// How long a miss may take to be refused `busy` when the jobs stream is full. The stream
/// refuses the job on its first try and the API does not retry that (`api/src/publish.rs`),
/// so this is one round trip to nats-server; ten seconds leave a loaded two-core machine room,
/// and still fail a full stream taken for an outage and tried again for 20 s
/// (`publish::RETRY_FOR`).
const BUSY_WITHIN: Duration = Duration::from_secs(10);

/// The API's count of jobs it queued (`versus_jobs_published_total`).
async fn jobs_published(sys: &System) -> u64 {
    let metrics = metrics_of(sys.api_url()).await;
    metric(&metrics, "versus_jobs_published_total", "") as u64
}

#[test]
fn with_the_queue_full_further_misses_get_busy_at_once_and_cost_nothing() {
    run(async {
        let sys = quick()
            .workers(1)
            .env("VERSUS_MAX_QUEUED_JOBS", "5")
            .worker_env("VERSUS_WORKER_CONCURRENCY", "1")
            .start()
            .await;
        // The upstream takes every call and never answers: the one slot stays busy.
        sys.sim
            .fault(json!({"kind": "chat", "fault": {"type": "hang"}, "times": null}))
            .await;
        let mut waiting = Vec::new();
        for i in 0..5 {
            let mut stream =
                sse::open(&stream_url(&sys, &format!("Queued {i}"), "Kaiju"), None).await;
            assert_eq!(stream.next().await.unwrap().event, "meta");
            waiting.push(stream);
            versus_testkit::eventually("the job is queued", Duration::from_secs(5), || async {
                jobs_published(&sys).await == i + 1
            })
            .await;
        }
        for i in 0..3 {
            let began = Instant::now();
            let events = fight(&sys, &format!("Refused {i}"), "Kaiju").await;
            let took = began.elapsed();
            assert_eq!(shape(&events), ["meta", "error"], "{events:?}");
            let error = events[1].json();
            assert_eq!(error["code"], json!("busy"), "{error}");
            assert_eq!(error["retryable"], json!(true));
            assert!(
                took < BUSY_WITHIN,
                "refused after {took:?}, not within {BUSY_WITHIN:?}"
            );
        }
        let response = http()
            .post(format!("{}/v1/fights", sys.api_url()))
            .json(&json!({"a": "Refused by POST", "b": "Kaiju"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], json!("busy"), "{body}");
        assert_eq!(jobs_published(&sys).await, 5);
        assert_eq!(
            sys.sim.chat_calls().await,
            1,
            "only the job in the slot was paid for"
        );
    });
}

#[test]
fn a_client_holds_at_most_its_streams_and_a_body_over_the_limit_is_refused() {
    run(async {
        // No worker: every stream waits.
        let sys = quick()
            .workers(0)
            .api_env("VERSUS_CLIENT_MAX_STREAMS", "16")
            .api_env("VERSUS_TRUSTED_PROXIES", "127.0.0.1/32")
            .start()
            .await;
        let one = [("x-forwarded-for", "203.0.113.7")];
        let mut open = Vec::new();
        for i in 0..16 {
            let url = stream_url(&sys, &format!("Waiting {i}"), "Giant");
            open.push(sse::open_with(&url, None, &one).await);
        }
        let seventeenth = stream_url(&sys, "Waiting 16", "Giant");
        let (status, body) = get_with(&seventeenth, &one).await;
        assert_eq!(status, 429, "{body}");
        assert!(body.contains("rate_limited"), "{body}");
        // Another client is not affected, and a closed stream frees its slot.
        let other =
            sse::open_with(&seventeenth, None, &[("x-forwarded-for", "198.51.100.9")]).await;
        drop(other);
        drop(open.pop());
        versus_testkit::eventually("a slot is free again", Duration::from_secs(5), || async {
            let response = http()
                .get(&seventeenth)
                .header(one[0].0, one[0].1)
                .send()
                .await
                .unwrap();
            response.status() == 200
        })
        .await;

        // A body far larger than two names is refused without being read whole.
        let response = http()
            .post(format!("{}/v1/fights", sys.api_url()))
            .header("content-type", "application/json")
            .body(format!(
                r#"{{"a": "{}", "b": "Giant"}}"#,
                "x".repeat(64 * 1024)
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], json!("invalid_body"), "{body}");
    });
}

/// The API's `host:port`.
fn api_addr(sys: &System) -> String {
    sys.api_url().trim_start_matches("http://").to_owned()
}

/// Reads `stream` until the API closes it (end of file or a reset): what it sent meanwhile.
/// Panics if it is still open after `limit`.
async fn until_closed(stream: &mut tokio::net::tcp::OwnedReadHalf, limit: Duration) -> Vec<u8> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(limit, stream.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "still open after {limit:?}");
    received
}

#[test]
fn a_client_too_slow_to_send_its_headers_is_cut_off_while_others_are_served() {
    run(async {
        let sys = quick()
            .workers(1)
            .api_env("VERSUS_HEADER_TIMEOUT_SECS", "2")
            .start()
            .await;
        let addr = api_addr(&sys);
        let request = format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n").into_bytes();
        let began = Instant::now();
        // One client sends a byte of its request a second; another sends nothing at all.
        let (mut slow, mut writer) = TcpStream::connect(&addr).await.unwrap().into_split();
        let (mut silent, _silent_writer) = TcpStream::connect(&addr).await.unwrap().into_split();
        let sent = Arc::new(AtomicUsize::new(0));
        let dribble = tokio::spawn({
            let (request, sent) = (request.clone(), sent.clone());
            async move {
                for byte in request {
                    if writer.write_all(&[byte]).await.is_err() {
                        return;
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });

        // Meanwhile, other clients are served as usual.
        let events = fight(&sys, "Snail", "Cheetah").await;
        assert_eq!(events.last().unwrap().event, "done", "{events:?}");

        let limit = Duration::from_secs(6);
        let answer = until_closed(&mut slow, limit).await;
        let slow_closed = began.elapsed();
        let sent_then = sent.load(Ordering::SeqCst);
        let silent_answer = until_closed(&mut silent, limit).await;
        let silent_closed = began.elapsed();
        dribble.abort();
        assert!(
            answer.is_empty() && silent_answer.is_empty(),
            "closed without an answer: {:?} {:?}",
            String::from_utf8_lossy(&answer),
            String::from_utf8_lossy(&silent_answer),
        );
        assert!(
            sent_then < request.len(),
            "closed before its headers were complete ({sent_then} of {} bytes)",
            request.len()
        );
        for closed in [slow_closed, silent_closed] {
            assert!(
                closed >= Duration::from_secs(1) && closed < limit,
                "closed {closed:?} after connecting (timeout 2 s)"
            );
        }

        // A prompt client on a new connection is still answered.
        let response = http()
            .get(format!("{}/healthz", sys.api_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    });
}

#[test]
fn at_the_connection_cap_a_new_client_waits_until_a_connection_closes() {
    run(async {
        let sys = System::builder()
            .workers(0)
            .api_env("VERSUS_MAX_CONNECTIONS", "2")
            .api_env("VERSUS_HEADER_TIMEOUT_SECS", "60")
            .start()
            .await;
        let addr = api_addr(&sys);
        let request = format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n");
        // Two clients hold a connection each, kept alive after an answer: the API took both.
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(&addr).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = [0; 1024];
            let n = stream.read(&mut answer).await.unwrap();
            let answer = String::from_utf8_lossy(&answer[..n]);
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            held.push(stream);
        }

        // A third is not refused: it waits.
        let url = format!("{}/healthz", sys.api_url());
        let mut third = tokio::spawn(async move { http().get(url).send().await.unwrap().status() });
        let early = tokio::time::timeout(Duration::from_secs(1), &mut third).await;
        assert!(early.is_err(), "answered past the cap: {early:?}");

        // One connection closes: the third is taken and answered.
        drop(held.pop());
        let status = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("answered once a connection closed")
            .unwrap();
        assert_eq!(status, 200);
    });
}
