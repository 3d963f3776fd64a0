//! Operator routes, behind `Authorization: Bearer $VERSUS_ADMIN_TOKEN` (at least 32 characters,
//! compared as SHA-256 digests in constant time): pre-warm batches, their progress, popularity,
//! today's spend against the budget, and purging an answer everywhere. With `VERSUS_OPS_ADDR`
//! set they are served on that listener alone.
//! These are the only routes that read Postgres; none of them is on the request path.

use std::collections::HashMap;

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State, rejection::JsonRejection},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use futures::{StreamExt, future::try_join_all, stream};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::{IntoParams, ToSchema};
use versus_shared::{
    config::{ADMIN_TOKEN_MIN_CHARS, ADMIN_TOKEN_VAR, Secret, trimmed_admin_token},
    key::Key,
    wire::{self, Job, Kind, Purge, PurgeReply, PurgeRequest, Purged},
};

use crate::{
    app::App,
    error::{ApiError, ErrorBody},
    matchup::FightRequest,
};

/// The most matchups one batch may hold; larger files are sent in several batches.
pub const MAX_BATCH: usize = 10_000;

pub fn routes(app: App) -> Router<App> {
    Router::new()
        .route("/v1/admin/prewarm", post(prewarm))
        .route("/v1/admin/prewarm/{batch}", get(batch_status))
        .route("/v1/admin/popular", get(popular))
        .route("/v1/admin/spend", get(spend))
        .route("/v1/admin/fights/{key}", delete(purge))
        .route_layer(middleware::from_fn_with_state(app, require_token))
}

/// The admin token, kept as its SHA-256 digest: a request's token is compared digest to
/// digest, in constant time, so that neither the time taken nor the length compared says
/// anything about the token.
pub struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    /// The token `VERSUS_ADMIN_TOKEN` holds, trimmed as the CLI trims it: None when unset or
    /// empty (the admin routes refuse everything); an error, which never quotes it, when it
    /// is shorter than [`ADMIN_TOKEN_MIN_CHARS`].
    pub fn parse(raw: Option<&Secret>) -> anyhow::Result<Option<AdminToken>> {
        let Some(token) = raw
            .map(|t| trimmed_admin_token(t.expose()))
            .filter(|t| !t.is_empty())
        else {
            return Ok(None);
        };
        let chars = token.chars().count();
        anyhow::ensure!(
            chars >= ADMIN_TOKEN_MIN_CHARS,
            "{ADMIN_TOKEN_VAR} is too short ({chars} characters): it must hold at least \
             {ADMIN_TOKEN_MIN_CHARS} once trimmed, such as the 64 that `openssl rand -hex 32` \
             prints; or leave it unset to turn the admin routes off"
        );
        Ok(Some(AdminToken {
            digest: Sha256::digest(token.as_bytes()).into(),
        }))
    }

    /// Whether `given` (trimmed likewise) is the token.
    fn accepts(&self, given: &str) -> bool {
        let given = Sha256::digest(trimmed_admin_token(given).as_bytes());
        bool::from(given.as_slice().ct_eq(&self.digest))
    }
}

/// Lets a request through only with the admin token. The refusal is the same whether the
/// token is wrong, missing, or the admin routes are off, so that it tells a caller nothing.
async fn require_token(State(app): State<App>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let accepted = match (&app.inner.admin_token, given) {
        (Some(token), Some(given)) => token.accepts(given),
        _ => false,
    };
    if accepted {
        next.run(request).await
    } else {
        ApiError::Unauthorized("a valid admin bearer token is required").into_response()
    }
}

impl App {
    fn db(&self) -> Result<&sqlx::PgPool, ApiError> {
        self.inner.db.as_ref().ok_or(ApiError::Unavailable)
    }
}

/// One unique matchup of a batch, and what it still needs.
struct Item {
    text: Job,
    image: Option<Job>,
    copies: i32,
    text_cached: bool,
    image_cached: bool,
}

impl Item {
    fn cached(&self) -> bool {
        self.text_cached && (self.image.is_none() || self.image_cached)
    }
}

/// `POST /v1/admin/prewarm`'s body. The handler reads it by hand, so that a bad entry gets a
/// message naming it; this type only describes it.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct PrewarmRequest {
    /// The matchups to answer ahead of demand (at most 10,000; duplicates count once).
    #[schema(max_items = 10_000)]
    matchups: Vec<crate::openapi::Names>,
    /// Whether to draw each matchup's picture too.
    #[schema(default = false)]
    images: Option<bool>,
}

/// A batch accepted: what it holds and what had to be queued.
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchAccepted {
    /// The batch's id, for `GET /v1/admin/prewarm/{batch}`.
    #[schema(example = "0b6f8e2c9d4a4f1e8a7b3c2d1e0f9a8b")]
    batch: String,
    /// Matchups in the batch, duplicates included.
    total: i32,
    /// Of them, those already answered (and drawn, if asked): they cost nothing.
    already_cached: i32,
    /// Unique matchups queued for generation.
    queued: usize,
}

/// A batch's progress, in matchups (duplicates included).
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchStatus {
    total: i64,
    done: i64,
    failed: i64,
    pending: i64,
}

#[utoipa::path(
    post,
    path = "/v1/admin/prewarm",
    tag = "admin",
    security(("admin" = [])),
    request_body = PrewarmRequest,
    responses(
        (status = 202, description = "The batch is queued; uncached matchups are generated in the pre-warm lane.", body = BatchAccepted),
        (status = 400, description = "The body or one of its matchups is invalid: nothing is queued.", body = ErrorBody),
        (status = 401, description = "No valid admin bearer token.", body = ErrorBody),
        (status = 503, description = "Postgres or NATS is unavailable (or `DATABASE_URL` is unset).", body = ErrorBody),
    ),
)]
pub(crate) async fn prewarm(
    State(app): State<App>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::InvalidBody(e.body_text()))?;
    let images = match body.get("images") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::InvalidBody("`images` must be a boolean".into())),
    };
    let list = body
        .get("matchups")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            ApiError::InvalidBody("`matchups` must be an array of {\"a\",\"b\"}".into())
        })?;
    if list.len() > MAX_BATCH {
        return Err(ApiError::InvalidBody(format!(
            "at most {MAX_BATCH} matchups per batch"
        )));
    }

    // Validate everything first: a bad entry rejects the whole batch, before any cost.
    let mut items: Vec<Item> = Vec::new();
    let mut index: HashMap<Key, usize> = HashMap::new();
    for (i, entry) in list.iter().enumerate() {
        let object = entry.as_object().ok_or_else(|| {
            ApiError::InvalidBody(format!("matchups[{i}] must be an object {{\"a\",\"b\"}}"))
        })?;
        let request = FightRequest::from_json(object)
            .map_err(|e| ApiError::InvalidBody(format!("matchups[{i}]: {e}")))?;
        let text = app
            .ask(&request, Kind::Text)
            .map(|ask| app.job(ask))
            .map_err(|e| ApiError::InvalidBody(format!("matchups[{i}]: {e}")))?;
        if let Some(&at) = index.get(&text.key) {
            items[at].copies += 1;
            continue;
        }
        let image = images
            .then(|| app.ask(&request, Kind::Image).map(|ask| app.job(ask)))
            .transpose()?;
        index.insert(text.key.clone(), items.len());
        items.push(Item {
            text,
            image,
            copies: 1,
            text_cached: false,
            image_cached: false,
        });
    }

    // Without NATS nothing could be queued: refuse before anything is recorded.
    app.bus()?;
    // What is already cached costs nothing and gets no job.
    let wanted: Vec<(Key, Option<Key>)> = items
        .iter()
        .map(|i| (i.text.key.clone(), i.image.as_ref().map(|j| j.key.clone())))
        .collect();
    let cached: Vec<(bool, bool)> = stream::iter(wanted)
        .map(|(text, image)| {
            let app = app.clone();
            async move {
                let text = app.inner.answers.lookup(&text).await.is_some();
                let image = match image {
                    Some(image) => app.inner.images.lookup(&image).await.is_some(),
                    None => false,
                };
                (text, image)
            }
        })
        .buffered(64)
        .collect()
        .await;
    for (item, (text, image)) in items.iter_mut().zip(cached) {
        item.text_cached = text;
        item.image_cached = image;
    }

    let batch = uuid::Uuid::new_v4().simple().to_string();
    let total: i32 = items.iter().map(|i| i.copies).sum();
    let already_cached: i32 = items.iter().filter(|i| i.cached()).map(|i| i.copies).sum();
    record_batch(app.db()?, &batch, total, already_cached, images, &items).await?;

    let mut publishes = Vec::new();
    for item in items.iter().filter(|i| !i.cached()) {
        if !item.text_cached {
            publishes.push(publish(&app, &batch, item.text.clone()));
        }
        if let (Some(image), false) = (&item.image, item.image_cached) {
            publishes.push(publish(&app, &batch, image.clone()));
        }
    }
    try_join_all(publishes).await?;
    let queued = items.iter().filter(|i| !i.cached()).count();
    metrics::counter!("versus_prewarm_matchups_total").increment(total as u64);
    let accepted = BatchAccepted {
        batch,
        total,
        already_cached,
        queued,
    };
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

async fn record_batch(
    db: &sqlx::PgPool,
    batch: &str,
    total: i32,
    already_cached: i32,
    images: bool,
    items: &[Item],
) -> Result<(), ApiError> {
    let status = |done: bool| if done { "done" } else { "pending" };
    let keys: Vec<&str> = items.iter().map(|i| i.text.key.as_str()).collect();
    let copies: Vec<i32> = items.iter().map(|i| i.copies).collect();
    let text_status: Vec<&str> = items.iter().map(|i| status(i.text_cached)).collect();
    let image_keys: Vec<Option<&str>> = items
        .iter()
        .map(|i| i.image.as_ref().map(|j| j.key.as_str()))
        .collect();
    let image_status: Vec<Option<&str>> = items
        .iter()
        .map(|i| i.image.as_ref().map(|_| status(i.image_cached)))
        .collect();
    let mut tx = db.begin().await.map_err(database)?;
    sqlx::query(
        "INSERT INTO prewarm_batches (id, total, already_cached, images) VALUES ($1, $2, $3, $4)",
    )
    .bind(batch)
    .bind(total)
    .bind(already_cached)
    .bind(images)
    .execute(&mut *tx)
    .await
    .map_err(database)?;
    sqlx::query(
        "INSERT INTO prewarm_items (batch_id, key, copies, text_status, image_key, image_status)
         SELECT $1, * FROM UNNEST($2::text[], $3::int[], $4::text[], $5::text[], $6::text[])",
    )
    .bind(batch)
    .bind(&keys)
    .bind(&copies)
    .bind(&text_status)
    .bind(&image_keys)
    .bind(&image_status)
    .execute(&mut *tx)
    .await
    .map_err(database)?;
    tx.commit().await.map_err(database)
}

async fn publish(app: &App, batch: &str, job: Job) -> Result<(), ApiError> {
    let payload = serde_json::to_vec(&job).map_err(|_| ApiError::Unavailable)?;
    // Retried with the same message id through an outage or a leader election.
    crate::publish::job(
        &app.bus()?.js,
        wire::prewarm_subject(job.kind),
        payload.into(),
        wire::prewarm_msg_id(job.kind, &job.key, batch),
        false,
    )
    .await
    .map_err(|e| nats(&e))?;
    Ok(())
}

#[utoipa::path(
    get,
    path = "/v1/admin/prewarm/{batch}",
    tag = "admin",
    security(("admin" = [])),
    params(("batch" = String, Path, description = "The id `POST /v1/admin/prewarm` answered.")),
    responses(
        (status = 200, description = "The batch's progress.", body = BatchStatus),
        (status = 401, description = "No valid admin bearer token.", body = ErrorBody),
        (status = 404, description = "No such batch.", body = ErrorBody),
        (status = 503, description = "Postgres is unavailable (or `DATABASE_URL` is unset).", body = ErrorBody),
    ),
)]
pub(crate) async fn batch_status(
    State(app): State<App>,
    Path(batch): Path<String>,
) -> Result<Response, ApiError> {
    let row: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT
             COALESCE(SUM(i.copies) FILTER (WHERE i.text_status = 'done'
                 AND (i.image_status IS NULL OR i.image_status = 'done')), 0),
             COALESCE(SUM(i.copies) FILTER (WHERE i.text_status = 'failed'
                 OR i.image_status = 'failed'), 0),
             b.total::bigint
         FROM prewarm_batches b LEFT JOIN prewarm_items i ON i.batch_id = b.id
         WHERE b.id = $1 GROUP BY b.total",
    )
    .bind(&batch)
    .fetch_optional(app.db()?)
    .await
    .map_err(database)?;
    let (done, failed, total) = row.ok_or(ApiError::NotFound)?;
    Ok(Json(BatchStatus {
        total,
        done,
        failed,
        pending: total - done - failed,
    })
    .into_response())
}

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
    query: Result<Query<PopularQuery>, axum::extract::rejection::QueryRejection>,
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

/// What one model cost today, as `GET /v1/admin/spend` lists it.
#[derive(sqlx::FromRow, Serialize, ToSchema)]
pub(crate) struct ModelSpend {
    /// `text` or `image`.
    #[schema(example = "text")]
    kind: String,
    model: String,
    usd: f64,
    calls: i64,
    input_tokens: i64,
    output_tokens: i64,
    images: i64,
    /// Calls whose tokens were estimated (cut off before reporting usage).
    estimated_calls: i64,
}

/// Today's spend against the daily budget.
#[derive(Serialize, ToSchema)]
pub(crate) struct Spend {
    /// Today (UTC), `YYYY-MM-DD`.
    #[schema(example = "2026-11-30")]
    day: String,
    /// The daily budget in US dollars (0: no cap).
    budget_usd: f64,
    /// Spent today, in US dollars, cluster-wide.
    spent_usd: f64,
    /// Left today; null when there is no cap.
    remaining_usd: Option<f64>,
    /// Whether new generations are refused (`budget_exhausted`) until tomorrow.
    exhausted: bool,
    /// Seconds until the day ends (UTC) and the budget resets.
    resets_in_secs: u64,
    by_model: Vec<ModelSpend>,
}

/// Today's spend (UTC) by kind and model, from Postgres, against the daily budget.
#[utoipa::path(
    get,
    path = "/v1/admin/spend",
    tag = "admin",
    security(("admin" = [])),
    responses(
        (status = 200, description = "Today's spend by kind and model.", body = Spend),
        (status = 401, description = "No valid admin bearer token.", body = ErrorBody),
        (status = 503, description = "Postgres is unavailable (or `DATABASE_URL` is unset).", body = ErrorBody),
    ),
)]
pub(crate) async fn spend(State(app): State<App>) -> Result<Response, ApiError> {
    let day = versus_shared::budget::today();
    let models: Vec<ModelSpend> = sqlx::query_as(
        "SELECT kind, model, usd, calls, input_tokens, output_tokens, images,
                estimated AS estimated_calls
         FROM spend WHERE day = DATE '1970-01-01' + $1::int ORDER BY usd DESC, kind, model",
    )
    .bind(day as i32)
    .fetch_all(app.db()?)
    .await
    .map_err(database)?;
    let spent: f64 = models.iter().map(|m| m.usd).sum();
    let budget = app.inner.settings.budget.daily_budget_usd;
    Ok(Json(Spend {
        day: versus_shared::budget::date_of(day),
        budget_usd: budget,
        spent_usd: spent,
        remaining_usd: (budget > 0.0).then(|| (budget - spent).max(0.0)),
        exhausted: budget > 0.0 && spent >= budget,
        resets_in_secs: versus_shared::budget::until_tomorrow().as_secs(),
        by_model: models,
    })
    .into_response())
}

/// How long a worker may take to carry out a purge.
const PURGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Purges a text answer and its picture (or their refusals) from Postgres, the object store,
/// the edge KV bucket, the events stream, and the memory of every API replica. A worker does
/// the writing (this process may not write to the bus): without one, 503 and nothing is done.
#[utoipa::path(
    delete,
    path = "/v1/admin/fights/{key}",
    tag = "admin",
    security(("admin" = [])),
    params(("key" = String, Path, description = "The text answer's key; its picture goes too.")),
    responses(
        (status = 204, description = "Purged everywhere: asking again generates a new answer."),
        (status = 401, description = "No valid admin bearer token.", body = ErrorBody),
        (status = 404, description = "No such answer.", body = ErrorBody),
        (status = 503, description = "No worker, Postgres or NATS is available: nothing was purged.", body = ErrorBody),
    ),
)]
pub(crate) async fn purge(
    State(app): State<App>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let key = Key::parse(&key).ok_or(ApiError::NotFound)?;
    let db = app.db()?;
    app.bus()?;
    // A purged row is no answer (it keeps its names and attempt): once its purge finished
    // (`completed_at`), purging it again finds nothing; a purge that failed half-way is
    // carried out again.
    let row: Option<(String, String, bool)> = sqlx::query_as(
        "SELECT a, b, status = 'purged' AND completed_at IS NOT NULL
         FROM generations WHERE kind = 'text' AND key = $1",
    )
    .bind(key.as_str())
    .fetch_optional(db)
    .await
    .map_err(database)?;
    let (a, b) = match row {
        Some((_, _, true)) => return Err(ApiError::NotFound),
        Some((a, b, false)) => (a, b),
        // An answer in the bucket with no row (Postgres was restored, say): unless the bucket
        // cannot be read now, which is no reason to say there is no such answer.
        None => match app.inner.answers.get(&key).await {
            Ok(Some((cached, _))) => (cached.value.a.clone(), cached.value.b.clone()),
            Ok(None) => return Err(ApiError::NotFound),
            Err(e) => return Err(nats(&format!("reading the answer's names: {e:#}"))),
        },
    };
    let image = app.ask(&FightRequest::new(a, b), Kind::Image)?.key;

    let request = PurgeRequest {
        answers: vec![
            Purged {
                kind: Kind::Text,
                key: key.clone(),
            },
            Purged {
                kind: Kind::Image,
                key: image.clone(),
            },
        ],
    };
    let payload = serde_json::to_vec(&request).map_err(|_| ApiError::Unavailable)?;
    let bus = app.bus()?;
    // No worker up: "no responders" at once.
    let ask = async_nats::Request::new()
        .payload(payload.into())
        .timeout(Some(PURGE_TIMEOUT));
    let reply = bus
        .client
        .send_request(wire::PURGE_REQUEST_SUBJECT, ask)
        .await
        .map_err(|e| nats(&format!("asking a worker to purge: {e}")))?;
    let reply: PurgeReply = serde_json::from_slice(&reply.payload).map_err(|e| nats(&e))?;
    if let Some(error) = reply.error {
        return Err(nats(&format!("the worker's purge failed: {error}")));
    }
    // This replica first, then every other one, before the 204: each forgets the keys and
    // holds any entry older than the markers for stale, whatever its replica or mirror lags.
    let purge = Purge {
        keys: vec![key.clone(), image.clone()],
        markers: reply.markers,
    };
    app.forget(&purge);
    let broadcast = serde_json::to_vec(&purge).map_err(|_| ApiError::Unavailable)?;
    bus.client
        .publish(wire::PURGE_SUBJECT, broadcast.into())
        .await
        .map_err(|e| nats(&e))?;
    // Out of this process before the answer: replicas hear of it as soon as the server routes
    // it (a lost connection would have lost it; the replicas' own catch-up covers that).
    bus.client.flush().await.map_err(|e| nats(&e))?;
    tracing::info!(%key, "answer purged");
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn database(e: sqlx::Error) -> ApiError {
    tracing::warn!(error = %e, "admin query failed");
    ApiError::Unavailable
}

fn nats(e: &dyn std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "admin NATS operation failed");
    ApiError::Unavailable
}

#[cfg(test)]
mod tests {
    use super::{AdminToken, Secret};

    #[test]
    fn a_short_token_is_refused_with_its_variable_named_and_never_quoted() {
        let short = "  0123456789abcdef0123456789abcde \n";
        let error = AdminToken::parse(Some(&Secret::new(short))).err().unwrap();
        let text = format!("{error:#}");
        assert!(text.contains("VERSUS_ADMIN_TOKEN"), "{text}");
        assert!(!text.contains("0123456789abcdef"), "{text}");
        for off in [None, Some(Secret::new("")), Some(Secret::new(" \n"))] {
            assert!(AdminToken::parse(off.as_ref()).unwrap().is_none());
        }
    }

    #[test]
    fn the_token_is_trimmed_and_only_the_whole_of_it_is_accepted() {
        let token = "0123456789abcdef0123456789abcdef";
        let parsed = AdminToken::parse(Some(&Secret::new(format!(" {token}\n"))))
            .unwrap()
            .unwrap();
        assert!(parsed.accepts(token));
        assert!(parsed.accepts(&format!("{token} ")));
        for wrong in [
            "",
            &token[..31],
            &format!("{token}0"),
            &"f".repeat(32),
            &"f".repeat(500),
        ] {
            assert!(!parsed.accepts(wrong), "{wrong}");
        }
    }
}
