//! Aliases: names an operator declared to be another name (`Kakarot` is `Goku`), so that a
//! request naming the alias is answered under the canonical name's key, with its display
//! name, and pays for nothing the canonical name's answer already paid for.
//!
//! Postgres (`aliases`) holds them; a worker that changes one (`versus.admin.aliases`) also
//! writes it to the answers bucket as `alias.<hash of the alias's match key>`, an [`Alias`]
//! (a delete is a purge marker). The answers bucket rather than one of their own: every edge
//! already mirrors it, and every process may already read and watch it, so aliases reach the
//! edges the way answers do, with no other bucket, mirror or permission to keep.
//!
//! Every process keeps the aliases in memory ([`Aliases`], filled by [`Aliases::follow`]): the
//! API applies them to every request ([`Aliases::apply`], before the key is made), and a
//! worker ends a job that names one ([`Aliases::named_in`]), before anything is paid for: such
//! a job comes from a replica that has not seen the alias yet, and its answer would be stored
//! under a key nobody asks for once every replica has.
//!
//! Aliases never chain: a canonical name is never an alias, nor an alias another's canonical
//! name (the worker refuses both under one lock), so one look-up resolves any name.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
};

use async_nats::jetstream::kv;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::{
    bus::follow,
    key::{Matchup, Name},
    wire::{Alias, Job},
};

/// The entries of the answers bucket that hold aliases.
pub const ENTRIES: &str = "alias.*";

/// The answers bucket's entry of the alias whose match key is `matched`: a hash, since a match
/// key may hold any letter and a KV key may not.
pub fn entry(matched: &str) -> String {
    let digest = Sha256::digest(matched.as_bytes());
    format!("alias.{}", hex::encode(&digest[..16]))
}

/// Whether `entry` (of the answers bucket) holds an alias.
pub fn is_entry(entry: &str) -> bool {
    entry.starts_with("alias.")
}

/// The aliases this process knows. Cheap to share.
#[derive(Default)]
pub struct Aliases {
    live: RwLock<Live>,
}

#[derive(Default)]
struct Live {
    /// The canonical name of each alias, by the alias's match key.
    canonical: HashMap<Box<str>, Name>,
    /// The alias's match key of each entry: a marker carries no value to read it from.
    entries: HashMap<String, Box<str>>,
}

/// What a change of the bucket did here.
#[derive(Debug, PartialEq, Eq)]
pub enum Changed {
    /// `alias` now stands for `canonical` (it may have stood for another before).
    Put { alias: Name, canonical: Name },
    /// The alias with this match key is gone.
    Removed { alias: Box<str> },
    /// Nothing this process knew or could read.
    Nothing,
}

impl Aliases {
    pub fn new() -> Arc<Aliases> {
        Arc::new(Aliases::default())
    }

    /// How many aliases are known.
    pub fn len(&self) -> usize {
        read(&self.live).canonical.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The canonical name `name` stands for, when it is an alias.
    pub fn canonical_of(&self, name: &Name) -> Option<Name> {
        read(&self.live).canonical.get(name.matched()).cloned()
    }

    /// Puts the canonical name in place of each name of `matchup` that is an alias; whether
    /// one was.
    pub fn apply(&self, matchup: &mut Matchup) -> bool {
        let live = read(&self.live);
        if live.canonical.is_empty() {
            return false;
        }
        let mut applied = false;
        for name in [&mut matchup.a, &mut matchup.b] {
            if let Some(canonical) = live.canonical.get(name.matched()) {
                *name = canonical.clone();
                applied = true;
            }
        }
        applied
    }

    /// The first name of `job` that is an alias, as the job wrote it.
    pub fn named_in<'j>(&self, job: &'j Job) -> Option<&'j str> {
        let live = read(&self.live);
        if live.canonical.is_empty() {
            return None;
        }
        [job.a.as_str(), job.b.as_str()].into_iter().find(|name| {
            Name::parse("a", Some(name))
                .is_ok_and(|name| live.canonical.contains_key(name.matched()))
        })
    }

    /// Applies a change of the bucket's `alias.*` entries: `entry` now holds `value`, or a
    /// delete or purge marker (`None`).
    pub fn change(&self, entry: &str, value: Option<&[u8]>) -> Changed {
        let Some(value) = value else {
            let mut live = write(&self.live);
            let Some(alias) = live.entries.remove(entry) else {
                return Changed::Nothing;
            };
            live.canonical.remove(&alias);
            return Changed::Removed { alias };
        };
        let Ok(value) = serde_json::from_slice::<Alias>(value) else {
            tracing::warn!(entry, "an alias that cannot be read; ignored");
            return Changed::Nothing;
        };
        let (Ok(alias), Ok(canonical)) = (
            Name::parse("a", Some(&value.alias)),
            Name::parse("b", Some(&value.canonical)),
        ) else {
            tracing::warn!(entry, "an alias that is not a valid name; ignored");
            return Changed::Nothing;
        };
        let mut live = write(&self.live);
        live.entries
            .insert(entry.to_owned(), alias.matched().into());
        live.canonical
            .insert(alias.matched().into(), canonical.clone());
        Changed::Put { alias, canonical }
    }

    /// Follows the aliases in `answers` (the bucket, or an edge's mirror of it) until
    /// `shutdown`: every alias stored so far, then every change, each handed to `then` once
    /// applied. A watch that breaks starts again after the last change it gave.
    pub async fn follow(
        self: Arc<Self>,
        answers: kv::Store,
        shutdown: CancellationToken,
        mut then: impl FnMut(&kv::Entry, &Changed),
    ) {
        let watch = follow::changes(
            &answers,
            ENTRIES,
            follow::From::Now,
            "the aliases",
            |entry| {
                let put = entry.operation == kv::Operation::Put;
                let changed = self.change(&entry.key, put.then_some(&entry.value[..]));
                then(&entry, &changed);
            },
        );
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = watch => {}
        }
    }
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
    use crate::{key::Key, wire::Kind};

    fn put(aliases: &Aliases, alias: &str, canonical: &str) -> Changed {
        let value = serde_json::to_vec(&Alias {
            alias: alias.to_owned(),
            canonical: canonical.to_owned(),
        })
        .unwrap();
        aliases.change(&entry_of(alias), Some(&value))
    }

    fn entry_of(alias: &str) -> String {
        entry(Name::parse("a", Some(alias)).unwrap().matched())
    }

    fn matchup(a: &str, b: &str) -> Matchup {
        Matchup::parse(Some(a), Some(b)).unwrap()
    }

    #[test]
    fn an_alias_by_any_spelling_becomes_its_canonical_name() {
        let aliases = Aliases::new();
        let mut plain = matchup("Kakarot", "Vegeta");
        assert!(!aliases.apply(&mut plain));
        assert!(matches!(
            put(&aliases, "Kakarot", "Goku"),
            Changed::Put { .. }
        ));
        let goku = matchup("Goku", "Vegeta");
        for a in ["Kakarot", "KAKAROT", "ka-ka rot"] {
            let mut asked = matchup("Vegeta", a);
            assert!(aliases.apply(&mut asked), "{a}");
            assert_eq!(asked.b.display(), "Goku");
            assert_eq!(
                asked.key(Kind::Text, 1, "m"),
                goku.key(Kind::Text, 1, "m"),
                "{a}"
            );
        }
        // Names that are not aliases are left as they are.
        let mut other = matchup("Kakarott", "Vegeta");
        assert!(!aliases.apply(&mut other));
        assert_eq!(other.a.display(), "Kakarott");
    }

    #[test]
    fn a_removed_alias_is_its_own_name_again() {
        let aliases = Aliases::new();
        put(&aliases, "Kakarot", "Goku");
        // Pointed elsewhere, then removed by a marker (no value).
        put(&aliases, "kakarot", "Son Goku");
        assert_eq!(
            aliases
                .canonical_of(&Name::parse("a", Some("Kakarot")).unwrap())
                .unwrap()
                .display(),
            "Son Goku"
        );
        assert_eq!(aliases.len(), 1);
        let removed = aliases.change(&entry_of("Kakarot"), None);
        assert_eq!(
            removed,
            Changed::Removed {
                alias: "kakarot".into()
            }
        );
        assert!(aliases.is_empty());
        let mut asked = matchup("Kakarot", "Vegeta");
        assert!(!aliases.apply(&mut asked));
        // A marker of an entry never seen changes nothing.
        assert_eq!(aliases.change(&entry_of("Frieza"), None), Changed::Nothing);
    }

    #[test]
    fn a_job_naming_an_alias_is_found() {
        let aliases = Aliases::new();
        put(&aliases, "Kakarot", "Goku");
        let job = |a: &str, b: &str| Job {
            kind: Kind::Text,
            key: Key::parse(&"0".repeat(32)).unwrap(),
            a: a.to_owned(),
            b: b.to_owned(),
            model: "m".to_owned(),
            prompt_version: 1,
            size: None,
        };
        assert_eq!(aliases.named_in(&job("Vegeta", "kaKarot")), Some("kaKarot"));
        assert_eq!(aliases.named_in(&job("Goku", "Vegeta")), None);
    }

    #[test]
    fn entries_are_kv_keys_of_fixed_length() {
        let e = entry("孫悟空");
        assert!(is_entry(&e));
        assert_eq!(e.len(), "alias.".len() + 32);
        assert!(e.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'.'));
        assert_ne!(entry("goku"), entry("gokU"));
    }
}
