//! Logs, Prometheus metrics, and the ops routes both binaries serve.

use std::io::Write;

use axum::{Router, extract::State, http::StatusCode, routing::get};
use metrics_exporter_prometheus::PrometheusBuilder;
pub use metrics_exporter_prometheus::PrometheusHandle;
use tracing_subscriber::EnvFilter;

use crate::bus::Bus;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logs() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Installs the process-wide metrics recorder and returns the handle that renders it.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    Ok(PrometheusBuilder::new().install_recorder()?)
}

/// Prints the one line scripts and tests wait for: the server is bound and ready.
pub fn announce(addr: std::net::SocketAddr) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on http://{addr}");
    let _ = out.flush();
}

/// `/healthz` (the process is alive), `/readyz` (NATS and its streams answer), `/metrics`.
pub fn ops_router(metrics: PrometheusHandle, bus: Bus) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(bus)
        .route("/metrics", get(move || async move { metrics.render() }))
}

async fn readyz(State(bus): State<Bus>) -> (StatusCode, &'static str) {
    if bus.ready().await {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "NATS or its streams are unreachable",
        )
    }
}
