//! A 3-node JetStream hub (`hub1`..`hub3`, every stream and bucket at three replicas) with two
//! leaf edges, under load: the node that leads the jobs stream (and, moved there first, the
//! events stream and the answers bucket) is SIGKILLed while 100 misses asked at the edges are
//! being generated and 100 more arrive, and started again once another node leads. Nothing a
//! client asked for is lost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use versus_shared::wire;
use versus_testkit::{System, eventually, sse, stream_leader};

use crate::{quick, rows, run, stream_url_at, text_of};

/// Misses started before the kill, and as many again right after it (during the election).
const WAVE: usize = 100;

/// Opens the stream of matchup `i` at an edge (each in turn) on its own task and collects it
/// to the end, with how many times it was refused first. A client asking while its edge's
/// leaf link reconnects to a surviving hub server may be refused at once with a retryable
/// `unavailable` (nothing was queued for it); it asks again, as the page's Retry does.
fn miss(sys: &System, i: usize) -> tokio::task::JoinHandle<(Vec<sse::SseEvent>, usize)> {
    let edge = &sys.edges[i % sys.edges.len()];
    let url = stream_url_at(edge.api_url(), &format!("Hub fighter {i}"), "The Leader");
    tokio::spawn(async move {
        let mut refusals = 0;
        loop {
            let events = sse::open(&url, None).await.collect_all().await;
            let refused = matches!(&events[..], [meta, error]
                if meta.event == "meta"
                    && error.event == "error"
                    && error.json()["code"] == "unavailable"
                    && error.json()["retryable"] == true);
            if !refused || refusals == 20 {
                return (events, refusals);
            }
            refusals += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

#[test]
fn the_jobs_leader_killed_under_load_loses_no_answer() {
    run(async {
        let mut sys = quick()
            .edges(2)
            // Every miss is in flight at once, each for a few seconds.
            .worker_env("VERSUS_WORKER_CONCURRENCY", "128")
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "10")
            .sim_env("VERSUS_SIM_ANSWER_TOKENS", "30")
            .start()
            .await;
        let admin = sys.admin_client().await;
        // VERSUS_NATS_REPLICAS=3: the streams and buckets live on every node.
        let js = async_nats::jetstream::new(admin.clone());
        for name in [
            wire::JOBS_STREAM.to_owned(),
            wire::EVENTS_STREAM.to_owned(),
            format!("KV_{}", wire::ANSWERS_BUCKET),
            format!("KV_{}", wire::SPEND_BUCKET),
            format!("KV_{}", wire::QUOTA_BUCKET),
        ] {
            let info = js
                .get_stream(&name)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .clone();
            assert_eq!(info.config.num_replicas, 3, "{name}");
        }
        // Where they are replicated, the same node leads the events stream and the answers bucket
        // too: its death then also interrupts the workers' event publishes and KV writes.
        let (leader, _) = crate::one_leader_for_every_write(&admin).await;
        let mut streams: Vec<_> = (0..WAVE).map(|i| miss(&sys, i)).collect();
        // The first wave is being generated: its jobs are delivered and unacknowledged, and their
        // events are streaming.
        eventually(
            "the first wave's generations are under way",
            Duration::from_secs(30),
            || async { sys.sim.chat_calls().await >= WAVE as u64 },
        )
        .await;
        eprintln!("killing {leader}, the leader of {}", wire::JOBS_STREAM);
        sys.hub_node(&leader).kill().await;
        let killed = Instant::now();
        // The second wave arrives while the jobs stream elects a new leader: the API retries its
        // publishes with the same message ids until one accepts them.
        streams.extend((WAVE..2 * WAVE).map(|i| miss(&sys, i)));
        // The killed node comes back once another leads the stream.
        let mut new_leader = None;
        while new_leader.is_none() && killed.elapsed() < Duration::from_secs(20) {
            new_leader = stream_leader(&admin, wire::JOBS_STREAM)
                .await
                .filter(|l| *l != leader);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let new_leader = new_leader.expect("the jobs stream elects a new leader within 20 s");
        eprintln!(
            "{new_leader} leads {} {:?} after the kill; restarting {leader}",
            wire::JOBS_STREAM,
            killed.elapsed()
        );
        sys.hub_node(&leader).restart().await;
        eprintln!("{leader} is back");

        let mut answers: BTreeMap<String, String> = BTreeMap::new();
        let (mut resets, mut refused) = (0, 0);
        for (i, result) in join_all(streams).await.into_iter().enumerate() {
            let (events, refusals) = result.unwrap();
            resets += usize::from(events.iter().any(|e| e.event == "reset"));
            refused += usize::from(refusals > 0);
            // A stream that got under way ends with its answer, whatever happened meanwhile.
            assert!(
                i >= WAVE || refusals == 0,
                "stream {i}, asked before the kill, was refused"
            );
            let last = events
                .last()
                .unwrap_or_else(|| panic!("stream {i} is empty"));
            assert_eq!(
                last.event, "done",
                "stream {i} did not end with done: {events:?}"
            );
            let key = events[0].json()["key"].as_str().unwrap().to_owned();
            answers.insert(key, text_of(&events));
        }
        assert_eq!(answers.len(), 2 * WAVE, "one key per matchup");
        eprintln!(
            "every stream ended with done; {resets} of them were reset, {refused} refused at first"
        );
        let http = crate::http();
        for (key, text) in &answers {
            assert!(!text.is_empty(), "{key}: no text");
            // One stored answer per key, the one the client was streamed.
            assert_eq!(
                rows(&sys, key).await,
                [("done".to_owned(), Some(text.clone()))],
                "{key}"
            );
            let stored: serde_json::Value = http
                .get(format!("{}/v1/fights/{key}", sys.api_url()))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(stored["text"].as_str(), Some(text.as_str()), "{key}");
        }
    });
}
