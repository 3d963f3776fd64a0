//! `POST /v1/images/generations` and the `GET /_sim/files/{id}.png` downloads of url mode.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::config::ImageMode;
use crate::faults::Fault;
use crate::openai::{self, Reply};
use crate::picture;
use crate::state::Sim;
use crate::stats::{Call, CallKind};

const MAX_SIDE: u32 = 1024;
/// OpenAI's own limit on images per request.
const MAX_IMAGES: u32 = 10;

/// The fields the simulator reads; `model` and `response_format` are accepted and ignored
/// (the answer's shape follows the `image_mode` knob).
#[derive(Deserialize)]
struct ImageRequest {
    prompt: String,
    n: Option<u32>,
    size: Option<String>,
}

pub async fn generations(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    let mut pending = Pending {
        sim: sim.clone(),
        call: Call::arrived(CallKind::Image),
        concluded: false,
    };
    pending.call.prompt_sha256 = openai::sha256_hex(&body);
    let reply = generate(&sim, &headers, &body, &mut pending.call).await;
    pending.concluded = true;
    openai::conclude(&sim, pending.call.clone(), reply).await
}

/// An image call whose handler has not concluded: if its client leaves first (its own
/// timeout), the call is recorded all the same, with no status, as a real server that went on
/// drawing bills it.
struct Pending {
    sim: Sim,
    call: Call,
    concluded: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.concluded {
            let mut call = self.call.clone();
            call.status = 0;
            self.sim.record(call);
        }
    }
}

async fn generate(sim: &Sim, headers: &HeaderMap, body: &[u8], call: &mut Call) -> Reply {
    let started = Instant::now();
    if !openai::has_bearer(headers) {
        return Reply::Now(openai::unauthorized());
    }
    let request: ImageRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => return Reply::Now(openai::bad_request(&format!("Invalid image request: {e}"))),
    };
    call.prompt_sha256 = openai::sha256_hex(request.prompt.as_bytes());
    let knobs = sim.knobs();
    let Some((width, height)) = parse_size(request.size.as_deref(), knobs.image_size) else {
        return Reply::Now(openai::bad_request(
            "Invalid size: expected WIDTHxHEIGHT, e.g. 256x256.",
        ));
    };
    let n = request.n.unwrap_or(1);
    if !(1..=MAX_IMAGES).contains(&n) {
        return Reply::Now(openai::bad_request("Invalid n: must be between 1 and 10."));
    }
    let fault = sim.take_fault(CallKind::Image);
    call.fault = fault.as_ref().map(Fault::name);
    let ready_at = started + Duration::from_millis(knobs.image_latency_ms);
    match fault {
        Some(Fault::Status {
            status,
            retry_after_secs,
        }) => {
            return Reply::Now(openai::fault_status(status, retry_after_secs));
        }
        Some(Fault::Stall { .. } | Fault::Hang) => return Reply::Hang,
        Some(Fault::Cut { .. }) => {
            if !openai::wait_until(sim, ready_at).await {
                return Reply::Now(openai::shutting_down());
            }
            return Reply::Cut;
        }
        // A picture has no finish reason and no words: it is drawn as usual.
        Some(Fault::Finish { .. } | Fault::Say { .. }) | None => {}
    }

    // Drawing is CPU work; keep it off the async workers, and let it overlap the latency.
    let prompt = request.prompt;
    let drawn = tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|i| {
                let seed = if i == 0 {
                    openai::sha256_parts([prompt.as_bytes()])
                } else {
                    openai::sha256_parts([prompt.as_bytes(), i.to_string().as_bytes()])
                };
                picture::render(&seed, width, height)
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await;
    let images = match drawn {
        Ok(Ok(images)) => images,
        Ok(Err(e)) => return Reply::Now(server_error(&format!("PNG encoding failed: {e}"))),
        Err(e) => return Reply::Now(server_error(&format!("image task failed: {e}"))),
    };
    call.image_sha256 = images.first().map(|png| openai::sha256_hex(png));
    if !openai::wait_until(sim, ready_at).await {
        return Reply::Now(openai::shutting_down());
    }

    let base = base_url(sim, headers);
    let data: Vec<Value> = images
        .into_iter()
        .map(|png| match knobs.image_mode {
            ImageMode::B64Json => json!({ "b64_json": STANDARD.encode(&png) }),
            ImageMode::Url => {
                let id = openai::sha256_hex(&png);
                let url = format!("{base}/_sim/files/{id}.png");
                sim.store_file(id, Bytes::from(png));
                json!({ "url": url })
            }
        })
        .collect();
    Reply::Now(Json(json!({ "created": openai::unix_secs(), "data": data })).into_response())
}

/// `GET /_sim/files/{id}.png`
pub async fn file(State(sim): State<Sim>, Path(name): Path<String>) -> Response {
    let found = name.strip_suffix(".png").and_then(|id| sim.file(id));
    match found {
        Some(bytes) => {
            let mut response = bytes.into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
            response
        }
        None => openai::error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            None,
            "No such file.",
        ),
    }
}

/// `"WxH"` capped at 1024 a side; absent or `"auto"` means the `image_size` knob.
fn parse_size(size: Option<&str>, default_side: u32) -> Option<(u32, u32)> {
    let (w, h) = match size {
        None | Some("auto") => (default_side.max(1), default_side.max(1)),
        Some(s) => {
            let (w, h) = s.split_once(['x', 'X'])?;
            (w.trim().parse().ok()?, h.trim().parse().ok()?)
        }
    };
    (w > 0 && h > 0).then(|| (w.min(MAX_SIDE), h.min(MAX_SIDE)))
}

/// Where clients reached us: the Host header when present (it survives port mapping),
/// else the bound address.
fn base_url(sim: &Sim, headers: &HeaderMap) -> String {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (host, sim.local_addr()) {
        (Some(host), _) => format!("http://{host}"),
        (None, Some(addr)) => format!("http://{addr}"),
        (None, None) => "http://127.0.0.1".to_owned(),
    }
}

fn server_error(message: &str) -> Response {
    openai::error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        None,
        message,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_are_capped() {
        assert_eq!(parse_size(None, 256), Some((256, 256)));
        assert_eq!(parse_size(Some("auto"), 64), Some((64, 64)));
        assert_eq!(parse_size(Some("512x256"), 64), Some((512, 256)));
        assert_eq!(parse_size(Some("4096x4096"), 64), Some((1024, 1024)));
        assert_eq!(parse_size(Some("big"), 64), None);
        assert_eq!(parse_size(Some("0x10"), 64), None);
    }
}
