//! The edge cache: a bounded in-memory layer in front of the edge KV bucket, one per kind of
//! answer, and [`Refusals`], the matchups moderation refused. A hit here or in KV touches
//! neither the workers nor Postgres. Values are rendered once, on insert, so a hit only copies
//! bytes.
//!
//! A purge is final ([`Floors`]): each replica knows, per entry, the revision of the last purge
//! marker it heard of, and takes an older value read from the bucket (a lagging replica of the
//! hub's, or an edge's lagging mirror) for a miss, which it never keeps.
//!
//! A degraded answer (a fallback provider's, [`Degraded`]) is served from the bucket but never
//! kept in memory, so that the primary's answer, once a worker writes it over the entry, is
//! served at once by every replica; past its time it is a miss ([`use_of`]).

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
    wire::{self, Answer, Degraded, ImageAnswer, Kind},
};

use crate::nats::LazyBus;

/// A value of the edge KV bucket.
pub trait Entry: DeserializeOwned + Degraded + Send + Sync + 'static {
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

/// What a replica does with an answer it read from the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Serve it and keep it in memory: the primary's answer, which only a purge takes back.
    Keep,
    /// Serve it, and read it from the bucket again next time: a degraded answer (a fallback's),
    /// which a worker overwrites with the primary's once made.
    Serve,
    /// Take it for a miss: a degraded answer past its time, whose key a new job may claim.
    Miss,
}

/// What to do with `value`, read from the bucket at `now_ms` (Unix milliseconds).
pub fn use_of(value: &impl Degraded, now_ms: u64) -> Use {
    if !value.served_at(now_ms) {
        Use::Miss
    } else if value.degraded() {
        Use::Serve
    } else {
        Use::Keep
    }
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
    memory: Memory<V>,
    bus: LazyBus,
    floors: Arc<Floors>,
}

/// An [`EdgeCache`]'s memory: the answers it keeps, rendered.
struct Memory<V> {
    cache: Cache<Key, Arc<Cached<V>>, BodyWeight>,
    render: Render<V>,
    purges: Purges,
}

impl<V: Entry> Memory<V> {
    fn new(bytes: u64, render: Render<V>) -> Memory<V> {
        let bytes = bytes.max(MIN_CACHE_BYTES);
        Memory {
            cache: Cache::with_weighter((bytes / TYPICAL_ENTRY_BYTES) as usize, bytes, BodyWeight),
            render,
            purges: Purges::default(),
        }
    }

    fn get(&self, key: &Key) -> Option<Arc<Cached<V>>> {
        self.cache.get(key)
    }

    /// `value`, read for `key` from the bucket at `now_ms` after purges counted `purges`,
    /// rendered: None when it is a miss ([`use_of`]), kept in memory when it may be
    /// ([`Use::Keep`], and no purge came meanwhile).
    fn take(
        &self,
        key: &Key,
        value: V,
        purges: u64,
        now_ms: u64,
    ) -> serde_json::Result<Option<Arc<Cached<V>>>> {
        let usage = use_of(&value, now_ms);
        if usage != Use::Keep {
            degraded_counter(V::KIND, usage).increment(1);
        }
        if usage == Use::Miss {
            return Ok(None);
        }
        let body = Bytes::from((self.render)(&value)?);
        let etag = format!("\"{}\"", hex::encode(&Sha256::digest(&body)[..16]));
        let cached = Arc::new(Cached {
            value,
            body,
            etag,
            sse: OnceLock::new(),
        });
        if usage == Use::Keep {
            self.cache.insert(key.clone(), cached.clone());
            if self.purges.moved_since(purges) {
                self.cache.remove(key);
            }
        }
        Ok(Some(cached))
    }

    fn remove(&self, key: &Key) {
        self.purges.note();
        self.cache.remove(key);
    }

    fn clear(&self) {
        self.purges.note();
        self.cache.clear();
    }
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
        EdgeCache {
            memory: Memory::new(bytes, Box::new(render)),
            bus,
            floors,
        }
    }

    /// The finished answer for `key`, from memory, else from the edge KV bucket (at an edge,
    /// its mirror); none for a degraded answer past its time ([`use_of`]). An error, without a
    /// wait, while NATS is not connected.
    pub async fn get(&self, key: &Key) -> anyhow::Result<Option<Arc<Cached<V>>>> {
        if let Some(hit) = self.in_memory(key) {
            return Ok(Some(hit));
        }
        let bus = self.bus.now().ok_or_else(not_connected)?;
        self.read(key, &bus.nearest_answers, Layer::Kv).await
    }

    /// How many answers this replica's memory holds.
    pub fn entries(&self) -> usize {
        self.memory.cache.len()
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

    /// The answer for `key` in `store`, kept in memory unless degraded ([`use_of`]).
    async fn read(
        &self,
        key: &Key,
        store: &kv::Store,
        layer: Layer,
    ) -> anyhow::Result<Option<Arc<Cached<V>>>> {
        let purges = self.memory.purges.count();
        let entry = wire::kv_key(V::KIND, key);
        let Some(bytes) = fresh(store, entry, &self.floors, V::KIND, layer).await? else {
            return Ok(None);
        };
        let value: V = serde_json::from_slice(&bytes)?;
        let Some(cached) = self.memory.take(key, value, purges, wire::unix_ms())? else {
            return Ok(None);
        };
        Ok(Some(hit_from(cached, V::KIND, layer)))
    }
}

impl<V: Entry> EdgeCache<V> {
    /// Drops `key` from memory (after a purge; KV is purged by whoever purges). Raise the
    /// purge's [`Floors`] first: a read under way then either sees them or is taken back.
    pub fn remove(&self, key: &Key) {
        self.memory.remove(key);
    }

    /// Drops everything from memory: purge notices may have been lost (see `App::forget_all`).
    pub fn clear(&self) {
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
        for usage in [Use::Serve, Use::Miss] {
            degraded_counter(kind, usage).increment(0);
        }
    }
}

/// Degraded answers read from the bucket, by what was done with them: `served` (a hit, not
/// kept in memory) or `expired` (past their time: a miss).
fn degraded_counter(kind: Kind, usage: Use) -> metrics::Counter {
    let usage = if usage == Use::Miss {
        "expired"
    } else {
        "served"
    };
    metrics::counter!("versus_cache_degraded_total", "kind" => kind.as_str(), "use" => usage)
}

/// `cached`, counted as a hit in `layer`.
fn hit_from<V>(cached: Arc<Cached<V>>, kind: Kind, layer: Layer) -> Arc<Cached<V>> {
    metrics::counter!("versus_cache_hits_total", "kind" => kind.as_str(), "layer" => layer.as_str())
        .increment(1);
    cached
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn answer(text: &str, model: &str, degraded_until_ms: Option<u64>) -> Answer {
        Answer {
            key: key(),
            a: "Batman".to_owned(),
            b: "Superman".to_owned(),
            text: text.to_owned(),
            model: model.to_owned(),
            attempt: 1,
            degraded_until_ms,
        }
    }

    fn key() -> Key {
        Key::parse(&"a".repeat(32)).unwrap()
    }

    fn memory() -> Memory<Answer> {
        Memory::new(
            0,
            Box::new(|a: &Answer| serde_json::to_vec(&crate::body::TextBody::of(a, true))),
        )
    }

    #[test]
    fn the_primarys_answer_is_kept_a_fallbacks_served_until_its_time_then_a_miss() {
        assert_eq!(use_of(&answer("x", "gpt-4o-mini", None), NOW), Use::Keep);
        assert_eq!(
            use_of(&answer("x", "gpt-4o-mini", None), u64::MAX),
            Use::Keep
        );
        let degraded = answer("x", "fallback-chat", Some(NOW + 1));
        assert_eq!(use_of(&degraded, NOW), Use::Serve);
        assert_eq!(use_of(&degraded, NOW + 1), Use::Miss, "its time is past");
        assert_eq!(use_of(&degraded, NOW + 60_000), Use::Miss);
        assert_eq!(
            use_of(&answer("x", "fallback-chat", Some(0)), NOW),
            Use::Miss
        );
    }

    #[test]
    fn memory_keeps_the_primarys_answer_and_never_a_degraded_one() {
        let memory = memory();
        let key = key();
        // A degraded answer is served, rendered with its model, and not kept.
        let served = memory
            .take(
                &key,
                answer("stand-in", "fallback-chat", Some(NOW + 1_000)),
                0,
                NOW,
            )
            .unwrap()
            .expect("a degraded answer in its time is a hit");
        let body: serde_json::Value = serde_json::from_slice(&served.body).unwrap();
        assert_eq!(body["model"], "fallback-chat");
        assert_eq!(body["degraded"], true);
        assert_eq!(body["cached"], true);
        assert!(
            memory.get(&key).is_none(),
            "a degraded answer is never kept"
        );
        // Past its time: a miss, not kept either.
        let expired = answer("stand-in", "fallback-chat", Some(NOW));
        assert!(memory.take(&key, expired, 0, NOW).unwrap().is_none());
        assert!(memory.get(&key).is_none());
        // The primary's answer, written over it in the bucket: served and kept, with another
        // ETag.
        let primary = memory
            .take(&key, answer("the real one", "gpt-4o-mini", None), 0, NOW)
            .unwrap()
            .expect("a hit");
        assert_ne!(primary.etag, served.etag);
        let body: serde_json::Value = serde_json::from_slice(&primary.body).unwrap();
        assert_eq!(body["degraded"], false);
        let kept = memory.get(&key).expect("the primary's answer is kept");
        assert_eq!(kept.value.text, "the real one");
    }

    #[test]
    fn a_value_read_before_a_purge_is_not_kept_after_it() {
        let memory = memory();
        let key = key();
        let before = memory.purges.count();
        memory.remove(&key);
        let hit = memory
            .take(&key, answer("x", "gpt-4o-mini", None), before, NOW)
            .unwrap();
        assert!(hit.is_some(), "served to the request that read it");
        assert!(memory.get(&key).is_none(), "but not kept past the purge");
    }
}
