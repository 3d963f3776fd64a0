//! The simulator's control routes (`/_sim/reset`, `/_sim/config`, `/_sim/stats`,
//! `/_sim/faults`).

use anyhow::Context;
use serde_json::{Value, json};

/// `versus-bench sim`: reset the simulator and set its pace.
#[derive(clap::Args)]
pub struct Args {
    /// The simulator's base URL (http://host:port).
    #[arg(long)]
    pub sim: String,
    /// Milliseconds to the first token.
    #[arg(long)]
    pub ttft_ms: u64,
    /// Tokens per second after the first; 0 sends them all at once.
    #[arg(long)]
    pub tokens_per_sec: u64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let sim = Sim::new(&args.sim)?;
    sim.reset_with(args.ttft_ms, args.tokens_per_sec).await
}

/// A handle on the simulator's control routes.
#[derive(Clone)]
pub struct Sim {
    base: String,
    http: reqwest::Client,
}

impl Sim {
    pub fn new(base: &str) -> anyhow::Result<Sim> {
        Ok(Sim {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder().build()?,
        })
    }

    /// The OpenAI-compatible base URL (`…/v1`).
    pub fn openai_base(&self) -> String {
        format!("{}/v1", self.base)
    }

    /// Clears the counters and faults, then sets the pace; every scenario starts here.
    pub async fn reset_with(&self, ttft_ms: u64, tokens_per_sec: u64) -> anyhow::Result<()> {
        self.post("/_sim/reset", json!({})).await?;
        self.post(
            "/_sim/config",
            json!({"ttft_ms": ttft_ms, "tokens_per_sec": tokens_per_sec}),
        )
        .await?;
        Ok(())
    }

    /// Every chat call from now on answers `status` (an OpenAI error body), until the faults
    /// are cleared; moderation and pictures are spared.
    pub async fn fail_every_chat(&self, status: u16) -> anyhow::Result<()> {
        self.post(
            "/_sim/faults",
            json!({"kind": "chat", "fault": {"type": "status", "status": status}, "times": null}),
        )
        .await
    }

    /// Removes every injected fault (and nothing else: counters and pace stay).
    pub async fn clear_faults(&self) -> anyhow::Result<()> {
        self.http
            .delete(format!("{}/_sim/faults", self.base))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .context("DELETE /_sim/faults to the simulator")?;
        Ok(())
    }

    /// Chat completions the simulator has received since its last reset.
    pub async fn chat_calls(&self) -> anyhow::Result<u64> {
        let stats = self.stats().await?;
        stats["chat_calls"]
            .as_u64()
            .context("/_sim/stats has no chat_calls")
    }

    /// Arrival times (Unix microseconds) of the chat calls since the last reset.
    pub async fn chat_arrivals(&self) -> anyhow::Result<Vec<u64>> {
        let stats = self.stats().await?;
        Ok(stats["calls"]
            .as_array()
            .context("/_sim/stats has no calls")?
            .iter()
            .filter(|c| c["kind"] == "chat")
            .filter_map(|c| c["at_us"].as_u64())
            .collect())
    }

    async fn stats(&self) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}/_sim/stats", self.base))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<()> {
        self.http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("POST {path} to the simulator"))?;
        Ok(())
    }
}
