//! The contract between the API and the workers: subjects, streams, the KV bucket, and the
//! payloads that travel on them. Read this file to know what crosses the bus.
//!
//! - `versus.jobs.<kind>` (stream `VERSUS_JOBS`, work queue, file storage): one [`Job`] asks
//!   for one answer. The API publishes with a `Nats-Msg-Id` from [`job_msg_id`], so identical
//!   misses from any number of API replicas inside the duplicate window become one job.
//! - `versus.events.<kind>.<key>` (stream `VERSUS_EVENTS`, limits retention, minutes of age):
//!   the [`Event`]s of the current generation of one answer. Readers start from the subject's
//!   first message, so late joiners get everything. A worker that starts a new attempt purges
//!   the subject first, so the subject only ever holds one attempt.
//! - KV bucket `versus_answers`, key `<kind>.<key>`: the finished [`Answer`] (the edge cache),
//!   written only after Postgres holds it ([`ImageAnswer`] for pictures, after the bytes are in
//!   object storage).
//! - KV bucket `versus_answers`, key `refused.<kind>.<key>`: a [`Refusal`], for a matchup
//!   that moderation refused (written after Postgres holds it).
//! - `versus.admin.purge` (core NATS request/reply, queue group across workers): an
//!   operator's purge, which the API asks a worker to carry out ([`PurgeRequest`]).
//! - `versus.reports` and `versus.admin.reports` (core NATS request/reply, queue group across
//!   workers): a client's [`Report`] of a stored answer, and an operator's [`Settle`]ment of a
//!   reported one, which the API asks a worker to record ([`ReportReply`]).
//! - `versus.admin.aliases` (core NATS request/reply, queue group across workers): an
//!   operator's [`AliasChange`], which a worker writes to Postgres and to the answers bucket
//!   ([`AliasReply`]).
//! - KV bucket `versus_answers`, key `alias.<hash of the alias's match key>`: an [`Alias`]
//!   (see `aliases`), written by the worker that carried out the change, followed by every
//!   process (at an edge, in its mirror).
//! - KV bucket `versus_spend`, key `day.<n>`: the total the cluster spent on UTC day `n`
//!   (days since 1970-01-01), as a decimal number of US dollars; workers write it, every
//!   process watches it (see `budget`).
//! - KV bucket `versus_quota`, key `day.<n>.<client bucket>`: what one client (an IPv4
//!   address, an IPv6 /64 or /48) may still start on UTC day `n` is its daily quota less this,
//!   in millionths of a US dollar; every API replica adds to it with compare-and-set (see the
//!   API's `quota`).

use serde::{Deserialize, Serialize};

use crate::key::Key;
pub use crate::{error_code::ErrorCode, kind::Kind};

pub const JOBS_STREAM: &str = "VERSUS_JOBS";
pub const JOBS_SUBJECTS: &str = "versus.jobs.>";
/// Pre-warm jobs: the same stream, a lane of their own with its own, smaller concurrency.
pub const PREWARM_SUBJECTS: &str = "versus.prewarm.>";
pub const EVENTS_STREAM: &str = "VERSUS_EVENTS";
pub const EVENTS_SUBJECTS: &str = "versus.events.>";
pub const ANSWERS_BUCKET: &str = "versus_answers";
/// KV bucket: each UTC day's upstream spend in US dollars, key `day.<days since 1970>`
/// (see `budget`).
pub const SPEND_BUCKET: &str = "versus_spend";
/// KV bucket: what each client's new generations were charged on a UTC day, cluster-wide, in
/// millionths of a US dollar (the API's `quota`; workers declare it, the API reads and writes it).
pub const QUOTA_BUCKET: &str = "versus_quota";
/// The durable pull consumer every worker shares for interactive jobs.
pub const WORKERS_CONSUMER: &str = "versus-workers";
/// The durable pull consumer for pre-warm jobs.
pub const PREWARM_CONSUMER: &str = "versus-prewarm";
/// Core NATS: batches of [`Requests`] from every API replica; workers aggregate them into
/// Postgres (queue group [`POPULARITY_QUEUE`]).
pub const POPULARITY_SUBJECT: &str = "versus.popularity";
pub const POPULARITY_QUEUE: &str = "versus-popularity";
/// Core NATS: a [`Purge`] every API replica applies to its in-memory caches.
pub const PURGE_SUBJECT: &str = "versus.cache.purge";
/// Core NATS request/reply: an operator's purge, which the API (it may not write to the
/// events stream or the KV bucket) asks one worker to carry out (queue group
/// [`PURGE_REQUEST_QUEUE`]): a [`PurgeRequest`], answered with a [`PurgeReply`] once the rows,
/// pictures, KV entries and events are gone. The API then forgets the keys and tells every
/// replica ([`PURGE_SUBJECT`]).
pub const PURGE_REQUEST_SUBJECT: &str = "versus.admin.purge";
pub const PURGE_REQUEST_QUEUE: &str = "versus-purge";
/// Core NATS request/reply: a client's [`Report`] of a stored answer, which the API (it may not
/// write to Postgres from a public route, nor to the KV bucket) asks one worker to record
/// (queue group [`REPORTS_QUEUE`]); enough `unsafe` reports hide the answer everywhere.
pub const REPORT_SUBJECT: &str = "versus.reports";
/// Core NATS request/reply: an operator's [`Settle`]ment of a reported answer (`keep` or
/// `refuse`; a `purge` is an ordinary [`PurgeRequest`]), carried out by one worker.
pub const SETTLE_SUBJECT: &str = "versus.admin.reports";
pub const REPORTS_QUEUE: &str = "versus-reports";
/// Core NATS request/reply: an operator's [`AliasChange`], carried out by one worker.
pub const ALIASES_SUBJECT: &str = "versus.admin.aliases";
pub const ALIASES_QUEUE: &str = "versus-aliases";
/// Where the API's requests get their answers (its inbox prefix): a worker answers a purge
/// request only on a reply subject under it ([`is_api_inbox`]), and its NATS user may publish
/// nowhere else outside its own subjects.
pub const API_INBOX_PREFIX: &str = "_INBOX.api";
/// Where a worker's requests (JetStream's acknowledgements and API answers) get their answers.
pub const WORKER_INBOX_PREFIX: &str = "_INBOX.worker";

/// Whether `reply` is an inbox of the API's ([`API_INBOX_PREFIX`]`.<token>…`): the only reply
/// subject a worker answers a purge request on. Any other one is a requester trying to make
/// the worker publish where it chose (a stream's delete API, a KV key), and is refused.
pub fn is_api_inbox(reply: &str) -> bool {
    reply
        .strip_prefix(API_INBOX_PREFIX)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .split('.')
                    .all(|token| !token.is_empty() && !token.contains(['*', '>', ' ', '\t']))
        })
}

pub fn job_subject(kind: Kind) -> String {
    format!("versus.jobs.{kind}")
}

pub fn prewarm_subject(kind: Kind) -> String {
    format!("versus.prewarm.{kind}")
}

/// Whether a job arrived on the pre-warm lane.
pub fn is_prewarm_subject(subject: &str) -> bool {
    subject.starts_with("versus.prewarm.")
}

pub fn events_subject(kind: Kind, key: &Key) -> String {
    format!("versus.events.{kind}.{key}")
}

pub fn kv_key(kind: Kind, key: &Key) -> String {
    format!("{kind}.{key}")
}

/// The de-duplication id of a job. `after` is the stream sequence of the last event the
/// publisher saw on the key's events subject (0 for none), whatever its kind: a request that
/// follows a failure (or anything newer) asks for a new job, while identical requests that saw
/// the same history coalesce.
pub fn job_msg_id(kind: Kind, key: &Key, after: u64) -> String {
    format!("{kind}.{key}.{after}")
}

/// The de-duplication id of a job that restarts a generation found stalled: its last event
/// (stream sequence `last`) is older than the lease, `leases` whole leases ago. Every replica
/// and every joiner that finds the same stall names the same job, so any number of them make
/// one job per lease that the generation stays silent, and none while it is alive.
pub fn stalled_job_msg_id(kind: Kind, key: &Key, last: u64, leases: u64) -> String {
    format!("{kind}.{key}.{last}.stalled-{leases}")
}

/// A header on a job published for a key whose generation the API saw under way (a client
/// joining it, to restart it should it be lost): its claim is most likely held, so a worker
/// asks the upstream only once it has won the claim. (`Live` on the wire, for processes of
/// older versions during an upgrade; "under way" everywhere in the code.)
pub const UNDER_WAY_HEADER: &str = "Versus-Live";
/// A pre-warm job a worker published to make a degraded answer again with the primary
/// (the worker's `upgrade`): it may claim the degraded answer's row, and calls the primary only.
pub const UPGRADE_HEADER: &str = "Versus-Upgrade";

/// The de-duplication id of a pre-warm job: one per key and batch.
pub fn prewarm_msg_id(kind: Kind, key: &Key, batch: &str) -> String {
    format!("prewarm.{batch}.{kind}.{key}")
}

/// A request to generate one answer. It carries what the worker needs, not copies of truth:
/// the display names of the first request (for the prompt) and the model the key was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub kind: Kind,
    pub key: Key,
    pub a: String,
    pub b: String,
    pub model: String,
    pub prompt_version: u32,
    /// Picture size, for image jobs (`1024x1024`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
}

/// One step of a generation, published by the worker that owns the current attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Attempt `attempt` begins; anything a reader holds from an earlier attempt is void.
    Started { attempt: i32 },
    /// `delta` is the text at byte `offset` of the answer.
    Chunk {
        attempt: i32,
        offset: usize,
        delta: String,
    },
    /// A picture's partial image `index` (from 0, in order) of attempt `attempt`, as the
    /// upstream draws it: stored at `path` in the object store
    /// (`objects::partial_path`), shown while the picture is drawn, never the answer. For a
    /// reader it takes the place a chunk takes in a text: the `index`-th of the attempt.
    Partial {
        attempt: i32,
        index: u32,
        path: String,
    },
    /// The answer is complete and stored.
    Done {
        attempt: i32,
        model: String,
        /// Bytes of text the attempt published (for a picture, the partial images it
        /// published): a reader that holds fewer lost a chunk (a partial) and must read the
        /// stream's history before it ends.
        #[serde(default)]
        length: usize,
    },
    /// The attempt failed; `retryable` says whether asking again may succeed.
    Error {
        attempt: i32,
        code: String,
        message: String,
        retryable: bool,
        /// When asking again may succeed (Unix milliseconds), if not at once: the end of a
        /// matchup's cool-down after repeated failures, the next UTC day for a spent budget.
        /// Until then a request for the key gets this error again without a job.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at_ms: Option<u64>,
    },
    /// An operator purged the answer; readers waiting on it should ask again.
    Purged,
}

impl Event {
    /// The event's `type`, as it is serialized.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Started { .. } => "started",
            Event::Chunk { .. } => "chunk",
            Event::Partial { .. } => "partial",
            Event::Done { .. } => "done",
            Event::Error { .. } => "error",
            Event::Purged => "purged",
        }
    }

    /// Whether this event ends a generation (nothing of this attempt follows).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::Done { .. } | Event::Error { .. } | Event::Purged
        )
    }
}

impl Event {
    /// An `error` of this process's own, before or outside any attempt, with `code`'s words
    /// and retryability: asking again may succeed after `retry_at_ms`, when given.
    pub fn failed(code: ErrorCode, retry_at_ms: Option<u64>) -> Event {
        Event::failed_with(code, code.message(), retry_at_ms)
    }

    /// [`Event::failed`] in more precise words than the code's own.
    pub fn failed_with(code: ErrorCode, message: &str, retry_at_ms: Option<u64>) -> Event {
        Event::Error {
            attempt: 0,
            code: code.as_str().to_owned(),
            message: message.to_owned(),
            retryable: code.retryable(),
            retry_at_ms,
        }
    }

    /// How long until asking again may succeed, for an error that says so (at least a
    /// second; None once that time has come).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        let Event::Error {
            retry_at_ms: Some(at),
            ..
        } = self
        else {
            return None;
        };
        let left = at.checked_sub(unix_ms()).filter(|ms| *ms > 0)?;
        Some(std::time::Duration::from_millis(
            left.div_ceil(1000).max(1) * 1000,
        ))
    }
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The `error` event of a refused matchup: the same, neutral words for every refusal.
pub fn refused(attempt: i32) -> Event {
    Event::Error {
        attempt,
        code: ErrorCode::Refused.as_str().to_owned(),
        message: ErrorCode::Refused.message().to_owned(),
        retryable: ErrorCode::Refused.retryable(),
        retry_at_ms: None,
    }
}

/// The edge KV bucket's key of a refusal: `refused.<kind>.<key>`.
pub fn refusal_kv_key(kind: Kind, key: &Key) -> String {
    format!("refused.{kind}.{key}")
}

/// A matchup moderation refused: the value of `refused.<kind>.<key>`, written after Postgres
/// holds the refusal. Every later request for it is refused from the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub kind: Kind,
    pub key: Key,
}

/// A stored picture: the value of the edge cache for `image.<key>`. Only our own object path
/// is kept, never a provider URL (they expire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageAnswer {
    pub key: Key,
    pub a: String,
    pub b: String,
    /// Path in the object store, under `images/`.
    pub path: String,
    pub size: u64,
    /// Hex SHA-256 of the bytes: the strong ETag.
    pub sha256: String,
    pub content_type: String,
    /// The model that drew it: a fallback's when [`ImageAnswer::degraded_until_ms`] is set.
    pub model: String,
    pub attempt: i32,
    /// Set when a fallback provider made it ([`Degraded`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_until_ms: Option<u64>,
}

/// A finished text answer: the value of the edge cache, and what `GET /v1/fights/{key}` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub key: Key,
    pub a: String,
    pub b: String,
    pub text: String,
    /// The model that wrote it: a fallback's when [`Answer::degraded_until_ms`] is set.
    pub model: String,
    /// The attempt that produced the text; SSE ids carry it so resumes never mix attempts.
    /// Attempts never repeat for a key, across purges too: it names this answer.
    pub attempt: i32,
    /// Set when a fallback provider made it ([`Degraded`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_until_ms: Option<u64>,
}

/// An answer a fallback provider made while the primary could not (its model is not the
/// key's): served as degraded, and made again by the primary once it is back. Until
/// `degraded_until_ms` (Unix milliseconds, `VERSUS_DEGRADED_TTL_SECS` after it was stored) it
/// is a hit; past it, a miss, whose job may claim the key again. API replicas never keep a
/// degraded answer in memory, so the primary's answer, once stored, is served at once.
pub trait Degraded {
    /// The model that made it.
    fn model(&self) -> &str;

    fn degraded_until_ms(&self) -> Option<u64>;

    /// Whether it was made by a fallback.
    fn degraded(&self) -> bool {
        self.degraded_until_ms().is_some()
    }

    /// Whether it is still served at `now_ms` (Unix milliseconds): any answer the primary made,
    /// a fallback's until its time.
    fn served_at(&self, now_ms: u64) -> bool {
        self.degraded_until_ms().is_none_or(|until| now_ms < until)
    }
}

impl Degraded for Answer {
    fn model(&self) -> &str {
        &self.model
    }

    fn degraded_until_ms(&self) -> Option<u64> {
        self.degraded_until_ms
    }
}

impl Degraded for ImageAnswer {
    fn model(&self) -> &str {
        &self.model
    }

    fn degraded_until_ms(&self) -> Option<u64> {
        self.degraded_until_ms
    }
}

/// How many times a text answer was asked for since the last batch (popularity).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requests {
    pub key: Key,
    pub a: String,
    pub b: String,
    pub count: u64,
}

/// The answers an operator purges (a text answer and its picture): their rows (kept as
/// `purged`, with their attempt, so that the next answer's attempt is a new one) and pictures,
/// their KV entries (answer and refusal), and their events, which end with [`Event::Purged`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeRequest {
    pub answers: Vec<PurgeTarget>,
}

/// One answer of a [`PurgeRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeTarget {
    pub kind: Kind,
    pub key: Key,
}

/// A worker's answer to a [`PurgeRequest`]: `error` says what failed (a purge is idempotent:
/// asking again finishes it); otherwise `markers` are the purge markers it wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub markers: Vec<Marker>,
}

/// A purge marker a worker wrote in the answers bucket: the entry `entry` ([`kv_key`] or
/// [`refusal_kv_key`]) was purged at `revision`, the bucket's stream sequence (which an edge's
/// mirror keeps, and a lagging replica or mirror has not reached yet). A value of `entry` at a
/// lower revision is the purged one, and is never served again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub entry: String,
    pub revision: u64,
}

/// Keys every API replica must drop from its in-memory caches, and the purge markers below
/// which the entries it reads from the bucket (or its mirror) are stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purge {
    pub keys: Vec<Key>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub markers: Vec<Marker>,
}

/// Why a client reports an answer. Only `unsafe` reports hide one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Unsafe,
    Wrong,
    Poor,
    Other,
}

impl Reason {
    pub const ALL: [Reason; 4] = [Reason::Unsafe, Reason::Wrong, Reason::Poor, Reason::Other];

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Unsafe => "unsafe",
            Reason::Wrong => "wrong",
            Reason::Poor => "poor",
            Reason::Other => "other",
        }
    }
}

/// A client's report of the stored answer `attempt` of `<kind>.<key>` (the answer the API
/// served it). `client` is a pseudonym of the client's address, never the address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub kind: Kind,
    pub key: Key,
    pub attempt: i32,
    pub client: String,
    pub reason: Reason,
}

/// What an operator decides about a reported answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Serve it (again, if it was hidden), and let no report hide this answer again.
    Keep,
    /// Purge it everywhere, as `DELETE /v1/admin/fights/{key}` does: the next request
    /// generates a new answer.
    Purge,
    /// Refuse the matchup for good: the answer is dropped and never generated again.
    Refuse,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Keep, Action::Purge, Action::Refuse];

    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Keep => "keep",
            Action::Purge => "purge",
            Action::Refuse => "refuse",
        }
    }
}

/// An operator's decision on the answer of `<kind>.<key>` that clients reported (`keep` or
/// `refuse`: a worker carries them out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settle {
    pub kind: Kind,
    pub key: Key,
    pub action: Action,
}

/// A worker's answer to a [`Report`] or a [`Settle`]: `found` says whether the answer (with
/// reports, for a settlement) exists; `counted`, whether the report was this client's first
/// of this answer. `markers` are the purge markers written (an answer hidden or refused: its
/// entry; one kept after it was hidden: its refusal), which the API applies to every replica as
/// an operator's purge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub found: bool,
    #[serde(default)]
    pub counted: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub markers: Vec<Marker>,
}

/// An alias, as an operator wrote it: requests naming `alias` (by its match key) are answered
/// as if they named `canonical`. The answers bucket's `alias.<hash>` value, and a line of
/// `GET /v1/admin/aliases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub alias: String,
    pub canonical: String,
}

/// An operator's change to the aliases, which a worker carries out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AliasChange {
    /// Adds the alias, or points it at another canonical name.
    Put(Alias),
    /// Removes the alias named so (by its match key).
    Delete { alias: String },
}

/// A worker's answer to an [`AliasChange`]: its error (nothing was done), why it was refused
/// (a chain or a cycle: nothing was done), or done (`found`: a deleted alias existed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    #[serde(default)]
    pub found: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_purge_is_answered_on_an_api_inbox_only() {
        assert!(is_api_inbox("_INBOX.api.abc123.7"));
        for reply in [
            "$JS.API.STREAM.DELETE.KV_versus_answers",
            "$KV.versus_answers.refused.text.abc",
            "_INBOX.api",
            "_INBOX.api.",
            "_INBOX.apix.abc",
            "_INBOX.worker.abc",
            "_INBOX.abc",
            "_INBOX.api..x",
            "_INBOX.api.>",
            "_INBOX.api.*.x",
        ] {
            assert!(!is_api_inbox(reply), "{reply}");
        }
    }
}
