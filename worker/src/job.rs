//! One job, whatever its kind: the claim decides which path it takes. A won claim generates
//! (through [`crate::generation`]), an answer already done is announced again, and a key
//! leased elsewhere comes back when that lease would have run out.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use versus_shared::wire::{Job, Kind};

use crate::{
    claims::Claim,
    ctx::Ctx,
    generation::{self, Outcome},
    image::Image,
    text::Text,
};

/// Runs `job` to the outcome the consumer reports to JetStream. `abandon` fires when the
/// process stops past its grace period: a generation then gives its claim back.
pub async fn handle(
    ctx: &Ctx,
    msg: &jetstream::Message,
    job: &Job,
    abandon: &CancellationToken,
) -> anyhow::Result<Outcome> {
    let claiming = Instant::now();
    let claim = ctx.claimer.claim(job).await?;
    metrics::histogram!("versus_claim_seconds").record(claiming.elapsed());
    match claim {
        Claim::Won { attempt, a, b } => match job.kind {
            Kind::Text => generation::run(ctx, msg, job, attempt, abandon, &Text::new(a, b)).await,
            Kind::Image => {
                generation::run(ctx, msg, job, attempt, abandon, &Image::new(a, b)).await
            }
        },
        Claim::Done(row) => {
            match job.kind {
                Kind::Text => generation::reannounce::<Text>(ctx, job, row).await?,
                Kind::Image => generation::reannounce::<Image>(ctx, job, row).await?,
            }
            Ok(Outcome::Ack)
        }
        // The owner is alive; come back when its lease would have run out, in case it dies.
        Claim::Busy { remaining } => Ok(Outcome::Retry(remaining + Duration::from_millis(250))),
        Claim::Refused { attempt } => {
            generation::rerefuse(ctx, job, attempt).await?;
            Ok(Outcome::Ack)
        }
        Claim::Cooling {
            attempt,
            retry_at_ms,
            code,
            message,
        } => {
            generation::cooling(ctx, job, attempt, retry_at_ms, code, message).await?;
            Ok(Outcome::Ack)
        }
    }
}
