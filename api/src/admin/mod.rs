//! Operator routes, behind `Authorization: Bearer $VERSUS_ADMIN_TOKEN` (at least 32 characters,
//! compared as SHA-256 digests in constant time): pre-warm batches, their progress, popularity,
//! today's spend against the budget, purging an answer everywhere, reported answers, and
//! aliases. With `VERSUS_OPS_ADDR`
//! set they are served on that listener alone.
//! These are the only routes that read Postgres; none of them is on the request path.
//!
//! - this module: the routes, and the middleware that lets only the operator through;
//! - [`token`]: the admin token, as the API keeps and checks it;
//! - [`prewarm`]: `POST /v1/admin/prewarm` and a batch's progress;
//! - [`popular`]: the most requested matchups;
//! - [`spend`]: today's spend by kind and model;
//! - [`purge`]: purging an answer everywhere;
//! - [`reports`]: the answers clients reported, and an operator's decision on one;
//! - [`aliases`]: names an operator declares to be another name;
//! - [`backends`]: Postgres and NATS as these routes use them (a failure is a 503).

pub(crate) mod aliases;
mod backends;
pub(crate) mod popular;
pub(crate) mod prewarm;
pub(crate) mod purge;
pub(crate) mod reports;
pub(crate) mod spend;
pub mod token;

// Also by its old name. The shared state should name `admin::token::AdminToken`, a leaf:
// through this module, `app` and the handlers, which all take `App`, would import each other.
pub use token::AdminToken;

use crate::{app::App, error::ApiError};
use axum::{
    Router,
    extract::{Request, State},
    http::header,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post, put},
};

pub fn routes(app: App) -> Router<App> {
    Router::new()
        .route("/v1/admin/prewarm", post(prewarm::prewarm))
        .route("/v1/admin/prewarm/{batch}", get(prewarm::batch_status))
        .route("/v1/admin/popular", get(popular::popular))
        .route("/v1/admin/spend", get(spend::spend))
        .route("/v1/admin/fights/{key}", delete(purge::purge))
        .route("/v1/admin/reports", get(reports::list))
        .route("/v1/admin/reports/{kind}/{key}", post(reports::settle))
        .route("/v1/admin/aliases", get(aliases::list))
        .route(
            "/v1/admin/aliases/{alias}",
            put(aliases::put).delete(aliases::delete),
        )
        .route_layer(middleware::from_fn_with_state(app, require_token))
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
