//! The events stream is bounded (`VERSUS_EVENTS_MAX_MIB`, discard old, a per-subject cap): a
//! flood of new answers within the stream's age trims the oldest events, never refuses a new
//! one, so no publish fails and every answer completes.
//!
//! The test kit's nats-server reads the repository's `nats.conf` (a 256 MB memory store), so
//! the test shrinks the cap instead of the store: the answers' events add up to several times
//! the cap, which without it (on a store of that size) would have filled the store and made
//! every publish fail.

use std::time::Instant;

use async_nats::jetstream::{self, stream::DiscardPolicy};
use futures::StreamExt;
use serde_json::{Value, json};
use versus_shared::{bus::EVENTS_PER_SUBJECT, wire};

use crate::{http, metric, metrics_of, quick, run, worker_metric};

/// The events stream's cap in the test, in MiB.
const CAP_MIB: i64 = 4;
/// Unique answers asked for, all within the stream's age (10 minutes).
const ANSWERS: usize = 2_000;
/// Requests in flight at once.
const AT_ONCE: usize = 64;

#[test]
fn unique_answers_past_the_events_cap_fail_no_publish_and_all_complete() {
    run(async {
        let sys = quick()
            .worker_env("VERSUS_EVENTS_MAX_MIB", CAP_MIB.to_string())
            .start()
            .await;
        let cap = CAP_MIB << 20;
        let admin = jetstream::new(sys.nats.client().await);
        let mut events = admin.get_stream(wire::EVENTS_STREAM).await.unwrap();
        let config = events.cached_info().config.clone();
        assert_eq!(config.max_bytes, cap);
        assert_eq!(config.discard, DiscardPolicy::Old);
        assert_eq!(config.max_messages_per_subject, EVENTS_PER_SUBJECT);

        let url = format!("{}/v1/fights", sys.api_url());
        let client = http();
        let began = Instant::now();
        let failures: Vec<String> = futures::stream::iter(0..ANSWERS)
            .map(|i| {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    let response = client
                        .post(&url)
                        .json(&json!({"a": format!("Flood {i}"), "b": "Tide"}))
                        .send()
                        .await
                        .map_err(|e| format!("{i}: {e}"))?;
                    let status = response.status();
                    let body: Value = response.json().await.map_err(|e| format!("{i}: {e}"))?;
                    let complete = body["text"].as_str().is_some_and(|t| !t.is_empty());
                    if status == 200 && complete {
                        Ok(())
                    } else {
                        Err(format!("{i}: {status} {body}"))
                    }
                }
            })
            .buffer_unordered(AT_ONCE)
            .filter_map(|answered| async move { answered.err() })
            .collect()
            .await;
        let took = began.elapsed();
        eprintln!("{ANSWERS} unique answers in {took:?}");
        assert!(
            failures.is_empty(),
            "{} of {ANSWERS} answers did not complete: {:?}",
            failures.len(),
            &failures[..failures.len().min(10)]
        );

        // The stream stayed within its cap by dropping its oldest events (it is far younger
        // than its age limit), and no publish was refused.
        let state = events.info().await.unwrap().state.clone();
        eprintln!("events stream: {state:?}");
        assert!(
            state.bytes <= cap as u64,
            "{} bytes, cap {cap}",
            state.bytes
        );
        assert!(
            state.first_sequence > 1,
            "the answers' events never reached the cap: {state:?}"
        );
        assert_eq!(
            worker_metric(&sys, "versus_bus_write_retries_total", "").await,
            0.0,
            "an event publish (or KV put) was refused and tried again"
        );
        assert_eq!(
            worker_metric(&sys, "versus_generations_total", "result=\"failed\"").await,
            0.0
        );
        assert_eq!(
            worker_metric(&sys, "versus_generations_total", "result=\"done\"").await,
            ANSWERS as f64
        );
        // What the workers export for the alert: the stream's bytes against its cap.
        let metrics = metrics_of(&sys.workers[0].url).await;
        assert_eq!(
            metric(&metrics, "versus_events_stream_max_bytes", ""),
            cap as f64
        );
        assert!(metric(&metrics, "versus_jetstream_memory_bytes", "") > 0.0);
    });
}
