//! `POST /v1/admin/prewarm`: answering matchups ahead of demand, in the pre-warm lane, and
//! `GET /v1/admin/prewarm/{batch}`, a batch's progress.

use std::collections::HashMap;

use axum::{
    Json,
    extract::{Path, State, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use futures::{StreamExt, future::try_join_all, stream};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_path_to_error::Segment;
use utoipa::ToSchema;
use versus_shared::{
    key::Key,
    wire::{self, Job, Kind},
};

use super::backends::{database, nats};
use crate::{
    app::App,
    error::{ApiError, ErrorBody},
    matchup::Names,
};

/// The most matchups one batch may hold; larger files are sent in several batches.
pub const MAX_BATCH: usize = 10_000;

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

/// `POST /v1/admin/prewarm`'s body.
#[derive(Deserialize, ToSchema)]
pub(crate) struct PrewarmRequest {
    /// The matchups to answer ahead of demand (at most 10,000; duplicates count once).
    // Each entry is read as `Names` in turn, as it is validated: a bad entry, whether its shape
    // or one of its names is wrong, is named in the order the batch gives them.
    #[schema(max_items = 10_000, value_type = Vec<Names>)]
    matchups: Vec<Value>,
    /// Whether to draw each matchup's picture too.
    #[schema(default = false)]
    images: Option<bool>,
}

impl PrewarmRequest {
    /// Reads a batch's body, naming what is wrong: `images` that is not a boolean, `matchups`
    /// missing or not an array, or more than [`MAX_BATCH`] of them.
    fn parse(body: Value) -> Result<PrewarmRequest, ApiError> {
        let no_list =
            || ApiError::InvalidBody("`matchups` must be an array of {\"a\",\"b\"}".into());
        // An object only: serde reads a derived struct from an array too.
        let Value::Object(body) = body else {
            return Err(no_list());
        };
        // The members are read in order of name (a JSON object is a sorted map here), so
        // `images` is checked before `matchups`.
        let request: PrewarmRequest =
            serde_path_to_error::deserialize(body).map_err(|e| match e.path().iter().next() {
                Some(Segment::Map { key }) if key == "images" => {
                    ApiError::InvalidBody("`images` must be a boolean".into())
                }
                _ => no_list(),
            })?;
        if request.matchups.len() > MAX_BATCH {
            return Err(ApiError::InvalidBody(format!(
                "at most {MAX_BATCH} matchups per batch"
            )));
        }
        Ok(request)
    }
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
    let PrewarmRequest { matchups, images } = PrewarmRequest::parse(body)?;
    let images = images.unwrap_or(false);

    // Validate everything first: a bad entry rejects the whole batch, before any cost.
    let mut items: Vec<Item> = Vec::new();
    let mut index: HashMap<Key, usize> = HashMap::new();
    for (i, entry) in matchups.into_iter().enumerate() {
        let Value::Object(object) = entry else {
            return Err(ApiError::InvalidBody(format!(
                "matchups[{i}] must be an object {{\"a\",\"b\"}}"
            )));
        };
        let request = Names::from_object(object)
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
        // Nobody waits for a pre-warm job: it stays until a worker runs it.
        None,
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
