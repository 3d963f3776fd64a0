//! P6: pre-warming. One batch of new matchups through `POST /v1/admin/prewarm`, against a
//! simulator that takes a fixed time per call; the wall time until the batch reports
//! nothing pending, beside the ideal: count × latency ÷ the pre-warm concurrency.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::report::{Row, Section};
use crate::sim::Sim;
use crate::stats::fmt_count;

const FILE: &str = "prewarm.json";

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub api: String,
    #[arg(long)]
    pub sim: String,
    #[arg(long)]
    pub out_dir: PathBuf,
    /// The admin bearer token the API was started with.
    #[arg(long, env = "VERSUS_ADMIN_TOKEN", hide_env_values = true)]
    pub token: String,
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// The simulator's time per call.
    #[arg(long, default_value_t = 200)]
    pub latency_ms: u64,
    /// Workers running.
    #[arg(long)]
    pub workers: usize,
    /// The worker binary, whose `--help` gives the pre-warm concurrency defaults.
    #[arg(long)]
    pub worker_bin: PathBuf,
}

#[derive(Serialize, Deserialize)]
pub struct Raw {
    pub skipped: Option<String>,
    pub n: usize,
    pub latency_ms: u64,
    /// Pre-warm jobs that can run at once, cluster-wide.
    pub concurrency: u64,
    /// How `concurrency` was worked out.
    pub concurrency_from: String,
    pub wall_secs: f64,
    pub ideal_secs: f64,
    pub done: u64,
    pub failed: u64,
    pub already_cached: u64,
    pub upstream_calls: u64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let (concurrency, concurrency_from) = concurrency(&args)?;
    let mut raw = Raw {
        skipped: None,
        n: args.n,
        latency_ms: args.latency_ms,
        concurrency,
        concurrency_from,
        wall_secs: 0.0,
        ideal_secs: args.n as f64 * args.latency_ms as f64 / 1e3 / concurrency.max(1) as f64,
        done: 0,
        failed: 0,
        already_cached: 0,
        upstream_calls: 0,
    };
    let sim = Sim::new(&args.sim)?;
    sim.reset_with(args.latency_ms, 0).await?;
    let http = reqwest::Client::new();
    let api = args.api.trim_end_matches('/');
    let run = crate::run_id();
    let matchups: Vec<Value> = (0..args.n)
        .map(|i| json!({"a": format!("Prewarm {run} {i}"), "b": "Rival"}))
        .collect();

    let start = Instant::now();
    let response = http
        .post(format!("{api}/v1/admin/prewarm"))
        .bearer_auth(&args.token)
        .json(&json!({"matchups": matchups, "images": false}))
        .send()
        .await?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        raw.skipped = Some(
            "`POST /v1/admin/prewarm` answered 404: this build has no pre-warm route".to_owned(),
        );
        return crate::write_json(&args.out_dir.join(FILE), &raw);
    }
    let accepted: Value = response.json().await.context("the pre-warm answer")?;
    if !status.is_success() {
        bail!("POST /v1/admin/prewarm answered {status}: {accepted}");
    }
    raw.already_cached = accepted["already_cached"].as_u64().unwrap_or(0);
    let batch = accepted["batch"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| accepted["batch"].as_u64().map(|b| b.to_string()))
        .context("no batch id in the pre-warm answer")?;

    let deadline = start + Duration::from_secs_f64(raw.ideal_secs * 2.0 + 30.0);
    loop {
        let progress: Value = http
            .get(format!("{api}/v1/admin/prewarm/{batch}"))
            .bearer_auth(&args.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let pending = progress["pending"].as_u64().context("no pending count")?;
        if pending == 0 {
            raw.wall_secs = start.elapsed().as_secs_f64();
            raw.done = progress["done"].as_u64().unwrap_or(0);
            raw.failed = progress["failed"].as_u64().unwrap_or(0);
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the batch still had {pending} pending after {:?}",
                start.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    raw.upstream_calls = sim.chat_calls().await?;
    eprintln!(
        "pre-warm: {} matchups in {:.2} s (ideal {:.2} s at concurrency {})",
        args.n, raw.wall_secs, raw.ideal_secs, raw.concurrency
    );
    crate::write_json(&args.out_dir.join(FILE), &raw)
}

/// Pre-warm jobs in flight at once: per-worker concurrency × workers, capped by the
/// cluster-wide limit, each from the environment or else the worker's `--help` default.
fn concurrency(args: &Args) -> anyhow::Result<(u64, String)> {
    let help = std::process::Command::new(&args.worker_bin)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", args.worker_bin.display()))?;
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let setting = |var: &str| -> Option<(u64, String)> {
        if let Some(v) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
            return Some((v, format!("{var}={v}")));
        }
        default_in_help(&help, var).map(|v| (v, format!("{var} default {v}")))
    };
    let (per_worker, mut from) = setting("VERSUS_PREWARM_CONCURRENCY").unwrap_or((
        4,
        "VERSUS_PREWARM_CONCURRENCY assumed 4 (not in --help)".to_owned(),
    ));
    let mut total = per_worker * args.workers as u64;
    from = format!("{from} × {} workers", args.workers);
    if let Some((cap, cap_from)) = setting("VERSUS_PREWARM_MAX_IN_FLIGHT") {
        if cap < total {
            total = cap;
        }
        from = format!("min({from}, {cap_from})");
    }
    Ok((total, from))
}

/// The `[default: N]` clap prints for the option that reads `var`.
fn default_in_help(help: &str, var: &str) -> Option<u64> {
    let at = help.find(&format!("[env: {var}="))?;
    let rest = &help[at..];
    let default = rest.find("[default: ")?;
    // The default must belong to this option: before the next option starts.
    if rest[..default].contains("\n  -") {
        return None;
    }
    let value = &rest[default + "[default: ".len()..];
    value[..value.find(']')?].parse().ok()
}

pub fn sections(dir: &Path) -> anyhow::Result<Vec<Section>> {
    let Some(raw) = crate::report::load::<Raw>(dir, FILE)? else {
        return Ok(vec![Section::skipped("P6", "Pre-warm", "not in this run")]);
    };
    if let Some(why) = raw.skipped {
        return Ok(vec![Section::skipped("P6", "Pre-warm", why)]);
    }
    let ratio = raw.wall_secs / raw.ideal_secs;
    let rows = vec![
        Row {
            what: format!(
                "wall time, {} new matchups at {} ms per upstream call",
                fmt_count(raw.n as f64),
                raw.latency_ms
            ),
            measured: format!("{:.2} s", raw.wall_secs),
            baseline: format!(
                "count × latency ÷ {}: {:.2} s",
                raw.concurrency, raw.ideal_secs
            ),
            ratio: format!("{ratio:.2}×"),
            goal: "≤ 1.1×".to_owned(),
            met: Some(ratio <= 1.1 && raw.failed == 0),
        },
        Row::info(
            "done / failed / upstream calls",
            format!("{} / {} / {}", raw.done, raw.failed, raw.upstream_calls),
        ),
    ];
    Ok(vec![Section {
        id: "P6",
        title: "Pre-warm",
        method: format!(
            "One `POST /v1/admin/prewarm` batch of {} new matchups (text only); the \
             simulator takes {} ms to the first token and sends the rest at once. Wall time: \
             from the POST until `GET /v1/admin/prewarm/{{batch}}` (polled every 50 ms) \
             reports nothing pending. Pre-warm concurrency: {}.",
            raw.n, raw.latency_ms, raw.concurrency_from
        ),
        rows,
        notes: Vec::new(),
        skipped: None,
        appendix: String::new(),
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_of_an_option_is_read_from_clap_help() {
        let help = "Options:
      --prewarm-concurrency <PREWARM_CONCURRENCY>
          Pre-warm jobs this process runs at once
          [env: VERSUS_PREWARM_CONCURRENCY=]
          [default: 4]

      --lease-secs <LEASE_SECS>
          [env: VERSUS_LEASE_SECS=]
          [default: 30]
";
        assert_eq!(default_in_help(help, "VERSUS_PREWARM_CONCURRENCY"), Some(4));
        assert_eq!(default_in_help(help, "VERSUS_LEASE_SECS"), Some(30));
        assert_eq!(default_in_help(help, "VERSUS_MISSING"), None);
    }
}
