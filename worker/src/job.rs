//! One job, whatever its kind: the claim decides which path it takes. A won claim generates
//! (through [`crate::generation`]), an answer already done is announced again, and a key
//! leased elsewhere comes back when that lease would have run out.
//!
//! The claim is a durable Postgres commit, and the upstream takes hundreds of milliseconds to
//! its first token: on a client's job, a streamed answer's first call (moderation, then the
//! request) starts while the claim commits. Nothing of it is published or stored before the
//! claim is won, and a claim not won drops the request at once
//! (`versus_upstream_cancelled_total`). Jobs whose claim is likely held elsewhere wait for the
//! claim first: a redelivered job, one the API published for a generation it saw under way
//! ([`wire::UNDER_WAY_HEADER`]), and pre-warm jobs, which nobody waits for.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::future::{self, Either};
use tokio_util::sync::CancellationToken;
use versus_shared::wire::{self, Job, Kind};

use crate::{
    claims::{Claim, Lost},
    ctx::Ctx,
    generation::{self, Generation, Outcome},
    image::Image,
    lane::Lane,
    text::Text,
};

/// How long after another worker's lease would run out a job for its key comes back: the
/// lease is judged by Postgres's clock and the nak's delay by the NATS server's, so a job back
/// at the very instant could still find the lease live, and be put off again for a delivery.
const AFTER_THE_LEASE: Duration = Duration::from_millis(250);

/// Runs `job` to the outcome the consumer reports to JetStream. `abandon` fires when the
/// process stops past its grace period: a generation then gives its claim back.
pub async fn handle(
    ctx: &Ctx,
    msg: &jetstream::Message,
    job: &Job,
    abandon: &CancellationToken,
) -> anyhow::Result<Outcome> {
    match job.kind {
        Kind::Text => handle_as(ctx, msg, job, abandon, Text::new(job)).await,
        Kind::Image => handle_as(ctx, msg, job, abandon, Image::new(job)).await,
    }
}

async fn handle_as<G: Generation>(
    ctx: &Ctx,
    msg: &jetstream::Message,
    job: &Job,
    abandon: &CancellationToken,
    generation: G,
) -> anyhow::Result<Outcome> {
    let claiming = Instant::now();
    let claim = Box::pin(ctx.claimer.claim(job));
    let opening = Box::pin(generation::opening(ctx, job, &generation));
    let speculated = G::SPECULATE
        && msg.info().is_ok_and(|info| info.delivered == 1)
        && Lane::of(&msg.subject) == Lane::Interactive
        && msg
            .headers
            .as_ref()
            .is_none_or(|h| h.get(wire::UNDER_WAY_HEADER).is_none())
        && !ctx.budget.exhausted_for(job.kind);
    let (claim, opening) = if speculated {
        match future::select(claim, opening).await {
            Either::Left((claim, opening)) => (claim, Either::Left(opening)),
            // The first call was made (or refused) before the claim committed.
            Either::Right((opened, claim)) => (claim.await, Either::Right(opened)),
        }
    } else {
        (claim.await, Either::Left(opening))
    };
    metrics::histogram!("versus_claim_seconds").record(claiming.elapsed());
    let lost = match claim {
        Ok(Claim::Won { attempt }) => {
            let opening = async {
                match opening {
                    Either::Left(opening) => opening.await,
                    Either::Right(opened) => opened,
                }
            };
            return generation::run(ctx, msg, job, attempt, abandon, &generation, opening).await;
        }
        Ok(Claim::Lost(lost)) => Ok(lost),
        Err(e) => Err(e),
    };
    // Dropped before anything else is done: a request under way is cancelled.
    drop(opening);
    if speculated {
        metrics::counter!("versus_upstream_cancelled_total", "kind" => job.kind.as_str())
            .increment(1);
    }
    match lost? {
        Lost::Done(row) => {
            generation::announce_stored_answer::<G>(ctx, job, row).await?;
            Ok(Outcome::Ack)
        }
        // The owner is alive; come back when its lease would have run out, in case it dies.
        Lost::Busy { remaining } => Ok(Outcome::Retry(remaining + AFTER_THE_LEASE)),
        Lost::Refused { attempt } => {
            generation::announce_stored_refusal(ctx, job, attempt).await?;
            Ok(Outcome::Ack)
        }
        Lost::Cooling {
            attempt,
            retry_at_ms,
            code,
            message,
        } => {
            generation::announce_cooldown(ctx, job, attempt, retry_at_ms, code, message).await?;
            Ok(Outcome::Ack)
        }
    }
}
