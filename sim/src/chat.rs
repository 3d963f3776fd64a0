//! `POST /v1/chat/completions`: parses the request, applies faults, answers whole or streamed.

use std::borrow::Cow;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::answer::Answer;
use crate::faults::Fault;
use crate::openai::{self, Reply};
use crate::state::Sim;
use crate::stats::{self, Call, CallKind, ChatMessage, Usage};
use crate::stream::{self, Ending, Meta, Pace};

/// Keeps a mistyped knob from asking for gigabytes of text.
const MAX_ANSWER_TOKENS: u64 = 100_000;

/// The fields the simulator reads; anything else OpenAI accepts is ignored.
#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

pub async fn completions(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    let mut call = Call::arrived(CallKind::Chat);
    // Until the body parses, the raw body is the best fingerprint of the prompt.
    call.prompt_sha256 = openai::sha256_hex(&body);
    let reply = answer(&sim, &headers, &body, &mut call).await;
    openai::conclude(&sim, call, reply).await
}

async fn answer(sim: &Sim, headers: &HeaderMap, body: &[u8], call: &mut Call) -> Reply {
    if !openai::has_bearer(headers) {
        return Reply::Now(openai::unauthorized());
    }
    let request: ChatRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => {
            return Reply::Now(openai::bad_request(&format!("Invalid chat request: {e}")));
        }
    };
    let contents: Vec<Cow<'_, str>> = request
        .messages
        .iter()
        .map(|m| text_of(&m.content))
        .collect();
    let seed = openai::sha256_parts(
        std::iter::once(request.model.as_bytes()).chain(contents.iter().map(|c| c.as_bytes())),
    );
    call.prompt_sha256 = hex::encode(seed);
    call.request = Some(stats::ChatRequest {
        at_ms: call.at_ms,
        model: request.model.clone(),
        messages: request
            .messages
            .iter()
            .zip(&contents)
            .map(|(m, content)| ChatMessage::new(&m.role, content))
            .collect(),
    });
    let knobs = sim.knobs();
    let pace = Pace::from_knobs(&knobs);
    let fault = sim.take_fault(CallKind::Chat);
    call.fault = fault.as_ref().map(Fault::name);

    let cap = request
        .max_completion_tokens
        .or(request.max_tokens)
        .unwrap_or(u64::MAX);
    let tokens = knobs.answer_tokens.min(cap).min(MAX_ANSWER_TOKENS);
    let mut answer = Answer::generate(&seed, to_usize(tokens));
    if let Some(Fault::Say { text }) = &fault {
        answer.say(text);
    }
    let meta = Meta {
        id: format!("chatcmpl-sim{:012x}", sim.next_id()),
        created: openai::unix_secs(),
        model: request.model,
        prompt_tokens: contents.iter().map(|c| c.split_whitespace().count()).sum(),
    };

    if let Some(Fault::Status {
        status,
        retry_after_secs,
    }) = fault
    {
        return Reply::Now(openai::fault_status(status, retry_after_secs));
    }
    if fault == Some(Fault::Hang) {
        return Reply::Hang;
    }
    // How many tokens the answer runs to, and why it ends there, when it ends normally.
    let (finished, reason) = match &fault {
        Some(Fault::Finish {
            reason,
            after_tokens,
        }) => (to_usize(*after_tokens).min(answer.len()), reason.clone()),
        _ => (answer.len(), "stop".to_owned()),
    };
    // What the answer reports, if it runs to its end.
    let usage = Usage {
        prompt_tokens: meta.prompt_tokens as u64,
        completion_tokens: finished as u64,
    };
    if request.stream == Some(true) {
        let include_usage = request.stream_options.and_then(|o| o.include_usage) == Some(true);
        let (limit, ending) = match fault {
            Some(Fault::Cut { after_tokens }) => (to_usize(after_tokens), Ending::Cut),
            Some(Fault::Stall { after_tokens }) => (to_usize(after_tokens), Ending::Stall),
            _ => (
                finished,
                Ending::Finish {
                    include_usage,
                    reason,
                },
            ),
        };
        if include_usage && matches!(ending, Ending::Finish { .. }) {
            call.usage = Some(usage);
        }
        return Reply::Now(stream::respond(
            meta,
            answer,
            limit,
            pace,
            ending,
            sim.clone(),
        ));
    }
    match fault {
        Some(Fault::Stall { .. }) => Reply::Hang,
        Some(Fault::Cut { .. }) => {
            if !openai::wait_until(sim, pace.deadline(0)).await {
                return Reply::Now(openai::shutting_down());
            }
            Reply::Cut
        }
        _ => {
            call.usage = Some(usage);
            // A whole answer arrives when its last token would have been streamed.
            if !openai::wait_until(sim, pace.deadline(finished.saturating_sub(1))).await {
                return Reply::Now(openai::shutting_down());
            }
            Reply::Now(Json(whole(&meta, &answer, finished, &reason)).into_response())
        }
    }
}

/// The whole completion of `answer`'s first `tokens` tokens, ended for `reason`.
fn whole(meta: &Meta, answer: &Answer, tokens: usize, reason: &str) -> Value {
    json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": answer.text_to(tokens), "refusal": null },
            "logprobs": null,
            "finish_reason": reason,
        }],
        "usage": stream::usage(meta.prompt_tokens, tokens),
    })
}

/// Message content as text: a plain string, or the text parts of a content array.
fn text_of(content: &Value) -> Cow<'_, str> {
    match content {
        Value::String(s) => Cow::Borrowed(s),
        Value::Array(parts) => Cow::Owned(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        _ => Cow::Borrowed(""),
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}
