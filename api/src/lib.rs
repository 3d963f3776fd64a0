//! The Versus edge: validates requests, answers hits from memory and the edge KV bucket, and
//! on a miss publishes a generation job and streams its events over SSE.
//!
//! - [`app`]: the state every handler shares ([`App`]) and the settings;
//! - [`fights`]: the text routes of the public contract;
//! - [`images`]: the picture routes, and serving stored pictures from object storage;
//! - [`admin`]: operator routes (pre-warm batches, popularity, purge);
//! - [`matchup`]: the names a request gives, and the key and job they derive;
//! - [`origin`]: refusing generations that browsers start for other sites;
//! - [`limits`]: per-client limits on new generations;
//! - [`cache`]: the bounded in-memory caches in front of the KV bucket (hits);
//! - [`coalesce`]: the miss path: one events reader per key in this process, feeding every
//!   local waiter;
//! - [`sse`]: the SSE events clients see, with resume, and the responses that carry them;
//! - [`body`]: the JSON bodies of finished answers;
//! - [`http`]: conditional GETs (ETag, `Cache-Control`, 304);
//! - [`popularity`]: counting requests off the request path;
//! - [`page`]: the fight page at `/`, embedded in the binary;
//! - [`error`]: the API's error type and its JSON shape.

pub mod admin;
mod app;
pub mod body;
pub mod cache;
pub mod coalesce;
pub mod error;
pub mod fights;
mod http;
pub mod images;
pub mod limits;
mod matchup;
pub mod origin;
pub mod page;
pub mod popularity;
pub mod sse;

use axum::{
    Router,
    extract::DefaultBodyLimit,
    routing::{get, post},
};
use tokio_util::sync::CancellationToken;
use versus_shared::{tasks::Tasks, telemetry, wire};

pub use app::{App, Settings};

/// Every route of the API, with `app` as their state: the public contract in one table.
pub fn router(app: &App) -> Router {
    Router::new()
        .route("/v1/fights/stream", get(fights::stream_fight))
        .route("/v1/fights", post(fights::create_fight))
        .route("/v1/fights/{key}", get(fights::get_fight))
        .route("/v1/images/stream", get(images::stream_image))
        .route("/v1/images", post(images::create_image))
        .route("/v1/images/{file}", get(images::serve_image))
        // The public routes read two names at most; the admin routes take whole batches.
        .layer(DefaultBodyLimit::max(matchup::BODY_LIMIT))
        .merge(admin::routes(app.clone()))
        .with_state(app.clone())
        .merge(page::routes())
        .merge(telemetry::ops_router(
            app.inner.metrics.clone(),
            app.inner.bus.clone(),
            app.inner.budget.clone(),
        ))
}

/// Serves `app` on `listener` until the shutdown token of `tasks` fires.
pub async fn run(listener: tokio::net::TcpListener, app: App, tasks: &Tasks) -> anyhow::Result<()> {
    let shutdown = tasks.shutdown().clone();
    let addr = listener.local_addr()?;
    let purges = app.inner.bus.client.subscribe(wire::PURGE_SUBJECT).await?;
    // `into_make_service` finishes the router once; served as is, axum would rebuild its
    // route table for every connection (about 14 KiB each, kept for the connection's life).
    let server = axum::serve(
        listener,
        router(&app).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    telemetry::announce(addr);
    tracing::info!(%addr, "api ready");
    let (served, (), (), ()) = tokio::join!(
        server.into_future(),
        app.inner.popularity.run(shutdown.clone()),
        apply_purges(&app, purges, shutdown.clone()),
        app.inner.limits.housekeep(shutdown.clone()),
    );
    served?;
    Ok(())
}

/// Applies every replica's purges to this one's memory, until `shutdown`.
async fn apply_purges(app: &App, mut purges: async_nats::Subscriber, shutdown: CancellationToken) {
    use futures::StreamExt;
    loop {
        let msg = tokio::select! {
            () = shutdown.cancelled() => return,
            msg = purges.next() => match msg { Some(m) => m, None => return },
        };
        match serde_json::from_slice::<wire::Purge>(&msg.payload) {
            Ok(purge) => app.forget(&purge.keys),
            Err(e) => tracing::warn!(error = %e, "skipping an unreadable purge"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn settings_are_well_formed() {
        use clap::CommandFactory;
        super::Settings::command().debug_assert();
    }
}
