//! `GET /v1/admin/popular`: the most requested matchups, from the popularity the replicas
//! count, with whether each is answered.

use axum::{
    Json,
    extract::{Query, State, rejection::QueryRejection},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::backends::database;
use crate::{
    app::App,
    error::{ApiError, ErrorBody},
};

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PopularQuery {
    /// How many to list (1 to 1,000; values outside are clamped).
    #[param(default = 20)]
    limit: Option<i64>,
    /// Only those not answered yet: what a pre-warm batch would still pay for.
    #[serde(default)]
    #[param(default = false)]
    pending: bool,
}

/// The most requested matchups, most requested first.
#[derive(Serialize, ToSchema)]
pub(crate) struct Popular {
    matchups: Vec<PopularMatchup>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct PopularMatchup {
    /// The text answer's key.
    key: String,
    a: String,
    b: String,
    /// Requests counted (hits and misses).
    requests: i64,
    /// Whether the answer is stored.
    cached: bool,
}

#[utoipa::path(
    get,
    path = "/v1/admin/popular",
    tag = "admin",
    security(("admin" = [])),
    params(PopularQuery),
    responses(
        (status = 200, description = "The most requested matchups.", body = Popular),
        (status = 400, description = "A malformed query.", body = ErrorBody),
        (status = 401, description = "No valid admin bearer token.", body = ErrorBody),
        (status = 503, description = "Postgres is unavailable (or `DATABASE_URL` is unset).", body = ErrorBody),
    ),
)]
pub(crate) async fn popular(
    State(app): State<App>,
    query: Result<Query<PopularQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
    let limit = q.limit.unwrap_or(20).clamp(1, 1000);
    let rows: Vec<(String, String, String, i64, bool)> = sqlx::query_as(
        "SELECT p.key, p.a, p.b, p.requests, COALESCE(g.status = 'done', false)
         FROM popularity p
         LEFT JOIN generations g ON g.kind = 'text' AND g.key = p.key
         WHERE NOT $2 OR g.status IS DISTINCT FROM 'done'
         ORDER BY p.requests DESC, p.key
         LIMIT $1",
    )
    .bind(limit)
    .bind(q.pending)
    .fetch_all(app.db()?)
    .await
    .map_err(database)?;
    let matchups = rows
        .into_iter()
        .map(|(key, a, b, requests, cached)| PopularMatchup {
            key,
            a,
            b,
            requests,
            cached,
        })
        .collect();
    Ok(Json(Popular { matchups }).into_response())
}
