//! The known names (the display names of stored text answers, and the aliases' canonical
//! names) that `GET /v1/names/suggest`
//! lists (`suggest.rs`): kept in this replica's memory from a watch of the answers bucket (at
//! an edge, of its mirror), and searched by prefix and by small typos on their match keys.
//!
//! Nothing here is on another request's path, and a suggestion needs no round trip: no hub,
//! no Postgres, no NATS request per keystroke.
//!
//! - **What is known.** Each `text.<key>` put adds the answer's two names (by match key, the
//!   display first seen for it kept) and counts one more answer naming each; each delete or
//!   purge marker on `text.<key>` takes them back, and a name no stored answer names any more
//!   leaves the index at once. Refusals (`refused.<kind>.<key>`) are never watched, so a name
//!   only in a refused matchup is never known; a hidden answer is purged from the bucket, so
//!   its names go as a purge's do. An alias (`versus_shared::aliases`, followed by the app,
//!   which hands each change here) makes its canonical name known, and its own match key
//!   known shown as the canonical name, as long as it stands. What an answer contributed is kept as the 64-bit hashes of
//!   its entry and of its two match keys (24 bytes), not as text. The names are inside each
//!   answer's value, so a replica that starts reads every stored text answer once (its whole
//!   value, the text too): a bucket of a million answers is about a gigabyte of reading per
//!   start, spread over the seconds the watch takes; the hits do not wait for it.
//! - **The search.** An [`fst::Set`] of every known match key, built again from the sorted
//!   keys at most once a second ([`REBUILD_EVERY`]) when they changed. `fst` (BurntSushi's,
//!   behind ripgrep's and tantivy's fuzzy queries) walks a sorted set with an automaton, so a
//!   prefix ([`fst::automaton::Str`]) or a Levenshtein automaton (distance 1, from 4
//!   characters of match key, on its first [`MAX_FUZZY_CHARS`]) made a prefix matcher
//!   (`starts_with`: a key some prefix of which is that close) visits only the branches that
//!   can match, whatever the number of names: a hash map or a trie of our own would have to
//!   compare every key for typos. Measured on 64,544 keys (release build, the search alone):
//!   a prefix 15–75 µs, a typo of a 12-character query about 250 µs (building the automaton
//!   is most of it; a distance of 2 cost about 1 ms, which is why typos are one edit); through
//!   HTTP with 100,000 names, p50 0.26–0.38 ms at 500 req/s (`scripts/bench`, S1). The set is
//!   immutable, hence the rebuild; a name added since the last one waits for the next (a
//!   second at most), a name removed is left out at once (each candidate is looked up in the
//!   live map).
//! - **Ranking.** The match key itself, then names it starts, then typos; within each, the
//!   names of more stored answers first, then the shorter; at most [`SCAN`] candidates are
//!   read of each kind, so a one-letter query costs as little as a long one.
//! - **Memory.** A known name costs about 150 bytes (its match key and display name, boxed,
//!   and a map entry), an answer about 32 (three hashes and a map entry), and the set about 4
//!   bytes a name: 100,000 names from 50,000 answers come to about 17 MB, and the API's
//!   resident memory grew by 24 MiB with them in `scripts/bench`'s S1 (the allocator keeps
//!   some of what the watch's messages and the set's builds used). Past [`MAX_NAMES`] names or
//!   [`MAX_ANSWERS`] answers, new ones are not indexed (logged once): the rest still work.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::kv;
use fst::{Automaton, IntoStreamer, Streamer, automaton::Levenshtein, automaton::Str};
use tokio_util::sync::CancellationToken;
use versus_shared::{bus::follow, key::Name, wire::Answer};

/// How many names a suggestion lists at most.
pub const LIMIT: usize = 10;
/// How often, at most, the set is built again when names came or went.
const REBUILD_EVERY: Duration = Duration::from_secs(1);
/// Candidates read of each kind (prefix, typos) before ranking.
const SCAN: usize = 256;
/// The most names and answers indexed (about 150 MB and 64 MB at the caps).
const MAX_NAMES: usize = 1_000_000;
const MAX_ANSWERS: usize = 2_000_000;
/// A typo is looked for in this many characters of match key at most (the query's first): a
/// Levenshtein automaton, and the time to build it, grow with its query.
const MAX_FUZZY_CHARS: usize = 12;
/// A typo is looked for from this many characters of match key: fewer match too much.
const MIN_FUZZY_CHARS: usize = 4;
/// States a Levenshtein automaton may have (fst's default is 10,000, about 20 MB); past it,
/// the query is matched by prefix only.
const MAX_FUZZY_STATES: usize = 4_000;
/// The entries watched: text answers (never refusals, nor pictures).
const WATCHED: &str = "text.*";

/// The known names of this replica (see the module's doc). Cheap to share.
#[derive(Default)]
pub struct Names {
    live: RwLock<Live>,
    set: RwLock<Arc<fst::Set<Vec<u8>>>>,
    changed: AtomicBool,
}

#[derive(Default)]
struct Live {
    /// By the hash of its match key.
    names: HashMap<u64, Known>,
    /// By the hash of its entry (`text.<key>`): the hashes of the match keys it named.
    answers: HashMap<u64, [u64; 2]>,
    full: bool,
}

struct Known {
    matched: Box<str>,
    display: Box<str>,
    /// Stored answers that name it.
    answers: u32,
}

impl Names {
    pub fn new() -> Arc<Names> {
        Arc::new(Names::default())
    }

    /// The answer stored at `entry` names its two opponents.
    pub fn put(&self, entry: &str, answer: &Answer) {
        let parse = |name: &str| Name::parse("a", Some(name)).ok();
        let (Some(a), Some(b)) = (parse(&answer.a), parse(&answer.b)) else {
            return;
        };
        self.add(entry, [(&a, a.display()), (&b, b.display())]);
    }

    /// The alias stored at `entry` stands for `canonical`: the canonical name is known, and the
    /// alias too, shown as the canonical name (typing `kaka` suggests `Goku`). An alias pointed
    /// elsewhere replaces what it contributed.
    pub fn put_alias(&self, entry: &str, alias: &Name, canonical: &Name) {
        self.remove(entry);
        let shown = canonical.display();
        self.add(entry, [(canonical, shown), (alias, shown)]);
    }

    /// What is stored at `entry` names these two match keys, each shown as its display.
    fn add(&self, entry: &str, named: [(&Name, &str); 2]) {
        let mut live = write(&self.live);
        let id = hash(entry);
        if live.answers.contains_key(&id) {
            return;
        }
        let new = named
            .iter()
            .filter(|(n, _)| !live.names.contains_key(&hash(n.matched())))
            .count();
        if live.answers.len() >= MAX_ANSWERS || live.names.len() + new > MAX_NAMES {
            if !live.full {
                live.full = true;
                tracing::warn!(
                    names = live.names.len(),
                    "the suggestions' index is full: new names are not suggested"
                );
            }
            return;
        }
        let mut ids = [0; 2];
        for (slot, (name, shown)) in ids.iter_mut().zip(named) {
            *slot = hash(name.matched());
            let known = live.names.entry(*slot).or_insert_with(|| {
                self.changed.store(true, Ordering::Relaxed);
                Known {
                    matched: name.matched().into(),
                    display: shown.into(),
                    answers: 0,
                }
            });
            known.answers += 1;
        }
        live.answers.insert(id, ids);
    }

    /// The answer at `entry` was deleted or purged: its names go once no answer names them.
    pub fn remove(&self, entry: &str) {
        let mut live = write(&self.live);
        let Some(ids) = live.answers.remove(&hash(entry)) else {
            return;
        };
        for id in ids {
            if let Some(known) = live.names.get_mut(&id) {
                known.answers -= 1;
                if known.answers == 0 {
                    live.names.remove(&id);
                    // Left out of suggestions at once; out of the set at its next build.
                    self.changed.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// How many names are known.
    pub fn len(&self) -> usize {
        read(&self.live).names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Builds the set again if names came or went since the last build.
    pub fn rebuild_if_changed(&self) {
        if !self.changed.swap(false, Ordering::Relaxed) {
            return;
        }
        // Copied out, so that the watch is held up only for the copy, not the sort and build.
        let mut keys: Vec<Box<str>> = read(&self.live)
            .names
            .values()
            .map(|k| k.matched.clone())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        match fst::Set::from_iter(keys.iter().map(|k| k.as_bytes())) {
            Ok(set) => *write(&self.set) = Arc::new(set),
            Err(e) => tracing::error!(error = %e, "cannot build the suggestions' index"),
        }
    }

    /// Up to [`LIMIT`] display names for the match key `matched`, best first.
    pub fn suggest(&self, matched: &str) -> Vec<String> {
        let set = read(&self.set).clone();
        // (match key, rank): 0 the key itself, 1 a prefix, 2 a typo.
        let mut found: Vec<(String, u8)> = Vec::new();
        let mut prefixed = set.search(Str::new(matched).starts_with()).into_stream();
        while let Some(key) = prefixed.next() {
            let key = String::from_utf8_lossy(key).into_owned();
            let rank = if key == matched { 0 } else { 1 };
            found.push((key, rank));
            if found.len() >= SCAN {
                break;
            }
        }
        let fuzzy: String = matched.chars().take(MAX_FUZZY_CHARS).collect();
        if fuzzy.chars().count() >= MIN_FUZZY_CHARS
            && let Ok(typos) = Levenshtein::new_with_limit(&fuzzy, 1, MAX_FUZZY_STATES)
        {
            let mut typos = set.search(typos.starts_with()).into_stream();
            let mut read_typos = 0;
            while let Some(key) = typos.next() {
                found.push((String::from_utf8_lossy(key).into_owned(), 2));
                read_typos += 1;
                if read_typos >= SCAN {
                    break;
                }
            }
        }
        // A key found both ways keeps its better rank.
        found.sort_unstable();
        found.dedup_by(|later, first| later.0 == first.0);
        let live = read(&self.live);
        let mut ranked: Vec<(u8, std::cmp::Reverse<u32>, usize, &Known)> = found
            .iter()
            .filter_map(|(key, rank)| {
                let known = live.names.get(&hash(key))?;
                Some((*rank, std::cmp::Reverse(known.answers), key.len(), known))
            })
            .collect();
        ranked.sort_by(|x, y| (x.0, x.1, x.2, &x.3.matched).cmp(&(y.0, y.1, y.2, &y.3.matched)));
        // An alias is shown as its canonical name, which may be listed already.
        let mut shown = std::collections::HashSet::new();
        ranked
            .into_iter()
            .filter(|(.., known)| shown.insert(&known.display))
            .take(LIMIT)
            .map(|(.., known)| known.display.to_string())
            .collect()
    }

    /// Follows the text answers of `answers` (the bucket, or an edge's mirror of it) until
    /// `shutdown`: every answer stored so far, then every change, and the set built again at
    /// most every [`REBUILD_EVERY`]. A watch that breaks starts again after the last change it
    /// gave, so nothing is missed meanwhile (its ordered consumer already starts again by
    /// itself after a gap).
    pub async fn follow(self: Arc<Self>, answers: kv::Store, shutdown: CancellationToken) {
        let watch = follow::changes(
            &answers,
            WATCHED,
            follow::From::Now,
            "the answers for names",
            |entry| {
                if entry.operation != kv::Operation::Put {
                    self.remove(&entry.key);
                } else if let Ok(answer) = serde_json::from_slice::<Answer>(&entry.value) {
                    self.put(&entry.key, &answer);
                }
            },
        );
        let rebuild = async {
            let mut every = tokio::time::interval(REBUILD_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                self.rebuild_if_changed();
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = watch => {}
            () = rebuild => {}
        }
    }
}

fn hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use versus_shared::key::Key;

    fn answer(a: &str, b: &str) -> Answer {
        Answer {
            key: Key::parse(&"0".repeat(32)).unwrap(),
            a: a.to_owned(),
            b: b.to_owned(),
            text: String::new(),
            model: String::new(),
            attempt: 1,
            degraded_until_ms: None,
        }
    }

    fn names(stored: &[(&str, &str, &str)]) -> Arc<Names> {
        let names = Names::new();
        for (entry, a, b) in stored {
            names.put(entry, &answer(a, b));
        }
        names.rebuild_if_changed();
        names
    }

    fn suggest(names: &Names, q: &str) -> Vec<String> {
        names.suggest(Name::parse("q", Some(q)).unwrap().matched())
    }

    #[test]
    fn prefixes_typos_case_and_punctuation_find_a_name() {
        let names = names(&[
            ("text.1", "Spider-Man", "Hulk"),
            ("text.2", "Batman", "Joker"),
        ]);
        for q in [
            "spid",
            "spidrman",
            "SPIDER",
            "Spider Man",
            "spiderman",
            "spider-mn",
        ] {
            assert_eq!(suggest(&names, q), ["Spider-Man"], "{q}");
        }
        assert_eq!(suggest(&names, "hul"), ["Hulk"]);
        // Found by prefix and by a typo, each name once.
        let more = super::Names::new();
        more.put("text.1", &answer("Spider-Man", "Hulk"));
        more.put("text.2", &answer("Spider-Woman", "Thor"));
        more.rebuild_if_changed();
        assert_eq!(suggest(&more, "spid"), ["Spider-Man", "Spider-Woman"]);
        assert!(suggest(&names, "zzz").is_empty());
    }

    #[test]
    fn the_name_itself_comes_first_then_prefixes_then_typos() {
        let names = names(&[
            ("text.1", "Bat", "Batman"),
            ("text.2", "Batwoman", "Cat"),
            ("text.3", "Batman", "Bane"),
        ]);
        assert_eq!(suggest(&names, "bat"), ["Bat", "Batman", "Batwoman"]);
        // Typos: the name of more answers first.
        assert_eq!(suggest(&names, "batwman"), ["Batman", "Batwoman"]);
    }

    #[test]
    fn a_name_leaves_once_no_stored_answer_names_it() {
        let names = names(&[
            ("text.1", "Spider-Man", "Hulk"),
            ("text.2", "Spiderman", "Thor"),
        ]);
        // One display per match key: the first seen.
        assert_eq!(suggest(&names, "spider"), ["Spider-Man"]);
        names.remove("text.1");
        assert_eq!(suggest(&names, "spider"), ["Spider-Man"]);
        assert!(suggest(&names, "hulk").is_empty());
        names.remove("text.2");
        assert!(suggest(&names, "spider").is_empty());
        assert!(names.is_empty());
        // Put again (a repeated put counts once).
        names.put("text.1", &answer("Spider-Man", "Hulk"));
        names.put("text.1", &answer("Spider-Man", "Hulk"));
        names.rebuild_if_changed();
        names.remove("text.1");
        assert!(suggest(&names, "hulk").is_empty());
    }

    #[test]
    fn an_alias_makes_its_canonical_name_known_and_leads_to_it() {
        let names = names(&[("text.1", "Goku", "Vegeta")]);
        let name = |n: &str| Name::parse("a", Some(n)).unwrap();
        names.put_alias("alias.1", &name("Kakarot"), &name("Son Goku"));
        names.rebuild_if_changed();
        assert_eq!(suggest(&names, "son g"), ["Son Goku"]);
        assert_eq!(suggest(&names, "kaka"), ["Son Goku"]);
        // Pointed at another name: what it contributed before goes.
        names.put_alias("alias.1", &name("Kakarot"), &name("Goku"));
        names.rebuild_if_changed();
        assert!(suggest(&names, "son g").is_empty());
        assert_eq!(suggest(&names, "kaka"), ["Goku"]);
        // Two aliases of one name and the name itself all match: it is listed once.
        names.put_alias("alias.2", &name("Goku Son"), &name("Goku"));
        names.rebuild_if_changed();
        assert_eq!(suggest(&names, "goku"), ["Goku"]);
        names.remove("alias.2");
        names.remove("alias.1");
        assert!(suggest(&names, "kaka").is_empty());
        assert_eq!(suggest(&names, "gok"), ["Goku"]);
    }

    #[test]
    fn at_most_ten_names_are_suggested() {
        let stored: Vec<(String, String, String)> = (0..30)
            .map(|i| {
                (
                    format!("text.{i}"),
                    format!("Robot {i}"),
                    format!("Robot {}", i + 100),
                )
            })
            .collect();
        let names = Names::new();
        for (entry, a, b) in &stored {
            names.put(entry, &answer(a, b));
        }
        names.rebuild_if_changed();
        assert_eq!(suggest(&names, "robot").len(), LIMIT);
    }
}
