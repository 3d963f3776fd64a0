//! An operator's purge, carried out for the API. The API may not write to the events stream or
//! the KV bucket (its NATS user is read-only there), so its admin route asks a worker, on the
//! core NATS subject `versus.admin.purge` (one worker per request, through a queue group), to
//! remove the answers: their rows, then their pictures, then their KV entries (answer and
//! refusal), then their events, which end with `purged` so that readers waiting on them ask
//! again. The rows go first: a job that runs in between finds no finished row to announce
//! again, and generates afresh.
//!
//! A row is not deleted but marked `purged` (no text, no picture, no error), keeping its
//! attempt: the next claim takes the next attempt, so the purged answer's event ids
//! (`<attempt>:<offset>`) never name the next one, and a client resuming with one gets `reset`.
//! The KV entries are purged with markers whose revisions (the bucket's stream sequences) the
//! reply carries: every API replica treats an entry below them as stale (a lagging replica or
//! mirror still holds the purged value), for good.

use std::{future::IntoFuture, sync::Arc};

use anyhow::Context;
use object_store::ObjectStoreExt;
use tokio_util::sync::CancellationToken;
use versus_shared::{
    bus::Bus,
    key::Key,
    wire::{self, Event, Kind, Marker, PurgeReply, PurgeRequest},
};

use crate::{ctx::Ctx, events::through_election, responder};

/// Carries out purge requests until `shutdown`, one at a time.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    responder::serve(
        ctx,
        wire::PURGE_REQUEST_SUBJECT,
        wire::PURGE_REQUEST_QUEUE,
        1,
        shutdown,
        |ctx, request: PurgeRequest| async move {
            Ok(PurgeReply {
                error: None,
                markers: purge(&ctx, &request).await?,
            })
        },
        |error| PurgeReply {
            error: Some(error),
            markers: Vec::new(),
        },
    )
    .await
}

/// Purges the answers `request` names, and returns the markers written in the answers bucket.
async fn purge(ctx: &Ctx, request: &PurgeRequest) -> anyhow::Result<Vec<Marker>> {
    let kinds: Vec<&str> = request.answers.iter().map(|a| a.kind.as_str()).collect();
    let keys: Vec<&str> = request.answers.iter().map(|a| a.key.as_str()).collect();
    // Marked rather than deleted, so that the attempt lives on (see the module's doc); the
    // lease and the fencing go with the status, as a deletion would take them: a worker still
    // generating the answer finds its attempt no longer running, and stops.
    let purged: Vec<(String, Option<String>)> = sqlx::query_as(
        "WITH old AS (
             SELECT kind, key, image_path FROM generations
             WHERE (kind, key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))
               AND status <> 'purged'
             FOR UPDATE)
         UPDATE generations g
         SET status = 'purged', text = NULL, prompt_tokens = NULL, completion_tokens = NULL,
             image_path = NULL, image_size = NULL, image_sha256 = NULL, content_type = NULL,
             lease_until = NULL, worker = NULL, error = NULL, error_code = NULL,
             error_message = NULL, failures = 0, retry_at = NULL, completed_at = NULL,
             updated_at = now()
         FROM old WHERE g.kind = old.kind AND g.key = old.key
         RETURNING g.kind, old.image_path",
    )
    .bind(&kinds)
    .bind(&keys)
    .fetch_all(&ctx.db)
    .await
    .context("marking the rows purged")?;
    for (kind, _) in &purged {
        metrics::counter!("versus_purged_total", "kind" => kind.clone()).increment(1);
    }
    for path in purged.into_iter().filter_map(|(_, path)| path) {
        if let Err(e) = ctx.objects.delete(&path.as_str().into()).await {
            tracing::warn!(%path, error = %e, "deleting a purged picture failed");
        }
    }
    // The KV entries before the events (a reader told `purged` asks again, and must miss), and
    // the first answer's own entry (the text's, whose names the API finds there once the row
    // is purged) last: a purge that fails before it is found and finished when asked again.
    let mut markers = Vec::new();
    for answer in request.answers.iter().rev() {
        let (kind, key) = (answer.kind, &answer.key);
        for entry in [wire::refusal_kv_key(kind, key), wire::kv_key(kind, key)] {
            let revision = purge_entry(ctx, &entry).await?;
            markers.push(Marker { entry, revision });
        }
    }
    let event = serde_json::to_vec(&Event::Purged)?;
    for answer in &request.answers {
        let (kind, key) = (answer.kind, &answer.key);
        // Readers waiting on the answer learn it is gone; later requests start afresh.
        purge_events(ctx, kind, key).await?;
        let subject = wire::events_subject(kind, key);
        // A `purged` that landed twice says the same thing twice.
        through_election("publishing `purged`", crate::events::retryable, || async {
            ctx.bus
                .js
                .publish(subject.clone(), event.clone().into())
                .await?
                .await
        })
        .await
        .context("publishing `purged`")?;
        tracing::info!(%kind, %key, "purged");
    }
    // Done: a purged row's `completed_at` says its purge finished. Until then (a purge that
    // failed half-way), the API takes the key for one still to purge, and asking again
    // finishes it; afterwards, for one purged already (404).
    sqlx::query(
        "UPDATE generations SET completed_at = now()
         WHERE (kind, key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))
           AND status = 'purged' AND completed_at IS NULL",
    )
    .bind(&kinds)
    .bind(&keys)
    .execute(&ctx.db)
    .await
    .context("recording that the purge finished")?;
    Ok(markers)
}

/// Purges `entry` from the answers bucket (see [`purge_marker`]) and returns the marker's
/// revision. The write goes on through a leader election (a hub server died), as a
/// generation's do: a purge takes seconds longer then, rather than stopping half-way.
pub(crate) async fn purge_entry(ctx: &Ctx, entry: &str) -> anyhow::Result<u64> {
    through_election(
        "purging a KV entry",
        |_| true,
        || purge_marker(&ctx.bus, entry),
    )
    .await
    .with_context(|| format!("purging {entry} from the KV bucket"))
}

/// Purges the events of `<kind>.<key>`'s answer, through a leader election.
pub(crate) async fn purge_events(ctx: &Ctx, kind: Kind, key: &Key) -> anyhow::Result<()> {
    let subject = wire::events_subject(kind, key);
    let events = &ctx.bus.events;
    through_election(
        "purging the events",
        |_| true,
        || events.purge().filter(subject.clone()).into_future(),
    )
    .await
    .context("purging the events")?;
    Ok(())
}

/// Purges `entry` from the answers bucket as `kv::Store::purge` does (a `PURGE` marker that
/// rolls the entry's older values up), and returns the marker's revision, which that method
/// does not tell.
async fn purge_marker(bus: &Bus, entry: &str) -> anyhow::Result<u64> {
    let store = &bus.answers;
    let subject = format!(
        "{}{entry}",
        store.put_prefix.as_deref().unwrap_or(&store.prefix)
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("KV-Operation", "PURGE");
    headers.insert(async_nats::header::NATS_ROLLUP, "sub");
    let ack = bus
        .js
        .publish_with_headers(subject, headers, bytes::Bytes::new())
        .await?
        .await?;
    Ok(ack.sequence)
}
