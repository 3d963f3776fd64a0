//! M1: memory. The API's resident memory with many idle open SSE streams (misses waiting for
//! a generation that does not come: the script stops the workers first), and a worker's
//! with its full concurrency in flight (the simulator holds every call before its first
//! token).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::procs::rss_kib;
use crate::report::{Row, Section};
use crate::sim::Sim;
use crate::stats::fmt_count;
use crate::{many, sse};

const STREAMS_FILE: &str = "memory-streams.json";
const SHARED_FILE: &str = "memory-streams-shared.json";
const BARE_FILE: &str = "memory-streams-bare.json";
const WORKER_FILE: &str = "memory-worker.json";

#[derive(clap::Args)]
pub struct StreamsArgs {
    /// The API; unless --bare, where a bare axum server is started and measured instead.
    #[arg(long, required_unless_present = "bare")]
    pub api: Option<String>,
    /// The API's process id.
    #[arg(long, required_unless_present = "bare")]
    pub pid: Option<u32>,
    /// Measure idle SSE streams on a bare axum server (`versus-bench bare`, `/idle`).
    #[arg(long, conflicts_with = "shared")]
    pub bare: bool,
    #[arg(long)]
    pub out_dir: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    pub n: usize,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 256)]
    pub open_concurrency: usize,
    /// Seconds to wait after the last stream opened before reading the RSS.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
    /// Every stream on one matchup (one flight): what a stream costs without its own flight.
    #[arg(long)]
    pub shared: bool,
}

#[derive(Serialize, Deserialize)]
pub struct StreamsRaw {
    pub n: usize,
    pub opened: usize,
    /// Streams still open when the RSS was read.
    pub alive: usize,
    pub errors: Vec<String>,
    pub open_secs: f64,
    pub rss_before_kib: u64,
    pub rss_with_kib: u64,
    pub rss_after_close_kib: u64,
}

impl StreamsRaw {
    /// Resident memory the open streams added, per stream that stayed open.
    fn per_stream_kib(&self) -> f64 {
        (self.rss_with_kib as f64 - self.rss_before_kib as f64) / self.alive.max(1) as f64
    }

    /// `x KiB (RSS a → b MiB)`.
    fn per_stream_summary(&self) -> String {
        format!(
            "{:.1} KiB (RSS {:.1} → {:.1} MiB)",
            self.per_stream_kib(),
            self.rss_before_kib as f64 / 1024.0,
            self.rss_with_kib as f64 / 1024.0
        )
    }
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub api: String,
    #[arg(long)]
    pub sim: String,
    /// The worker's process id (the only worker running).
    #[arg(long)]
    pub pid: u32,
    /// The worker's VERSUS_WORKER_CONCURRENCY.
    #[arg(long)]
    pub concurrency: usize,
    #[arg(long)]
    pub out_dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
pub struct WorkerRaw {
    pub concurrency: usize,
    pub in_flight: u64,
    pub rss_idle_kib: u64,
    pub rss_busy_kib: u64,
}

/// Open streams, held until `stop` turns true.
pub struct Held {
    tasks: Vec<JoinHandle<()>>,
    opened: Arc<AtomicUsize>,
    /// Streams that the server ended (an `error` event, say) before we closed them.
    ended: Arc<AtomicUsize>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    stop: watch::Sender<bool>,
}

impl Held {
    /// Opens a stream for each URL, `concurrency` at a time, each on a connection of its own
    /// ([`many`]); a stream counts as open once its `meta` event has arrived.
    pub fn open(urls: Vec<reqwest::Url>, concurrency: usize) -> anyhow::Result<Held> {
        let sources = Arc::new(many::Sources::fresh(urls.len()));
        let gate = Arc::new(Semaphore::new(concurrency));
        let opened = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop, stopped) = watch::channel(false);
        let tasks = urls
            .into_iter()
            .map(|url| {
                let target = many::Target::of(&url);
                let (sources, gate, opened, ended, errors) = (
                    sources.clone(),
                    gate.clone(),
                    opened.clone(),
                    ended.clone(),
                    errors.clone(),
                );
                let mut stopped = stopped.clone();
                tokio::spawn(async move {
                    let events = async {
                        let _permit = gate.acquire().await?;
                        let mut events = many::open(&target?, &sources).await?;
                        match events.next().await {
                            Some(Ok(e)) if e.event == "meta" => Ok(events),
                            other => bail!("expected meta first, got {other:?}"),
                        }
                    };
                    let mut events = match events.await {
                        Ok(events) => {
                            opened.fetch_add(1, Ordering::Relaxed);
                            events
                        }
                        Err(e) => {
                            if let Ok(mut errors) = errors.lock() {
                                errors.push(format!("{e:#}"));
                            }
                            return;
                        }
                    };
                    // Hold the stream, reading heartbeats, until told to stop.
                    loop {
                        tokio::select! {
                            _ = stopped.wait_for(|stop| *stop) => return,
                            event = events.next() => match event {
                                Some(Ok(e)) if e.event == "error" || e.event == "done" => {
                                    if let Ok(mut errors) = errors.lock() {
                                        errors.push(format!("ended early: {} {}", e.event, e.data));
                                    }
                                    ended.fetch_add(1, Ordering::Relaxed);
                                    return;
                                }
                                Some(Ok(_)) => {}
                                Some(Err(e)) => {
                                    if let Ok(mut errors) = errors.lock() {
                                        errors.push(format!("ended early: {e}"));
                                    }
                                    ended.fetch_add(1, Ordering::Relaxed);
                                    return;
                                }
                                None => {
                                    ended.fetch_add(1, Ordering::Relaxed);
                                    return;
                                }
                            },
                        }
                    }
                })
            })
            .collect();
        Ok(Held {
            tasks,
            opened,
            ended,
            errors,
            stop,
        })
    }

    /// Waits until every stream is open or failed; false after `timeout`.
    pub async fn wait_open(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.opened.load(Ordering::Relaxed) + self.error_count() < self.tasks.len() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Streams open right now.
    pub fn alive(&self) -> usize {
        self.opened.load(Ordering::Relaxed) - self.ended.load(Ordering::Relaxed)
    }

    fn error_count(&self) -> usize {
        self.errors.lock().map_or(0, |e| e.len())
    }

    pub async fn close(self) -> (usize, Vec<String>) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        let errors = self.errors.lock().map(|e| e.clone()).unwrap_or_default();
        (self.opened.load(Ordering::Relaxed), errors)
    }
}

pub fn urls(api: &str, tag: &str, n: usize) -> anyhow::Result<Vec<reqwest::Url>> {
    let run = crate::run_id();
    (0..n)
        .map(|i| sse::stream_url(api, &format!("{tag} {run} {i}"), "Rival"))
        .collect()
}

pub async fn run_streams(args: StreamsArgs) -> anyhow::Result<()> {
    let mut bare = None;
    let (pid, urls) = if args.bare {
        let (child, url) = crate::bare::spawn(None, None).await?;
        let pid = child.id().context("the bare server has no pid")?;
        bare = Some(child);
        (
            pid,
            vec![reqwest::Url::parse(&format!("{url}/idle"))?; args.n],
        )
    } else {
        let (Some(api), Some(pid)) = (&args.api, args.pid) else {
            bail!("--api and --pid are needed");
        };
        let urls = if args.shared {
            let url = sse::stream_url(api, &format!("Idle {}", crate::run_id()), "Rival")?;
            vec![url; args.n]
        } else {
            urls(api, "Idle", args.n)?
        };
        (pid, urls)
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before_kib = rss_kib(pid)?;
    let start = Instant::now();
    let held = Held::open(urls, args.open_concurrency)?;
    if !held.wait_open(Duration::from_secs(300)).await {
        eprintln!("not every stream opened within 300 s");
    }
    let open_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let rss_with_kib = rss_kib(pid)?;
    let alive = held.alive();
    let (opened, errors) = held.close().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_close_kib = rss_kib(pid)?;
    if let Some(mut bare) = bare {
        bare.kill().await?;
    }
    let errors = crate::stats::count_distinct(errors);
    eprintln!(
        "{alive} idle streams: RSS {rss_before_kib} → {rss_with_kib} KiB; problems: {errors:?}"
    );
    let raw = StreamsRaw {
        n: args.n,
        opened,
        alive,
        errors,
        open_secs,
        rss_before_kib,
        rss_with_kib,
        rss_after_close_kib,
    };
    let file = match (args.bare, args.shared) {
        (true, _) => BARE_FILE,
        (false, true) => SHARED_FILE,
        (false, false) => STREAMS_FILE,
    };
    crate::write_json(&args.out_dir.join(file), &raw)
}

pub async fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    let sim = Sim::new(&args.sim)?;
    // Long enough that no call reaches its first token while we measure.
    sim.reset_with(600_000, 60).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle_kib = rss_kib(args.pid)?;
    let held = Held::open(urls(&args.api, "Busy", args.concurrency)?, 256)?;
    held.wait_open(Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut in_flight = sim.chat_calls().await?;
    while in_flight < args.concurrency as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        in_flight = sim.chat_calls().await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_busy_kib = rss_kib(args.pid)?;
    held.close().await;
    sim.reset_with(0, 0).await?;
    eprintln!("worker: RSS {rss_idle_kib} KiB idle, {rss_busy_kib} KiB with {in_flight} in flight");
    let raw = WorkerRaw {
        concurrency: args.concurrency,
        in_flight,
        rss_idle_kib,
        rss_busy_kib,
    };
    crate::write_json(&args.out_dir.join(WORKER_FILE), &raw)
}

pub fn sections(dir: &Path) -> anyhow::Result<Vec<Section>> {
    let streams: Option<StreamsRaw> = crate::report::load(dir, STREAMS_FILE)?;
    let shared: Option<StreamsRaw> = crate::report::load(dir, SHARED_FILE)?;
    let bare: Option<StreamsRaw> = crate::report::load(dir, BARE_FILE)?;
    let worker: Option<WorkerRaw> = crate::report::load(dir, WORKER_FILE)?;
    if streams.is_none() && worker.is_none() {
        return Ok(vec![Section::skipped("M1", "Memory", "not in this run")]);
    }
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    if let Some(s) = &streams {
        let per_stream = s.per_stream_kib() * 1024.0;
        rows.push(Row {
            what: format!(
                "API: bytes per idle open stream ({} streams)",
                fmt_count(s.alive as f64)
            ),
            measured: format!("{:.1} KiB", per_stream / 1024.0),
            baseline: format!(
                "RSS {:.1} MiB before, {:.1} MiB with the streams",
                s.rss_before_kib as f64 / 1024.0,
                s.rss_with_kib as f64 / 1024.0
            ),
            ratio: String::new(),
            goal: "< 20 KiB".to_owned(),
            met: Some(per_stream < 20.0 * 1024.0 && s.alive == s.n),
        });
        rows.push(Row::info(
            "API: RSS after the streams closed; time to open them all",
            format!(
                "{:.1} MiB; {:.1} s",
                s.rss_after_close_kib as f64 / 1024.0,
                s.open_secs
            ),
        ));
        if s.alive < s.n {
            notes.push(format!(
                "Only {} of the {} streams stayed open (the others failed, below): the \
                 per-stream figure divides by those that stayed open, while the failed ones \
                 allocated too, so it is not comparable with a clean run.",
                fmt_count(s.alive as f64),
                fmt_count(s.n as f64)
            ));
        }
        notes.extend(s.errors.iter().map(|e| format!("Stream failed: {e}")));
    }
    if let Some(s) = &shared {
        rows.push(Row::info(
            format!(
                "API: bytes per idle open stream, all {} on one matchup (a fresh API)",
                fmt_count(s.alive as f64)
            ),
            s.per_stream_summary(),
        ));
        notes.extend(
            s.errors
                .iter()
                .map(|e| format!("Shared stream failed: {e}")),
        );
    }
    if let Some(s) = &bare {
        rows.push(Row::info(
            format!(
                "bare axum: bytes per idle SSE stream ({} streams, one event, keep-alive)",
                fmt_count(s.alive as f64)
            ),
            s.per_stream_summary(),
        ));
        notes.extend(s.errors.iter().map(|e| format!("Bare stream failed: {e}")));
    }
    if let Some(w) = &worker {
        rows.push(Row::info(
            format!("worker: RSS idle → with {} jobs in flight", w.in_flight),
            format!(
                "{:.1} → {:.1} MiB ({:.1} KiB per job)",
                w.rss_idle_kib as f64 / 1024.0,
                w.rss_busy_kib as f64 / 1024.0,
                (w.rss_busy_kib as f64 - w.rss_idle_kib as f64) / w.in_flight.max(1) as f64
            ),
        ));
        if w.in_flight < w.concurrency as u64 {
            notes.push(format!(
                "Only {} of the worker's {} slots were in flight when measured.",
                w.in_flight, w.concurrency
            ));
        }
    }
    let n = streams.as_ref().map_or(0, |s| s.n);
    let c = worker.as_ref().map_or(0, |w| w.concurrency);
    Ok(vec![Section {
        id: "M1",
        title: "Memory",
        method: format!(
            "VmRSS from `/proc/PID/status`. API: {} clients each open `/v1/fights/stream` for a \
             new matchup while no worker runs, so every stream is a miss that waits (a flight, \
             its events reader, the SSE connection), counted open once its `meta` arrived; \
             RSS read before, and {} s after the last one opened; bytes per stream = the \
             difference ÷ streams. Worker: one fresh worker with VERSUS_WORKER_CONCURRENCY={c}, \
             then {c} new misses while the simulator holds every call before its first \
             token; RSS read idle and once all {c} calls reached the simulator. Then the API \
             is restarted and the same number of streams open on one single matchup, which \
             separates what a connection costs from what a flight costs; and the same number on \
             a bare axum server (`versus-bench bare`, `/idle`: one event, then nothing but \
             the keep-alive), which is what axum, hyper and tokio cost alone.",
            fmt_count(n as f64),
            5
        ),
        rows,
        notes,
        skipped: None,
        appendix: String::new(),
    }])
}
