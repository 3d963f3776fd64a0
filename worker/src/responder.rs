//! The API's requests that a worker carries out (an operator's purge, a client's report, an
//! operator's settlement of a reported answer): core NATS request/reply through a queue group,
//! so that one worker answers each. The API may not write to Postgres from a public route, nor
//! to the events stream or the answers bucket, so it asks.
//!
//! A request is answered on the API's inbox only: any other reply subject (a stream's delete
//! API, a KV key) would have this worker publish there on the requester's behalf, so such a
//! request is refused before anything is done.

use std::{future::Future, sync::Arc};

use futures::StreamExt;
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::sync::CancellationToken;
use versus_shared::wire;

use crate::ctx::Ctx;

/// Answers requests on `subject` (queue group `queue`), up to `concurrency` at a time, until
/// `shutdown`: each payload is read as a `Req` and carried out by `handle`; one that cannot be
/// read, or whose handling fails, is answered with `failed` of the error (logged).
pub async fn serve<Req, Rep, Fut>(
    ctx: Arc<Ctx>,
    subject: &'static str,
    queue: &'static str,
    concurrency: usize,
    shutdown: CancellationToken,
    handle: impl Fn(Arc<Ctx>, Req) -> Fut,
    failed: impl Fn(String) -> Rep,
) -> anyhow::Result<()>
where
    Req: DeserializeOwned,
    Rep: Serialize,
    Fut: Future<Output = anyhow::Result<Rep>>,
{
    let requests = ctx
        .bus
        .client
        .queue_subscribe(subject, queue.to_owned())
        .await?;
    let (handle, failed) = (&handle, &failed);
    requests
        .take_until(shutdown.cancelled_owned())
        .for_each_concurrent(concurrency, |msg| {
            let ctx = ctx.clone();
            async move {
                let reply_to = match msg.reply {
                    Some(to) if wire::is_api_inbox(to.as_str()) => to,
                    Some(_) => return refuse(subject, "reply_subject"),
                    None => return refuse(subject, "no_reply"),
                };
                let outcome = match serde_json::from_slice::<Req>(&msg.payload) {
                    Ok(request) => handle(ctx.clone(), request).await,
                    Err(e) => Err(anyhow::Error::new(e).context("an unreadable request")),
                };
                let reply = outcome.unwrap_or_else(|e| {
                    tracing::warn!(subject, error = format!("{e:#}"), "a request failed");
                    failed(format!("{e:#}"))
                });
                let sent = match serde_json::to_vec(&reply) {
                    Ok(payload) => ctx
                        .bus
                        .client
                        .publish(reply_to, payload.into())
                        .await
                        .map_err(anyhow::Error::new),
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = sent {
                    tracing::warn!(subject, error = %e, "answering a request failed");
                }
            }
        })
        .await;
    Ok(())
}

/// Counts and logs a request refused before anything was done for it: one whose reply subject
/// is not an API inbox, or that has none (the API always asks with a reply).
fn refuse(subject: &'static str, reason: &'static str) {
    metrics::counter!("versus_bus_refused_total", "reason" => reason).increment(1);
    tracing::error!(subject, reason, "refused a request; nothing was done");
}

/// The refusal counter's series, at zero from the start (an alert divides nothing).
pub fn zero_counters() {
    for reason in ["no_reply", "reply_subject"] {
        metrics::counter!("versus_bus_refused_total", "reason" => reason).absolute(0);
    }
}
