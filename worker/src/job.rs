//! One job, whatever its kind: the claim decides which path it takes. A won claim generates
//! (through [`crate::generation`]), an answer already done is announced again, and a client's
//! job for a key leased elsewhere (on its first delivery: another job than the owner's) is
//! acknowledged at once: it holds no slot of the lane (`max_ack_pending`) while another worker
//! generates. What restarts that generation should its worker die is its own job, delivered
//! again once the lease runs out, and failing that (the job expired, or ended on its last
//! delivery) the flights that follow it: a flight that hears nothing for a lease, or a request
//! that joins a generation silent for longer, publishes one job per lease of silence
//! (`api/src/miss/reader.rs`). A redelivered job (perhaps the owner's own) and a pre-warm job,
//! which nobody follows, come back when the lease would have run out, as before.
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
    // An upgrade of a degraded answer, which only a worker publishes, on the pre-warm lane.
    let upgrade = Lane::of(&msg.subject) == Lane::Prewarm
        && msg
            .headers
            .as_ref()
            .is_some_and(|h| h.get(wire::UPGRADE_HEADER).is_some());
    match job.kind {
        Kind::Text => handle_as(ctx, msg, job, abandon, Text::new(job, upgrade)).await,
        Kind::Image => handle_as(ctx, msg, job, abandon, Image::new(job, upgrade)).await,
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
    let claim = Box::pin(ctx.claimer.claim(job, generation.upgrade()));
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
            generation::announce_stored_answer::<G>(ctx, job, *row).await?;
            Ok(Outcome::Ack)
        }
        // The owner is alive, with a job of its own. A client's job delivered for the first
        // time is another job for the key (a joiner's, a duplicate): it lets the owner be,
        // acknowledged at once, since held back with a delay it would hold one of the lane's
        // slots meanwhile, and joiners could fill them all. The owner's own job comes back if
        // the owner dies, and failing that the flights restart the generation (see the
        // module's doc).
        Lost::Busy { .. }
            if Lane::of(&msg.subject) == Lane::Interactive
                && msg.info().is_ok_and(|info| info.delivered == 1) =>
        {
            metrics::counter!("versus_jobs_busy_total").increment(1);
            Ok(Outcome::Ack)
        }
        // A job delivered again may be the owner's own (its acks were lost to an election, say):
        // acknowledged, it could not come back should the owner then fail, and a redelivery
        // takes no slot the job did not hold already. It comes back when the lease would have
        // run out, as does a pre-warm job (nobody follows it; that lane's slots are its own).
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
