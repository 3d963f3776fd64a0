//! P10: a viral fight. `n` viewers of one generation at one API replica: per chunk, the delay
//! from its arrival at the API to the last (and the first) viewer receiving it, and the API's
//! CPU per event delivered; beside a bare tokio broadcast SSE server (`versus-bench bare`,
//! `/viral`) that writes the same frames, at the same spacing, to the same number of sockets.
//!
//! The generation starts only once every viewer has joined: the script stops its workers
//! first, so that the viewers' one flight queues its job, and this command starts one worker
//! (`--worker-bin`, with this process's environment) once all of them are in, and stops it
//! after. A chunk's arrival at the API is stamped by this process's own subscription to the
//! matchup's events subject, the one the API's flight reads: the same NATS server, a loopback
//! hop away; the bare server's frames are stamped the same way on the subject it reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinHandle;
use versus_shared::wire;

use crate::many;
use crate::report::{Row, Section};
use crate::sim::Sim;
use crate::stats::{Summary, fmt_count, fmt_ms};

/// Goal: the last viewer's delay and the CPU per event within this many times the bare
/// server's.
const GOAL_RATIO: f64 = 1.5;
/// Milliseconds to the first token, once the worker calls.
const TTFT_MS: u64 = 200;
/// The longest any phase may take.
const PHASE_LIMIT: Duration = Duration::from_secs(300);

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub api: String,
    /// The API's process id: its CPU time is read from `/proc`.
    #[arg(long)]
    pub api_pid: u32,
    #[arg(long)]
    pub sim: String,
    /// NATS, as `NATS_URL` takes it, logged in as `versus-admin`: chunks are stamped on the
    /// matchup's events subject, and the bare server is fed through it.
    #[arg(long)]
    pub nats_url: String,
    #[arg(long)]
    pub nats_password: String,
    /// The worker, started once every viewer has joined (no other may run); it inherits this
    /// process's environment, `NATS_URL` and `DATABASE_URL` included.
    #[arg(long)]
    pub worker_bin: PathBuf,
    /// Where the worker's output goes (else nowhere).
    #[arg(long)]
    pub worker_log: Option<PathBuf>,
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Viewers.
    #[arg(long)]
    pub n: usize,
    /// Tokens in the answer: about one chunk each.
    #[arg(long, default_value_t = 40)]
    pub tokens: u64,
    /// The simulator's pace; by default 20,000 ÷ n tokens per second (1 to 20), so that a
    /// chunk's fan-out is over well before the next chunk comes.
    #[arg(long)]
    pub tokens_per_sec: Option<u64>,
    /// Viewers being connected at once.
    #[arg(long, default_value_t = 256)]
    pub open_concurrency: usize,
}

#[derive(Serialize, Deserialize)]
pub struct Raw {
    pub n: usize,
    pub tokens: u64,
    pub tokens_per_sec: u64,
    pub api: Side,
    pub bare: Side,
}

/// One server's run.
#[derive(Serialize, Deserialize, Default)]
pub struct Side {
    pub joined: usize,
    /// Viewers that received every chunk and the `done`.
    pub complete: usize,
    pub chunks: usize,
    /// The median gap between two chunks' arrivals.
    pub spacing_ms: f64,
    /// Per chunk, its arrival at the last viewer minus its arrival at the server.
    pub last: Summary,
    /// The same for the first viewer.
    pub first: Summary,
    /// The last viewer's delay of each chunk, in order.
    pub last_ms: Vec<f64>,
    /// The first viewer's.
    #[serde(default)]
    pub first_ms: Vec<f64>,
    /// When each chunk, then the `done`, reached the server, from the first chunk.
    #[serde(default)]
    pub at_ms: Vec<f64>,
    /// The server's CPU time from just before the first chunk to the last viewer's `done`.
    pub cpu_secs: f64,
    /// Events delivered to viewers over that time (chunks and the `done`).
    pub delivered: u64,
    pub open_secs: f64,
    pub errors: Vec<String>,
}

impl Side {
    pub fn cpu_us_per_event(&self) -> f64 {
        self.cpu_secs * 1e6 / self.delivered.max(1) as f64
    }
}

fn file(n: usize) -> String {
    format!("viral-{n}.json")
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let tokens_per_sec = args
        .tokens_per_sec
        .unwrap_or_else(|| (20_000 / args.n.max(1) as u64).clamp(1, 20));
    let sim = Sim::new(&args.sim)?;
    sim.reset_with(TTFT_MS, tokens_per_sec).await?;
    reqwest::Client::new()
        .post(format!("{}/_sim/config", args.sim.trim_end_matches('/')))
        .json(&json!({ "answer_tokens": args.tokens }))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .context("setting the simulator's answer length")?;

    // The API: every viewer on one new matchup, then the worker.
    let url = crate::sse::stream_url(
        &args.api,
        &format!("Viral {}", crate::run_id()),
        "The Crowd",
    )?;
    let started = Instant::now();
    let viewers = Viewers::open(url, args.n, args.open_concurrency);
    let meta = viewers.wait_joined().await?;
    let open_secs = started.elapsed().as_secs_f64();
    let key = serde_json::from_str::<serde_json::Value>(&meta)?["key"]
        .as_str()
        .context("meta has no key")?
        .to_owned();
    let subject = format!("versus.events.text.{key}");
    let stamps = Follower::start(&args, subject, api_end).await?;
    // Whatever joining left to do settles first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_before = cpu_ns(args.api_pid)?;
    let mut worker = start_worker(&args)?;
    let api_done = viewers.wait_done().await;
    let cpu_after = cpu_ns(args.api_pid)?;
    stop(&mut worker).await;
    let (joined, seen, mut errors) = viewers.close().await;
    if let Err(e) = api_done {
        errors.push(format!("{e:#}"));
    }
    let stamps = stamps.finish()?;
    let api_chunks = api_stamps(&stamps)?;
    // The bare server gets the same frames, at the same offsets from the first chunk.
    let frames = replay(&api_chunks, &seen)?;
    let api = side(
        &api_chunks,
        (joined, seen, errors),
        (cpu_after - cpu_before) as f64 / 1e9,
        open_secs,
    );
    eprintln!(
        "P10 {} viewers, API: {}",
        fmt_count(args.n as f64),
        brief(&api)
    );

    let subject = format!("bench.viral.{}", crate::run_id());
    let (mut child, bare_url) = crate::bare::spawn_with(vec![
        "--viral-subject".into(),
        subject.clone().into(),
        "--nats-url".into(),
        args.nats_url.clone().into(),
        "--nats-password".into(),
        args.nats_password.clone().into(),
    ])
    .await?;
    let bare_pid = child.id().context("the bare server has no pid")?;
    let started = Instant::now();
    let viewers = Viewers::open(
        reqwest::Url::parse(&format!("{bare_url}/viral"))?,
        args.n,
        args.open_concurrency,
    );
    viewers.wait_joined().await?;
    let open_secs = started.elapsed().as_secs_f64();
    let stamps = Follower::start(&args, subject.clone(), bare_end).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_before = cpu_ns(bare_pid)?;
    let publisher = publish(&args, subject, frames);
    let bare_done = viewers.wait_done().await;
    let cpu_after = cpu_ns(bare_pid)?;
    let (joined, seen, mut errors) = viewers.close().await;
    if let Err(e) = bare_done {
        errors.push(format!("{e:#}"));
    }
    if let Err(e) = publisher
        .join()
        .map_err(|_| anyhow::anyhow!("the publisher panicked"))?
    {
        errors.push(format!("publishing: {e:#}"));
    }
    child.kill().await?;
    let bare_chunks = bare_stamps(&stamps.finish()?);
    let bare = side(
        &bare_chunks,
        (joined, seen, errors),
        (cpu_after - cpu_before) as f64 / 1e9,
        open_secs,
    );
    eprintln!(
        "P10 {} viewers, bare: {}",
        fmt_count(args.n as f64),
        brief(&bare)
    );
    sim.reset_with(0, 0).await?;
    let raw = Raw {
        n: args.n,
        tokens: args.tokens,
        tokens_per_sec,
        api,
        bare,
    };
    crate::write_json(&args.out_dir.join(file(args.n)), &raw)
}

fn brief(s: &Side) -> String {
    format!(
        "{} chunks to {}/{} viewers; last viewer p50 {} ms, p99 {} ms; {:.2} µs CPU per event",
        s.chunks,
        s.complete,
        s.joined,
        fmt_ms(s.last.p50_ms),
        fmt_ms(s.last.p99_ms),
        s.cpu_us_per_event()
    )
}

/// The worker that makes the answer, with this process's environment.
fn start_worker(args: &Args) -> anyhow::Result<tokio::process::Child> {
    let (stdout, stderr) = match &args.worker_log {
        Some(path) => {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            (Stdio::from(log.try_clone()?), Stdio::from(log))
        }
        None => (Stdio::null(), Stdio::null()),
    };
    tokio::process::Command::new(&args.worker_bin)
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", args.worker_bin.display()))
}

/// SIGTERM, then SIGKILL after 5 s.
async fn stop(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

/// Nanoseconds on a CPU of every thread of `pid` (`/proc/PID/task/*/schedstat`), or of the
/// process as a whole in clock ticks where the kernel keeps no schedstat.
fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("reading /proc/{pid}/task"))?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            let ticks = crate::procs::tree_ticks(pid) as f64;
            return Ok((ticks / crate::procs::ticks_per_sec() * 1e9) as u64);
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// What one viewer received.
#[derive(Default)]
struct Seen {
    /// Each chunk's id and arrival.
    chunks: Vec<(String, Instant)>,
    done: bool,
    /// The frames as written (the first viewer's only), id first (none for `done`).
    frames: Vec<(Option<String>, String)>,
}

/// `n` viewers of one URL, each on a connection of its own.
struct Viewers {
    tasks: Vec<JoinHandle<anyhow::Result<Seen>>>,
    joined: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    meta: watch::Receiver<Option<String>>,
    close: watch::Sender<bool>,
}

impl Viewers {
    fn open(url: reqwest::Url, n: usize, concurrency: usize) -> Viewers {
        let sources = Arc::new(many::Sources::fresh(n));
        let target = many::Target::of(&url).map_err(|e| format!("{e:#}"));
        let gate = Arc::new(Semaphore::new(concurrency));
        let joined = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (meta_tx, meta) = watch::channel(None);
        let meta_tx = Arc::new(meta_tx);
        let (close, closed) = watch::channel(false);
        let tasks = (0..n)
            .map(|i| {
                let (sources, target, gate) = (sources.clone(), target.clone(), gate.clone());
                let (joined, finished, failed) = (joined.clone(), finished.clone(), failed.clone());
                let (meta_tx, mut closed) = (meta_tx.clone(), closed.clone());
                tokio::spawn(async move {
                    let viewer = async {
                        let target = target.map_err(anyhow::Error::msg)?;
                        let mut events = {
                            let _permit = gate.acquire().await?;
                            let mut events = many::open(&target, &sources).await?;
                            match events.next().await {
                                Some(Ok(e)) if e.event == "meta" => {
                                    if i == 0 {
                                        meta_tx.send_replace(Some(e.data));
                                    }
                                }
                                other => bail!("expected meta first, got {other:?}"),
                            }
                            events
                        };
                        joined.fetch_add(1, Ordering::SeqCst);
                        let mut seen = Seen::default();
                        while !seen.done {
                            let event = match events.next().await {
                                Some(Ok(event)) => event,
                                Some(Err(e)) => bail!("{e}"),
                                None => bail!("the stream ended before done"),
                            };
                            let at = Instant::now();
                            match event.event.as_str() {
                                "chunk" => {
                                    if i == 0 {
                                        seen.frames.push((Some(event.id.clone()), frame(&event)));
                                    }
                                    seen.chunks.push((event.id, at));
                                }
                                "done" => {
                                    if i == 0 {
                                        seen.frames.push((None, frame(&event)));
                                    }
                                    seen.done = true;
                                }
                                "error" => bail!("error: {}", event.data),
                                _ => {}
                            }
                        }
                        finished.fetch_add(1, Ordering::SeqCst);
                        // Held open until every viewer is done: closing is not measured.
                        let _ = closed.wait_for(|close| *close).await;
                        drop(events);
                        Ok(seen)
                    };
                    let result = viewer.await;
                    if result.is_err() {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    result
                })
            })
            .collect();
        Viewers {
            tasks,
            joined,
            finished,
            failed,
            meta,
            close,
        }
    }

    /// Waits until every viewer has its `meta` (or failed); the first viewer's `meta` data.
    async fn wait_joined(&self) -> anyhow::Result<String> {
        self.wait_for(&self.joined, "joined").await?;
        let meta = self.meta.borrow().clone();
        match meta {
            Some(meta) if self.joined.load(Ordering::SeqCst) > 0 => Ok(meta),
            _ => bail!(
                "no viewer joined (the first one failed, or all {} did)",
                self.failed.load(Ordering::SeqCst)
            ),
        }
    }

    /// Waits until every viewer has its `done` (or failed).
    async fn wait_done(&self) -> anyhow::Result<()> {
        self.wait_for(&self.finished, "done").await
    }

    async fn wait_for(&self, counter: &AtomicUsize, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + PHASE_LIMIT;
        let n = self.tasks.len();
        loop {
            let (count, failed) = (
                counter.load(Ordering::SeqCst),
                self.failed.load(Ordering::SeqCst),
            );
            if count + failed >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{count} of {n} viewers {what} ({failed} failed) after {PHASE_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Closes every stream; how many joined, what each viewer that finished saw, and the
    /// others' errors.
    async fn close(self) -> (usize, Vec<Seen>, Vec<String>) {
        let _ = self.close.send(true);
        let joined = self.joined.load(Ordering::SeqCst);
        let mut seen = Vec::new();
        let mut errors = Vec::new();
        for task in self.tasks {
            match tokio::time::timeout(Duration::from_secs(10), task).await {
                Ok(Ok(Ok(s))) => seen.push(s),
                Ok(Ok(Err(e))) => errors.push(format!("{e:#}")),
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(_) => errors.push("a viewer did not close within 10 s".to_owned()),
            }
        }
        (joined, seen, crate::stats::count_distinct(errors))
    }
}

/// An event's bytes as the API writes it (axum's `Sse`: `event`, `data`, then `id`).
fn frame(event: &eventsource_stream::Event) -> String {
    if event.id.is_empty() {
        format!("event: {}\ndata: {}\n\n", event.event, event.data)
    } else {
        format!(
            "event: {}\ndata: {}\nid: {}\n\n",
            event.event, event.data, event.id
        )
    }
}

/// A subscription on a thread of its own (a current-thread runtime, so that thousands of busy
/// viewer tasks do not delay its stamps), stamping each message as it arrives, until `end`
/// says one ends the answer.
struct Follower {
    thread: std::thread::JoinHandle<anyhow::Result<Vec<(Bytes, Instant)>>>,
}

impl Follower {
    async fn start(
        args: &Args,
        subject: String,
        end: fn(&[u8]) -> bool,
    ) -> anyhow::Result<Follower> {
        let (url, password) = (args.nats_url.clone(), args.nats_password.clone());
        let (ready_tx, ready) = oneshot::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let nats = crate::nats_as_admin(&url, &password).await?;
                let mut messages = nats.subscribe(subject).await?;
                nats.flush().await?;
                let _ = ready_tx.send(());
                let mut stamps = Vec::new();
                loop {
                    let message = tokio::time::timeout(PHASE_LIMIT, messages.next())
                        .await
                        .context("no end of the answer on its subject")?
                        .context("the subscription ended")?;
                    let at = Instant::now();
                    let ended = end(&message.payload);
                    stamps.push((message.payload, at));
                    if ended {
                        return anyhow::Ok(stamps);
                    }
                }
            })
        });
        if ready.await.is_err() {
            return match thread.join() {
                Ok(Err(e)) => Err(e.context("following the subject")),
                _ => bail!("following the subject failed"),
            };
        }
        Ok(Follower { thread })
    }

    fn finish(self) -> anyhow::Result<Vec<(Bytes, Instant)>> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the follower panicked"))?
    }
}

fn api_end(payload: &[u8]) -> bool {
    matches!(
        serde_json::from_slice::<wire::Event>(payload),
        Ok(wire::Event::Done { .. } | wire::Event::Error { .. } | wire::Event::Purged)
    )
}

fn bare_end(payload: &[u8]) -> bool {
    payload.starts_with(b"event: done")
}

/// The chunks of an answer as they reached a server, by SSE id, and when its end came.
struct Stamps {
    chunks: Vec<(String, Instant)>,
    end: Option<Instant>,
}

fn api_stamps(stamps: &[(Bytes, Instant)]) -> anyhow::Result<Stamps> {
    let mut chunks = Vec::new();
    let mut end = None;
    for (payload, at) in stamps {
        match serde_json::from_slice::<wire::Event>(payload).context("an event")? {
            wire::Event::Chunk {
                attempt,
                offset,
                delta,
            } => chunks.push((format!("{attempt}:{}", offset + delta.len()), *at)),
            wire::Event::Done { .. } => end = Some(*at),
            wire::Event::Error { message, .. } => bail!("the generation failed: {message}"),
            _ => {}
        }
    }
    Ok(Stamps { chunks, end })
}

fn bare_stamps(stamps: &[(Bytes, Instant)]) -> Stamps {
    let mut chunks = Vec::new();
    let mut end = None;
    for (payload, at) in stamps {
        let text = String::from_utf8_lossy(payload);
        if text.starts_with("event: done") {
            end = Some(*at);
        } else if let Some(id) = text.lines().find_map(|l| l.strip_prefix("id: ")) {
            chunks.push((id.to_owned(), *at));
        }
    }
    Stamps { chunks, end }
}

/// The first viewer's frames, each at its chunk's offset from the first chunk at the API.
fn replay(stamps: &Stamps, seen: &[Seen]) -> anyhow::Result<Vec<(Duration, Bytes)>> {
    let first_viewer = seen
        .iter()
        .find(|s| !s.frames.is_empty())
        .context("the first viewer did not finish")?;
    let start = stamps.chunks.first().context("no chunk reached the API")?.1;
    let at: HashMap<&str, Instant> = stamps
        .chunks
        .iter()
        .map(|(id, at)| (id.as_str(), *at))
        .collect();
    first_viewer
        .frames
        .iter()
        .map(|(id, frame)| {
            let when = match id {
                Some(id) => at.get(id.as_str()).copied(),
                None => stamps.end,
            }
            .with_context(|| format!("no arrival for frame {id:?}"))?;
            Ok((when - start, Bytes::from(frame.clone())))
        })
        .collect()
}

/// Publishes `frames` to `subject` at their offsets, from a thread of its own.
fn publish(
    args: &Args,
    subject: String,
    frames: Vec<(Duration, Bytes)>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    let (url, password) = (args.nats_url.clone(), args.nats_password.clone());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let nats = crate::nats_as_admin(&url, &password).await?;
            let start = tokio::time::Instant::now() + Duration::from_millis(TTFT_MS);
            for (offset, frame) in frames {
                tokio::time::sleep_until(start + offset).await;
                nats.publish(subject.clone(), frame).await?;
                nats.flush().await?;
            }
            Ok(())
        })
    })
}

/// The figures of one run from the server's stamps and what the viewers saw.
fn side(
    stamps: &Stamps,
    (joined, seen, errors): (usize, Vec<Seen>, Vec<String>),
    cpu_secs: f64,
    open_secs: f64,
) -> Side {
    // Per chunk id: its earliest and latest arrival at a viewer.
    let mut arrivals: HashMap<&str, (Instant, Instant)> = HashMap::new();
    for s in &seen {
        for (id, at) in &s.chunks {
            arrivals
                .entry(id.as_str())
                .and_modify(|(first, last)| {
                    *first = (*first).min(*at);
                    *last = (*last).max(*at);
                })
                .or_insert((*at, *at));
        }
    }
    let mut firsts = Vec::new();
    let mut lasts = Vec::new();
    for (id, at) in &stamps.chunks {
        if let Some((first, last)) = arrivals.get(id.as_str()) {
            firsts.push(first.saturating_duration_since(*at));
            lasts.push(last.saturating_duration_since(*at));
        }
    }
    let mut gaps: Vec<Duration> = stamps
        .chunks
        .windows(2)
        .map(|w| w[1].1.saturating_duration_since(w[0].1))
        .collect();
    gaps.sort_unstable();
    let chunks = stamps.chunks.len();
    Side {
        joined,
        complete: seen
            .iter()
            .filter(|s| s.done && s.chunks.len() == chunks)
            .count(),
        chunks,
        spacing_ms: gaps
            .get(gaps.len() / 2)
            .map_or(0.0, |g| g.as_secs_f64() * 1e3),
        last: Summary::of(&lasts),
        first: Summary::of(&firsts),
        last_ms: lasts.iter().map(|d| d.as_secs_f64() * 1e3).collect(),
        first_ms: firsts.iter().map(|d| d.as_secs_f64() * 1e3).collect(),
        at_ms: stamps
            .chunks
            .iter()
            .map(|(_, at)| *at)
            .chain(stamps.end)
            .map(|at| {
                let start = stamps.chunks.first().map_or(at, |(_, first)| *first);
                at.saturating_duration_since(start).as_secs_f64() * 1e3
            })
            .collect(),
        cpu_secs,
        delivered: seen
            .iter()
            .map(|s| s.chunks.len() as u64 + u64::from(s.done))
            .sum(),
        open_secs,
        errors,
    }
}

pub fn sections(dir: &Path) -> anyhow::Result<Vec<Section>> {
    let (mut runs, skipped) = crate::report::load_runs::<Raw>(dir, "viral")?;
    if runs.is_empty() && skipped.is_none() {
        return Ok(vec![Section::skipped(
            "P10",
            "A viral fight",
            "not in this run",
        )]);
    }
    runs.sort_by_key(|r| r.n);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for r in &runs {
        let (a, b) = (&r.api, &r.bare);
        let viewers = fmt_count(r.n as f64);
        let ratio50 = a.last.p50_ms / b.last.p50_ms.max(1e-3);
        let ratio99 = a.last.p99_ms / b.last.p99_ms.max(1e-3);
        let complete = a.complete == r.n && b.complete == r.n;
        rows.push(Row {
            what: format!(
                "{viewers} viewers, {} chunks: the chunk's arrival to the last viewer, p50 / p99",
                a.chunks
            ),
            measured: format!("{} / {} ms", fmt_ms(a.last.p50_ms), fmt_ms(a.last.p99_ms)),
            baseline: format!(
                "bare broadcast: {} / {} ms",
                fmt_ms(b.last.p50_ms),
                fmt_ms(b.last.p99_ms)
            ),
            ratio: format!("{ratio50:.2}× / {ratio99:.2}×"),
            goal: format!("≤ {GOAL_RATIO}×"),
            met: Some(ratio50 <= GOAL_RATIO && ratio99 <= GOAL_RATIO && complete),
        });
        let cpu_ratio = a.cpu_us_per_event() / b.cpu_us_per_event().max(1e-9);
        rows.push(Row {
            what: format!("{viewers} viewers: CPU per event delivered"),
            measured: format!(
                "{:.2} µs ({:.2} s over {} events)",
                a.cpu_us_per_event(),
                a.cpu_secs,
                fmt_count(a.delivered as f64)
            ),
            baseline: format!(
                "bare broadcast: {:.2} µs ({:.2} s)",
                b.cpu_us_per_event(),
                b.cpu_secs
            ),
            ratio: format!("{cpu_ratio:.2}×"),
            goal: format!("≤ {GOAL_RATIO}×"),
            met: Some(cpu_ratio <= GOAL_RATIO && complete),
        });
        rows.push(Row::info(
            format!("{viewers} viewers: the chunk's arrival to the first viewer, p50 / p99"),
            format!(
                "{} / {} ms (bare: {} / {} ms); a chunk every {} ms",
                fmt_ms(a.first.p50_ms),
                fmt_ms(a.first.p99_ms),
                fmt_ms(b.first.p50_ms),
                fmt_ms(b.first.p99_ms),
                fmt_ms(a.spacing_ms)
            ),
        ));
        for (name, s) in [("API", a), ("bare", b)] {
            if s.complete < r.n {
                notes.push(format!(
                    "{viewers} viewers, {name}: {} joined, {} received every chunk and the done.",
                    fmt_count(s.joined as f64),
                    fmt_count(s.complete as f64)
                ));
            }
            if s.last.p50_ms > s.spacing_ms {
                notes.push(format!(
                    "{viewers} viewers, {name}: the median fan-out ({} ms) outlasted the \
                     spacing of the chunks ({} ms): most fan-outs overlapped the next.",
                    fmt_ms(s.last.p50_ms),
                    fmt_ms(s.spacing_ms)
                ));
            }
            notes.extend(
                s.errors
                    .iter()
                    .map(|e| format!("{viewers} viewers, {name}: {e}")),
            );
        }
    }
    if let Some(s) = skipped {
        rows.extend(s.rows("viewers"));
    }
    Ok(vec![Section {
        id: "P10",
        title: "A viral fight",
        method: format!(
            "Viewers of one new matchup at one API replica: the script stops its workers, the \
             load generator (one process, hyper's HTTP/1.1 client, one connection per viewer, \
             spread over loopback source addresses) opens every viewer — one flight, its job \
             queued — and only once all have their `meta` does it start one worker, whose \
             simulator answers {} tokens after {TTFT_MS} ms at a pace of 20,000 ÷ viewers \
             tokens per second (1 to 20), about one chunk each, so that one chunk's fan-out \
             is over before the next one comes. The chunk's arrival at the API is stamped by \
             the load generator's own subscription (as `versus-admin`, on a thread of its \
             own) to the events subject the API's flight reads: the same server, within a \
             loopback hop of the API's arrival. Per chunk, its arrival at the last (and the \
             first) viewer minus that stamp; p50 and p99 over the chunks (with a few dozen \
             chunks p99 is their maximum). CPU: the server's CPU time (every thread's \
             `/proc/PID/task/*/schedstat`) from a second after the last viewer joined to the \
             last viewer's `done` (the `started` event's wake-ups included, the connections' \
             opening and closing not) ÷ events delivered (chunks and `done`, summed over \
             viewers). Baseline: `versus-bench bare` serving `/viral`, a tokio `broadcast` \
             channel fed by a NATS subscription whose every frame each connection writes as \
             it is, ending its response after `done` as the API does; the load generator then \
             publishes the frames the API wrote (the first viewer's chunks and `done`, byte \
             for byte) at the offsets their chunks reached the API, and measures the same \
             way, on the same number of sockets. The end of an answer comes in a burst (the \
             worker sends its last chunks and `done` within a few tens of milliseconds, \
             replayed alike to the bare server): those fan-outs overlap each other and the \
             streams' ending, which is what p99 (the slowest chunk) shows on both sides. \
             Limits on this 2-core machine: the viewers' reader (tens of thousands of sockets \
             read and parsed) shares the cores with the server, so a fan-out's time is the \
             server's and the reader's together, on both sides; and the hard open-file limit \
             caps the viewers at its value less a margin (the API and the load generator each \
             hold one socket per viewer).",
            runs.first().map_or(40, |r| r.tokens)
        ),
        rows,
        notes,
        skipped: None,
        appendix: String::new(),
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunks_id_is_the_one_the_api_writes_and_the_bare_frames_carry_it() {
        let at = Instant::now();
        let chunk = serde_json::to_vec(&wire::Event::Chunk {
            attempt: 3,
            offset: 5,
            delta: "world".to_owned(),
        })
        .unwrap();
        let done = serde_json::to_vec(&wire::Event::Done {
            attempt: 3,
            model: "m".to_owned(),
            length: 10,
        })
        .unwrap();
        let stamps = api_stamps(&[(chunk.into(), at), (done.clone().into(), at)]).unwrap();
        assert_eq!(stamps.chunks[0].0, "3:10");
        assert!(stamps.end.is_some() && api_end(&done));

        let event = eventsource_stream::Event {
            event: "chunk".to_owned(),
            data: r#"{"delta":"world"}"#.to_owned(),
            id: "3:10".to_owned(),
            retry: None,
        };
        let written = frame(&event);
        assert_eq!(
            written,
            "event: chunk\ndata: {\"delta\":\"world\"}\nid: 3:10\n\n"
        );
        let stamps = bare_stamps(&[
            (Bytes::from(written), at),
            (Bytes::from_static(b"event: done\ndata: {}\n\n"), at),
        ]);
        assert_eq!(stamps.chunks[0].0, "3:10");
        assert!(stamps.end.is_some() && bare_end(b"event: done\ndata: {}\n\n"));
    }

    #[test]
    fn delays_run_from_the_servers_arrival_to_the_first_and_last_viewer() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let stamps = Stamps {
            chunks: vec![("1:1".to_owned(), ms(0)), ("1:2".to_owned(), ms(100))],
            end: Some(ms(200)),
        };
        let viewer = |a: u64, b: u64| Seen {
            chunks: vec![("1:1".to_owned(), ms(a)), ("1:2".to_owned(), ms(b))],
            done: true,
            frames: Vec::new(),
        };
        let side = side(
            &stamps,
            (2, vec![viewer(1, 102), viewer(9, 130)], Vec::new()),
            1.0,
            0.0,
        );
        assert_eq!(side.complete, 2);
        assert_eq!(side.delivered, 6);
        assert_eq!(side.first_ms, [1.0, 2.0]);
        assert_eq!(side.last_ms, [9.0, 30.0]);
        assert_eq!(side.at_ms, [0.0, 100.0, 200.0]);
        assert_eq!(side.spacing_ms, 100.0);
    }
}
