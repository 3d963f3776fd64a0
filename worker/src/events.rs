//! Publishing one generation's events on `versus.events.<kind>.<key>`. Chunks are published
//! without waiting for each acknowledgement (the connection keeps them in order), with at most
//! [`MAX_PENDING_ACKS`] awaited per generation (the JetStream context bounds acks in flight
//! per connection, so unbounded generations in parallel would starve each other); every
//! acknowledgement is awaited before the completion is recorded, so a stored answer always has
//! all of its chunks on the stream.
//!
//! A leader election of the events stream (a hub server died: 4 to 9 s in which the stream
//! accepts nothing, and async-nats does not retry) costs a pause, not the generation. Every
//! event carries a message id of its place, `<kind>.<key>.<publisher>.<attempt>.<offset>` for
//! a chunk and `<kind>.<key>.<publisher>.<attempt>.<started|done|error>` otherwise, and one
//! that the stream refused or left unacknowledged is published again with the same id
//! ([`through_election`]) until the stream takes it, for up to [`retry::BUS_WRITE_FOR`]: a try
//! that had landed is a duplicate within the stream's duplicate window (30 s), not a second
//! copy.
//! `<publisher>` is drawn at random for each [`Publisher`]: an answer announced again repeats
//! its attempt, and its events must not be taken for duplicates of the first telling's. Events
//! found refused go out again, in order, before anything new is published, so the stream keeps
//! the order of the text, and a terminal event is published only once everything before it is
//! stored.
//!
//! `started` and the terminal event carry the trace context of the span the publisher was made
//! in (the generation's), so that an API following the key can link to it; chunks carry none,
//! and cost nothing more.

use std::{
    collections::VecDeque,
    fmt::Display,
    future::{Future, IntoFuture},
    pin::Pin,
    time::Duration,
};

use anyhow::Context;
use async_nats::{
    HeaderMap,
    header::NATS_MESSAGE_ID,
    jetstream::{
        context::{PublishAckFuture, PublishError, PublishErrorKind},
        message::PublishMessage,
        publish::PublishAck,
    },
};
use bytes::Bytes;
use futures::FutureExt;
use versus_shared::{
    bus::{self, Bus},
    history, retry, traces,
    wire::{self, Event, Job},
};

/// Acknowledgements one generation may leave pending before it waits for the oldest.
pub const MAX_PENDING_ACKS: usize = 32;
/// Hex digits of a publisher's random part of its message ids: 48 bits, so that two tellings
/// of one answer within the duplicate window never share ids.
const PUBLISHER_ID_CHARS: usize = 12;
/// How long one try of an event published again waits for its acknowledgement.
const TRY_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs `write` until it succeeds, and again after an error that `retryable` allows (an
/// outage or a leader election), as [`retry::bus_write`] has it (100 ms to 1 s, jittered), for
/// up to [`retry::BUS_WRITE_FOR`] in all. `what` names the write in the logs; every try again
/// counts in `versus_bus_write_retries_total`.
pub async fn through_election<T, E, Fut>(
    what: &str,
    retryable: impl Fn(&E) -> bool,
    write: impl FnMut() -> Fut,
) -> Result<T, E>
where
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    let deadline = tokio::time::Instant::now() + retry::BUS_WRITE_FOR;
    retry::bus_write()
        .retry(write)
        .when(|e| retryable(e) && tokio::time::Instant::now() < deadline)
        .notify(|e, delay| {
            metrics::counter!("versus_bus_write_retries_total").increment(1);
            tracing::info!(what, error = %e, ?delay, "a write to JetStream failed (an outage or a leader election?); trying again");
        })
        .await
}

/// Whether publishing again may succeed: not for a full stream, a message over the server's
/// payload limit or a failed expectation; yes for timeouts, no responders (no leader), a
/// broken connection and JetStream errors such as "temporarily unavailable".
pub fn retryable(error: &PublishError) -> bool {
    !bus::is_full(error)
        && !matches!(
            error.kind(),
            PublishErrorKind::MaxPayloadExceeded
                | PublishErrorKind::WrongLastMessageId
                | PublishErrorKind::WrongLastSequence
        )
}

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

/// What is known of an event published and not yet known to be stored.
enum Ack {
    Awaited(AckFuture),
    Failed(PublishError),
}

/// An event published and not yet known to be stored, with what it takes to publish it again.
struct Sent {
    headers: HeaderMap,
    payload: Bytes,
    ack: Ack,
}

pub struct Publisher<'a> {
    bus: &'a Bus,
    subject: String,
    /// What every message id of this publisher begins with: the kind, the key, and a random
    /// part of this publisher's own.
    ids: String,
    pending: VecDeque<Sent>,
    /// Where the text published in this attempt ends (a picture: its partials published).
    end: usize,
    /// The trace context `started` and the end carry (None when traces are off).
    trace: Option<async_nats::HeaderMap>,
}

impl<'a> Publisher<'a> {
    /// A publisher of `job`'s events, in the trace of the current span.
    pub fn new(bus: &'a Bus, job: &Job) -> Publisher<'a> {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        Publisher {
            bus,
            subject: wire::events_subject(job.kind, &job.key),
            ids: format!("{}.{}.{}", job.kind, job.key, &nonce[..PUBLISHER_ID_CHARS]),
            pending: VecDeque::new(),
            end: 0,
            trace: traces::headers(&tracing::Span::current()),
        }
    }

    /// Starts `attempt`: drops whatever the subject holds from earlier attempts, then
    /// announces the attempt so readers void what they have.
    #[tracing::instrument(name = "events.start", skip_all, fields(otel.kind = "producer", versus.attempt = attempt))]
    pub async fn start(&mut self, attempt: i32) -> anyhow::Result<()> {
        self.flush().await?;
        // A purge is costly for the server (it locks the stream and visits its consumers);
        // most subjects are new, and a direct get of the last message says so cheaply.
        if holds_events(self.bus, &self.subject).await {
            let events = &self.bus.events;
            let subject = &self.subject;
            through_election(
                "purging old events",
                |_| true,
                || events.purge().filter(subject.clone()).into_future(),
            )
            .await
            .context("purging old events")?;
        }
        self.end = 0;
        self.publish(&Event::Started { attempt }).await?;
        self.flush().await
    }

    pub async fn chunk(
        &mut self,
        attempt: i32,
        offset: usize,
        delta: String,
    ) -> anyhow::Result<()> {
        self.end = offset + delta.len();
        self.publish(&Event::Chunk {
            attempt,
            offset,
            delta,
        })
        .await
    }

    /// Publishes partial image `index` of `attempt`, stored at `path`: the attempt's next.
    pub async fn partial(&mut self, attempt: i32, index: u32, path: String) -> anyhow::Result<()> {
        self.end = index as usize + 1;
        self.publish(&Event::Partial {
            attempt,
            index,
            path,
        })
        .await
    }

    /// Publishes a terminal event once every earlier event is stored.
    #[tracing::instrument(
        name = "events.finish",
        skip_all,
        fields(otel.kind = "producer", versus.event = event.name())
    )]
    pub async fn finish(&mut self, event: Event) -> anyhow::Result<()> {
        self.flush().await?;
        self.publish(&event).await?;
        self.flush().await
    }

    /// Publishes `done` for `attempt`, with the length of the text (or the count of partial
    /// images) published before it.
    pub async fn done(&mut self, attempt: i32, model: &str) -> anyhow::Result<()> {
        self.finish(Event::Done {
            attempt,
            model: model.to_owned(),
            length: self.end,
        })
        .await
    }

    /// Waits until everything published so far is stored, publishing again, in order, what
    /// the stream refused or left unacknowledged.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        while let Some(sent) = self.pending.pop_front() {
            until_stored(self.bus, &self.subject, sent).await?;
        }
        Ok(())
    }

    /// The message id of `event`: its place in what this publisher publishes, so that
    /// publishing it again is a duplicate for the stream.
    fn msg_id(&self, event: &Event) -> String {
        let ids = &self.ids;
        match event {
            Event::Chunk {
                attempt, offset, ..
            } => format!("{ids}.{attempt}.{offset}"),
            Event::Partial { attempt, index, .. } => format!("{ids}.{attempt}.partial-{index}"),
            Event::Started { attempt }
            | Event::Done { attempt, .. }
            | Event::Error { attempt, .. } => {
                format!("{ids}.{attempt}.{}", event.name())
            }
            Event::Purged => format!("{ids}.{}", event.name()),
        }
    }

    async fn publish(&mut self, event: &Event) -> anyhow::Result<()> {
        // What the stream refused goes out again before anything new, so that it keeps the
        // events in the order of the text.
        if self.refused() {
            self.flush().await?;
        }
        let mut headers = match &self.trace {
            Some(trace) if !matches!(event, Event::Chunk { .. }) => trace.clone(),
            _ => HeaderMap::new(),
        };
        headers.insert(NATS_MESSAGE_ID, self.msg_id(event).as_str());
        let payload = Bytes::from(serde_json::to_vec(event)?);
        let ack = match send(self.bus, &self.subject, &headers, &payload).await {
            Ok(ack) => Ack::Awaited(ack.into_future()),
            Err(e) => Ack::Failed(e),
        };
        self.pending.push_back(Sent {
            headers,
            payload,
            ack,
        });
        if self.pending.len() > MAX_PENDING_ACKS
            && let Some(oldest) = self.pending.pop_front()
        {
            until_stored(self.bus, &self.subject, oldest).await?;
        }
        Ok(())
    }

    /// Looks at every pending acknowledgement without waiting (which also starts its
    /// timeout): forgets the stored ones, keeps the refused ones; true when one was refused.
    fn refused(&mut self) -> bool {
        let mut refused = false;
        self.pending.retain_mut(|sent| {
            let outcome = match &mut sent.ack {
                Ack::Awaited(ack) => ack.as_mut().now_or_never(),
                Ack::Failed(_) => {
                    refused = true;
                    return true;
                }
            };
            match outcome {
                None => true,
                Some(Ok(_)) => false,
                Some(Err(e)) => {
                    sent.ack = Ack::Failed(e);
                    refused = true;
                    true
                }
            }
        });
        refused
    }
}

// The steps that wait take the bus and the subject rather than the publisher: it holds
// acknowledgement futures that may be sent between threads but not shared, and a generation's
// future must be `Send`.

/// Whether `subject` holds any event (true when unsure, so that a purge follows).
async fn holds_events(bus: &Bus, subject: &str) -> bool {
    !matches!(history::last(bus, subject).await, Ok(None))
}

async fn send(
    bus: &Bus,
    subject: &str,
    headers: &HeaderMap,
    payload: &Bytes,
) -> Result<PublishAckFuture, PublishError> {
    let message = PublishMessage::build()
        .payload(payload.clone())
        .headers(headers.clone());
    bus.js.send_publish(subject.to_owned(), message).await
}

/// Waits until `sent` is stored: its acknowledgement, or else publishing it again with the
/// same message id through an outage or a leader election.
async fn until_stored(bus: &Bus, subject: &str, sent: Sent) -> anyhow::Result<()> {
    let error = match sent.ack {
        Ack::Awaited(ack) => match ack.await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        },
        Ack::Failed(e) => e,
    };
    if !retryable(&error) {
        return Err(error).context("the events stream refused an event");
    }
    let id = sent
        .headers
        .get(NATS_MESSAGE_ID)
        .map(|id| id.as_str().to_owned())
        .unwrap_or_default();
    metrics::counter!("versus_bus_write_retries_total").increment(1);
    tracing::info!(%subject, %id, %error, "the events stream did not take an event; publishing it again with the same message id");
    let again = || async {
        let ack = send(bus, subject, &sent.headers, &sent.payload).await?;
        match tokio::time::timeout(TRY_TIMEOUT, ack.into_future()).await {
            Ok(acked) => acked,
            Err(_) => Err(PublishError::new(PublishErrorKind::TimedOut)),
        }
    };
    through_election("publishing an event", retryable, again)
        .await
        .context("the events stream refused an event")?;
    Ok(())
}
