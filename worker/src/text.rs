//! One text job, from claim to ack. The order of completion is Postgres (fenced) → edge KV →
//! `done` event → ack; a crash between any two steps is repaired by redelivery, because every
//! step is idempotent.

use std::{
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use async_nats::jetstream::{self, AckKind};
use versus_shared::{
    prompt,
    wire::{self, Answer, Event, Job},
};

use crate::{
    Ctx,
    claims::{self, Claim, Stored, Usage},
    events::{self, Publisher},
    openai::{Piece, UpstreamError},
};

/// What the consumer should tell JetStream about the job.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Ack,
    /// Try again after this long (the key is leased elsewhere, or our infrastructure failed).
    Retry(Duration),
}

pub async fn handle(ctx: &Ctx, msg: &jetstream::Message, job: &Job) -> anyhow::Result<Outcome> {
    match claims::claim(&ctx.db, job, ctx.lease, &ctx.worker_id).await? {
        Claim::Won { attempt, a, b } => generate(ctx, msg, job, attempt, &a, &b).await,
        Claim::Done(stored) => {
            republish(ctx, job, stored).await?;
            Ok(Outcome::Ack)
        }
        // The owner is alive; come back when its lease would have run out, in case it dies.
        Claim::Busy { remaining } => Ok(Outcome::Retry(remaining + Duration::from_millis(250))),
    }
}

/// How a generation ended.
enum Ended {
    Finished {
        text: String,
        usage: Usage,
    },
    GaveUp(UpstreamError),
    /// Our claim was taken over (our lease lapsed); the new owner finishes the job.
    Lost,
}

async fn generate(
    ctx: &Ctx,
    msg: &jetstream::Message,
    job: &Job,
    attempt: i32,
    a: &str,
    b: &str,
) -> anyhow::Result<Outcome> {
    let attempt = AtomicI32::new(attempt);
    let mut publisher = Publisher::new(&ctx.bus, job);
    let ended = tokio::select! {
        ended = stream_answer(ctx, job, &attempt, &mut publisher, a, b) => ended,
        () = keep_alive(ctx, msg, job, &attempt) => Ok(Ended::Lost),
    };
    let attempt = attempt.load(Ordering::SeqCst);
    let ended = match ended {
        Ok(ended) => ended,
        Err(e) => {
            // Our own infrastructure failed (NATS or Postgres): hand the job back at once.
            let _ = claims::release(&ctx.db, job, attempt).await;
            return Err(e);
        }
    };
    match ended {
        Ended::Finished { text, usage } => {
            publisher.flush().await?;
            if !claims::complete_text(&ctx.db, job, attempt, &text, usage).await? {
                tracing::warn!(key = %job.key, attempt, "lost the claim before completing");
                return Ok(Outcome::Ack);
            }
            let answer = Answer {
                key: job.key.clone(),
                a: a.to_owned(),
                b: b.to_owned(),
                text,
                model: job.model.clone(),
                attempt,
            };
            put_answer(ctx, job, &answer).await?;
            publisher
                .finish(Event::Done {
                    attempt,
                    model: job.model.clone(),
                })
                .await?;
            metrics::counter!("versus_generations_total", "kind" => "text", "result" => "done")
                .increment(1);
            tracing::info!(key = %job.key, attempt, "answer stored");
            Ok(Outcome::Ack)
        }
        Ended::GaveUp(error) => {
            tracing::warn!(key = %job.key, attempt, %error, "giving up on the upstream");
            metrics::counter!("versus_generations_total", "kind" => "text", "result" => "failed")
                .increment(1);
            if claims::fail(&ctx.db, job, attempt, &error.to_string()).await? {
                let (code, message, retryable) = match &error {
                    UpstreamError::Retryable { .. } => (
                        "upstream_unavailable",
                        "The AI model is unavailable right now. Please try again.",
                        true,
                    ),
                    UpstreamError::Fatal { .. } => (
                        "upstream_refused",
                        "The AI model refused to answer this matchup.",
                        false,
                    ),
                };
                publisher
                    .finish(Event::Error {
                        attempt,
                        code: code.to_owned(),
                        message: message.to_owned(),
                        retryable,
                    })
                    .await?;
            }
            Ok(Outcome::Ack)
        }
        Ended::Lost => {
            tracing::warn!(key = %job.key, attempt, "claim taken over; stopping");
            Ok(Outcome::Ack)
        }
    }
}

/// Streams the answer from the upstream into events, retrying within the budget. A try that
/// broke after publishing text moves to a new attempt, so readers get `reset`.
async fn stream_answer(
    ctx: &Ctx,
    job: &Job,
    attempt: &AtomicI32,
    publisher: &mut Publisher<'_>,
    a: &str,
    b: &str,
) -> anyhow::Result<Ended> {
    let messages = prompt::text_messages(a, b);
    let mut backoff = ctx.openai.backoff();
    let mut text = String::new();
    // Announcing the attempt and opening the upstream overlap: neither waits for the other.
    let (started, mut opened) = tokio::join!(
        publisher.start(attempt.load(Ordering::SeqCst)),
        ctx.openai.chat_stream(&job.model, &messages)
    );
    started?;
    loop {
        let result = match opened {
            Ok(mut stream) => loop {
                match stream.next().await {
                    Ok(Piece::Text(delta)) => {
                        let offset = text.len();
                        text.push_str(&delta);
                        publisher
                            .chunk(attempt.load(Ordering::SeqCst), offset, delta)
                            .await?;
                    }
                    Ok(Piece::End(usage)) => break Ok(usage),
                    Err(e) => break Err(e),
                }
            },
            Err(e) => Err(e),
        };
        let error = match result {
            Ok(usage) => {
                metrics::counter!("versus_upstream_tokens_total", "type" => "prompt")
                    .increment(usage.prompt_tokens.max(0) as u64);
                metrics::counter!("versus_upstream_tokens_total", "type" => "completion")
                    .increment(usage.completion_tokens.max(0) as u64);
                return Ok(Ended::Finished { text, usage });
            }
            Err(error) => error,
        };
        metrics::counter!("versus_upstream_errors_total", "kind" => "chat").increment(1);
        let Some(delay) = ctx.openai.next_delay(&mut backoff, &error) else {
            return Ok(Ended::GaveUp(error));
        };
        tracing::info!(key = %job.key, %error, ?delay, "upstream failed; retrying");
        tokio::time::sleep(delay).await;
        if !text.is_empty() {
            let current = attempt.load(Ordering::SeqCst);
            let Some(next) = claims::next_attempt(&ctx.db, job, current).await? else {
                return Ok(Ended::Lost);
            };
            attempt.store(next, Ordering::SeqCst);
            publisher.start(next).await?;
            text.clear();
        }
        opened = ctx.openai.chat_stream(&job.model, &messages).await;
    }
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

/// A job for an answer that is already done: refresh the edge cache, and re-publish the answer
/// to its events subject unless the subject already ends with it.
async fn republish(ctx: &Ctx, job: &Job, stored: Stored) -> anyhow::Result<()> {
    let text = stored.text.context("a done text row without text")?;
    let answer = Answer {
        key: job.key.clone(),
        a: stored.a,
        b: stored.b,
        text,
        model: stored.model,
        attempt: stored.attempt,
    };
    put_answer(ctx, job, &answer).await?;
    if matches!(
        events::last_event(&ctx.bus, job).await?,
        Some(Event::Done { .. })
    ) {
        return Ok(());
    }
    let mut publisher = Publisher::new(&ctx.bus, job);
    publisher.start(answer.attempt).await?;
    publisher.chunk(answer.attempt, 0, answer.text).await?;
    publisher
        .finish(Event::Done {
            attempt: answer.attempt,
            model: answer.model,
        })
        .await
}

async fn put_answer(ctx: &Ctx, job: &Job, answer: &Answer) -> anyhow::Result<()> {
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
