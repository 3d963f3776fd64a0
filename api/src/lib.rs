//! The Versus edge: validates requests, answers hits from memory and the edge KV bucket, and
//! on a miss publishes a generation job and streams its events over SSE.
//!
//! - [`app`]: the state every handler shares ([`App`]) and the settings;
//! - [`nats`]: the hold on NATS, which serves before NATS is up and while it is down;
//! - [`ready`]: `/readyz`, from what this process knows, never a request to NATS;
//! - [`fights`]: the text routes of the public contract;
//! - [`images`]: the picture routes, and serving stored pictures from object storage;
//! - [`admin`]: operator routes (pre-warm batches, popularity, purge, reported answers);
//! - [`reports`]: visitors' reports of stored answers and pictures;
//! - [`workers`]: what this process asks a worker to write (purges, reports), and spreading
//!   what they withdrew to every replica;
//! - [`matchup`]: the names a request gives, and the key and job they derive;
//! - [`names`]: the known names, held in memory from the answers bucket, and their search;
//! - [`suggest`]: suggestions as visitors type (`GET /v1/names/suggest`), from those names;
//! - [`origin`]: refusing generations that browsers start for other sites;
//! - [`limits`]: per-client limits on new generations;
//! - [`conns`]: what one connection may hold: connections per client, slow bodies, clients
//!   that stop reading;
//! - [`quota`]: the daily quota per client, counted cluster-wide in a KV bucket;
//! - [`cache`]: the bounded in-memory caches in front of the KV bucket (hits);
//! - [`miss`]: the miss path: the lookup, the admission of a miss (a pure decision), and one
//!   events reader per key in this process, feeding every local waiter;
//! - [`sse`]: the SSE events clients see, with resume, and the responses that carry them;
//! - [`body`]: the JSON bodies of finished answers;
//! - [`http`]: conditional GETs (ETag, `Cache-Control`, 304);
//! - [`popularity`]: counting requests off the request path;
//! - [`page`]: the fight page at `/` and its assets, embedded in the binary;
//! - [`preview`]: the page's link-preview tags (Open Graph, Twitter card) for `?a=&b=`;
//! - [`traced`]: the span of each request, when traces are exported;
//! - [`error`]: the API's error type and its JSON shape;
//! - [`openapi`]: the OpenAPI 3.1 document of all of the above, at `/openapi.json`.

pub mod admin;
mod app;
pub mod body;
pub mod cache;
pub mod conns;
pub mod error;
pub mod fights;
mod http;
pub mod images;
pub mod limits;
mod matchup;
pub mod miss;
pub mod names;
pub mod nats;
pub mod openapi;
pub mod origin;
pub mod page;
pub mod popularity;
mod preview;
mod publish;
pub mod quota;
mod ready;
mod reports;
pub mod sse;
mod suggest;
mod traced;
mod workers;

use std::{convert::Infallible, net::SocketAddr, pin::pin, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{ConnectInfo, DefaultBodyLimit},
    routing::{get, post},
};
use hyper::{Request, body::Incoming, server::conn::http1, service::Service};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::{TowerToHyperService, TowerToHyperServiceFuture},
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use versus_shared::{bus::follow, tasks::Tasks, telemetry, wire};

pub use app::{App, Settings};

/// Every route of the API, with `app` as their state: the public contract in one table. The
/// operator's routes (`/metrics`, `/v1/admin/*`) are in the public router unless
/// `VERSUS_OPS_ADDR` is set; then they are in the second one, for that listener alone. Both
/// answer `/healthz` and `/readyz`.
pub fn routers(app: &App) -> (Router, Option<Router>) {
    let contract = Router::new()
        .route("/v1/fights/stream", get(fights::stream_fight))
        .route("/v1/fights", post(fights::create_fight))
        .route("/v1/fights/{key}", get(fights::get_fight))
        .route("/v1/images/stream", get(images::stream_image))
        .route("/v1/images", post(images::create_image))
        .route("/v1/images/{file}", get(images::serve_image))
        .route("/v1/images/partials/{file}", get(images::serve_partial))
        .route("/v1/names/suggest", get(suggest::suggest))
        .route("/v1/fights/{key}/report", post(reports::report_fight))
        .route("/v1/images/{key}/report", post(reports::report_image))
        .route("/openapi.json", get(openapi::serve))
        .route("/", get(preview::index))
        // The public routes read two names at most; the admin routes take whole batches.
        .layer(DefaultBodyLimit::max(matchup::BODY_LIMIT));
    let admin = admin::routes(app.clone());
    // `/healthz` answers as long as the process serves; `/readyz` from what it knows.
    let probes = || {
        telemetry::healthz_router().merge(
            Router::new()
                .route("/readyz", get(ready::readyz))
                .with_state(app.clone()),
        )
    };
    let metrics = telemetry::metrics_router(app.inner.metrics.clone(), app.inner.budget.clone());
    let finish = |routes: Router<App>| traced(routes, app).with_state(app.clone()).merge(probes());
    if app.inner.settings.ops_addr.is_some() {
        let public = finish(contract).merge(page::routes());
        (public, Some(finish(admin).merge(metrics)))
    } else {
        let public = finish(contract.merge(admin))
            .merge(page::routes())
            .merge(metrics);
        (public, None)
    }
}

/// `routes` inside a span each (see [`traced`]) when traces are exported; otherwise requests
/// take exactly the path they took before traces.
fn traced(routes: Router<App>, app: &App) -> Router<App> {
    if versus_shared::traces::enabled() {
        routes.route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            traced::request,
        ))
    } else {
        routes
    }
}

/// Serves `app` on `listener`, and its operator's routes on `ops` when `VERSUS_OPS_ADDR` gave
/// one, until the shutdown token of `tasks` fires. Nothing here waits for NATS: the probes
/// and memory hits are served at once, the rest once NATS answers (see [`nats::LazyBus`]).
pub async fn run(
    listener: TcpListener,
    ops: Option<TcpListener>,
    app: App,
    tasks: &Tasks,
) -> anyhow::Result<()> {
    let shutdown = tasks.shutdown().clone();
    let addr = listener.local_addr()?;
    let (public, ops_routes) = routers(&app);
    let ops = match (ops, ops_routes) {
        (Some(listener), Some(routes)) => {
            let ops_addr = listener.local_addr()?;
            telemetry::announce_ops(ops_addr);
            tracing::info!(%ops_addr, "the operator's routes (/metrics, /v1/admin/*) are served here only");
            Some((listener, routes))
        }
        _ => None,
    };
    let files = open_files(&app.inner.settings);
    telemetry::announce(addr);
    tracing::info!(%addr, "api ready");
    let serve_ops = async {
        if let Some((listener, routes)) = ops {
            serve(listener, routes, &app.inner.settings, files, tasks).await;
        }
    };
    tokio::join!(
        serve(listener, public, &app.inner.settings, files, tasks),
        serve_ops,
        app.inner.bus.probe(shutdown.clone()),
        app.inner.popularity.run(shutdown.clone()),
        apply_purges(&app, shutdown.clone()),
        forget_after_losses(&app, shutdown.clone()),
        follow_mirror_purges(&app, shutdown.clone()),
        app.inner.limits.housekeep(shutdown.clone()),
    );
    Ok(())
}

/// Raises the open-file limit (`conns::raise_open_files`) and says how many connections this
/// replica can then hold: the most connections its files leave room for.
fn open_files(settings: &Settings) -> usize {
    let Some(files) = conns::raise_open_files() else {
        return usize::MAX;
    };
    let room = files.connections();
    let cap = match settings.max_connections {
        0 => room,
        n => n.min(room),
    };
    tracing::info!(
        open_files_before = files.before,
        open_files = files.now,
        connections = cap,
        max_connections = settings.max_connections,
        "this replica holds up to {cap} connections at once"
    );
    room
}

/// Serves `router` on `listener` over HTTP/1.1 (with keep-alive) until `tasks` shut down.
/// At most `files` connections are open at once, whatever the settings say: each is a file.
///
/// Each connection is a task of `tasks`, so the process waits for it before it exits; at
/// shutdown it answers the request in progress, if any, and closes (live SSE streams end
/// themselves). A connection has `settings.header_timeout_secs` to send each request head
/// and `settings.body_timeout_secs` for its body (slow clients cannot hold it open), a
/// response waits `settings.slow_client_secs` at most for a client that reads nothing, and at
/// most `settings.max_connections` are open at once (`settings.client_max_connections` of
/// one client): at the cap, nothing more is accepted until one closes; past a client's own,
/// its new connection is closed at once.
async fn serve(
    listener: TcpListener,
    router: Router,
    settings: &Settings,
    files: usize,
    tasks: &Tasks,
) {
    let shutdown = tasks.shutdown();
    // Finished once, as `into_make_service` does: served as is, axum would rebuild its route
    // table for every connection (about 14 KiB each, kept for the connection's life). Each
    // connection then clones it, which is cheap.
    let service = TowerToHyperService::new(router.with_state(()));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(settings.header_timeout_secs.max(1)))
        .max_buf_size(HTTP_BUF_MAX);
    let seconds = |secs: u64| (secs > 0).then(|| Duration::from_secs(secs));
    let (body_timeout, slow_client) = (
        seconds(settings.body_timeout_secs),
        seconds(settings.slow_client_secs),
    );
    let per_client = conns::Conns::new(settings.client_max_connections);
    let cap = match settings.max_connections {
        0 => Semaphore::MAX_PERMITS,
        n => n.min(Semaphore::MAX_PERMITS),
    };
    // Each connection is an open file: at the cap the process can hold, new ones wait in the
    // listen backlog rather than fail to be accepted.
    let cap = cap.min(files);
    let slots = Arc::new(Semaphore::new(cap));
    loop {
        if slots.available_permits() == 0 {
            metrics::counter!("versus_connection_cap_reached_total").increment(1);
        }
        // A slot first, then a connection: at the cap, new ones wait in the listen backlog.
        let slot = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_closed) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    pause_after(error, shutdown).await;
                    continue;
                }
            },
        };
        // Past its client's cap, closed at once: the global slot goes back with it.
        let Some(held) = per_client.open(peer.ip()) else {
            metrics::counter!("versus_connections_refused_total", "reason" => "client_cap")
                .increment(1);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        let service = PeerService {
            router: service.clone(),
            peer,
            body_timeout,
        };
        let io = TokioIo::new(conns::Watched::new(stream, slow_client));
        let connection = http.serve_connection(io, service);
        // A token of the connection's own: waiting on the process's token itself would take
        // that token's lock each time any connection wakes up.
        let stop = shutdown.child_token();
        tasks.spawn(async move {
            let _slots = (slot, held);
            let mut connection = pin!(connection);
            let ended = tokio::select! {
                biased;
                ended = connection.as_mut() => ended,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

/// After a failed accept: a connection that went away before it was taken is nothing; any
/// other error (out of file descriptors, say) is logged and pauses accepting for a second, so
/// that a lasting one neither spins nor floods the log.
async fn pause_after(error: std::io::Error, shutdown: &CancellationToken) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "cannot accept a connection; retrying in a second");
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(ACCEPT_RETRY) => {}
    }
}

/// How long the listener rests after an accept failed for want of resources (descriptors,
/// memory): long enough for connections to close, short enough to be unseen.
const ACCEPT_RETRY: Duration = Duration::from_secs(1);

/// The most a connection buffers, each way: a request head larger than this is refused (431),
/// and a response's bytes are taken from its body only while fewer than this wait to be
/// written. Far above any request of the contract (two names of 1 KiB at most).
const HTTP_BUF_MAX: usize = 64 * 1024;

/// The router for one connection: every request carries the peer's address for the
/// `ConnectInfo<SocketAddr>` extractor, as `into_make_service_with_connect_info` would add it,
/// and a body that must arrive within `body_timeout` (see [`conns::TimedBody`]).
#[derive(Clone)]
struct PeerService {
    router: TowerToHyperService<Router>,
    peer: SocketAddr,
    body_timeout: Option<Duration>,
}

impl Service<Request<Incoming>> for PeerService {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = TowerToHyperServiceFuture<Router, Request<conns::TimedBody>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let mut request = request.map(|body| conns::TimedBody::new(body, self.body_timeout));
        request.extensions_mut().insert(ConnectInfo(self.peer));
        self.router.call(request)
    }
}

/// Applies every replica's purges to this one's memory, until `shutdown`.
async fn apply_purges(app: &App, shutdown: CancellationToken) {
    use futures::StreamExt;
    let taken = app
        .inner
        .purges
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let Some(mut purges) = taken else {
        return;
    };
    loop {
        let msg = tokio::select! {
            () = shutdown.cancelled() => return,
            msg = purges.next() => match msg { Some(m) => m, None => return },
        };
        match serde_json::from_slice::<wire::Purge>(&msg.payload) {
            Ok(purge) => app.forget(&purge),
            Err(e) => tracing::warn!(error = %e, "skipping an unreadable purge"),
        }
    }
}

/// Empties this replica's memory whenever purge notices may have been lost (a reconnect, or a
/// subscription that overflowed: `Bus::losses`), until `shutdown`: what it held is read again
/// from the bucket (or an edge's mirror), where the purges are, rather than served from memory
/// after a purge this replica never heard of.
async fn forget_after_losses(app: &App, shutdown: CancellationToken) {
    let Some(bus) = app.inner.bus.attached(&shutdown).await else {
        return;
    };
    let mut losses = bus.losses.clone();
    losses.mark_unchanged();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = losses.changed() => {
                if changed.is_err() {
                    return;
                }
                tracing::info!("purge notices may have been lost: memory is emptied, answers are read from the bucket again");
                app.forget_all();
            }
        }
    }
}

/// At an edge, applies the purges its mirror of the answers bucket receives (delete and purge
/// markers, which mirrors replicate) to this replica, until `shutdown`: each marker's revision
/// becomes its entry's floor (see `cache::Floors`), and its key leaves memory. The purge
/// notices above may come first, or never (they are lost while the leaf link is down): a purge
/// applies here once the mirror has it, so a purged answer cannot come back from the mirror,
/// nor survive a cut link in memory. A watch that breaks starts again after the last change it
/// gave, so no marker is missed meanwhile.
async fn follow_mirror_purges(app: &App, shutdown: CancellationToken) {
    use async_nats::jetstream::kv::Operation;
    if !app.inner.bus.at_edge() {
        return;
    }
    let Some(bus) = app.inner.bus.attached(&shutdown).await else {
        return;
    };
    let follow = follow::changes(
        &bus.nearest_answers,
        ">",
        follow::From::Next,
        "the mirror for purges",
        |entry| {
            // An alias's marker is the aliases' (`Aliases::follow`): it withdraws no answer.
            if entry.operation != Operation::Put && !versus_shared::aliases::is_entry(&entry.key) {
                forget_marker(app, entry.key, entry.revision);
            }
        },
    );
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = follow => {}
    }
}

/// Applies the marker of `entry` (`<kind>.<key>` or `refused.<kind>.<key>`) at `revision`.
fn forget_marker(app: &App, entry: String, revision: u64) {
    let Some(key) = entry
        .rsplit('.')
        .next()
        .and_then(versus_shared::key::Key::parse)
    else {
        return;
    };
    app.forget(&wire::Purge {
        keys: vec![key],
        markers: vec![wire::Marker { entry, revision }],
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn settings_are_well_formed() {
        use clap::CommandFactory;
        super::Settings::command().debug_assert();
    }
}
