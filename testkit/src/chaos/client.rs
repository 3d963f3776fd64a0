//! One client operation: a matchup asked for over SSE until it ends, as a browser's
//! EventSource and the page's Retry would: a lost connection resumes with `Last-Event-ID`, a
//! retryable error asks again, and everything that came back is recorded.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::header::ACCEPT;
use serde_json::Value;

use super::history::{Attempt, Op, OpKind, Outcome};
use super::run::Shared;
use super::schedule::Site;

/// How long one request may take before it counts as hung: well past the API's stream timeout
/// (`VERSUS_STREAM_TIMEOUT_SECS`, which the run sets to 30 s).
pub const ATTEMPT_DEADLINE: Duration = Duration::from_secs(60);
/// An operation asks again, after retryable errors and lost connections, until this long after
/// it began; then it gives up with the last error.
pub const OP_DEADLINE: Duration = Duration::from_secs(60);

/// What an operation is to do, drawn from its client's random stream before it starts.
#[derive(Debug, Clone)]
pub struct Spec {
    pub client: usize,
    pub kind: OpKind,
    pub a: String,
    pub b: String,
    /// The hot matchup it asks for, if it is one.
    pub hot: Option<usize>,
    /// The API of each attempt, in turn.
    pub sites: Vec<Site>,
    /// Drop the stream after this many chunks (once), then resume.
    pub drop_after: Option<usize>,
    /// The pause between the drop and the resume.
    pub resume_pause: Duration,
    /// The seed of its retry pauses.
    pub jitter: u64,
}

/// How one request ended.
enum End {
    Done,
    Error {
        code: String,
        message: String,
        retryable: bool,
        retry_after: Option<u64>,
    },
    /// The connection failed, or the stream ended without `done` or `error`.
    Lost(String),
    /// Dropped on purpose, to resume.
    Dropped,
}

/// What the client holds across requests.
#[derive(Default)]
struct Held {
    text: String,
    last_id: Option<String>,
    key: Option<String>,
    /// `meta.cached` of the last request.
    cached: bool,
}

/// Runs the operation to its end and records it.
pub async fn run(shared: &Shared, spec: Spec) -> Op {
    let id = shared.next_op_id();
    let start_ms = shared.now_ms();
    let begun = tokio::time::Instant::now();
    let mut jitter = fastrand::Rng::with_seed(spec.jitter);
    let mut held = Held::default();
    let mut attempts = Vec::new();
    let mut resume = false;
    let mut drop_after = spec.drop_after;
    let outcome = loop {
        let site = spec.sites[attempts.len() % spec.sites.len()];
        if !resume {
            held.text.clear();
            held.last_id = None;
        }
        let sent_id = if resume { held.last_id.clone() } else { None };
        let url = shared.stream_url(site, &spec.a, &spec.b);
        let attempt_start = shared.now_ms();
        let mut events = Events::default();
        let end = tokio::time::timeout(
            ATTEMPT_DEADLINE,
            request(
                shared,
                &url,
                sent_id.as_deref(),
                &mut held,
                drop_after,
                &mut events,
            ),
        )
        .await;
        if end.is_err() {
            events.push("(no end)");
        }
        attempts.push(Attempt {
            site,
            start_ms: attempt_start,
            end_ms: shared.now_ms(),
            last_event_id: sent_id,
            events: events.0,
        });
        let Ok(end) = end else {
            break Outcome::Hung {
                attempt_ms: ATTEMPT_DEADLINE.as_millis() as u64,
            };
        };
        if let Some(key) = &held.key
            && let Some(hot) = spec.hot
        {
            shared.learn_hot_key(hot, key);
        }
        let pause = match end {
            End::Done => {
                break Outcome::Done {
                    text: std::mem::take(&mut held.text),
                };
            }
            End::Error { code, .. } if code == "refused" => break Outcome::Refused,
            End::Error {
                code,
                message,
                retryable: false,
                ..
            } => break Outcome::Fatal { code, message },
            End::Error {
                code, retry_after, ..
            } => {
                if begun.elapsed() >= OP_DEADLINE {
                    break Outcome::GaveUp { code };
                }
                resume = false;
                let wait = retry_after.unwrap_or(0).min(3) * 1000;
                Duration::from_millis(wait.max(jitter.u64(200..800)))
            }
            End::Lost(why) => {
                if begun.elapsed() >= OP_DEADLINE {
                    break Outcome::GaveUp {
                        code: format!("lost: {why}"),
                    };
                }
                // EventSource reconnects with the last id it saw.
                resume = held.last_id.is_some();
                Duration::from_millis(jitter.u64(200..600))
            }
            End::Dropped => {
                drop_after = None;
                resume = held.last_id.is_some();
                spec.resume_pause
            }
        };
        tokio::time::sleep(pause).await;
    };
    Op {
        id,
        client: spec.client,
        kind: spec.kind,
        a: spec.a,
        b: spec.b,
        key: held.key,
        start_ms,
        end_ms: shared.now_ms(),
        attempts,
        outcome,
    }
}

/// One request at `site`, read to its end: whether `meta` said it was cached, and the text of
/// its `done`, or what came instead.
pub async fn once(shared: &Shared, site: Site, a: &str, b: &str) -> Result<(bool, String), String> {
    let url = shared.stream_url(site, a, b);
    let mut held = Held::default();
    let mut events = Events::default();
    let end = tokio::time::timeout(
        ATTEMPT_DEADLINE,
        request(shared, &url, None, &mut held, None, &mut events),
    )
    .await;
    match end {
        Ok(End::Done) => Ok((held.cached, held.text)),
        Ok(End::Error { code, message, .. }) => Err(format!("{}: {code}: {message}", events.0)),
        Ok(End::Lost(why)) => Err(format!("{}: {why}", events.0)),
        Ok(End::Dropped) => Err(events.0),
        Err(_) => Err(format!("{}: no end within {ATTEMPT_DEADLINE:?}", events.0)),
    }
}

/// One request: opens the stream and reads it to its end (or to the planned drop).
async fn request(
    shared: &Shared,
    url: &str,
    last_id: Option<&str>,
    held: &mut Held,
    drop_after: Option<usize>,
    events: &mut Events,
) -> End {
    let mut request = shared.http.get(url).header(ACCEPT, "text/event-stream");
    if let Some(id) = last_id {
        request = request.header("Last-Event-ID", id);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => {
            events.push("no answer");
            return End::Lost(format!("{e}"));
        }
    };
    let status = response.status();
    if status != reqwest::StatusCode::OK {
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body: Value = response.json().await.unwrap_or_default();
        let code = body["error"]["code"].as_str().unwrap_or("?").to_owned();
        events.push(&format!("http {} {code}", status.as_u16()));
        let retryable = status.as_u16() == 429 || status.is_server_error();
        return End::Error {
            message: body["error"]["message"].as_str().unwrap_or("").to_owned(),
            code: if status.as_u16() == 422 && code == "refused" {
                "refused".to_owned()
            } else {
                code
            },
            retryable,
            retry_after,
        };
    }
    let mut stream = response.bytes_stream().eventsource();
    let mut chunks = 0;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                events.push("lost");
                return End::Lost(e.to_string());
            }
        };
        events.push(&event.event);
        let data: Value = serde_json::from_str(&event.data).unwrap_or_default();
        match event.event.as_str() {
            "meta" => {
                held.key = data["key"].as_str().map(str::to_owned);
                held.cached = data["cached"].as_bool().unwrap_or(false);
            }
            "chunk" => {
                held.text
                    .push_str(data["delta"].as_str().unwrap_or_default());
                held.last_id = Some(event.id.clone());
                chunks += 1;
                if drop_after == Some(chunks) {
                    events.push("dropped");
                    return End::Dropped;
                }
            }
            "reset" => held.text.clear(),
            "done" => return End::Done,
            "error" => {
                return End::Error {
                    code: data["code"].as_str().unwrap_or("?").to_owned(),
                    message: data["message"].as_str().unwrap_or("").to_owned(),
                    retryable: data["retryable"].as_bool().unwrap_or(false),
                    retry_after: data["retry_after"].as_u64(),
                };
            }
            _ => {}
        }
    }
    events.push("ended");
    End::Lost("the stream ended without done or error".to_owned())
}

/// The names of the events of one request, consecutive chunks folded: `meta chunk*7 done`.
#[derive(Default)]
struct Events(String);

impl Events {
    fn push(&mut self, name: &str) {
        if name == "chunk" {
            let start = self.0.rfind(' ').map_or(0, |i| i + 1);
            if let Some(n) = self.0[start..].strip_prefix("chunk*")
                && let Ok(n) = n.parse::<u64>()
            {
                self.0.truncate(start);
                self.0.push_str(&format!("chunk*{}", n + 1));
                return;
            }
            return self.word("chunk*1");
        }
        self.word(name);
    }

    fn word(&mut self, word: &str) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        self.0.push_str(word);
    }
}
