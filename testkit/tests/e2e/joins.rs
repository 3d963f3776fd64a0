//! Safe on the open internet: joining a generation under way costs the workers nothing, and no
//! job outlives its use in the bounded queue.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use versus_shared::wire;
use versus_testkit::{System, sse};

use crate::{fight, metric, metrics_of, run, stream_url, worker_metric};

/// How long the joiner loops (the 30 s, shortened under `VERSUS_TEST_QUICK`: the slots
/// fill within seconds when joins cost them).
fn loop_for() -> Duration {
    if std::env::var_os("VERSUS_TEST_QUICK").is_some() {
        Duration::from_secs(12)
    } else {
        Duration::from_secs(30)
    }
}

/// The jobs stream, as the admin sees it.
async fn jobs(sys: &System) -> jetstream::stream::Stream {
    jetstream::new(sys.admin_client().await)
        .get_stream(wire::JOBS_STREAM)
        .await
        .unwrap()
}

/// How long a fresh miss takes to its first chunk.
async fn first_token(sys: &System, a: &str, b: &str) -> Duration {
    let began = Instant::now();
    let mut stream = sse::open(&stream_url(sys, a, b), None).await;
    stream.until_chunks(1).await;
    began.elapsed()
}

#[test]
fn a_client_reconnecting_to_generations_in_a_loop_holds_no_slot_and_strangers_are_served_at_once() {
    run(async {
        // One worker, 16 slots, generations of 40 s (a chunk every 100 ms: alive throughout).
        let sys = System::builder()
            .workers(1)
            .worker_env("VERSUS_MAX_IN_FLIGHT", "16")
            .sim_env("VERSUS_SIM_TTFT_MS", "50")
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "10")
            .sim_env("VERSUS_SIM_ANSWER_TOKENS", "400")
            .start()
            .await;
        let idle = first_token(&sys, "Idle Otter", "Idle Heron").await;

        // Six slow generations, started and left.
        let names: Vec<(String, String)> = (0..6)
            .map(|i| (format!("Slow Kraken {i}"), format!("Slow Leviathan {i}")))
            .collect();
        for (a, b) in &names {
            sse::open(&stream_url(&sys, a, b), None)
                .await
                .until_chunks(1)
                .await;
        }
        let api = sys.api_url().to_owned();
        let published_before = metric(&metrics_of(&api).await, "versus_jobs_published_total", "");

        // One client reconnects to them ten times a second, each connection dropped after
        // 100 ms: each finds the previous flight gone, and starts one.
        let urls: Vec<String> = names.iter().map(|(a, b)| stream_url(&sys, a, b)).collect();
        let until = Instant::now() + loop_for();
        let joiner = tokio::spawn(async move {
            let mut reconnects = 0u32;
            for url in urls.iter().cycle() {
                if Instant::now() >= until {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), async {
                    let mut stream = sse::open(url, None).await;
                    while stream.next().await.is_some() {}
                })
                .await;
                reconnects += 1;
            }
            reconnects
        });

        // The interactive lane's pending acks, every 250 ms, and a stranger's miss midway.
        let stream = jobs(&sys).await;
        let mut most = 0usize;
        let mut limit = 0i64;
        let mut stranger = None;
        let started = Instant::now();
        while Instant::now() < until {
            let info = stream.consumer_info(wire::WORKERS_CONSUMER).await.unwrap();
            most = most.max(info.num_ack_pending);
            limit = info.config.max_ack_pending;
            if stranger.is_none() && started.elapsed() > loop_for() / 2 {
                stranger = Some(first_token(&sys, "Stranger Lynx", "Stranger Ibis").await);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let reconnects = joiner.await.unwrap();
        let stranger = stranger.unwrap();
        let metrics = metrics_of(&api).await;
        let published = metric(&metrics, "versus_jobs_published_total", "") - published_before;
        let joined = metric(&metrics, "versus_joins_without_job_total", "");
        eprintln!(
            "reconnects {reconnects}, ack pending at most {most} of {limit}, jobs published \
             meanwhile {published}, joins without a job {joined}, first token idle {idle:?}, \
             during the loop {stranger:?}"
        );
        assert!(
            reconnects >= loop_for().as_secs() as u32 * 5,
            "{reconnects} reconnects"
        );
        assert!(
            joined >= f64::from(reconnects) / 4.0,
            "most reconnects started a flight that published nothing: {joined} of {reconnects}"
        );
        // The six generations, the stranger's, and the idle one's: nothing of the joiner's.
        assert!(most <= 8, "{most} jobs pending acks of {limit}");
        assert_eq!(limit, 16);
        assert!(published <= 1.0, "{published} jobs published meanwhile");
        assert!(
            stranger <= idle + Duration::from_secs(1),
            "a stranger's first token took {stranger:?}, against {idle:?} on an idle system"
        );
    });
}

#[test]
fn jobs_that_exhaust_their_deliveries_while_postgres_is_down_leave_the_queue() {
    run(async {
        // A queue of four jobs, each delivered at most three times.
        let sys = System::builder()
            .own_postgres()
            .workers(1)
            .env("VERSUS_MAX_QUEUED_JOBS", "4")
            .worker_env("VERSUS_JOB_MAX_DELIVERIES", "3")
            .sim_env("VERSUS_SIM_TTFT_MS", "50")
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "400")
            .sim_env("VERSUS_SIM_ANSWER_TOKENS", "40")
            .start()
            .await;
        sys.db.stop_server().await;
        // Four misses fill the queue; their clients leave.
        for i in 0..4 {
            let url = stream_url(&sys, &format!("Outage Wolf {i}"), "Outage Bear");
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                let mut stream = sse::open(&url, None).await;
                while stream.next().await.is_some() {}
            })
            .await;
        }
        let stream = jobs(&sys).await;
        assert_eq!(
            stream.get_info().await.unwrap().state.messages,
            4,
            "the queue is full"
        );
        // Every delivery fails (no Postgres); the last one ends the job.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let exhausted = worker_metric(&sys, "versus_jobs_exhausted_total", "").await;
            let stored = stream.get_info().await.unwrap().state.messages;
            if exhausted >= 4.0 && stored == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{exhausted} jobs exhausted, {stored} still stored"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        sys.db.start_server().await;
        // Fresh misses are answered: the queue has room.
        for i in 0..2 {
            let events = fight(&sys, &format!("After Lynx {i}"), "After Ibis").await;
            assert_eq!(events.last().unwrap().event, "done", "{events:?}");
        }
        // And the gauge of live jobs comes back to zero (read every 5 s).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let queued = worker_metric(&sys, "versus_jobs_queued", "").await;
            let stored = worker_metric(&sys, "versus_jobs_stored", "").await;
            if queued == 0.0 && stored == 0.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "versus_jobs_queued {queued}, versus_jobs_stored {stored}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

#[test]
fn a_clients_job_leaves_the_queue_when_nobody_waits_for_it_any_more() {
    run(async {
        // No worker: the job waits, and its client gives up after 3 s.
        let sys = System::builder()
            .workers(0)
            .api_env("VERSUS_STREAM_TIMEOUT_SECS", "3")
            .start()
            .await;
        let events = fight(&sys, "Lonely Yak", "Lonely Gnu").await;
        let end = events.last().unwrap();
        assert_eq!(end.event, "error", "{events:?}");
        assert_eq!(end.json()["code"], "timeout", "{events:?}");
        // The job's TTL is the client's wait: it is gone soon after, delivered or not.
        let stream = jobs(&sys).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stored = stream.get_info().await.unwrap().state.messages;
            if stored == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{stored} jobs still stored");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
}

#[test]
fn joins_past_a_clients_joins_limit_get_429_while_other_clients_join() {
    run(async {
        // Two joins a minute per client; clients named by a trusted proxy (the test, here).
        let sys = System::builder()
            .workers(1)
            .api_env("VERSUS_CLIENT_JOINS_PER_MINUTE", "2")
            .api_env("VERSUS_TRUSTED_PROXIES", "127.0.0.1")
            .sim_env("VERSUS_SIM_TTFT_MS", "50")
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "10")
            .sim_env("VERSUS_SIM_ANSWER_TOKENS", "200")
            .start()
            .await;
        let url = stream_url(&sys, "Joined Kraken", "Joined Leviathan");
        let one = [("x-forwarded-for", "198.51.100.1")];
        // Starting the generation is no join.
        let mut first = sse::open_with(&url, None, &one).await;
        first.until_chunks(1).await;
        let _joins = [
            sse::open_with(&url, None, &one).await,
            sse::open_with(&url, None, &one).await,
        ];
        let refused = crate::http()
            .get(&url)
            .header("x-forwarded-for", "198.51.100.1")
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 429);
        assert!(refused.headers().contains_key("retry-after"));
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        // Another client joins the same generation.
        let mut other = sse::open_with(&url, None, &[("x-forwarded-for", "198.51.100.2")]).await;
        other.until_chunks(1).await;
        assert_eq!(sys.sim.chat_calls().await, 1);
    });
}
