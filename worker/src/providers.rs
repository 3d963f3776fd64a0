//! The upstream providers of each use (text, pictures, moderation), in order of preference:
//! the primary (`OPENAI_BASE_URL` with the configured models), then `VERSUS_FALLBACKS`. Each
//! has its own client (its base URL and key) and its own circuit ([`Circuit`]), in this
//! worker.
//!
//! A call goes to the first provider, from the one a generation is at, whose circuit lets it
//! through; a generation moves on to the next one only once a provider's retries for it ran
//! out, and never mid-stream (`text.rs`, `image.rs`, `moderation.rs`). What a fallback makes is
//! degraded (`wire::Degraded`): served as such, and made again by the primary once its circuit
//! is closed (`upgrade.rs`).
//!
//! Keys are read from the environment variables the JSON names, never from the JSON itself,
//! so they appear neither in it, nor in logs, nor in `--help`.

use std::{sync::atomic::AtomicBool, time::Duration};

use anyhow::{Context, bail};
use serde::Deserialize;
use versus_shared::config::{ModelSettings, Secret};

use crate::{
    circuit::{Circuit, State},
    openai::{self, OpenAiSettings, UpstreamError},
};

/// Fallback providers and how circuits and degraded answers behave.
#[derive(clap::Args, Debug, Clone)]
pub struct FallbackSettings {
    /// Providers to fall back on, in order of preference after the primary: a JSON array of
    /// `{"kind": "text" | "image" | "moderation", "base_url": URL, "model": NAME,
    /// "api_key_env": ENV_VAR_NAME}` (OpenAI-compatible APIs; the key is read from the variable
    /// named, never written in the JSON).
    #[arg(long, env = "VERSUS_FALLBACKS", default_value = "[]")]
    pub fallbacks: String,
    /// Failed calls in a row after which a provider is not called for
    /// `VERSUS_CIRCUIT_OPEN_SECS` (its circuit opens; then one probe call decides). 0: never.
    #[arg(long, env = "VERSUS_CIRCUIT_FAILURES", default_value_t = 5)]
    pub circuit_failures: u32,
    /// How long an open circuit keeps calls away from its provider (seconds).
    #[arg(long, env = "VERSUS_CIRCUIT_OPEN_SECS", default_value_t = 30)]
    pub circuit_open_secs: u64,
    /// How long an answer a fallback made is served (seconds, at least
    /// `VERSUS_EVENTS_MAX_AGE_SECS`) before a request asks for it again; it is made again by
    /// the primary sooner, once the primary's circuit is closed.
    #[arg(long, env = "VERSUS_DEGRADED_TTL_SECS", default_value_t = 86_400)]
    pub degraded_ttl_secs: u64,
    /// Degraded answers made again by the primary per minute at most, cluster-wide (the most
    /// requested first, on the pre-warm lane; the budget applies). 0: never.
    #[arg(long, env = "VERSUS_UPGRADE_PER_MINUTE", default_value_t = 60)]
    pub upgrade_per_minute: u32,
}

/// What a provider is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Use {
    Text,
    Image,
    Moderation,
}

impl Use {
    pub fn as_str(self) -> &'static str {
        match self {
            Use::Text => "text",
            Use::Image => "image",
            Use::Moderation => "moderation",
        }
    }
}

/// One entry of `VERSUS_FALLBACKS`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fallback {
    kind: Use,
    base_url: String,
    model: String,
    #[serde(default)]
    api_key_env: Option<String>,
}

/// One provider of one use: a model at an OpenAI-compatible base URL.
pub struct Provider {
    /// `<use>/primary` or `<use>/fallback-<n>`: the metrics' `provider` label.
    pub name: String,
    pub model: String,
    pub client: openai::Client,
    pub circuit: Circuit,
    /// Whether it streams pictures: false once it refused `stream` (a picture provider).
    pub streams_images: AtomicBool,
}

/// How a call to a provider ended, for its circuit and `versus_upstream_provider_calls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It answered (a refusal of the request is an answer: the provider is up).
    Answered,
    /// It failed for its own sake: an outage, a rate limit, a timeout, a stream cut.
    Failed,
}

impl Outcome {
    /// The outcome of a call that ended with `error`.
    pub fn of(error: &UpstreamError) -> Outcome {
        match error {
            UpstreamError::Retryable { .. } => Outcome::Failed,
            UpstreamError::Fatal { .. } => Outcome::Answered,
        }
    }
}

impl Provider {
    /// Records how a call ended.
    pub fn record(&self, outcome: Outcome) {
        let label = match outcome {
            Outcome::Answered => {
                self.circuit.succeeded();
                "answered"
            }
            Outcome::Failed => {
                self.circuit.failed();
                "failed"
            }
        };
        metrics::counter!("versus_upstream_provider_calls_total", "provider" => self.name.clone(), "outcome" => label)
            .increment(1);
    }

    /// Counts a call this provider did not get because its circuit was open.
    fn skipped(&self) {
        metrics::counter!("versus_upstream_provider_calls_total", "provider" => self.name.clone(), "outcome" => "skipped")
            .increment(1);
    }
}

/// Every provider of every use.
pub struct Providers {
    text: Vec<Provider>,
    image: Vec<Provider>,
    moderation: Vec<Provider>,
    /// How long a degraded answer is served.
    pub degraded_ttl: Duration,
    /// How long an open circuit keeps calls away.
    pub open_for: Duration,
}

/// What a use's primary provider takes, as this worker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primary {
    /// Its circuit is closed.
    Up,
    /// Its circuit is open, and its open time is over: the next call is the probe.
    ProbeDue,
    /// Its circuit is open (or probing).
    Down,
}

impl Providers {
    pub fn new(
        openai: &OpenAiSettings,
        models: &ModelSettings,
        moderation_model: &str,
        settings: &FallbackSettings,
    ) -> anyhow::Result<Providers> {
        let fallbacks: Vec<Fallback> = serde_json::from_str(&settings.fallbacks)
            .context("VERSUS_FALLBACKS is not a JSON array of {\"kind\", \"base_url\", \"model\", \"api_key_env\"}")?;
        let open_for = Duration::from_secs(settings.circuit_open_secs.max(1));
        let provider = |name: String, model: &str, openai: &OpenAiSettings| {
            Ok::<_, anyhow::Error>(Provider {
                circuit: Circuit::new(name.clone(), settings.circuit_failures, open_for),
                name,
                model: model.to_owned(),
                client: openai::Client::new(openai, models.max_answer_tokens)?,
                streams_images: AtomicBool::new(true),
            })
        };
        let mut providers = Providers {
            text: vec![provider("text/primary".into(), &models.chat_model, openai)?],
            image: vec![provider(
                "image/primary".into(),
                &models.image_model,
                openai,
            )?],
            moderation: vec![provider(
                "moderation/primary".into(),
                moderation_model,
                openai,
            )?],
            degraded_ttl: Duration::from_secs(settings.degraded_ttl_secs.max(1)),
            open_for,
        };
        for fallback in fallbacks {
            let Ok(url) = reqwest::Url::parse(&fallback.base_url) else {
                bail!("VERSUS_FALLBACKS: {:?} is not a URL", fallback.base_url);
            };
            if !matches!(url.scheme(), "http" | "https") || fallback.model.trim().is_empty() {
                bail!(
                    "VERSUS_FALLBACKS: each entry needs an http(s) base_url and a model ({} {})",
                    fallback.kind.as_str(),
                    fallback.base_url
                );
            }
            let api_key = match &fallback.api_key_env {
                Some(var) => Secret::new(std::env::var(var).unwrap_or_default()),
                None => Secret::new(""),
            };
            let client = OpenAiSettings {
                base_url: fallback.base_url.clone(),
                api_key,
                ..openai.clone()
            };
            let list = providers.of_mut(fallback.kind);
            let name = format!("{}/fallback-{}", fallback.kind.as_str(), list.len());
            tracing::info!(
                provider = name,
                model = fallback.model,
                host = url.host_str().unwrap_or_default(),
                "a fallback provider"
            );
            list.push(provider(name, &fallback.model, &client)?);
        }
        Ok(providers)
    }

    /// Serves degraded answers for `at_least` (the events' age): past its time, a degraded
    /// answer is a miss, and a miss whose key's events still end with the fallback's `done`
    /// would replay that answer instead of asking again.
    pub fn serving_degraded_at_least(mut self, at_least: Duration) -> Providers {
        self.degraded_ttl = self.degraded_ttl.max(at_least);
        self
    }

    /// The providers of `kind`, the primary first.
    pub fn of(&self, kind: Use) -> &[Provider] {
        match kind {
            Use::Text => &self.text,
            Use::Image => &self.image,
            Use::Moderation => &self.moderation,
        }
    }

    fn of_mut(&mut self, kind: Use) -> &mut Vec<Provider> {
        match kind {
            Use::Text => &mut self.text,
            Use::Image => &mut self.image,
            Use::Moderation => &mut self.moderation,
        }
    }

    /// The first provider of `kind`, from `from` on and before `upto` (the primary only: 1),
    /// whose circuit lets a call through (each one skipped is counted): its place, or None
    /// when every one's circuit is open.
    pub fn pick(&self, kind: Use, from: usize, upto: usize) -> Option<usize> {
        let list = self.of(kind);
        (from..list.len().min(upto)).find(|&at| {
            let provider = &list[at];
            let allowed = provider.circuit.allow();
            if !allowed {
                provider.skipped();
            }
            allowed
        })
    }

    /// After a try of `kind` on the provider at `at` failed with `error`: whether the next try
    /// goes to the next provider, at once. It does when the failure is the provider's
    /// (retryable), there is a next one, and this one's retries for the generation ran out
    /// (`delay` is None) or its circuit opened meanwhile (waiting out a back-off for a provider
    /// that will not be called is time lost).
    pub fn move_on(
        &self,
        kind: Use,
        at: usize,
        error: &UpstreamError,
        delay: Option<Duration>,
    ) -> bool {
        let list = self.of(kind);
        matches!(error, UpstreamError::Retryable { .. })
            && at + 1 < list.len()
            && (delay.is_none() || list[at].circuit.state() == State::Open)
    }

    /// What the primary of `kind` takes.
    pub fn primary(&self, kind: Use) -> Primary {
        let circuit = &self.of(kind)[0].circuit;
        match circuit.state() {
            State::Closed => Primary::Up,
            State::Open if circuit.probe_due() => Primary::ProbeDue,
            State::Open | State::HalfOpen => Primary::Down,
        }
    }

    /// Whether `kind` has a provider besides the primary.
    pub fn has_fallbacks(&self, kind: Use) -> bool {
        self.of(kind).len() > 1
    }
}

/// Every provider failed this call: their circuits are open.
pub fn all_open(kind: Use) -> UpstreamError {
    UpstreamError::Retryable {
        message: format!("every {} provider's circuit is open", kind.as_str()),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(fallbacks: &str) -> FallbackSettings {
        FallbackSettings {
            fallbacks: fallbacks.to_owned(),
            circuit_failures: 2,
            circuit_open_secs: 30,
            degraded_ttl_secs: 60,
            upgrade_per_minute: 10,
        }
    }

    fn providers(fallbacks: &str) -> anyhow::Result<Providers> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Args {
            #[command(flatten)]
            openai: OpenAiSettings,
            #[command(flatten)]
            models: ModelSettings,
        }
        let args = Args::try_parse_from(["test"]).unwrap();
        Providers::new(&args.openai, &args.models, "omni", &settings(fallbacks))
    }

    #[test]
    fn fallbacks_follow_the_primary_in_order_per_use() {
        let providers = providers(
            r#"[{"kind":"text","base_url":"http://a.example/v1","model":"m1","api_key_env":"NO_SUCH_VAR_X"},
                {"kind":"image","base_url":"https://b.example/v1","model":"i1"},
                {"kind":"text","base_url":"http://c.example/v1","model":"m2"}]"#,
        )
        .unwrap();
        let names = |kind| {
            providers
                .of(kind)
                .iter()
                .map(|p| (p.name.clone(), p.model.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(Use::Text)[1..],
            [
                ("text/fallback-1".to_owned(), "m1".to_owned()),
                ("text/fallback-2".to_owned(), "m2".to_owned())
            ]
        );
        assert_eq!(names(Use::Image).len(), 2);
        assert_eq!(names(Use::Moderation).len(), 1);
        assert!(providers.has_fallbacks(Use::Text));
        assert!(!providers.has_fallbacks(Use::Moderation));
    }

    #[test]
    fn a_malformed_list_stops_the_worker_with_a_clear_error() {
        for bad in [
            "{}",
            r#"[{"kind":"chat","base_url":"http://a/v1","model":"m"}]"#,
            r#"[{"kind":"text","base_url":"not a url","model":"m"}]"#,
            r#"[{"kind":"text","base_url":"ftp://a/v1","model":"m"}]"#,
            r#"[{"kind":"text","base_url":"http://a/v1","model":""}]"#,
            r#"[{"kind":"text","base_url":"http://a/v1","model":"m","api_key":"sk-secret"}]"#,
        ] {
            let error = format!("{:#}", providers(bad).err().expect(bad));
            assert!(error.contains("VERSUS_FALLBACKS"), "{error}");
            assert!(!error.contains("sk-secret"), "{error}");
        }
    }

    #[test]
    fn a_call_goes_to_the_first_provider_whose_circuit_is_closed() {
        let providers =
            providers(r#"[{"kind":"text","base_url":"http://a.example/v1","model":"m1"}]"#)
                .unwrap();
        assert_eq!(providers.pick(Use::Text, 0, usize::MAX), Some(0));
        let primary = &providers.of(Use::Text)[0];
        primary.record(Outcome::Failed);
        primary.record(Outcome::Failed);
        assert_eq!(providers.primary(Use::Text), Primary::Down);
        assert_eq!(providers.pick(Use::Text, 0, usize::MAX), Some(1));
        // The primary only (an upgrade): nothing takes the call.
        assert_eq!(providers.pick(Use::Text, 0, 1), None);
        providers.of(Use::Text)[1].record(Outcome::Failed);
        providers.of(Use::Text)[1].record(Outcome::Failed);
        assert_eq!(providers.pick(Use::Text, 0, usize::MAX), None);
    }
}
