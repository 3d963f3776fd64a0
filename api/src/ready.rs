//! `/readyz`: whether this replica can serve hits, for a load balancer's health check. It reads
//! only what this process knows (the connection's state, the background JetStream probe, its
//! memory), and never asks NATS: however often it is checked, it costs nothing, and a NATS blip
//! does not pull a replica whose memory can still serve out of the load balancer.

use axum::{Json, extract::State, http::StatusCode};
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::App;

/// What this replica can serve, and what is degraded.
#[derive(Serialize, ToSchema)]
pub(crate) struct Readiness {
    /// Whether this replica can serve hits: NATS is connected and the streams were found, or
    /// its memory holds answers.
    ready: bool,
    /// The NATS connection: `connected`, `connecting` (not yet connected since the start), or
    /// `disconnected`.
    #[schema(example = "connected")]
    nats: &'static str,
    /// Whether the streams and buckets were found (`found`), or are still looked for
    /// (`waiting`: NATS is down, or no worker has declared them yet).
    #[schema(example = "found")]
    streams: &'static str,
    /// JetStream as a background probe found it a few seconds ago: `up`, `down`, or
    /// `unknown`. Not a reason to be unready by itself: see the `versus_jetstream_up` gauge.
    #[schema(example = "up")]
    jetstream: &'static str,
    /// At an edge, its leaf link to the hub: `up` or `down` (misses are refused while down).
    #[serde(skip_serializing_if = "Option::is_none")]
    hub_link: Option<&'static str>,
    /// How many answers this replica's memory holds: it serves them whatever NATS does.
    memory_answers: u64,
    /// Why it is not ready (only when it is not).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

/// Whether this replica can serve hits, for a load balancer's health check.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "This replica can serve hits: NATS is connected and its streams were found, or its memory holds answers. The body says what is degraded.", body = Readiness),
        (status = 503, description = "This replica can serve nothing yet: NATS is unreachable (or its streams were not found) and its memory holds no answers.", body = Readiness),
    ),
)]
pub(crate) async fn readyz(State(app): State<App>) -> (StatusCode, Json<Readiness>) {
    let bus = &app.inner.bus;
    let found = bus.get();
    let connected = bus.connected();
    let memory_answers = app.inner.answers.entries() as u64;
    let ready = (connected && found.is_some()) || memory_answers > 0;
    let reason = (!ready).then_some(if connected {
        "the streams and buckets were not found yet (has a worker declared them?), and no \
         answers are in memory"
    } else {
        "NATS is unreachable, and no answers are in memory"
    });
    let readiness = Readiness {
        ready,
        nats: bus.connection(),
        streams: if found.is_some() { "found" } else { "waiting" },
        jetstream: bus.jetstream().as_str(),
        hub_link: found
            .filter(|b| b.at_edge())
            .map(|b| if b.hub_up() { "up" } else { "down" }),
        memory_answers,
        reason,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness))
}
