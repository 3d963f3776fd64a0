//! R1: how fast a miss that may not start a generation is refused, beside a hit of the same
//! API. One client, one keep-alive connection, one request at a time, each with new names:
//!
//! - over the client's limit: an API with `VERSUS_CLIENT_MISSES_PER_MINUTE=1`, whose one
//!   admitted miss is spent first, answers `429 rate_limited`;
//! - over the daily budget: an API with a budget smaller than one answer, after one answer
//!   has been paid for, ends the stream with `error{code:"budget_exhausted"}`;
//! - over the client's daily quota: an API with `VERSUS_CLIENT_DAILY_USD` below one answer's
//!   worst case, which trusts the bench's `X-Forwarded-For`, answers `429 quota_exhausted`:
//!   for a new client each time (the quota bucket read once per request, a round trip to
//!   nats-server), and for one client again and again (known to the replica after its first
//!   refusal: no round trip).
//!
//! None publishes a job; the time is the API's (and the quota bucket's) alone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::report::{Row, Section};
use crate::stats::{Summary, fmt_ms};

const FILE: &str = "refuse.json";
/// The bound on refusing a miss over budget; a limit's refusal is held to it too.
const GOAL_MS: f64 = 100.0;

#[derive(clap::Args)]
pub struct Args {
    /// The API of the other scenarios: it serves the hits of the baseline and pays for the
    /// answer that spends the small budget.
    #[arg(long)]
    pub api: String,
    /// An API with `VERSUS_CLIENT_MISSES_PER_MINUTE=1`.
    #[arg(long)]
    pub limited_api: String,
    /// An API whose `VERSUS_DAILY_BUDGET_USD` is below one answer's cost.
    #[arg(long)]
    pub budget_api: String,
    /// An API whose `VERSUS_CLIENT_DAILY_USD` is below one answer's worst case, with
    /// `VERSUS_TRUSTED_PROXIES=127.0.0.1/32` (each request names its client).
    #[arg(long)]
    pub quota_api: Option<String>,
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Requests of each kind.
    #[arg(long, default_value_t = 2000)]
    pub n: usize,
}

#[derive(Serialize, Deserialize)]
pub struct Raw {
    pub n: usize,
    pub hit: Summary,
    pub rate_limited: Summary,
    pub budget: Summary,
    /// Over the quota, a new client each time (None in results from before the quota).
    #[serde(default)]
    pub quota_read: Option<Summary>,
    /// Over the quota, one client known to the replica.
    #[serde(default)]
    pub quota_known: Option<Summary>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()?;
    let run = crate::run_id();
    // Names of letters, digits and dashes need no escaping.
    let stream = |api: &str, a: &str| format!("{api}/v1/fights/stream?a={a}&b=refused-{run}");

    // One answer, paid for: the hit of the baseline, and the spend past the small budget.
    let answer: serde_json::Value = client
        .post(format!("{}/v1/fights", args.api))
        .json(&serde_json::json!({"a": format!("hit {run}"), "b": "baseline"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let key = answer["key"].as_str().context("an answer with a key")?;
    let hit_url = format!("{}/v1/fights/{key}", args.api);
    let hit = timed(
        &client,
        args.n,
        |_| hit_url.clone(),
        |_| None,
        |status, _| status == 200,
    )
    .await?;

    // The limited API's one admitted miss goes first; every later one is over the limit.
    let first = client
        .get(stream(&args.limited_api, "first"))
        .send()
        .await?;
    drop(first);
    let rate_limited = timed(
        &client,
        args.n,
        |i| stream(&args.limited_api, &format!("limited-{i}")),
        |_| None,
        |status, _| status == 429,
    )
    .await?;

    // The budget API learns of the answer's spend through the bus.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = client
            .get(format!("{}/metrics", args.budget_api))
            .send()
            .await?
            .text()
            .await?;
        if metrics.contains("versus_budget_remaining_usd 0\n") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the budget API never saw its budget spent");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let budget = timed(
        &client,
        args.n,
        |i| stream(&args.budget_api, &format!("over-budget-{i}")),
        |_| None,
        |status, body| status == 200 && body.contains("budget_exhausted"),
    )
    .await?;

    // A client of its own per request (addresses in 10.0.0.0/8, one each): every refusal
    // reads the client's counter from the bucket. Then one client (from TEST-NET-2), whose
    // first refusal the replica remembers.
    let over_quota = |status: u16, body: &str| status == 429 && body.contains("quota_exhausted");
    let (mut quota_read, mut quota_known) = (None, None);
    if let Some(api) = &args.quota_api {
        quota_read = Some(
            timed(
                &client,
                args.n,
                |i| stream(api, &format!("quota-new-{i}")),
                |i| {
                    Some(format!(
                        "10.{}.{}.{}",
                        (i >> 16) & 255,
                        (i >> 8) & 255,
                        i & 255
                    ))
                },
                over_quota,
            )
            .await?,
        );
        quota_known = Some(
            timed(
                &client,
                args.n,
                |i| stream(api, &format!("quota-known-{i}")),
                |_| Some("198.51.100.1".to_owned()),
                over_quota,
            )
            .await?,
        );
    }

    let raw = Raw {
        n: args.n,
        hit,
        rate_limited,
        budget,
        quota_read,
        quota_known,
    };
    crate::write_json(&args.out_dir.join(FILE), &raw)
}

/// `n` GETs of `url(i)` one after another, each with `X-Forwarded-For: forwarded(i)` when
/// that is given; each must pass `ok(status, body)`.
async fn timed(
    client: &reqwest::Client,
    n: usize,
    url: impl Fn(usize) -> String,
    forwarded: impl Fn(usize) -> Option<String>,
    ok: impl Fn(u16, &str) -> bool,
) -> anyhow::Result<Summary> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let url = url(i);
        let mut request = client.get(&url);
        if let Some(client) = forwarded(i) {
            request = request.header("x-forwarded-for", client);
        }
        let began = Instant::now();
        let response = request.send().await?;
        let status = response.status().as_u16();
        let body = response.text().await?;
        samples.push(began.elapsed());
        if !ok(status, &body) {
            bail!("{url} answered {status}: {body}");
        }
    }
    Ok(Summary::of(&samples))
}

pub fn sections(dir: &Path) -> anyhow::Result<Vec<Section>> {
    let Some(raw) = crate::report::load::<Raw>(dir, FILE)? else {
        return Ok(vec![Section::skipped(
            "R1",
            "refusing a miss",
            "not selected in this run",
        )]);
    };
    let row = |what: &str, s: &Summary, goal: bool| Row {
        what: what.to_owned(),
        measured: format!("p50 {} ms, p99 {} ms", fmt_ms(s.p50_ms), fmt_ms(s.p99_ms)),
        baseline: format!(
            "hit: p50 {} ms, p99 {} ms",
            fmt_ms(raw.hit.p50_ms),
            fmt_ms(raw.hit.p99_ms)
        ),
        ratio: format!("{:.2}× (p50)", s.p50_ms / raw.hit.p50_ms),
        goal: if goal {
            format!("≤ {GOAL_MS} ms")
        } else {
            String::new()
        },
        met: goal.then_some(s.p99_ms <= GOAL_MS),
    };
    Ok(vec![Section {
        id: "R1",
        title: "refusing a miss",
        method: format!(
            "{} requests of each kind, one at a time on one keep-alive connection, each with \
             new names; the baseline is a hit (`GET /v1/fights/{{key}}`) of the same answer, \
             measured the same way. No refusal publishes a job or reaches a worker.",
            raw.n
        ),
        rows: [
            row(
                "a miss over the client's limit: 429 `rate_limited`",
                &raw.rate_limited,
                true,
            ),
            row(
                "a miss over the daily budget: SSE `error{budget_exhausted}` (the events stream's last event read first)",
                &raw.budget,
                true,
            ),
        ]
        .into_iter()
        .chain(raw.quota_read.as_ref().map(|s| {
            row(
                "a miss over the client's daily quota, a new client each time: 429 `quota_exhausted` (its counter read from the quota bucket)",
                s,
                true,
            )
        }))
        .chain(raw.quota_known.as_ref().map(|s| {
            row(
                "a miss over the client's daily quota, a client the replica saw refused: 429 `quota_exhausted` (no round trip)",
                s,
                true,
            )
        }))
        .collect(),
        notes: Vec::new(),
        skipped: None,
        appendix: String::new(),
    }])
}
