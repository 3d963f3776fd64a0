//! `DELETE /v1/admin/fights/{key}`: purging an answer and its picture everywhere, carried out
//! by a worker (this process may not write to the bus's streams and buckets).

use std::time::Duration;

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use versus_shared::{
    key::Key,
    wire::{self, Kind, Purge, PurgeReply, PurgeRequest, PurgeTarget},
};

use super::backends::{database, nats};
use crate::{
    app::App,
    error::{ApiError, ErrorBody},
    matchup::Names,
};

/// How long a worker may take to carry out a purge.
const PURGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Has a worker purge `request`'s answers (their rows, pictures, KV entries and events), then
/// applies the purge to this replica and every other one.
pub(crate) async fn purge_everywhere(app: &App, request: &PurgeRequest) -> Result<(), ApiError> {
    let reply: PurgeReply = app
        .ask_worker(wire::PURGE_REQUEST_SUBJECT, request, PURGE_TIMEOUT)
        .await?;
    if let Some(error) = reply.error {
        return Err(nats(&format!("the worker's purge failed: {error}")));
    }
    let purge = Purge {
        keys: request.answers.iter().map(|a| a.key.clone()).collect(),
        markers: reply.markers,
    };
    app.spread(&purge).await
}

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
            Ok(Some(cached)) => (cached.value.a.clone(), cached.value.b.clone()),
            Ok(None) => return Err(ApiError::NotFound),
            Err(e) => return Err(nats(&format!("reading the answer's names: {e:#}"))),
        },
    };
    let image = app.ask(&Names::new(a, b), Kind::Image)?.key;

    let request = PurgeRequest {
        answers: vec![
            PurgeTarget {
                kind: Kind::Text,
                key: key.clone(),
            },
            PurgeTarget {
                kind: Kind::Image,
                key: image.clone(),
            },
        ],
    };
    purge_everywhere(&app, &request).await?;
    tracing::info!(%key, "answer purged");
    Ok(StatusCode::NO_CONTENT.into_response())
}
