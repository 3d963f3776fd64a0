//! Counting requests per matchup without putting Postgres on the request path: a hit or miss
//! adds one to an in-memory counter; once a second the counts go out as one batch on a core
//! NATS subject, and the workers add them up in Postgres.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use versus_shared::{
    key::Key,
    wire::{self, Requests},
};

pub struct Popularity {
    counts: Mutex<HashMap<Key, Requests>>,
    client: async_nats::Client,
}

impl Popularity {
    pub fn new(client: async_nats::Client) -> Popularity {
        Popularity {
            counts: Mutex::new(HashMap::new()),
            client,
        }
    }

    /// Counts one request for the text answer `key` between `a` and `b`.
    pub fn record(&self, key: &Key, a: &str, b: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        match counts.get_mut(key) {
            Some(r) => r.count += 1,
            None => {
                let r = Requests {
                    key: key.clone(),
                    a: a.to_owned(),
                    b: b.to_owned(),
                    count: 1,
                };
                counts.insert(key.clone(), r);
            }
        }
    }

    /// Publishes the counts gathered since the last flush. While NATS is not connected they
    /// keep adding up here, rather than in the client's queue (whose end would stall this).
    async fn flush(&self) {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return;
        }
        let batch: Vec<Requests> = {
            let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
            counts.drain().map(|(_, r)| r).collect()
        };
        for chunk in batch.chunks(1000) {
            let payload = match serde_json::to_vec(chunk) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "encoding popularity failed");
                    return;
                }
            };
            if let Err(e) = self
                .client
                .publish(wire::POPULARITY_SUBJECT, payload.into())
                .await
            {
                tracing::warn!(error = %e, "publishing popularity failed");
            }
        }
    }

    /// Flushes every second until `shutdown`, then once more.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => self.flush().await,
            }
        }
        self.flush().await;
        let _ = self.client.flush().await;
    }
}
