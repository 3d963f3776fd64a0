//! Text answers: stream the upstream's answer into chunk events with its links taken out,
//! retrying within the budget, keep it only when it is whole and passes moderation (each gets
//! a second try), then store the text. The skeleton around it (claim, lease, completion order, failures) is
//! [`crate::generation`].

use std::{
    sync::atomic::{AtomicI32, AtomicUsize, Ordering},
    time::Instant,
};

use anyhow::Context;
use futures::FutureExt;
use versus_shared::{
    prompt,
    wire::{Answer, ErrorCode, Job},
};

use crate::{
    claims::{self, Stored, Usage},
    ctx::Ctx,
    events::Publisher,
    generation::{Ended, Failure, Generation},
    links::Unlinked,
    openai::{ChatStream, Piece, UpstreamError},
    providers::{self, Outcome, Use},
    spend::{Call, Paid, Reservation},
};

/// The text answer to one matchup.
pub struct Text {
    /// The job's display names.
    a: String,
    b: String,
    messages: [(&'static str, String); 2],
    /// The text provider calls go to (`providers`): the primary, until its retries for this
    /// generation ran out or while its circuit is open.
    at: AtomicUsize,
    /// An upgrade of a degraded answer (`upgrade.rs`): the primary only.
    upgrade: bool,
}

impl Text {
    /// The providers calls may go to: the primary only for an upgrade.
    fn upto(&self) -> usize {
        if self.upgrade { 1 } else { usize::MAX }
    }

    /// One chat call within `reservation` (settled when the call ends), to the first provider
    /// from the current one whose circuit lets it through: which one (None when none did, and
    /// no call was made), and what it answered.
    async fn ask(&self, ctx: &Ctx, mut reservation: Reservation) -> <Text as Generation>::Opened {
        let asked = Instant::now();
        let Some(at) = ctx
            .providers
            .pick(Use::Text, self.at.load(Ordering::SeqCst), self.upto())
        else {
            return (
                asked,
                reservation,
                None,
                Err(providers::all_open(Use::Text)),
            );
        };
        self.at.store(at, Ordering::SeqCst);
        reservation.calling();
        let provider = &ctx.providers.of(Use::Text)[at];
        let opened = provider
            .client
            .chat_stream(&provider.model, &self.messages)
            .await;
        (asked, reservation, Some(at), opened)
    }
}

impl Generation for Text {
    const SPECULATE: bool = true;

    fn new(job: &Job, upgrade: bool) -> Text {
        let messages = prompt::text_messages(&job.a, &job.b);
        Text {
            a: job.a.clone(),
            b: job.b.clone(),
            messages,
            at: AtomicUsize::new(0),
            upgrade,
        }
    }

    /// When the upstream was asked (for the first-token metric), the call's reservation, the
    /// provider asked (None: every circuit was open), and what it answered.
    type Opened = (
        Instant,
        Reservation,
        Option<usize>,
        Result<ChatStream, UpstreamError>,
    );
    /// The text, what it cost, and which model wrote it.
    type Made = (String, Usage, String);
    type Answer = Answer;

    fn paid<'a>(&self, job: &'a Job) -> Paid<'a> {
        Paid::Chat {
            model: &job.model,
            prompt_chars: self.messages.iter().map(|(_, m)| m.len()).sum(),
        }
    }

    async fn open(&self, ctx: &Ctx, _job: &Job, reservation: Reservation) -> Self::Opened {
        self.ask(ctx, reservation).await
    }

    /// Streams the answer into events, links taken out ([`Unlinked`]), and keeps it only when
    /// it is whole and passes moderation:
    /// - a try that fails (the upstream's error, a stream cut or stalled) is tried again within
    ///   the upstream's retry budget, after its back-off;
    /// - an answer that is not whole (a `finish_reason` other than `stop`: cut at the token cap,
    ///   cut by the provider's filter; or no text at all) is paid for and asked for once more, at
    ///   once; a second one ends the generation with a retryable `upstream_unavailable` (or
    ///   `upstream_refused` when the provider's filter cut either, which says something about
    ///   the matchup and counts towards its cool-down);
    /// - an answer that moderation flags is paid for and generated once more, at once: a flag is
    ///   probabilistic, and a refusal is stored for everyone and for good, so it takes two.
    ///
    /// A try that starts over after publishing text moves to a new attempt, so readers get
    /// `reset`. Once a provider's retries ran out, the next try goes to the next provider (a
    /// fallback, `VERSUS_FALLBACKS`), with retries of its own: a try starts from nothing, so no
    /// answer is ever made of two providers' text.
    async fn work(
        &self,
        ctx: &Ctx,
        job: &Job,
        (mut asked, mut reservation, mut called, mut opened): Self::Opened,
        attempt: &AtomicI32,
        publisher: &mut Publisher<'_>,
    ) -> anyhow::Result<Ended<Self::Made>> {
        let texts = ctx.providers.of(Use::Text);
        let mut backoff = texts[self.at.load(Ordering::SeqCst)].client.backoff();
        // Why the answer before was not whole, if one was not.
        let mut not_whole: Option<String> = None;
        let mut flagged = false;
        // The text of this attempt, as published.
        let mut text = String::new();
        loop {
            let mut links = Unlinked::default();
            // Bytes the upstream sent in this try, links and the word held back included.
            let mut received = 0;
            let mut ahead = None;
            let result = match opened {
                Ok(mut stream) => loop {
                    let piece = match ahead.take() {
                        Some(piece) => piece,
                        None => stream.next().await,
                    };
                    match piece {
                        Ok(Piece::Text(mut delta)) => {
                            if received == 0 {
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
                            received += delta.len();
                            let current = attempt.load(Ordering::SeqCst);
                            publish(publisher, current, &mut text, links.push(&delta)).await?;
                        }
                        Ok(Piece::End { usage, reason }) => break Ok((usage, reason)),
                        Err(e) => break Err(e),
                    }
                },
                Err(e) => Err(e),
            };
            // The provider of this try, when one was called.
            let provider = called.map(|at| &texts[at]);
            if let Some(provider) = provider {
                provider.record(match &result {
                    Ok(_) => Outcome::Answered,
                    Err(error) => Outcome::of(error),
                });
            }
            let model = provider.map_or(job.model.as_str(), |p| p.model.as_str());
            match result {
                Ok((usage, reason)) => {
                    reservation.spent(Call::Chat { model, usage }).await;
                    metrics::counter!("versus_upstream_tokens_total", "type" => "prompt")
                        .increment(usage.prompt_tokens.max(0) as u64);
                    metrics::counter!("versus_upstream_tokens_total", "type" => "completion")
                        .increment(usage.completion_tokens.max(0) as u64);
                    let rest = links.finish();
                    let whole =
                        reason == "stop" && !(text.trim().is_empty() && rest.trim().is_empty());
                    if !whole {
                        let why = if reason == "stop" {
                            "empty"
                        } else {
                            reason.as_str()
                        };
                        metrics::counter!("versus_upstream_errors_total", "kind" => "chat")
                            .increment(1);
                        if let Some(before) = not_whole.replace(why.to_owned()) {
                            return Ok(Ended::GaveUp(incomplete(&before, why)));
                        }
                        tracing::info!(key = %job.key, reason = why, "the answer was not whole; asking once more");
                    } else {
                        let current = attempt.load(Ordering::SeqCst);
                        publish(publisher, current, &mut text, rest).await?;
                        if links.removed() {
                            tracing::info!(key = %job.key, "took links out of the answer");
                        }
                        match ctx
                            .moderator
                            .check(&ctx.providers, "answer", &[&text])
                            .await
                        {
                            Ok(None) => {
                                return Ok(Ended::Finished((text, usage, model.to_owned())));
                            }
                            Ok(Some(refusal)) if flagged => return Ok(Ended::Refused(refusal)),
                            Ok(Some(refusal)) => {
                                flagged = true;
                                metrics::counter!("versus_answers_looked_at_again_total")
                                    .increment(1);
                                tracing::info!(key = %job.key, reason = %refusal.reason(), "the answer was flagged; generating it once more");
                            }
                            Err(error) => return Ok(Ended::GaveUp(Failure::moderation(error))),
                        }
                    }
                }
                Err(error) => {
                    if received == 0 {
                        reservation.released().await;
                    } else {
                        // Cut mid-way: what was streamed is paid for, and no usage came with it.
                        let call = Call::ChatCut {
                            model,
                            prompt_chars: self.messages.iter().map(|(_, m)| m.len()).sum(),
                            text_chars: received,
                        };
                        reservation.spent(call).await;
                    }
                    metrics::counter!("versus_upstream_errors_total", "kind" => "chat")
                        .increment(1);
                    let at = self.at.load(Ordering::SeqCst);
                    let delay = texts[at].client.next_delay(&mut backoff, &error);
                    if !self.upgrade && ctx.providers.move_on(Use::Text, at, &error, delay) {
                        // The next provider, with retries of its own.
                        tracing::warn!(key = %job.key, %error, from = texts[at].name, to = texts[at + 1].name, "upstream failed; falling back");
                        self.at.store(at + 1, Ordering::SeqCst);
                        backoff = texts[at + 1].client.backoff();
                    } else {
                        let Some(delay) = delay else {
                            return Ok(Ended::GaveUp(error.into()));
                        };
                        tracing::info!(key = %job.key, %error, ?delay, "upstream failed; retrying");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
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
            (asked, reservation, called, opened) = self.ask(ctx, next).await;
        }
    }

    async fn complete(
        &self,
        ctx: &Ctx,
        job: &Job,
        attempt: i32,
        (text, usage, model): &Self::Made,
    ) -> anyhow::Result<Option<Answer>> {
        let by = ctx.made_by(job, model);
        if !claims::complete_text(&ctx.db, job, attempt, (text, *usage), &by).await? {
            return Ok(None);
        }
        Ok(Some(Answer {
            key: job.key.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            text: text.clone(),
            model: by.model,
            attempt,
            degraded_until_ms: by.degraded_until_ms,
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
            degraded_until_ms: row.degraded_until_ms.map(|ms| ms as u64),
        })
    }

    fn replayed_text(answer: &Answer) -> Option<&str> {
        Some(&answer.text)
    }

    fn upgrade(&self) -> bool {
        self.upgrade
    }

    fn screened(&self) -> Vec<&str> {
        vec![&self.a, &self.b]
    }
}

/// Publishes `delta` (unless empty) as the next chunk of `text`, the attempt's text so far.
async fn publish(
    publisher: &mut Publisher<'_>,
    attempt: i32,
    text: &mut String,
    delta: String,
) -> anyhow::Result<()> {
    if delta.is_empty() {
        return Ok(());
    }
    let offset = text.len();
    text.push_str(&delta);
    publisher.chunk(attempt, offset, delta).await
}

/// Two answers in a row that were not whole (`before`, then `now`: a finish reason, or
/// `empty`). Retryable, and nothing about the matchup, unless the provider's content filter cut
/// either: that is about the matchup, as a refusal of the upstream is.
fn incomplete(before: &str, now: &str) -> Failure {
    let filtered = [before, now].contains(&"content_filter");
    Failure {
        code: if filtered {
            ErrorCode::UpstreamRefused
        } else {
            ErrorCode::UpstreamUnavailable
        },
        detail: format!(
            "the upstream's answer was not whole twice in a row ({before}, then {now})"
        ),
        counts: filtered,
    }
}
