//! Faults: a worker killed mid-stream, NATS restarted mid-stream, a rate-limited upstream, a
//! stream cut mid-way, answers cut at the token cap or empty, an upstream that fails every try,
//! a matchup that keeps failing, and streams and consumers deleted under the workers.

use std::time::Duration;

use async_nats::jetstream;
use futures::future::join_all;
use serde_json::{Value, json};
use versus_shared::wire;
use versus_testkit::{System, eventually, sse};

use crate::{fight, http, quick, rows, run, shape, stream_url, text_of, worker_metric};

#[test]
fn a_worker_killed_mid_stream_is_replaced_and_every_client_gets_the_whole_answer() {
    run(async {
        let mut sys = quick()
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "20")
            .start()
            .await;
        let url = stream_url(&sys, "Bruce Lee", "Chuck Norris");
        let mut watcher = sse::open(&url, None).await;
        // Wait until the answer is flowing.
        watcher.until_chunks(5).await;
        let key = {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT key, worker FROM generations WHERE status = 'running'")
                    .fetch_all(&sys.db.pool().await)
                    .await
                    .unwrap();
            assert_eq!(rows.len(), 1);
            let (key, owner) = rows.into_iter().next().unwrap();
            let victim = sys
                .workers
                .iter_mut()
                .find(|w| owner.starts_with(&format!("{}-", w.pid())))
                .expect("the owner is one of our workers");
            victim.kill().await;
            key
        };
        // Others arrive after the crash, before and after the new attempt begins.
        let others = join_all((0..3).map(|_| {
            let url = url.clone();
            async move { sse::open(&url, None).await.collect_all().await }
        }));
        let (rest, others) = tokio::join!(watcher.collect_all(), others);
        assert!(
            rest.iter().any(|e| e.event == "reset"),
            "the first client was told to drop its partial text: {rest:?}"
        );
        assert_eq!(rest.last().unwrap().event, "done", "{rest:?}");
        let text = text_of(&rest);
        for events in &others {
            assert_eq!(events.last().unwrap().event, "done");
            assert_eq!(text_of(events), text);
        }
        assert_eq!(rows(&sys, &key).await, [("done".to_owned(), Some(text))]);
        let calls = sys.sim.chat_calls().await;
        assert!(calls <= 2, "the upstream saw {calls} calls");
    });
}

#[test]
fn a_nats_restart_mid_stream_loses_no_answer() {
    run(async {
        let mut sys = quick()
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "20")
            .start()
            .await;
        let url = stream_url(&sys, "Achilles", "Hector");
        let mut watcher = sse::open(&url, None).await;
        let mut seen = watcher.until_chunks(5).await;
        // The events stream lives in memory: a restart empties it, and every process reconnects.
        sys.nats.restart().await;
        seen.extend(watcher.collect_all().await);
        assert_eq!(seen.last().unwrap().event, "done", "{seen:?}");
        let text = text_of(&seen);
        let key = seen[0].json()["key"].as_str().unwrap().to_owned();
        assert_eq!(
            rows(&sys, &key).await,
            [("done".to_owned(), Some(text.clone()))]
        );
        // And the answer is served whole afterwards.
        let again = sse::open(&url, None).await.collect_all().await;
        assert_eq!(text_of(&again), text);
    });
}

#[test]
fn a_rate_limited_upstream_is_retried_no_earlier_than_it_asked() {
    run(async {
        let sys = quick().start().await;
        sys.sim
            .fault(json!({
                "kind": "chat",
                "fault": {"type": "status", "status": 429, "retry_after_secs": 1},
                "times": 1
            }))
            .await;
        let events = fight(&sys, "Tortoise", "Hare").await;
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
        let calls = sys.sim.calls_of("chat").await;
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0]["status"], json!(429));
        let gap = calls[1]["at_ms"].as_u64().unwrap() - calls[0]["at_ms"].as_u64().unwrap();
        assert!(gap >= 1000, "retried after {gap} ms, before Retry-After");
    });
}

#[test]
fn a_stream_cut_mid_way_is_never_stored() {
    run(async {
        let sys = quick()
            .worker_env("VERSUS_UPSTREAM_MAX_TRIES", "2")
            .worker_env("VERSUS_UPSTREAM_BACKOFF_MS", "50")
            .start()
            .await;
        sys.sim
            .fault(
                json!({"kind": "chat", "fault": {"type": "cut", "after_tokens": 5}, "times": null}),
            )
            .await;
        let events = fight(&sys, "Rock", "Paper").await;
        let end = events.last().unwrap();
        assert_eq!(end.event, "error", "{events:?}");
        assert_eq!(end.json()["retryable"], json!(true));
        assert!(
            events.iter().any(|e| e.event == "reset"),
            "the retry voided the partial text"
        );
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        let response = crate::http()
            .get(format!("{}/v1/fights/{key}", sys.api_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "nothing partial is served");
        let stored = rows(&sys, &key).await;
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0], ("failed".to_owned(), None));
        assert_eq!(sys.sim.chat_calls().await, 2);
    });
}

/// The text of the first attempt a client saw, before its `reset`.
fn before_reset(events: &[sse::SseEvent]) -> String {
    let first: Vec<sse::SseEvent> = events
        .iter()
        .take_while(|e| e.event != "reset")
        .cloned()
        .collect();
    text_of(&first)
}

/// What `GET /v1/fights/{key}` answers: its status, and the stored text.
async fn stored_text(sys: &System, key: &str) -> (u16, Option<String>) {
    let response = http()
        .get(format!("{}/v1/fights/{key}", sys.api_url()))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["text"].as_str().map(str::to_owned))
}

#[test]
fn an_answer_cut_at_its_token_cap_is_asked_for_again_and_only_the_whole_one_is_stored() {
    run(async {
        let sys = quick().start().await;
        // The upstream stops after five tokens with `finish_reason: "length"`, once.
        sys.sim
            .fault(json!({"kind": "chat", "fault": {"type": "finish", "reason": "length", "after_tokens": 5}, "times": 1}))
            .await;
        let events = fight(&sys, "Tortoise", "Achilles").await;
        assert_eq!(
            shape(&events),
            ["meta", "chunk*", "reset", "chunk*", "done"],
            "the cut answer streamed, then was dropped for the whole one: {events:?}"
        );
        let text = text_of(&events);
        let cut = before_reset(&events);
        assert!(
            !cut.is_empty() && text.starts_with(&cut) && text.len() > cut.len(),
            "{cut:?} then {text:?}"
        );
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        assert_eq!(stored_text(&sys, &key).await, (200, Some(text.clone())));
        assert_eq!(rows(&sys, &key).await, [("done".to_owned(), Some(text))]);
        let calls = sys.sim.calls_of("chat").await;
        let faults: Vec<&Value> = calls.iter().map(|c| &c["fault"]).collect();
        assert_eq!(faults, [&json!("finish"), &Value::Null], "{calls:?}");
    });
}

#[test]
fn answers_cut_or_empty_twice_end_with_a_retryable_error_store_nothing_and_only_a_filter_cools_down()
 {
    run(async {
        // One failure would start a cool-down, were it about the matchup.
        let sys = quick()
            .worker_env("VERSUS_COOLDOWN_AFTER_FAILURES", "1")
            .worker_env("VERSUS_COOLDOWN_SECS", "600")
            .start()
            .await;
        sys.sim
            .fault(
                json!({"kind": "chat", "fault": {"type": "finish", "after_tokens": 5}, "times": 2}),
            )
            .await;
        let events = fight(&sys, "Hare", "Hound").await;
        assert_eq!(
            shape(&events),
            ["meta", "chunk*", "reset", "chunk*", "error"],
            "{events:?}"
        );
        let error = events.last().unwrap().json();
        assert_eq!(error["code"], json!("upstream_unavailable"), "{error}");
        assert_eq!(error["retryable"], json!(true), "{error}");
        assert!(error.get("retry_after").is_none(), "no cool-down: {error}");
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        assert_eq!(
            stored_text(&sys, &key).await.0,
            404,
            "nothing cut is served"
        );
        assert_eq!(rows(&sys, &key).await, [("failed".to_owned(), None)]);
        assert_eq!(sys.sim.chat_calls().await, 2);
        // Asked again, the matchup is answered: a cut answer says nothing about it.
        let again = fight(&sys, "Hound", "Hare").await;
        assert_eq!(shape(&again), ["meta", "chunk*", "done"], "{again:?}");

        // Two empty answers (`stop` and no text): nothing was published, so no reset.
        sys.sim
            .fault(
                json!({"kind": "chat", "fault": {"type": "finish", "reason": "stop"}, "times": 2}),
            )
            .await;
        let empty = fight(&sys, "Silence", "Noise").await;
        assert_eq!(shape(&empty), ["meta", "error"], "{empty:?}");
        assert_eq!(empty[1].json()["code"], json!("upstream_unavailable"));
        assert_eq!(empty[1].json()["retryable"], json!(true));
        let key = empty[0].json()["key"].as_str().unwrap().to_owned();
        assert_eq!(stored_text(&sys, &key).await.0, 404);
        assert_eq!(sys.sim.chat_calls().await, 5);

        // One empty answer, then a whole one.
        sys.sim
            .fault(
                json!({"kind": "chat", "fault": {"type": "finish", "reason": "stop"}, "times": 1}),
            )
            .await;
        let answered = fight(&sys, "Echo", "Narcissus").await;
        assert_eq!(shape(&answered), ["meta", "chunk*", "done"], "{answered:?}");
        let key = answered[0].json()["key"].as_str().unwrap().to_owned();
        assert_eq!(
            stored_text(&sys, &key).await,
            (200, Some(text_of(&answered)))
        );
        assert_eq!(sys.sim.chat_calls().await, 7);

        // The provider's filter cutting both answers says something about the matchup: it
        // cools down.
        sys.sim
            .fault(json!({"kind": "chat", "fault": {"type": "finish", "reason": "content_filter", "after_tokens": 3}, "times": 2}))
            .await;
        let filtered = fight(&sys, "Medusa", "Perseus").await;
        let error = filtered.last().unwrap().json();
        assert_eq!(error["code"], json!("upstream_refused"), "{error}");
        assert!(
            error["retry_after"].as_u64().is_some(),
            "cooling down: {error}"
        );
        let key = filtered[0].json()["key"].as_str().unwrap().to_owned();
        assert_eq!(stored_text(&sys, &key).await.0, 404);
    });
}

#[test]
fn an_upstream_failing_every_try_gives_a_retryable_error_and_a_later_request_starts_afresh() {
    run(async {
        let sys = quick()
            .worker_env("VERSUS_UPSTREAM_MAX_TRIES", "3")
            .worker_env("VERSUS_UPSTREAM_BACKOFF_MS", "50")
            .start()
            .await;
        sys.sim.fail_every_chat().await;
        let both = join_all([fight(&sys, "Fire", "Ice"), fight(&sys, "Ice", "Fire")]).await;
        for events in &both {
            assert_eq!(shape(events), ["meta", "error"], "{events:?}");
            let error: Value = events[1].json();
            assert_eq!(error["retryable"], json!(true));
            assert!(error["code"].is_string() && error["message"].is_string());
        }
        assert_eq!(sys.sim.chat_calls().await, 3, "one job, three tries");

        sys.sim.clear_faults().await;
        let again = fight(&sys, "Fire", "Ice").await;
        assert_eq!(shape(&again), ["meta", "chunk*", "done"], "{again:?}");
        assert_eq!(again[0].json()["cached"], json!(false));
        assert_eq!(sys.sim.chat_calls().await, 4);
        let cached = fight(&sys, "Fire", "Ice").await;
        assert_eq!(cached[0].json()["cached"], json!(true));
        assert_eq!(sys.sim.chat_calls().await, 4);
    });
}

#[test]
fn a_worker_given_sigterm_finishes_its_answer_before_it_exits() {
    run(async {
        let mut sys = quick()
            .workers(1)
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "20")
            .start()
            .await;
        let url = stream_url(&sys, "Marathon", "Sprint");
        let mut client = sse::open(&url, None).await;
        while client.next().await.expect("the stream goes on").event != "chunk" {}
        let status = sys.workers[0].terminate().await;
        assert!(status.success(), "the worker exited cleanly: {status:?}");
        let rest = client.collect_all().await;
        assert_eq!(rest.last().unwrap().event, "done", "{rest:?}");
        assert!(rest.iter().all(|e| e.event != "reset"), "{rest:?}");
        assert_eq!(sys.sim.chat_calls().await, 1);
    });
}

#[test]
fn an_upstream_that_never_answers_frees_the_slot_within_the_limit_and_a_retry_answers() {
    run(async {
        // One slot, so that a hung call would block every other job.
        let sys = quick()
            .workers(1)
            .worker_env("VERSUS_WORKER_CONCURRENCY", "1")
            .worker_env("VERSUS_UPSTREAM_HEADERS_TIMEOUT_SECS", "1")
            .worker_env("VERSUS_UPSTREAM_MAX_TRIES", "2")
            .worker_env("VERSUS_UPSTREAM_BACKOFF_MS", "50")
            .start()
            .await;
        // The first call is taken and never answered; the retry is.
        sys.sim
            .fault(json!({"kind": "chat", "fault": {"type": "hang"}, "times": 1}))
            .await;
        let began = std::time::Instant::now();
        let events = fight(&sys, "Sphinx", "Minotaur").await;
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
        let took = began.elapsed();
        assert!(
            took < std::time::Duration::from_secs(10),
            "answered after {took:?}"
        );
        let calls = sys.sim.calls_of("chat").await;
        let faults: Vec<&Value> = calls.iter().map(|c| &c["fault"]).collect();
        assert_eq!(faults, [&json!("hang"), &Value::Null], "{calls:?}");

        // An upstream that never answers at all: a retryable error within the tries' limits, and
        // the slot serves the next job.
        sys.sim
            .fault(json!({"kind": "chat", "fault": {"type": "hang"}, "times": 2}))
            .await;
        let began = std::time::Instant::now();
        let failed = fight(&sys, "Scylla", "Charybdis").await;
        assert_eq!(shape(&failed), ["meta", "error"], "{failed:?}");
        assert_eq!(failed[1].json()["retryable"], json!(true));
        let took = began.elapsed();
        assert!(
            took < std::time::Duration::from_secs(10),
            "gave up after {took:?}"
        );
        let next = fight(&sys, "Cyclops", "Odysseus").await;
        assert_eq!(shape(&next), ["meta", "chunk*", "done"], "{next:?}");
        assert_eq!(sys.sim.chat_calls().await, 5);
    });
}

/// The cool-down of the matchup that keeps failing: long enough that the four requests the test
/// makes meanwhile (each a round trip through a worker) fit in it on a loaded two-core machine,
/// where they may take seconds. The test then waits as long as the last refusal said.
const COOLDOWN_SECS: u64 = 10;

#[test]
fn a_matchup_that_keeps_failing_cools_down_and_costs_nothing_until_it_is_tried_again() {
    run(async {
        let sys = quick()
            .worker_env("VERSUS_UPSTREAM_MAX_TRIES", "1")
            .worker_env("VERSUS_COOLDOWN_AFTER_FAILURES", "3")
            .worker_env("VERSUS_COOLDOWN_SECS", COOLDOWN_SECS.to_string())
            .start()
            .await;
        // The upstream refuses the matchup itself (a 400): a failure that belongs to it.
        sys.sim
            .fault(
                json!({"kind": "chat", "fault": {"type": "status", "status": 400}, "times": null}),
            )
            .await;
        // Three failed generations in a row, each paid for once; the third starts the cool-down,
        // after which asking again may succeed.
        for tries in 1..=3 {
            let events = fight(&sys, "Sun", "Moon").await;
            assert_eq!(shape(&events), ["meta", "error"], "{events:?}");
            let error = events[1].json();
            assert_eq!(error["code"], json!("upstream_refused"), "{error}");
            assert_eq!(error["retryable"], json!(tries == 3), "{error}");
            assert_eq!(error.get("retry_after").is_some(), tries == 3, "{error}");
            assert_eq!(sys.sim.chat_calls().await, tries);
        }
        sys.sim.clear_faults().await;

        // Meanwhile every request gets the last error with when to come back, costs nothing,
        // and does not put the end of the cool-down off: each says to come back no later than
        // the one before.
        let mut come_back = COOLDOWN_SECS;
        for _ in 0..3 {
            let events = fight(&sys, "Moon", "Sun").await;
            assert_eq!(shape(&events), ["meta", "error"], "{events:?}");
            let error = events[1].json();
            assert_eq!(error["code"], json!("upstream_refused"), "{error}");
            let after = error["retry_after"].as_u64().unwrap();
            assert!((1..=come_back).contains(&after), "{error}");
            come_back = after;
        }
        let post = http()
            .post(format!("{}/v1/fights", sys.api_url()))
            .json(&json!({"a": "Sun", "b": "Moon"}))
            .send()
            .await
            .unwrap();
        assert_eq!(post.status(), 503);
        let retry_after: u64 = post.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=come_back).contains(&retry_after), "{retry_after}");
        assert_eq!(
            sys.sim.chat_calls().await,
            3,
            "nothing was paid for while cooling down"
        );

        // Once it has cooled down, when the last refusal said to come back, the next request
        // tries again.
        tokio::time::sleep(Duration::from_secs(retry_after)).await;
        let again = fight(&sys, "Sun", "Moon").await;
        assert_eq!(shape(&again), ["meta", "chunk*", "done"], "{again:?}");
        assert_eq!(sys.sim.chat_calls().await, 4);
    });
}

#[test]
fn an_upstream_outage_does_not_cool_a_matchup_down() {
    run(async {
        let sys = quick()
            .worker_env("VERSUS_UPSTREAM_MAX_TRIES", "1")
            .worker_env("VERSUS_COOLDOWN_AFTER_FAILURES", "2")
            .worker_env("VERSUS_COOLDOWN_SECS", "600")
            .start()
            .await;
        // A storm of 500s says nothing about the matchup: however many generations it fails, the
        // next request after it is answered.
        sys.sim.fail_every_chat().await;
        for tries in 1..=3 {
            let events = fight(&sys, "Rain", "Snow").await;
            assert_eq!(shape(&events), ["meta", "error"], "{events:?}");
            let error = events[1].json();
            assert_eq!(error["code"], json!("upstream_unavailable"), "{error}");
            assert_eq!(error["retryable"], json!(true), "{error}");
            assert!(error.get("retry_after").is_none(), "{error}");
            assert_eq!(sys.sim.chat_calls().await, tries);
        }
        sys.sim.clear_faults().await;
        let again = fight(&sys, "Snow", "Rain").await;
        assert_eq!(shape(&again), ["meta", "chunk*", "done"], "{again:?}");
        assert_eq!(sys.sim.chat_calls().await, 4);
    });
}

#[test]
fn a_miss_asked_while_nats_is_down_is_published_once_it_is_back() {
    run(async {
        let mut sys = quick().start().await;
        sys.nats.kill().await;
        // The API retries its reads and the job's publish (with the same message id) until
        // JetStream answers again.
        let url = stream_url(&sys, "Odysseus", "Polyphemus");
        let asking = tokio::spawn(async move { sse::open(&url, None).await.collect_all().await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        sys.nats.restart().await;
        let events = asking.await.unwrap();
        assert_eq!(events.last().unwrap().event, "done", "{events:?}");
        let text = text_of(&events);
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        assert_eq!(rows(&sys, &key).await, [("done".to_owned(), Some(text))]);
    });
}

/// How soon a worker declares again what an operator deleted.
const REDECLARED_WITHIN: Duration = Duration::from_secs(10);

/// Waits until the jobs stream and both lanes' consumers are there, as the admin sees them.
async fn jobs_declared(admin: &jetstream::Context) {
    eventually(
        "a worker to declare the jobs stream and its consumers again",
        REDECLARED_WITHIN,
        || async {
            let Ok(jobs) = admin.get_stream(wire::JOBS_STREAM).await else {
                return false;
            };
            jobs.consumer_info(wire::WORKERS_CONSUMER).await.is_ok()
                && jobs.consumer_info(wire::PREWARM_CONSUMER).await.is_ok()
        },
    )
    .await;
}

/// Deletes `stream` as the admin, and waits until a worker has declared it again.
async fn delete_and_wait(sys: &System, admin: &jetstream::Context, stream: &str) {
    assert!(admin.delete_stream(stream).await.unwrap().success);
    eventually(
        &format!("a worker to declare {stream} again"),
        REDECLARED_WITHIN,
        || async { admin.get_stream(stream).await.is_ok() },
    )
    .await;
    let counted = worker_metric(
        sys,
        "versus_bus_redeclared_total",
        &format!("stream=\"{stream}\""),
    )
    .await;
    assert!(counted >= 1.0, "{stream} declared again {counted} times");
}

/// A fight that must end in an answer.
async fn answered(sys: &System, a: &str, b: &str) -> Vec<sse::SseEvent> {
    let events = fight(sys, a, b).await;
    assert_eq!(
        shape(&events),
        ["meta", "chunk*", "done"],
        "{a} vs {b}: {events:?}"
    );
    events
}

#[test]
fn deleted_streams_and_consumers_are_declared_again_and_misses_work() {
    run(async {
        let sys = quick().start().await;
        let admin = jetstream::new(sys.nats.client().await);
        let first = answered(&sys, "Kraken", "Leviathan").await;
        let first_key = first[0].json()["key"].as_str().unwrap().to_owned();

        // The jobs stream, and its consumers with it: both come back, and a new miss is served.
        delete_and_wait(&sys, &admin, wire::JOBS_STREAM).await;
        jobs_declared(&admin).await;
        answered(&sys, "Golem", "Gargoyle").await;

        // The answers bucket: its answers are gone, but new ones are stored and served, and an old
        // one is served again.
        let bucket = format!("KV_{}", wire::ANSWERS_BUCKET);
        delete_and_wait(&sys, &admin, &bucket).await;
        let answers = admin.get_key_value(wire::ANSWERS_BUCKET).await.unwrap();
        assert_eq!(
            answers.get(format!("text.{first_key}")).await.unwrap(),
            None
        );
        let stored = answered(&sys, "Wyvern", "Basilisk").await;
        let key = stored[0].json()["key"].as_str().unwrap().to_owned();
        assert!(answers.get(format!("text.{key}")).await.unwrap().is_some());
        let served = http()
            .get(format!("{}/v1/fights/{key}", sys.api_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(served.status(), 200);
        let calls = sys.sim.chat_calls().await;
        let again = answered(&sys, "Kraken", "Leviathan").await;
        assert_eq!(text_of(&again), text_of(&first));
        assert_eq!(
            sys.sim.chat_calls().await,
            calls,
            "the stored answer was not paid again"
        );

        // The events stream and the spend bucket.
        delete_and_wait(&sys, &admin, wire::EVENTS_STREAM).await;
        answered(&sys, "Hydra", "Chimera").await;
        delete_and_wait(&sys, &admin, &format!("KV_{}", wire::SPEND_BUCKET)).await;
        answered(&sys, "Cerberus", "Griffin").await;

        // A lane's consumer alone: the workers declare it again and pull from it.
        let jobs = admin.get_stream(wire::JOBS_STREAM).await.unwrap();
        assert!(
            jobs.delete_consumer(wire::WORKERS_CONSUMER)
                .await
                .unwrap()
                .success
        );
        jobs_declared(&admin).await;
        answered(&sys, "Phoenix", "Roc").await;
    });
}
