//! Counting requests per matchup without putting Postgres on the request path: a hit or an
//! admitted miss (one that started or joined a generation; never one refused) adds one to an
//! in-memory counter; once a second the counts go out as one batch on a core NATS subject, and
//! the workers add them up in Postgres.
//!
//! Bounded whatever the traffic: names are kept to [`NAME_CHARS`] characters, and past
//! [`KEYS_PER_FLUSH`] matchups in a second new ones are sampled (one key in [`SAMPLE`], by its
//! hash, counted [`SAMPLE`] times), up to [`MAX_KEYS`]; what is left out is counted in
//! `versus_popularity_dropped_total`.

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

/// Matchups counted one by one in a flush's second.
pub const KEYS_PER_FLUSH: usize = 10_000;
/// Past [`KEYS_PER_FLUSH`], one new matchup in this many is counted, this many times.
pub const SAMPLE: u64 = 16;
/// The most matchups a flush's second holds.
pub const MAX_KEYS: usize = 4 * KEYS_PER_FLUSH;
/// Characters of each name kept with a count.
pub const NAME_CHARS: usize = 64;

pub struct Popularity {
    counts: Mutex<HashMap<Key, Requests>>,
    client: async_nats::Client,
}

/// Adds one request for `key` to `counts`, within the bounds above; false when it was left
/// out (a matchup new this second, under load, outside the sample).
fn add(counts: &mut HashMap<Key, Requests>, key: &Key, a: &str, b: &str) -> bool {
    if let Some(r) = counts.get_mut(key) {
        r.count += 1;
        return true;
    }
    let count = if counts.len() < KEYS_PER_FLUSH {
        1
    } else if counts.len() < MAX_KEYS && sampled(key) {
        SAMPLE
    } else {
        return false;
    };
    let r = Requests {
        key: key.clone(),
        a: truncated(a),
        b: truncated(b),
        count,
    };
    counts.insert(key.clone(), r);
    true
}

/// Whether `key` is in the sample: keys are hashes, so one in [`SAMPLE`] ends with `0`.
fn sampled(key: &Key) -> bool {
    key.as_str().ends_with('0')
}

/// `name` cut to [`NAME_CHARS`] characters.
fn truncated(name: &str) -> String {
    match name.char_indices().nth(NAME_CHARS) {
        Some((end, _)) => name[..end].to_owned(),
        None => name.to_owned(),
    }
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
        if !add(&mut counts, key, a, b) {
            drop(counts);
            metrics::counter!("versus_popularity_dropped_total").increment(1);
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use versus_shared::key::Key;

    use super::{KEYS_PER_FLUSH, MAX_KEYS, NAME_CHARS, SAMPLE, add, sampled};

    fn key(n: usize) -> Key {
        Key::try_from(format!("{n:032x}")).unwrap()
    }

    #[test]
    fn names_are_cut_and_a_flood_of_matchups_is_sampled_within_a_bound() {
        let mut counts = HashMap::new();
        let long = "é".repeat(300);
        assert!(add(&mut counts, &key(1), &long, "Kaiju"));
        assert!(add(&mut counts, &key(1), &long, "Kaiju"));
        let r = &counts[&key(1)];
        assert_eq!(
            (r.a.chars().count(), r.b.as_str(), r.count),
            (NAME_CHARS, "Kaiju", 2)
        );

        for n in 2..=KEYS_PER_FLUSH {
            assert!(add(&mut counts, &key(n), "A", "B"));
        }
        assert_eq!(counts.len(), KEYS_PER_FLUSH);
        // Past that, a new matchup is counted only in the sample, for the ones left out.
        let (inside, outside) = (key(KEYS_PER_FLUSH * 16), key(KEYS_PER_FLUSH * 16 + 1));
        assert!(sampled(&inside) && !sampled(&outside));
        assert!(add(&mut counts, &inside, "A", "B"));
        assert_eq!(counts[&inside].count, SAMPLE);
        assert!(!add(&mut counts, &outside, "A", "B"));
        // Matchups already counted still are.
        assert!(add(&mut counts, &key(7), "A", "B"));
        assert_eq!(counts[&key(7)].count, 2);
        // However many come, the map holds at most MAX_KEYS.
        for n in 0..20 * MAX_KEYS {
            add(&mut counts, &key(1_000_000 + n), "A", "B");
        }
        assert_eq!(counts.len(), MAX_KEYS);
    }
}
