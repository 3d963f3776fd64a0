//! The jobs queue as Prometheus gauges: the live jobs (`versus_jobs_queued`: waiting or in
//! flight, on either lane) and every job the stream holds (`versus_jobs_stored`, which also
//! counts a job no consumer will deliver again), and per lane the jobs no worker has been
//! given yet (the consumer's lag behind the stream), how long the oldest of
//! them has waited, the jobs delivered and not yet acknowledged, and the deliveries so far.
//!
//! NATS's own monitoring does not speak Prometheus, so each worker reads the stream's and the
//! consumers' info every [`POLL`] and exports what it read. The numbers are the cluster's, the
//! same at every worker: rules aggregate them with `max()`, never `sum()`.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use async_nats::jetstream::stream::{RawMessageErrorKind, Stream};
use tokio_util::sync::CancellationToken;

use crate::consumer::LaneConsumer;

/// How often the queue is read: one stream info, one consumer info per lane, and one message
/// get per lane whose jobs wait (for the oldest one's age).
pub const POLL: Duration = Duration::from_secs(5);

/// Reads the queue every [`POLL`] into the gauges until `shutdown`. A failed read is logged
/// once per run of failures; the gauges keep their last values meanwhile.
pub async fn run(jobs: Stream, lanes: Vec<LaneConsumer>, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        // A read may wait for JetStream's answer (an election, an outage): not past shutdown.
        let polled = tokio::select! {
            () = shutdown.cancelled() => return,
            polled = poll(&jobs, &lanes) => polled,
        };
        match polled {
            Ok(()) if failing => {
                tracing::info!("reading the jobs queue for its metrics works again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "reading the jobs queue for its metrics failed"
                );
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn poll(jobs: &Stream, lanes: &[LaneConsumer]) -> anyhow::Result<()> {
    let info = jobs
        .get_info()
        .await
        .context("reading the jobs stream's info")?;
    metrics::gauge!("versus_jobs_stored").set(info.state.messages as f64);
    metrics::gauge!("versus_jobs_queue_limit").set(info.config.max_messages as f64);
    let mut live = 0;
    for lane in lanes {
        let consumer = jobs
            .consumer_info(lane.name)
            .await
            .with_context(|| format!("reading the {} consumer's info", lane.name))?;
        let label = lane.lane.label();
        // Waiting for a worker, or with one (a job nak'd for later is pending an ack too); a
        // job past its last delivery is neither.
        live += consumer.num_pending + consumer.num_ack_pending as u64;
        metrics::gauge!("versus_jobs_waiting", "lane" => label).set(consumer.num_pending as f64);
        metrics::gauge!("versus_jobs_ack_pending", "lane" => label)
            .set(consumer.num_ack_pending as f64);
        metrics::gauge!("versus_jobs_ack_pending_limit", "lane" => label)
            .set(consumer.config.max_ack_pending as f64);
        metrics::counter!("versus_jobs_delivered_total", "lane" => label)
            .absolute(consumer.delivered.consumer_sequence);
        let oldest = if consumer.num_pending == 0 {
            Duration::ZERO
        } else {
            oldest_waiting(jobs, lane, consumer.delivered.stream_sequence).await?
        };
        metrics::gauge!("versus_jobs_oldest_waiting_age_seconds", "lane" => label)
            .set(oldest.as_secs_f64());
    }
    metrics::gauge!("versus_jobs_queued").set(live as f64);
    Ok(())
}

/// How long the first job of `lane` after `delivered` (the last stream sequence its consumer
/// delivered) has been in the stream: the oldest job no worker has been given yet.
async fn oldest_waiting(
    jobs: &Stream,
    lane: &LaneConsumer,
    delivered: u64,
) -> anyhow::Result<Duration> {
    let next = jobs
        .raw_message_builder()
        .sequence(delivered + 1)
        .next_by_subject(lane.filter)
        .send()
        .await;
    match next {
        Ok(msg) => Ok(SystemTime::now()
            .duration_since(msg.time.into())
            .unwrap_or_default()),
        // Delivered (and acknowledged) between the consumer's info and this read.
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(Duration::ZERO),
        Err(e) => {
            Err(e).with_context(|| format!("reading the oldest waiting job of {}", lane.name))
        }
    }
}
