//! Connecting to NATS and declaring what Versus needs on it (the jobs and events streams and
//! the answers KV bucket). Declarations are idempotent, so every process makes them at start-up.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, kv, stream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{config::NatsSettings, tasks::Tasks, wire};

/// Whether a publish failed because the jobs stream is full (`VERSUS_MAX_QUEUED_JOBS`): the
/// server's "store failed" answer, which a stream that discards new messages gives when full.
pub fn is_full(error: &jetstream::context::PublishError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .is_some_and(|e| e.error_code() == jetstream::ErrorCode::STREAM_STORE_FAILED)
}

/// A connected client with handles on everything Versus uses. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub jobs: stream::Stream,
    pub events: stream::Stream,
    pub answers: kv::Store,
    /// Each UTC day's spend, cluster-wide (see [`crate::budget`]).
    pub spend: kv::Store,
    /// Moves whenever core NATS messages may have been lost on this connection: after a
    /// reconnect, or when a subscription overflowed. Readers of core subscriptions resync.
    pub losses: watch::Receiver<u64>,
}

impl Bus {
    /// Connects (retrying until NATS is up) and declares streams and the bucket. The task that
    /// declares the events stream again after reconnects runs on `tasks`.
    pub async fn connect(
        settings: &NatsSettings,
        name: &str,
        tasks: &Tasks,
    ) -> anyhow::Result<Bus> {
        let (lost, losses) = watch::channel(0u64);
        let (reconnected, reconnects) = watch::channel(0u64);
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .event_callback(move |event| {
                use async_nats::Event;
                match &event {
                    Event::Connected => {
                        reconnected.send_modify(|n| *n += 1);
                        lost.send_modify(|n| *n += 1);
                    }
                    Event::SlowConsumer(_) => lost.send_modify(|n| *n += 1),
                    _ => {}
                }
                tracing::info!(%event, "nats connection");
                std::future::ready(())
            })
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(settings.url.expose())
            .await
            .context("connecting to NATS (NATS_URL)")?;
        let js = jetstream::new(client.clone());
        let jobs = declare_stream(&js, jobs_stream(settings.max_queued_jobs)).await?;
        let events = declare_stream(&js, events_stream(settings.events_max_age())).await?;
        tasks.spawn(redeclare_events(
            js.clone(),
            reconnects,
            settings.events_max_age(),
            tasks.shutdown().clone(),
        ));
        let answers = js
            .create_or_update_key_value(kv::Config {
                bucket: wire::ANSWERS_BUCKET.to_owned(),
                description: "Finished answers: the edge cache in front of Postgres".to_owned(),
                history: 1,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .context("declaring the answers KV bucket")?;
        let spend = js
            .create_or_update_key_value(kv::Config {
                bucket: wire::SPEND_BUCKET.to_owned(),
                description: "Each UTC day's upstream spend, cluster-wide".to_owned(),
                history: 1,
                max_age: Duration::from_secs(3 * 24 * 3600),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .context("declaring the spend KV bucket")?;
        Ok(Bus {
            client,
            js,
            jobs,
            events,
            answers,
            spend,
            losses,
        })
    }

    /// True when the connection is up and JetStream answers for both streams.
    pub async fn ready(&self) -> bool {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return false;
        }
        self.jobs.get_info().await.is_ok() && self.events.get_info().await.is_ok()
    }
}

fn jobs_stream(max_queued: i64) -> stream::Config {
    stream::Config {
        name: wire::JOBS_STREAM.to_owned(),
        description: Some("Generation jobs, one per unique answer; workers pull them".to_owned()),
        subjects: vec![
            wire::JOBS_SUBJECTS.to_owned(),
            wire::PREWARM_SUBJECTS.to_owned(),
        ],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        // Identical misses published by any API replica within this window become one job.
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::from_secs(24 * 3600),
        // A bounded queue: a flood is refused at once (and costs nothing) rather than queued
        // for hours and paid for after its clients left.
        max_messages: max_queued.max(1),
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

fn events_stream(max_age: Duration) -> stream::Config {
    stream::Config {
        name: wire::EVENTS_STREAM.to_owned(),
        description: Some("Generation events per answer, replayable for late joiners".to_owned()),
        subjects: vec![wire::EVENTS_SUBJECTS.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        // Events are worth minutes: memory is faster, and a lost stream is repaired by the
        // job's redelivery, which starts a new attempt.
        storage: stream::StorageType::Memory,
        max_age,
        duplicate_window: Duration::from_secs(30),
        // Readers catch up with direct gets (any replica answers), never with a consumer.
        allow_direct: true,
        // nats-server caps a stream that sets no consumer limit at 1,000 consumers; tools and
        // operators may attach some, and a stream cannot lower this limit once declared.
        max_consumers: 1_000_000,
        ..Default::default()
    }
}

/// The events stream lives in memory, and a restarted nats-server comes back without it:
/// declare it again after every reconnect (idempotent when it is there), until it takes.
async fn redeclare_events(
    js: jetstream::Context,
    mut reconnects: watch::Receiver<u64>,
    max_age: Duration,
    shutdown: CancellationToken,
) {
    let redeclare = async {
        while reconnects.changed().await.is_ok() {
            while let Err(e) = js.create_or_update_stream(events_stream(max_age)).await {
                tracing::info!(error = %e, "declaring the events stream again failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = redeclare => {}
    }
}

async fn declare_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> anyhow::Result<stream::Stream> {
    let name = config.name.clone();
    js.create_or_update_stream(config)
        .await
        .with_context(|| format!("declaring stream {name}"))?;
    js.get_stream(&name)
        .await
        .with_context(|| format!("opening stream {name}"))
}
