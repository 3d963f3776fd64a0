//! The baselines the API is compared with: bare axum handlers on the same runtime.
//!
//! - `/json` and `/sse`: the same bytes as the API's answer and its SSE hit, with the same
//!   content types (P1's ceiling);
//! - `/sse-events`: the SSE hit's events again, but through axum's `Sse` response with a
//!   keep-alive, as the API builds it: what that machinery costs on its own;
//! - `/idle`: an SSE stream that sends one event and then waits, with a keep-alive (M1's
//!   baseline: what an idle stream costs in axum alone);
//! - `/viral` (with `--viral-subject`): every connection gets a `meta` event, then each
//!   message of that NATS subject as it arrives, its bytes written as they are, through one
//!   `tokio::sync::broadcast` channel, until one that begins `event: done` (P10's baseline: a
//!   fan-out with no Versus code).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Router, routing::get};
use bytes::Bytes;
use futures::{StreamExt, stream};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(clap::Args)]
pub struct Args {
    /// Body of `GET /json` (served as application/json).
    #[arg(long)]
    pub json_file: Option<PathBuf>,
    /// Body of `GET /sse` (served as text/event-stream), and the events of `/sse-events`.
    #[arg(long)]
    pub sse_file: Option<PathBuf>,
    /// Address to listen on; port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub addr: String,
    /// Serve `/viral`, fed by this NATS subject (P10).
    #[arg(long, requires_all = ["nats_url", "nats_password"])]
    pub viral_subject: Option<String>,
    /// NATS for `/viral`, logged in as `versus-admin`.
    #[arg(long)]
    pub nats_url: Option<String>,
    #[arg(long)]
    pub nats_password: Option<String>,
}

/// The API's heartbeat interval (VERSUS_SSE_HEARTBEAT_SECS default).
const HEARTBEAT: Duration = Duration::from_secs(15);

pub async fn run(args: Args) -> anyhow::Result<()> {
    let read = |file: &Option<PathBuf>| -> anyhow::Result<Bytes> {
        Ok(match file {
            Some(path) => Bytes::from(
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            ),
            None => Bytes::new(),
        })
    };
    let json = read(&args.json_file)?;
    let sse = read(&args.sse_file)?;
    let events = parse_events(&String::from_utf8_lossy(&sse));
    let app = Router::new()
        .route(
            "/json",
            get(move || {
                let body = json.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], body) }
            }),
        )
        .route(
            "/sse",
            get(move || {
                let body = sse.clone();
                async move { ([(header::CONTENT_TYPE, "text/event-stream")], body) }
            }),
        )
        .route(
            "/sse-events",
            get(move || {
                let events = events.clone();
                async move { sse_response(stream::iter(events.into_iter().map(Ok))) }
            }),
        )
        .route(
            "/idle",
            get(|| async {
                let first = Event::default().event("meta").data("{}");
                sse_response(stream::once(async { Ok(first) }).chain(stream::pending()))
            }),
        );
    let app = match &args.viral_subject {
        Some(subject) => app.route("/viral", get(viral(&args, subject).await?)),
        None => app,
    };
    let listener = tokio::net::TcpListener::bind(&args.addr).await?;
    versus_shared::telemetry::announce(listener.local_addr()?);
    axum::serve(listener, app.into_make_service()).await?;
    Ok(())
}

/// The `/viral` handler: a broadcast channel fed by the subject's messages; each connection
/// writes `meta`, then every message's bytes, until it closes.
async fn viral(
    args: &Args,
    subject: &str,
) -> anyhow::Result<impl Fn() -> std::future::Ready<Response> + Clone + Send + 'static> {
    let (Some(url), Some(password)) = (&args.nats_url, &args.nats_password) else {
        anyhow::bail!("--viral-subject needs --nats-url and --nats-password");
    };
    let nats = crate::nats_as_admin(url, password).await?;
    let mut messages = nats.subscribe(subject.to_owned()).await?;
    nats.flush().await?;
    let (frames, _) = tokio::sync::broadcast::channel::<Bytes>(1024);
    let feed = frames.clone();
    tokio::spawn(async move {
        // Kept alive by this task, which ends with the process.
        let _nats = nats;
        while let Some(message) = messages.next().await {
            let _ = feed.send(message.payload);
        }
    });
    Ok(move || {
        let receiver = frames.subscribe();
        let meta = Bytes::from_static(b"event: meta\ndata: {}\n\n");
        // As the API's, the stream ends after `done`.
        let body = stream::once(async move { Ok::<_, Infallible>(meta) }).chain(stream::unfold(
            Some(receiver),
            |receiver| async move {
                let mut receiver = receiver?;
                loop {
                    match receiver.recv().await {
                        Ok(frame) => {
                            let more = !frame.starts_with(b"event: done");
                            return Some((Ok(frame), more.then_some(receiver)));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        ));
        let mut response = axum::body::Body::from_stream(body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        std::future::ready(response)
    })
}

/// An SSE response as the API makes one: keep-alive comments and the same headers.
fn sse_response(
    events: impl futures::Stream<Item = Result<Event, Infallible>> + Send + 'static,
) -> Response {
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(HEARTBEAT))
        .into_response();
    let headers = response.headers_mut();
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The events of an SSE body (`event:`, `id:` and one `data:` line each).
fn parse_events(body: &str) -> Vec<Event> {
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut event = Event::default();
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event = event.event(name);
                } else if let Some(id) = line.strip_prefix("id: ") {
                    event = event.id(id);
                } else if let Some(data) = line.strip_prefix("data: ") {
                    event = event.data(data);
                }
            }
            event
        })
        .collect()
}

/// Starts `versus-bench bare` as a process of its own (not sharing this one's runtime).
pub async fn spawn(
    json: Option<&Path>,
    sse: Option<&Path>,
) -> anyhow::Result<(tokio::process::Child, String)> {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    if let Some(json) = json {
        args.extend(["--json-file".into(), json.into()]);
    }
    if let Some(sse) = sse {
        args.extend(["--sse-file".into(), sse.into()]);
    }
    spawn_with(args).await
}

/// Starts `versus-bench bare ARGS…` as a process of its own; its URL.
pub async fn spawn_with(
    args: Vec<std::ffi::OsString>,
) -> anyhow::Result<(tokio::process::Child, String)> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.arg("bare").args(args);
    let mut child = command.stdout(Stdio::piped()).kill_on_drop(true).spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .context("the bare server did not start")??;
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .context("the bare server did not say where it listens")?
        .to_owned();
    Ok((child, url))
}
