//! Postgres decides who generates: one row per (kind, key), claimed with a lease and a fencing
//! attempt number. Every write after the claim is fenced on that attempt, so a worker that lost
//! its lease cannot overwrite the winner.
//!
//! Every statement here gives up after [`db::CLIENT_TIMEOUT`] with an error (see [`bounded`]):
//! an unreachable Postgres makes a job fail and be retried, never wait without end.

use std::{future::Future, time::Duration};

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use versus_shared::{
    db,
    tasks::Tasks,
    wire::{Job, Kind},
};

/// What a claim found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// This worker owns attempt `attempt`, under the job's display names.
    Won { attempt: i32 },
    /// The answer is already complete.
    Done(Stored),
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
            Claim::Done(_) => "done",
            Claim::Busy { .. } => "busy",
            Claim::Refused { .. } => "refused",
            Claim::Cooling { .. } => "cooling",
        }
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
    pub text: Option<String>,
    pub image_path: Option<String>,
    pub image_size: Option<i64>,
    pub image_sha256: Option<String>,
    pub content_type: Option<String>,
}

/// Claims rows for this worker. Claims that arrive while a statement runs wait and go
/// together in the next one, as a database's group commit does: a burst of jobs costs a few
/// statements and commits rather than one each.
#[derive(Clone)]
pub struct Claimer {
    requests: mpsc::UnboundedSender<(Job, Reply)>,
}

type Reply = oneshot::Sender<sqlx::Result<Claim>>;

/// The most claims one statement carries.
const MAX_BATCH: usize = 256;

impl Claimer {
    /// Starts the task that runs the statements, on `tasks`; it ends when every `Claimer` is
    /// dropped, so that the claims of jobs still draining at shutdown are answered.
    pub fn start(db: PgPool, lease: Duration, worker: String, tasks: &Tasks) -> Claimer {
        let (requests, mut queue) = mpsc::unbounded_channel();
        tasks.spawn(async move {
            let mut batch = Vec::new();
            while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let (jobs, replies): (Vec<Job>, Vec<Reply>) = batch.drain(..).unzip();
                match claim_all(&db, &jobs, lease, &worker).await {
                    Ok(claims) => {
                        for ((job, reply), claim) in jobs.iter().zip(replies).zip(claims) {
                            let claim = match claim {
                                Some(won) => Ok(won),
                                None => why_not(&db, job).await,
                            };
                            let _ = reply.send(claim);
                        }
                    }
                    Err(e) => {
                        // One statement failed for every job in it; each learns why.
                        let message = e.to_string();
                        for reply in replies {
                            let error = match e {
                                sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
                                sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
                                _ => sqlx::Error::Protocol(message.clone()),
                            };
                            let _ = reply.send(Err(error));
                        }
                    }
                }
            }
        });
        Claimer { requests }
    }

    /// Claims the job's row: succeeds when the row is new, failed, purged, or its lease has
    /// expired.
    /// Its span (`claim`) says what the claim found.
    #[tracing::instrument(name = "claim", skip_all, fields(versus.claim = tracing::field::Empty))]
    pub async fn claim(&self, job: &Job) -> sqlx::Result<Claim> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((job.clone(), reply))
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let claim = answer.await.map_err(|_| sqlx::Error::PoolClosed)?;
        if let Ok(claim) = &claim {
            tracing::Span::current().record("versus.claim", claim.name());
        }
        claim
    }
}

/// One statement for every job: `Some(Claim::Won)` for each row claimed, `None` for the
/// others (a second job for the same key in the batch loses to the first). A row claimed
/// again (after a failure, or past a lapsed lease) takes the winning job's display names, which
/// its new attempt answers under.
async fn claim_all(
    db: &PgPool,
    jobs: &[Job],
    lease: Duration,
    worker: &str,
) -> sqlx::Result<Vec<Option<Claim>>> {
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<&Job> = jobs
        .iter()
        .filter(|j| seen.insert((j.kind, &j.key)))
        .collect();
    let column = |f: fn(&Job) -> &str| unique.iter().map(|j| f(j)).collect::<Vec<&str>>();
    #[derive(sqlx::FromRow)]
    struct Won {
        kind: String,
        key: String,
        attempt: i32,
    }
    let mut won: Vec<Won> = bounded(
        sqlx::query_as(
            "INSERT INTO generations AS g
                 (kind, key, a, b, model, prompt_version, status, attempt, lease_until, worker)
             SELECT kind, key, a, b, model, prompt_version, 'running', 1,
                    now() + make_interval(secs => $7), $8
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int4[])
                  AS j(kind, key, a, b, model, prompt_version)
             ON CONFLICT (kind, key) DO UPDATE
                 SET status = 'running', attempt = g.attempt + 1, a = EXCLUDED.a, b = EXCLUDED.b,
                     lease_until = EXCLUDED.lease_until, worker = EXCLUDED.worker, error = NULL,
                     retry_at = NULL, updated_at = now()
                 WHERE (g.status = 'failed' AND (g.retry_at IS NULL OR g.retry_at <= now()))
                    OR (g.status = 'running' AND g.lease_until < now())
                    OR g.status = 'purged'
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
                .map(|j| j.prompt_version as i32)
                .collect::<Vec<i32>>(),
        )
        .bind(lease.as_secs_f64())
        .bind(worker)
        .fetch_all(db),
    )
    .await?;
    Ok(jobs
        .iter()
        .map(|job| {
            let i = won
                .iter()
                .position(|w| w.kind == job.kind.as_str() && w.key == job.key.as_str())?;
            let Won { attempt, .. } = won.swap_remove(i);
            Some(Claim::Won { attempt })
        })
        .collect())
}

/// Why a job's claim was not won: the answer is done, another worker holds the lease, or the
/// matchup cools down.
async fn why_not(db: &PgPool, job: &Job) -> sqlx::Result<Claim> {
    #[derive(sqlx::FromRow)]
    struct Row {
        status: String,
        remaining: Option<f64>,
        attempt: i32,
        retry_at_ms: Option<f64>,
        error_code: Option<String>,
        error_message: Option<String>,
    }
    // The row exists (the insert conflicted), unless an operator deleted it in between, in
    // which case the next delivery claims it afresh.
    let row: Option<Row> = bounded(
        sqlx::query_as(
            "SELECT status, EXTRACT(EPOCH FROM lease_until - now())::float8 AS remaining,
                    attempt, (EXTRACT(EPOCH FROM retry_at) * 1000)::float8 AS retry_at_ms,
                    error_code, error_message
             FROM generations WHERE kind = $1 AND key = $2",
        )
        .bind(job.kind.as_str())
        .bind(job.key.as_str())
        .fetch_optional(db),
    )
    .await?;
    let row = row.map(|r| {
        let cooling = (r.status == "failed")
            .then_some(r.retry_at_ms)
            .flatten()
            .map(|at| at as u64);
        (
            r.status,
            r.remaining,
            cooling,
            r.attempt,
            r.error_code,
            r.error_message,
        )
    });
    match row {
        Some((_, _, Some(retry_at_ms), attempt, code, message)) => Ok(Claim::Cooling {
            attempt,
            retry_at_ms,
            code: code.unwrap_or_else(|| "upstream_unavailable".to_owned()),
            message: message.unwrap_or_else(|| "This matchup could not be answered.".to_owned()),
        }),
        Some((status, _, _, attempt, ..)) if status == "refused" => Ok(Claim::Refused { attempt }),
        Some((status, ..)) if status == "done" => match stored(db, job).await? {
            Some(s) => Ok(Claim::Done(s)),
            None => Ok(Claim::Busy {
                remaining: Duration::ZERO,
            }),
        },
        Some((_, remaining, ..)) => Ok(Claim::Busy {
            remaining: Duration::from_secs_f64(remaining.unwrap_or(0.0).max(0.0)),
        }),
        None => Ok(Claim::Busy {
            remaining: Duration::ZERO,
        }),
    }
}

/// The stored answer for the job's key, when it is done.
pub async fn stored(db: &PgPool, job: &Job) -> sqlx::Result<Option<Stored>> {
    bounded(
        sqlx::query_as(
            "SELECT a, b, model, attempt, text, image_path, image_size, image_sha256, content_type
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
    text: &str,
    usage: Usage,
) -> sqlx::Result<bool> {
    let done: i64 = bounded(
        sqlx::query_scalar(
            "WITH done AS (
                 UPDATE generations
                 SET status = 'done', text = $4, prompt_tokens = $5, completion_tokens = $6,
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
        .fetch_one(db),
    )
    .await?;
    Ok(done == 1)
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
) -> sqlx::Result<bool> {
    let done: i64 = bounded(
        sqlx::query_scalar(
            "WITH done AS (
                 UPDATE generations
                 SET status = 'done', image_path = $4, image_size = $5, image_sha256 = $6,
                     content_type = $7, lease_until = NULL, error = NULL, error_code = NULL,
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

/// Marks this key done or failed in every pre-warm batch still waiting on it.
pub async fn settle_prewarm(db: &PgPool, job: &Job, status: &str) -> sqlx::Result<()> {
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
            .bind(status)
            .execute(db),
    )
    .await?;
    Ok(())
}
