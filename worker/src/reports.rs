//! Clients' reports of stored answers, and operators' decisions on them, carried out for the
//! API (which may not write to Postgres from a public route, nor to the bus's streams and
//! buckets) on `versus.reports` and `versus.admin.reports`.
//!
//! One report per client per answer counts: the primary key of `reports` is the answer (kind,
//! key and attempt) and the client's pseudonym. When `VERSUS_REPORTS_TO_HIDE` distinct clients
//! have reported an answer `unsafe`, it is hidden at once: its row becomes `refused` but keeps
//! its text or picture (`hidden_at`), so that no claim regenerates it, and it is withdrawn from
//! the bucket and the events as a refusal (the API spreads the purge marker to every replica
//! and, through the mirrors, every edge). It stays hidden until an operator decides: `keep`
//! serves it again and no report hides that answer again (`kept_attempt`); `refuse` drops its
//! text or picture and refuses the matchup for good; `purge` is an ordinary purge (the API's).
//!
//! The row is locked (`FOR UPDATE`) while a report is counted, so that reports of one answer
//! arriving at several workers at once are counted one after another, and the one that reaches
//! the threshold sees it.

use std::sync::Arc;

use anyhow::Context;
use object_store::ObjectStoreExt;
use sqlx::{Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use versus_shared::wire::{self, Action, Job, Kind, Marker, Reason, Report, ReportReply, Settle};

use crate::{
    claims,
    ctx::Ctx,
    events::Publisher,
    generation::{self, Generation},
    image::Image,
    purge, responder,
    text::Text,
};

/// When a reported answer is hidden.
#[derive(clap::Args, Debug, Clone)]
pub struct ReportSettings {
    /// How many distinct clients must report an answer `unsafe` for it to be hidden everywhere
    /// until an operator decides (0: reports never hide an answer).
    #[arg(long, env = "VERSUS_REPORTS_TO_HIDE", default_value_t = 3)]
    pub reports_to_hide: u32,
}

/// Carries out reports and settlements until `shutdown`, one of each at a time (each holds one
/// of the pool's background connections: a flood of reports never takes the jobs' ones; a
/// report is a short transaction, a few hundred a second per worker).
pub async fn run(
    ctx: Arc<Ctx>,
    settings: ReportSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let to_hide = settings.reports_to_hide;
    let failed = |error| ReportReply {
        error: Some(error),
        ..ReportReply::default()
    };
    let reports = responder::serve(
        ctx.clone(),
        wire::REPORT_SUBJECT,
        wire::REPORTS_QUEUE,
        1,
        shutdown.clone(),
        move |ctx, report: Report| async move { count(&ctx, &report, to_hide).await },
        failed,
    );
    let settlements = responder::serve(
        ctx,
        wire::SETTLE_SUBJECT,
        wire::REPORTS_QUEUE,
        1,
        shutdown,
        |ctx, settle: Settle| async move { settle_one(&ctx, &settle).await },
        failed,
    );
    let (reports, settlements) = tokio::join!(reports, settlements);
    reports.and(settlements)
}

/// Every series of the reports' counters, at zero from the start.
pub fn zero_counters() {
    for kind in [Kind::Text, Kind::Image] {
        metrics::counter!("versus_answers_hidden_total", "kind" => kind.as_str()).absolute(0);
        for reason in Reason::ALL {
            for counted in ["true", "false"] {
                metrics::counter!("versus_reports_total", "kind" => kind.as_str(), "reason" => reason.as_str(), "counted" => counted)
                    .absolute(0);
            }
        }
    }
}

/// The row of a reported answer, locked until the transaction ends.
#[derive(sqlx::FromRow)]
struct Reported {
    a: String,
    b: String,
    model: String,
    prompt_version: i32,
    attempt: i32,
    /// `done`, or `refused` (hidden, or refused for good).
    status: String,
    /// Hidden by reports, with its text or picture kept.
    hidden: bool,
    /// An operator kept this very answer.
    kept: bool,
    image_path: Option<String>,
}

impl Reported {
    /// The answer as a job names it (what the bucket, the events and the fenced reads need).
    fn job(&self, kind: Kind, key: &versus_shared::key::Key) -> Job {
        Job {
            kind,
            key: key.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            model: self.model.clone(),
            prompt_version: u32::try_from(self.prompt_version).unwrap_or_default(),
            size: None,
        }
    }
}

/// Reads and locks the row of `<kind>.<key>` when it holds an answer (served, or hidden by
/// reports; `attempt`, when given, must be its answer), or one refused for good with reports.
async fn reported(
    tx: &mut Transaction<'_, Postgres>,
    kind: Kind,
    key: &versus_shared::key::Key,
    attempt: Option<i32>,
) -> sqlx::Result<Option<Reported>> {
    sqlx::query_as(
        "SELECT a, b, model, prompt_version, attempt, status,
                status = 'refused' AND hidden_at IS NOT NULL
                    AND (text IS NOT NULL OR image_path IS NOT NULL) AS hidden,
                kept_attempt IS NOT DISTINCT FROM attempt AS kept, image_path
         FROM generations
         WHERE kind = $1 AND key = $2 AND ($3::integer IS NULL OR attempt = $3)
           AND (status = 'done' OR (status = 'refused' AND hidden_at IS NOT NULL))
         FOR UPDATE",
    )
    .bind(kind.as_str())
    .bind(key.as_str())
    .bind(attempt)
    .fetch_optional(&mut **tx)
    .await
}

/// Counts `report` (once per client and answer), and hides the answer when it makes
/// `to_hide` clients who found it unsafe. An answer found hidden is withdrawn again (a hide
/// that stopped half-way, its row written but not its bucket, is finished so).
async fn count(ctx: &Ctx, report: &Report, to_hide: u32) -> anyhow::Result<ReportReply> {
    let (kind, key) = (report.kind, &report.key);
    let mut tx = ctx.db.begin().await.context("beginning a report")?;
    let Some(row) = reported(&mut tx, kind, key, Some(report.attempt)).await? else {
        return Ok(ReportReply::default());
    };
    let counted = sqlx::query(
        "INSERT INTO reports (kind, key, attempt, client, reason) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT DO NOTHING",
    )
    .bind(kind.as_str())
    .bind(key.as_str())
    .bind(row.attempt)
    .bind(&report.client)
    .bind(report.reason.as_str())
    .execute(&mut *tx)
    .await
    .context("recording a report")?
    .rows_affected()
        == 1;
    let mut hides = false;
    if counted
        && report.reason == Reason::Unsafe
        && row.status == "done"
        && !row.kept
        && to_hide > 0
    {
        let unsafe_reports: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM reports
             WHERE kind = $1 AND key = $2 AND attempt = $3 AND reason = 'unsafe'",
        )
        .bind(kind.as_str())
        .bind(key.as_str())
        .bind(row.attempt)
        .fetch_one(&mut *tx)
        .await?;
        if unsafe_reports >= i64::from(to_hide) {
            sqlx::query(
                "UPDATE generations
                 SET status = 'refused', hidden_at = now(), error_code = 'refused',
                     error = $3, updated_at = now()
                 WHERE kind = $1 AND key = $2",
            )
            .bind(kind.as_str())
            .bind(key.as_str())
            .bind(format!(
                "hidden: {unsafe_reports} clients reported it unsafe"
            ))
            .execute(&mut *tx)
            .await
            .context("hiding the answer")?;
            hides = true;
        }
    }
    tx.commit().await.context("committing a report")?;
    let counted_label = if counted { "true" } else { "false" };
    metrics::counter!("versus_reports_total", "kind" => kind.as_str(), "reason" => report.reason.as_str(), "counted" => counted_label)
        .increment(1);
    let markers = if hides || row.hidden {
        if hides {
            metrics::counter!("versus_answers_hidden_total", "kind" => kind.as_str()).increment(1);
            tracing::warn!(%kind, %key, attempt = row.attempt, "answer hidden: reported unsafe");
        }
        withdraw(ctx, &row.job(kind, key), row.attempt).await?
    } else {
        Vec::new()
    };
    Ok(ReportReply {
        error: None,
        found: true,
        counted,
        markers,
    })
}

/// Carries out an operator's decision on a reported answer (`keep` or `refuse`).
async fn settle_one(ctx: &Ctx, settle: &Settle) -> anyhow::Result<ReportReply> {
    let (kind, key) = (settle.kind, &settle.key);
    let mut tx = ctx.db.begin().await.context("beginning a settlement")?;
    let row = match reported(&mut tx, kind, key, None).await? {
        Some(row) if has_reports(&mut tx, kind, key, row.attempt).await? => row,
        // No answer with reports: nothing to decide (a `keep` of one refused for good finds
        // nothing to bring back either).
        _ => return Ok(ReportReply::default()),
    };
    let job = row.job(kind, key);
    let markers = match settle.action {
        Action::Keep if row.status == "refused" && !row.hidden => return Ok(ReportReply::default()),
        Action::Keep => {
            sqlx::query(
                "UPDATE generations
                 SET status = 'done', hidden_at = NULL, error = NULL, error_code = NULL,
                     kept_attempt = attempt, updated_at = now()
                 WHERE kind = $1 AND key = $2",
            )
            .bind(kind.as_str())
            .bind(key.as_str())
            .execute(&mut *tx)
            .await
            .context("keeping the answer")?;
            tx.commit().await?;
            if row.hidden {
                restore(ctx, &job, row.attempt).await?
            } else {
                Vec::new()
            }
        }
        Action::Refuse => {
            sqlx::query(
                "UPDATE generations
                 SET status = 'refused', text = NULL, image_path = NULL, image_size = NULL,
                     image_sha256 = NULL, content_type = NULL, kept_attempt = NULL,
                     hidden_at = coalesce(hidden_at, now()), error_code = 'refused',
                     error = 'refused by an operator after reports', updated_at = now()
                 WHERE kind = $1 AND key = $2",
            )
            .bind(kind.as_str())
            .bind(key.as_str())
            .execute(&mut *tx)
            .await
            .context("refusing the answer")?;
            tx.commit().await?;
            if let Some(path) = &row.image_path
                && let Err(e) = ctx.objects.delete(&path.as_str().into()).await
            {
                tracing::warn!(%path, error = %e, "deleting a refused picture failed");
            }
            withdraw(ctx, &job, row.attempt).await?
        }
        Action::Purge => anyhow::bail!("a purge is asked on {}", wire::PURGE_REQUEST_SUBJECT),
    };
    let action = settle.action.as_str();
    metrics::counter!("versus_reports_settled_total", "kind" => kind.as_str(), "action" => action)
        .increment(1);
    tracing::info!(%kind, %key, action, "reported answer settled");
    Ok(ReportReply {
        error: None,
        found: true,
        counted: false,
        markers,
    })
}

/// Whether the answer `attempt` of `<kind>.<key>` has reports.
async fn has_reports(
    tx: &mut Transaction<'_, Postgres>,
    kind: Kind,
    key: &versus_shared::key::Key,
    attempt: i32,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM reports WHERE kind = $1 AND key = $2 AND attempt = $3)",
    )
    .bind(kind.as_str())
    .bind(key.as_str())
    .bind(attempt)
    .fetch_one(&mut **tx)
    .await
}

/// Takes an answer out of service everywhere, as a refusal: the refusal goes into the bucket
/// first (a request then finds one or the other, never neither), then the answer's entry is
/// purged with a marker (returned: the API spreads it to every replica), then its events give
/// way to `refused`, so that no reader replays the hidden text from the stream.
async fn withdraw(ctx: &Ctx, job: &Job, attempt: i32) -> anyhow::Result<Vec<Marker>> {
    generation::put_refusal(ctx, job).await?;
    let entry = wire::kv_key(job.kind, &job.key);
    let revision = purge::purge_entry(ctx, &entry).await?;
    purge::purge_events(ctx, job.kind, &job.key).await?;
    Publisher::new(&ctx.bus, job)
        .finish(wire::refused(attempt))
        .await?;
    Ok(vec![Marker { entry, revision }])
}

/// Serves a hidden answer again: its value goes back into the bucket (fenced on the row still
/// holding it, as a generation's), then its refusal is purged with a marker (returned).
async fn restore(ctx: &Ctx, job: &Job, attempt: i32) -> anyhow::Result<Vec<Marker>> {
    let Some(row) = claims::stored(&ctx.db, job).await? else {
        return Ok(Vec::new());
    };
    let put = match job.kind {
        Kind::Text => {
            generation::put_answer(ctx, job, attempt, &Text::stored_answer(job, row)?).await?
        }
        Kind::Image => {
            generation::put_answer(ctx, job, attempt, &Image::stored_answer(job, row)?).await?
        }
    };
    if !put {
        // Purged meanwhile: nothing to bring back.
        return Ok(Vec::new());
    }
    let entry = wire::refusal_kv_key(job.kind, &job.key);
    let revision = purge::purge_entry(ctx, &entry).await?;
    // The `refused` the hide left would end a reader (a refusal is final to it); with no
    // events, a reader that misses the bucket asks for a job, which tells the answer again.
    purge::purge_events(ctx, job.kind, &job.key).await?;
    Ok(vec![Marker { entry, revision }])
}
