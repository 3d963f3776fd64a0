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

use crate::config::{ImageMode, ImageStream};
use crate::faults::Fault;
use crate::image_stream::{self, Ending, Schedule};
use crate::openai::{self, Reply};
use crate::picture;
use crate::state::Sim;
use crate::stats::{self, Call, CallKind};

const MAX_SIDE: u32 = 1024;
/// OpenAI's own limit on images per request.
const MAX_IMAGES: u32 = 10;
/// OpenAI's own limit on partial images per streamed request.
const MAX_PARTIAL_IMAGES: u32 = 3;

/// The fields the simulator reads; `response_format` is accepted and ignored (a whole answer's
/// shape follows the `image_mode` knob; a stream always carries `b64_json`), and so are
/// `model` and `output_format` but for the record (the images are always PNG).
#[derive(Deserialize)]
struct ImageRequest {
    prompt: String,
    model: Option<String>,
    n: Option<u32>,
    size: Option<String>,
    quality: Option<String>,
    background: Option<String>,
    output_format: Option<String>,
    stream: Option<bool>,
    partial_images: Option<u32>,
}

impl ImageRequest {
    fn record(&self, at_ms: u64) -> stats::ImageRequest {
        stats::ImageRequest {
            at_ms,
            model: self.model.clone(),
            prompt: stats::kept(&self.prompt).to_owned(),
            n: self.n,
            size: self.size.clone(),
            quality: self.quality.clone(),
            background: self.background.clone(),
            output_format: self.output_format.clone(),
            stream: self.stream == Some(true),
            partial_images: self.partial_images,
        }
    }

    /// `low`, `medium` or `high` as asked; anything else (`auto`, none) is drawn as `medium`.
    fn quality(&self) -> &'static str {
        match self.quality.as_deref() {
            Some("low") => "low",
            Some("high") => "high",
            _ => "medium",
        }
    }

    /// `transparent` when asked; anything else is `opaque`.
    fn background(&self) -> &'static str {
        match self.background.as_deref() {
            Some("transparent") => "transparent",
            _ => "opaque",
        }
    }
}

/// How a request is answered: whole, or streamed with this many partial images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Whole,
    Stream { partials: u32 },
}

/// Why a request's streaming parameters are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The `image_stream` knob is `refuse`: `stream` is an unknown parameter.
    UnknownStream,
    PartialImages,
    ManyImages,
}

impl Refusal {
    fn response(self) -> Response {
        match self {
            Refusal::UnknownStream => openai::invalid_param(
                "stream",
                "unknown_parameter",
                "Unknown parameter: 'stream'.",
            ),
            Refusal::PartialImages => openai::invalid_param(
                "partial_images",
                "invalid_value",
                "Invalid 'partial_images': expected an integer between 0 and 3.",
            ),
            Refusal::ManyImages => openai::invalid_param(
                "n",
                "invalid_value",
                "Invalid 'n': a streamed request makes one image.",
            ),
        }
    }
}

/// Reads `stream` and `partial_images` (absent means 0) under the `image_stream` knob; a
/// request that does not ask `"stream": true` is answered whole whatever its `partial_images`.
fn delivery(request: &ImageRequest, knob: ImageStream) -> Result<Delivery, Refusal> {
    if request.stream != Some(true) {
        return Ok(Delivery::Whole);
    }
    match knob {
        ImageStream::Refuse => Err(Refusal::UnknownStream),
        ImageStream::Ignore => Ok(Delivery::Whole),
        ImageStream::On => {
            let partials = request.partial_images.unwrap_or(0);
            if partials > MAX_PARTIAL_IMAGES {
                Err(Refusal::PartialImages)
            } else if request.n.unwrap_or(1) != 1 {
                Err(Refusal::ManyImages)
            } else {
                Ok(Delivery::Stream { partials })
            }
        }
    }
}

/// Output tokens of one image, as `gpt-image-1` bills a square image of each quality.
fn image_tokens(quality: &str) -> u64 {
    match quality {
        "low" => 272,
        "high" => 4160,
        _ => 1056,
    }
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
    call.image_request = Some(request.record(call.at_ms));
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
    // Refused before any fault is drawn, as an upstream checks parameters first: the fault
    // hits the request made again without `stream`.
    let delivery = match delivery(&request, knobs.image_stream) {
        Ok(delivery) => delivery,
        Err(refusal) => return Reply::Now(refusal.response()),
    };
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
        Some(Fault::Hang) => return Reply::Hang,
        // A stream's cut and stall count partial images; see `stream`.
        Some(Fault::Stall { .. } | Fault::Cut { .. }) if delivery != Delivery::Whole => {}
        Some(Fault::Stall { .. }) => return Reply::Hang,
        Some(Fault::Cut { .. }) => {
            if !openai::wait_until(sim, ready_at).await {
                return Reply::Now(openai::shutting_down());
            }
            return Reply::Cut;
        }
        // A picture has no finish reason and no words: it is drawn as usual.
        Some(Fault::Finish { .. } | Fault::Say { .. }) | None => {}
    }

    if let Delivery::Stream { partials } = delivery {
        let schedule = Schedule {
            start: started,
            delay: Duration::from_millis(knobs.image_latency_ms),
            partials,
        };
        return stream(sim, request, (width, height), schedule, fault, call).await;
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

/// Draws the image and the partial images to send, and answers them as server-sent events
/// timed by `schedule`; a `cut` or `stall` fault ends the stream after its count of partials.
async fn stream(
    sim: &Sim,
    request: ImageRequest,
    (width, height): (u32, u32),
    schedule: Schedule,
    fault: Option<Fault>,
    call: &mut Call,
) -> Reply {
    let (sent, ending) = match fault {
        Some(Fault::Cut { after_tokens }) => (after_tokens, Ending::Cut),
        Some(Fault::Stall { after_tokens }) => (after_tokens, Ending::Stall),
        _ => (u64::MAX, Ending::Complete),
    };
    let sent = u32::try_from(sent)
        .unwrap_or(u32::MAX)
        .min(schedule.partials);
    let quality = request.quality();
    let meta = image_stream::Meta {
        created_at: openai::unix_secs(),
        size: format!("{width}x{height}"),
        quality: quality.to_owned(),
        background: request.background().to_owned(),
        input_tokens: request.prompt.split_whitespace().count() as u64,
        image_tokens: image_tokens(quality),
    };
    // The completed image is the one a whole answer gives for the same prompt.
    let seed = openai::sha256_parts([request.prompt.as_bytes()]);
    let drawn = tokio::task::spawn_blocking(move || {
        let partials = (0..sent)
            .map(|i| picture::render_draft(&seed, width, height, i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok::<_, png::EncodingError>((partials, picture::render(&seed, width, height)?))
    })
    .await;
    let (partials, image) = match drawn {
        Ok(Ok(drawn)) => drawn,
        Ok(Err(e)) => return Reply::Now(server_error(&format!("PNG encoding failed: {e}"))),
        Err(e) => return Reply::Now(server_error(&format!("image task failed: {e}"))),
    };
    call.image_sha256 = Some(openai::sha256_hex(&image));
    Reply::Now(image_stream::respond(
        meta,
        partials,
        image,
        schedule,
        ending,
        sim.clone(),
    ))
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

    fn request(json: &str) -> ImageRequest {
        serde_json::from_str(json).expect("a valid image request")
    }

    #[test]
    fn stream_and_partial_images_choose_the_delivery() {
        let on = ImageStream::On;
        let cases = [
            (r#"{"prompt":"a"}"#, Delivery::Whole),
            (
                r#"{"prompt":"a","stream":false,"partial_images":2}"#,
                Delivery::Whole,
            ),
            (
                r#"{"prompt":"a","stream":true}"#,
                Delivery::Stream { partials: 0 },
            ),
            (
                r#"{"prompt":"a","stream":true,"partial_images":0}"#,
                Delivery::Stream { partials: 0 },
            ),
            (
                r#"{"prompt":"a","stream":true,"partial_images":3,"n":1}"#,
                Delivery::Stream { partials: 3 },
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(delivery(&request(json), on), Ok(expected), "{json}");
        }
        assert_eq!(
            delivery(
                &request(r#"{"prompt":"a","stream":true,"partial_images":4}"#),
                on
            ),
            Err(Refusal::PartialImages)
        );
        assert_eq!(
            delivery(&request(r#"{"prompt":"a","stream":true,"n":2}"#), on),
            Err(Refusal::ManyImages)
        );
        assert!(
            serde_json::from_str::<ImageRequest>(r#"{"prompt":"a","partial_images":-1}"#).is_err()
        );
    }

    #[test]
    fn the_knob_can_refuse_or_ignore_a_stream_but_not_a_whole_request() {
        let streamed = request(r#"{"prompt":"a","stream":true,"partial_images":2}"#);
        let whole = request(r#"{"prompt":"a"}"#);
        assert_eq!(
            delivery(&streamed, ImageStream::Refuse),
            Err(Refusal::UnknownStream)
        );
        assert_eq!(delivery(&whole, ImageStream::Refuse), Ok(Delivery::Whole));
        assert_eq!(
            delivery(&streamed, ImageStream::Ignore),
            Ok(Delivery::Whole)
        );
    }

    #[test]
    fn quality_and_background_default_to_medium_and_opaque() {
        let plain = request(r#"{"prompt":"a","quality":"auto"}"#);
        assert_eq!((plain.quality(), plain.background()), ("medium", "opaque"));
        let asked = request(r#"{"prompt":"a","quality":"high","background":"transparent"}"#);
        assert_eq!(
            (asked.quality(), asked.background()),
            ("high", "transparent")
        );
        assert_eq!(image_tokens(asked.quality()), 4160);
        let record = asked.record(5);
        assert!(!record.stream);
        assert_eq!(record.quality.as_deref(), Some("high"));
    }
}
