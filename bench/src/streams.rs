//! M2: open streams at one API replica. Thousands of SSE streams held open (each a miss that
//! waits: no worker runs), either each on a matchup of its own (a flight per stream) or all on
//! one matchup (joins of one flight); the replica's resident memory per stream, and a hit's
//! latency at a fixed rate while they are held, beside the same hit on the same replica before
//! any was opened. The script starts a fresh API for each run, so that no run inherits
//! another's heap.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use versus_shared::key::Key;

use crate::load::RateResult;
use crate::memory::{Held, urls};
use crate::procs::rss_kib;
use crate::report::{Row, Section};
use crate::sse;
use crate::stats::{fmt_count, fmt_ms};

/// Goals: bytes per stream, and the hit's latency held over idle.
const GOAL_KIB: f64 = 16.0;
const GOAL_RATIO: f64 = 1.2;

#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Every stream on a matchup of its own: a flight each.
    Flights,
    /// Every stream on one matchup: joins of one flight.
    Joins,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Flights => "flights",
            Kind::Joins => "joins",
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub api: String,
    /// The API's process id, fresh for this run.
    #[arg(long)]
    pub pid: u32,
    /// NATS, as `NATS_URL` takes it, logged in as `versus-admin`: the hit's answer is written
    /// straight into the answers bucket (no worker runs).
    #[arg(long)]
    pub nats_url: String,
    #[arg(long)]
    pub nats_password: String,
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Streams to hold.
    #[arg(long)]
    pub n: usize,
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// The hit's fixed rate, requests per second.
    #[arg(long, default_value_t = 5_000.0)]
    pub rps: f64,
    /// Seconds of each fixed-rate run (after a second of warm-up).
    #[arg(long, default_value_t = 10)]
    pub rate_secs: u64,
    /// Keep-alive connections of the fixed-rate runs.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 256)]
    pub open_concurrency: usize,
    /// Seconds to wait after the last stream opened before reading the RSS.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
}

#[derive(Serialize, Deserialize)]
pub struct Raw {
    pub kind: Kind,
    pub n: usize,
    /// Streams still open when the RSS was read, and after the hits ran.
    pub alive: usize,
    pub alive_after_hits: usize,
    pub errors: Vec<String>,
    pub open_secs: f64,
    pub rss_before_kib: u64,
    pub rss_with_kib: u64,
    pub idle: RateResult,
    pub held: RateResult,
}

impl Raw {
    fn per_stream_kib(&self) -> f64 {
        (self.rss_with_kib as f64 - self.rss_before_kib as f64) / self.alive.max(1) as f64
    }

    fn ratio(&self, p: fn(&RateResult) -> f64) -> f64 {
        p(&self.held) / p(&self.idle).max(1e-9)
    }
}

fn file(kind: Kind, n: usize) -> String {
    format!("m2-{}-{n}.json", kind.name())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let hit = hit_url(&args).await?;
    let secs = Duration::from_secs(args.rate_secs);
    // Read into the replica's memory first: what follows is a hit from memory.
    reqwest::get(&hit).await?.error_for_status()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before_kib = rss_kib(args.pid)?;
    let idle = rate_apart(&hit, args.rps, secs, args.connections).await?;
    let streams = match args.kind {
        Kind::Flights => urls(&args.api, "Held", args.n)?,
        Kind::Joins => {
            let url = sse::stream_url(&args.api, &format!("Held {}", crate::run_id()), "Rival")?;
            vec![url; args.n]
        }
    };
    let started = std::time::Instant::now();
    let held_streams = Held::open(streams, args.open_concurrency)?;
    if !held_streams.wait_open(Duration::from_secs(300)).await {
        eprintln!("not every stream opened within 300 s");
    }
    let open_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let rss_with_kib = rss_kib(args.pid)?;
    let alive = held_streams.alive();
    let held = rate_apart(&hit, args.rps, secs, args.connections).await?;
    let alive_after_hits = held_streams.alive();
    let (_, errors) = held_streams.close().await;
    let errors = crate::stats::count_distinct(errors);
    eprintln!(
        "M2 {} × {}: RSS {rss_before_kib} → {rss_with_kib} KiB; hit p50 {:.3} → {:.3} ms, p99 \
         {:.3} → {:.3} ms; problems: {errors:?}",
        fmt_count(alive as f64),
        args.kind.name(),
        idle.latency.p50_ms,
        held.latency.p50_ms,
        idle.latency.p99_ms,
        held.latency.p99_ms,
    );
    let raw = Raw {
        kind: args.kind,
        n: args.n,
        alive,
        alive_after_hits,
        errors,
        open_secs,
        rss_before_kib,
        rss_with_kib,
        idle,
        held,
    };
    crate::write_json(&args.out_dir.join(file(args.kind, args.n)), &raw)
}

/// A fixed-rate run of `versus-bench rate` (P1's open-loop generator) in a process of its own,
/// so that the thousands of streams this one holds do not share the generator's runtime.
async fn rate_apart(
    url: &str,
    rps: f64,
    secs: Duration,
    connections: usize,
) -> anyhow::Result<RateResult> {
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .args(["rate", "--url", url])
        .args(["--rps", &rps.to_string()])
        .args(["--secs", &secs.as_secs().to_string()])
        .args(["--connections", &connections.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .context("running versus-bench rate")?;
    anyhow::ensure!(
        output.status.success(),
        "versus-bench rate failed: {}",
        output.status
    );
    serde_json::from_slice(&output.stdout).context("reading versus-bench rate's result")
}

/// `GET /v1/fights/{key}` of an answer written into the bucket for this run.
async fn hit_url(args: &Args) -> anyhow::Result<String> {
    let answers = crate::suggest::answers_bucket(&args.nats_url, &args.nats_password).await?;
    let key = Key::parse(&format!("{}{:024x}", crate::run_id(), 0)).context("a key")?;
    crate::suggest::put_answer(&answers, key.clone(), "Held Hit".into(), "Its Rival".into())
        .await?;
    Ok(format!(
        "{}/v1/fights/{key}",
        args.api.trim_end_matches('/')
    ))
}

pub fn sections(dir: &Path) -> anyhow::Result<Vec<Section>> {
    let (mut runs, skipped) = crate::report::load_runs::<Raw>(dir, "m2")?;
    if runs.is_empty() && skipped.is_none() {
        return Ok(vec![Section::skipped(
            "M2",
            "Open streams",
            "not in this run",
        )]);
    }
    runs.sort_by_key(|r| (r.kind.name(), r.n));
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for r in &runs {
        let what = match r.kind {
            Kind::Flights => "each on its own matchup",
            Kind::Joins => "all on one matchup",
        };
        let per_stream = r.per_stream_kib();
        rows.push(Row {
            what: format!(
                "{} streams {what}: resident memory per stream",
                fmt_count(r.alive as f64)
            ),
            measured: format!("{per_stream:.1} KiB"),
            baseline: format!(
                "RSS {:.1} MiB before, {:.1} MiB with the streams",
                r.rss_before_kib as f64 / 1024.0,
                r.rss_with_kib as f64 / 1024.0
            ),
            ratio: String::new(),
            goal: format!("≤ {GOAL_KIB:.0} KiB"),
            met: Some(per_stream <= GOAL_KIB && r.alive == r.n),
        });
        let ratio50 = r.ratio(|l| l.latency.p50_ms);
        let ratio99 = r.ratio(|l| l.latency.p99_ms);
        rows.push(Row {
            what: format!(
                "{} streams {what}: a hit at {} req/s, p50 / p99",
                fmt_count(r.alive_after_hits as f64),
                fmt_count(r.held.target_rps)
            ),
            measured: format!(
                "{} / {} ms",
                fmt_ms(r.held.latency.p50_ms),
                fmt_ms(r.held.latency.p99_ms)
            ),
            baseline: format!(
                "none held: {} / {} ms",
                fmt_ms(r.idle.latency.p50_ms),
                fmt_ms(r.idle.latency.p99_ms)
            ),
            ratio: format!("{ratio50:.2}× / {ratio99:.2}×"),
            goal: format!("≤ {GOAL_RATIO}×"),
            met: Some(
                ratio50 <= GOAL_RATIO
                    && ratio99 <= GOAL_RATIO
                    && r.held.errors == 0
                    && r.idle.errors == 0,
            ),
        });
        if r.alive < r.n || r.alive_after_hits < r.alive {
            notes.push(format!(
                "{} × {}: {} of {} streams were open when the RSS was read, {} after the hits.",
                fmt_count(r.n as f64),
                r.kind.name(),
                fmt_count(r.alive as f64),
                fmt_count(r.n as f64),
                fmt_count(r.alive_after_hits as f64)
            ));
        }
        notes.extend(
            r.errors
                .iter()
                .map(|e| format!("{} × {}: {e}", fmt_count(r.n as f64), r.kind.name())),
        );
    }
    if let Some(s) = skipped {
        rows.extend(s.rows("streams"));
    }
    Ok(vec![Section {
        id: "M2",
        title: "Open streams",
        method: "One API replica, fresh for each run, no worker running: every stream is a miss \
                 that waits. The load generator (one process, hyper's HTTP/1.1 client, one \
                 connection per stream, spread over loopback source addresses 127.0.0.1, \
                 127.0.0.2, … so that ephemeral ports do not run out) opens the streams either \
                 each on a new matchup (a flight, its events reader and its job each) or all \
                 on one matchup (joins of one flight), counted open once their `meta` arrived. \
                 Resident memory (VmRSS) is read before any and 5 s after the last opened; \
                 per stream = the difference ÷ streams open. A hit (`GET /v1/fights/{key}`, \
                 from memory) is measured at a fixed rate with P1's open-loop generator on 16 \
                 connections, in a process of its own, before the streams open and again \
                 while they are held; the \
                 heartbeats of the held streams (every 15 s) are part of the load."
            .to_owned(),
        rows,
        notes,
        skipped: None,
        appendix: String::new(),
    }])
}
