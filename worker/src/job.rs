//! One job, whatever its kind: the claim decides what to do, a claimed generation runs under a
//! lease that [`keep_alive`] extends, and a failure is recorded (fenced) and announced.

use std::{
    future::Future,
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use async_nats::jetstream::{self, AckKind};
use serde::Serialize;
use versus_shared::wire::{self, Event, Job, Kind};

use crate::{
    Ctx,
    claims::{self, Claim},
    events::{self, Publisher},
    image,
    openai::UpstreamError,
    text,
};

/// What the consumer should tell JetStream about the job.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Ack,
    /// Try again after this long (the key is leased elsewhere).
    Retry(Duration),
}

pub async fn handle(ctx: &Ctx, msg: &jetstream::Message, job: &Job) -> anyhow::Result<Outcome> {
    let claiming = Instant::now();
    let claim = ctx.claimer.claim(job).await?;
    metrics::histogram!("versus_claim_seconds").record(claiming.elapsed());
    match claim {
        Claim::Won { attempt, a, b } => match job.kind {
            Kind::Text => text::generate(ctx, msg, job, attempt, &a, &b).await,
            Kind::Image => image::generate(ctx, msg, job, attempt, &a, &b).await,
        },
        Claim::Done(stored) => {
            match job.kind {
                Kind::Text => text::republish(ctx, job, stored).await?,
                Kind::Image => image::republish(ctx, job, stored).await?,
            }
            Ok(Outcome::Ack)
        }
        // The owner is alive; come back when its lease would have run out, in case it dies.
        Claim::Busy { remaining } => Ok(Outcome::Retry(remaining + Duration::from_millis(250))),
    }
}

/// Why a generation gave up: what clients are told, and what operators see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: &'static str,
    pub message: &'static str,
    pub retryable: bool,
    /// For logs and the row's `error` column; never a secret.
    pub detail: String,
}

impl From<UpstreamError> for Failure {
    fn from(error: UpstreamError) -> Failure {
        match error {
            UpstreamError::Retryable { message, .. } => Failure {
                code: "upstream_unavailable",
                message: "The AI model is unavailable right now. Please try again.",
                retryable: true,
                detail: message,
            },
            UpstreamError::Fatal { message } => Failure {
                code: "upstream_refused",
                message: "The AI model refused to answer this matchup.",
                retryable: false,
                detail: message,
            },
        }
    }
}

/// How a claimed generation ended.
pub enum Ended<T> {
    Finished(T),
    GaveUp(Failure),
    /// Our claim was taken over (our lease lapsed); the new owner finishes the job.
    Lost,
}

/// Runs `work` while keeping the claim alive. If our own infrastructure fails (NATS or
/// Postgres), the lease is given back so another worker can take the job at once.
pub async fn guarded<T>(
    ctx: &Ctx,
    msg: &jetstream::Message,
    job: &Job,
    attempt: &AtomicI32,
    work: impl Future<Output = anyhow::Result<Ended<T>>>,
) -> anyhow::Result<Ended<T>> {
    let ended = tokio::select! {
        ended = work => ended,
        () = keep_alive(ctx, msg, job, attempt) => Ok(Ended::Lost),
    };
    if ended.is_err() {
        let _ = claims::release(&ctx.db, job, attempt.load(Ordering::SeqCst)).await;
    }
    if let Ok(Ended::Lost) = ended {
        tracing::warn!(key = %job.key, "claim taken over; stopping");
    }
    ended
}

/// Records a failure (fenced) and tells the waiting clients.
pub async fn give_up(
    ctx: &Ctx,
    job: &Job,
    attempt: i32,
    failure: &Failure,
    publisher: &mut Publisher<'_>,
) -> anyhow::Result<Outcome> {
    tracing::warn!(key = %job.key, kind = %job.kind, attempt, detail = %failure.detail, "giving up");
    metrics::counter!("versus_generations_total", "kind" => job.kind.as_str(), "result" => "failed")
        .increment(1);
    if claims::fail(&ctx.db, job, attempt, &failure.detail).await? {
        settle(ctx, job, false).await;
        publisher
            .finish(Event::Error {
                attempt,
                code: failure.code.to_owned(),
                message: failure.message.to_owned(),
                retryable: failure.retryable,
            })
            .await?;
    }
    Ok(Outcome::Ack)
}

/// What follows the fenced Postgres write of a finished answer: the edge KV bucket, then
/// `done`, then the progress of pre-warm batches.
pub async fn announce(
    ctx: &Ctx,
    job: &Job,
    attempt: i32,
    answer: &impl Serialize,
    publisher: &mut Publisher<'_>,
) -> anyhow::Result<Outcome> {
    put_answer(ctx, job, answer).await?;
    publisher.done(attempt, &job.model).await?;
    settle(ctx, job, true).await;
    metrics::counter!("versus_generations_total", "kind" => job.kind.as_str(), "result" => "done")
        .increment(1);
    tracing::info!(key = %job.key, kind = %job.kind, attempt, "answer stored");
    Ok(Outcome::Ack)
}

/// A job for an answer that is already done: refresh the edge cache and pre-warm progress,
/// and re-publish the answer (`text`, for text answers) to its events subject unless the
/// subject already ends with it.
pub async fn reannounce(
    ctx: &Ctx,
    job: &Job,
    attempt: i32,
    answer: &impl Serialize,
    text: Option<String>,
) -> anyhow::Result<()> {
    put_answer(ctx, job, answer).await?;
    settle(ctx, job, true).await;
    if matches!(
        events::last_event(&ctx.bus, job).await?,
        Some(Event::Done { .. })
    ) {
        return Ok(());
    }
    let mut publisher = Publisher::new(&ctx.bus, job);
    publisher.start(attempt).await?;
    if let Some(text) = text {
        publisher.chunk(attempt, 0, text).await?;
    }
    publisher.done(attempt, &job.model).await
}

/// Records the outcome for the pre-warm batches waiting on this key. Best effort: progress
/// tracking must not fail the job itself.
pub async fn settle(ctx: &Ctx, job: &Job, done: bool) {
    let status = if done { "done" } else { "failed" };
    if let Err(e) = claims::settle_prewarm(&ctx.db, job, status).await {
        tracing::warn!(key = %job.key, error = %e, "recording pre-warm progress failed");
    }
}

/// Writes a finished answer to the edge KV bucket.
async fn put_answer(ctx: &Ctx, job: &Job, answer: &impl Serialize) -> anyhow::Result<()> {
    ctx.bus
        .answers
        .put(
            wire::kv_key(job.kind, &job.key),
            serde_json::to_vec(answer)?.into(),
        )
        .await
        .context("writing the answer to the edge KV bucket")?;
    Ok(())
}

/// Extends the lease and tells JetStream the job is alive, until the claim is lost.
async fn keep_alive(ctx: &Ctx, msg: &jetstream::Message, job: &Job, attempt: &AtomicI32) {
    let mut tick = tokio::time::interval(ctx.lease / 3);
    tick.tick().await;
    let mut last_ok = Instant::now();
    loop {
        tick.tick().await;
        match claims::heartbeat(&ctx.db, job, attempt.load(Ordering::SeqCst), ctx.lease).await {
            Ok(true) => last_ok = Instant::now(),
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(key = %job.key, error = %e, "lease heartbeat failed");
                if last_ok.elapsed() >= ctx.lease {
                    return;
                }
            }
        }
        if let Err(e) = msg.ack_with(AckKind::Progress).await {
            tracing::warn!(key = %job.key, error = %e, "progress ack failed");
        }
    }
}
