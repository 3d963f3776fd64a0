//! P1: cache hits. wrk (closed loop) on `GET /v1/fights/{key}` and on a hit of
//! `/v1/fights/stream`, beside a bare axum handler serving the same bytes; then the p99 of
//! each at half the bare handler's maximum rate, with the open-loop generator of [`load`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::load::{self, RateResult};
use crate::report::{Row, Section};
use crate::sim::Sim;
use crate::sse;
use crate::stats::{fmt_count, fmt_ms};
use crate::wrk::{self, Load, WrkResult};

const FILE: &str = "hits.json";
const PROFILE_FILE: &str = "profile-hits.md";

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub api: String,
    #[arg(long)]
    pub sim: String,
    /// Where hits.json and the response bodies go.
    #[arg(long)]
    pub out_dir: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    #[arg(long, default_value_t = 32)]
    pub connections: u32,
    /// Seconds of each wrk run.
    #[arg(long, default_value_t = 10)]
    pub secs: u32,
    /// Seconds of each fixed-rate run (after a second of warm-up).
    #[arg(long, default_value_t = 10)]
    pub rate_secs: u64,
    /// Fixed rates to measure, as fractions of the bare handler's maximum (0.5 is the goal's).
    #[arg(long, value_delimiter = ',', default_values_t = [0.5, 0.25, 0.125])]
    pub fractions: Vec<f64>,
    /// Profile this process (the API) with perf during an extra wrk run on the stream hit.
    #[arg(long)]
    pub profile_pid: Option<u32>,
    /// The API's process: with it, each target is measured once more with the server (the
    /// API, then the bare handler) on core 0 and the load generators on core 1 (`taskset`).
    #[arg(long)]
    pub api_pid: Option<u32>,
}

#[derive(Serialize, Deserialize)]
pub struct Raw {
    pub answer_bytes: usize,
    pub json_bytes: usize,
    pub sse_bytes: usize,
    pub load: Load,
    pub json: Target,
    pub sse: Target,
    /// The bare server answering the SSE hit through axum's `Sse` (events + keep-alive).
    pub sse_events: WrkResult,
}

/// One kind of hit, through the API and from the bare handler.
#[derive(Serialize, Deserialize)]
pub struct Target {
    pub api: WrkResult,
    pub bare: WrkResult,
    /// Fixed-rate runs, one per fraction of the bare maximum.
    pub at_rates: Vec<AtRate>,
    /// The same with the server on one core and the load generators on the other.
    #[serde(default)]
    pub pinned: Option<Pinned>,
}

/// A target measured with the server pinned to core 0 and the load to core 1: wrk's maximum,
/// then both at half the bare handler's pinned maximum.
#[derive(Serialize, Deserialize)]
pub struct Pinned {
    pub api: WrkResult,
    pub bare: WrkResult,
    pub at_half: AtRate,
}

#[derive(Serialize, Deserialize)]
pub struct AtRate {
    pub fraction: f64,
    pub api: RateResult,
    pub bare: RateResult,
}

impl Target {
    fn at(&self, fraction: f64) -> Option<&AtRate> {
        self.at_rates.iter().find(|r| r.fraction == fraction)
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let api = args.api.trim_end_matches('/');
    Sim::new(&args.sim)?.reset_with(0, 0).await?;
    let client = sse::client()?;

    // One answer, generated once; every request below is a hit of it.
    let url = sse::stream_url(api, &format!("Bench Hit {}", crate::run_id()), "Its Rival")?;
    let warm = sse::within(
        Duration::from_secs(60),
        sse::through_api(&client, url.clone()),
    )
    .await;
    if !warm.complete() {
        bail!("could not warm the hit: {:?}", warm.error);
    }
    let key = warm.key.context("meta without key")?;
    let json_url = format!("{api}/v1/fights/{key}");
    let json_body = body_of(&client, &json_url).await?;
    let sse_body = body_of(&client, url.as_str()).await?;
    if !String::from_utf8_lossy(&sse_body).contains(r#""cached":true"#) {
        bail!(
            "the stream was not a hit:\n{}",
            String::from_utf8_lossy(&sse_body)
        );
    }
    let json_file = args.out_dir.join("hit.json.body");
    let sse_file = args.out_dir.join("hit.sse.body");
    std::fs::write(&json_file, &json_body)?;
    std::fs::write(&sse_file, &sse_body)?;

    let (mut bare, bare_url) = crate::bare::spawn(Some(&json_file), Some(&sse_file)).await?;
    let load = Load {
        threads: args.threads,
        connections: args.connections,
        secs: args.secs,
    };
    let pins = match (args.api_pid, bare.id()) {
        (Some(api), Some(bare)) if pinning_works() => Some(Pins { api, bare }),
        (Some(_), _) => {
            eprintln!("no pinned runs: taskset is missing or there are fewer than 2 cores");
            None
        }
        _ => None,
    };
    let json = measure(&json_url, &format!("{bare_url}/json"), load, &args, pins).await?;
    let sse = measure(url.as_str(), &format!("{bare_url}/sse"), load, &args, pins).await?;
    let sse_events = wrk::run(&format!("{bare_url}/sse-events"), load).await?;
    bare.kill().await?;
    if let Some(pid) = args.profile_pid {
        let secs = 5;
        let run = wrk::run(url.as_str(), Load { secs, ..load });
        match crate::profile::record(&[pid], u64::from(secs), 25, run).await {
            Ok((_, top)) => std::fs::write(
                args.out_dir.join(PROFILE_FILE),
                format!(
                    "Profile of the API serving stream hits (wrk as above, {secs} s, \
                     `perf record -e cpu-clock`), the hottest symbols:\n\n```\n{top}\n```\n"
                ),
            )?,
            Err(e) => eprintln!("no profile: {e:#}"),
        }
    }

    let raw = Raw {
        answer_bytes: warm.text_bytes,
        json_bytes: json_body.len(),
        sse_bytes: sse_body.len(),
        load,
        json,
        sse,
        sse_events,
    };
    crate::write_json(&args.out_dir.join(FILE), &raw)
}

/// The servers' processes, for the pinned runs.
#[derive(Clone, Copy)]
struct Pins {
    api: u32,
    bare: u32,
}

/// Whether this machine can give the server and the load a core each.
fn pinning_works() -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores >= 2
        && std::process::Command::new("taskset")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// Sets the CPU affinity of every thread of `pid` (`taskset -a -p -c CPUS PID`); threads
/// created later inherit it, and so do child processes (wrk) of this one.
fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let output = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .context("running taskset")?;
    if !output.status.success() {
        bail!(
            "taskset -a -p -c {cpus} {pid}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Runs `f` with both servers on core 0 and this process (the open-loop generator, and wrk,
/// which inherits it) on core 1; every process gets every core back afterwards.
async fn pinned<T>(pins: Pins, f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let all = format!(
        "0-{}",
        std::thread::available_parallelism().map_or(2, |n| n.get()) - 1
    );
    let me = std::process::id();
    let placed = pin(pins.api, "0")
        .and_then(|()| pin(pins.bare, "0"))
        .and_then(|()| pin(me, "1"));
    let result = match placed {
        Ok(()) => f.await,
        Err(e) => Err(e),
    };
    for pid in [pins.api, pins.bare, me] {
        pin(pid, &all)?;
    }
    result
}

/// wrk on the bare handler, then on the API; then both at fixed fractions of the bare
/// handler's maximum rate; then, with `pins`, all of it again with the server and the load on
/// separate cores, at half the pinned bare maximum.
async fn measure(
    api_url: &str,
    bare_url: &str,
    load: Load,
    args: &Args,
    pins: Option<Pins>,
) -> anyhow::Result<Target> {
    let bare = wrk::run(bare_url, load).await?;
    let api = wrk::run(api_url, load).await?;
    let secs = Duration::from_secs(args.rate_secs);
    let connections = args.connections as usize;
    let mut at_rates = Vec::new();
    for &fraction in &args.fractions {
        let rate = (bare.requests_per_sec * fraction).max(1.0);
        at_rates.push(AtRate {
            fraction,
            bare: load::run(bare_url, rate, secs, connections).await?,
            api: load::run(api_url, rate, secs, connections).await?,
        });
    }
    let pinned = match pins {
        Some(pins) => Some(
            self::pinned(pins, async {
                let bare = wrk::run(bare_url, load).await?;
                let api = wrk::run(api_url, load).await?;
                let rate = (bare.requests_per_sec * 0.5).max(1.0);
                let at_half = AtRate {
                    fraction: 0.5,
                    bare: load::run(bare_url, rate, secs, connections).await?,
                    api: load::run(api_url, rate, secs, connections).await?,
                };
                Ok(Pinned { api, bare, at_half })
            })
            .await?,
        ),
        None => None,
    };
    Ok(Target {
        api,
        bare,
        at_rates,
        pinned,
    })
}

async fn body_of(client: &reqwest::Client, url: &str) -> anyhow::Result<bytes::Bytes> {
    let response = client.get(url).send().await?.error_for_status()?;
    Ok(response.bytes().await?)
}

pub fn sections(dir: &Path) -> anyhow::Result<Vec<Section>> {
    let Some(raw) = crate::report::load::<Raw>(dir, FILE)? else {
        return Ok(vec![Section::skipped(
            "P1",
            "Cache hits",
            "not in this run",
        )]);
    };
    let l = raw.load;
    let mut rows = Vec::new();
    rows.extend(target_rows("`GET /v1/fights/{key}`", &raw.json, l));
    rows.extend(target_rows("hit of `/v1/fights/stream`", &raw.sse, l));
    rows.push(Row {
        what: "the same SSE hit from axum's `Sse` with a keep-alive, no Versus code (wrk)"
            .to_owned(),
        measured: format!("{} req/s", fmt_count(raw.sse_events.requests_per_sec)),
        baseline: format!(
            "bare bytes: {} req/s",
            fmt_count(raw.sse.bare.requests_per_sec)
        ),
        ratio: format!(
            "{:.2}×",
            raw.sse_events.requests_per_sec / raw.sse.bare.requests_per_sec
        ),
        goal: String::new(),
        met: None,
    });
    let mut notes = vec![format!(
        "Bodies: the answer is {} bytes of text; the JSON response {} bytes; the SSE hit {} \
         bytes (`meta`, the text in one `chunk`, `done`). The bare handler returns exactly \
         those bytes with the same content type.",
        raw.answer_bytes, raw.json_bytes, raw.sse_bytes
    )];
    for t in [&raw.json, &raw.sse] {
        let pinned = t.pinned.iter().map(|p| &p.at_half);
        for r in t
            .at_rates
            .iter()
            .chain(pinned)
            .flat_map(|r| [&r.api, &r.bare])
        {
            if r.achieved_rps < 0.95 * r.target_rps {
                notes.push(format!(
                    "The fixed-rate run on {} reached only {} of {} req/s.",
                    r.url,
                    fmt_count(r.achieved_rps),
                    fmt_count(r.target_rps)
                ));
            }
            if r.errors > 0 {
                notes.push(format!("{} errors at a fixed rate on {}.", r.errors, r.url));
            }
        }
        for w in [&t.api, &t.bare] {
            if w.errors > 0 {
                notes.push(format!("wrk counted {} errors on {}.", w.errors, w.url));
            }
        }
    }
    Ok(vec![Section {
        id: "P1",
        title: "Cache hits",
        method: format!(
            "One answer is generated, then requested over and over. Throughput and \
             latency under saturation: `wrk -t{} -c{} -d{}s --latency` (closed loop), on the \
             API and on `versus-bench bare`, a bare axum handler (same runtime, same \
             default settings) returning the same bytes. Then the p99 of each at fixed rates \
             (half of the bare handler's maximum, the goal's rate, and lower ones where \
             listed) with `versus-bench`'s own open-loop generator (wrk2 is not in Debian): \
             {} keep-alive connections, requests due at a fixed rate, latency counted from \
             when a request was due if its connection was still busy, else from when it was \
             sent; HDR histogram; a second of warm-up is not counted. In those runs the load \
             generator shares the 2 cores with the server, so the bare handler's own figures \
             are the floor they allow; the goal is judged on a last run of each with the \
             server (the API, then the bare handler) pinned to core 0 and wrk and the \
             generator to core 1 (`taskset`), at half the bare handler's maximum so pinned.",
            l.threads, l.connections, l.secs, l.connections
        ),
        rows,
        notes,
        skipped: None,
        appendix: std::fs::read_to_string(dir.join(PROFILE_FILE)).unwrap_or_default(),
    }])
}

fn target_rows(name: &str, t: &Target, l: Load) -> Vec<Row> {
    let ratio = t.api.requests_per_sec / t.bare.requests_per_sec;
    let mut rows = vec![
        Row {
            what: format!(
                "{name}: throughput (wrk -t{} -c{})",
                l.threads, l.connections
            ),
            measured: format!("{} req/s", fmt_count(t.api.requests_per_sec)),
            baseline: format!("bare axum: {} req/s", fmt_count(t.bare.requests_per_sec)),
            ratio: format!("{ratio:.2}×"),
            goal: "≥ 0.5× bare".to_owned(),
            met: Some(ratio >= 0.5 && t.api.errors == 0),
        },
        Row {
            what: format!("{name}: latency p50 / p99 under wrk"),
            measured: format!("{} / {} ms", fmt_ms(t.api.p50_ms), fmt_ms(t.api.p99_ms)),
            baseline: format!(
                "bare: {} / {} ms",
                fmt_ms(t.bare.p50_ms),
                fmt_ms(t.bare.p99_ms)
            ),
            ratio: String::new(),
            goal: String::new(),
            met: None,
        },
    ];
    // The goal's rate (half the bare maximum) first, then the lower ones.
    let rates = t
        .at(0.5)
        .into_iter()
        .chain(t.at_rates.iter().filter(|r| r.fraction != 0.5));
    for r in rates {
        // With a pinned run, the goal is judged there: here the load shares the cores.
        let goal_rate = r.fraction == 0.5 && t.pinned.is_none();
        let share = if goal_rate {
            "half the bare maximum".to_owned()
        } else {
            format!("{} of the bare maximum", fraction(r.fraction))
        };
        let what = format!(
            "{name}: p99 at {} req/s ({share}), open loop",
            fmt_count(r.api.target_rps)
        );
        rows.push(rate_row(what, r, goal_rate));
    }
    if let Some(p) = &t.pinned {
        rows.push(Row {
            what: format!("{name}: throughput, the server on core 0 and wrk on core 1"),
            measured: format!("{} req/s", fmt_count(p.api.requests_per_sec)),
            baseline: format!("bare axum: {} req/s", fmt_count(p.bare.requests_per_sec)),
            ratio: format!("{:.2}×", p.api.requests_per_sec / p.bare.requests_per_sec),
            goal: String::new(),
            met: None,
        });
        let what = format!(
            "{name}: p99 at {} req/s (half the bare maximum on one core), open loop, the \
             server on core 0 and the load on core 1",
            fmt_count(p.at_half.api.target_rps)
        );
        rows.push(rate_row(what, &p.at_half, true));
    }
    rows
}

/// One fixed-rate run's p99 beside the bare handler's; with `goal`, judged against the p99
/// goal.
fn rate_row(what: String, r: &AtRate, goal: bool) -> Row {
    Row {
        what,
        measured: format!(
            "{} ms (p50 {})",
            fmt_ms(r.api.latency.p99_ms),
            fmt_ms(r.api.latency.p50_ms)
        ),
        baseline: format!(
            "bare: {} ms (p50 {})",
            fmt_ms(r.bare.latency.p99_ms),
            fmt_ms(r.bare.latency.p50_ms)
        ),
        ratio: format!("{:.2}×", r.api.latency.p99_ms / r.bare.latency.p99_ms),
        goal: if goal { "p99 < 1 ms" } else { "" }.to_owned(),
        met: goal.then_some(r.api.latency.p99_ms < 1.0 && r.api.errors == 0),
    }
}

/// 0.25 → "1/4".
fn fraction(f: f64) -> String {
    if f > 0.0 && (1.0 / f).fract().abs() < 1e-9 {
        format!("1/{}", (1.0 / f).round())
    } else {
        format!("{f}×")
    }
}
