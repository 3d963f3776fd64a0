//! One generation from a won claim to its end, whatever it makes: `started`, the work under a
//! lease that [`keep_alive`] extends, the fenced Postgres completion, the edge KV bucket, `done`
//! and the progress of pre-warm batches; or a fenced `failed` and an `error` event when it gives
//! up; or the claim given back when the process stops past its grace period. An answer found
//! already done is announced again here too. Text and pictures plug in through [`Generation`].

use std::{
    future::Future,
    sync::atomic::{AtomicI32, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use versus_shared::{
    budget, history,
    key::Matchup,
    recipe::Recipe,
    retry,
    wire::{self, Degraded, ErrorCode, Event, Job},
};

use crate::{
    claims::{self, Failed, PrewarmStatus, Stored},
    ctx::Ctx,
    events::{self, Publisher},
    lane::Lane,
    moderation::{self, Refusal},
    openai::UpstreamError,
    spend::{Paid, Reservation},
};

/// Heartbeats per lease: the lease is extended every third of it, so that a heartbeat that
/// fails (a slow statement, a blip) leaves time for another before the lease runs out.
const HEARTBEATS_PER_LEASE: u32 = 3;

/// Seconds over which pre-warm jobs put off until tomorrow come back (each at a point of its
/// own, from its key): a day's parked batch does not all arrive in the first second.
const TOMORROW_SPREAD_SECS: u64 = 60;

/// What the consumer should tell JetStream about the job.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Ack,
    /// Try again after this long (the key is leased elsewhere).
    Retry(Duration),
    /// Give the job to another worker at once: this process is stopping, and the claim was
    /// given back so that the next worker wins it without waiting for the lease to run out.
    Handover,
}

/// What a kind of answer brings to the skeleton of [`run`]: how the upstream is called, and how
/// the answer is stored and read back.
pub trait Generation: Sync + Sized {
    /// Whether the first upstream call may start while the claim commits (see
    /// [`crate::job`]): for a streamed answer, whose first call costs nothing until it is read;
    /// not for a picture, whose first call makes and pays for the whole picture.
    const SPECULATE: bool;

    /// The generation of `job`'s answer, under its display names.
    /// `upgrade`: the job makes a degraded answer again with the primary (`upgrade.rs`), which
    /// alone it calls.
    fn new(job: &Job, upgrade: bool) -> Self;

    /// What the first upstream call gives.
    type Opened: Send;
    /// What the work makes: the answer before it is stored.
    type Made: Send;
    /// The finished answer as the edge KV bucket holds it.
    type Answer: Serialize + Send + Sync + Degraded;

    /// What one upstream call for `job` is, for its reservation of the day's budget.
    fn paid<'a>(&self, job: &'a Job) -> Paid<'a>;

    /// Makes the first upstream call, once [`opening`] found the names fit to ask about and
    /// reserved the call's share of the day's budget.
    fn open(
        &self,
        ctx: &Ctx,
        job: &Job,
        reservation: Reservation,
    ) -> impl Future<Output = Self::Opened> + Send;

    /// Makes the answer from the first call's result, retrying within the budget and
    /// publishing what clients may see on the way. A try that starts over under a new attempt
    /// stores it in `attempt` (and publishes its `started`).
    fn work(
        &self,
        ctx: &Ctx,
        job: &Job,
        opened: Self::Opened,
        attempt: &AtomicI32,
        publisher: &mut Publisher<'_>,
    ) -> impl Future<Output = anyhow::Result<Ended<Self::Made>>> + Send;

    /// Records what was made in Postgres, fenced on `attempt`; None when the attempt is no
    /// longer ours. [`run`] tries it again when it fails: what was made is paid for.
    fn complete(
        &self,
        ctx: &Ctx,
        job: &Job,
        attempt: i32,
        made: &Self::Made,
    ) -> impl Future<Output = anyhow::Result<Option<Self::Answer>>> + Send;

    /// The answer a done row holds.
    fn stored_answer(job: &Job, row: Stored) -> anyhow::Result<Self::Answer>;

    /// The text published again with a stored answer (None for pictures: `done` is the news).
    fn replayed_text(answer: &Self::Answer) -> Option<&str>;

    /// What moderation reads before the upstream is asked: the names, and a picture's prompt.
    /// (A text's answer is read by its own work, which generates it once more when it is
    /// flagged: [`crate::text`].)
    fn screened(&self) -> Vec<&str>;

    /// Whether this is an upgrade of a degraded answer.
    fn upgrade(&self) -> bool;
}

/// Why a generation gave up: what clients are told, and what operators see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What clients are told, in the code's own words and retryability.
    pub code: ErrorCode,
    /// For logs and the row's `error` column; never a secret.
    pub detail: String,
    /// Whether it says something about the matchup, and so counts towards its cool-down: a
    /// refusal of the upstream (a content filter, a 4xx other than 408, 409 and 429), bytes
    /// that are not a picture. An outage says nothing about it: 429s, 5xx, timeouts, a
    /// moderation endpoint that fails, our own storage.
    pub counts: bool,
}

impl Failure {
    /// A call whose share of the budget could not be reserved (Postgres is out of reach):
    /// nothing was asked of the upstream, and nothing is said about the matchup.
    pub fn unreserved(error: anyhow::Error) -> Failure {
        Failure {
            code: ErrorCode::Unavailable,
            detail: format!("reserving the budget failed: {error:#}"),
            counts: false,
        }
    }

    /// A job naming an alias (`alias`): it comes from an API replica that had not seen the
    /// alias yet, and its answer would be stored under a key nobody asks for once every replica
    /// has. Nothing is paid for; the client asks again, and is answered under the canonical
    /// name's key.
    pub fn aliased(alias: &str) -> Failure {
        Failure {
            code: ErrorCode::Unavailable,
            detail: format!("the job names the alias {alias:?}"),
            counts: false,
        }
    }

    /// A failure of the moderation endpoint: nothing unchecked is generated, and nothing is
    /// said about the matchup.
    pub fn moderation(error: UpstreamError) -> Failure {
        Failure {
            counts: false,
            ..error.into()
        }
    }
}

impl From<UpstreamError> for Failure {
    fn from(error: UpstreamError) -> Failure {
        match error {
            UpstreamError::Retryable { message, .. } => Failure {
                code: ErrorCode::UpstreamUnavailable,
                detail: message,
                counts: false,
            },
            UpstreamError::Fatal { message } => Failure {
                code: ErrorCode::UpstreamRefused,
                detail: message,
                counts: true,
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
    /// The process stopped past its grace period and gave the claim back. Only the skeleton
    /// ends a generation so; the work never does.
    HandedOver,
    /// Moderation refused what was asked for (or what was made): nothing is stored but the
    /// refusal.
    Refused(Refusal),
    /// The day's budget (or the pictures' share of it) has no room for the next call.
    OverBudget,
}

/// Puts `versus_generations_total` of every kind and result at zero (see
/// [`crate::openai::zero_counters`]).
pub fn zero_counters() {
    for kind in [wire::Kind::Text, wire::Kind::Image] {
        metrics::counter!("versus_jobs_aliased_total", "kind" => kind.as_str()).increment(0);
        for result in ["done", "failed", "refused"] {
            metrics::counter!("versus_generations_total", "kind" => kind.as_str(), "result" => result)
                .increment(0);
        }
    }
}

/// What [`opening`] gives: the first call's result, or why the generation ends before it.
pub type Opening<G> = Result<<G as Generation>::Opened, Ended<<G as Generation>::Made>>;

/// A job that names an alias ends here, before anything else ([`Failure::aliased`]).
/// Otherwise the names go to moderation (as the key folds them and as written,
/// [`moderation::names_stage`]) while the first call's share of the budget is reserved, and the
/// upstream is asked only once both are done: the names passed, and the budget had room.
/// Nothing here is published or stored: it may run before the claim is won, and be dropped if
/// it is not (a reservation whose call never began is released).
pub async fn opening<G: Generation>(ctx: &Ctx, job: &Job, generation: &G) -> Opening<G> {
    if let Some(alias) = ctx.aliases.named_in(job) {
        metrics::counter!("versus_jobs_aliased_total", "kind" => job.kind.as_str()).increment(1);
        return Err(Ended::GaveUp(Failure::aliased(alias)));
    }
    let screened = moderation::names_stage(job, &generation.screened());
    let screened: Vec<&str> = screened.iter().map(String::as_str).collect();
    let (verdict, reserved) = tokio::join!(
        ctx.moderator.check(&ctx.providers, "names", &screened),
        ctx.ledger.reserve(generation.paid(job)),
    );
    match verdict {
        Ok(None) => {}
        Ok(Some(refusal)) => return Err(Ended::Refused(refusal)),
        Err(error) => return Err(Ended::GaveUp(Failure::moderation(error))),
    }
    match reserved {
        Ok(Some(reservation)) => Ok(generation.open(ctx, job, reservation).await),
        Ok(None) => Err(Ended::OverBudget),
        Err(error) => Err(Ended::GaveUp(Failure::unreserved(error))),
    }
}

/// Runs `generation` under the claim on `attempt` that this worker just won, with `opening`
/// (already under way, or not yet polled) for its first call, which goes on while `started`
/// is published. When `abandon` fires, the claim is given back and the job handed over
/// ([`Outcome::Handover`]). Its span (`generate`) is the one the events' trace context names.
#[tracing::instrument(name = "generate", skip_all, fields(versus.attempt = attempt))]
pub async fn run<G: Generation>(
    ctx: &Ctx,
    msg: &jetstream::Message,
    job: &Job,
    attempt: i32,
    abandon: &CancellationToken,
    generation: &G,
    opening: impl Future<Output = Opening<G>> + Send,
) -> anyhow::Result<Outcome> {
    let cell = AtomicI32::new(attempt);
    let mut publisher = Publisher::new(&ctx.bus, job);
    if ctx.budget.exhausted_for(job.kind) {
        return over_budget(ctx, msg, job, attempt, &mut publisher).await;
    }
    let work = async {
        let (started, opened) = tokio::join!(publisher.start(attempt), opening);
        started?;
        let ended = match opened {
            Ok(opened) => {
                generation
                    .work(ctx, job, opened, &cell, &mut publisher)
                    .await?
            }
            Err(ended) => ended,
        };
        if let Ended::Finished(_) = ended {
            // A stored answer always has all of its events on the stream. Waiting for them
            // (through a leader election, say) keeps the lease.
            publisher.flush().await?;
        }
        Ok(ended)
    };
    let ended = guarded(ctx, msg, job, &cell, abandon, work).await?;
    let attempt = cell.load(Ordering::SeqCst);
    match ended {
        Ended::Finished(made) => {
            let Some(answer) = store(ctx, msg, job, attempt, generation, &made).await? else {
                tracing::warn!(key = %job.key, attempt, "lost the claim before completing");
                return Ok(Outcome::Ack);
            };
            if answer.degraded() {
                metrics::counter!("versus_answers_degraded_total", "kind" => job.kind.as_str())
                    .increment(1);
                if let Err(e) = store_under_own_key(ctx, job, &answer).await {
                    tracing::warn!(key = %job.key, error = format!("{e:#}"), "storing a fallback's answer under its own key failed");
                }
            }
            announce(ctx, job, attempt, &answer, &mut publisher).await
        }
        // The primary failed the upgrade: the degraded answer stays, served as it was.
        Ended::GaveUp(failure) if generation.upgrade() => {
            tracing::info!(key = %job.key, detail = %failure.detail, "the primary failed an upgrade; the answer stays degraded");
            if let Some(row) = claims::restore_degraded(&ctx.db, job, attempt).await? {
                announce_stored_answer::<G>(ctx, job, row).await?;
            }
            Ok(Outcome::Ack)
        }
        Ended::GaveUp(failure) => give_up(ctx, job, attempt, &failure, &mut publisher).await,
        Ended::Refused(refusal) => refuse(ctx, job, attempt, &refusal, &mut publisher).await,
        Ended::Lost => Ok(Outcome::Ack),
        Ended::HandedOver => Ok(Outcome::Handover),
        Ended::OverBudget => over_budget(ctx, msg, job, attempt, &mut publisher).await,
    }
}

/// Stores a fallback's `answer` (degraded under the job's key) under the key its own model's
/// recipe makes as well, not degraded there: what that model made for these names, kept
/// exactly as the primary's answers are (a row of its own, then its bucket entry), unless that
/// key has an answer or a generation already. Not on the answer's path: readers have it
/// already, under the job's key.
async fn store_under_own_key<A: Serialize>(ctx: &Ctx, job: &Job, answer: &A) -> anyhow::Result<()> {
    let mut value = serde_json::to_value(answer)?;
    let model = value["model"].as_str().unwrap_or_default().to_owned();
    let matchup = Matchup::parse(Some(&job.a), Some(&job.b))?;
    let own = Recipe {
        kind: job.kind,
        model: &model,
        prompt_version: job.prompt_version,
        size: job.size.as_deref(),
    }
    .key(&matchup);
    if !claims::copy_to_own_key(&ctx.db, job, &own).await? {
        return Ok(());
    }
    value["key"] = serde_json::json!(own);
    value["attempt"] = serde_json::json!(1);
    if let Some(fields) = value.as_object_mut() {
        fields.remove("degraded_until_ms");
    }
    let entry = wire::kv_key(job.kind, &own);
    let bytes = Bytes::from(serde_json::to_vec(&value)?);
    let answers = &ctx.bus.answers;
    events::through_election(
        "writing a fallback's answer under its own key",
        |_| true,
        || answers.put(&entry, bytes.clone()),
    )
    .await?;
    Ok(())
}

/// Records what was made in Postgres, fenced on `attempt`; None when the attempt is no longer
/// ours. What was made is paid for: a write that fails (Postgres refused it, or is out of
/// reach) is made again, not the generation. Between tries the lease is extended (fenced) and
/// the job kept alive, as [`keep_alive`] does while the work runs. The tries stop when a
/// heartbeat finds the attempt taken over, when no heartbeat was confirmed for a whole lease
/// (another worker may claim the row by then: the job is retried), and after
/// `VERSUS_STORE_RETRY_SECS`. A try whose answer was lost may have landed: when a later try or
/// a heartbeat finds the attempt no longer running, the row tells whether it holds our answer.
async fn store<G: Generation>(
    ctx: &Ctx,
    msg: &jetstream::Message,
    job: &Job,
    attempt: i32,
    generation: &G,
    made: &G::Made,
) -> anyhow::Result<Option<G::Answer>> {
    let began = Instant::now();
    // The work's keep-alive confirmed a heartbeat at most a third of a lease ago, unless
    // Postgres was failing already; every write is fenced either way.
    let mut confirmed = began;
    let mut delays = retry::answer_write().delays();
    let mut failed = false;
    loop {
        let error = match generation.complete(ctx, job, attempt, made).await {
            Ok(Some(answer)) => return Ok(Some(answer)),
            Ok(None) if !failed => return Ok(None),
            Ok(None) => return stored_by::<G>(ctx, job, attempt).await,
            Err(e) => e,
        };
        failed = true;
        let delay = match delays.next() {
            Some(delay)
                if began.elapsed() + delay <= ctx.store_retry
                    && confirmed.elapsed() + delay < ctx.lease =>
            {
                delay
            }
            _ => return Err(error.context("storing the answer in Postgres")),
        };
        metrics::counter!("versus_store_retries_total", "what" => "answer").increment(1);
        tracing::warn!(key = %job.key, attempt, error = format!("{error:#}"), ?delay, "storing the answer failed; trying the write again, not the generation");
        tokio::time::sleep(delay).await;
        let sent = Instant::now();
        let beat = claims::heartbeat(&ctx.db, job, attempt, ctx.lease);
        match tokio::time::timeout(ctx.lease / HEARTBEATS_PER_LEASE, beat).await {
            Ok(Ok(true)) => {
                confirmed = sent;
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::warn!(key = %job.key, error = %e, "progress ack failed");
                }
            }
            Ok(Ok(false)) => return stored_by::<G>(ctx, job, attempt).await,
            Ok(Err(e)) => tracing::warn!(key = %job.key, error = %e, "lease heartbeat failed"),
            Err(_) => tracing::warn!(key = %job.key, "lease heartbeat timed out"),
        }
    }
}

/// The answer the row holds if `attempt` stored it (a write whose answer was lost had landed);
/// None when the attempt is no longer ours.
async fn stored_by<G: Generation>(
    ctx: &Ctx,
    job: &Job,
    attempt: i32,
) -> anyhow::Result<Option<G::Answer>> {
    match claims::stored(&ctx.db, job).await? {
        Some(row) if row.attempt == attempt => Ok(Some(G::stored_answer(job, row)?)),
        _ => Ok(None),
    }
}

/// Records a refusal (fenced) in Postgres, then in the edge KV bucket, then tells the waiting
/// clients `refused`. What was streamed before it is never stored.
async fn refuse(
    ctx: &Ctx,
    job: &Job,
    attempt: i32,
    refusal: &Refusal,
    publisher: &mut Publisher<'_>,
) -> anyhow::Result<Outcome> {
    tracing::info!(key = %job.key, kind = %job.kind, attempt, reason = %refusal.reason(), "refused");
    refusal.count();
    metrics::counter!("versus_generations_total", "kind" => job.kind.as_str(), "result" => "refused")
        .increment(1);
    if claims::refuse(&ctx.db, job, attempt, &refusal.reason()).await? {
        put_refusal(ctx, job).await?;
        record_prewarm_progress(ctx, job, PrewarmStatus::Failed).await;
        publisher.finish(wire::refused(attempt)).await?;
    }
    Ok(Outcome::Ack)
}

/// A job for a matchup refused before: refresh the edge KV bucket, and tell the key's readers
/// again unless its events subject already ends with the refusal. Nothing is paid for.
pub async fn announce_stored_refusal(ctx: &Ctx, job: &Job, attempt: i32) -> anyhow::Result<()> {
    put_refusal(ctx, job).await?;
    let last = history::last(&ctx.bus, &wire::events_subject(job.kind, &job.key)).await?;
    let refused = wire::refused(attempt);
    if last.and_then(|l| l.event).as_ref() == Some(&refused) {
        return Ok(());
    }
    Publisher::new(&ctx.bus, job).finish(refused).await
}

pub(crate) async fn put_refusal(ctx: &Ctx, job: &Job) -> anyhow::Result<()> {
    let value = wire::Refusal {
        key: job.key.clone(),
        kind: job.kind,
    };
    let entry = wire::refusal_kv_key(job.kind, &job.key);
    put(ctx, &entry, serde_json::to_vec(&value)?.into())
        .await
        .context("writing the refusal to the edge KV bucket")
}

/// Puts `value` at `entry` in the edge KV bucket, through an outage or a leader election (a
/// put is idempotent).
async fn put(ctx: &Ctx, entry: &str, value: Bytes) -> anyhow::Result<()> {
    let answers = &ctx.bus.answers;
    events::through_election(
        "writing to the edge KV bucket",
        |_| true,
        || answers.put(entry, value.clone()),
    )
    .await?;
    Ok(())
}

/// Today's budget is spent, so nothing new starts: a pre-warm job gives its claim back and
/// comes back tomorrow (spread over a minute), a client's job ends with a retryable error.
async fn over_budget(
    ctx: &Ctx,
    msg: &jetstream::Message,
    job: &Job,
    attempt: i32,
    publisher: &mut Publisher<'_>,
) -> anyhow::Result<Outcome> {
    metrics::counter!("versus_budget_refusals_total", "kind" => job.kind.as_str()).increment(1);
    if Lane::of(&msg.subject) == Lane::Prewarm {
        claims::release(&ctx.db, job, attempt).await?;
        let spread = job.key.as_str().bytes().map(u64::from).sum::<u64>() % TOMORROW_SPREAD_SECS;
        return Ok(Outcome::Retry(
            budget::until_tomorrow() + Duration::from_secs(spread),
        ));
    }
    let failure = Failure {
        code: ErrorCode::BudgetExhausted,
        detail: "the daily budget is spent".to_owned(),
        counts: false,
    };
    give_up(ctx, job, attempt, &failure, publisher).await
}

/// Runs `work` while keeping the claim alive. If our own infrastructure fails (NATS or
/// Postgres), or `abandon` fires, the work stops and the lease is given back so that another
/// worker can take the job at once. If Postgres confirms no heartbeat for a whole lease, the
/// work stops with an error: the job is retried, never acknowledged unfinished.
async fn guarded<T>(
    ctx: &Ctx,
    msg: &jetstream::Message,
    job: &Job,
    attempt: &AtomicI32,
    abandon: &CancellationToken,
    work: impl Future<Output = anyhow::Result<Ended<T>>>,
) -> anyhow::Result<Ended<T>> {
    let ended = tokio::select! {
        ended = work => ended,
        stopped = keep_alive(ctx, msg, job, attempt, abandon) => match stopped {
            Stopped::Lost => Ok(Ended::Lost),
            Stopped::Abandoned => Ok(Ended::HandedOver),
            // Nothing is stored and no client was told: the job must be retried (nak'd), not
            // acked, or it would end silently. Once Postgres is back, its next delivery
            // claims the row, whose lease has run out by now (so there is nothing to give
            // back), and starts a new attempt, which clients see as a reset.
            Stopped::Unreachable => {
                let attempt = attempt.load(Ordering::SeqCst);
                tracing::warn!(key = %job.key, attempt, "Postgres did not confirm the lease in time; stopping, the job will be retried");
                return Err(anyhow::anyhow!(
                    "Postgres did not confirm the lease of attempt {attempt} for {:?}",
                    ctx.lease
                ));
            }
        },
    };
    // The work has been dropped by now: nothing of this attempt runs while the claim goes back.
    let attempt = attempt.load(Ordering::SeqCst);
    match &ended {
        Err(_) => {
            if let Err(e) = claims::release(&ctx.db, job, attempt).await {
                tracing::warn!(key = %job.key, error = %e, "giving the claim back failed; it frees itself when the lease runs out");
            }
        }
        Ok(Ended::HandedOver) => {
            tracing::warn!(key = %job.key, attempt, "stopping past the grace period; handing the job over");
            if let Err(e) = claims::release(&ctx.db, job, attempt).await {
                tracing::warn!(key = %job.key, error = %e, "giving the claim back failed; it frees itself when the lease runs out");
            }
        }
        Ok(Ended::Lost) => tracing::warn!(key = %job.key, "claim taken over; stopping"),
        Ok(Ended::Finished(_) | Ended::GaveUp(_) | Ended::Refused(_) | Ended::OverBudget) => {}
    }
    ended
}

/// Why [`keep_alive`] stopped.
enum Stopped {
    /// The fenced heartbeat found the attempt no longer ours: another worker took it over.
    Lost,
    Abandoned,
    /// No heartbeat was confirmed for a whole lease (Postgres stopped, or out of reach): the
    /// lease has run out, and the claim may be anyone's once Postgres is back.
    Unreachable,
}

/// Extends the lease and tells JetStream the job is alive, until the claim is lost, the lease
/// runs out unconfirmed, or `abandon` fires. `abandon` is heeded between heartbeats only: a
/// heartbeat that landed after the release would take the lease again for nobody.
///
/// A heartbeat gets one tick (a third of the lease) at most, and never more than what is left
/// of the lease: one that hangs on a Postgres that is stopped or cut off must neither hold up
/// the progress acks nor keep the work going past the lease. (A heartbeat given up on may
/// still land later; it only extends this attempt's own lease, fenced as ever.)
async fn keep_alive(
    ctx: &Ctx,
    msg: &jetstream::Message,
    job: &Job,
    attempt: &AtomicI32,
    abandon: &CancellationToken,
) -> Stopped {
    let mut tick = tokio::time::interval(ctx.lease / HEARTBEATS_PER_LEASE);
    tick.tick().await;
    // When the last confirmed heartbeat was sent: the lease it set lasts at least until then
    // plus the lease.
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = abandon.cancelled() => return Stopped::Abandoned,
        }
        let sent = Instant::now();
        let limit =
            (ctx.lease / HEARTBEATS_PER_LEASE).min(ctx.lease.saturating_sub(last_ok.elapsed()));
        let beat = claims::heartbeat(&ctx.db, job, attempt.load(Ordering::SeqCst), ctx.lease);
        match tokio::time::timeout(limit, beat).await {
            Ok(Ok(true)) => last_ok = sent,
            Ok(Ok(false)) => return Stopped::Lost,
            Ok(Err(e)) => tracing::warn!(key = %job.key, error = %e, "lease heartbeat failed"),
            Err(_) => tracing::warn!(key = %job.key, ?limit, "lease heartbeat timed out"),
        }
        if last_ok.elapsed() >= ctx.lease {
            return Stopped::Unreachable;
        }
        if let Err(e) = msg.ack_with(AckKind::Progress).await {
            tracing::warn!(key = %job.key, error = %e, "progress ack failed");
        }
    }
}

/// Records a failure (fenced) and tells the waiting clients.
async fn give_up(
    ctx: &Ctx,
    job: &Job,
    attempt: i32,
    failure: &Failure,
    publisher: &mut Publisher<'_>,
) -> anyhow::Result<Outcome> {
    tracing::warn!(key = %job.key, kind = %job.kind, attempt, detail = %failure.detail, "giving up");
    metrics::counter!("versus_generations_total", "kind" => job.kind.as_str(), "result" => "failed")
        .increment(1);
    let what = (
        failure.code.as_str(),
        failure.code.message(),
        failure.detail.as_str(),
    );
    let failed = claims::fail(&ctx.db, job, attempt, what, failure.counts, ctx.cooldown).await?;
    if let Failed::Recorded { retry_at_ms } = failed {
        if retry_at_ms.is_some() {
            tracing::warn!(key = %job.key, kind = %job.kind, "failed too often in a row; cooling down");
            metrics::counter!("versus_cooldowns_total", "kind" => job.kind.as_str()).increment(1);
        }
        record_prewarm_progress(ctx, job, PrewarmStatus::Failed).await;
        publisher
            .finish(Event::Error {
                attempt,
                code: failure.code.as_str().to_owned(),
                message: failure.code.message().to_owned(),
                // Once it has cooled down, the matchup is tried again.
                retryable: failure.code.retryable() || retry_at_ms.is_some(),
                retry_at_ms,
            })
            .await?;
    }
    Ok(Outcome::Ack)
}

/// A job for a matchup that cools down after failing too often in a row: its clients get the
/// last error again, retryable once the cool-down ends, and nothing is paid for. No claim is
/// held, and none can be won before then, so no other event follows on the subject.
pub async fn announce_cooldown(
    ctx: &Ctx,
    job: &Job,
    attempt: i32,
    retry_at_ms: u64,
    code: String,
    message: String,
) -> anyhow::Result<()> {
    Publisher::new(&ctx.bus, job)
        .finish(Event::Error {
            attempt,
            code,
            message,
            retryable: true,
            retry_at_ms: Some(retry_at_ms),
        })
        .await
}

/// What follows the fenced Postgres write of a finished answer (which recorded the progress of
/// the pre-warm items waiting on it too): the edge KV bucket, then `done`.
async fn announce(
    ctx: &Ctx,
    job: &Job,
    attempt: i32,
    answer: &(impl Serialize + Degraded),
    publisher: &mut Publisher<'_>,
) -> anyhow::Result<Outcome> {
    if !put_answer(ctx, job, attempt, answer).await? {
        // A purge overtook the answer: its `purged` ends the readers, and nothing is told.
        tracing::info!(key = %job.key, kind = %job.kind, attempt, "purged as it was stored");
        return Ok(Outcome::Ack);
    }
    publisher.done(attempt, answer.model()).await?;
    metrics::counter!("versus_generations_total", "kind" => job.kind.as_str(), "result" => "done")
        .increment(1);
    tracing::info!(key = %job.key, kind = %job.kind, attempt, "answer stored");
    Ok(Outcome::Ack)
}

/// A job for an answer that is already done (`row`): refresh the edge cache and pre-warm
/// progress, and publish the stored answer again to its events subject unless the subject
/// already ends with `done`.
pub async fn announce_stored_answer<G: Generation>(
    ctx: &Ctx,
    job: &Job,
    row: Stored,
) -> anyhow::Result<()> {
    let attempt = row.attempt;
    let answer = G::stored_answer(job, row)?;
    if !put_answer(ctx, job, attempt, &answer).await? {
        return Ok(());
    }
    record_prewarm_progress(ctx, job, PrewarmStatus::Done).await;
    let last = history::last(&ctx.bus, &wire::events_subject(job.kind, &job.key)).await?;
    if matches!(
        last.and_then(|l| l.event),
        Some(Event::Done { .. } | Event::Purged)
    ) {
        return Ok(());
    }
    // Told again only while the row is still this answer's: a purge that marks it from here
    // on purges what follows from the subject, and ends with `purged`.
    if !still_done(ctx, job, attempt).await? {
        return Ok(());
    }
    let mut publisher = Publisher::new(&ctx.bus, job);
    publisher.start(attempt).await?;
    if let Some(text) = G::replayed_text(&answer) {
        publisher.chunk(attempt, 0, text.to_owned()).await?;
    }
    publisher.done(attempt, answer.model()).await
}

/// Records the outcome for the pre-warm batches waiting on this key. Best effort: progress
/// tracking must not fail the job itself.
async fn record_prewarm_progress(ctx: &Ctx, job: &Job, status: PrewarmStatus) {
    if let Err(e) = claims::record_prewarm_progress(&ctx.db, job, status).await {
        tracing::warn!(key = %job.key, error = %e, "recording pre-warm progress failed");
    }
}

/// Writes a finished answer of `attempt` to the edge KV bucket unless a purge overtook it, and
/// says whether it did. The entry's revision is read first, then the row is found still done
/// with `attempt`: a purge marks the row before it writes its KV marker, so the marker of any
/// purge not seen here comes after that read, and the write, conditional on the revision read,
/// either lands before the marker (which then removes it) or is refused. So a purged answer is
/// never written back above its purge's marker, where every replica would take it for a new
/// one (`cache::Floors`), however long an election held the write back.
pub(crate) async fn put_answer(
    ctx: &Ctx,
    job: &Job,
    attempt: i32,
    answer: &impl Serialize,
) -> anyhow::Result<bool> {
    use async_nats::jetstream::kv::UpdateErrorKind;
    let entry = wire::kv_key(job.kind, &job.key);
    let value = Bytes::from(serde_json::to_vec(answer)?);
    let answers = &ctx.bus.answers;
    let revision = events::through_election(
        "reading the edge KV bucket",
        |_| true,
        || async {
            answers
                .entry(entry.clone())
                .await
                .map(|found| found.map_or(0, |e| e.revision))
        },
    )
    .await
    .context("reading the answer's entry in the edge KV bucket")?;
    if !still_done(ctx, job, attempt).await? {
        return Ok(false);
    }
    let written = events::through_election(
        "writing to the edge KV bucket",
        |e: &async_nats::jetstream::kv::UpdateError| e.kind() != UpdateErrorKind::WrongLastRevision,
        || answers.update(&entry, value.clone(), revision),
    )
    .await;
    match written {
        Ok(_) => Ok(true),
        // Another write came first: a purge's marker, or an earlier try of this one whose
        // acknowledgement was lost (then the entry holds this very answer).
        Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
            let now = answers
                .get(&entry)
                .await
                .context("reading the answer back from the edge KV bucket")?;
            Ok(now.as_deref() == Some(&value[..]))
        }
        Err(e) => Err(e).context("writing the answer to the edge KV bucket"),
    }
}

/// Whether `job`'s row is still done with `attempt` (a purge marks it `purged`).
async fn still_done(ctx: &Ctx, job: &Job, attempt: i32) -> anyhow::Result<bool> {
    let done: Option<bool> = sqlx::query_scalar(
        "SELECT status = 'done' AND attempt = $3 FROM generations WHERE kind = $1 AND key = $2",
    )
    .bind(job.kind.as_str())
    .bind(job.key.as_str())
    .bind(attempt)
    .fetch_optional(&ctx.db)
    .await
    .context("reading whether the answer is still stored")?;
    Ok(done == Some(true))
}
