//! Versus workers: pull generation jobs from JetStream, decide in Postgres who generates
//! (exactly one worker per answer), call OpenAI, publish chunk and completion events.
//!
//! - [`consumer`]: the pull loops of the interactive and pre-warm lanes, their concurrency
//!   limits and graceful drain;
//! - [`popularity`]: adding up the API replicas' request counts in Postgres;
//! - [`purge`]: an operator's purge, carried out for the API (which may not write to the bus);
//! - [`aliases`]: an operator's change to the aliases, carried out for the API;
//! - [`reports`]: clients' reports of stored answers, hiding one that enough clients find
//!   unsafe, and an operator's decision on it;
//! - [`responder`]: answering the API's requests (purges, reports) on its inbox only;
//! - [`lane`]: the interactive and pre-warm lanes, and which a job came in on;
//! - [`claims`]: the Postgres claim, lease and fenced writes;
//! - [`batch`]: group commit, for claims and spend records;
//! - [`ctx`]: what every job handler needs ([`Ctx`]);
//! - [`job`]: one job, whatever its kind: the claim decides which path it takes;
//! - [`generation`]: a won claim to its end under a kept-alive lease (completion order,
//!   failures, hand-over at shutdown), and an answer already done announced again;
//! - [`text`]: text answers, streamed into chunk events;
//! - [`links`]: links taken out of an answer as it streams;
//! - [`image`]: pictures, uploaded to object storage;
//! - [`events`]: publishing a generation's events;
//! - [`openai`]: the OpenAI client (streaming chat completions, retry classification);
//! - [`providers`]: the upstream providers of each use, the primary first, then the fallbacks;
//! - [`circuit`]: a circuit breaker per provider;
//! - [`upgrade`]: degraded answers made again by the primary once it is back;
//! - [`moderation`]: checking names, pictures' prompts and answers before anything is paid
//!   for or stored;
//! - [`spend`]: recording what each upstream call cost, for the daily budget;
//! - [`backlog`]: the jobs queue (waiting jobs and their age, pending acks) as gauges;
//! - [`memory`]: JetStream's memory (the events stream against its cap) as gauges.

pub mod aliases;
pub mod backlog;
pub mod batch;
pub mod circuit;
pub mod claims;
pub mod consumer;
pub mod ctx;
pub mod events;
pub mod generation;
pub mod image;
pub mod job;
pub mod lane;
pub mod links;
pub mod memory;
pub mod moderation;
pub mod openai;
pub mod popularity;
pub mod providers;
pub mod purge;
pub mod reports;
pub mod responder;
pub mod spend;
pub mod text;
pub mod upgrade;

use std::{sync::Arc, time::Duration};

use anyhow::Context;

pub use ctx::Ctx;
use tokio_util::sync::CancellationToken;
use versus_shared::{
    aliases::Aliases,
    budget::{Budget, BudgetSettings},
    bus::{Bus, Role},
    config::{ModelSettings, NatsSettings, Secret},
    objects::ObjectStoreSettings,
    tasks::Tasks,
    telemetry::{self, PrometheusHandle},
};

/// Worker settings, from the environment (see `versus-worker --help`).
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "versus-worker", version, about, after_help = versus_shared::traces::HELP)]
pub struct Settings {
    #[command(flatten)]
    pub nats: NatsSettings,
    /// Postgres URL: as the role `versus_worker` once the owner has migrated the database
    /// (see --migrate-only); as the owner, the worker also runs any migrations pending at
    /// start-up.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,
    /// Run the pending database migrations, then exit (no NATS, no jobs): how an operator
    /// migrates, with the database owner's DATABASE_URL, before starting workers and APIs
    /// that connect as the roles `versus_worker` and `versus_api`.
    #[arg(long, env = "VERSUS_MIGRATE_ONLY")]
    pub migrate_only: bool,
    #[command(flatten)]
    pub openai: openai::OpenAiSettings,
    #[command(flatten)]
    pub objects: ObjectStoreSettings,
    #[command(flatten)]
    pub budget: BudgetSettings,
    #[command(flatten)]
    pub moderation: moderation::ModerationSettings,
    #[command(flatten)]
    pub reports: reports::ReportSettings,
    #[command(flatten)]
    pub fallbacks: providers::FallbackSettings,
    /// The models (and picture size) this worker generates with: the API's, since jobs are
    /// checked against them.
    #[command(flatten)]
    pub models: ModelSettings,
    /// Jobs this process runs at once.
    #[arg(long, env = "VERSUS_WORKER_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,
    /// Cluster-wide cap on jobs in flight (the consumer's max_ack_pending).
    #[arg(long, env = "VERSUS_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: i64,
    /// Pre-warm jobs this process runs at once (a lane apart from interactive jobs).
    #[arg(long, env = "VERSUS_PREWARM_CONCURRENCY", default_value_t = 4)]
    pub prewarm_concurrency: usize,
    /// Cluster-wide cap on pre-warm jobs in flight.
    #[arg(long, env = "VERSUS_PREWARM_MAX_IN_FLIGHT", default_value_t = 16)]
    pub prewarm_max_in_flight: i64,
    /// Seconds a claim lasts without a heartbeat; also the job's ack wait. Give the API the
    /// same value: it takes a generation silent for longer for dead, and restarts it.
    #[arg(long, env = "VERSUS_LEASE_SECS", default_value_t = 30)]
    pub lease_secs: u64,
    /// An interactive job that waited longer than this in the queue (seconds) is dropped, not
    /// started: its clients were told to try again (keep it at the API's
    /// `VERSUS_STREAM_TIMEOUT_SECS`).
    #[arg(long, env = "VERSUS_JOB_MAX_WAIT_SECS", default_value_t = 300)]
    pub job_max_wait_secs: u64,
    /// How many times a job is delivered at most (both lanes): its last delivery ends it
    /// (`Term`) whatever happened, so that no job stays in the stream once it cannot be
    /// delivered again. A failing job waits longer before each delivery (1 s, doubling up to
    /// 16 s), so the default rides out an outage of about five minutes. 0: no limit.
    #[arg(long, env = "VERSUS_JOB_MAX_DELIVERIES", default_value_t = consumer::MAX_DELIVER)]
    pub job_max_deliveries: i64,
    /// Failed generations of one matchup in a row after which it cools down: requests get
    /// the last error (retryable, with `Retry-After`) and nothing is paid for until it ends.
    /// 0: never.
    #[arg(long, env = "VERSUS_COOLDOWN_AFTER_FAILURES", default_value_t = 3)]
    pub cooldown_after_failures: u32,
    /// The first cool-down, in seconds; each further failure in a row doubles it, up to an
    /// hour.
    #[arg(long, env = "VERSUS_COOLDOWN_SECS", default_value_t = 60)]
    pub cooldown_secs: u64,
    /// How long a picture's upload, and the Postgres write of a finished answer, are tried
    /// again (in seconds, the lease kept meanwhile) before the generation gives up: what was
    /// paid for is kept, not made again.
    #[arg(long, env = "VERSUS_STORE_RETRY_SECS", default_value_t = 180)]
    pub store_retry_secs: u64,
    /// Matchups not asked for in this many days, with fewer than 10 requests in all, are
    /// pruned from the popularity table (at start, then hourly). 0: never.
    #[arg(long, env = "VERSUS_POPULARITY_RETENTION_DAYS", default_value_t = 30)]
    pub popularity_retention_days: u32,
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

/// Postgres connections beyond one per interactive job: one for each of the six tasks that
/// write besides the jobs, each holding one at a time (the claimer's and the ledger's batches,
/// popularity, purges, reports and their settlements). Pre-warm jobs share the pool with all
/// of them.
const BACKGROUND_CONNECTIONS: u32 = 6;

/// Connects, migrates (if it must), serves the ops routes and consumes jobs until `shutdown`
/// fires; with `--migrate-only`, only runs the migrations.
pub async fn run(
    settings: Settings,
    metrics: PrometheusHandle,
    tasks: &Tasks,
) -> anyhow::Result<()> {
    if settings.migrate_only {
        return migrate_only(&settings.database_url).await;
    }
    let shutdown = tasks.shutdown().clone();
    openai::zero_counters();
    generation::zero_counters();
    responder::zero_counters();
    reports::zero_counters();
    let budget = Budget::new(&settings.budget, &settings.models)?;
    spend::zero_counters(&budget, &settings.models);
    let bus = Bus::connect(&settings.nats, Role::Worker, tasks).await?;
    tasks.spawn(budget.clone().follow(bus.spend.clone(), shutdown.clone()));
    // The aliases, from the hub's bucket: a job naming one is ended (`generation::opening`).
    let aliases = Aliases::new();
    tasks.spawn(
        aliases
            .clone()
            .follow(bus.answers.clone(), shutdown.clone(), |_, _| {}),
    );
    let db = versus_shared::db::connect(
        &settings.database_url,
        settings.concurrency as u32 + BACKGROUND_CONNECTIONS,
    )
    .await?;
    versus_shared::db::migrate(&db).await?;
    // Names this process in the rows it claims (their `worker` column), for operators.
    let worker_id = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let ledger = spend::Ledger::start(db.clone(), bus.spend.clone(), budget.clone(), tasks);
    let ctx = Arc::new(Ctx {
        bus: bus.clone(),
        ledger,
        claimer: claims::Claimer::start(db.clone(), settings.lease(), worker_id, tasks),
        db,
        providers: providers::Providers::new(
            &settings.openai,
            &settings.models,
            &settings.moderation.moderation_model,
            &settings.fallbacks,
        )?
        .serving_degraded_at_least(settings.nats.events_max_age()),
        objects: settings.objects.open()?,
        lease: settings.lease(),
        job_max_wait: Duration::from_secs(settings.job_max_wait_secs.max(1)),
        store_retry: Duration::from_secs(settings.store_retry_secs),
        models: settings.models.clone(),
        budget: budget.clone(),
        tasks: tasks.clone(),
        aliases,
        moderator: moderation::Moderator::new(&settings.moderation),
        cooldown: claims::Cooldown {
            after: settings.cooldown_after_failures,
            base: Duration::from_secs(settings.cooldown_secs.max(1)),
        },
    });
    tasks.spawn(upgrade::run(
        ctx.clone(),
        settings.fallbacks.upgrade_per_minute,
        shutdown.clone(),
    ));
    let interactive = consumer::LaneConsumer {
        lane: lane::Lane::Interactive,
        name: versus_shared::wire::WORKERS_CONSUMER,
        filter: versus_shared::wire::JOBS_SUBJECTS,
        concurrency: settings.concurrency,
        max_in_flight: settings.max_in_flight,
        max_deliveries: settings.job_max_deliveries,
    };
    let prewarm = consumer::LaneConsumer {
        lane: lane::Lane::Prewarm,
        name: versus_shared::wire::PREWARM_CONSUMER,
        filter: versus_shared::wire::PREWARM_SUBJECTS,
        concurrency: settings.prewarm_concurrency,
        max_in_flight: settings.prewarm_max_in_flight,
        max_deliveries: settings.job_max_deliveries,
    };
    let interactive_consumer = consumer::declare(&ctx, &interactive).await?;
    let prewarm_consumer = consumer::declare(&ctx, &prewarm).await?;
    tasks.spawn(backlog::run(
        ctx.bus.jobs.clone(),
        vec![interactive.clone(), prewarm.clone()],
        shutdown.clone(),
    ));
    tasks.spawn(popularity::prune(
        ctx.db.clone(),
        settings.popularity_retention_days,
        shutdown.clone(),
    ));
    tasks.spawn(memory::run(
        ctx.bus.js.clone(),
        ctx.bus.events.clone(),
        shutdown.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(&settings.http_addr)
        .await
        .with_context(|| format!("binding VERSUS_WORKER_HTTP_ADDR {}", settings.http_addr))?;
    let ops = axum::serve(listener, telemetry::ops_router(metrics, bus, budget));
    let addr = ops.local_addr()?;
    let ops_shutdown = shutdown.clone();
    let ops = tasks.spawn(async move {
        ops.with_graceful_shutdown(ops_shutdown.cancelled_owned())
            .await
    });
    telemetry::announce(addr);
    tracing::info!(%addr, concurrency = settings.concurrency, "worker ready");

    let grace = Duration::from_secs(settings.shutdown_grace_secs);
    // Whichever loop ends first (on shutdown, or an error) stops the others.
    let (interactive, prewarm, popularity, purges, reports, aliases) = tokio::join!(
        cancel_after(
            &shutdown,
            consumer::run(
                ctx.clone(),
                &interactive,
                interactive_consumer,
                grace,
                shutdown.clone()
            ),
        ),
        cancel_after(
            &shutdown,
            consumer::run(
                ctx.clone(),
                &prewarm,
                prewarm_consumer,
                grace,
                shutdown.clone()
            ),
        ),
        cancel_after(
            &shutdown,
            popularity::run(ctx.bus.client.clone(), ctx.db.clone(), shutdown.clone()),
        ),
        cancel_after(&shutdown, purge::run(ctx.clone(), shutdown.clone())),
        cancel_after(
            &shutdown,
            reports::run(ctx.clone(), settings.reports.clone(), shutdown.clone()),
        ),
        cancel_after(&shutdown, aliases::run(ctx.clone(), shutdown.clone())),
    );
    interactive?;
    prewarm?;
    popularity?;
    purges?;
    reports?;
    aliases?;
    ops.await??;
    Ok(())
}

/// Runs every pending migration (and checks the applied ones), as the role of `url`.
async fn migrate_only(url: &Secret) -> anyhow::Result<()> {
    let db = versus_shared::db::connect(url, 1).await?;
    versus_shared::db::migrate_all(&db).await?;
    db.close().await;
    tracing::info!("the database is migrated");
    Ok(())
}

async fn cancel_after<T>(
    token: &CancellationToken,
    work: impl std::future::Future<Output = T>,
) -> T {
    let out = work.await;
    token.cancel();
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn settings_are_well_formed() {
        use clap::CommandFactory;
        super::Settings::command().debug_assert();
    }
}
