//! Text answers: stream the upstream's answer into chunk events, retrying within the budget,
//! then store the text. The skeleton around it (claim, lease, completion order, failures) is
//! [`crate::generation`].

use std::{
    sync::atomic::{AtomicI32, Ordering},
    time::Instant,
};

use anyhow::Context;
use futures::FutureExt;
use versus_shared::{
    prompt,
    wire::{Answer, Job},
};

use crate::{
    claims::{self, Stored, Usage},
    ctx::Ctx,
    events::Publisher,
    generation::{Ended, Generation},
    openai::{ChatStream, Piece, UpstreamError},
    spend::{Call, Paid, Reservation},
};

/// The text answer to one matchup.
pub struct Text {
    /// The job's display names.
    a: String,
    b: String,
    messages: [(&'static str, String); 2],
}

impl Text {
    /// One chat call within `reservation`: settled when the call ends.
    async fn ask(
        &self,
        ctx: &Ctx,
        job: &Job,
        mut reservation: Reservation,
    ) -> <Text as Generation>::Opened {
        reservation.calling();
        let asked = Instant::now();
        let opened = ctx.openai.chat_stream(&job.model, &self.messages).await;
        (asked, reservation, opened)
    }
}

impl Generation for Text {
    const SPECULATE: bool = true;

    fn new(job: &Job) -> Text {
        let messages = prompt::text_messages(&job.a, &job.b);
        Text {
            a: job.a.clone(),
            b: job.b.clone(),
            messages,
        }
    }

    /// When the upstream was asked (for the first-token metric), the call's reservation, and
    /// what the upstream answered.
    type Opened = (Instant, Reservation, Result<ChatStream, UpstreamError>);
    /// The text and what it cost.
    type Made = (String, Usage);
    type Answer = Answer;

    fn paid<'a>(&self, job: &'a Job) -> Paid<'a> {
        Paid::Chat {
            model: &job.model,
            prompt_chars: self.messages.iter().map(|(_, m)| m.len()).sum(),
        }
    }

    async fn open(&self, ctx: &Ctx, job: &Job, reservation: Reservation) -> Self::Opened {
        self.ask(ctx, job, reservation).await
    }

    /// Streams the answer into events. A try that broke after publishing text moves to a new
    /// attempt, so readers get `reset`.
    async fn work(
        &self,
        ctx: &Ctx,
        job: &Job,
        (mut asked, mut reservation, mut opened): Self::Opened,
        attempt: &AtomicI32,
        publisher: &mut Publisher<'_>,
    ) -> anyhow::Result<Ended<Self::Made>> {
        let mut backoff = ctx.openai.backoff();
        let mut text = String::new();
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
                    let model = &job.model;
                    reservation.spent(Call::Chat { model, usage }).await;
                    metrics::counter!("versus_upstream_tokens_total", "type" => "prompt")
                        .increment(usage.prompt_tokens.max(0) as u64);
                    metrics::counter!("versus_upstream_tokens_total", "type" => "completion")
                        .increment(usage.completion_tokens.max(0) as u64);
                    return Ok(Ended::Finished((text, usage)));
                }
                Err(error) => error,
            };
            if text.is_empty() {
                reservation.released().await;
            } else {
                // Cut mid-way: what was streamed is paid for, and no usage came with it.
                let call = Call::ChatCut {
                    model: &job.model,
                    prompt_chars: self.messages.iter().map(|(_, m)| m.len()).sum(),
                    text_chars: text.len(),
                };
                reservation.spent(call).await;
            }
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
            let Some(next) = ctx.ledger.reserve(self.paid(job)).await? else {
                return Ok(Ended::OverBudget);
            };
            (asked, reservation, opened) = self.ask(ctx, job, next).await;
        }
    }

    async fn complete(
        &self,
        ctx: &Ctx,
        job: &Job,
        attempt: i32,
        (text, usage): &Self::Made,
    ) -> anyhow::Result<Option<Answer>> {
        if !claims::complete_text(&ctx.db, job, attempt, text, *usage).await? {
            return Ok(None);
        }
        Ok(Some(Answer {
            key: job.key.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            text: text.clone(),
            model: job.model.clone(),
            attempt,
        }))
    }

    fn stored_answer(job: &Job, row: Stored) -> anyhow::Result<Answer> {
        Ok(Answer {
            key: job.key.clone(),
            text: row.text.context("a done text row without text")?,
            a: row.a,
            b: row.b,
            model: row.model,
            attempt: row.attempt,
        })
    }

    fn replayed_text(answer: &Answer) -> Option<&str> {
        Some(&answer.text)
    }

    fn screened(&self) -> Vec<&str> {
        vec![&self.a, &self.b]
    }

    fn screened_made((text, _): &Self::Made) -> Option<&str> {
        Some(text)
    }
}
