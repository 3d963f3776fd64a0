//! `GET /v1/names/suggest?q=`: suggestions as you type, from this replica's known names
//! ([`crate::names`]), with no request to NATS or Postgres.

use std::net::SocketAddr;

use axum::{
    Json,
    extract::{ConnectInfo, Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use versus_shared::key::Name;

use crate::{
    app::App,
    error::{ApiError, ErrorBody},
};

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct SuggestQuery {
    /// What the visitor has typed so far: a name or its beginning, by the rules of a name (1 to
    /// 100 characters after trimming). Case, accents, spaces and punctuation do not matter.
    #[param(value_type = crate::matchup::Name, example = "spid")]
    q: String,
}

/// Known names, best first.
#[derive(Serialize, ToSchema)]
pub(crate) struct Suggestions {
    /// Display names of stored answers' opponents (at most 10): the name itself, then names
    /// it begins, then names one typo away; each group by how many answers name it.
    #[schema(example = json!(["Spider-Man"]))]
    names: Vec<String>,
}

/// How long browsers and CDNs may keep a suggestion: the known names change slowly, every
/// keystroke asks again, and visitors type the same beginnings, so a minute saves most
/// requests; a name purged meanwhile is at worst suggested for that minute, and asking for it
/// then is a miss like any other.
const SUGGEST_CACHE_CONTROL: &str = "public, max-age=60";

/// Names of stored answers that match what was typed: by prefix and by small typos.
#[utoipa::path(
    get,
    path = "/v1/names/suggest",
    tag = "names",
    params(SuggestQuery),
    responses(
        (status = 200, description = "Up to 10 known names, best first (perhaps none).", body = Suggestions, headers(
            ("Cache-Control" = String, description = "`public, max-age=60`."),
        )),
        (status = 400, description = "`q` is missing, empty, over 100 characters, or not a name (`invalid_query`).", body = ErrorBody),
        (status = 429, description = "This client looked up more than it may (`VERSUS_CLIENT_LOOKUPS_PER_SECOND`).", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds to wait."))),
    ),
)]
pub(crate) async fn suggest(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<SuggestQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    app.look_up(app.client(peer, &headers))?;
    let Query(query) = query.map_err(|e| ApiError::InvalidQuery(e.body_text()))?;
    let name =
        Name::parse("q", Some(&query.q)).map_err(|e| ApiError::InvalidQuery(e.to_string()))?;
    let names = app.inner.names.suggest(name.matched());
    let mut response = Json(Suggestions { names }).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(SUGGEST_CACHE_CONTROL),
    );
    Ok(response)
}
