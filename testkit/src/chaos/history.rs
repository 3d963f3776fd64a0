//! What a fault run saw: every client operation, purge, fault and sighting of a stored answer,
//! with times in milliseconds from the start of the load. The invariants are checked over it,
//! and it is written out as NDJSON, one record a line.

use serde::Serialize;

use super::schedule::{Fault, Site};

/// What a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// A matchup nobody asked for before.
    Miss,
    /// One of a burst of identical requests for a hot matchup.
    Burst,
    /// A matchup asked for before (a hot one, or one of the client's own misses).
    Hit,
    /// A stream dropped after a few chunks, then resumed with `Last-Event-ID`.
    Resume,
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// `done`, with the text assembled from the chunks (resets honoured, resumes appended).
    Done { text: String },
    /// Still failing with a retryable error (or a lost connection) at the operation's deadline.
    GaveUp { code: String },
    /// `refused`: moderation said no (not retryable, and allowed).
    Refused,
    /// A non-retryable error other than `refused`.
    Fatal { code: String, message: String },
    /// An attempt that neither ended nor finished within the attempt deadline.
    Hung { attempt_ms: u64 },
}

/// One request of an operation: where it went and what came back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    pub site: Site,
    pub start_ms: u64,
    pub end_ms: u64,
    /// The `Last-Event-ID` it sent (a resume).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event_id: Option<String>,
    /// The events received, in order, consecutive chunks folded: `meta chunk*7 reset chunk*40 done`,
    /// then how it ended when that was not an event (`http 503 busy`, `lost: …`, `dropped`).
    pub events: String,
}

/// A client's operation: one matchup asked for until it ended (retrying and resuming as a
/// browser would).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Op {
    pub id: u64,
    pub client: usize,
    pub kind: OpKind,
    pub a: String,
    pub b: String,
    /// The key from `meta` (absent when no attempt got that far).
    pub key: Option<String>,
    pub start_ms: u64,
    pub end_ms: u64,
    pub attempts: Vec<Attempt>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// An operator's purge of a key through `DELETE /v1/admin/fights/{key}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Purge {
    pub key: String,
    pub site: Site,
    pub start_ms: u64,
    pub end_ms: u64,
    /// The HTTP status, or why there was none.
    pub answer: String,
    /// The text Postgres held for the key just before (the answer it purges).
    pub purged: String,
    /// Whether the answer it purged is gone: a 204, or (after an error) Postgres no longer
    /// holding the text it held before. Only such purges separate two answers of a key.
    pub effective: bool,
}

/// A stored answer seen in Postgres (`status = 'done'`), from `first_ms` to `last_ms` without a
/// change in between (by the poller, before a purge, or at the end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sighting {
    pub key: String,
    pub text: String,
    pub first_ms: u64,
    pub last_ms: u64,
}

/// A fault as injected: from `start_ms` until it was healed at `end_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FaultRecord {
    pub start_ms: u64,
    pub end_ms: u64,
    #[serde(flatten)]
    pub fault: Fault,
    /// What went wrong while injecting or healing it, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trouble: Option<String>,
}

/// Everything the run saw while the load ran.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub ops: Vec<Op>,
    pub purges: Vec<Purge>,
    pub sightings: Vec<Sighting>,
    pub faults: Vec<FaultRecord>,
}

/// One broken invariant: which, about what, and the operations that show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub invariant: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<u64>,
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}]", self.invariant)?;
        if let Some(key) = &self.key {
            write!(f, " key {key}")?;
        }
        if !self.ops.is_empty() {
            let ops: Vec<String> = self.ops.iter().map(|id| format!("#{id}")).collect();
            write!(f, " ops {}", ops.join(","))?;
        }
        write!(f, ": {}", self.detail)
    }
}
