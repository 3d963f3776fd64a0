//! The pull loops: one durable consumer per lane (interactive and pre-warm) shared by every
//! worker, each lane with its own local concurrency limit, and a drain on shutdown (stop
//! fetching, let jobs in flight finish within the grace period, then hand the unfinished ones
//! over to other workers at once). A pull asks for as many jobs as the lane has free slots.
//! A consumer found gone after a failed pull (deleted, alone or with its stream) is declared
//! again.
//!
//! Architecture Invariant: the lanes share nothing but the process. A pre-warm batch of ten
//! thousand jobs holds at most the pre-warm permits, so interactive misses never queue
//! behind it.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use async_nats::jetstream::{
    AckKind,
    consumer::{AckPolicy, PullConsumer, pull},
};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, Span, field::Empty};
use versus_shared::{
    recipe,
    retry::{self, JOB_PULL_RETRY},
    traces,
    wire::{self, Job},
};

use crate::{ctx::Ctx, generation::Outcome, job, lane::Lane};

/// How many times a job is delivered at most by default (`VERSUS_JOB_MAX_DELIVERIES`):
/// redeliveries after crashes, naks while another worker holds a pre-warm job's key, a
/// hand-over at shutdown. A job that failed waits longer before each delivery
/// ([`retry::job_redelivery`]), so that an outage of Postgres or NATS of about five minutes
/// (the API's stream timeout) does not use them all up (each failing try also takes a few
/// seconds: a claim gives up after the pool's acquire timeout). The last delivery ends the job
/// (`Term`) whatever its outcome: nats-server keeps a work queue's message that reached
/// `max_deliver` in the stream, where it would count against `VERSUS_MAX_QUEUED_JOBS` until
/// the stream's `max_age`.
pub const MAX_DELIVER: i64 = 20;
/// How long one pull request waits for jobs before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How long jobs still running after the grace period get to give their claims back and nak:
/// a Postgres update and a confirmed nak each.
const HANDOVER: Duration = Duration::from_secs(5);

/// One lane's durable consumer, and how many of its jobs run at once.
#[derive(Debug, Clone)]
pub struct LaneConsumer {
    /// The lane (and the `lane` label of its metrics).
    pub lane: Lane,
    /// The durable consumer's name.
    pub name: &'static str,
    pub filter: &'static str,
    /// Jobs this process runs at once from this lane.
    pub concurrency: usize,
    /// Jobs in flight from this lane, cluster-wide (the consumer's max_ack_pending).
    pub max_in_flight: i64,
    /// Deliveries of one job at most (the consumer's max_deliver); 0: no limit.
    pub max_deliveries: i64,
}

impl LaneConsumer {
    /// Whether the `delivered`th delivery of a job is its last.
    fn last_delivery(&self, delivered: i64) -> bool {
        self.max_deliveries > 0 && delivered >= self.max_deliveries
    }
}

/// Declares (or updates) the durable consumer of `lane`.
pub async fn declare(ctx: &Ctx, lane: &LaneConsumer) -> anyhow::Result<PullConsumer> {
    let config = pull::Config {
        durable_name: Some(lane.name.to_owned()),
        description: Some(format!("Versus workers: {}", lane.filter)),
        filter_subject: lane.filter.to_owned(),
        ack_policy: AckPolicy::Explicit,
        // Short, and kept alive by progress acks while a generation streams, so the job of a
        // worker that died is redelivered within one lease.
        ack_wait: ctx.lease,
        max_ack_pending: lane.max_in_flight,
        // A job that keeps failing (a worker that crashes on it, say) is not retried forever.
        max_deliver: if lane.max_deliveries > 0 {
            lane.max_deliveries
        } else {
            -1
        },
        ..Default::default()
    };
    match ctx.bus.jobs.create_consumer(config.clone()).await {
        Ok(c) => Ok(c),
        Err(_) => ctx
            .bus
            .jobs
            .update_consumer(config)
            .await
            .with_context(|| format!("declaring the {} consumer", wire::JOBS_STREAM)),
    }
}

/// Pulls and runs jobs of `lane` from `consumer` (its declared consumer) until `shutdown`,
/// then waits up to `grace` for the ones in flight. Those still running then give their
/// claims back and are nak'd without delay, so that another worker starts them at once rather
/// than when their lease runs out.
pub async fn run(
    ctx: Arc<Ctx>,
    lane: &LaneConsumer,
    mut consumer: PullConsumer,
    grace: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(lane.concurrency.max(1)));
    let tracker = TaskTracker::new();
    let abandon = CancellationToken::new();
    'pulling: loop {
        // Ask for exactly as many jobs as there are free slots, in one request: a busy worker
        // never hoards jobs an idle one could start, and a burst is not taken one round trip
        // at a time.
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p?,
        };
        let mut slots = vec![first];
        while let Ok(p) = permits.clone().try_acquire_owned() {
            slots.push(p);
        }
        let batch = consumer
            .batch()
            .max_messages(slots.len())
            .expires(PULL_EXPIRES)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(lane = lane.lane.label(), error = %e, "pulling jobs failed; retrying");
                recover(&ctx, lane, &mut consumer, &shutdown).await;
                continue;
            }
        };
        while let Some(slot) = slots.pop() {
            let msg = tokio::select! {
                () = shutdown.cancelled() => break 'pulling,
                m = batch.next() => m,
            };
            let msg = match msg {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    tracing::warn!(lane = lane.lane.label(), error = %e, "pulling jobs failed; retrying");
                    recover(&ctx, lane, &mut consumer, &shutdown).await;
                    break;
                }
                // The request expired with slots to spare: ask again.
                None => break,
            };
            let ctx = ctx.clone();
            let abandon = abandon.clone();
            let span = job_span(&msg);
            let lane = lane.clone();
            tracker.spawn(
                async move {
                    process(&ctx, &lane, msg, &abandon).await;
                    drop(slot);
                }
                .instrument(span),
            );
        }
    }
    tracker.close();
    tracing::info!(in_flight = tracker.len(), "draining jobs in flight");
    if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
        return Ok(());
    }
    tracing::warn!(
        in_flight = tracker.len(),
        "jobs still running after the grace period; handing them over"
    );
    abandon.cancel();
    let handed_over = tokio::time::timeout(HANDOVER, tracker.wait()).await;
    if handed_over.is_err() {
        tracing::warn!(
            in_flight = tracker.len(),
            "jobs did not hand over in time; they will be redelivered when their lease runs out"
        );
    }
    Ok(())
}

/// After a failed pull: waits [`JOB_PULL_RETRY`], then asks whether the consumer is still there
/// (one `CONSUMER.INFO`). When it is gone, or its stream is (an operator deleted either; a
/// worker's watchdog declares the stream again within seconds, see `versus_shared::bus`), the
/// consumer is declared again, every [`JOB_PULL_RETRY`] until that works or `shutdown` fires; a
/// consumer created anew delivers the jobs its stream still holds from the first. Any other
/// answer, or none, leaves it to the next pull.
async fn recover(
    ctx: &Ctx,
    lane: &LaneConsumer,
    consumer: &mut PullConsumer,
    shutdown: &CancellationToken,
) {
    use async_nats::jetstream::context::ConsumerInfoErrorKind;
    let recovered = async {
        let (mut gone, mut failed) = (false, false);
        loop {
            tokio::time::sleep(JOB_PULL_RETRY).await;
            if !gone {
                match consumer.get_info().await {
                    Err(e)
                        if matches!(
                            e.kind(),
                            ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
                        ) =>
                    {
                        tracing::error!(
                            lane = lane.lane.label(),
                            consumer = lane.name,
                            error = %e,
                            "the lane's consumer is gone (deleted, or its stream was): declaring it again"
                        );
                        gone = true;
                    }
                    _ => return,
                }
            }
            match declare(ctx, lane).await {
                Ok(declared) => {
                    tracing::info!(
                        lane = lane.lane.label(),
                        consumer = lane.name,
                        "declared the consumer again"
                    );
                    *consumer = declared;
                    return;
                }
                Err(e) => {
                    if !failed {
                        tracing::warn!(
                            lane = lane.lane.label(),
                            error = format!("{e:#}"),
                            "declaring the consumer again failed (its stream is not back yet?); trying again"
                        );
                    }
                    failed = true;
                }
            }
        }
    };
    // A lookup or declaration waits for JetStream's answer: not past shutdown.
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = recovered => {}
    }
}

/// The span of one delivery of a job (`job`), continuing the trace of the request that
/// published it (the `traceparent` in its headers, if any): every span of the job is its child.
fn job_span(msg: &async_nats::jetstream::Message) -> Span {
    let span = tracing::info_span!(
        "job",
        otel.kind = "consumer",
        messaging.destination.name = %msg.subject,
        versus.delivered = msg.info().map_or(0, |info| info.delivered),
        versus.kind = Empty,
        versus.key = Empty,
        versus.outcome = Empty,
        otel.status_code = Empty,
    );
    traces::continue_from(&span, msg.headers.as_ref());
    span
}

async fn process(
    ctx: &Ctx,
    lane: &LaneConsumer,
    msg: async_nats::jetstream::Message,
    abandon: &CancellationToken,
) {
    let job: Job = match serde_json::from_slice(&msg.payload) {
        Ok(job) => job,
        Err(e) => {
            tracing::error!(error = %e, subject = %msg.subject, "unreadable job; dropping it");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    let span = Span::current();
    span.record("versus.kind", job.kind.as_str());
    span.record("versus.key", job.key.as_str());
    if let Ok(info) = msg.info() {
        // The stream's clock and ours: the same host here, NTP-close elsewhere.
        let waited = std::time::SystemTime::now()
            .duration_since(info.published.into())
            .unwrap_or_default();
        let lane = Lane::of(&msg.subject);
        metrics::histogram!("versus_job_wait_seconds", "lane" => lane.label()).record(waited);
        // Whoever asked has been told it took too long by now (the API gives up on a
        // generation after as long): starting it would pay for an answer nobody waits for.
        // Pre-warm jobs have no waiters, and always run.
        if lane == Lane::Interactive && waited > ctx.job_max_wait {
            tracing::info!(key = %job.key, ?waited, "a job waited longer than anyone waits for it; dropping it");
            metrics::counter!("versus_jobs_expired_total").increment(1);
            if let Err(e) = msg.ack_with(AckKind::Term).await {
                tracing::warn!(key = %job.key, error = %e, "dropping an expired job failed");
            }
            return;
        }
    }
    // Nothing on the bus is trusted: a job this worker would not have produced (its key is
    // not what our models, size and prompt version make of its names, or it names another
    // model or size) is dropped before any claim or upstream call. Pre-warm jobs are made the
    // same way, and checked the same way.
    if let Err(forged) = recipe::check(&ctx.models, &job) {
        tracing::warn!(
            key = %job.key,
            kind = %job.kind,
            subject = %msg.subject,
            reason = forged.reason(),
            "a job this worker would not have produced ({forged}); dropping it"
        );
        metrics::counter!("versus_jobs_rejected_total", "reason" => forged.reason()).increment(1);
        if let Err(e) = msg.ack_with(AckKind::Term).await {
            tracing::warn!(key = %job.key, error = %e, "dropping a rejected job failed");
        }
        return;
    }
    let handled = job::handle(ctx, &msg, &job, abandon).await;
    span.record(
        "versus.outcome",
        match &handled {
            Ok(Outcome::Ack) => "ack",
            Ok(Outcome::Retry(_)) => "retry",
            Ok(Outcome::Handover) => "handover",
            Err(_) => "error",
        },
    );
    let delivered = msg.info().map_or(1, |info| info.delivered);
    let last = lane.last_delivery(delivered);
    let ack = match handled {
        Ok(Outcome::Ack) => msg.double_ack().await,
        // Not delivered again: ended, so that it leaves the stream.
        Ok(Outcome::Retry(_) | Outcome::Handover) if last => {
            tracing::warn!(key = %job.key, delivered, "a job's last delivery did not finish it; dropping it");
            metrics::counter!("versus_jobs_exhausted_total").increment(1);
            msg.ack_with(AckKind::Term).await
        }
        Ok(Outcome::Retry(delay)) => msg.ack_with(AckKind::Nak(Some(delay))).await,
        // Confirmed: the process exits right after, and the next worker must get the job now.
        Ok(Outcome::Handover) => msg.double_ack_with(AckKind::Nak(None)).await,
        Err(e) => {
            span.record("otel.status_code", "ERROR");
            let delay = retry::job_redelivery(delivered);
            metrics::counter!("versus_job_errors_total").increment(1);
            if last {
                tracing::error!(key = %job.key, error = format!("{e:#}"), delivered, "job failed on its last delivery; dropping it");
                metrics::counter!("versus_jobs_exhausted_total").increment(1);
                msg.ack_with(AckKind::Term).await
            } else {
                tracing::error!(key = %job.key, error = format!("{e:#}"), ?delay, "job failed; it will be retried");
                msg.ack_with(AckKind::Nak(Some(delay))).await
            }
        }
    };
    if let Err(e) = ack {
        tracing::warn!(key = %job.key, error = %e, "acknowledging the job failed");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use versus_shared::retry;

    use super::MAX_DELIVER;

    #[test]
    fn a_failing_job_is_retried_for_minutes() {
        // Every delivery but the last waits: over four minutes in all, and five and more with
        // the time each failing try takes.
        let waited: Duration = (1..MAX_DELIVER).map(retry::job_redelivery).sum();
        assert!(waited >= Duration::from_secs(250), "{waited:?}");
    }
}
