//! P2 and P3. Unique concurrent misses through the whole system, beside the same number of
//! the same requests made straight to the simulator, alternating in rounds; then each of
//! those matchups again, one at a time: hits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::join_all;
use serde::{Deserialize, Serialize};

use crate::hops::{self, Hops};
use crate::procs::{CpuMeter, Named};
use crate::report::{Row, Section};
use crate::sim::Sim;
use crate::sse::{self, Timeline};
use crate::stats::{Summary, fmt_ms};

/// The results of P2 and P3 (`--n`, 200 by default, concurrent misses per round).
const FILE: &str = "miss.json";
/// The results of P2 one miss at a time (`--n 1`).
pub const ONE_FILE: &str = "miss-1.json";

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub api: String,
    #[arg(long)]
    pub sim: String,
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Concurrent unique misses per round.
    #[arg(long, default_value_t = 200)]
    pub n: usize,
    /// Rounds; each runs the simulator's baseline and then the system.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    #[arg(long, default_value_t = 400)]
    pub ttft_ms: u64,
    #[arg(long, default_value_t = 60)]
    pub tokens_per_sec: u64,
    /// `/metrics` URLs of the API and the workers: their stage histograms, read before and
    /// after the measured rounds, say where a miss's time goes.
    #[arg(long = "metrics")]
    pub metrics: Vec<String>,
    /// Processes whose CPU time over the system sides to report, as NAME=PID (a PID counts
    /// with its children).
    #[arg(long = "proc")]
    pub procs: Vec<Named>,
    /// Where the results go in `out_dir`: P2 and P3 by default, P2 one miss at a time with
    /// `miss-1.json` (P3 then reads the other file).
    #[arg(long, default_value = FILE)]
    pub file: String,
    /// NATS, where `versus-admin` logs in with `nats_password`: the hops a miss makes are
    /// then also timed alone (see `hops`), after the rounds.
    #[arg(long, requires = "nats_password")]
    pub nats_url: Option<String>,
    #[arg(long)]
    pub nats_password: Option<String>,
}

/// The stages of a miss, as the processes time them (histograms ending in `_seconds`).
const STAGES: &[(&str, &str)] = &[
    (
        "versus_flight_setup_seconds",
        "API: subscribe, read the last event, publish the job (acknowledged)",
    ),
    (
        "versus_job_wait_seconds",
        "job in the stream: stored → delivered to a worker",
    ),
    ("versus_claim_seconds", "worker: the claim in Postgres"),
    (
        "versus_upstream_first_token_seconds",
        "worker: request → first token from the upstream",
    ),
];

/// One stage's mean over the measured rounds.
#[derive(Serialize, Deserialize)]
pub struct Stage {
    pub metric: String,
    pub count: f64,
    pub mean_ms: f64,
}

#[derive(Serialize, Deserialize)]
pub struct Raw {
    pub n: usize,
    pub rounds: usize,
    pub ttft_ms: u64,
    pub tokens_per_sec: u64,
    pub answer_bytes: usize,
    pub direct_first: Summary,
    pub direct_done: Summary,
    pub system_first: Summary,
    pub system_done: Summary,
    pub direct_errors: Vec<String>,
    pub system_errors: Vec<String>,
    /// Chat calls the simulator received during the measured rounds (both sides).
    pub upstream_calls: u64,
    /// From a system round's start to each of its calls reaching the simulator: the dispatch
    /// part of the added time.
    pub dispatch: Summary,
    /// P3: each system matchup again, one at a time, time to `done`.
    pub hit_done: Summary,
    pub hit_errors: Vec<String>,
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// CPU seconds of each watched process (and the load client) over each system side.
    #[serde(default)]
    pub cpu: Vec<(String, f64)>,
    /// The same hops without Versus, when they were timed.
    #[serde(default)]
    pub hops: Option<Hops>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let sim = Sim::new(&args.sim)?;
    let client = sse::client()?;
    let run = crate::run_id();

    // Warm-up, not measured: worker pools, Postgres connections, and this client's
    // connections to both servers, so that no measured request pays a TCP handshake.
    sim.reset_with(0, 0).await?;
    let warm = round(&client, &args, &sim, &format!("warm {run}")).await;
    let failed = warm
        .0
        .iter()
        .chain(&warm.1)
        .filter(|t| !t.complete())
        .count();
    if failed > 0 {
        eprintln!("warm-up: {failed} answers incomplete");
    }

    sim.reset_with(args.ttft_ms, args.tokens_per_sec).await?;
    let before = scrape(&args.metrics).await;
    let mut direct = Vec::new();
    let mut system = Vec::new();
    let mut last_urls = Vec::new();
    let mut windows = Vec::new();
    let mut cpu: Vec<(String, f64)> = Vec::new();
    for r in 0..args.rounds {
        let (d, s, window, used) = round(&client, &args, &sim, &format!("{run} r{r}")).await;
        direct.extend(d);
        system.extend(s);
        windows.push(window);
        // Every round's readings; the report adds up those of one name.
        cpu.extend(used);
        last_urls = urls(&args.api, &format!("{run} r{r}"), args.n)?;
    }
    let after = scrape(&args.metrics).await;
    let stages = STAGES
        .iter()
        .filter_map(|(metric, _)| {
            let sum = after.get(&format!("{metric}_sum"))?
                - before.get(&format!("{metric}_sum")).unwrap_or(&0.0);
            let count = after.get(&format!("{metric}_count"))?
                - before.get(&format!("{metric}_count")).unwrap_or(&0.0);
            (count > 0.0).then(|| Stage {
                metric: (*metric).to_owned(),
                count,
                mean_ms: sum / count * 1000.0,
            })
        })
        .collect();
    let upstream_calls = sim.chat_calls().await?;
    let arrivals = sim.chat_arrivals().await?;
    let dispatch: Vec<Duration> = arrivals
        .iter()
        .filter_map(|&at| {
            let (start, _) = windows.iter().find(|(s, e)| at >= *s && at <= *e)?;
            Some(Duration::from_micros(at - start))
        })
        .collect();

    // P3: the same matchups, now cached, one request at a time.
    let mut hits = Vec::new();
    for url in last_urls {
        hits.push(sse::within(sse::ANSWER_LIMIT, sse::through_api(&client, url)).await);
    }
    let hit_errors = errors(&hits, |t| {
        (t.cached != Some(true)).then(|| "not served from the cache".to_owned())
    });
    let hops = match (&args.nats_url, &args.nats_password) {
        (Some(url), Some(password)) => {
            Some(hops::measure(url, password, &sim.openai_base(), 100).await?)
        }
        _ => None,
    };

    let raw = Raw {
        n: args.n,
        rounds: args.rounds,
        ttft_ms: args.ttft_ms,
        tokens_per_sec: args.tokens_per_sec,
        answer_bytes: system.first().map_or(0, |t| t.text_bytes),
        direct_first: summary(&direct, |t| t.first_token),
        direct_done: summary(&direct, |t| t.done),
        system_first: summary(&system, |t| t.first_token),
        system_done: summary(&system, |t| t.done),
        direct_errors: errors(&direct, |_| None),
        system_errors: errors(&system, |_| None),
        upstream_calls,
        dispatch: Summary::of(&dispatch),
        hit_done: summary(&hits, |t| t.done),
        hit_errors,
        stages,
        cpu,
        hops,
    };
    eprintln!(
        "first token p50/p99: direct {:.2}/{:.2} ms, system {:.2}/{:.2} ms",
        raw.direct_first.p50_ms,
        raw.direct_first.p99_ms,
        raw.system_first.p50_ms,
        raw.system_first.p99_ms
    );
    crate::write_json(&args.out_dir.join(&args.file), &raw)
}

/// `n` concurrent requests straight to the simulator, then `n` concurrent unique misses
/// through the API, for matchups named after `tag`; with the CPU the watched processes used
/// during the system side.
async fn round(
    client: &reqwest::Client,
    args: &Args,
    sim: &Sim,
    tag: &str,
) -> (Vec<Timeline>, Vec<Timeline>, (u64, u64), Vec<(String, f64)>) {
    let base = sim.openai_base();
    let direct = join_all((0..args.n).map(|i| {
        let (client, base) = (client.clone(), base.clone());
        let (a, b) = names(tag, i);
        tokio::spawn(sse::within(sse::ANSWER_LIMIT, async move {
            sse::straight_to_sim(&client, &base, &a, &b).await
        }))
    }))
    .await;
    // A pause between the sides, so that the tails of one do not overlap the other.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let meter = CpuMeter::start(&args.procs);
    // After the meter, which reads every watched process tree (milliseconds).
    let system_start = unix_us();
    let system = match urls(&args.api, tag, args.n) {
        Ok(urls) => {
            join_all(urls.into_iter().map(|url| {
                let client = client.clone();
                tokio::spawn(sse::within(sse::ANSWER_LIMIT, async move {
                    sse::through_api(&client, url).await
                }))
            }))
            .await
        }
        Err(e) => vec![Ok(Timeline {
            error: Some(e.to_string()),
            ..Timeline::default()
        })],
    };
    let system_end = unix_us();
    let cpu = meter.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let unwrap = |r: Result<Timeline, tokio::task::JoinError>| {
        r.unwrap_or_else(|e| Timeline {
            error: Some(e.to_string()),
            ..Timeline::default()
        })
    };
    (
        direct.into_iter().map(unwrap).collect(),
        system.into_iter().map(unwrap).collect(),
        (system_start, system_end),
        cpu,
    )
}

/// The `_sum` and `_count` series of every `/metrics` in `urls`, added up across processes
/// and labels.
async fn scrape(urls: &[String]) -> std::collections::HashMap<String, f64> {
    let mut totals = std::collections::HashMap::new();
    for url in urls {
        let text = match reqwest::get(url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => {
                eprintln!("reading {url}: {e}");
                continue;
            }
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            if let (true, Ok(value)) = (
                name.ends_with("_seconds_sum") || name.ends_with("_seconds_count"),
                value.parse::<f64>(),
            ) {
                *totals.entry(name.to_owned()).or_insert(0.0) += value;
            }
        }
    }
    totals
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn names(tag: &str, i: usize) -> (String, String) {
    (format!("Miss {tag} {i}"), format!("Rival {i}"))
}

fn urls(api: &str, tag: &str, n: usize) -> anyhow::Result<Vec<reqwest::Url>> {
    (0..n)
        .map(|i| {
            let (a, b) = names(tag, i);
            sse::stream_url(api, &a, &b)
        })
        .collect()
}

/// The percentiles of `pick` over the complete answers of `timelines`.
pub fn summary(timelines: &[Timeline], pick: impl Fn(&Timeline) -> Option<Duration>) -> Summary {
    let samples: Vec<Duration> = timelines
        .iter()
        .filter(|t| t.complete())
        .filter_map(pick)
        .collect();
    Summary::of(&samples)
}

/// The distinct problems of the timelines, with how often each happened.
pub fn errors(timelines: &[Timeline], extra: impl Fn(&Timeline) -> Option<String>) -> Vec<String> {
    crate::stats::count_distinct(
        timelines
            .iter()
            .filter_map(|t| t.error.clone().or_else(|| extra(t))),
    )
}

pub fn sections(dir: &Path) -> anyhow::Result<Vec<Section>> {
    let mut sections = Vec::new();
    match crate::report::load::<Raw>(dir, ONE_FILE)? {
        Some(raw) => sections.push(p2(&raw, "Miss overhead, one miss at a time")),
        None => sections.push(Section::skipped(
            "P2",
            "Miss overhead, one miss at a time",
            "not in this run",
        )),
    }
    let Some(raw) = crate::report::load::<Raw>(dir, FILE)? else {
        sections.push(Section::skipped("P2", "Miss overhead", "not in this run"));
        sections.push(Section::skipped("P3", "Cache value", "not in this run"));
        return Ok(sections);
    };
    sections.push(p2(&raw, "Miss overhead, concurrent misses"));
    sections.push(p3(&raw));
    Ok(sections)
}

/// P2's section for one run of `miss` (one miss at a time, or many at once).
fn p2(raw: &Raw, title: &'static str) -> Section {
    let total = raw.n * raw.rounds;
    let added = |what: &str, system: f64, direct: f64, goal: f64| Row {
        what: what.to_owned(),
        measured: format!("{} ms", fmt_ms(system)),
        baseline: format!("simulator: {} ms", fmt_ms(direct)),
        ratio: format!("{:+.2} ms added", system - direct),
        goal: format!("≤ {goal} ms added"),
        met: Some(system - direct <= goal),
    };
    let clean = raw.system_errors.is_empty() && raw.direct_errors.is_empty();
    // One miss at a time: nothing beyond the hops a miss must make, whose sum this run times
    // (the floor); without it, the goal set before the floor was measured.
    let first_p50 = match &raw.hops {
        Some(hops) => Row {
            goal: format!("≤ the hops' floor ({} ms) added", fmt_ms(hops.floor_ms())),
            met: Some(raw.system_first.p50_ms - raw.direct_first.p50_ms <= hops.floor_ms()),
            ..added(
                "time to first token, p50",
                raw.system_first.p50_ms,
                raw.direct_first.p50_ms,
                1.0,
            )
        },
        None => added(
            "time to first token, p50",
            raw.system_first.p50_ms,
            raw.direct_first.p50_ms,
            1.0,
        ),
    };
    let mut p2_rows = vec![
        first_p50,
        added(
            "time to first token, p99",
            raw.system_first.p99_ms,
            raw.direct_first.p99_ms,
            5.0,
        ),
        added(
            "time to `done`, p50",
            raw.system_done.p50_ms,
            raw.direct_done.p50_ms,
            1.0,
        ),
        added(
            "time to `done`, p99",
            raw.system_done.p99_ms,
            raw.direct_done.p99_ms,
            5.0,
        ),
    ];
    p2_rows.push(Row {
        what: "complete answers".to_owned(),
        measured: format!("{}/{total}", raw.system_done.count),
        baseline: format!("simulator: {}/{total}", raw.direct_done.count),
        ratio: String::new(),
        goal: "all".to_owned(),
        met: Some(clean),
    });
    p2_rows.push(Row::info(
        "where the added time goes: request → upstream call, p50 / p99",
        format!(
            "{} / {} ms (as the simulator saw the calls arrive)",
            fmt_ms(raw.dispatch.p50_ms),
            fmt_ms(raw.dispatch.p99_ms),
        ),
    ));
    for stage in &raw.stages {
        let what = STAGES
            .iter()
            .find(|(m, _)| *m == stage.metric)
            .map_or(stage.metric.as_str(), |(_, what)| what);
        p2_rows.push(Row::info(
            format!("stage, mean: {what}"),
            format!(
                "{} ms over {} (`{}`)",
                fmt_ms(stage.mean_ms),
                stage.count,
                stage.metric
            ),
        ));
    }
    // One answer at a time leaves the processes mostly idle: their CPU per answer would be
    // the idle time's.
    if !raw.cpu.is_empty() && raw.n > 1 {
        p2_rows.push(Row::info(
            "CPU per answer over the system sides",
            crate::procs::per_answer(&raw.cpu, raw.system_done.count as usize),
        ));
    }
    if let Some(hops) = &raw.hops {
        p2_rows.push(Row::info(
            "the same hops without Versus, p50 / p99 (100 each, idle between)",
            format!(
                "a direct get {} / {} ms · JetStream publish → a waiting pull consumer {} / {} \
                 ms · core publish → subscriber {} / {} ms · an HTTP call to the simulator \
                 {} / {} ms",
                fmt_ms(hops.direct_get.p50_ms),
                fmt_ms(hops.direct_get.p99_ms),
                fmt_ms(hops.queue.p50_ms),
                fmt_ms(hops.queue.p99_ms),
                fmt_ms(hops.core.p50_ms),
                fmt_ms(hops.core.p99_ms),
                fmt_ms(hops.http.p50_ms),
                fmt_ms(hops.http.p99_ms),
            ),
        ));
        p2_rows.push(Row::info(
            "their sum: the floor under this design's added time, p50",
            format!(
                "{} ms (the client's exchange with the API, the reads, the job, the names' \
                 moderation, the first token's event; the HTTP call counted twice)",
                fmt_ms(hops.floor_ms())
            ),
        ));
    }
    p2_rows.push(Row::info(
        "upstream calls (both sides)",
        format!("{} for {} requests", raw.upstream_calls, 2 * total),
    ));
    let mut p2_notes = Vec::new();
    for e in raw.system_errors.iter().chain(&raw.direct_errors) {
        p2_notes.push(format!("Failed: {e}"));
    }
    let what = if raw.n == 1 {
        "One unique miss at a time".to_owned()
    } else {
        format!("{} concurrent unique misses", raw.n)
    };
    let baseline = if raw.n == 1 {
        "one identical-shape streaming request".to_owned()
    } else {
        format!("{} concurrent identical-shape streaming requests", raw.n)
    };
    Section {
        id: "P2",
        title,
        method: format!(
            "{what} through the API (`/v1/fights/stream`, a Rust SSE client timing each \
             request from just before it is sent to its first `chunk` and to `done`), beside \
             {baseline} straight to the simulator's `/v1/chat/completions` (the worker's \
             request body; timed to the first non-empty `delta.content` and to `[DONE]`). \
             Simulator: {ttft} ms to the first token, {tps} tokens/s, {bytes}-byte answers. \
             {rounds} rounds, each the simulator side then the system side; percentiles over \
             all rounds; added = system percentile − simulator percentile. A warm-up round \
             (instant simulator, not measured) first opens the client's, the workers' and \
             Postgres' connections.",
            ttft = raw.ttft_ms,
            tps = raw.tokens_per_sec,
            bytes = raw.answer_bytes,
            rounds = raw.rounds,
        ),
        rows: p2_rows,
        notes: p2_notes,
        skipped: None,
        appendix: String::new(),
    }
}

/// P3: the hits of the concurrent run's last round, against its misses.
fn p3(raw: &Raw) -> Section {
    let ratio = raw.hit_done.p50_ms / raw.system_done.p50_ms;
    Section {
        id: "P3",
        title: "Cache value",
        method: format!(
            "The full-answer time (request to `done`) of a hit, over that of a miss. Misses: \
             the system side of P2. Hits: the last round's {} matchups again, one request at \
             a time on a kept-alive connection.",
            raw.n
        ),
        rows: vec![Row {
            what: "full answer, p50: hit over miss".to_owned(),
            measured: format!("hit: {} ms", fmt_ms(raw.hit_done.p50_ms)),
            baseline: format!("miss: {} ms", fmt_ms(raw.system_done.p50_ms)),
            ratio: format!("1/{}", crate::stats::fmt_count(1.0 / ratio)),
            goal: "≤ 1/100".to_owned(),
            met: Some(ratio <= 0.01 && raw.hit_errors.is_empty()),
        }],
        notes: raw
            .hit_errors
            .iter()
            .map(|e| format!("Hit failed: {e}"))
            .collect(),
        skipped: None,
        appendix: String::new(),
    }
}
