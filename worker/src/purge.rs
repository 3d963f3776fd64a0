//! An operator's purge, carried out for the API. The API may not write to the events stream or
//! the KV bucket (its NATS user is read-only there), so its admin route asks a worker, on the
//! core NATS subject `versus.admin.purge` (one worker per request, through a queue group), to
//! remove the answers: their rows, then their pictures, then their KV entries (answer and
//! refusal), then their events, which end with `purged` so that readers waiting on them ask
//! again. The rows go first: a job that runs in between finds no finished row to announce
//! again, and generates afresh.

use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use tokio_util::sync::CancellationToken;
use versus_shared::wire::{self, Event, PurgeReply, PurgeRequest};

use crate::Ctx;

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
        let reply = PurgeReply {
            error: outcome.err().map(|e| {
                tracing::warn!(error = format!("{e:#}"), "a purge failed");
                format!("{e:#}")
            }),
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

async fn purge(ctx: &Ctx, request: &PurgeRequest) -> anyhow::Result<()> {
    let kinds: Vec<&str> = request.answers.iter().map(|a| a.kind.as_str()).collect();
    let keys: Vec<&str> = request.answers.iter().map(|a| a.key.as_str()).collect();
    let deleted: Vec<(String, Option<String>)> = sqlx::query_as(
        "DELETE FROM generations
         WHERE (kind, key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))
         RETURNING kind, image_path",
    )
    .bind(&kinds)
    .bind(&keys)
    .fetch_all(&ctx.db)
    .await
    .context("deleting the rows")?;
    for (kind, _) in &deleted {
        metrics::counter!("versus_purged_total", "kind" => kind.clone()).increment(1);
    }
    for path in deleted.into_iter().filter_map(|(_, path)| path) {
        if let Err(e) = ctx.objects.delete(&path.as_str().into()).await {
            tracing::warn!(%path, error = %e, "deleting a purged picture failed");
        }
    }
    let marker = serde_json::to_vec(&Event::Purged)?;
    for answer in &request.answers {
        let (kind, key) = (answer.kind, &answer.key);
        for entry in [wire::kv_key(kind, key), wire::refusal_kv_key(kind, key)] {
            ctx.bus
                .answers
                .purge(&entry)
                .await
                .with_context(|| format!("purging {entry} from the KV bucket"))?;
        }
        // Readers waiting on the answer learn it is gone; later requests start afresh.
        let subject = wire::events_subject(kind, key);
        ctx.bus
            .events
            .purge()
            .filter(subject.clone())
            .await
            .context("purging the events")?;
        ctx.bus
            .js
            .publish(subject, marker.clone().into())
            .await
            .context("publishing `purged`")?
            .await
            .context("publishing `purged`")?;
        tracing::info!(%kind, %key, "purged");
    }
    Ok(())
}
