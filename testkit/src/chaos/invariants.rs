//! The invariants of a fault run, pure: checks over what the clients saw ([`History`]) and
//! what the system holds once healed ([`Final`]). Each check names its invariant, the key and
//! the operations that break it.
//!
//! Answers have an identity in time. A purge that took effect ends its key's answer; every
//! text Postgres was seen holding ([`Sighting`]) may be served from the start of the last
//! purge that ended before it was seen until the end of the purge that removed it: the first
//! that began after it was last seen, or one that purged that very text (read just before it
//! began) and ended after it was last seen (its *window*). A `done` must carry one of its key's
//! stored texts whose window overlaps the operation: never a splice of two, never one purged
//! before it began, except from a replica cut off from the purge while it ran (an edge whose
//! link was cut, a replica stopped, or whose server was), until it has caught up (the
//! guarantee ARCHITECTURE.md states: such a replica cannot know).

use std::collections::{BTreeMap, BTreeSet};

use super::history::{FaultRecord, History, Op, Outcome, Purge, Sighting, Violation};
use super::schedule::{Fault, Site};

/// The system once healed and settled.
#[derive(Debug, Clone, Default)]
pub struct Final {
    /// Every text row of `generations`.
    pub rows: Vec<Row>,
    /// The hub's answers bucket: key → the text of its `text.<key>` entry.
    pub kv: BTreeMap<String, String>,
    /// Each finished key asked for again at each API.
    pub hits: Vec<HitCheck>,
    /// The simulator's chat calls before and after those requests.
    pub chat_calls_before_hits: u64,
    pub chat_calls_after_hits: u64,
    /// Processes that are not running, or not ready, with why.
    pub down: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub key: String,
    pub status: String,
    pub text: Option<String>,
}

/// A finished key asked for at one API after healing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HitCheck {
    pub key: String,
    pub site: Site,
    /// `meta.cached` of the last try.
    pub cached: bool,
    /// The text of its `done`, or what came instead.
    pub result: Result<String, String>,
}

/// Every violation of the run, in the order of the checks.
pub fn check(history: &History, last: &Final, answer_tokens: usize) -> Vec<Violation> {
    let mut found = Vec::new();
    found.extend(endings(&history.ops));
    found.extend(whole_texts(&history.ops, answer_tokens));
    found.extend(identities(history));
    found.extend(one_text_per_epoch(history));
    found.extend(changes_without_purge(history));
    found.extend(purges_left_the_answer(history));
    found.extend(stored_state(last, answer_tokens));
    found.extend(hits(last));
    found.extend(last.down.iter().map(|what| Violation {
        invariant: "every process alive",
        key: None,
        ops: Vec::new(),
        detail: what.clone(),
    }));
    found
}

/// Whether `text` is a whole answer of the simulator: `tokens` words, one space apart.
pub fn is_whole(text: &str, tokens: usize) -> bool {
    !text.is_empty() && text.split(' ').count() == tokens && !text.contains("  ")
}

/// Every operation ends in `done`, a retryable error or `refused`, within its deadline.
fn endings(ops: &[Op]) -> Vec<Violation> {
    ops.iter()
        .filter_map(|op| {
            let detail = match &op.outcome {
                Outcome::Fatal { code, message } => {
                    format!("ended with the non-retryable error {code}: {message}")
                }
                Outcome::Hung { attempt_ms } => {
                    format!("an attempt neither ended nor finished within {attempt_ms} ms")
                }
                _ => return None,
            };
            Some(Violation {
                invariant: "every operation ends in done or a retryable error",
                key: op.key.clone(),
                ops: vec![op.id],
                detail: format!("{} {} vs {}: {detail}", kind(op), op.a, op.b),
            })
        })
        .collect()
}

/// Every `done` text is a whole answer.
fn whole_texts(ops: &[Op], tokens: usize) -> Vec<Violation> {
    done_ops(ops)
        .filter(|(_, _, text)| !is_whole(text, tokens))
        .map(|(op, key, text)| Violation {
            invariant: "every done text is whole",
            key: Some(key.to_owned()),
            ops: vec![op.id],
            detail: format!(
                "{} words, not {tokens}: {text:?}",
                text.split(' ').filter(|w| !w.is_empty()).count()
            ),
        })
        .collect()
}

/// Every `done` text is one of its key's stored answers, and one that was current while the
/// operation ran.
fn identities(history: &History) -> Vec<Violation> {
    let purges = purges_by_key(&history.purges);
    let sightings = sightings_by_key(&history.sightings);
    let mut found = Vec::new();
    for (op, key, text) in done_ops(&history.ops) {
        let stored: Vec<&&Sighting> = sightings
            .get(key)
            .map(|s| s.iter().filter(|s| s.text == *text).collect())
            .unwrap_or_default();
        if stored.is_empty() {
            let known = sightings.get(key).map_or(0, Vec::len);
            found.push(Violation {
                invariant: "every done text is the stored answer",
                key: Some(key.to_owned()),
                ops: vec![op.id],
                detail: format!(
                    "{} got a text Postgres never held ({known} stored texts seen for the key; \
                     a splice of two answers, or a partial one?): {text:?}; attempts: {}",
                    kind(op),
                    attempts(op)
                ),
            });
            continue;
        }
        let key_purges = purges.get(key).map_or(&[][..], Vec::as_slice);
        let current = stored.iter().any(|s| {
            let (lo, hi) = window(s, key_purges);
            op.start_ms <= hi && op.end_ms >= lo
        });
        if !current && !cut_off_from_the_purge(op, text, key_purges, &history.faults) {
            let ended = key_purges
                .iter()
                .filter(|p| p.end_ms <= op.start_ms)
                .map(|p| format!("{}..{} ms answered {}", p.start_ms, p.end_ms, p.answer))
                .collect::<Vec<_>>();
            found.push(Violation {
                invariant: "no purged answer is served after its purge",
                key: Some(key.to_owned()),
                ops: vec![op.id],
                detail: format!(
                    "{} ({}..{} ms) got an answer purged before it began (purges that ended \
                     before: {}); attempts: {}",
                    kind(op),
                    op.start_ms,
                    op.end_ms,
                    ended.join(", "),
                    attempts(op)
                ),
            });
        }
    }
    found
}

/// Two clients that got `done` for one key between the same two purges got the same text.
fn one_text_per_epoch(history: &History) -> Vec<Violation> {
    let purges = purges_by_key(&history.purges);
    // (key, purges ended before) → text → ops
    let mut epochs: BTreeMap<(&str, usize), BTreeMap<&str, Vec<u64>>> = BTreeMap::new();
    for (op, key, text) in done_ops(&history.ops) {
        let key_purges = purges.get(key).map_or(&[][..], Vec::as_slice);
        let overlaps = key_purges
            .iter()
            .any(|p| p.start_ms < op.end_ms && p.end_ms > op.start_ms);
        if overlaps || cut_off_from_the_purge(op, text, key_purges, &history.faults) {
            continue;
        }
        let epoch = key_purges
            .iter()
            .filter(|p| p.end_ms <= op.start_ms)
            .count();
        epochs
            .entry((key, epoch))
            .or_default()
            .entry(text)
            .or_default()
            .push(op.id);
    }
    epochs
        .into_iter()
        .filter(|(_, texts)| texts.len() > 1)
        .map(|((key, epoch), texts)| {
            let ops = texts.values().flatten().copied().collect();
            let groups: Vec<String> = texts
                .iter()
                .map(|(text, ops)| format!("{ops:?} got {text:?}"))
                .collect();
            Violation {
                invariant: "one text per key between two purges",
                key: Some(key.to_owned()),
                ops,
                detail: format!("after purge {epoch}: {}", groups.join("; ")),
            }
        })
        .collect()
}

/// Postgres changes a key's stored text only across a purge.
fn changes_without_purge(history: &History) -> Vec<Violation> {
    let purges = purges_by_key(&history.purges);
    let mut found = Vec::new();
    for (key, seen) in sightings_by_key(&history.sightings) {
        let key_purges = purges.get(key).map_or(&[][..], Vec::as_slice);
        for pair in seen.windows(2) {
            let (before, after) = (pair[0], pair[1]);
            if before.text == after.text {
                continue;
            }
            let purged = key_purges
                .iter()
                .any(|p| p.end_ms >= before.last_ms && p.start_ms <= after.first_ms);
            if !purged {
                found.push(Violation {
                    invariant: "a stored answer changes only across a purge",
                    key: Some(key.to_owned()),
                    ops: Vec::new(),
                    detail: format!(
                        "Postgres held {:?} until {} ms and {:?} from {} ms, with no purge between",
                        before.text, before.last_ms, after.text, after.first_ms
                    ),
                });
            }
        }
    }
    found
}

/// A purge that took effect removed the answer from Postgres: the poller, reading at least
/// once a second (an answer takes longer to make again), never saw it stay through one.
fn purges_left_the_answer(history: &History) -> Vec<Violation> {
    let purges = purges_by_key(&history.purges);
    let mut found = Vec::new();
    for s in &history.sightings {
        for p in purges.get(s.key.as_str()).into_iter().flatten() {
            if s.first_ms < p.start_ms && s.last_ms > p.end_ms {
                found.push(Violation {
                    invariant: "a purge removes the answer",
                    key: Some(s.key.clone()),
                    ops: Vec::new(),
                    detail: format!(
                        "the purge at {}..{} ms answered {} but Postgres held {:?} from {} to {} ms",
                        p.start_ms, p.end_ms, p.answer, s.text, s.first_ms, s.last_ms
                    ),
                });
            }
        }
    }
    found
}

/// Only whole answers are stored, and the answers bucket holds what Postgres holds.
fn stored_state(last: &Final, tokens: usize) -> Vec<Violation> {
    let mut found = Vec::new();
    let violation = |invariant, key: &str, detail: String| Violation {
        invariant,
        key: Some(key.to_owned()),
        ops: Vec::new(),
        detail,
    };
    let mut done = BTreeMap::new();
    for row in &last.rows {
        let text = row.text.as_deref().unwrap_or_default();
        if row.status == "done" {
            if !is_whole(text, tokens) {
                found.push(violation(
                    "nothing partial stored",
                    &row.key,
                    format!("a done row holds {text:?}"),
                ));
            }
            done.insert(row.key.as_str(), text);
        } else if !text.is_empty() {
            found.push(violation(
                "nothing partial stored",
                &row.key,
                format!("a {} row holds text {text:?}", row.status),
            ));
        }
    }
    for (key, text) in &done {
        match last.kv.get(*key) {
            Some(kv) if kv == text => {}
            Some(kv) => found.push(violation(
                "the answers bucket matches Postgres",
                key,
                format!("Postgres holds {text:?}, the bucket {kv:?}"),
            )),
            None => found.push(violation(
                "the answers bucket matches Postgres",
                key,
                "Postgres holds a done answer the bucket lacks".to_owned(),
            )),
        }
    }
    for (key, kv) in &last.kv {
        if !done.contains_key(key.as_str()) {
            found.push(violation(
                "the answers bucket matches Postgres",
                key,
                format!("the bucket holds {kv:?} for a key Postgres has no done answer for"),
            ));
        }
    }
    found
}

/// Once healed, every finished key is a hit at every API, with its stored text, and no hit
/// calls the upstream.
fn hits(last: &Final) -> Vec<Violation> {
    let stored: BTreeMap<&str, &str> = last
        .rows
        .iter()
        .filter(|r| r.status == "done")
        .map(|r| (r.key.as_str(), r.text.as_deref().unwrap_or_default()))
        .collect();
    let mut found: Vec<Violation> = last
        .hits
        .iter()
        .filter_map(|hit| {
            let detail = match &hit.result {
                Err(e) => format!("at {:?}: {e}", hit.site),
                Ok(text) if Some(&text.as_str()) != stored.get(hit.key.as_str()) => {
                    format!(
                        "at {:?}: a text other than the stored one: {text:?}",
                        hit.site
                    )
                }
                Ok(_) if !hit.cached => format!("at {:?}: not served from a cache", hit.site),
                Ok(_) => return None,
            };
            Some(Violation {
                invariant: "every finished key is a hit everywhere",
                key: Some(hit.key.clone()),
                ops: Vec::new(),
                detail,
            })
        })
        .collect();
    if last.chat_calls_after_hits != last.chat_calls_before_hits {
        found.push(Violation {
            invariant: "every finished key is a hit everywhere",
            key: None,
            ops: Vec::new(),
            detail: format!(
                "asking for the finished keys again made {} upstream chat calls",
                last.chat_calls_after_hits
                    .saturating_sub(last.chat_calls_before_hits)
            ),
        });
    }
    found
}

/// How long after its link is back an edge may still serve what a purge removed: the leaf
/// reconnects within a second and the mirror catches up in milliseconds, unless the bucket
/// changed leader meanwhile, when the mirror finds it after a back-off (ARCHITECTURE.md, "A
/// purge is final": measured past 15 s).
const EDGE_CATCH_UP_MS: u64 = 30_000;
/// How long after it runs again (or its server does) a replica may still serve what a purge
/// removed: the notice waiting for it is read in milliseconds, a reconnect takes seconds.
const REPLICA_CATCH_UP_MS: u64 = 5_000;

/// Whether `op` got `text` from a replica that could not hear of the purge that removed it,
/// within the time the guarantee gives such a replica: at some moment while the purge ran, an
/// edge's leaf link was cut, or its server (or the hub server its leaf was on) was down or
/// stopped; or the replica itself, or the hub server it is connected to, was stopped or down;
/// and `op` began before the catch-up after that fault was healed. Such a replica serves what
/// it holds, as it serves every hit: it cannot know (ARCHITECTURE.md, "A purge is final").
fn cut_off_from_the_purge(op: &Op, text: &str, purges: &[&Purge], faults: &[FaultRecord]) -> bool {
    let Some(site) = op.attempts.last().map(|a| a.site) else {
        return false;
    };
    let catch_up = |fault: &Fault| -> Option<u64> {
        match (*fault, site) {
            (
                Fault::CutLink { edge }
                | Fault::KillEdgeNats { edge }
                | Fault::PauseEdgeNats { edge },
                Site::Edge(e),
            ) if edge == e => Some(EDGE_CATCH_UP_MS),
            // An edge's leaf may have been on that server, and reconnects to another.
            (Fault::KillHubNode { .. } | Fault::PauseHubNode { .. }, Site::Edge(_)) => {
                Some(EDGE_CATCH_UP_MS)
            }
            // The hub's API may have been connected to that server.
            (Fault::KillHubNode { .. } | Fault::PauseHubNode { .. }, Site::Hub) => {
                Some(REPLICA_CATCH_UP_MS)
            }
            (Fault::PauseApi { site: paused }, _) if paused == site => Some(REPLICA_CATCH_UP_MS),
            _ => None,
        }
    };
    purges.iter().filter(|p| p.purged == text).any(|p| {
        faults.iter().any(|f| {
            catch_up(&f.fault).is_some_and(|catch_up| {
                f.start_ms <= p.end_ms
                    && f.end_ms >= p.start_ms
                    && op.start_ms <= f.end_ms + catch_up
            })
        })
    })
}

/// The window in which sighting `s` may be served (see the module's doc).
fn window(s: &Sighting, purges: &[&Purge]) -> (u64, u64) {
    let lo = purges
        .iter()
        .filter(|p| p.end_ms <= s.first_ms)
        .map(|p| p.start_ms)
        .max()
        .unwrap_or(0);
    let hi = purges
        .iter()
        .filter(|p| p.start_ms >= s.last_ms || (p.purged == s.text && p.end_ms >= s.last_ms))
        .map(|p| p.end_ms)
        .min()
        .unwrap_or(u64::MAX);
    (lo, hi)
}

/// The purges that took effect, by key.
fn purges_by_key(purges: &[Purge]) -> BTreeMap<&str, Vec<&Purge>> {
    let mut by_key: BTreeMap<&str, Vec<&Purge>> = BTreeMap::new();
    for p in purges.iter().filter(|p| p.effective) {
        by_key.entry(p.key.as_str()).or_default().push(p);
    }
    by_key
}

/// The sightings by key, in the order they began.
fn sightings_by_key(sightings: &[Sighting]) -> BTreeMap<&str, Vec<&Sighting>> {
    let mut by_key: BTreeMap<&str, Vec<&Sighting>> = BTreeMap::new();
    for s in sightings {
        by_key.entry(s.key.as_str()).or_default().push(s);
    }
    for seen in by_key.values_mut() {
        seen.sort_by_key(|s| (s.first_ms, s.last_ms));
    }
    by_key
}

/// The operations that got `done`, with their key and text.
fn done_ops(ops: &[Op]) -> impl Iterator<Item = (&Op, &str, &str)> {
    ops.iter().filter_map(|op| match (&op.outcome, &op.key) {
        (Outcome::Done { text }, Some(key)) => Some((op, key.as_str(), text.as_str())),
        _ => None,
    })
}

fn kind(op: &Op) -> String {
    format!("{:?} op #{} of client {}", op.kind, op.id, op.client).to_lowercase()
}

fn attempts(op: &Op) -> String {
    let each: Vec<String> = op
        .attempts
        .iter()
        .map(|a| {
            let resume = a
                .last_event_id
                .as_deref()
                .map(|id| format!(" Last-Event-ID {id}"))
                .unwrap_or_default();
            format!(
                "{:?} {}..{} ms{resume}: {}",
                a.site, a.start_ms, a.end_ms, a.events
            )
        })
        .collect();
    each.join(" | ")
}

/// The keys whose texts the run saw: for reports.
pub fn keys_seen(history: &History) -> BTreeSet<&str> {
    history
        .ops
        .iter()
        .filter_map(|op| op.key.as_deref())
        .collect()
}

#[cfg(test)]
#[path = "invariants_tests.rs"]
mod tests;
