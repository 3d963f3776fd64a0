//! The OpenAI-compatible simulator (`versus-sim`) as a process, with its control endpoints.

use serde_json::{Value, json};

use crate::{Proc, http_client};

/// The variable the workers read a fallback simulator's key from (its entries' `api_key_env`).
pub const FALLBACK_API_KEY_ENV: &str = "VERSUS_TEST_FALLBACK_API_KEY";

/// What a second simulator stands in for ([`crate::SystemBuilder::fallback_sim`]): an entry of
/// the workers' `VERSUS_FALLBACKS`, with a model of its own, so that what it made is told apart
/// from the primary's (`gpt-4o-mini`, `gpt-image-1`, `omni-moderation-latest` by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    Text,
    Image,
    Moderation,
}

impl Fallback {
    pub const ALL: [Fallback; 3] = [Fallback::Text, Fallback::Image, Fallback::Moderation];

    /// The entry's `kind`.
    pub fn kind(self) -> &'static str {
        match self {
            Fallback::Text => "text",
            Fallback::Image => "image",
            Fallback::Moderation => "moderation",
        }
    }

    /// The model the entry names: what answers it made are stored under.
    pub fn model(self) -> &'static str {
        match self {
            Fallback::Text => "fallback-chat",
            Fallback::Image => "fallback-image",
            Fallback::Moderation => "fallback-moderation",
        }
    }
}

/// A running `versus-sim` on a free port.
pub struct Sim {
    pub proc: Proc,
    /// `http://IP:PORT` (no `/v1`: see [`Sim::openai_base_url`]).
    pub url: String,
    http: reqwest::Client,
}

impl Sim {
    /// Starts versus-sim on 127.0.0.1:0 with `envs` (e.g. `VERSUS_SIM_TTFT_MS`) on top.
    pub async fn start(envs: &[(&str, String)]) -> Sim {
        let mut all = vec![("VERSUS_SIM_ADDR", "127.0.0.1:0".to_owned())];
        all.extend(envs.iter().map(|(key, value)| (*key, value.clone())));
        let proc = Proc::spawn("versus-sim", &all).await;
        Sim {
            url: proc.url.clone(),
            proc,
            http: http_client(),
        }
    }

    /// The value for `OPENAI_BASE_URL`: `{url}/v1`.
    pub fn openai_base_url(&self) -> String {
        format!("{}/v1", self.url)
    }

    /// `VERSUS_FALLBACKS` naming this simulator for each of `kinds`, in that order, each with
    /// its own model ([`Fallback::model`]) and its key in [`FALLBACK_API_KEY_ENV`].
    pub fn fallbacks(&self, kinds: &[Fallback]) -> String {
        let entries: Vec<Value> = kinds
            .iter()
            .map(|kind| {
                json!({
                    "kind": kind.kind(),
                    "base_url": self.openai_base_url(),
                    "model": kind.model(),
                    "api_key_env": FALLBACK_API_KEY_ENV,
                })
            })
            .collect();
        Value::Array(entries).to_string()
    }

    /// `GET /_sim/stats`: `{"chat_calls", "image_calls", "calls": [...], "chat_requests": [...]}`.
    pub async fn stats(&self) -> Value {
        let response = self.send(self.http.get(self.control("stats"))).await;
        response
            .json()
            .await
            .unwrap_or_else(|e| panic!("versus-sim stats are not JSON: {e}"))
    }

    /// The recorded calls of `kind` (`chat`, `image`, `moderation`), oldest first.
    pub async fn calls_of(&self, kind: &str) -> Vec<Value> {
        let stats = self.stats().await;
        stats["calls"]
            .as_array()
            .unwrap_or_else(|| panic!("versus-sim stats hold no calls: {stats}"))
            .iter()
            .filter(|c| c["kind"] == kind)
            .cloned()
            .collect()
    }

    /// The most recent chat requests (up to 32), oldest first, as the simulator received
    /// them: `{"at_ms", "model", "messages": [{"role", "content"}]}`.
    pub async fn chat_requests(&self) -> Vec<Value> {
        let stats = self.stats().await;
        stats["chat_requests"]
            .as_array()
            .unwrap_or_else(|| panic!("versus-sim stats hold no chat requests: {stats}"))
            .clone()
    }

    /// How many chat completions the simulator has served (or refused) since its last reset.
    pub async fn chat_calls(&self) -> u64 {
        counter(&self.stats().await, "chat_calls")
    }

    /// How many chat streams their client dropped while tokens still flowed.
    pub async fn chat_abandoned(&self) -> u64 {
        counter(&self.stats().await, "chat_abandoned")
    }

    /// How many image generations the simulator has served (or refused) since its last reset.
    pub async fn image_calls(&self) -> u64 {
        counter(&self.stats().await, "image_calls")
    }

    /// How many moderation checks the simulator has served (or refused) since its last reset.
    pub async fn moderation_calls(&self) -> u64 {
        counter(&self.stats().await, "moderation_calls")
    }

    /// How many calls of every kind (chat, image, moderation) it has had since its last reset.
    pub async fn upstream_calls(&self) -> u64 {
        let stats = self.stats().await;
        ["chat_calls", "image_calls", "moderation_calls"]
            .iter()
            .map(|name| counter(&stats, name))
            .sum()
    }

    /// `POST /_sim/config` with partial knobs, e.g. `json!({"ttft_ms": 500})`.
    pub async fn config(&self, knobs: Value) {
        self.send(self.http.post(self.control("config")).json(&knobs))
            .await;
    }

    /// `POST /_sim/faults`, e.g.
    /// `json!({"kind": "chat", "fault": {"type": "status", "status": 429}, "times": 1})`.
    /// Besides statuses: `cut`, `stall` (each `after_tokens`), `hang`; `finish` (an answer
    /// ended after `after_tokens` with `finish_reason` `reason`, `length` by default), and `say`
    /// (an answer that ends with `text`: a link, a term moderation flags).
    pub async fn fault(&self, fault: Value) {
        self.send(self.http.post(self.control("faults")).json(&fault))
            .await;
    }

    /// Makes every chat call fail with a 500 until [`Sim::clear_faults`].
    pub async fn fail_every_chat(&self) {
        self.fault(
            json!({"kind": "chat", "fault": {"type": "status", "status": 500}, "times": null}),
        )
        .await;
    }

    /// `DELETE /_sim/faults`.
    pub async fn clear_faults(&self) {
        self.send(self.http.delete(self.control("faults"))).await;
    }

    /// `POST /_sim/reset`: counters, faults and knobs back to the start.
    pub async fn reset(&self) {
        self.send(self.http.post(self.control("reset"))).await;
    }

    fn control(&self, what: &str) -> String {
        format!("{}/_sim/{what}", self.url)
    }

    /// Sends a control request; panics unless it succeeds.
    async fn send(&self, request: reqwest::RequestBuilder) -> reqwest::Response {
        let request = request
            .build()
            .unwrap_or_else(|e| panic!("build a versus-sim request: {e}"));
        let what = format!("{} {}", request.method(), request.url());
        let response = self
            .http
            .execute(request)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            panic!("{what}: {status}: {body}");
        }
        response
    }
}

fn counter(stats: &Value, name: &str) -> u64 {
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("versus-sim stats have no counter {name:?}: {stats}"))
}
