//! The edge cache: a bounded in-memory layer in front of the edge KV bucket, one per kind of
//! answer, and [`Refusals`], the matchups moderation refused. A hit here or in KV touches
//! neither the workers nor Postgres. Values are rendered once, on insert, so a hit only copies
//! bytes.
//!
//! A purge is final ([`Floors`]): each replica knows, per entry, the revision of the last purge
//! marker it heard of, and takes an older value read from the bucket (a lagging replica of the
//! hub's, or an edge's lagging mirror) for a miss, which it never keeps.

use std::sync::{
    Arc, Mutex, OnceLock,
    atomic::{AtomicU64, Ordering},
};

use async_nats::jetstream::kv;
use bytes::Bytes;
use quick_cache::{Weighter, sync::Cache};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use versus_shared::{
    key::Key,
    wire::{self, Answer, ImageAnswer, Kind},
};

use crate::nats::LazyBus;

/// A value of the edge KV bucket.
pub trait Entry: DeserializeOwned + Send + Sync + 'static {
    const KIND: Kind;

    /// The attempt that made it: it names this answer (see `wire::Answer::attempt`).
    fn attempt(&self) -> i32;
}

impl Entry for Answer {
    const KIND: Kind = Kind::Text;

    fn attempt(&self) -> i32 {
        self.attempt
    }
}

impl Entry for ImageAnswer {
    const KIND: Kind = Kind::Image;

    fn attempt(&self) -> i32 {
        self.attempt
    }
}

/// A finished answer with its public JSON (`cached: true`), that JSON's strong ETag, and its
/// SSE hit, rendered on first use.
#[derive(Debug)]
pub struct Cached<V> {
    pub value: V,
    pub body: Bytes,
    pub etag: String,
    pub sse: OnceLock<Bytes>,
}

/// Where a hit came from: the `layer` of the hit and stale counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Memory,
    /// The KV bucket (its mirror, at an edge).
    Kv,
    /// At an edge, the hub's bucket itself, for an answer its mirror does not hold yet.
    Hub,
}

impl Layer {
    fn as_str(self) -> &'static str {
        match self {
            Layer::Memory => "memory",
            Layer::Kv => "kv",
            Layer::Hub => "hub",
        }
    }
}

/// An entry holds its body twice over: the body itself, and the value it was rendered from,
/// which holds about as much (the answer's text, or the picture's path).
const COPIES_OF_BODY: usize = 2;
/// What an entry holds besides: its key, its ETag, the `Arc`, and the cache's own bookkeeping.
const ENTRY_OVERHEAD: usize = 256;
/// What an entry is taken to weigh when the cache sizes its table (a body of about 900 bytes,
/// by the weight above): only that estimate depends on it, not what the cache may hold.
const TYPICAL_ENTRY_BYTES: u64 = 2048;
/// The smallest cache, however little it is given: a few dozen entries.
const MIN_CACHE_BYTES: u64 = 1 << 16;
/// The fewest entries a cache of keys (floors, refusals) holds, however few it is given.
const MIN_ENTRIES: usize = 16;

#[derive(Clone)]
struct BodyWeight;

impl<V> Weighter<Key, Arc<Cached<V>>> for BodyWeight {
    fn weight(&self, _key: &Key, value: &Arc<Cached<V>>) -> u64 {
        (value.body.len() * COPIES_OF_BODY + ENTRY_OVERHEAD) as u64
    }
}

type Render<V> = Box<dyn Fn(&V) -> serde_json::Result<Vec<u8>> + Send + Sync>;

pub struct EdgeCache<V> {
    memory: Cache<Key, Arc<Cached<V>>, BodyWeight>,
    bus: LazyBus,
    render: Render<V>,
    purges: Purges,
    floors: Arc<Floors>,
}

/// Per entry of the answers bucket (`<kind>.<key>`, `refused.<kind>.<key>`), the revision of
/// the last purge marker this replica heard of: from the purge notice (the worker's reply
/// carries the revisions) or, at an edge, from its mirror. A value at or below it was purged,
/// whatever a lagging replica or mirror still answers; any value written after the purge has
/// a higher revision (the bucket's stream sequence, which a mirror keeps). Bounded: a floor
/// forgotten early only lets a lagging copy serve what it holds, as before floors existed.
pub struct Floors {
    floors: Cache<String, u64>,
    /// Raises are read-modify-writes; they are rare (one per purged entry).
    raising: Mutex<()>,
}

impl Floors {
    pub fn new(entries: usize) -> Floors {
        Floors {
            floors: Cache::new(entries.max(MIN_ENTRIES)),
            raising: Mutex::new(()),
        }
    }

    /// Notes that `entry` was purged at `revision`.
    pub fn raise(&self, entry: &str, revision: u64) {
        let _raising = self
            .raising
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.floors.get(entry).is_none_or(|floor| floor < revision) {
            self.floors.insert(entry.to_owned(), revision);
        }
    }

    /// Whether `entry`'s value at `revision` was purged since.
    pub fn stale(&self, entry: &str, revision: u64) -> bool {
        self.floors
            .get(entry)
            .is_some_and(|floor| revision <= floor)
    }
}

/// The value of `entry` in `store`, unless it was purged ([`Floors`]); counted when a stale one
/// is skipped.
async fn fresh(
    store: &kv::Store,
    entry: String,
    floors: &Floors,
    kind: Kind,
    layer: Layer,
) -> anyhow::Result<Option<Bytes>> {
    let Some(found) = store.entry(entry.as_str()).await? else {
        return Ok(None);
    };
    if found.operation != kv::Operation::Put {
        return Ok(None);
    }
    if floors.stale(&entry, found.revision) {
        metrics::counter!("versus_cache_stale_total", "kind" => kind.as_str(), "layer" => layer.as_str())
            .increment(1);
        tracing::debug!(%entry, revision = found.revision, "skipped a purged value a lagging copy still holds");
        return Ok(None);
    }
    Ok(Some(found.value))
}

/// Counts purges, so that a value read from KV just before a purge is not kept in memory
/// after it: a reader notes the count before it reads, and takes back what it inserted if the
/// count moved meanwhile (a purge moves it before it removes).
#[derive(Default)]
struct Purges(AtomicU64);

impl Purges {
    fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn moved_since(&self, count: u64) -> bool {
        self.count() != count
    }

    fn note(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl<V: Entry> EdgeCache<V> {
    /// A cache of at most about `bytes`, whose public JSON is made by `render`, which takes
    /// values older than `floors` for misses.
    pub fn new(
        bus: LazyBus,
        bytes: u64,
        floors: Arc<Floors>,
        render: impl Fn(&V) -> serde_json::Result<Vec<u8>> + Send + Sync + 'static,
    ) -> EdgeCache<V> {
        let bytes = bytes.max(MIN_CACHE_BYTES);
        EdgeCache {
            memory: Cache::with_weighter((bytes / TYPICAL_ENTRY_BYTES) as usize, bytes, BodyWeight),
            bus,
            render: Box::new(render),
            purges: Purges::default(),
            floors,
        }
    }

    /// The finished answer for `key`, from memory, else from the edge KV bucket (at an edge,
    /// its mirror). An error, without a wait, while NATS is not connected.
    pub async fn get(&self, key: &Key) -> anyhow::Result<Option<Arc<Cached<V>>>> {
        if let Some(hit) = self.in_memory(key) {
            return Ok(Some(hit));
        }
        let bus = self.bus.now().ok_or_else(not_connected)?;
        self.read(key, &bus.nearest_answers, Layer::Kv).await
    }

    /// How many answers this replica's memory holds.
    pub fn entries(&self) -> usize {
        self.memory.len()
    }

    /// The finished answer for `key` if this replica's memory holds it.
    pub fn in_memory(&self, key: &Key) -> Option<Arc<Cached<V>>> {
        let hit = self.memory.get(key)?;
        Some(hit_from(hit, V::KIND, Layer::Memory))
    }

    /// The answer of a generation that just ended with `done`, which workers announce only
    /// once the bucket holds it: as [`EdgeCache::lookup`], and at an edge, whose mirror may not
    /// have it yet, from the hub's bucket.
    pub async fn finished(&self, key: &Key) -> Option<Arc<Cached<V>>> {
        if let Some(hit) = self.lookup(key).await {
            return Some(hit);
        }
        if !self.bus.at_edge() {
            return None;
        }
        let bus = self.bus.now()?;
        match self.read(key, &bus.answers, Layer::Hub).await {
            Ok(hit) => hit,
            Err(e) => {
                tracing::warn!(%key, error = format!("{e:#}"), "reading the hub's bucket failed");
                None
            }
        }
    }

    /// The answer for `key` in `store`, kept in memory.
    async fn read(
        &self,
        key: &Key,
        store: &kv::Store,
        layer: Layer,
    ) -> anyhow::Result<Option<Arc<Cached<V>>>> {
        let purges = self.purges.count();
        let entry = wire::kv_key(V::KIND, key);
        let Some(bytes) = fresh(store, entry, &self.floors, V::KIND, layer).await? else {
            return Ok(None);
        };
        let value: V = serde_json::from_slice(&bytes)?;
        let body = Bytes::from((self.render)(&value)?);
        let etag = format!("\"{}\"", hex::encode(&Sha256::digest(&body)[..16]));
        let cached = Arc::new(Cached {
            value,
            body,
            etag,
            sse: OnceLock::new(),
        });
        self.memory.insert(key.clone(), cached.clone());
        if self.purges.moved_since(purges) {
            self.memory.remove(key);
        }
        Ok(Some(hit_from(cached, V::KIND, layer)))
    }
}

impl<V: Entry> EdgeCache<V> {
    /// Drops `key` from memory (after a purge; KV is purged by whoever purges). Raise the
    /// purge's [`Floors`] first: a read under way then either sees them or is taken back.
    pub fn remove(&self, key: &Key) {
        self.purges.note();
        self.memory.remove(key);
    }

    /// Drops everything from memory: purge notices may have been lost (see `App::forget_all`).
    pub fn clear(&self) {
        self.purges.note();
        self.memory.clear();
    }

    /// Like [`EdgeCache::get`], but a failing KV read counts as a miss (logged): the
    /// generation path then either repairs it or reports the outage.
    pub async fn lookup(&self, key: &Key) -> Option<Arc<Cached<V>>> {
        // While NATS is down, that is all there is to it; `/readyz` says so, not each request.
        if self.bus.now().is_none() {
            return self.in_memory(key);
        }
        match self.get(key).await {
            Ok(hit) => hit,
            Err(e) => {
                tracing::warn!(%key, error = format!("{e:#}"), "edge cache read failed");
                None
            }
        }
    }
}

/// The matchups moderation refused, from memory, else from the edge KV bucket: a refused
/// matchup is answered `refused` at no cost, like a hit.
pub struct Refusals {
    memory: Cache<(Kind, Key), ()>,
    bus: LazyBus,
    purges: Purges,
    floors: Arc<Floors>,
}

impl Refusals {
    pub fn new(bus: LazyBus, entries: usize, floors: Arc<Floors>) -> Refusals {
        Refusals {
            memory: Cache::new(entries.max(MIN_ENTRIES)),
            bus,
            purges: Purges::default(),
            floors,
        }
    }

    /// Whether `key` of `kind` was refused. A failing KV read counts as not refused (logged):
    /// the worker then refuses it again, still without an upstream call.
    pub async fn refused(&self, kind: Kind, key: &Key) -> bool {
        if self.memory.get(&(kind, key.clone())).is_some() {
            return true;
        }
        let Some(bus) = self.bus.now() else {
            return false;
        };
        let purges = self.purges.count();
        let entry = wire::refusal_kv_key(kind, key);
        match fresh(&bus.nearest_answers, entry, &self.floors, kind, Layer::Kv).await {
            Ok(Some(_)) => {
                self.memory.insert((kind, key.clone()), ());
                if self.purges.moved_since(purges) {
                    self.memory.remove(&(kind, key.clone()));
                }
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(%key, error = format!("{e:#}"), "edge cache read of a refusal failed");
                false
            }
        }
    }

    /// Drops `key` from memory (after a purge).
    pub fn remove(&self, key: &Key) {
        self.purges.note();
        for kind in [Kind::Text, Kind::Image] {
            self.memory.remove(&(kind, key.clone()));
        }
    }

    /// Drops everything from memory (see [`EdgeCache::clear`]).
    pub fn clear(&self) {
        self.purges.note();
        self.memory.clear();
    }
}

fn not_connected() -> anyhow::Error {
    anyhow::anyhow!("NATS is not connected (or its streams were not found yet)")
}

/// Puts the hit counters of every kind and layer this replica serves from at zero (the hub's
/// bucket only at an edge), so that the hit ratio by layer has a value before the first hit.
pub fn zero_counters(edge: bool) {
    let layers: &[Layer] = if edge {
        &[Layer::Memory, Layer::Kv, Layer::Hub]
    } else {
        &[Layer::Memory, Layer::Kv]
    };
    for kind in [Kind::Text, Kind::Image] {
        for layer in layers {
            metrics::counter!("versus_cache_hits_total", "kind" => kind.as_str(), "layer" => layer.as_str())
                .increment(0);
            if *layer != Layer::Memory {
                metrics::counter!("versus_cache_stale_total", "kind" => kind.as_str(), "layer" => layer.as_str())
                    .increment(0);
            }
        }
    }
}

/// `cached`, counted as a hit in `layer`.
fn hit_from<V>(cached: Arc<Cached<V>>, kind: Kind, layer: Layer) -> Arc<Cached<V>> {
    metrics::counter!("versus_cache_hits_total", "kind" => kind.as_str(), "layer" => layer.as_str())
        .increment(1);
    cached
}
