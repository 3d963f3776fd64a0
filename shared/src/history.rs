//! Reading what the events stream holds for one subject: its last event (one direct get) and
//! its events from a sequence on (batched direct gets, nats-server 2.11+, a thousand per round
//! trip). No consumer is created: readers of one key must not cost the server anything per
//! event of other keys. The API's flights and the workers both read a subject this way.

use std::time::Duration;

use anyhow::Context;
use async_nats::{StatusCode, jetstream::stream::DirectGetErrorKind};
use bytes::Bytes;
use futures::StreamExt;

use crate::{
    bus::Bus,
    wire::{self, Event},
};

/// The last message stored on a subject.
#[derive(Debug, Clone)]
pub struct Last {
    /// Its stream sequence.
    pub seq: u64,
    /// Its bytes, as stored.
    pub payload: Bytes,
    /// What they say (None when they cannot be read as an event).
    pub event: Option<Event>,
    /// When the stream stored it (the NATS server's clock).
    pub time: std::time::SystemTime,
}

/// The last event stored on `subject`, or None when it holds nothing.
pub async fn last(bus: &Bus, subject: &str) -> anyhow::Result<Option<Last>> {
    match bus.events.direct_get_last_for_subject(subject).await {
        Ok(msg) => Ok(Some(Last {
            seq: msg.sequence,
            event: decode(subject, &msg.payload),
            payload: msg.payload,
            time: msg.time.into(),
        })),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("reading the last event"),
    }
}

/// How many events one direct get returns at most (the server's limit).
const BATCH: usize = 1000;
/// How long one batch may take to arrive.
const BATCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The events stored on `subject` from stream sequence `from` on, in order. Unreadable events
/// are skipped (and logged).
pub async fn read(bus: &Bus, subject: &str, mut from: u64) -> anyhow::Result<Vec<Event>> {
    let api = format!("{}.DIRECT.GET.{}", bus.api_prefix, wire::EVENTS_STREAM);
    let mut events = Vec::new();
    loop {
        let inbox = bus.client.new_inbox();
        let mut replies = bus.client.subscribe(inbox.clone()).await?;
        let request = serde_json::json!({"seq": from, "next_by_subj": subject, "batch": BATCH});
        bus.client
            .publish_with_reply(api.clone(), inbox, serde_json::to_vec(&request)?.into())
            .await?;
        let mut read = 0;
        loop {
            let msg = tokio::time::timeout(BATCH_TIMEOUT, replies.next())
                .await
                .context("reading the stored events timed out")?
                .context("the stored events' subscription ended")?;
            match msg.status {
                None | Some(StatusCode::OK) => {}
                // Nothing stored from `from` on.
                Some(StatusCode::NOT_FOUND) => return Ok(events),
                // The end of this batch.
                Some(s) if s.as_u16() == 204 => break,
                Some(s) => anyhow::bail!(
                    "reading the stored events: {s} {}",
                    msg.description.unwrap_or_default()
                ),
            }
            let seq = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_SEQUENCE))
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .context("a stored event without its sequence")?;
            from = seq + 1;
            read += 1;
            events.extend(decode(subject, &msg.payload));
        }
        if read < BATCH {
            return Ok(events);
        }
    }
}

/// An event from its bytes; None (logged) when they are not one.
pub fn decode(subject: &str, payload: &[u8]) -> Option<Event> {
    serde_json::from_slice(payload)
        .inspect_err(|e| tracing::warn!(%subject, error = %e, "skipping an unreadable event"))
        .ok()
}
