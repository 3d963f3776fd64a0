//! The `/_sim/*` control endpoints tests drive, and `GET /v1/models`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::config::{Knobs, KnobsPatch};
use crate::faults::{Fault, FaultRule};
use crate::openai;
use crate::state::Sim;
use crate::stats::Stats;

/// Models listed by `GET /v1/models`; requests may name any model, these are just advertised.
const MODELS: &[&str] = &["gpt-4o-mini", "gpt-4o", "gpt-image-1", "dall-e-3"];

pub async fn models() -> Json<Value> {
    let data: Vec<Value> = MODELS
        .iter()
        .map(|id| json!({ "id": id, "object": "model", "created": 1_700_000_000, "owned_by": "versus-sim" }))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

pub async fn stats(State(sim): State<Sim>) -> Json<Stats> {
    Json(sim.stats())
}

pub async fn config(State(sim): State<Sim>) -> Json<Knobs> {
    Json(sim.knobs())
}

pub async fn patch_config(State(sim): State<Sim>, Json(patch): Json<KnobsPatch>) -> Json<Knobs> {
    Json(sim.patch_knobs(&patch))
}

pub async fn faults(State(sim): State<Sim>) -> Json<Vec<FaultRule>> {
    Json(sim.faults())
}

/// Appends a fault; answers the whole list.
pub async fn add_fault(State(sim): State<Sim>, Json(rule): Json<FaultRule>) -> Response {
    if let Fault::Status { status, .. } = rule.fault
        && StatusCode::from_u16(status).is_err()
    {
        return openai::bad_request("Fault status must be a valid HTTP status (100-999).");
    }
    Json(sim.add_fault(rule)).into_response()
}

pub async fn clear_faults(State(sim): State<Sim>) -> StatusCode {
    sim.clear_faults();
    StatusCode::NO_CONTENT
}

/// Clears stats, faults and files and restores the start-up knobs; answers those knobs.
pub async fn reset(State(sim): State<Sim>) -> Json<Knobs> {
    sim.reset();
    Json(sim.knobs())
}
