//! `GET /v1/admin/reports` and `POST /v1/admin/reports/{kind}/{key}`: the answers clients
//! reported, and an operator's decision on one. The list is read from Postgres here; a
//! decision is written by a worker (`keep` and `refuse` on `versus.admin.reports`, `purge` as
//! `DELETE /v1/admin/fights/{key}` does), and what it withdrew or brought back is spread to
//! every replica.

use std::time::Duration;

use axum::{
    Json,
    extract::{FromRequest, Path, Query, Request, State, rejection::QueryRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use versus_shared::{
    key::Key,
    wire::{self, Action, Kind, PurgeRequest, PurgeTarget, ReportReply, Settle},
};

use super::{backends::database, purge::purge_everywhere};
use crate::{
    app::App,
    error::{ApiError, ErrorBody},
};

/// How long a worker may take to carry out a decision.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ReportsQuery {
    /// How many to list (1 to 1,000; values outside are clamped).
    #[param(default = 100)]
    limit: Option<i64>,
}

/// Reported answers: hidden ones first, then the most reported unsafe.
#[derive(Serialize, ToSchema)]
pub(crate) struct ReportList {
    reports: Vec<ReportedAnswer>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ReportedAnswer {
    /// `text` or `image`.
    kind: String,
    key: String,
    a: String,
    b: String,
    /// `open` (served), `hidden` (served as refused until an operator decides), `kept` (an
    /// operator kept it: reports no longer hide it) or `refused` (for good).
    state: String,
    /// Distinct clients' reports by reason.
    counts: ReasonCounts,
    /// The latest report, RFC 3339.
    last_at: String,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ReasonCounts {
    #[serde(rename = "unsafe")]
    unsafe_: i64,
    wrong: i64,
    poor: i64,
    other: i64,
}

#[utoipa::path(
    get,
    path = "/v1/admin/reports",
    tag = "admin",
    security(("admin" = [])),
    params(ReportsQuery),
    responses(
        (status = 200, description = "The reported answers.", body = ReportList),
        (status = 400, description = "A malformed query.", body = ErrorBody),
        (status = 401, description = "No valid admin bearer token.", body = ErrorBody),
        (status = 503, description = "Postgres is unavailable (or `DATABASE_URL` is unset).", body = ErrorBody),
    ),
)]
pub(crate) async fn list(
    State(app): State<App>,
    query: Result<Query<ReportsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    // Only the reports of each key's current answer: a purged one's were settled by the purge,
    // and a regenerated answer starts with none.
    type Row = (
        String,
        String,
        String,
        String,
        String,
        i64,
        i64,
        i64,
        i64,
        String,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "WITH counted AS (
             SELECT kind, key, attempt,
                    count(*) FILTER (WHERE reason = 'unsafe') AS unsafe,
                    count(*) FILTER (WHERE reason = 'wrong') AS wrong,
                    count(*) FILTER (WHERE reason = 'poor') AS poor,
                    count(*) FILTER (WHERE reason = 'other') AS other,
                    max(created_at) AS last_at
             FROM reports GROUP BY kind, key, attempt),
         listed AS (
             SELECT r.*, g.a, g.b,
                    CASE WHEN g.kept_attempt = g.attempt THEN 'kept'
                         WHEN g.status = 'refused'
                              AND (g.text IS NOT NULL OR g.image_path IS NOT NULL) THEN 'hidden'
                         WHEN g.status = 'refused' THEN 'refused'
                         ELSE 'open' END AS state
             FROM counted r
             JOIN generations g ON g.kind = r.kind AND g.key = r.key AND g.attempt = r.attempt
             WHERE g.status IN ('done', 'refused'))
         SELECT kind, key, a, b, state, unsafe, wrong, poor, other,
                to_char(last_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
         FROM listed
         ORDER BY state = 'hidden' DESC, unsafe DESC, last_at DESC, key
         LIMIT $1",
    )
    .bind(limit)
    .fetch_all(app.db()?)
    .await
    .map_err(database)?;
    let reports = rows
        .into_iter()
        .map(
            |(kind, key, a, b, state, unsafe_, wrong, poor, other, last_at)| ReportedAnswer {
                kind,
                key,
                a,
                b,
                state,
                counts: ReasonCounts {
                    unsafe_,
                    wrong,
                    poor,
                    other,
                },
                last_at,
            },
        )
        .collect();
    Ok(Json(ReportList { reports }).into_response())
}

/// An operator's decision.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Decision {
    /// `keep` (serve it, and let no report hide it again), `purge` (as
    /// `DELETE /v1/admin/fights/{key}`: the next request generates anew) or `refuse` (drop it
    /// and refuse the matchup for good).
    #[schema(schema_with = action_schema, example = "keep")]
    action: Action,
}

fn action_schema() -> utoipa::openapi::schema::Object {
    crate::error::one_of(&Action::ALL.map(Action::as_str))
}

#[utoipa::path(
    post,
    path = "/v1/admin/reports/{kind}/{key}",
    tag = "admin",
    security(("admin" = [])),
    params(
        ("kind" = String, Path, description = "`text` or `image`."),
        ("key" = String, Path, description = "The reported answer's key."),
    ),
    request_body = Decision,
    responses(
        (status = 204, description = "Carried out everywhere."),
        (status = 400, description = "The body is not `{\"action\": \"keep\" | \"purge\" | \"refuse\"}`.", body = ErrorBody),
        (status = 401, description = "No valid admin bearer token.", body = ErrorBody),
        (status = 404, description = "No reported answer (a `keep` of one refused for good: nothing to bring back).", body = ErrorBody),
        (status = 503, description = "No worker, Postgres or NATS is available: nothing was done.", body = ErrorBody),
    ),
)]
pub(crate) async fn settle(
    State(app): State<App>,
    Path((kind, key)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let kind = Kind::parse(&kind).ok_or(ApiError::NotFound)?;
    let key = Key::parse(&key).ok_or(ApiError::NotFound)?;
    let Json(decision) = Json::<Decision>::from_request(request, &())
        .await
        .map_err(|e| ApiError::InvalidBody(e.body_text()))?;
    if decision.action == Action::Purge {
        let reported: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT FROM reports r JOIN generations g USING (kind, key, attempt)
                            WHERE r.kind = $1 AND r.key = $2 AND g.status IN ('done', 'refused'))",
        )
        .bind(kind.as_str())
        .bind(key.as_str())
        .fetch_one(app.db()?)
        .await
        .map_err(database)?;
        if !reported {
            return Err(ApiError::NotFound);
        }
        let request = PurgeRequest {
            answers: vec![PurgeTarget { kind, key }],
        };
        purge_everywhere(&app, &request).await?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let settle = Settle {
        kind,
        key: key.clone(),
        action: decision.action,
    };
    let reply: ReportReply = app
        .ask_worker(wire::SETTLE_SUBJECT, &settle, SETTLE_TIMEOUT)
        .await?;
    app.carried_out(wire::SETTLE_SUBJECT, key, reply).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
