//! JetStream's memory as Prometheus gauges: the events stream's bytes against its cap
//! (`VERSUS_EVENTS_MAX_MIB`), and what the account keeps in memory altogether (the events
//! stream, consumers' state, anything else in memory). A full memory store refuses every event,
//! so generations could not be announced; the cap keeps the events stream under it, and these
//! gauges show how close either is.
//!
//! nats-server's monitoring does not speak Prometheus, so each worker reads the stream's info
//! and the account's (`$JS.API.INFO`) every [`crate::backlog::POLL`]. The numbers are the
//! cluster's, the same at every worker: rules take their `max()`, never their `sum()`.

use anyhow::Context;
use async_nats::jetstream::{self, stream::Stream};
use tokio_util::sync::CancellationToken;

/// Reads the events stream and the account every [`crate::backlog::POLL`] into the gauges
/// until `shutdown`. A failed read is logged once per run of failures; the gauges keep their
/// last values meanwhile.
pub async fn run(js: jetstream::Context, events: Stream, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        let polled = tokio::select! {
            () = shutdown.cancelled() => return,
            polled = poll(&js, &events) => polled,
        };
        match polled {
            Ok(()) if failing => {
                tracing::info!("reading JetStream's memory for its metrics works again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "reading JetStream's memory for its metrics failed"
                );
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(crate::backlog::POLL) => {}
        }
    }
}

async fn poll(js: &jetstream::Context, events: &Stream) -> anyhow::Result<()> {
    let info = events
        .get_info()
        .await
        .context("reading the events stream's info")?;
    metrics::gauge!("versus_events_stream_bytes").set(info.state.bytes as f64);
    metrics::gauge!("versus_events_stream_messages").set(info.state.messages as f64);
    // -1 (or 0) when uncapped: the rules read the ratio only where the cap is set.
    metrics::gauge!("versus_events_stream_max_bytes").set(info.config.max_bytes as f64);
    let account = js
        .query_account()
        .await
        .context("reading JetStream's account info")?;
    metrics::gauge!("versus_jetstream_memory_bytes").set(account.memory as f64);
    Ok(())
}
