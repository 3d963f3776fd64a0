//! Publishing one generation's events on `versus.events.<kind>.<key>`. Chunks are published
//! without waiting for each acknowledgement (the connection keeps them in order), with at most
//! [`MAX_PENDING_ACKS`] awaited per generation (the JetStream context bounds acks in flight
//! per connection, so unbounded generations in parallel would starve each other); every
//! acknowledgement is awaited before the completion is recorded, so a stored answer always has
//! all of its chunks on the stream.
//!
//! `started` and the terminal event carry the trace context of the span the publisher was made
//! in (the generation's), so that an API following the key can link to it; chunks carry none,
//! and cost nothing more.

use std::collections::VecDeque;

use anyhow::Context;
use async_nats::jetstream::context::PublishAckFuture;
use versus_shared::{
    bus::Bus,
    history, traces,
    wire::{self, Event, Job},
};

/// Acknowledgements one generation may leave pending before it waits for the oldest.
pub const MAX_PENDING_ACKS: usize = 32;

pub struct Publisher<'a> {
    bus: &'a Bus,
    subject: String,
    pending: VecDeque<PublishAckFuture>,
    /// Where the text published in this attempt ends.
    end: usize,
    /// The trace context `started` and the end carry (None when traces are off).
    trace: Option<async_nats::HeaderMap>,
}

impl<'a> Publisher<'a> {
    /// A publisher of `job`'s events, in the trace of the current span.
    pub fn new(bus: &'a Bus, job: &Job) -> Publisher<'a> {
        Publisher {
            bus,
            subject: wire::events_subject(job.kind, &job.key),
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
        if self.holds_events().await {
            self.bus
                .events
                .purge()
                .filter(self.subject.clone())
                .await
                .context("purging old events")?;
        }
        self.end = 0;
        self.publish(&Event::Started { attempt }).await?;
        self.flush().await
    }

    /// Whether the subject holds any event (true when unsure, so that a purge follows).
    async fn holds_events(&self) -> bool {
        !matches!(history::last(self.bus, &self.subject).await, Ok(None))
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

    /// Publishes a terminal event once every earlier event is acknowledged.
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

    /// Publishes `done` for `attempt`, with the length of the text published before it.
    pub async fn done(&mut self, attempt: i32, model: &str) -> anyhow::Result<()> {
        self.finish(Event::Done {
            attempt,
            model: model.to_owned(),
            length: self.end,
        })
        .await
    }

    /// Waits for the acknowledgement of everything published so far.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        for ack in self.pending.drain(..) {
            ack.await.context("the events stream refused an event")?;
        }
        Ok(())
    }

    async fn publish(&mut self, event: &Event) -> anyhow::Result<()> {
        let payload = serde_json::to_vec(event)?.into();
        let subject = self.subject.clone();
        let published = match &self.trace {
            Some(trace) if !matches!(event, Event::Chunk { .. }) => {
                let js = &self.bus.js;
                js.publish_with_headers(subject, trace.clone(), payload)
                    .await
            }
            _ => self.bus.js.publish(subject, payload).await,
        };
        let ack = published.context("publishing an event")?;
        self.pending.push_back(ack);
        if self.pending.len() > MAX_PENDING_ACKS
            && let Some(oldest) = self.pending.pop_front()
        {
            oldest.await.context("the events stream refused an event")?;
        }
        Ok(())
    }
}
