//! Timed SSE clients: one answer through the API (`/v1/fights/stream`), and the same call
//! made straight to the simulator (`/v1/chat/completions` with `stream: true`), both timed
//! from just before the request is sent.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};

/// What one client saw of one answer. Durations count from just before the request.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// The first token of text (a `chunk` from the API, a non-empty `delta.content` from
    /// the simulator).
    pub first_token: Option<Duration>,
    /// When the first token arrived, to compare clients with each other.
    pub first_token_at: Option<Instant>,
    /// `done` from the API, `[DONE]` from the simulator.
    pub done: Option<Duration>,
    pub text_bytes: usize,
    /// A hash of the whole text, to check that clients got the same answer.
    pub text_hash: u64,
    /// From the API's `meta`.
    pub key: Option<String>,
    pub cached: Option<bool>,
    /// From the API's `done`: the model that wrote the answer, and whether it is degraded (a
    /// fallback provider's).
    pub model: Option<String>,
    pub degraded: Option<bool>,
    /// Why the answer is incomplete, if it is.
    pub error: Option<String>,
    /// The longest the client waited for an event of the API's (from the request to the
    /// first, then between two).
    pub longest_wait: Duration,
    /// Whether the API sent `reset` (the generation started again).
    pub reset: bool,
}

impl Timeline {
    pub fn complete(&self) -> bool {
        self.done.is_some() && self.error.is_none()
    }
}

pub type Events =
    Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

/// How long one answer may take before it counts as failed.
pub const ANSWER_LIMIT: Duration = Duration::from_secs(30);

/// `timeline`, or one that says it did not end within `limit`: a stuck answer is a failure
/// to report, not a reason to hang the run.
pub async fn within(limit: Duration, timeline: impl Future<Output = Timeline>) -> Timeline {
    tokio::time::timeout(limit, timeline)
        .await
        .unwrap_or_else(|_| Timeline {
            error: Some(format!("no end within {} s", limit.as_secs())),
            ..Timeline::default()
        })
}

/// A client for many concurrent streams: no timeouts of its own, connections kept alive.
pub fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(300))
        .build()?)
}

/// `GET {api}/v1/fights/stream?a=&b=`.
pub fn stream_url(api: &str, a: &str, b: &str) -> anyhow::Result<reqwest::Url> {
    Ok(reqwest::Url::parse_with_params(
        &format!("{}/v1/fights/stream", api.trim_end_matches('/')),
        &[("a", a), ("b", b)],
    )?)
}

/// Opens an event stream; fails unless the answer is 200.
pub async fn open(request: reqwest::RequestBuilder) -> anyhow::Result<Events> {
    let response = request
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        bail!("status {status}: {body}");
    }
    Ok(Box::pin(response.bytes_stream().eventsource()))
}

/// One answer through the API, read to its end.
pub async fn through_api(client: &reqwest::Client, url: reqwest::Url) -> Timeline {
    let start = Instant::now();
    let mut timeline = Timeline::default();
    if let Err(e) = read_api(client, url, start, &mut timeline).await {
        timeline.error = Some(format!("{e:#}"));
    }
    timeline
}

async fn read_api(
    client: &reqwest::Client,
    url: reqwest::Url,
    start: Instant,
    t: &mut Timeline,
) -> anyhow::Result<()> {
    let mut events = open(client.get(url)).await?;
    let mut text = String::new();
    let mut last = start;
    while let Some(event) = events.next().await {
        let event = event?;
        t.longest_wait = t.longest_wait.max(last.elapsed());
        last = Instant::now();
        match event.event.as_str() {
            "meta" => {
                let meta: Value = serde_json::from_str(&event.data)?;
                t.key = meta["key"].as_str().map(str::to_owned);
                t.cached = meta["cached"].as_bool();
            }
            "chunk" => {
                if t.first_token.is_none() {
                    let now = Instant::now();
                    t.first_token = Some(now - start);
                    t.first_token_at = Some(now);
                }
                let chunk: Value = serde_json::from_str(&event.data)?;
                text.push_str(chunk["delta"].as_str().unwrap_or_default());
            }
            "reset" => {
                t.reset = true;
                text.clear();
            }
            "done" => {
                t.done = Some(start.elapsed());
                t.text_bytes = text.len();
                t.text_hash = hash(&text);
                if let Ok(done) = serde_json::from_str::<Value>(&event.data) {
                    t.model = done["model"].as_str().map(str::to_owned);
                    t.degraded = Some(done["degraded"].as_bool().unwrap_or(false));
                }
                return Ok(());
            }
            "error" => bail!("error event: {}", event.data),
            _ => {}
        }
    }
    bail!("the stream ended without done")
}

/// The request the worker makes for `a` vs `b`, made straight to the simulator.
pub async fn straight_to_sim(
    client: &reqwest::Client,
    openai_base: &str,
    a: &str,
    b: &str,
) -> Timeline {
    straight_to_sim_as(client, openai_base, "gpt-4o-mini", a, b).await
}

/// [`straight_to_sim`] naming `model` (a fallback provider's, say).
pub async fn straight_to_sim_as(
    client: &reqwest::Client,
    openai_base: &str,
    model: &str,
    a: &str,
    b: &str,
) -> Timeline {
    let start = Instant::now();
    let mut timeline = Timeline::default();
    if let Err(e) = read_sim(client, openai_base, model, a, b, start, &mut timeline).await {
        timeline.error = Some(format!("{e:#}"));
    }
    timeline
}

async fn read_sim(
    client: &reqwest::Client,
    openai_base: &str,
    model: &str,
    a: &str,
    b: &str,
    start: Instant,
    t: &mut Timeline,
) -> anyhow::Result<()> {
    let messages: Vec<Value> = versus_shared::prompt::text_messages(a, b)
        .iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    let body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let request = client
        .post(format!("{openai_base}/chat/completions"))
        .bearer_auth("bench")
        .json(&body);
    let mut events = open(request).await?;
    let mut text = String::new();
    while let Some(event) = events.next().await {
        let event = event?;
        if event.data == "[DONE]" {
            t.done = Some(start.elapsed());
            t.text_bytes = text.len();
            t.text_hash = hash(&text);
            return Ok(());
        }
        let chunk: Value = serde_json::from_str(&event.data).context("a completion chunk")?;
        if let Some(delta) = chunk["choices"][0]["delta"]["content"].as_str()
            && !delta.is_empty()
        {
            if t.first_token.is_none() {
                let now = Instant::now();
                t.first_token = Some(now - start);
                t.first_token_at = Some(now);
            }
            text.push_str(delta);
        }
    }
    bail!("the completion ended without [DONE]")
}

/// The hash [`Timeline::text_hash`] holds.
pub fn hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}
