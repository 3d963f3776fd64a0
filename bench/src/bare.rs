//! The baselines the API is compared with: bare axum handlers on the same runtime.
//!
//! - `/json` and `/sse`: the same bytes as the API's answer and its SSE hit, with the same
//!   content types (P1's ceiling);
//! - `/sse-events`: the SSE hit's events again, but through axum's `Sse` response with a
//!   keep-alive, as the API builds it: what that machinery costs on its own;
//! - `/idle`: an SSE stream that sends one event and then waits, with a keep-alive (M1's
//!   baseline: what an idle stream costs in axum alone).

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
    let listener = tokio::net::TcpListener::bind(&args.addr).await?;
    versus_shared::telemetry::announce(listener.local_addr()?);
    axum::serve(listener, app.into_make_service()).await?;
    Ok(())
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
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.arg("bare");
    if let Some(json) = json {
        command.arg("--json-file").arg(json);
    }
    if let Some(sse) = sse {
        command.arg("--sse-file").arg(sse);
    }
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
