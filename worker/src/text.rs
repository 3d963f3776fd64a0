//! Text answers: stream the upstream's answer into chunk events, then store it. The order of
//! completion is Postgres (fenced) → edge KV → `done` event → ack; a crash between any two
//! steps is repaired by redelivery, because every step is idempotent.

use std::{
    sync::atomic::{AtomicI32, Ordering},
    time::Instant,
};

use anyhow::Context;
use async_nats::jetstream;
use futures::FutureExt;
use versus_shared::{
    prompt,
    wire::{Answer, Job},
};

use crate::{
    Ctx,
    claims::{self, Stored, Usage},
    events::Publisher,
    job::{self, Ended, Outcome},
    openai::Piece,
};

pub async fn generate(
    ctx: &Ctx,
    msg: &jetstream::Message,
    job: &Job,
    attempt: i32,
    a: &str,
    b: &str,
) -> anyhow::Result<Outcome> {
    let cell = AtomicI32::new(attempt);
    let mut publisher = Publisher::new(&ctx.bus, job);
    let work = stream_answer(ctx, job, &cell, &mut publisher, a, b);
    let ended = job::guarded(ctx, msg, job, &cell, work).await?;
    let attempt = cell.load(Ordering::SeqCst);
    match ended {
        Ended::Finished((text, usage)) => {
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
            job::announce(ctx, job, attempt, &answer, &mut publisher).await
        }
        Ended::GaveUp(failure) => job::give_up(ctx, job, attempt, &failure, &mut publisher).await,
        Ended::Lost => Ok(Outcome::Ack),
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
) -> anyhow::Result<Ended<(String, Usage)>> {
    let messages = prompt::text_messages(a, b);
    let mut backoff = ctx.openai.backoff();
    let mut text = String::new();
    let mut asked = Instant::now();
    // Announcing the attempt and opening the upstream overlap: neither waits for the other.
    let (started, mut opened) = tokio::join!(
        publisher.start(attempt.load(Ordering::SeqCst)),
        ctx.openai.chat_stream(&job.model, &messages)
    );
    started?;
    loop {
        let mut ahead = None;
        let result = match opened {
            Ok(mut stream) => loop {
                let piece = match ahead.take() {
                    Some(piece) => piece,
                    None => stream.next().await,
                };
                match piece {
                    Ok(Piece::Text(mut delta)) => {
                        if text.is_empty() {
                            metrics::histogram!("versus_upstream_first_token_seconds")
                                .record(asked.elapsed());
                        }
                        // Tokens the upstream already sent go out as one event: a fast
                        // upstream costs a few events per answer, not one per token, and a
                        // paced one is not delayed (`next` is cancel-safe).
                        while let Some(more) = stream.next().now_or_never() {
                            match more {
                                Ok(Piece::Text(more)) => delta.push_str(&more),
                                other => {
                                    ahead = Some(other);
                                    break;
                                }
                            }
                        }
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
                return Ok(Ended::Finished((text, usage)));
            }
            Err(error) => error,
        };
        metrics::counter!("versus_upstream_errors_total", "kind" => "chat").increment(1);
        let Some(delay) = ctx.openai.next_delay(&mut backoff, &error) else {
            return Ok(Ended::GaveUp(error.into()));
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
        asked = Instant::now();
        opened = ctx.openai.chat_stream(&job.model, &messages).await;
    }
}

/// A job for an answer that is already done (see [`job::reannounce`]).
pub async fn republish(ctx: &Ctx, job: &Job, stored: Stored) -> anyhow::Result<()> {
    let text = stored.text.context("a done text row without text")?;
    let answer = Answer {
        key: job.key.clone(),
        a: stored.a,
        b: stored.b,
        text,
        model: stored.model,
        attempt: stored.attempt,
    };
    let text = answer.text.clone();
    job::reannounce(ctx, job, answer.attempt, &answer, Some(text)).await
}
