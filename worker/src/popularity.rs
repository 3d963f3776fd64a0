//! Popularity: the API replicas publish batches of request counts on a core NATS subject;
//! the workers (one of them per batch, through a queue group) add them up in Postgres.

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
