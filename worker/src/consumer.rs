//! The pull loop: one durable consumer shared by every worker, a local concurrency limit, and
//! a drain on shutdown (stop fetching, let jobs in flight finish within the grace period).

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use async_nats::jetstream::{
    AckKind,
    consumer::{AckPolicy, PullConsumer, pull},
};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use versus_shared::wire::{self, Job};

use crate::{Ctx, Settings, job};

/// Declares (or updates) the durable consumer every worker pulls from.
pub async fn declare(ctx: &Ctx, settings: &Settings) -> anyhow::Result<PullConsumer> {
    let config = pull::Config {
        durable_name: Some(wire::WORKERS_CONSUMER.to_owned()),
        description: Some("Versus workers: interactive generation jobs".to_owned()),
        filter_subject: wire::JOBS_SUBJECTS.to_owned(),
        ack_policy: AckPolicy::Explicit,
        // Short, and kept alive by progress acks while a generation streams, so the job of a
        // worker that died is redelivered within one lease.
        ack_wait: ctx.lease,
        max_ack_pending: settings.max_in_flight,
        ..Default::default()
    };
    match ctx.bus.jobs.create_consumer(config.clone()).await {
        Ok(c) => Ok(c),
        Err(_) => ctx
            .bus
            .jobs
            .update_consumer(config)
            .await
            .context("declaring the workers' consumer"),
    }
}

/// Pulls and runs jobs until `shutdown`, then waits up to `grace` for the ones in flight.
pub async fn run(
    ctx: Arc<Ctx>,
    consumer: PullConsumer,
    concurrency: usize,
    grace: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let tracker = TaskTracker::new();
    // One message per pull: a busy worker must not hoard jobs an idle one could start.
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .context("pulling jobs")?;
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p?,
        };
        let msg = tokio::select! {
            () = shutdown.cancelled() => break,
            m = messages.next() => m,
        };
        let msg = match msg {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "pulling jobs failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            None => anyhow::bail!("the jobs consumer ended"),
        };
        let ctx = ctx.clone();
        tracker.spawn(async move {
            process(&ctx, msg).await;
            drop(permit);
        });
    }
    tracker.close();
    tracing::info!(in_flight = tracker.len(), "draining jobs in flight");
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("jobs still running after the grace period; they will be redelivered");
    }
    Ok(())
}

async fn process(ctx: &Ctx, msg: async_nats::jetstream::Message) {
    let job: Job = match serde_json::from_slice(&msg.payload) {
        Ok(job) => job,
        Err(e) => {
            tracing::error!(error = %e, subject = %msg.subject, "unreadable job; dropping it");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    let ack = match job::handle(ctx, &msg, &job).await {
        Ok(job::Outcome::Ack) => msg.double_ack().await,
        Ok(job::Outcome::Retry(delay)) => msg.ack_with(AckKind::Nak(Some(delay))).await,
        Err(e) => {
            tracing::error!(key = %job.key, error = format!("{e:#}"), "job failed; it will be retried");
            metrics::counter!("versus_job_errors_total").increment(1);
            msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await
        }
    };
    if let Err(e) = ack {
        tracing::warn!(key = %job.key, error = %e, "acknowledging the job failed");
    }
}
