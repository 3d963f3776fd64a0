//! `POST /v1/moderations`: one result per input, flagged when the input holds one of the
//! configured terms (`VERSUS_SIM_MODERATION_FLAGS`, `term=category,…`) as a whole word, in any
//! case. Every other category scores near zero, as OpenAI's do for harmless text.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::openai::{self, Reply};
use crate::state::Sim;
use crate::stats::{Call, CallKind};

/// The categories of OpenAI's `omni-moderation-latest`.
pub const CATEGORIES: &[&str] = &[
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

/// A term that flags an input, and the category it flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    pub term: String,
    pub category: String,
}

/// Reads `term=category,…`; an entry without `=` flags `hate`.
pub fn parse_flags(spec: &str) -> anyhow::Result<Vec<Flag>> {
    spec.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (term, category) = entry.split_once('=').unwrap_or((entry, "hate"));
            let category = category.trim();
            if !CATEGORIES.contains(&category) {
                anyhow::bail!("unknown moderation category `{category}` in `{entry}`");
            }
            Ok(Flag {
                term: term.trim().to_lowercase(),
                category: category.to_owned(),
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct ModerationRequest {
    #[serde(default)]
    model: Option<String>,
    input: Input,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

pub async fn moderations(State(sim): State<Sim>, headers: HeaderMap, body: Bytes) -> Response {
    let mut call = Call::arrived(CallKind::Moderation);
    call.prompt_sha256 = openai::sha256_hex(&body);
    let reply = answer(&sim, &headers, &body);
    openai::conclude(&sim, call, reply).await
}

fn answer(sim: &Sim, headers: &HeaderMap, body: &[u8]) -> Reply {
    if !openai::has_bearer(headers) {
        return Reply::Now(openai::unauthorized());
    }
    let request: ModerationRequest = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => {
            return Reply::Now(openai::bad_request(&format!(
                "Invalid moderation request: {e}"
            )));
        }
    };
    if let Some(fault) = sim.take_fault(CallKind::Moderation) {
        if let crate::faults::Fault::Status {
            status,
            retry_after_secs,
        } = fault
        {
            return Reply::Now(openai::fault_status(status, retry_after_secs));
        }
        return Reply::Hang;
    }
    let inputs = match request.input {
        Input::One(text) => vec![text],
        Input::Many(texts) => texts,
    };
    let flags = sim.moderation_flags();
    let results: Vec<Value> = inputs.iter().map(|text| result(&flags, text)).collect();
    Reply::Now(
        Json(json!({
            "id": format!("modr-sim{:012x}", sim.next_id()),
            "model": request.model.unwrap_or_else(|| "omni-moderation-latest".to_owned()),
            "results": results,
        }))
        .into_response(),
    )
}

/// The result for one input: which categories its words flag.
fn result(flags: &[Flag], text: &str) -> Value {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let hit: Vec<&str> = flags
        .iter()
        .filter(|f| {
            let term: Vec<&str> = f.term.split_whitespace().collect();
            !term.is_empty() && words.windows(term.len()).any(|w| w == term.as_slice())
        })
        .map(|f| f.category.as_str())
        .collect();
    let mut categories = Map::new();
    let mut scores = Map::new();
    for category in CATEGORIES {
        let flagged = hit.contains(category);
        categories.insert((*category).to_owned(), json!(flagged));
        scores.insert(
            (*category).to_owned(),
            json!(if flagged { 0.97 } else { 0.0001 }),
        );
    }
    json!({
        "flagged": !hit.is_empty(),
        "categories": categories,
        "category_scores": scores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_flags_its_category_as_a_whole_word_in_any_case() {
        let flags = parse_flags("villain=hate, cruel words=harassment").unwrap();
        let r = result(&flags, "The VILLAIN wins");
        assert_eq!(r["flagged"], json!(true));
        assert_eq!(r["categories"]["hate"], json!(true));
        assert_eq!(r["categories"]["violence"], json!(false));
        assert_eq!(result(&flags, "villainous")["flagged"], json!(false));
        assert_eq!(
            result(&flags, "some Cruel words here")["categories"]["harassment"],
            json!(true)
        );
        assert!(parse_flags("x=nonsense").is_err());
        assert_eq!(parse_flags("").unwrap(), vec![]);
    }
}
