//! Answers the pings edges send across their leaf link (`versus.link.ping`, one worker per
//! ping through a queue group). An edge's API counts its link to the hub as up while a worker
//! answers: that needs neither a JetStream leader nor anything but the link and a worker, so a
//! hub server dying (and its streams electing new leaders) does not look like a cut link.

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use versus_shared::wire;

/// Answers pings until `shutdown`.
pub async fn run(client: async_nats::Client, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut pings = client
        .queue_subscribe(wire::LINK_PING_SUBJECT, wire::LINK_PING_QUEUE.to_owned())
        .await?;
    loop {
        let ping = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            ping = pings.next() => match ping {
                Some(ping) => ping,
                None => return Ok(()),
            },
        };
        if let Some(to) = ping.reply
            && let Err(e) = client.publish(to, bytes::Bytes::new()).await
        {
            tracing::debug!(error = %e, "answering a ping failed");
        }
    }
}
