//! Shutdown hands work over: an API replica that stops ends its streams so that clients resume
//! on another replica, and a worker stopped past its grace period gives its jobs back at once.

use std::time::{Duration, Instant};

use futures::future::join_all;
use versus_testkit::{Signal, sse};

use crate::{http, quick, rows, run, stream_url, text_of};

/// How long an API replica given SIGTERM may take to exit. It ends its streams at once and
/// gives its tasks at most 5 s to finish (`api/src/main.rs`); the margin is for a loaded
/// two-core machine. Its clients' streams must end well before: they are handed over, not run
/// to their end (the answer takes 4 s), which the events below show.
const API_EXITS_WITHIN: Duration = Duration::from_secs(15);

/// How long after a stopped worker's exit the other may take to start the job again. It starts
/// it as soon as the job is given back; ten seconds leave a loaded machine room and still fail
/// a job that waits for the stopped worker's lease (30 s, set below) to run out.
const RESTARTED_WITHIN: Duration = Duration::from_secs(10);

#[test]
fn an_api_replica_given_sigterm_hands_its_streams_over_and_clients_resume_exactly_on_another() {
    run(async {
        let mut sys = quick()
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "20")
            .sim_env("VERSUS_SIM_ANSWER_TOKENS", "80")
            .start()
            .await;
        let other = sys.spawn_api().await;
        let url = stream_url(&sys, "Tortoise", "Achilles");
        let mut clients = Vec::new();
        for _ in 0..50 {
            clients.push(sse::open(&url, None).await);
        }
        // One more, read raw: SSE parsers do not surface the `retry:` hint itself.
        let raw = http().get(&url).send().await.unwrap();
        let mut held = Vec::new();
        for client in &mut clients {
            held.push(client.until_chunks(1).await);
        }

        let stopping = Instant::now();
        sys.api.signal(Signal::SIGTERM);
        let rests = join_all(clients.iter_mut().map(|c| c.collect_all())).await;
        let status = sys.api.wait_exit(API_EXITS_WITHIN).await;
        assert!(status.success(), "the replica exited cleanly: {status:?}");
        eprintln!("the replica exited {:?} after SIGTERM", stopping.elapsed());
        let body = raw.text().await.unwrap();
        assert!(
            body.contains("\nretry: 500\n"),
            "the stream ends with a reconnect hint: {body}"
        );

        // Each client reconnects, as EventSource does, to the other replica.
        let resumed_url = url.replace(sys.api_url(), &other.url);
        let resumed = join_all(held.into_iter().zip(rests).map(|(mut events, rest)| {
            let url = resumed_url.clone();
            async move {
                events.extend(rest);
                assert!(
                    events
                        .iter()
                        .all(|e| e.event != "done" && e.event != "error"),
                    "the stream was handed over, not ended: {events:?}"
                );
                let last = events.iter().rev().find(|e| e.event == "chunk").unwrap();
                let rest = sse::open(&url, Some(&last.id)).await.collect_all().await;
                assert_eq!(rest.last().unwrap().event, "done", "{rest:?}");
                events.extend(rest);
                events
            }
        }))
        .await;
        let key = resumed[0][0].json()["key"].as_str().unwrap().to_owned();
        let stored = rows(&sys, &key).await;
        let [(status, Some(text))] = &stored[..] else {
            panic!("one stored answer: {stored:?}");
        };
        assert_eq!(status, "done");
        for events in &resumed {
            assert_eq!(&text_of(events), text, "{events:?}");
        }
        assert_eq!(sys.sim.chat_calls().await, 1);
    });
}

#[test]
fn a_worker_stopped_past_its_grace_period_gives_its_job_back_and_another_starts_it_at_once() {
    run(async {
        let mut sys = quick()
            // The default lease: a claim the stopped worker kept would hold the job that long.
            .worker_env("VERSUS_LEASE_SECS", "30")
            .worker_env("VERSUS_SHUTDOWN_GRACE_SECS", "1")
            // 120 tokens at 20 a second: six seconds, far past the grace period.
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "20")
            .sim_env("VERSUS_SIM_ANSWER_TOKENS", "120")
            .start()
            .await;
        let url = stream_url(&sys, "Hare", "Tortoise");
        let mut client = sse::open(&url, None).await;
        let mut events = client.until_chunks(1).await;
        let (key, owner, attempt): (String, String, i32) =
            sqlx::query_as("SELECT key, worker, attempt FROM generations WHERE status = 'running'")
                .fetch_one(&sys.db.pool().await)
                .await
                .unwrap();
        let owned_by = |pid: u32| owner.starts_with(&format!("{pid}-"));
        let victim = sys
            .workers
            .iter_mut()
            .find(|w| owned_by(w.pid()))
            .expect("the owner is one of our workers");
        let victim_pid = victim.pid();
        let status = victim.terminate().await;
        assert!(status.success(), "the worker exited cleanly: {status:?}");

        // The other worker starts a new attempt, which the client sees as `reset`, at once rather
        // than when the stopped worker's lease would have run out.
        let reset = async {
            loop {
                let event = client.next().await.expect("the stream goes on");
                let is_reset = event.event == "reset";
                events.push(event);
                if is_reset {
                    return;
                }
            }
        };
        let handed_over = tokio::time::timeout(RESTARTED_WITHIN, reset).await;
        assert!(
            handed_over.is_ok(),
            "no new attempt within {RESTARTED_WITHIN:?} of the worker's exit: {events:?}"
        );
        events.extend(client.collect_all().await);
        assert_eq!(events.last().unwrap().event, "done", "{events:?}");
        let text = text_of(&events);
        assert_eq!(rows(&sys, &key).await, [("done".to_owned(), Some(text))]);
        let (worker, last_attempt): (String, i32) =
            sqlx::query_as("SELECT worker, attempt FROM generations WHERE key = $1")
                .bind(&key)
                .fetch_one(&sys.db.pool().await)
                .await
                .unwrap();
        assert!(
            !worker.starts_with(&format!("{victim_pid}-")) && last_attempt > attempt,
            "another worker finished it under a new attempt: {worker} {last_attempt}"
        );
        assert_eq!(sys.sim.chat_calls().await, 2);
    });
}
