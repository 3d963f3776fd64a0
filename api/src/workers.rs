//! What this process asks a worker to write for it: it may not write to Postgres from a public
//! route, nor to the events stream or the answers bucket, so an operator's purge, a client's
//! report and an operator's decision on one go to one worker as core NATS requests (answered
//! on this process's inbox only). What such a write withdrew from the bucket comes back as
//! purge markers, which [`App::spread`] applies here and tells every other replica.

use std::time::Duration;

use serde::{Serialize, de::DeserializeOwned};
use versus_shared::{
    key::Key,
    wire::{self, Purge, ReportReply},
};

use crate::{app::App, error::ApiError};

impl App {
    /// Asks one worker to carry out `request` on `subject`, and reads its answer. No worker up
    /// ("no responders", at once), no NATS, or no answer within `timeout`: `unavailable`.
    pub(crate) async fn ask_worker<Rep: DeserializeOwned>(
        &self,
        subject: &'static str,
        request: &impl Serialize,
        timeout: Duration,
    ) -> Result<Rep, ApiError> {
        let payload = serde_json::to_vec(request).map_err(|_| ApiError::Unavailable)?;
        let ask = async_nats::Request::new()
            .payload(payload.into())
            .timeout(Some(timeout));
        let reply = self
            .bus()?
            .client
            .send_request(subject, ask)
            .await
            .map_err(|e| unavailable(subject, &e))?;
        serde_json::from_slice(&reply.payload).map_err(|e| unavailable(subject, &e))
    }

    /// What a worker's answer on `subject` to a report or a decision about `key` comes to: its
    /// error (503), nothing found (404), or done, with what it withdrew or brought back spread
    /// to every replica. Whether the report counted.
    pub(crate) async fn carried_out(
        &self,
        subject: &str,
        key: Key,
        reply: ReportReply,
    ) -> Result<bool, ApiError> {
        if let Some(error) = reply.error {
            return Err(unavailable(subject, &error));
        }
        if !reply.found {
            return Err(ApiError::NotFound);
        }
        if !reply.markers.is_empty() {
            let purge = Purge {
                keys: vec![key],
                markers: reply.markers,
            };
            self.spread(&purge).await?;
        }
        Ok(reply.counted)
    }

    /// Applies `purge` to this replica, then tells every other one (`versus.cache.purge`,
    /// flushed before this returns): each forgets the keys and holds any entry older than the
    /// markers for stale, whatever its replica or mirror lags.
    pub(crate) async fn spread(&self, purge: &Purge) -> Result<(), ApiError> {
        self.forget(purge);
        let broadcast = serde_json::to_vec(purge).map_err(|_| ApiError::Unavailable)?;
        let client = &self.bus()?.client;
        client
            .publish(wire::PURGE_SUBJECT, broadcast.into())
            .await
            .map_err(|e| unavailable(wire::PURGE_SUBJECT, &e))?;
        // Out of this process before the answer: replicas hear of it as soon as the server
        // routes it (a lost connection would have lost it; the replicas' own catch-up covers
        // that).
        client
            .flush()
            .await
            .map_err(|e| unavailable(wire::PURGE_SUBJECT, &e))
    }
}

/// A request to the workers that failed: logged, and `unavailable` (503) to the client, since
/// nothing it sent was wrong.
fn unavailable(subject: &str, e: &dyn std::fmt::Display) -> ApiError {
    tracing::warn!(subject, error = %e, "a request to the workers failed");
    ApiError::Unavailable
}
