//! S1: suggestions as you type (`GET /v1/names/suggest`) with 100,000 known names. The bench
//! writes 50,000 text answers with two new names each straight into the answers bucket (as a
//! worker would, logged in as `versus-admin`), waits until the API suggests the last name
//! written (its index is then complete), and measures the route at a fixed rate (P1's open-loop
//! method) for a prefix and for a typo, the two searches of `api/src/names.rs`, beside the
//! API's resident memory before and after the names.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use versus_shared::{key::Key, wire};

use crate::load::{self, RateResult};
use crate::report::{Row, Section};
use crate::stats::fmt_ms;

const FILE: &str = "suggest.json";
/// "Well under a millisecond of server time": at a fixed rate the p50 is the server's time
/// plus a loopback round trip and the load generator's own.
const GOAL_MS: f64 = 1.0;
/// Syllables of the names: 24³ to 24⁵ combinations, pronounceable, every one a valid name.
const SYLLABLES: [&str; 24] = [
    "ka", "ro", "spi", "der", "man", "hul", "bat", "wo", "go", "ku", "ve", "ge", "ta", "thor",
    "lo", "ki", "zel", "da", "mi", "na", "tor", "rex", "sa", "lu",
];

#[derive(clap::Args)]
pub struct Args {
    /// An API without a look-up limit (`VERSUS_CLIENT_LOOKUPS_PER_SECOND=0`): every request
    /// here comes from one client.
    #[arg(long)]
    pub api: String,
    /// Its process, for its resident memory.
    #[arg(long)]
    pub api_pid: u32,
    /// NATS, as `NATS_URL` takes it, logged in as `versus-admin`.
    #[arg(long)]
    pub nats_url: String,
    #[arg(long)]
    pub nats_password: String,
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Known names to make (two per answer).
    #[arg(long, default_value_t = 100_000)]
    pub names: usize,
    /// Requests per second of each fixed-rate run.
    #[arg(long, default_value_t = 500.0)]
    pub rps: f64,
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
}

#[derive(Serialize, Deserialize)]
pub struct Raw {
    pub names: usize,
    /// From the first put to the API suggesting the last name.
    pub indexed_secs: f64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub prefix: RateResult,
    pub typo: RateResult,
}

/// The `i`th name: unique, from the syllables, with a capital letter.
fn name(i: usize) -> String {
    let mut n = i;
    let mut out = String::new();
    loop {
        out.push_str(SYLLABLES[n % SYLLABLES.len()]);
        n /= SYLLABLES.len();
        if n == 0 {
            break;
        }
    }
    // Three syllables at least, so that prefixes share branches as real names do.
    while out.len() < 6 {
        out.push_str("ka");
    }
    let mut chars = out.chars();
    let first = chars.next().map(|c| c.to_ascii_uppercase()).unwrap_or('K');
    format!("{first}{}", chars.as_str())
}

/// The answers bucket, logged in to NATS (`NATS_URL`'s form) as `versus-admin`.
pub async fn answers_bucket(
    nats_url: &str,
    password: &str,
) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    let nats = crate::nats_as_admin(nats_url, password).await?;
    async_nats::jetstream::new(nats)
        .get_key_value(wire::ANSWERS_BUCKET)
        .await
        .context("finding the answers bucket")
}

/// Writes a text answer of `a` and `b` under `key` straight into the answers bucket, as a
/// worker would.
pub async fn put_answer(
    answers: &async_nats::jetstream::kv::Store,
    key: Key,
    a: String,
    b: String,
) -> anyhow::Result<()> {
    let subject = format!("text.{key}");
    let answer = wire::Answer {
        a,
        b,
        text: "A bench answer.".to_owned(),
        model: "bench".to_owned(),
        attempt: 1,
        key,
        degraded_until_ms: None,
    };
    answers
        .put(subject, serde_json::to_vec(&answer)?.into())
        .await
        .context("putting an answer")?;
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let rss_before_kib = crate::procs::rss_kib(args.api_pid)?;
    let answers = answers_bucket(&args.nats_url, &args.nats_password).await?;
    let run = crate::run_id();
    let pairs = args.names / 2;
    let started = Instant::now();
    futures::stream::iter(0..pairs)
        .map(|i| {
            let answers = answers.clone();
            let run = run.clone();
            async move {
                let key = Key::parse(&format!("{run}{i:024x}")).context("a key")?;
                put_answer(&answers, key, name(2 * i), name(2 * i + 1)).await
            }
        })
        .buffer_unordered(256)
        .try_collect::<()>()
        .await?;
    let last = name(2 * pairs - 1);
    let url =
        |q: &str| -> anyhow::Result<String> {
            Ok(reqwest::Url::parse_with_params(
                &format!("{}/v1/names/suggest", args.api),
                &[("q", q)],
            )?
            .to_string())
        };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let body: serde_json::Value = client.get(url(&last)?).send().await?.json().await?;
        if body["names"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n == last.as_str()))
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the API did not suggest {last} within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let indexed_secs = started.elapsed().as_secs_f64();
    let rss_after_kib = crate::procs::rss_kib(args.api_pid)?;
    eprintln!("{} names indexed in {indexed_secs:.1} s", 2 * pairs);
    // A prefix a couple of hundred names share, and a known name of 12 characters or more
    // with its third letter dropped: the longest automaton a typo search builds.
    let duration = Duration::from_secs(args.secs);
    let prefix = load::run(&url("kaspi")?, args.rps, duration, 8).await?;
    let typo_of = (0..2 * pairs)
        .map(name)
        .find(|n| n.len() >= 12)
        .unwrap_or(last)
        .to_lowercase();
    let typo: String = typo_of
        .chars()
        .take(2)
        .chain(typo_of.chars().skip(3))
        .collect();
    let typo = load::run(&url(&typo)?, args.rps, duration, 8).await?;
    crate::write_json(
        &args.out_dir.join(FILE),
        &Raw {
            names: 2 * pairs,
            indexed_secs,
            rss_before_kib,
            rss_after_kib,
            prefix,
            typo,
        },
    )
}

pub fn sections(dir: &Path) -> anyhow::Result<Vec<Section>> {
    let Some(raw) = crate::report::load::<Raw>(dir, FILE)? else {
        return Ok(vec![Section::skipped(
            "S1",
            "suggestions as you type",
            "not selected in this run",
        )]);
    };
    let row = |what: &str, r: &RateResult| Row {
        what: what.to_owned(),
        measured: format!(
            "p50 {} ms, p99 {} ms at {:.0} req/s ({} errors)",
            fmt_ms(r.latency.p50_ms),
            fmt_ms(r.latency.p99_ms),
            r.achieved_rps,
            r.errors
        ),
        baseline: String::new(),
        ratio: String::new(),
        goal: format!("p50 ≤ {GOAL_MS} ms"),
        met: Some(r.latency.p50_ms <= GOAL_MS && r.errors == 0),
    };
    Ok(vec![Section {
        id: "S1",
        title: "suggestions as you type",
        method: format!(
            "{} known names ({} text answers written straight into the answers bucket); \
             `GET /v1/names/suggest` at a fixed rate (open loop, 8 connections) for a prefix \
             (`kaspi`) and for a name of 12 characters or more with a letter dropped, the \
             costliest search (prefix and Levenshtein automata); an API without a look-up \
             limit.",
            raw.names,
            raw.names / 2
        ),
        rows: vec![
            row("a prefix", &raw.prefix),
            row(
                "a typo (a name of 12 characters or more, a letter dropped)",
                &raw.typo,
            ),
            Row::info(
                "the API's memory: resident before and after the names",
                format!(
                    "{:.1} MiB → {:.1} MiB",
                    raw.rss_before_kib as f64 / 1024.0,
                    raw.rss_after_kib as f64 / 1024.0
                ),
            ),
            Row::info(
                "from the first put to the last name suggested",
                format!("{:.1} s", raw.indexed_secs),
            ),
        ],
        notes: Vec::new(),
        skipped: None,
        appendix: String::new(),
    }])
}
