//! The OpenAI client: streaming chat completions over reqwest, with errors classified into
//! retryable (connect errors, 408, 409, 429, 5xx, a stream cut or stalled mid-way) and fatal.
//! It speaks the public API unchanged, so any OpenAI-compatible server works.

use std::{pin::Pin, time::Duration};

use base64::Engine;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::{StatusCode, header::HeaderMap};
use serde::Deserialize;
use serde_json::json;
use tracing::{Instrument, Span, field::Empty};
use versus_shared::{
    config::Secret,
    retry::{self, Delays},
    traces,
};

use crate::claims::Usage;

/// Where the upstream is and how hard we try.
#[derive(clap::Args, Debug, Clone)]
pub struct OpenAiSettings {
    /// API key sent as a bearer token (empty sends none, for servers that need none).
    #[arg(
        long,
        env = "OPENAI_API_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub api_key: Secret,
    /// Base URL of an OpenAI-compatible API.
    #[arg(
        long,
        env = "OPENAI_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    pub base_url: String,
    /// Upstream calls per job before giving up (the retry budget).
    #[arg(long, env = "VERSUS_UPSTREAM_MAX_TRIES", default_value_t = 4)]
    pub max_tries: usize,
    /// First back-off delay, in milliseconds; it doubles up to 10 s
    /// (`versus_shared::retry::upstream`).
    #[arg(long, env = "VERSUS_UPSTREAM_BACKOFF_MS", default_value_t = 500)]
    pub backoff_ms: u64,
    /// A `Retry-After` longer than this (seconds) spends the whole budget at once.
    #[arg(
        long,
        env = "VERSUS_UPSTREAM_MAX_RETRY_AFTER_SECS",
        default_value_t = 30
    )]
    pub max_retry_after_secs: u64,
    /// A stream that sends nothing for this long (seconds) is treated as broken.
    #[arg(long, env = "VERSUS_UPSTREAM_IDLE_TIMEOUT_SECS", default_value_t = 30)]
    pub idle_timeout_secs: u64,
    /// How long the upstream may take to send a chat answer's response headers and its first
    /// token, from the request (seconds): a server that takes the request and never answers
    /// frees the slot after this, and the try counts as failed.
    #[arg(
        long,
        env = "VERSUS_UPSTREAM_HEADERS_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub headers_timeout_secs: u64,
    /// How long one chat call may take in all, its whole stream included (seconds).
    #[arg(long, env = "VERSUS_UPSTREAM_CALL_TIMEOUT_SECS", default_value_t = 300)]
    pub call_timeout_secs: u64,
    /// How long one image generation may take, download included (seconds).
    #[arg(
        long,
        env = "VERSUS_UPSTREAM_IMAGE_TIMEOUT_SECS",
        default_value_t = 180
    )]
    pub image_timeout_secs: u64,
    /// Partial images a picture is streamed with (0 to 3; 0: pictures are drawn in one
    /// answer): each is shown to the picture's viewers as it arrives, and costs 100 image
    /// output tokens. An upstream that refuses streaming is asked without it from then on.
    #[arg(
        long,
        env = "VERSUS_PARTIAL_IMAGES",
        default_value_t = 2,
        value_parser = clap::value_parser!(u32).range(0..=3)
    )]
    pub partial_images: u32,
}

/// Why an upstream call failed, and whether another try may help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("{message}")]
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{message}")]
    Fatal { message: String },
}

impl UpstreamError {
    fn retryable(message: impl Into<String>) -> UpstreamError {
        UpstreamError::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }
}

/// The kinds of upstream call, as the `kind` label of `versus_upstream_calls_total` and
/// `versus_upstream_errors_total` names them.
const CALL_KINDS: [&str; 3] = ["chat", "moderation", "image"];

/// Puts the upstream call and error counters of every kind at zero, so that a rule over them
/// (the error ratio) has a value before the first call, and the first error shows as a rise.
pub fn zero_counters() {
    for kind in CALL_KINDS {
        metrics::counter!("versus_upstream_calls_total", "kind" => kind).increment(0);
        metrics::counter!("versus_upstream_errors_total", "kind" => kind).increment(0);
    }
}

/// How long connecting to the upstream (TCP and TLS) may take: past it the try fails, as
/// retryable as any unreachable upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle connection to the upstream is kept for the next call (reqwest's default,
/// stated): calls reuse warm connections rather than paying a new handshake.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A client for one OpenAI-compatible server.
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    api_key: Secret,
    settings: OpenAiSettings,
    /// `max_completion_tokens` of every chat request (`VERSUS_MAX_ANSWER_TOKENS`). With a
    /// reasoning model (`o4-mini`, `gpt-5*`) it caps the reasoning tokens as well as the answer's,
    /// so it must leave room for both: an answer cut at the cap ends with `length` and is never
    /// stored ([`crate::text`]). It is sent as is to every model: `reasoning_effort` would lower
    /// the reasoning, but models without reasoning refuse the parameter.
    max_answer_tokens: u32,
}

impl Client {
    pub fn new(settings: &OpenAiSettings, max_answer_tokens: u32) -> anyhow::Result<Client> {
        versus_shared::tls::install();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .user_agent(concat!("versus-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Client {
            http,
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            api_key: settings.api_key.clone(),
            settings: settings.clone(),
            max_answer_tokens,
        })
    }

    /// Partial images a picture is asked with (`VERSUS_PARTIAL_IMAGES`).
    pub fn partial_images(&self) -> u32 {
        self.settings.partial_images
    }

    /// The back-off schedule for one job (`versus_shared::retry::upstream`): its length is the
    /// retry budget.
    pub fn backoff(&self) -> Delays {
        retry::upstream(
            Duration::from_millis(self.settings.backoff_ms),
            self.settings.max_tries,
        )
        .delays()
    }

    /// The delay before the next try after `error`, or None when the budget is spent or the
    /// error is fatal. A `Retry-After` from the server wins over our schedule: retrying
    /// earlier would only be refused again.
    pub fn next_delay(&self, backoff: &mut Delays, error: &UpstreamError) -> Option<Duration> {
        let UpstreamError::Retryable { retry_after, .. } = error else {
            return None;
        };
        let longest = Duration::from_secs(self.settings.max_retry_after_secs);
        backoff.next_honoring(*retry_after, longest)
    }

    /// Opens a streaming chat completion. Returns once the server has answered 200.
    ///
    /// The call's span (`upstream.chat`) lives as long as the stream: it ends when the stream
    /// is dropped, holds an event at the first token, and the token usage at the end.
    pub async fn chat_stream(
        &self,
        model: &str,
        messages: &[(&str, String)],
    ) -> Result<ChatStream, UpstreamError> {
        let span = tracing::info_span!(
            "upstream.chat",
            otel.kind = "client",
            gen_ai.operation.name = "chat",
            gen_ai.request.model = model,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            gen_ai.response.finish_reasons = Empty,
            otel.status_code = Empty,
            otel.status_description = Empty,
        );
        match self
            .open_chat(model, messages)
            .instrument(span.clone())
            .await
        {
            Ok(mut stream) => {
                stream.span = span;
                Ok(stream)
            }
            Err(error) => Err(failed(&span, error)),
        }
    }

    async fn open_chat(
        &self,
        model: &str,
        messages: &[(&str, String)],
    ) -> Result<ChatStream, UpstreamError> {
        let messages: Vec<_> = messages
            .iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect();
        let body = json!({
            "model": model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_completion_tokens": self.max_answer_tokens,
        });
        metrics::counter!("versus_upstream_calls_total", "kind" => "chat").increment(1);
        let first_token = Duration::from_secs(self.settings.headers_timeout_secs.max(1));
        let first_token_by = tokio::time::Instant::now() + first_token;
        let mut request = self
            .http
            .post(format!("{}/chat/completions", self.base_url))
            .timeout(Duration::from_secs(self.settings.call_timeout_secs.max(1)))
            .json(&body);
        if !self.api_key.expose().is_empty() {
            request = request.bearer_auth(self.api_key.expose());
        }
        let sent = tokio::time::timeout_at(first_token_by, request.send())
            .await
            .map_err(|_| {
                UpstreamError::retryable(format!(
                    "the upstream sent no response within {first_token:?}"
                ))
            })?;
        let response = checked(sent).await?;
        Ok(ChatStream {
            events: Box::pin(sse_stream::SseByteStream::new(response.bytes_stream())),
            idle: Duration::from_secs(self.settings.idle_timeout_secs.max(1)),
            first_token_by: Some(first_token_by),
            finish_reason: None,
            usage: Usage::default(),
            span: Span::none(),
        })
    }

    /// Asks the moderation endpoint about `inputs`, in one call: for each input, the
    /// categories it flagged.
    pub async fn moderate(
        &self,
        model: &str,
        inputs: &[&str],
    ) -> Result<Vec<Vec<String>>, UpstreamError> {
        #[derive(Deserialize)]
        struct Body {
            results: Vec<Item>,
        }
        #[derive(Deserialize)]
        struct Item {
            #[serde(default)]
            categories: std::collections::HashMap<String, Option<bool>>,
        }
        metrics::counter!("versus_upstream_calls_total", "kind" => "moderation").increment(1);
        let mut request = self
            .http
            .post(format!("{}/moderations", self.base_url))
            .timeout(Duration::from_secs(
                self.settings.headers_timeout_secs.max(1),
            ))
            .json(&json!({"model": model, "input": inputs}));
        if !self.api_key.expose().is_empty() {
            request = request.bearer_auth(self.api_key.expose());
        }
        let response = checked(request.send().await).await?;
        let body: Body = response.json().await.map_err(|e| {
            UpstreamError::retryable(format!("unreadable moderation answer: {}", describe(&e)))
        })?;
        if body.results.len() != inputs.len() {
            return Err(UpstreamError::retryable(format!(
                "the moderation answer held {} results for {} inputs",
                body.results.len(),
                inputs.len()
            )));
        }
        Ok(body
            .results
            .into_iter()
            .map(|item| {
                item.categories
                    .into_iter()
                    .filter(|(_, flagged)| *flagged == Some(true))
                    .map(|(category, _)| category)
                    .collect()
            })
            .collect())
    }

    /// Draws one picture. With `partials` above zero it asks for a streamed answer
    /// (`stream`, `partial_images`): partial images as the picture takes shape, then the
    /// picture ([`Drawing::Streamed`]); an upstream that answers a plain JSON body anyway is
    /// read as one ([`Drawing::Whole`]), and one that refuses the parameters fails with
    /// [`ImageFailure::stream_refused`]. When the server answers with a URL (which expires),
    /// the bytes are downloaded at once: only our own copy is ever kept.
    #[tracing::instrument(
        name = "upstream.image",
        skip_all,
        fields(
            otel.kind = "client",
            gen_ai.operation.name = "image",
            gen_ai.request.model = model,
            versus.size = size,
            versus.partials = partials,
            otel.status_code = Empty,
            otel.status_description = Empty,
        )
    )]
    pub async fn draw(
        &self,
        model: &str,
        prompt: &str,
        size: &str,
        partials: u32,
    ) -> Result<Drawing, ImageFailure> {
        self.open_drawing(model, prompt, size, partials)
            .await
            .map_err(|failure| ImageFailure {
                error: failed(&Span::current(), failure.error),
                ..failure
            })
    }

    async fn open_drawing(
        &self,
        model: &str,
        prompt: &str,
        size: &str,
        partials: u32,
    ) -> Result<Drawing, ImageFailure> {
        let mut body = json!({"model": model, "prompt": prompt, "n": 1, "size": size});
        // gpt-image-1 always answers base64 and refuses the parameter; DALL·E defaults to URLs.
        if model.starts_with("dall-e") {
            body["response_format"] = json!("b64_json");
        }
        if partials > 0 {
            body["stream"] = json!(true);
            body["partial_images"] = json!(partials);
        }
        metrics::counter!("versus_upstream_calls_total", "kind" => "image").increment(1);
        let timeout = Duration::from_secs(self.settings.image_timeout_secs.max(1));
        let deadline = tokio::time::Instant::now() + timeout;
        let mut request = self
            .http
            .post(format!("{}/images/generations", self.base_url))
            .timeout(timeout)
            .json(&body);
        if !self.api_key.expose().is_empty() {
            request = request.bearer_auth(self.api_key.expose());
        }
        let sent = request.send().await;
        // No answer in time: the upstream may have drawn (and billed) the picture all the same.
        let timed_out = matches!(&sent, Err(e) if e.is_timeout());
        if partials > 0
            && let Ok(response) = &sent
            && response.status() == StatusCode::BAD_REQUEST
        {
            // A 400 naming the streaming parameters: this upstream does not stream pictures.
            let response = sent.expect("checked above");
            let detail = error_detail(response).await;
            let refused = ["stream", "partial_images"]
                .iter()
                .any(|p| detail.contains(p));
            return Err(ImageFailure {
                error: UpstreamError::Fatal {
                    message: format!("upstream answered 400 Bad Request{detail}"),
                },
                billed: false,
                stream_refused: refused,
            });
        }
        let response = checked(sent).await.map_err(|error| ImageFailure {
            error,
            billed: timed_out,
            stream_refused: false,
        })?;
        let streamed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if streamed {
            return Ok(Drawing::Streamed(ImageStream {
                events: Box::pin(sse_stream::SseByteStream::new(response.bytes_stream())),
                deadline,
                partials: 0,
            }));
        }
        self.picture_of(response, timeout).await.map(Drawing::Whole)
    }

    /// The picture of a plain (not streamed) image answer.
    async fn picture_of(
        &self,
        response: reqwest::Response,
        timeout: Duration,
    ) -> Result<Bytes, ImageFailure> {
        #[derive(Deserialize)]
        struct Body {
            data: Vec<Item>,
        }
        #[derive(Deserialize)]
        struct Item {
            b64_json: Option<String>,
            url: Option<String>,
        }
        // From here on the upstream answered that it drew the picture: it is billed.
        let billed = |error| ImageFailure::billed(error);
        let body: Body = response.json().await.map_err(|e| {
            billed(UpstreamError::retryable(format!(
                "unreadable image answer: {}",
                describe(&e)
            )))
        })?;
        let item =
            body.data.into_iter().next().ok_or_else(|| {
                billed(UpstreamError::retryable("the image answer held no image"))
            })?;
        if let Some(b64) = item.b64_json {
            return decoded(&b64).map_err(billed);
        }
        let url = item.url.ok_or_else(|| {
            billed(UpstreamError::retryable(
                "the image answer held neither bytes nor URL",
            ))
        })?;
        let download = checked(self.http.get(url).timeout(timeout).send().await)
            .await
            .map_err(billed)?;
        download.bytes().await.map_err(|e| {
            billed(UpstreamError::retryable(format!(
                "downloading the image failed: {}",
                describe(&e)
            )))
        })
    }
}

/// The bytes of a base64 image.
fn decoded(b64: &str) -> Result<Bytes, UpstreamError> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map(Bytes::from)
        .map_err(|_| UpstreamError::retryable("the image answer was not valid base64"))
}

/// What a picture call answered.
pub enum Drawing {
    /// The picture, in one answer.
    Whole(Bytes),
    /// Partial images as the picture takes shape, then the picture.
    Streamed(ImageStream),
}

/// A streamed image answer (OpenAI's `image_generation.partial_image` events, then
/// `image_generation.completed`).
pub struct ImageStream {
    events: Events,
    /// When the whole call must be over (`VERSUS_UPSTREAM_IMAGE_TIMEOUT_SECS`).
    deadline: tokio::time::Instant,
    /// Partial images received so far: each is billed (100 image output tokens).
    partials: u32,
}

/// What an image stream gave next.
#[derive(Debug, PartialEq, Eq)]
pub enum ImagePiece {
    /// A partial image.
    Partial(Bytes),
    /// The picture.
    Done(Bytes),
}

impl ImageStream {
    /// Partial images received so far.
    pub fn partials(&self) -> u32 {
        self.partials
    }

    /// The next partial image, or the picture. A stream that breaks, stalls past the call's
    /// time, or ends without the picture is a retryable failure, billed once a partial came.
    pub async fn next(&mut self) -> Result<ImagePiece, ImageFailure> {
        #[derive(Deserialize)]
        struct Data {
            #[serde(rename = "type", default)]
            kind: String,
            #[serde(default)]
            b64_json: Option<String>,
        }
        let failure = |partials: u32, message: String| ImageFailure {
            error: UpstreamError::retryable(message),
            billed: partials > 0,
            stream_refused: false,
        };
        loop {
            let event = tokio::time::timeout_at(self.deadline, self.events.next())
                .await
                .map_err(|_| {
                    ImageFailure::billed(UpstreamError::retryable(
                        "the upstream did not finish the picture in time",
                    ))
                })?;
            let event = match event {
                Some(Ok(event)) => event,
                // Out of time (the request's own timeout): the upstream may have drawn, and
                // billed, the picture all the same, as for a picture not streamed.
                Some(Err(e)) if timed_out(&e) => {
                    return Err(ImageFailure::billed(UpstreamError::retryable(
                        "the upstream did not finish the picture in time",
                    )));
                }
                Some(Err(e)) => {
                    let message = format!("the image stream broke: {}", describe_stream(&e));
                    return Err(failure(self.partials, message));
                }
                None => {
                    let message = "the image stream ended before the picture".to_owned();
                    return Err(failure(self.partials, message));
                }
            };
            let Some(data) = event.data else {
                continue;
            };
            let Ok(data) = serde_json::from_str::<Data>(&data) else {
                continue;
            };
            let kind = if data.kind.is_empty() {
                event.event.unwrap_or_default()
            } else {
                data.kind
            };
            let Some(b64) = data.b64_json else {
                continue;
            };
            match kind.as_str() {
                "image_generation.partial_image" => {
                    self.partials += 1;
                    return decoded(&b64)
                        .map(ImagePiece::Partial)
                        .map_err(ImageFailure::billed);
                }
                "image_generation.completed" => {
                    return decoded(&b64)
                        .map(ImagePiece::Done)
                        .map_err(ImageFailure::billed);
                }
                _ => {}
            }
        }
    }
}

/// A picture call that failed, and whether the upstream may bill it all the same: it answered
/// that it drew the picture (which then could not be read), or gave no answer in time.
#[derive(Debug)]
pub struct ImageFailure {
    pub error: UpstreamError,
    pub billed: bool,
    /// The upstream refused `stream` or `partial_images` (a 400 naming them): asked again
    /// without them, it draws the picture.
    pub stream_refused: bool,
}

impl ImageFailure {
    /// A failure after the upstream drew (or may have drawn) the picture.
    fn billed(error: UpstreamError) -> ImageFailure {
        ImageFailure {
            error,
            billed: true,
            stream_refused: false,
        }
    }
}

/// Marks `span` (an upstream call's) as failed with `error`, which holds no URL or key.
fn failed(span: &Span, error: UpstreamError) -> UpstreamError {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", error.to_string());
    error
}

/// Turns a send result into a successful response or a classified error.
async fn checked(
    sent: Result<reqwest::Response, reqwest::Error>,
) -> Result<reqwest::Response, UpstreamError> {
    let response = sent.map_err(|e| {
        UpstreamError::retryable(format!("could not reach the upstream: {}", describe(&e)))
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = retry_after(response.headers());
    let detail = error_detail(response).await;
    let message = format!("upstream answered {status}{detail}");
    Err(if is_retryable(status) {
        UpstreamError::Retryable {
            message,
            retry_after,
        }
    } else {
        UpstreamError::Fatal { message }
    })
}

type Events = Pin<Box<dyn Stream<Item = Result<sse_stream::Sse, sse_stream::Error>> + Send>>;

/// An open chat completion stream.
pub struct ChatStream {
    events: Events,
    idle: Duration,
    /// Until the first token: when it must have come.
    first_token_by: Option<tokio::time::Instant>,
    finish_reason: Option<String>,
    usage: Usage,
    /// The call's `upstream.chat` span: it ends with the stream.
    span: Span,
}

/// What the stream gave next.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// The stream finished (`finish_reason` and `[DONE]`) for `reason`. Only `stop` is a whole
    /// answer: `length` was cut at `max_completion_tokens` (with a reasoning model the cap
    /// covers its reasoning too, so a long reasoning leaves a short or empty answer),
    /// `content_filter` was cut by the provider's filter. The caller decides what to make of
    /// it; the call was paid for either way, and `usage` says what it cost.
    End {
        usage: Usage,
        reason: String,
    },
}

#[derive(Deserialize)]
struct ChunkBody {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<UsageBody>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Delta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct UsageBody {
    prompt_tokens: i32,
    completion_tokens: i32,
}

impl ChatStream {
    /// The next piece of text, or the end. A stream that breaks, stalls, or ends without
    /// `finish_reason` and `[DONE]` is an error: its text must never be stored.
    /// Cancel-safe: between awaits every bit of state lives in `self`, so a caller may poll
    /// it once and drop the future to see whether a piece is already there.
    pub async fn next(&mut self) -> Result<Piece, UpstreamError> {
        let next = self.read().await;
        match &next {
            Ok(Piece::End { usage, reason }) => {
                self.span
                    .record("gen_ai.usage.input_tokens", usage.prompt_tokens);
                self.span
                    .record("gen_ai.usage.output_tokens", usage.completion_tokens);
                self.span
                    .record("gen_ai.response.finish_reasons", reason.as_str());
            }
            Ok(Piece::Text(_)) => {}
            Err(error) => {
                failed(&self.span, error.clone());
            }
        }
        next
    }

    async fn read(&mut self) -> Result<Piece, UpstreamError> {
        loop {
            let idle_until = tokio::time::Instant::now() + self.idle;
            let until = self
                .first_token_by
                .map_or(idle_until, |by| by.min(idle_until));
            let event = tokio::time::timeout_at(until, self.events.next())
                .await
                .map_err(|_| match self.first_token_by {
                    Some(_) => UpstreamError::retryable("the upstream sent no first token in time"),
                    None => UpstreamError::retryable("the upstream stream stalled"),
                })?;
            let event = match event {
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    return Err(UpstreamError::retryable(format!(
                        "the upstream stream broke: {}",
                        describe_stream(&e)
                    )));
                }
                None => {
                    return Err(UpstreamError::retryable(
                        "the upstream stream ended before it finished",
                    ));
                }
            };
            // A block without data (a comment, a keep-alive) carries nothing.
            let Some(data) = event.data else {
                continue;
            };
            if data.trim() == "[DONE]" {
                return match self.finish_reason.take() {
                    Some(reason) => Ok(Piece::End {
                        usage: self.usage,
                        reason,
                    }),
                    None => Err(UpstreamError::retryable(
                        "the upstream stream ended without a finish reason",
                    )),
                };
            }
            let chunk: ChunkBody = serde_json::from_str(&data).map_err(|e| {
                UpstreamError::retryable(format!("the upstream sent an unreadable chunk: {e}"))
            })?;
            if chunk.error.is_some() {
                return Err(UpstreamError::retryable(
                    "the upstream reported an error mid-stream",
                ));
            }
            if let Some(u) = chunk.usage {
                self.usage = Usage {
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                };
            }
            // One choice is the rule: its text is returned as parsed, without a copy.
            let mut text: Option<String> = None;
            for choice in chunk.choices {
                if let Some(reason) = choice.finish_reason {
                    self.finish_reason = Some(reason);
                }
                match (&mut text, choice.delta.content) {
                    (None, content) => text = content,
                    (Some(text), Some(content)) => text.push_str(&content),
                    (Some(_), None) => {}
                }
            }
            if let Some(text) = text.filter(|t| !t.is_empty()) {
                if self.first_token_by.take().is_some() {
                    traces::event(&self.span, "first token");
                }
                return Ok(Piece::Text(text));
            }
        }
    }
}

fn is_retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error()
}

/// `Retry-After` in seconds (OpenAI also sends `retry-after-ms`).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    if let Some(ms) = value("retry-after-ms").filter(|v| v.is_finite() && *v >= 0.0) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    value("retry-after")
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(Duration::from_secs_f64)
}

/// The upstream's own error message, shortened; OpenAI's error bodies hold no secrets.
async fn error_detail(response: reqwest::Response) -> String {
    #[derive(Deserialize)]
    struct Body {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        message: String,
    }
    match response.json::<Body>().await {
        Ok(body) => {
            let mut m = body.error.message;
            if m.len() > 200 {
                let cut = (0..=200)
                    .rev()
                    .find(|i| m.is_char_boundary(*i))
                    .unwrap_or(0);
                m.truncate(cut);
            }
            format!(": {m}")
        }
        Err(_) => String::new(),
    }
}

/// A reqwest error without its URL (which is ours, but keeps messages short and stable).
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed".to_owned()
    }
}

/// Whether a stream's error is the request's timeout.
fn timed_out(e: &sse_stream::Error) -> bool {
    match e {
        sse_stream::Error::Body(e) => e
            .downcast_ref::<reqwest::Error>()
            .is_some_and(reqwest::Error::is_timeout),
        _ => false,
    }
}

fn describe_stream(e: &sse_stream::Error) -> String {
    match e {
        sse_stream::Error::Body(e) => match e.downcast_ref::<reqwest::Error>() {
            Some(e) => describe(e),
            None => e.to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_milliseconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "1500".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    /// A stream whose body is `body`, as a server sent it.
    fn stream_of(body: &str) -> ChatStream {
        let bytes = futures::stream::iter([Ok::<_, reqwest::Error>(Bytes::from(body.to_owned()))]);
        ChatStream {
            events: Box::pin(sse_stream::SseByteStream::new(bytes)),
            idle: Duration::from_secs(5),
            first_token_by: None,
            finish_reason: None,
            usage: Usage::default(),
            span: Span::none(),
        }
    }

    /// An image stream whose body is `body`.
    fn image_stream_of(body: &str) -> ImageStream {
        let bytes = futures::stream::iter([Ok::<_, reqwest::Error>(Bytes::from(body.to_owned()))]);
        ImageStream {
            events: Box::pin(sse_stream::SseByteStream::new(bytes)),
            deadline: tokio::time::Instant::now() + Duration::from_secs(5),
            partials: 0,
        }
    }

    #[tokio::test]
    async fn an_image_stream_gives_its_partials_then_the_picture() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let partial = |i: u32| {
            format!(
                "event: image_generation.partial_image\ndata: {{\"type\":\"image_generation.partial_image\",\"b64_json\":\"{}\",\"partial_image_index\":{i}}}\n\n",
                b64(&format!("partial {i}"))
            )
        };
        let body = format!(
            ": keep-alive\n\n{}{}event: image_generation.completed\ndata: {{\"type\":\"image_generation.completed\",\"b64_json\":\"{}\",\"usage\":{{\"output_tokens\":1256}}}}\n\n",
            partial(0),
            partial(1),
            b64("picture")
        );
        let mut stream = image_stream_of(&body);
        for i in 0..2 {
            let piece = stream.next().await.unwrap();
            assert_eq!(
                piece,
                ImagePiece::Partial(Bytes::from(format!("partial {i}")))
            );
        }
        assert_eq!(
            stream.next().await.unwrap(),
            ImagePiece::Done(Bytes::from("picture"))
        );
        assert_eq!(stream.partials(), 2);

        // Cut after a partial: retryable, and billed (the partial was).
        let mut cut = image_stream_of(&partial(0));
        assert!(matches!(cut.next().await, Ok(ImagePiece::Partial(_))));
        let failure = cut.next().await.unwrap_err();
        assert!(matches!(failure.error, UpstreamError::Retryable { .. }));
        assert!(failure.billed);
        // Cut before any: not billed.
        let failure = image_stream_of("").next().await.unwrap_err();
        assert!(!failure.billed);
    }

    #[tokio::test]
    async fn a_stream_ends_with_its_finish_reason_whatever_it_is_and_what_it_cost() {
        for reason in ["stop", "length", "content_filter"] {
            let mut stream = stream_of(&format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"Hi\"}},\"finish_reason\":null}}]}}\n\n\
                 data: {{\"choices\":[{{\"delta\":{{}},\"finish_reason\":\"{reason}\"}}]}}\n\n\
                 data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":1}}}}\n\n\
                 data: [DONE]\n\n"
            ));
            assert_eq!(stream.next().await, Ok(Piece::Text("Hi".to_owned())));
            let usage = Usage {
                prompt_tokens: 7,
                completion_tokens: 1,
            };
            let reason = reason.to_owned();
            assert_eq!(stream.next().await, Ok(Piece::End { usage, reason }));
        }
        // Without a finish reason, the stream did not end as the API ends one.
        let mut unfinished =
            stream_of("data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n");
        assert_eq!(unfinished.next().await, Ok(Piece::Text("Hi".to_owned())));
        assert!(matches!(
            unfinished.next().await,
            Err(UpstreamError::Retryable { .. })
        ));
    }

    #[test]
    fn rate_limits_and_server_errors_are_retryable_but_bad_requests_are_not() {
        assert!(is_retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(is_retryable(StatusCode::BAD_GATEWAY));
        assert!(!is_retryable(StatusCode::BAD_REQUEST));
        assert!(!is_retryable(StatusCode::UNAUTHORIZED));
    }
}
