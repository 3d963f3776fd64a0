//! The answer cache: a bounded in-memory layer in front of the edge KV bucket. A hit here or
//! in KV touches neither the workers nor Postgres. Values are rendered once, on insert, so a
//! hit only copies bytes.

use std::sync::Arc;

use bytes::Bytes;
use quick_cache::{Weighter, sync::Cache};
use serde_json::json;
use sha2::{Digest, Sha256};
use versus_shared::{
    bus::Bus,
    key::Key,
    wire::{self, Answer, Kind},
};

/// A finished answer with its public JSON and ETag, ready to serve.
#[derive(Debug)]
pub struct Cached {
    pub answer: Answer,
    /// `{"key","a","b","text","model","cached":true}`.
    pub body: Bytes,
    /// A strong validator over the body.
    pub etag: String,
}

impl Cached {
    pub fn new(answer: Answer) -> Cached {
        let body = json!({
            "key": answer.key,
            "a": answer.a,
            "b": answer.b,
            "text": answer.text,
            "model": answer.model,
            "cached": true,
        });
        let body = Bytes::from(body.to_string());
        let etag = format!("\"{}\"", hex::encode(&Sha256::digest(&body)[..16]));
        Cached { answer, body, etag }
    }
}

/// Where a hit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Memory,
    Kv,
}

impl Layer {
    fn as_str(self) -> &'static str {
        match self {
            Layer::Memory => "memory",
            Layer::Kv => "kv",
        }
    }
}

#[derive(Clone)]
struct BodyWeight;

impl Weighter<Key, Arc<Cached>> for BodyWeight {
    fn weight(&self, _key: &Key, value: &Arc<Cached>) -> u64 {
        // The text is held twice (answer and body), plus fixed overhead.
        (value.body.len() * 2 + 256) as u64
    }
}

pub struct AnswerCache {
    memory: Cache<Key, Arc<Cached>, BodyWeight>,
    bus: Bus,
}

impl AnswerCache {
    pub fn new(bus: Bus, bytes: u64) -> AnswerCache {
        AnswerCache {
            memory: Cache::with_weighter(
                (bytes / 2048).max(16) as usize,
                bytes.max(1 << 16),
                BodyWeight,
            ),
            bus,
        }
    }

    /// The finished text answer for `key`, from memory, else from the edge KV bucket.
    pub async fn get(&self, key: &Key) -> anyhow::Result<Option<(Arc<Cached>, Layer)>> {
        if let Some(hit) = self.memory.get(key) {
            return Ok(Some(self.hit(hit, Layer::Memory)));
        }
        let Some(bytes) = self.bus.answers.get(wire::kv_key(Kind::Text, key)).await? else {
            return Ok(None);
        };
        let answer: Answer = serde_json::from_slice(&bytes)?;
        let cached = Arc::new(Cached::new(answer));
        self.memory.insert(key.clone(), cached.clone());
        Ok(Some(self.hit(cached, Layer::Kv)))
    }

    fn hit(&self, cached: Arc<Cached>, layer: Layer) -> (Arc<Cached>, Layer) {
        metrics::counter!("versus_cache_hits_total", "layer" => layer.as_str()).increment(1);
        (cached, layer)
    }
}
