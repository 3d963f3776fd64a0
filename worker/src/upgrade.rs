//! Degraded answers (a fallback's, `wire::Degraded`) made again by the primary once it is back:
//! every few seconds, while the primary's circuit of a kind is closed in this worker, one
//! worker at a time (a transaction-scoped advisory lock) marks the most requested degraded
//! answers of that kind queued (`upgrade_queued_at`), at most `VERSUS_UPGRADE_PER_MINUTE` in
//! any minute, cluster-wide, and publishes their jobs on the pre-warm lane, so that live users
//! never wait behind them and the budget applies as to any job. A queued row is one a job may
//! claim again (`claims::claim_all`, with the `Versus-Upgrade` header); the primary's answer
//! then replaces the degraded one in Postgres and in the bucket, and every replica serves it at
//! once (none keeps a degraded answer in memory). While the primary's circuit is open here,
//! nothing is queued; once its open time is over, one job is, and its call is the probe.
//!
//! An upgrade calls the primary only. One that fails leaves the answer as it was (degraded,
//! served) and queued: it is queued again once another open time has passed, as is one whose
//! job was lost (the queue full, say).

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use async_nats::jetstream::message::PublishMessage;
use tokio_util::sync::CancellationToken;
use versus_shared::{
    key::{Key, Matchup},
    recipe::Recipe,
    wire::{self, Kind},
};

use crate::{
    ctx::Ctx,
    events,
    providers::{Primary, Use},
};

/// How often degraded answers are looked for.
const EVERY: Duration = Duration::from_secs(2);
/// The advisory lock the worker that queues upgrades holds (an arbitrary constant of ours).
const UPGRADE_LOCK: i64 = 0x7665_7273_7573_7570;

/// Queues upgrades until `shutdown`; `per_minute` 0 turns them off.
pub async fn run(ctx: Arc<Ctx>, per_minute: u32, shutdown: CancellationToken) {
    if per_minute == 0 {
        return;
    }
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        match queue(&ctx, per_minute).await {
            Ok(0) => {}
            Ok(queued) => tracing::info!(queued, "degraded answers queued for the primary"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "queueing degraded answers failed"),
        }
    }
}

/// Marks up to the minute's room of degraded answers queued, the most requested first, and
/// publishes their jobs: how many.
async fn queue(ctx: &Ctx, per_minute: u32) -> anyhow::Result<usize> {
    // A kind whose primary's circuit is closed here takes the minute's room; one whose open
    // time is over takes one job, whose call is the probe that closes the circuit again (or
    // not: then the answer stays degraded, and is queued again after another open time).
    let mut kinds: Vec<&str> = Vec::new();
    let mut probing = false;
    for (kind, of) in [(Kind::Text, Use::Text), (Kind::Image, Use::Image)] {
        match ctx.providers.primary(of) {
            Primary::Up => kinds.push(kind.as_str()),
            Primary::ProbeDue => {
                kinds.push(kind.as_str());
                probing = true;
            }
            Primary::Down => {}
        }
    }
    if kinds.is_empty() {
        return Ok(0);
    }
    let most = if probing { 1 } else { i64::from(per_minute) };
    let mut tx = ctx.db.begin().await?;
    let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(UPGRADE_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !ours {
        return Ok(0);
    }
    let rows: Vec<(String, String, String, String, i32)> = sqlx::query_as(
        "WITH room AS (
             SELECT GREATEST($1 - count(*), 0) AS n FROM generations
             WHERE upgrade_queued_at > now() - interval '1 minute'),
         picked AS (
             SELECT g.kind, g.key FROM generations g
             LEFT JOIN popularity p ON p.key = g.key
             WHERE g.status = 'done' AND g.degraded_until IS NOT NULL
               AND g.kind = ANY($2)
               AND (g.upgrade_queued_at IS NULL
                    OR g.upgrade_queued_at < now() - make_interval(secs => $3))
             ORDER BY COALESCE(p.requests, 0) DESC, g.completed_at
             LIMIT LEAST((SELECT n FROM room), $4)
             FOR UPDATE OF g SKIP LOCKED)
         UPDATE generations g SET upgrade_queued_at = now()
         FROM picked WHERE g.kind = picked.kind AND g.key = picked.key
         RETURNING g.kind, g.key, g.a, g.b, g.attempt",
    )
    .bind(i64::from(per_minute))
    .bind(&kinds)
    .bind(ctx.providers.open_for.as_secs_f64())
    .bind(most)
    .fetch_all(&mut *tx)
    .await
    .context("marking degraded answers queued")?;
    tx.commit().await?;
    let mut queued = 0;
    for (kind, key, a, b, attempt) in rows {
        let (Some(kind), Some(key)) = (Kind::parse(&kind), Key::parse(&key)) else {
            continue;
        };
        match publish(ctx, kind, &key, &a, &b, attempt).await {
            Ok(true) => queued += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(%key, error = format!("{e:#}"), "publishing an upgrade failed; it is queued again later")
            }
        }
    }
    metrics::counter!("versus_upgrades_queued_total").increment(queued as u64);
    Ok(queued)
}

/// Publishes the primary's job for the answer of `kind` at `key` (names `a` and `b`, answer
/// `attempt`), on the pre-warm lane, with a message id of that answer: queued by two workers,
/// it is one job. False when this worker's recipe does not make `key` of those names (its
/// settings changed since): nothing to upgrade there.
async fn publish(
    ctx: &Ctx,
    kind: Kind,
    key: &Key,
    a: &str,
    b: &str,
    attempt: i32,
) -> anyhow::Result<bool> {
    let matchup = Matchup::parse(Some(a), Some(b))?;
    let recipe = Recipe::of(kind, &ctx.models);
    if recipe.key(&matchup) != *key {
        return Ok(false);
    }
    let job = recipe.job(&matchup, key.clone());
    let payload = bytes::Bytes::from(serde_json::to_vec(&job)?);
    let subject = wire::prewarm_subject(kind);
    let id = format!("upgrade.{kind}.{key}.{attempt}");
    events::through_election(
        "publishing an upgrade",
        |_| true,
        || async {
            let message = PublishMessage::build()
                .payload(payload.clone())
                .message_id(id.as_str())
                .header(wire::UPGRADE_HEADER, "1");
            ctx.bus
                .js
                .send_publish(subject.clone(), message)
                .await?
                .await
        },
    )
    .await
    .context("publishing the upgrade's job")?;
    Ok(true)
}
