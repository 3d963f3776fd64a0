//! versus-sim: an OpenAI-compatible upstream simulator for tests, benchmarks and offline dev.
//!
//! Module map:
//! - [`config`]: command-line arguments and the live knobs they seed.
//! - [`state`]: [`Sim`], the shared state (knobs, faults, stats, url-mode files).
//! - [`faults`]: injected faults and the FIFO list requests draw from.
//! - [`stats`]: the per-call record behind `/_sim/stats`.
//! - `openai`: OpenAI wire conventions (auth, error bodies, hashing, clocks).
//! - `answer`: deterministic fight-commentary text.
//! - `chat`: `POST /v1/chat/completions`; `stream`: its server-sent-event body.
//! - `picture`: seeded PNG drawing; `images`: `POST /v1/images/generations` and file downloads;
//!   `image_stream`: its server-sent-event body (partial images, then the completed one).
//! - [`moderation`]: `POST /v1/moderations`, flagging configured terms.
//! - `control`: the `/_sim/*` endpoints and `GET /v1/models`.

pub mod config;
pub mod faults;
pub mod moderation;
pub mod state;
pub mod stats;

mod answer;
mod chat;
mod control;
mod image_stream;
mod images;
mod openai;
mod picture;
mod stream;

use std::future::Future;
use std::io;

use axum::Router;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use tokio::net::{TcpListener, TcpSocket};

pub use config::{Args, ImageMode, ImageStream, Knobs};
pub use state::Sim;

/// Deep enough for a thousand clients connecting at once.
const LISTEN_BACKLOG: u32 = 4096;

/// All routes, upstream and control.
pub fn router(sim: Sim) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/images/generations", post(images::generations))
        .route("/v1/moderations", post(moderation::moderations))
        .route("/v1/models", get(control::models))
        .route("/_sim/files/{file}", get(images::file))
        .route("/_sim/stats", get(control::stats))
        .route(
            "/_sim/config",
            get(control::config).post(control::patch_config),
        )
        .route(
            "/_sim/faults",
            get(control::faults)
                .post(control::add_fault)
                .delete(control::clear_faults),
        )
        .route("/_sim/reset", post(control::reset))
        .with_state(sim)
}

/// Binds `addr` (host:port; port 0 picks one) with a large accept backlog.
pub async fn bind(addr: &str) -> io::Result<TcpListener> {
    let mut last_error = io::Error::new(io::ErrorKind::InvalidInput, "address resolved to nothing");
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

/// Serves on an already-bound listener until `shutdown` completes, then finishes in-flight
/// requests; stalled ones are released at that point rather than waited on.
pub async fn run(
    listener: TcpListener,
    sim: Sim,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    sim.set_local_addr(listener.local_addr()?);
    let stop = sim.stop_token();
    // Token chunks are small writes; Nagle would batch them and spoil the pacing.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(sim))
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.cancel();
        })
        .await
}
