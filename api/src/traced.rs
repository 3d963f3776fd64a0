//! The span of every request to a route of the contract (`http.request`), added to the router
//! only when traces are exported: it continues a trusted proxy's trace (`traceparent`, from a
//! peer in `VERSUS_TRUSTED_PROXIES`; anyone else's starts a new one), and every span of the
//! request (its flight, the job it publishes) is its child.

use std::net::SocketAddr;

use axum::{
    extract::{ConnectInfo, MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};
use tracing::{Instrument, field::Empty};
use versus_shared::traces;

use crate::app::App;

/// Runs the request inside its `http.request` span, and records the response's status. The
/// span ends with the response head: an SSE body that streams on is the flight's span's
/// business.
pub(crate) async fn request(State(app): State<App>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str);
    let span = tracing::info_span!(
        "http.request",
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = route,
        http.response.status_code = Empty,
        otel.status_code = Empty,
    );
    let trusted = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|ConnectInfo(peer)| app.inner.limits.is_trusted(peer.ip().to_canonical()));
    traces::continue_http(&span, request.headers(), trusted);
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}
