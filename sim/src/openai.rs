//! OpenAI wire conventions shared by the endpoints: auth, error bodies, clocks and hashing.

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::state::Sim;
use crate::stats::Call;

/// True when the request carries `Authorization: Bearer <something>`; the key itself is not checked.
pub fn has_bearer(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|key| !key.trim().is_empty())
}

/// An error in OpenAI's shape: `{"error":{"message","type","param","code"}}`.
pub fn error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    let body = json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    (status, Json(body)).into_response()
}

/// A 400 `invalid_request_error` naming the parameter at fault, as OpenAI answers a parameter
/// it refuses (`code` is e.g. `unknown_parameter` or `invalid_value`).
pub fn invalid_param(param: &str, code: &str, message: &str) -> Response {
    let body = json!({
        "error": { "message": message, "type": "invalid_request_error", "param": param, "code": code }
    });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

pub fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        Some("invalid_api_key"),
        "Incorrect API key provided. You must send 'Authorization: Bearer <key>'.",
    )
}

pub fn bad_request(message: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        None,
        message,
    )
}

/// The response an injected `status` fault asks for.
pub fn fault_status(status: u16, retry_after_secs: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (kind, code) = if status == StatusCode::TOO_MANY_REQUESTS {
        ("rate_limit_error", Some("rate_limit_exceeded"))
    } else if status.is_server_error() {
        ("server_error", None)
    } else {
        ("invalid_request_error", None)
    };
    let message = format!("Simulated upstream failure ({status}).");
    let mut response = error(status, kind, code, &message);
    if let Some(secs) = retry_after_secs {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// What a request gets when the simulator shuts down while it waits.
pub fn shutting_down() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        None,
        "The simulator is shutting down.",
    )
}

pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn unix_ms() -> u64 {
    unix_us() / 1000
}

pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// SHA-256 of the parts, each followed by a NUL so that ("ab","c") and ("a","bc") differ.
pub fn sha256_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
        hasher.update([0u8]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(&hasher.finalize());
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// How an upstream handler ends: with a response, or by never answering (a stall).
pub enum Reply {
    Now(Response),
    /// Drop the connection: the body fails at once, so no complete response is sent.
    Cut,
    Hang,
}

/// Records the call with the status actually sent, then hands the response over.
/// A cut or a hang is recorded with status 0 (nothing answered); a hang then waits for
/// shutdown, or for the client to leave, which drops this future.
pub async fn conclude(sim: &Sim, mut call: Call, reply: Reply) -> Response {
    match reply {
        Reply::Now(response) => {
            call.status = response.status().as_u16();
            sim.record(call);
            response
        }
        Reply::Cut => {
            call.status = 0;
            sim.record(call);
            broken_body()
        }
        Reply::Hang => {
            call.status = 0;
            sim.record(call);
            sim.stopped().await;
            shutting_down()
        }
    }
}

/// A 200 whose body fails at once: the client sees the connection die mid-response.
fn broken_body() -> Response {
    let failure = futures::stream::once(async {
        Err::<Bytes, _>(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "simulated cut",
        ))
    });
    let mut response = Body::from_stream(failure).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Sleeps until `at`, unless the simulator stops first (then false).
pub async fn wait_until(sim: &Sim, at: tokio::time::Instant) -> bool {
    tokio::select! {
        () = tokio::time::sleep_until(at) => true,
        () = sim.stopped() => false,
    }
}
