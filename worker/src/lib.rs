//! Versus workers: pull generation jobs from JetStream, decide in Postgres who generates
//! (exactly one worker per answer), call OpenAI, publish chunk and completion events.
//!
//! - [`consumer`]: the pull loop, its concurrency limit and graceful drain;
//! - [`claims`]: the Postgres claim, lease and fenced writes;
//! - [`job`]: one job from claim to ack, whatever its kind, under a kept-alive lease;
//! - [`text`]: text answers, streamed into chunk events;
//! - [`image`]: pictures, uploaded to object storage;
//! - [`events`]: publishing a generation's events;
//! - [`openai`]: the OpenAI client (streaming chat completions, retry classification).

pub mod claims;
pub mod consumer;
pub mod events;
pub mod image;
pub mod job;
pub mod openai;
pub mod text;

use std::{sync::Arc, time::Duration};

use anyhow::Context;

use tokio_util::sync::CancellationToken;
use versus_shared::{
    bus::Bus,
    config::{NatsSettings, Secret},
    objects::ObjectStoreSettings,
    telemetry::{self, PrometheusHandle},
};

/// Worker settings, from the environment (see `versus-worker --help`).
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "versus-worker", version, about)]
pub struct Settings {
    #[command(flatten)]
    pub nats: NatsSettings,
    /// Postgres URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Secret,
    #[command(flatten)]
    pub openai: openai::OpenAiSettings,
    #[command(flatten)]
    pub objects: ObjectStoreSettings,
    /// Jobs this process runs at once.
    #[arg(long, env = "VERSUS_WORKER_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,
    /// Cluster-wide cap on jobs in flight (the consumer's max_ack_pending).
    #[arg(long, env = "VERSUS_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: i64,
    /// Seconds a claim lasts without a heartbeat; also the job's ack wait.
    #[arg(long, env = "VERSUS_LEASE_SECS", default_value_t = 30)]
    pub lease_secs: u64,
    /// How long a SIGTERM waits for jobs in flight before exiting, in seconds.
    #[arg(long, env = "VERSUS_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Address of /healthz, /readyz and /metrics (port 0 picks a free one).
    #[arg(long, env = "VERSUS_WORKER_HTTP_ADDR", default_value = "127.0.0.1:0")]
    pub http_addr: String,
}

impl Settings {
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs.max(1))
    }
}

/// What every job handler needs.
pub struct Ctx {
    pub bus: Bus,
    pub db: sqlx::PgPool,
    pub openai: openai::Client,
    pub objects: Arc<dyn object_store::ObjectStore>,
    pub lease: Duration,
    /// Identifies this process in claims, for operators.
    pub worker_id: String,
}

/// Connects, migrates, serves the ops routes and consumes jobs until `shutdown` fires.
pub async fn run(
    settings: Settings,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let bus = Bus::connect(&settings.nats, "versus-worker").await?;
    let db =
        versus_shared::db::connect(&settings.database_url, settings.concurrency as u32 + 4).await?;
    versus_shared::db::migrate(&db).await?;
    let ctx = Arc::new(Ctx {
        bus: bus.clone(),
        db,
        openai: openai::Client::new(&settings.openai)?,
        objects: settings.objects.open()?,
        lease: settings.lease(),
        worker_id: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
    });
    let consumer = consumer::declare(&ctx, &settings).await?;

    let listener = tokio::net::TcpListener::bind(&settings.http_addr)
        .await
        .with_context(|| format!("binding VERSUS_WORKER_HTTP_ADDR {}", settings.http_addr))?;
    let ops = axum::serve(listener, telemetry::ops_router(metrics, bus));
    let addr = ops.local_addr()?;
    let ops_shutdown = shutdown.clone();
    let ops = tokio::spawn(async move {
        ops.with_graceful_shutdown(ops_shutdown.cancelled_owned())
            .await
    });
    telemetry::announce(addr);
    tracing::info!(%addr, concurrency = settings.concurrency, "worker ready");

    let grace = Duration::from_secs(settings.shutdown_grace_secs);
    consumer::run(ctx, consumer, settings.concurrency, grace, shutdown).await?;
    ops.await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn settings_are_well_formed() {
        use clap::CommandFactory;
        super::Settings::command().debug_assert();
    }
}
