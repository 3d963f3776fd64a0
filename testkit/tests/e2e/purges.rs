//! A purge is final, and an answer has one identity across it (G13): a client that resumes
//! with the id of a purged answer gets `reset` and the whole current one, live or stored; and
//! once the purge route answered 204, no replica serves the purged answer, even while a hub
//! server that was SIGKILLed rejoins and the edges' mirrors lag.

use std::time::{Duration, Instant};

use serde_json::json;
use versus_shared::wire;
use versus_testkit::{NatsUser, System, eventually, move_leader, sse};

use crate::{
    fight, fight_at, http, metric, metrics_of, quick, rows, run, shape, stream_url, text_of,
};

/// At least 32 characters, as the API requires of an admin token.
const TOKEN: &str = "purges-admin-token-0123456789abcdef";

/// A system whose answers take two seconds to stream (40 tokens at 20 a second).
async fn slow() -> System {
    quick()
        .env("VERSUS_ADMIN_TOKEN", TOKEN)
        .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "20")
        .sim_env("VERSUS_SIM_ANSWER_TOKENS", "40")
        .start()
        .await
}

/// `DELETE /v1/admin/fights/{key}` at the API serving at `api`: its status.
async fn purge(api: &str, key: &str) -> u16 {
    http()
        .delete(format!("{api}/v1/admin/fights/{key}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The text stored for `key` once it is done.
async fn stored(sys: &System, key: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let [(status, Some(text))] = &rows(sys, key).await[..]
            && status == "done"
        {
            return text.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{key} was not stored within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The attempt a chunk's id names (`<attempt>:<end offset>`).
fn attempt_of(event: &sse::SseEvent) -> i64 {
    let (attempt, _) = event.id.split_once(':').expect("a chunk id");
    attempt.parse().expect("a number")
}

/// A client that read part of an answer and dropped: its key, the id of its last chunk, and
/// the whole answer, which is then stored and purged.
async fn held_then_purged(sys: &System) -> (String, String, String) {
    let mut client = sse::open(&stream_url(sys, "Tortoise", "Achilles"), None).await;
    let held = client.until_chunks(3).await;
    drop(client);
    let key = held[0].json()["key"].as_str().unwrap().to_owned();
    let last = held.iter().rev().find(|e| e.event == "chunk").unwrap();
    let (held_text, last_id) = (text_of(&held), last.id.clone());
    let first = stored(sys, &key).await;
    assert!(
        first.starts_with(&held_text) && first.len() > held_text.len(),
        "the client held part of {first:?}: {held_text:?}"
    );
    assert_eq!(purge(sys.api_url(), &key).await, 204);
    (key, last_id, first)
}

/// Asserts that `events` are a resume's `reset` and then one whole answer, the one stored for
/// `key` now, whose attempt is newer than the one the client held (`held_id`).
async fn one_whole_answer(sys: &System, key: &str, held_id: &str, events: &[sse::SseEvent]) {
    assert_eq!(
        shape(events),
        ["meta", "reset", "chunk*", "done"],
        "{events:?}"
    );
    let text = text_of(events);
    assert_eq!(text, stored(sys, key).await, "the whole stored answer");
    let held_attempt: i64 = held_id.split_once(':').unwrap().0.parse().unwrap();
    for chunk in events.iter().filter(|e| e.event == "chunk") {
        assert!(
            attempt_of(chunk) > held_attempt,
            "{chunk:?} after {held_id}"
        );
    }
}

#[test]
fn a_client_resuming_across_a_purge_gets_reset_and_the_whole_new_answer_as_it_streams() {
    run(async {
        let sys = slow().await;
        let (key, last_id, purged_text) = held_then_purged(&sys).await;
        // The matchup is asked again in other spellings (another prompt: another text), and is
        // being written when the client comes back with its Last-Event-ID.
        let mut other = sse::open(&stream_url(&sys, "achilles", "TORTOISE"), None).await;
        let mut seen = other.until_chunks(1).await;
        assert_eq!(seen[0].json()["key"], json!(key));
        let resumed = sse::open(&stream_url(&sys, "Tortoise", "Achilles"), Some(&last_id))
            .await
            .collect_all()
            .await;
        seen.extend(other.collect_all().await);
        assert_eq!(resumed[0].json()["cached"], json!(false), "{resumed:?}");
        one_whole_answer(&sys, &key, &last_id, &resumed).await;
        let text = text_of(&resumed);
        assert_eq!(text, text_of(&seen), "the answer the other client got");
        assert_ne!(text, purged_text, "another answer than the purged one");
        assert_eq!(sys.sim.chat_calls().await, 2);
    });
}

#[test]
fn a_client_resuming_across_a_purge_gets_reset_and_the_whole_stored_answer() {
    run(async {
        let sys = slow().await;
        let (key, last_id, purged_text) = held_then_purged(&sys).await;
        // The new answer is written and stored before the client comes back: its resume is a hit.
        let other = fight(&sys, "achilles", "TORTOISE").await;
        assert_eq!(other.last().unwrap().event, "done", "{other:?}");
        let new_text = stored(&sys, &key).await;
        assert_ne!(new_text, purged_text, "another answer than the purged one");
        let url = stream_url(&sys, "Tortoise", "Achilles");
        let resumed = sse::open(&url, Some(&last_id)).await.collect_all().await;
        assert_eq!(resumed[0].json()["cached"], json!(true), "{resumed:?}");
        one_whole_answer(&sys, &key, &last_id, &resumed).await;

        // A resume that names the stored answer itself gets exactly the rest of it.
        let current = other.iter().rev().find(|e| e.event == "chunk").unwrap();
        let attempt = attempt_of(current);
        let cut = new_text.char_indices().nth(10).unwrap().0;
        let rest = sse::open(&url, Some(&format!("{attempt}:{cut}")))
            .await
            .collect_all()
            .await;
        assert_eq!(shape(&rest), ["meta", "chunk*", "done"], "{rest:?}");
        assert_eq!(text_of(&rest), new_text[cut..]);
        assert_eq!(sys.sim.chat_calls().await, 2);
    });
}

#[test]
fn a_purge_answered_while_a_hub_server_rejoins_is_never_served_again() {
    run(async {
        let mut sys = quick()
            .edges(2)
            .env("VERSUS_ADMIN_TOKEN", TOKEN)
            .start()
            .await;
        let events = fight_at(sys.edges[0].api_url(), "Rejoin Ranger", "Killed Kraken").await;
        assert_eq!(events.last().unwrap().event, "done", "{events:?}");
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        let purged_text = text_of(&events);
        let get = |api: String, key: String| async move {
            let r = http()
                .get(format!("{api}/v1/fights/{key}"))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, body["text"].as_str().unwrap_or_default().to_owned())
        };
        // Every replica holds the answer: each edge in its mirror and memory, the hub's in memory.
        let apis: Vec<String> = std::iter::once(sys.api_url())
            .chain(sys.edges.iter().map(|e| e.api_url()))
            .map(str::to_owned)
            .collect();
        for api in &apis {
            eventually(
                "the replica serves the answer",
                Duration::from_secs(10),
                || {
                    let (api, key, text) = (api.clone(), key.clone(), purged_text.clone());
                    async move { get(api, key).await == (200, text) }
                },
            )
            .await;
        }
        // Answers written from now on are shorter: one that is served later is told apart from the
        // purged one by its text alone.
        sys.sim.config(json!({"answer_tokens": 20})).await;

        // The answers bucket is led by hub2, which dies: its replicas elect another leader, and
        // the edges' mirrors, which follow the leader, may fall behind until they find the new one.
        let admin = sys.admin_client().await;
        let bucket = format!("KV_{}", wire::ANSWERS_BUCKET);
        assert!(
            move_leader(&admin, &bucket, "hub2").await,
            "{bucket} led by hub2"
        );
        sys.hub_node("hub2").kill().await;
        let killed = Instant::now();
        // The purge is asked for until it succeeds (503 while the bucket elects its leader).
        let purged = loop {
            match purge(sys.api_url(), &key).await {
                204 => break Instant::now(),
                503 => tokio::time::sleep(Duration::from_millis(200)).await,
                status => panic!("the purge answered {status}"),
            }
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "the purge succeeds within a minute of the kill"
            );
        };
        eprintln!("purged {:?} after the kill", purged - killed);
        // How long each edge's mirror takes to hold the purge (measured, not asserted).
        for edge in &sys.edges {
            let client = edge.nats.connect_as(NatsUser::Admin).await.unwrap();
            let (name, entry) = (edge.name.clone(), format!("text.{key}"));
            tokio::spawn(async move {
                let mirror = async_nats::jetstream::new(client)
                    .get_key_value(wire::ANSWERS_BUCKET)
                    .await
                    .unwrap();
                loop {
                    match mirror.entry(entry.as_str()).await {
                        Ok(Some(e)) if e.operation != async_nats::jetstream::kv::Operation::Put => {
                            eprintln!(
                                "{name}'s mirror holds the purge {:?} after the 204 (revision {})",
                                purged.elapsed(),
                                e.revision
                            );
                            return;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            });
        }

        // For 15 s, every 100 ms, every replica is asked for it: by key, and as a stream (which
        // may start a new answer, then served as it should be). Meanwhile hub2 starts again, with
        // the purged answer in its store, and rejoins.
        let asking = {
            let (apis, key, purged_text) = (apis.clone(), key.clone(), purged_text.clone());
            tokio::spawn(async move {
                let (mut asked, mut found, mut streamed) = (0, 0, 0);
                while purged.elapsed() < Duration::from_secs(15) {
                    for api in &apis {
                        let (status, text) = get(api.clone(), key.clone()).await;
                        asked += 1;
                        found += usize::from(status == 200);
                        assert!(
                            text != purged_text,
                            "{api} served the purged answer {:?} after the purge",
                            purged.elapsed()
                        );
                        let events = fight_at(api, "Rejoin Ranger", "Killed Kraken").await;
                        assert!(
                            text_of(&events) != purged_text,
                            "{api} streamed the purged answer {:?} after the purge: {events:?}",
                            purged.elapsed()
                        );
                        streamed += usize::from(events.last().is_some_and(|e| e.event == "done"));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                eprintln!(
                    "{asked} reads by key ({found} found the new answer), {streamed} streams of \
                     the new answer; none served the purged one"
                );
            })
        };
        sys.hub_node("hub2").restart().await;
        eprintln!("hub2 is back {:?} after the 204", purged.elapsed());
        asking.await.unwrap();
        for api in &apis {
            let skipped = metric(&metrics_of(api).await, "versus_cache_stale_total", "");
            eprintln!("{api}: {skipped} reads of a purged value (a lagging copy) skipped");
        }
    });
}
