//! P5: pipeline capacity. Unique answers per second end to end (`POST /v1/fights`, each a new
//! matchup) with a simulator that answers at once, and where the CPU time goes: each
//! process's CPU seconds over the measured window, per answer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::procs::{CpuMeter, Named};
use crate::report::{Row, Section};
use crate::sim::Sim;
use crate::stats::{Summary, fmt_count, fmt_ms};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub api: String,
    #[arg(long)]
    pub sim: String,
    /// The raw result file (capacity-<workers>.json in the results folder).
    #[arg(long)]
    pub out: PathBuf,
    /// How many workers are running (for the report).
    #[arg(long)]
    pub workers: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Seconds measured, after `--warm-up-secs`.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    #[arg(long, default_value_t = 2)]
    pub warm_up_secs: u64,
    /// Processes whose CPU time to report, as NAME=PID (a PID counts with its children).
    #[arg(long = "proc")]
    pub procs: Vec<Named>,
    /// Also measure the simulator alone with the same load (the upstream's own ceiling).
    #[arg(long)]
    pub baseline: bool,
}

#[derive(Serialize, Deserialize)]
pub struct Raw {
    pub workers: usize,
    pub concurrency: usize,
    pub secs: f64,
    pub warm_up_secs: u64,
    pub answers: usize,
    pub answers_per_sec: f64,
    pub latency: Summary,
    pub errors: Vec<String>,
    /// CPU seconds per process over the measured window.
    pub cpu: Vec<(String, f64)>,
    /// Completions per second of the simulator alone, same concurrency, when measured.
    pub simulator_per_sec: Option<f64>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let sim = Sim::new(&args.sim)?;
    sim.reset_with(0, 0).await?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let run = crate::run_id();
    let api = args.api.trim_end_matches('/').to_owned();
    let url = format!("{api}/v1/fights");
    let client = http.clone();
    let outcome = closed_loop(&args, &args.procs, move |i| {
        let body = json!({"a": format!("Capacity {run} {i}"), "b": "Rival"});
        let request = client
            .post(&url)
            .timeout(crate::sse::ANSWER_LIMIT)
            .json(&body);
        async move {
            let response = request.send().await?;
            let status = response.status();
            let answer: Value = response.json().await?;
            if !status.is_success() || answer["text"].as_str().is_none_or(str::is_empty) {
                anyhow::bail!("status {status}: {answer}");
            }
            Ok(())
        }
    })
    .await;

    let simulator_per_sec = if args.baseline {
        let chat = format!("{}/chat/completions", sim.openai_base());
        let sim_only = closed_loop(&args, &[], move |i| {
            let body = json!({
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": format!("Capacity {i}")}],
                "stream": true,
            });
            let request = http
                .post(&chat)
                .timeout(crate::sse::ANSWER_LIMIT)
                .bearer_auth("bench")
                .json(&body);
            async move {
                let text = request.send().await?.error_for_status()?.text().await?;
                anyhow::ensure!(text.contains("[DONE]"), "no [DONE]");
                Ok(())
            }
        })
        .await;
        Some(sim_only.answers as f64 / sim_only.secs)
    } else {
        None
    };

    let raw = Raw {
        workers: args.workers,
        concurrency: args.concurrency,
        secs: outcome.secs,
        warm_up_secs: args.warm_up_secs,
        answers: outcome.answers,
        answers_per_sec: outcome.answers as f64 / outcome.secs,
        latency: Summary::of(&outcome.latencies),
        errors: outcome.errors,
        cpu: outcome.cpu,
        simulator_per_sec,
    };
    eprintln!(
        "capacity with {} worker(s): {:.0} answers/s",
        raw.workers, raw.answers_per_sec
    );
    crate::write_json(&args.out, &raw)
}

struct Outcome {
    secs: f64,
    answers: usize,
    latencies: Vec<Duration>,
    errors: Vec<String>,
    cpu: Vec<(String, f64)>,
}

/// `concurrency` loops each sending `request(i)` (i unique) until the time is up; counts
/// what completed inside the measured window.
async fn closed_loop<F, Fut>(args: &Args, procs: &[Named], request: F) -> Outcome
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let from = Instant::now() + Duration::from_secs(args.warm_up_secs);
    let until = from + Duration::from_secs(args.secs);
    let loops: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (next, request) = (next.clone(), request.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                let mut errors = Vec::new();
                while Instant::now() < until {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let start = Instant::now();
                    match request(i).await {
                        Ok(()) => done.push((start, Instant::now())),
                        Err(e) => errors.push(format!("{e:#}")),
                    }
                }
                (done, errors)
            })
        })
        .collect();
    tokio::time::sleep_until(from.into()).await;
    let meter = CpuMeter::start(procs);
    tokio::time::sleep_until(until.into()).await;
    let cpu = meter.stop();
    let mut answers = 0;
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    for task in loops {
        match task.await {
            Ok((done, errs)) => {
                for (start, end) in done {
                    if end >= from && end < until {
                        answers += 1;
                        latencies.push(end - start);
                    }
                }
                errors.extend(errs);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let errors = crate::stats::count_distinct(errors);
    Outcome {
        secs: args.secs as f64,
        answers,
        latencies,
        errors,
        cpu,
    }
}

pub fn sections(dir: &Path) -> anyhow::Result<Vec<Section>> {
    let one: Option<Raw> = crate::report::load(dir, "capacity-1.json")?;
    let two: Option<Raw> = crate::report::load(dir, "capacity-2.json")?;
    let Some(one) = one else {
        return Ok(vec![Section::skipped(
            "P5",
            "Pipeline capacity",
            "not in this run",
        )]);
    };
    let baseline = one.simulator_per_sec.map_or(String::new(), |s| {
        format!("simulator alone: {}/s", fmt_count(s))
    });
    let mut rows = vec![Row {
        what: "unique answers per second, 1 worker".to_owned(),
        measured: format!("{}/s", fmt_count(one.answers_per_sec)),
        baseline: baseline.clone(),
        ratio: String::new(),
        goal: String::new(),
        met: None,
    }];
    if let Some(two) = &two {
        rows.push(Row {
            what: "unique answers per second, 2 workers".to_owned(),
            measured: format!("{}/s", fmt_count(two.answers_per_sec)),
            baseline: format!("1 worker: {}/s", fmt_count(one.answers_per_sec)),
            ratio: format!("{:.2}×", two.answers_per_sec / one.answers_per_sec),
            goal: String::new(),
            met: None,
        });
    }
    // The same load on the cluster of P7 (three hub servers, every stream at three replicas,
    // `sync_interval: always`), through the API beside the hub, with its two workers.
    let hub: Option<Raw> = crate::report::load(dir, "capacity-hub.json")?;
    if let (Some(hub), Some(two)) = (&hub, &two) {
        rows.push(Row {
            what: "unique answers per second, 2 workers, on the hub (3 servers, 3 replicas, \
                   `sync_interval: always`)"
                .to_owned(),
            measured: format!("{}/s", fmt_count(hub.answers_per_sec)),
            baseline: format!("one server: {}/s", fmt_count(two.answers_per_sec)),
            ratio: format!("{:.2}×", hub.answers_per_sec / two.answers_per_sec),
            goal: String::new(),
            met: None,
        });
    }
    for raw in std::iter::once(&one).chain(two.as_ref()) {
        rows.push(Row::info(
            format!(
                "latency p50 / p99 at {} in flight, {} worker(s)",
                raw.concurrency, raw.workers
            ),
            format!(
                "{} / {} ms",
                fmt_ms(raw.latency.p50_ms),
                fmt_ms(raw.latency.p99_ms)
            ),
        ));
        rows.push(Row::info(
            format!("CPU per answer, {} worker(s)", raw.workers),
            cpu_breakdown(raw),
        ));
    }
    if let Some(hub) = &hub {
        rows.push(Row::info(
            "CPU per answer, 2 workers, on the hub",
            cpu_breakdown(hub),
        ));
    }
    let notes: Vec<String> = std::iter::once(&one)
        .chain(two.as_ref())
        .chain(hub.as_ref())
        .flat_map(|r| {
            r.errors
                .iter()
                .map(move |e| format!("{} worker(s): {e}", r.workers))
        })
        .collect();
    Ok(vec![Section {
        id: "P5",
        title: "Pipeline capacity",
        method: format!(
            "{} closed-loop clients each `POST /v1/fights` a new matchup and wait for the \
             answer, for {} s after {} s of warm-up, with the simulator answering at once \
             (0 ms to the first token, no pacing): every request is a job, a claim in \
             Postgres, a stream of events, a KV write. Where the time goes: CPU seconds of \
             each process (with its children, for Postgres) over the measured window, from \
             `/proc/PID/stat`, divided by the answers; on 2 cores the sum per answer cannot \
             go below 2 s ÷ answers per second.",
            one.concurrency, one.secs, one.warm_up_secs
        ),
        rows,
        notes,
        skipped: None,
        appendix: std::fs::read_to_string(dir.join("profile.md")).unwrap_or_default(),
    }])
}

/// "api 0.9 · worker 1.8 · … · total 5.0 ms (the 2 cores offer 5.0 ms per answer …)".
fn cpu_breakdown(raw: &Raw) -> String {
    let answers = raw.answers.max(1) as f64;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
    format!(
        "{} (the {} cores offer {} ms per answer at this rate)",
        crate::procs::per_answer(&raw.cpu, raw.answers),
        cores,
        fmt_ms(cores * raw.secs * 1e3 / answers)
    )
}
