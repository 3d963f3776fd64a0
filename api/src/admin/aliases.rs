//! `PUT` and `DELETE /v1/admin/aliases/{alias}`, `GET /v1/admin/aliases`: names an operator
//! declares to be another name (`Kakarot` is `Goku`; see `versus_shared::aliases`). The list
//! is read from Postgres here; a change is made by a worker (`versus.admin.aliases`), which
//! writes Postgres, then the answers bucket every replica and edge follows. This replica takes
//! the change at once, so that the operator's next request here sees it; the others within
//! the time their watch (at an edge, its mirror) takes, milliseconds.

use std::time::Duration;

use axum::{
    Json,
    extract::{FromRequest, Path, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use versus_shared::{
    aliases,
    key::Name,
    wire::{self, Alias, AliasChange, AliasReply},
};

use super::backends::database;
use crate::{
    app::App,
    error::{ApiError, ErrorBody},
    matchup::Name as NameSchema,
};

/// How long a worker may take to carry out a change.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Every alias, by its match key.
#[derive(Serialize, ToSchema)]
pub(crate) struct AliasList {
    aliases: Vec<AliasEntry>,
}

/// An alias and the name it stands for, as the operator wrote them.
#[derive(Serialize, ToSchema)]
pub(crate) struct AliasEntry {
    #[schema(example = "Kakarot")]
    alias: String,
    #[schema(example = "Goku")]
    canonical: String,
}

/// The name an alias stands for.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AliasBody {
    /// A valid opponent's name that is not itself an alias.
    #[schema(value_type = NameSchema, example = "Goku")]
    canonical: String,
}

#[utoipa::path(
    get,
    path = "/v1/admin/aliases",
    operation_id = "list_aliases",
    tag = "admin",
    security(("admin" = [])),
    responses(
        (status = 200, description = "Every alias.", body = AliasList),
        (status = 401, description = "No valid admin bearer token.", body = ErrorBody),
        (status = 503, description = "Postgres is unavailable (or `DATABASE_URL` is unset).", body = ErrorBody),
    ),
)]
pub(crate) async fn list(State(app): State<App>) -> Result<Response, ApiError> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT alias, canonical FROM aliases ORDER BY alias_match")
            .fetch_all(app.db()?)
            .await
            .map_err(database)?;
    let aliases = rows
        .into_iter()
        .map(|(alias, canonical)| AliasEntry { alias, canonical })
        .collect();
    Ok(Json(AliasList { aliases }).into_response())
}

#[utoipa::path(
    put,
    path = "/v1/admin/aliases/{alias}",
    operation_id = "put_alias",
    tag = "admin",
    security(("admin" = [])),
    params(("alias" = NameSchema, Path, description = "The alias: a valid opponent's name. Every spelling of the same match key is the same alias.")),
    request_body = AliasBody,
    responses(
        (status = 200, description = "Every request naming the alias is now answered as if it named the canonical name, here at once and at every replica and edge within seconds.", body = AliasEntry),
        (status = 400, description = "A name that is not valid, a body that is not `{\"canonical\": NAME}`, or an alias that would make a chain or a cycle (the canonical name is an alias, the alias is another's canonical name, or both are one name).", body = ErrorBody),
        (status = 401, description = "No valid admin bearer token.", body = ErrorBody),
        (status = 503, description = "No worker, Postgres or NATS is available: nothing was done.", body = ErrorBody),
    ),
)]
pub(crate) async fn put(
    State(app): State<App>,
    Path(alias): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let name = Name::parse("alias", Some(&alias))?;
    let Json(body) = Json::<AliasBody>::from_request(request, &())
        .await
        .map_err(|e| ApiError::InvalidBody(e.body_text()))?;
    let canonical = Name::parse("canonical", Some(&body.canonical))?;
    let alias = Alias {
        alias: name.display().to_owned(),
        canonical: canonical.display().to_owned(),
    };
    let reply = change(&app, &AliasChange::Put(alias.clone())).await?;
    if reply.found {
        // Here at once; the watch brings the same change a moment later.
        let value = serde_json::to_vec(&alias).map_err(|_| ApiError::Unavailable)?;
        app.inner
            .aliases
            .change(&aliases::entry(name.matched()), Some(&value));
    }
    Ok(Json(AliasEntry {
        alias: alias.alias,
        canonical: alias.canonical,
    })
    .into_response())
}

#[utoipa::path(
    delete,
    path = "/v1/admin/aliases/{alias}",
    operation_id = "delete_alias",
    tag = "admin",
    security(("admin" = [])),
    params(("alias" = NameSchema, Path, description = "The alias, in any spelling of its match key.")),
    responses(
        (status = 204, description = "Removed: the alias is a name of its own again, here at once and at every replica and edge within seconds."),
        (status = 400, description = "Not a valid name.", body = ErrorBody),
        (status = 401, description = "No valid admin bearer token.", body = ErrorBody),
        (status = 404, description = "No such alias.", body = ErrorBody),
        (status = 503, description = "No worker, Postgres or NATS is available: nothing was done.", body = ErrorBody),
    ),
)]
pub(crate) async fn delete(
    State(app): State<App>,
    Path(alias): Path<String>,
) -> Result<Response, ApiError> {
    let name = Name::parse("alias", Some(&alias))?;
    let reply = change(
        &app,
        &AliasChange::Delete {
            alias: name.display().to_owned(),
        },
    )
    .await?;
    app.inner
        .aliases
        .change(&aliases::entry(name.matched()), None);
    if !reply.found {
        return Err(ApiError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Has a worker carry out `change`: its error is a 503, its refusal (a chain, a cycle) a 400.
async fn change(app: &App, change: &AliasChange) -> Result<AliasReply, ApiError> {
    let reply: AliasReply = app
        .ask_worker(wire::ALIASES_SUBJECT, change, CHANGE_TIMEOUT)
        .await?;
    if let Some(error) = reply.error {
        tracing::warn!(error, "a change of alias failed");
        return Err(ApiError::Unavailable);
    }
    if let Some(why) = reply.refused {
        return Err(ApiError::InvalidBody(why));
    }
    Ok(reply)
}
