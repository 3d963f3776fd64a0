//! The hops a miss makes that a direct call to the upstream does not, each timed alone on this
//! machine with no Versus code in it: the floor under P2's added time for this design. A miss
//! goes to the API and comes back from it (one more HTTP exchange than a client that calls the
//! upstream itself: the worker makes the chat call), reads the caches and the last event (one
//! JetStream round trip), publishes its job (a JetStream message stored and delivered to a
//! waiting pull consumer), has the names moderated (one HTTP call to the upstream) before the
//! chat call, and gets its first token back as an event (one core NATS delivery to the API's
//! subscription).
//!
//! Each hop is timed one at a time with an idle pause between, as P2's misses are, so that
//! each pays the wake-ups an idle machine pays.

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::stats::Summary;

const STREAM: &str = "BENCH_HOPS";
const JOBS: &str = "bench.hops.jobs";
const CORE: &str = "bench.core";
/// The pause between two timed hops: what lies between two misses, roughly.
const IDLE: Duration = Duration::from_millis(20);

/// Each hop's latency.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Hops {
    /// A direct get of a subject's last message (a miss), answered: a round trip.
    pub direct_get: Summary,
    /// A JetStream publish (file storage, work queue) until a waiting pull consumer on another
    /// connection has the message: one way.
    pub queue: Summary,
    /// A core NATS publish until a subscriber on another connection has it: one way.
    pub core: Summary,
    /// A moderation call to the simulator of both names, on a kept-alive connection: a round
    /// trip.
    pub http: Summary,
}

impl Hops {
    /// What a miss's hops add up to: the floor under its added time, in milliseconds (p50).
    /// The HTTP call counts twice: the names' moderation, and the API between the client and
    /// the worker's chat call.
    pub fn floor_ms(&self) -> f64 {
        self.direct_get.p50_ms + self.queue.p50_ms + self.core.p50_ms + 2.0 * self.http.p50_ms
    }
}

/// Times each hop `rounds` times: NATS at `nats_url` (as `versus-admin`, who may create
/// streams), the simulator's OpenAI API at `openai_base`.
pub async fn measure(
    nats_url: &str,
    admin_password: &str,
    openai_base: &str,
    rounds: usize,
) -> anyhow::Result<Hops> {
    let publisher = crate::nats_as_admin(nats_url, admin_password).await?;
    let receiver = crate::nats_as_admin(nats_url, admin_password).await?;
    let js = jetstream::new(publisher.clone());
    let stream = js
        .get_or_create_stream(stream::Config {
            name: STREAM.to_owned(),
            subjects: vec!["bench.hops.>".to_owned()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::WorkQueue,
            allow_direct: true,
            ..Default::default()
        })
        .await
        .context("creating the hops' stream")?;
    let measured = async {
        let consumer = jetstream::new(receiver.clone())
            .get_stream(STREAM)
            .await?
            .create_consumer(pull::Config {
                durable_name: Some("bench-hops".to_owned()),
                ..Default::default()
            })
            .await?;
        let mut subscriber = receiver.subscribe(CORE).await?;
        receiver.flush().await?;
        let http = reqwest::Client::new();
        let moderations = format!("{openai_base}/moderations");
        let mut hops = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for round in 0..rounds {
            tokio::time::sleep(IDLE).await;
            let start = Instant::now();
            // A miss's reads find nothing: the answer is not stored.
            let _ = stream
                .direct_get_last_for_subject(format!("{JOBS}.none"))
                .await;
            hops[0].push(start.elapsed());

            let mut batch = consumer
                .batch()
                .max_messages(1)
                .expires(Duration::from_secs(5))
                .messages()
                .await?;
            tokio::time::sleep(IDLE).await;
            let start = Instant::now();
            let ack = js.publish(JOBS, format!("job {round}").into()).await?;
            let job = batch
                .next()
                .await
                .context("the pull ended")?
                .map_err(anyhow::Error::msg)?;
            hops[1].push(start.elapsed());
            job.ack().await.map_err(anyhow::Error::msg)?;
            ack.await?;

            tokio::time::sleep(IDLE).await;
            let start = Instant::now();
            publisher.publish(CORE, "event".into()).await?;
            subscriber.next().await.context("the subscription ended")?;
            hops[2].push(start.elapsed());

            tokio::time::sleep(IDLE).await;
            let start = Instant::now();
            http.post(&moderations)
                .bearer_auth("bench")
                .json(&serde_json::json!({
                    "model": "omni-moderation-latest",
                    "input": [format!("Hop {round}"), format!("Other hop {round}")],
                }))
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            // The first call opens the connection: not a hop a miss makes.
            if round > 0 {
                hops[3].push(start.elapsed());
            }
        }
        let [direct_get, queue, core, http] = hops.map(|h| Summary::of(&h));
        anyhow::Ok(Hops {
            direct_get,
            queue,
            core,
            http,
        })
    }
    .await;
    js.delete_stream(STREAM).await.ok();
    measured
}
