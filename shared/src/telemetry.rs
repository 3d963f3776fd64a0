//! Logs (and the traces' layer beside them), Prometheus metrics, and the ops routes both
//! binaries serve (the API answers `/readyz` itself: see `versus-api`'s `ready`).

use std::{io::Write, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, routing::get};
pub use metrics_exporter_prometheus::PrometheusHandle;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, filter_fn},
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

use crate::{
    budget::Budget,
    bus::Bus,
    traces::{self, Traces},
};

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); and, when the standard
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, traces exported over OTLP, as `service` unless
/// `OTEL_SERVICE_NAME` says otherwise (see [`traces`]). Shut the returned [`Traces`] down at
/// exit. Runs on the tokio runtime.
///
/// Our own spans are for traces: log lines never show them, so the logs are the same whether
/// traces are exported or not, and a span nobody exports is disabled where it is made.
pub fn init(service: &'static str) -> anyhow::Result<Traces> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let not_our_span = filter_fn(|meta| meta.is_event() || !traces::is_ours(meta.target()));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter.and(not_our_span));
    let (exported, traces) = traces::layer(service)?;
    tracing_subscriber::registry()
        .with(logs)
        .with(exported)
        .init();
    Ok(traces)
}

/// Buckets of every `*_seconds` histogram: from half a millisecond, where the stages of a
/// miss live, to a minute, where a picture's upstream call may.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Installs the process-wide metrics recorder and returns the handle that renders it.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)?
        .install_recorder()?)
}

/// Prints the one line scripts and tests wait for: the server is bound and ready.
pub fn announce(addr: std::net::SocketAddr) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on http://{addr}");
    let _ = out.flush();
}

/// Prints where the operator's routes are served when they have a listener of their own (the
/// API's `VERSUS_OPS_ADDR`); before [`announce`], so that whoever waits for that line has
/// this one too.
pub fn announce_ops(addr: std::net::SocketAddr) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ops listening on http://{addr}");
    let _ = out.flush();
}

/// `/healthz`: answers 200 as long as the process serves.
pub fn healthz_router() -> Router {
    Router::new().route("/healthz", get(|| async { "ok" }))
}

/// `/metrics`: the recorder's metrics, then the budget's.
pub fn metrics_router(metrics: PrometheusHandle, budget: Arc<Budget>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || async move {
            let mut out = metrics.render();
            budget.render_metrics(&mut out);
            out
        }),
    )
}

/// A worker's ops routes: `/healthz` (the process is alive), `/readyz` (NATS and its streams
/// answer, as found at most a second ago) and `/metrics`.
pub fn ops_router(metrics: PrometheusHandle, bus: Bus, budget: Arc<Budget>) -> Router {
    let readiness = Arc::new(Readiness {
        bus,
        last: tokio::sync::Mutex::new(None),
    });
    Router::new()
        .route("/readyz", get(readyz))
        .with_state(readiness)
        .merge(healthz_router())
        .merge(metrics_router(metrics, budget))
}

/// How long a readiness probe's answer is reused: a probe is two JetStream requests, which a
/// load balancer's checks, however frequent, must not multiply.
const READINESS_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a probe may take: a JetStream that answers later than this is not ready.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

struct Readiness {
    bus: Bus,
    /// When the last probe was made, and what it found. Behind an async lock, so that the
    /// checks that come while a probe is out wait for its answer rather than make their own.
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, bool)>>,
}

async fn readyz(State(readiness): State<Arc<Readiness>>) -> (StatusCode, &'static str) {
    let ready = {
        let mut last = readiness.last.lock().await;
        match *last {
            Some((at, ready)) if at.elapsed() < READINESS_FOR => ready,
            _ => {
                let ready = tokio::time::timeout(PROBE_TIMEOUT, readiness.bus.ready())
                    .await
                    .unwrap_or(false);
                *last = Some((tokio::time::Instant::now(), ready));
                ready
            }
        }
    };
    if ready {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "NATS or its streams are unreachable",
        )
    }
}
