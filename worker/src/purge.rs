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
use futures::StreamExt;
use object_store::ObjectStoreExt;
use tokio_util::sync::CancellationToken;
use versus_shared::{
    bus::Bus,
    wire::{self, Event, Marker, PurgeReply, PurgeRequest},
};

use crate::{ctx::Ctx, events::through_election};

/// Carries out purge requests until `shutdown`.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut requests = ctx
        .bus
        .client
        .queue_subscribe(
            wire::PURGE_REQUEST_SUBJECT,
            wire::PURGE_REQUEST_QUEUE.to_owned(),
        )
        .await?;
    loop {
        let msg = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            msg = requests.next() => match msg {
                Some(msg) => msg,
                None => return Ok(()),
            },
        };
        // Answered only on the API's inbox: any other reply subject (a stream's delete API, a
        // KV key) would have this worker publish there on the requester's behalf. Refused
        // before anything is done.
        let reply_to = match msg.reply {
            Some(to) if wire::is_api_inbox(to.as_str()) => to,
            Some(_) => {
                refuse("reply_subject");
                continue;
            }
            None => {
                refuse("no_reply");
                continue;
            }
        };
        let outcome = match serde_json::from_slice::<PurgeRequest>(&msg.payload) {
            Ok(request) => purge(&ctx, &request).await,
            Err(e) => Err(anyhow::Error::new(e).context("an unreadable purge request")),
        };
        let reply = match outcome {
            Ok(markers) => PurgeReply {
                error: None,
                markers,
            },
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "a purge failed");
                PurgeReply {
                    error: Some(format!("{e:#}")),
                    markers: Vec::new(),
                }
            }
        };
        let payload = serde_json::to_vec(&reply)?;
        if let Err(e) = ctx.bus.client.publish(reply_to, payload.into()).await {
            tracing::warn!(error = %e, "answering a purge request failed");
        }
    }
}

/// Counts and logs a request refused before anything was done for it: one whose reply subject
/// is not an API inbox, or that has none (the API always asks with a reply).
fn refuse(reason: &'static str) {
    metrics::counter!("versus_bus_refused_total", "reason" => reason).increment(1);
    tracing::error!(reason, "refused a purge request; nothing was done");
}

/// The refusal counter's series, at zero from the start (an alert divides nothing).
pub fn zero_counters() {
    for reason in ["no_reply", "reply_subject"] {
        metrics::counter!("versus_bus_refused_total", "reason" => reason).absolute(0);
    }
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
            // Each write goes on through a leader election (a hub server died), as a
            // generation's do: a purge takes seconds longer then, rather than stopping half-way.
            let revision = through_election(
                "purging a KV entry",
                |_| true,
                || purge_entry(&ctx.bus, &entry),
            )
            .await
            .with_context(|| format!("purging {entry} from the KV bucket"))?;
            markers.push(Marker { entry, revision });
        }
    }
    let event = serde_json::to_vec(&Event::Purged)?;
    for answer in &request.answers {
        let (kind, key) = (answer.kind, &answer.key);
        // Readers waiting on the answer learn it is gone; later requests start afresh.
        let subject = wire::events_subject(kind, key);
        let events = &ctx.bus.events;
        through_election(
            "purging the events",
            |_| true,
            || events.purge().filter(subject.clone()).into_future(),
        )
        .await
        .context("purging the events")?;
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

/// Purges `entry` from the answers bucket as `kv::Store::purge` does (a `PURGE` marker that
/// rolls the entry's older values up), and returns the marker's revision, which that method
/// does not tell.
async fn purge_entry(bus: &Bus, entry: &str) -> anyhow::Result<u64> {
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
