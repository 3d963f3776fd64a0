//! Publishing a job to the jobs stream through a NATS outage or a JetStream leader election.
//!
//! async-nats does not retry a JetStream publish: after the node that leads the jobs stream dies,
//! the stream accepts nothing until its peers elect a new leader (4 to 9 s with nats-server's
//! Raft timers), and a publish meanwhile times out or gets "no responders". A job is published
//! with a message id (`Nats-Msg-Id`), so [`job`] publishes it again with the same id until the
//! stream acknowledges it: a try whose ack was lost but which had landed is taken as a
//! duplicate within the stream's duplicate window (two minutes), not as a second job. The first
//! try is the only round trip when it is acknowledged.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    context::{PublishError, PublishErrorKind},
    message::PublishMessage,
    publish::PublishAck,
};
use bytes::Bytes;
use tracing::{Span, field::Empty};
use versus_shared::{bus, retry, traces, wire};

/// How long one try waits for its acknowledgement before the next try (the context's own
/// timeout is longer than an election leaves room for).
const TRY_TIMEOUT: Duration = Duration::from_secs(3);

/// Publishes `payload` on `subject` with message id `msg_id` (and [`wire::UNDER_WAY_HEADER`]
/// when `under_way`; with a per-message TTL, `Nats-TTL`, when `ttl` is set: the stream removes
/// the job once it is that old, delivered or not), trying again with the same id on an error that an outage or an election
/// explains, for up to [`retry::BUS_WRITE_FOR`]. A full stream (`bus::is_full`), a message too big and an
/// expectation that failed are not retried.
///
/// The span `job.publish` is the parent the worker's `job` span continues: its trace context
/// travels in the message's headers (see `versus_shared::traces`), the same on every try.
#[tracing::instrument(
    name = "job.publish",
    skip_all,
    fields(
        otel.kind = "producer",
        messaging.destination.name = %subject,
        messaging.message.id = %msg_id,
        versus.tries = Empty,
        versus.duplicate = Empty,
    )
)]
pub async fn job(
    js: &jetstream::Context,
    subject: String,
    payload: Bytes,
    msg_id: String,
    under_way: bool,
    ttl: Option<Duration>,
) -> Result<PublishAck, PublishError> {
    let span = Span::current();
    let trace = traces::headers(&span);
    let deadline = tokio::time::Instant::now() + retry::BUS_WRITE_FOR;
    let mut delays = retry::bus_write().delays();
    let mut tries = 0u32;
    loop {
        tries += 1;
        let mut message = PublishMessage::build().payload(payload.clone());
        if let Some(trace) = &trace {
            message = message.headers(trace.clone());
        }
        message = message.message_id(msg_id.as_str());
        if under_way {
            message = message.header(wire::UNDER_WAY_HEADER, "1");
        }
        if let Some(ttl) = ttl {
            // Whole seconds, at least one (the server's unit and minimum).
            message = message.ttl(ttl.max(Duration::from_secs(1)));
        }
        let error = match try_once(js, subject.clone(), message).await {
            Ok(ack) => {
                span.record("versus.tries", tries);
                span.record("versus.duplicate", ack.duplicate);
                if tries > 1 {
                    tracing::info!(%subject, tries, duplicate = ack.duplicate, "job published after retrying");
                }
                return Ok(ack);
            }
            Err(e) if !retryable(&e) => return Err(e),
            Err(e) => e,
        };
        let delay = delays.next().unwrap_or(Duration::from_secs(1));
        if tokio::time::Instant::now() + delay >= deadline {
            tracing::warn!(%subject, tries, error = %error, "publishing a job failed; giving up");
            return Err(error);
        }
        metrics::counter!("versus_job_publish_retries_total").increment(1);
        tracing::info!(%subject, tries, error = %error, ?delay, "publishing a job failed; retrying with the same message id");
        tokio::time::sleep(delay).await;
    }
}

async fn try_once(
    js: &jetstream::Context,
    subject: String,
    message: PublishMessage,
) -> Result<PublishAck, PublishError> {
    let ack = js.send_publish(subject, message).await?;
    match tokio::time::timeout(TRY_TIMEOUT, ack.into_future()).await {
        Ok(acked) => acked,
        Err(_) => Err(PublishError::new(PublishErrorKind::TimedOut)),
    }
}

/// Whether another try may succeed: not for a full stream, a message over the server's
/// payload limit or a failed expectation; yes for timeouts, no responders (no leader), a
/// broken connection and JetStream errors such as "temporarily unavailable".
fn retryable(error: &PublishError) -> bool {
    if bus::is_full(error) {
        return false;
    }
    !matches!(
        error.kind(),
        PublishErrorKind::MaxPayloadExceeded
            | PublishErrorKind::WrongLastMessageId
            | PublishErrorKind::WrongLastSequence
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_retried_and_refusals_are_not() {
        for kind in [
            PublishErrorKind::TimedOut,
            PublishErrorKind::StreamNotFound,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::Other,
        ] {
            assert!(retryable(&PublishError::new(kind)), "{kind:?}");
        }
        for kind in [
            PublishErrorKind::MaxPayloadExceeded,
            PublishErrorKind::WrongLastSequence,
        ] {
            assert!(!retryable(&PublishError::new(kind)), "{kind:?}");
        }
    }
}
