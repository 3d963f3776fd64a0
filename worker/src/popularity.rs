//! Popularity: the API replicas publish batches of request counts on a core NATS subject;
//! the workers (one of them per batch, through a queue group) add them up in Postgres, and
//! prune the matchups nobody asked for again ([`prune`]), so that the table follows what is
//! asked, not every name anyone ever typed.

use std::time::Duration;

use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use versus_shared::wire::{self, Requests};

/// How long the loop pauses after a batch it could not store: a failing Postgres is not asked
/// again at once for every batch in the subscription's buffer.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_millis(100);

/// Aggregates batches into `popularity` until `shutdown`.
pub async fn run(
    client: async_nats::Client,
    db: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut batches = client
        .queue_subscribe(wire::POPULARITY_SUBJECT, wire::POPULARITY_QUEUE.to_owned())
        .await?;
    loop {
        let msg = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            msg = batches.next() => match msg {
                Some(msg) => msg,
                None => return Ok(()),
            },
        };
        let requests: Vec<Requests> = match serde_json::from_slice(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "skipping an unreadable popularity batch");
                continue;
            }
        };
        if let Err(e) = add(&db, &requests).await {
            // Popularity is a ranking, not a ledger: a lost batch is logged, not retried.
            tracing::warn!(error = %e, batch = requests.len(), "storing popularity failed");
            tokio::time::sleep(PAUSE_AFTER_FAILURE).await;
        }
    }
}

/// Matchups asked for fewer times than this are pruned once unasked for the retention.
pub const FEW_REQUESTS: i64 = 10;
/// How often the workers prune.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Rows deleted per statement: a large backlog goes in short transactions.
const PRUNE_BATCH: i64 = 10_000;

/// At start and then every [`PRUNE_EVERY`] until `shutdown`, deletes the
/// matchups last asked for more than `retention_days` ago with fewer than [`FEW_REQUESTS`]
/// requests. 0 days: never. Every worker does it; a delete is idempotent.
pub async fn prune(db: PgPool, retention_days: u32, shutdown: CancellationToken) {
    if retention_days == 0 {
        return;
    }
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = PRUNE_EVERY;
        match prune_once(&db, retention_days).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned matchups rarely asked for"),
            Err(e) => tracing::warn!(error = %e, "pruning popularity failed"),
        }
    }
}

/// One prune, in batches: how many rows went.
pub async fn prune_once(db: &PgPool, retention_days: u32) -> sqlx::Result<u64> {
    let mut pruned = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM popularity WHERE key IN (
                 SELECT key FROM popularity
                 WHERE last_requested_at < now() - make_interval(days => $1) AND requests < $2
                 LIMIT $3)",
        )
        .bind(i32::try_from(retention_days).unwrap_or(i32::MAX))
        .bind(FEW_REQUESTS)
        .bind(PRUNE_BATCH)
        .execute(db)
        .await?
        .rows_affected();
        pruned += deleted;
        metrics::counter!("versus_popularity_pruned_total").increment(deleted);
        if deleted < PRUNE_BATCH as u64 {
            return Ok(pruned);
        }
    }
}

async fn add(db: &PgPool, requests: &[Requests]) -> sqlx::Result<()> {
    let keys: Vec<&str> = requests.iter().map(|r| r.key.as_str()).collect();
    let a: Vec<&str> = requests.iter().map(|r| r.a.as_str()).collect();
    let b: Vec<&str> = requests.iter().map(|r| r.b.as_str()).collect();
    let counts: Vec<i64> = requests
        .iter()
        .map(|r| i64::try_from(r.count).unwrap_or(i64::MAX))
        .collect();
    sqlx::query(
        "INSERT INTO popularity AS p (key, a, b, requests)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[])
         ON CONFLICT (key) DO UPDATE
             SET requests = p.requests + EXCLUDED.requests, last_requested_at = now()",
    )
    .bind(&keys)
    .bind(&a)
    .bind(&b)
    .bind(&counts)
    .execute(db)
    .await?;
    Ok(())
}
