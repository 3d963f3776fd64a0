//! Postgres decides who generates: one row per (kind, key), claimed with a lease and a fencing
//! attempt number. Every write after the claim is fenced on that attempt, so a worker that lost
//! its lease cannot overwrite the winner.
//!
//! Every statement here gives up after [`db::CLIENT_TIMEOUT`] with an error (see [`bounded`]):
//! an unreachable Postgres makes a job fail and be retried, never wait without end.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::Arc,
    time::Duration,
};

use sqlx::PgPool;
use versus_shared::{
    db,
    tasks::Tasks,
    wire::{ErrorCode, Job, Kind},
};

use crate::batch::{Batcher, Stopped};

/// A row's `status` in `generations` (the values its check constraint allows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Claimed: the worker named in the row generates under a lease.
    Running,
    /// The answer is stored.
    Done,
    /// The last attempt failed; the row may cool down until `retry_at`.
    Failed,
    /// Moderation refused the matchup: nothing is stored, and no claim succeeds until a purge.
    Refused,
    /// An operator purged the answer; the next claim generates afresh.
    Purged,
}

impl Status {
    const ALL: [Status; 5] = [
        Status::Running,
        Status::Done,
        Status::Failed,
        Status::Refused,
        Status::Purged,
    ];

    /// The status as the table spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Refused => "refused",
            Status::Purged => "purged",
        }
    }
}

/// A `status` the table does not allow.
#[derive(Debug, thiserror::Error)]
#[error("unknown generation status {0:?}")]
pub struct UnknownStatus(String);

impl TryFrom<String> for Status {
    type Error = UnknownStatus;

    fn try_from(status: String) -> Result<Status, UnknownStatus> {
        Status::ALL
            .into_iter()
            .find(|s| s.as_str() == status)
            .ok_or(UnknownStatus(status))
    }
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This worker owns attempt `attempt`, under the job's display names.
    Won { attempt: i32 },
    /// Another worker generates, or generated, or may not: why.
    Lost(Lost),
}

/// Why a claim was not won.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// The answer is already complete.
    Done(Box<Stored>),
    /// Another worker holds a live lease for `remaining`.
    Busy { remaining: Duration },
    /// Moderation refused the matchup; `attempt` is the refused one.
    Refused { attempt: i32 },
    /// The matchup failed too often in a row and cools down until `retry_at_ms` (Unix ms):
    /// the last error, as clients were told it.
    Cooling {
        attempt: i32,
        retry_at_ms: u64,
        code: String,
        message: String,
    },
}

impl Claim {
    /// What the claim found, in a word (for its span).
    pub fn name(&self) -> &'static str {
        match self {
            Claim::Won { .. } => "won",
            Claim::Lost(Lost::Done(_)) => "done",
            Claim::Lost(Lost::Busy { .. }) => "busy",
            Claim::Lost(Lost::Refused { .. }) => "refused",
            Claim::Lost(Lost::Cooling { .. }) => "cooling",
        }
    }
}

/// Why a claim has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClaimError {
    /// A statement of the claim's batch failed: every claim it carried gets the same error.
    #[error("claiming in Postgres failed")]
    Postgres(#[source] Arc<sqlx::Error>),
    /// The claimer's task is gone.
    #[error("the claimer has stopped")]
    Stopped(#[from] Stopped),
}

impl From<sqlx::Error> for ClaimError {
    fn from(error: sqlx::Error) -> ClaimError {
        ClaimError::Postgres(Arc::new(error))
    }
}

/// When a matchup whose generations keep failing cools down, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Cooldown {
    /// Failed generations in a row before the first cool-down (0: never).
    pub after: u32,
    /// The first cool-down; each further failure doubles it, up to an hour.
    pub base: Duration,
}

/// A completed answer as Postgres holds it (text or picture columns, by kind).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Stored {
    pub a: String,
    pub b: String,
    pub model: String,
    pub attempt: i32,
    /// Until when a fallback's answer is served (Unix ms; None for the primary's).
    pub degraded_until_ms: Option<i64>,
    pub text: Option<String>,
    pub image_path: Option<String>,
    pub image_size: Option<i64>,
    pub image_sha256: Option<String>,
    pub content_type: Option<String>,
}

/// Claims rows for this worker, in batches ([`Batcher`]): a burst of jobs costs two statements
/// per batch (the claims, then why the lost ones were lost) rather than one or two per job.
#[derive(Clone)]
pub struct Claimer {
    batcher: Batcher<(Job, bool), Result<Claim, ClaimError>>,
}

impl Claimer {
    /// Starts the task that runs the statements, on `tasks`; it ends when every `Claimer` is
    /// dropped, so that the claims of jobs still draining at shutdown are answered.
    pub fn start(db: PgPool, lease: Duration, worker: String, tasks: &Tasks) -> Claimer {
        let worker: Arc<str> = worker.into();
        let batcher = Batcher::start(tasks, move |jobs: Vec<(Job, bool)>| {
            let (db, worker) = (db.clone(), worker.clone());
            async move { claim_batch(&db, &jobs, lease, &worker).await }
        });
        Claimer { batcher }
    }

    /// Claims the job's row: succeeds when the row is new, failed, purged, or its lease has
    /// expired, or when it holds a fallback's answer that is no longer served or that the
    /// primary is to make again (`upgrade.rs` queued it).
    /// Its span (`claim`) says what the claim found.
    #[tracing::instrument(name = "claim", skip_all, fields(versus.claim = tracing::field::Empty))]
    pub async fn claim(&self, job: &Job, upgrade: bool) -> Result<Claim, ClaimError> {
        let claim = self.batcher.call((job.clone(), upgrade)).await??;
        tracing::Span::current().record("versus.claim", claim.name());
        Ok(claim)
    }
}

/// Claims `jobs` in one statement, then explains the claims lost in one more: each job's
/// claim, or the error of the statement that carried it.
async fn claim_batch(
    db: &PgPool,
    claims: &[(Job, bool)],
    lease: Duration,
    worker: &str,
) -> Vec<Result<Claim, ClaimError>> {
    let won = match claim_all(db, claims, lease, worker).await {
        Ok(won) => won,
        Err(e) => return vec![Err(ClaimError::from(e)); claims.len()],
    };
    let jobs: Vec<&Job> = claims.iter().map(|(job, _)| job).collect();
    let lost: Vec<&Job> = jobs
        .iter()
        .zip(&won)
        .filter(|(_, won)| won.is_none())
        .map(|(job, _)| *job)
        .collect();
    let why = if lost.is_empty() {
        HashMap::new()
    } else {
        match why_lost(db, &lost).await {
            Ok(why) => why,
            Err(e) => {
                let e = ClaimError::from(e);
                return won
                    .into_iter()
                    .map(|won| {
                        won.map(|attempt| Claim::Won { attempt })
                            .ok_or_else(|| e.clone())
                    })
                    .collect();
            }
        }
    };
    jobs.iter()
        .zip(won)
        .map(|(job, won)| {
            Ok(match won {
                Some(attempt) => Claim::Won { attempt },
                // The row exists (the insert conflicted), unless an operator deleted it in
                // between, in which case the next delivery claims it afresh.
                None => Claim::Lost(why.get(&row_of(job)).cloned().unwrap_or(Lost::Busy {
                    remaining: Duration::ZERO,
                })),
            })
        })
        .collect()
}

/// A row's identity: its kind and key.
fn row_of(job: &Job) -> (String, String) {
    (job.kind.as_str().to_owned(), job.key.as_str().to_owned())
}

/// One statement for every job: the attempt of each row claimed, None for the others (a
/// second job for the same key in the batch loses to the first). A row claimed again (after a
/// failure, or past a lapsed lease) takes the winning job's display names, which its new
/// attempt answers under. An upgrade (the `bool`) may also claim a degraded answer's row.
async fn claim_all(
    db: &PgPool,
    claims: &[(Job, bool)],
    lease: Duration,
    worker: &str,
) -> sqlx::Result<Vec<Option<i32>>> {
    let mut seen = HashSet::new();
    let unique: Vec<&(Job, bool)> = claims
        .iter()
        .filter(|(j, _)| seen.insert((j.kind, &j.key)))
        .collect();
    let column = |f: fn(&Job) -> &str| unique.iter().map(|(j, _)| f(j)).collect::<Vec<&str>>();
    #[derive(sqlx::FromRow)]
    struct Won {
        kind: String,
        key: String,
        attempt: i32,
    }
    let mut won: Vec<Won> = bounded(
        sqlx::query_as(
            "INSERT INTO generations AS g
                 (kind, key, a, b, model, prompt_version, status, attempt, lease_until, worker,
                  upgrade_queued_at)
             SELECT kind, key, a, b, model, prompt_version, 'running', 1,
                    now() + make_interval(secs => $7), $8,
                    CASE WHEN upgrade THEN now() END
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int4[],
                         $9::bool[])
                  AS j(kind, key, a, b, model, prompt_version, upgrade)
             ON CONFLICT (kind, key) DO UPDATE
                 SET status = 'running', attempt = g.attempt + 1, a = EXCLUDED.a, b = EXCLUDED.b,
                     lease_until = EXCLUDED.lease_until, worker = EXCLUDED.worker, error = NULL,
                     retry_at = NULL, upgrade_queued_at = NULL, updated_at = now()
                 WHERE (g.status = 'failed' AND (g.retry_at IS NULL OR g.retry_at <= now()))
                    OR (g.status = 'running' AND g.lease_until < now())
                    OR g.status = 'purged'
                    OR (g.status = 'done' AND g.degraded_until IS NOT NULL
                        AND (g.degraded_until <= now() OR EXCLUDED.upgrade_queued_at IS NOT NULL))
             RETURNING kind, key, attempt",
        )
        .bind(column(|j| j.kind.as_str()))
        .bind(column(|j| j.key.as_str()))
        .bind(column(|j| &j.a))
        .bind(column(|j| &j.b))
        .bind(column(|j| &j.model))
        .bind(
            unique
                .iter()
                .map(|(j, _)| j.prompt_version as i32)
                .collect::<Vec<i32>>(),
        )
        .bind(lease.as_secs_f64())
        .bind(worker)
        .bind(
            unique
                .iter()
                .map(|(_, upgrade)| *upgrade)
                .collect::<Vec<bool>>(),
        )
        .fetch_all(db),
    )
    .await?;
    Ok(claims
        .iter()
        .map(|(job, _)| {
            let i = won
                .iter()
                .position(|w| w.kind == job.kind.as_str() && w.key == job.key.as_str())?;
            Some(won.swap_remove(i).attempt)
        })
        .collect())
}

/// Why the claims of `jobs` were lost, in one statement, by row: the answer is done, another
/// worker holds the lease, the matchup was refused or cools down. A row not found is missing.
async fn why_lost(db: &PgPool, jobs: &[&Job]) -> sqlx::Result<HashMap<(String, String), Lost>> {
    /// A row as a lost claim finds it.
    #[derive(sqlx::FromRow)]
    struct Found {
        kind: String,
        key: String,
        #[sqlx(try_from = "String")]
        status: Status,
        /// Seconds left of the lease (None without one).
        remaining: Option<f64>,
        /// When a cool-down ends (Unix ms; None without one).
        retry_at_ms: Option<f64>,
        error_code: Option<String>,
        error_message: Option<String>,
        /// The answer's columns, read in the same statement: a done row is announced as it was.
        #[sqlx(flatten)]
        stored: Stored,
    }
    let found: Vec<Found> = bounded(
        sqlx::query_as(
            "SELECT kind, key, status,
                    EXTRACT(EPOCH FROM lease_until - now())::float8 AS remaining,
                    (EXTRACT(EPOCH FROM retry_at) * 1000)::float8 AS retry_at_ms,
                    error_code, error_message,
                    a, b, model, attempt, text, image_path, image_size, image_sha256, content_type,
                    (EXTRACT(EPOCH FROM degraded_until) * 1000)::int8 AS degraded_until_ms
             FROM generations
             WHERE (kind, key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))",
        )
        .bind(jobs.iter().map(|j| j.kind.as_str()).collect::<Vec<&str>>())
        .bind(jobs.iter().map(|j| j.key.as_str()).collect::<Vec<&str>>())
        .fetch_all(db),
    )
    .await?;
    Ok(found
        .into_iter()
        .map(|f| {
            let attempt = f.stored.attempt;
            let lost = match (f.status, f.retry_at_ms) {
                (Status::Failed, Some(retry_at_ms)) => Lost::Cooling {
                    attempt,
                    retry_at_ms: retry_at_ms as u64,
                    code: f
                        .error_code
                        .unwrap_or_else(|| ErrorCode::UpstreamUnavailable.as_str().to_owned()),
                    message: f
                        .error_message
                        .unwrap_or_else(|| "This matchup could not be answered.".to_owned()),
                },
                (Status::Refused, _) => Lost::Refused { attempt },
                (Status::Done, _) => Lost::Done(Box::new(f.stored)),
                (Status::Running | Status::Failed | Status::Purged, _) => Lost::Busy {
                    remaining: Duration::from_secs_f64(f.remaining.unwrap_or(0.0).max(0.0)),
                },
            };
            ((f.kind, f.key), lost)
        })
        .collect())
}

/// The stored answer for the job's key, when it is done.
pub async fn stored(db: &PgPool, job: &Job) -> sqlx::Result<Option<Stored>> {
    bounded(
        sqlx::query_as(
            "SELECT a, b, model, attempt, text, image_path, image_size, image_sha256, content_type,
                    (EXTRACT(EPOCH FROM degraded_until) * 1000)::int8 AS degraded_until_ms
             FROM generations
             WHERE kind = $1 AND key = $2 AND status = 'done'",
        )
        .bind(job.kind.as_str())
        .bind(job.key.as_str())
        .fetch_optional(db),
    )
    .await
}

/// Extends the lease of `attempt`; false when the attempt is no longer ours.
pub async fn heartbeat(
    db: &PgPool,
    job: &Job,
    attempt: i32,
    lease: Duration,
) -> sqlx::Result<bool> {
    let r = bounded(
        sqlx::query(
            "UPDATE generations
             SET lease_until = now() + make_interval(secs => $4), updated_at = now()
             WHERE kind = $1 AND key = $2 AND attempt = $3 AND status = 'running'",
        )
        .bind(job.kind.as_str())
        .bind(job.key.as_str())
        .bind(attempt)
        .bind(lease.as_secs_f64())
        .execute(db),
    )
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Moves our claim to a new attempt (a restart after a broken upstream stream), so events of
/// the new try never share ids with the old one. Returns the new attempt, or None if fenced out.
pub async fn next_attempt(db: &PgPool, job: &Job, attempt: i32) -> sqlx::Result<Option<i32>> {
    bounded(
        sqlx::query_scalar(
            "UPDATE generations SET attempt = attempt + 1, updated_at = now()
             WHERE kind = $1 AND key = $2 AND attempt = $3 AND status = 'running'
             RETURNING attempt",
        )
        .bind(job.kind.as_str())
        .bind(job.key.as_str())
        .bind(attempt)
        .fetch_optional(db),
    )
    .await
}

/// Token counts reported by the upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
}

/// Stores the finished text, fenced on `attempt`, and marks the pre-warm items waiting on it
/// done, in one statement; false when the attempt is no longer ours.
pub async fn complete_text(
    db: &PgPool,
    job: &Job,
    attempt: i32,
    (text, usage): (&str, Usage),
    by: &MadeBy,
) -> sqlx::Result<bool> {
    let done: i64 = bounded(
        sqlx::query_scalar(
            "WITH done AS (
                 UPDATE generations
                 SET status = 'done', text = $4, prompt_tokens = $5, completion_tokens = $6,
                     model = $7, degraded_until = to_timestamp($8::float8 / 1000),
                     upgrade_queued_at = NULL,
                     lease_until = NULL, error = NULL, error_code = NULL, error_message = NULL,
                     failures = 0, completed_at = now(), updated_at = now()
                 WHERE kind = $1 AND key = $2 AND attempt = $3 AND status = 'running'
                 RETURNING 1),
             settled AS (
                 UPDATE prewarm_items SET text_status = 'done'
                 WHERE key = $2 AND text_status = 'pending' AND EXISTS (SELECT 1 FROM done))
             SELECT count(*) FROM done",
        )
        .bind(job.kind.as_str())
        .bind(job.key.as_str())
        .bind(attempt)
        .bind(text)
        .bind(usage.prompt_tokens)
        .bind(usage.completion_tokens)
        .bind(&by.model)
        .bind(by.degraded_until_ms.map(|ms| ms as f64))
        .fetch_one(db),
    )
    .await?;
    Ok(done == 1)
}

/// Which model made an answer, and until when it is served when it is a fallback's
/// (`wire::Degraded`; Unix ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeBy {
    pub model: String,
    pub degraded_until_ms: Option<u64>,
}

/// Puts back a degraded answer whose upgrade (`attempt`) failed, fenced: the row is `done`
/// again with the fallback's answer it kept, and stays queued (`upgrade_queued_at`: queued
/// again once another open time passed). The row as stored, or None when the attempt is no
/// longer ours or the row holds no degraded answer.
pub async fn restore_degraded(
    db: &PgPool,
    job: &Job,
    attempt: i32,
) -> sqlx::Result<Option<Stored>> {
    bounded(
        sqlx::query_as(
            "UPDATE generations
             SET status = 'done', lease_until = NULL, upgrade_queued_at = now(),
                 updated_at = now()
             WHERE kind = $1 AND key = $2 AND attempt = $3 AND status = 'running'
               AND degraded_until IS NOT NULL
               AND (text IS NOT NULL OR image_path IS NOT NULL)
             RETURNING a, b, model, attempt, text, image_path, image_size, image_sha256,
                       content_type,
                       (EXTRACT(EPOCH FROM degraded_until) * 1000)::int8 AS degraded_until_ms",
        )
        .bind(job.kind.as_str())
        .bind(job.key.as_str())
        .bind(attempt)
        .fetch_optional(db),
    )
    .await
}

/// Copies the done row of `job` (a fallback's answer, made by `model`) to the row of the key
/// that model's recipe makes (`own`), unless that row exists: the fallback's answer under its
/// own key, as the primary's is under the job's. False when nothing was copied.
pub async fn copy_to_own_key(
    db: &PgPool,
    job: &Job,
    own: &versus_shared::key::Key,
) -> sqlx::Result<bool> {
    let copied = bounded(
        sqlx::query(
            "INSERT INTO generations AS g
                 (kind, key, a, b, model, prompt_version, status, attempt, text, prompt_tokens,
                  completion_tokens, image_path, image_size, image_sha256, content_type,
                  completed_at)
             SELECT kind, $3, a, b, model, prompt_version, 'done', 1, text, prompt_tokens,
                    completion_tokens, image_path, image_size, image_sha256, content_type, now()
             FROM generations
             WHERE kind = $1 AND key = $2 AND status = 'done' AND degraded_until IS NOT NULL
             ON CONFLICT (kind, key) DO NOTHING",
        )
        .bind(job.kind.as_str())
        .bind(job.key.as_str())
        .bind(own.as_str())
        .execute(db),
    )
    .await?;
    Ok(copied.rows_affected() == 1)
}

/// What a stored picture is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picture {
    pub path: String,
    pub size: i64,
    pub sha256: String,
    pub content_type: String,
}

/// Records the stored picture, fenced on `attempt`, and marks the pre-warm items waiting on it
/// done, in one statement; false when the attempt is no longer ours.
pub async fn complete_image(
    db: &PgPool,
    job: &Job,
    attempt: i32,
    picture: &Picture,
    by: &MadeBy,
) -> sqlx::Result<bool> {
    let done: i64 = bounded(
        sqlx::query_scalar(
            "WITH done AS (
                 UPDATE generations
                 SET status = 'done', image_path = $4, image_size = $5, image_sha256 = $6,
                     content_type = $7, model = $8,
                     degraded_until = to_timestamp($9::float8 / 1000), upgrade_queued_at = NULL,
                     lease_until = NULL, error = NULL, error_code = NULL,
                     error_message = NULL, failures = 0, completed_at = now(),
                     updated_at = now()
                 WHERE kind = $1 AND key = $2 AND attempt = $3 AND status = 'running'
                 RETURNING 1),
             settled AS (
                 UPDATE prewarm_items SET image_status = 'done'
                 WHERE image_key = $2 AND image_status = 'pending'
                   AND EXISTS (SELECT 1 FROM done))
             SELECT count(*) FROM done",
        )
        .bind(job.kind.as_str())
        .bind(job.key.as_str())
        .bind(attempt)
        .bind(&picture.path)
        .bind(picture.size)
        .bind(&picture.sha256)
        .bind(&picture.content_type)
        .bind(&by.model)
        .bind(by.degraded_until_ms.map(|ms| ms as f64))
        .fetch_one(db),
    )
    .await?;
    Ok(done == 1)
}

/// How a failure was recorded.
#[derive(Debug, PartialEq, Eq)]
pub enum Failed {
    /// The attempt is no longer ours; nothing was written.
    NotOurs,
    /// The row is failed; the matchup cools down until `retry_at_ms` (Unix ms), if at all.
    Recorded { retry_at_ms: Option<u64> },
}

/// Marks the attempt failed, fenced, with what clients are told (`code`, `message`) and what
/// operators see (`detail`). A failure that `counts` adds to the failures in a row; once they
/// reach `cooldown.after`, no claim succeeds before the cool-down ends.
pub async fn fail(
    db: &PgPool,
    job: &Job,
    attempt: i32,
    (code, message, detail): (&str, &str, &str),
    counts: bool,
    cooldown: Cooldown,
) -> sqlx::Result<Failed> {
    let row: Option<Option<f64>> = bounded(
        sqlx::query_scalar(
            "UPDATE generations
             SET status = 'failed', error = $4, error_code = $5, error_message = $6,
                 lease_until = NULL, updated_at = now(), failures = failures + $7,
                 retry_at = CASE WHEN $8 > 0 AND $7 = 1 AND failures + 1 >= $8
                     THEN now() + make_interval(secs => LEAST($9 * power(2, failures + 1 - $8), 3600))
                 END
             WHERE kind = $1 AND key = $2 AND attempt = $3 AND status = 'running'
             RETURNING (EXTRACT(EPOCH FROM retry_at) * 1000)::float8",
        )
        .bind(job.kind.as_str())
        .bind(job.key.as_str())
        .bind(attempt)
        .bind(detail)
        .bind(code)
        .bind(message)
        .bind(i32::from(counts))
        .bind(cooldown.after as i32)
        .bind(cooldown.base.as_secs_f64())
        .fetch_optional(db),
    )
    .await?;
    Ok(match row {
        None => Failed::NotOurs,
        Some(at) => Failed::Recorded {
            retry_at_ms: at.map(|ms| ms as u64),
        },
    })
}

/// Records that moderation refused the attempt, fenced: no text is kept, and no claim
/// succeeds again (until an operator's purge). False when the attempt is not ours.
pub async fn refuse(db: &PgPool, job: &Job, attempt: i32, reason: &str) -> sqlx::Result<bool> {
    let r = bounded(
        sqlx::query(
            "UPDATE generations
             SET status = 'refused', error = $4, error_code = 'refused', text = NULL,
                 lease_until = NULL, completed_at = now(), updated_at = now()
             WHERE kind = $1 AND key = $2 AND attempt = $3 AND status = 'running'",
        )
        .bind(job.kind.as_str())
        .bind(job.key.as_str())
        .bind(attempt)
        .bind(reason)
        .execute(db),
    )
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Gives the lease back without failing, so that another worker can claim at once: the lease
/// ends at this statement's `now()`, which is before the `now()` of any claim that follows it.
/// Used when a generation stops on a failure of NATS or Postgres, and when this process stops
/// past its grace period with the generation unfinished (the job is then nak'd at once).
pub async fn release(db: &PgPool, job: &Job, attempt: i32) -> sqlx::Result<()> {
    bounded(
        sqlx::query(
            "UPDATE generations SET lease_until = now(), updated_at = now()
             WHERE kind = $1 AND key = $2 AND attempt = $3 AND status = 'running'",
        )
        .bind(job.kind.as_str())
        .bind(job.key.as_str())
        .bind(attempt)
        .execute(db),
    )
    .await?;
    Ok(())
}

/// Runs one statement, giving up after [`db::CLIENT_TIMEOUT`]. sqlx cannot set keep-alives on
/// its own socket, so a statement sent to a Postgres that vanished (a host gone, a network
/// cut: no reset comes back) would otherwise wait until the kernel gives the connection up,
/// many minutes later. Past the bound, Postgres has cancelled the statement itself
/// (`statement_timeout`), or cannot be reached.
async fn bounded<T>(statement: impl Future<Output = sqlx::Result<T>>) -> sqlx::Result<T> {
    match tokio::time::timeout(db::CLIENT_TIMEOUT, statement).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from Postgres within {:?}", db::CLIENT_TIMEOUT),
        ))),
    }
}

/// How a key ended for the pre-warm batches waiting on it (their items start `pending`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrewarmStatus {
    Done,
    Failed,
}

impl PrewarmStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PrewarmStatus::Done => "done",
            PrewarmStatus::Failed => "failed",
        }
    }
}

/// Marks this key done or failed in every pre-warm batch still waiting on it.
pub async fn record_prewarm_progress(
    db: &PgPool,
    job: &Job,
    status: PrewarmStatus,
) -> sqlx::Result<()> {
    let sql = match job.kind {
        Kind::Text => {
            "UPDATE prewarm_items SET text_status = $2 WHERE key = $1 AND text_status = 'pending'"
        }
        Kind::Image => {
            "UPDATE prewarm_items SET image_status = $2
             WHERE image_key = $1 AND image_status = 'pending'"
        }
    };
    bounded(
        sqlx::query(sql)
            .bind(job.key.as_str())
            .bind(status.as_str())
            .execute(db),
    )
    .await?;
    Ok(())
}
