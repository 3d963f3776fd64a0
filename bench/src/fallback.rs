//! P12. A miss while the primary provider is down (issue 31): the workers fall back to a second
//! simulator for text (`VERSUS_FALLBACKS`, started so by `scripts/bench`), and once a
//! provider's circuit is open its calls go straight to the next provider. One unique miss at a
//! time, as in P2's one-at-a-time run: first on a healthy primary, then with the primary
//! answering 500 to every chat call and every worker's circuit of it open; each side beside
//! the same request straight to the simulator that serves it, both simulators paced alike.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde::{Deserialize, Serialize};

use crate::miss::{errors, summary};
use crate::report::{Row, Section};
use crate::sim::Sim;
use crate::sse::{self, Timeline};
use crate::stats::{Summary, fmt_ms};

const FILE: &str = "fallback.json";
/// The primary's chat in the workers' metrics (`versus_circuit_state{provider=…}`).
const PRIMARY_TEXT: &str = "provider=\"text/primary\"";
/// The gauge's value of an open circuit.
const OPEN: f64 = 2.0;
/// Rounds of concurrent misses at most, to open every worker's circuit.
const OPENING_ROUNDS: usize = 20;
/// The goal: a miss served by the fallback adds at most this much to the first token over a
/// miss on a healthy primary (issue 31).
const GOAL_MS: f64 = 10.0;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub api: String,
    /// The primary simulator (`OPENAI_BASE_URL` without `/v1`).
    #[arg(long)]
    pub sim: String,
    /// The fallback simulator, the workers' `VERSUS_FALLBACKS` entry for text.
    #[arg(long)]
    pub fallback_sim: String,
    /// The fallback's model, as `VERSUS_FALLBACKS` names it.
    #[arg(long, default_value = "fallback-chat")]
    pub fallback_model: String,
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Misses, one at a time, on each side (healthy primary, primary down).
    #[arg(long, default_value_t = 100)]
    pub rounds: usize,
    #[arg(long, default_value_t = 400)]
    pub ttft_ms: u64,
    #[arg(long, default_value_t = 600)]
    pub tokens_per_sec: u64,
    /// The workers' `/metrics` URLs (all of them): their circuits of the primary's chat must
    /// all be open before the misses with the primary down are measured.
    #[arg(long = "metrics", required = true)]
    pub metrics: Vec<String>,
}

/// One side: the misses through the API and the same requests straight to its simulator.
#[derive(Serialize, Deserialize)]
pub struct Side {
    pub direct_first: Summary,
    pub direct_done: Summary,
    pub system_first: Summary,
    pub system_done: Summary,
    pub direct_errors: Vec<String>,
    pub system_errors: Vec<String>,
    /// Complete answers whose `done` says `degraded`.
    pub degraded: usize,
    /// The models that wrote the answers, as their `done` names them ("99× gpt-4o-mini").
    pub models: Vec<String>,
}

#[derive(Serialize, Deserialize)]
pub struct Raw {
    pub rounds: usize,
    pub ttft_ms: u64,
    pub tokens_per_sec: u64,
    pub fallback_model: String,
    pub workers: usize,
    pub healthy: Side,
    pub down: Side,
    /// Misses made to open the circuits, and how long that took.
    pub opening_misses: usize,
    pub opening_ms: f64,
    /// Whether every worker's circuit of the primary's chat was open before the measured
    /// misses with the primary down (and still was after them).
    pub circuits_open: bool,
    pub circuits_open_after: bool,
    /// Chat calls each simulator received during each side's measured rounds (direct ones
    /// included).
    pub healthy_primary_calls: u64,
    pub healthy_fallback_calls: u64,
    pub down_primary_calls: u64,
    pub down_fallback_calls: u64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let primary = Sim::new(&args.sim)?;
    let fallback = Sim::new(&args.fallback_sim)?;
    let client = sse::client()?;
    let run = crate::run_id();

    // Warm-up, not measured: the client's connections to the API and to both simulators, the
    // workers' to the primary.
    primary.reset_with(0, 0).await?;
    fallback.reset_with(0, 0).await?;
    for i in 0..2 {
        let (a, b) = names(&format!("warm {run}"), i);
        let _ = sse::straight_to_sim(&client, &primary.openai_base(), &a, &b).await;
        let _ = sse::straight_to_sim_as(
            &client,
            &fallback.openai_base(),
            &args.fallback_model,
            &a,
            &b,
        )
        .await;
        let url = sse::stream_url(&args.api, &a, &b)?;
        let _ = sse::within(sse::ANSWER_LIMIT, sse::through_api(&client, url)).await;
    }

    // A healthy primary.
    primary
        .reset_with(args.ttft_ms, args.tokens_per_sec)
        .await?;
    fallback
        .reset_with(args.ttft_ms, args.tokens_per_sec)
        .await?;
    let (direct, system) = rounds(
        &client,
        &args,
        &primary.openai_base(),
        "gpt-4o-mini",
        &format!("{run} up"),
    )
    .await?;
    let healthy = side(&direct, &system);
    let healthy_primary_calls = primary.chat_calls().await?;
    let healthy_fallback_calls = fallback.chat_calls().await?;
    eprintln!(
        "healthy primary: first token p50/p99 {:.2}/{:.2} ms (simulator {:.2}/{:.2} ms)",
        healthy.system_first.p50_ms,
        healthy.system_first.p99_ms,
        healthy.direct_first.p50_ms,
        healthy.direct_first.p99_ms
    );

    // The primary fails every chat call (its moderation still answers); misses, a few at a
    // time with an instant fallback, until every worker's circuit of the primary is open.
    primary.fail_every_chat(500).await?;
    fallback.reset_with(0, 0).await?;
    let opening_started = Instant::now();
    let mut opening_misses = 0;
    let per_round = 2 * args.metrics.len();
    for r in 0..OPENING_ROUNDS {
        if all_open(&args.metrics).await {
            break;
        }
        let timelines = join_all((0..per_round).map(|i| {
            let (a, b) = names(&format!("{run} open {r}"), i);
            let client = client.clone();
            let url = sse::stream_url(&args.api, &a, &b);
            tokio::spawn(async move {
                match url {
                    Ok(url) => sse::within(sse::ANSWER_LIMIT, sse::through_api(&client, url)).await,
                    Err(e) => Timeline {
                        error: Some(e.to_string()),
                        ..Timeline::default()
                    },
                }
            })
        }))
        .await;
        opening_misses += per_round;
        let failed = timelines
            .iter()
            .filter(|t| !t.as_ref().is_ok_and(Timeline::complete))
            .count();
        if failed > 0 {
            eprintln!("opening the circuits: {failed} of {per_round} misses incomplete");
        }
    }
    let circuits_open = all_open(&args.metrics).await;
    let opening_ms = opening_started.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "opening the circuits: {opening_misses} misses, {opening_ms:.0} ms, all open: \
         {circuits_open}"
    );
    // Stragglers of the opening (answers' moderation, completions) out of the way.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The primary down: the same misses, served by the fallback, paced as the primary was.
    fallback
        .reset_with(args.ttft_ms, args.tokens_per_sec)
        .await?;
    let primary_before = primary.chat_calls().await?;
    let (direct, system) = rounds(
        &client,
        &args,
        &fallback.openai_base(),
        &args.fallback_model,
        &format!("{run} down"),
    )
    .await?;
    let down = side(&direct, &system);
    let down_primary_calls = primary.chat_calls().await? - primary_before;
    let down_fallback_calls = fallback.chat_calls().await?;
    let circuits_open_after = all_open(&args.metrics).await;
    primary.clear_faults().await?;
    eprintln!(
        "primary down: first token p50/p99 {:.2}/{:.2} ms (fallback simulator {:.2}/{:.2} ms); \
         {down_primary_calls} chat calls reached the primary",
        down.system_first.p50_ms,
        down.system_first.p99_ms,
        down.direct_first.p50_ms,
        down.direct_first.p99_ms
    );

    let raw = Raw {
        rounds: args.rounds,
        ttft_ms: args.ttft_ms,
        tokens_per_sec: args.tokens_per_sec,
        fallback_model: args.fallback_model.clone(),
        workers: args.metrics.len(),
        healthy,
        down,
        opening_misses,
        opening_ms,
        circuits_open,
        circuits_open_after,
        healthy_primary_calls,
        healthy_fallback_calls,
        down_primary_calls,
        down_fallback_calls,
    };
    crate::write_json(&args.out_dir.join(FILE), &raw)
}

/// `args.rounds` rounds, each a request straight to the simulator at `openai_base` (naming
/// `model`), then a unique miss through the API, one at a time.
async fn rounds(
    client: &reqwest::Client,
    args: &Args,
    openai_base: &str,
    model: &str,
    tag: &str,
) -> anyhow::Result<(Vec<Timeline>, Vec<Timeline>)> {
    let mut direct = Vec::new();
    let mut system = Vec::new();
    for i in 0..args.rounds {
        let (a, b) = names(tag, i);
        direct.push(
            sse::within(
                sse::ANSWER_LIMIT,
                sse::straight_to_sim_as(client, openai_base, model, &a, &b),
            )
            .await,
        );
        // One request at a time: a short pause keeps each side's tail off the other.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let url = sse::stream_url(&args.api, &a, &b)?;
        system.push(sse::within(sse::ANSWER_LIMIT, sse::through_api(client, url)).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((direct, system))
}

fn side(direct: &[Timeline], system: &[Timeline]) -> Side {
    let complete = || system.iter().filter(|t| t.complete());
    Side {
        direct_first: summary(direct, |t| t.first_token),
        direct_done: summary(direct, |t| t.done),
        system_first: summary(system, |t| t.first_token),
        system_done: summary(system, |t| t.done),
        direct_errors: errors(direct, |_| None),
        system_errors: errors(system, |t| {
            (t.cached == Some(true)).then(|| "a hit, not a miss".to_owned())
        }),
        degraded: complete().filter(|t| t.degraded == Some(true)).count(),
        models: crate::stats::count_distinct(
            complete().map(|t| t.model.clone().unwrap_or_else(|| "no model".to_owned())),
        ),
    }
}

/// Whether every worker at `metrics` says its circuit of the primary's chat is open.
async fn all_open(metrics: &[String]) -> bool {
    for url in metrics {
        let text = match reqwest::get(url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => {
                eprintln!("reading {url}: {e}");
                return false;
            }
        };
        let open = text
            .lines()
            .filter_map(|l| l.strip_prefix("versus_circuit_state{"))
            .filter_map(|rest| rest.split_once("} "))
            .any(|(labels, value)| {
                labels.split(',').any(|l| l == PRIMARY_TEXT)
                    && value.trim().parse::<f64>() == Ok(OPEN)
            });
        if !open {
            return false;
        }
    }
    true
}

fn names(tag: &str, i: usize) -> (String, String) {
    (format!("Fallback {tag} {i}"), format!("Rival {i}"))
}

pub fn sections(dir: &Path) -> anyhow::Result<Vec<Section>> {
    let title = "A miss while the primary is down";
    let Some(raw) = crate::report::load::<Raw>(dir, FILE)? else {
        return Ok(vec![Section::skipped("P12", title, "not in this run")]);
    };
    let (up, down) = (&raw.healthy, &raw.down);
    let added = |s: &Side, p50: bool| {
        if p50 {
            s.system_first.p50_ms - s.direct_first.p50_ms
        } else {
            s.system_first.p99_ms - s.direct_first.p99_ms
        }
    };
    let first = |q: &str, p50: bool| {
        let pick = |s: &Summary| if p50 { s.p50_ms } else { s.p99_ms };
        let (a_down, a_up) = (added(down, p50), added(up, p50));
        Row {
            what: format!(
                "added to the first token, {q}: primary down (its circuit open), served by the \
                 fallback"
            ),
            measured: format!(
                "{:+.2} ms ({} ms; the fallback simulator alone {} ms)",
                a_down,
                fmt_ms(pick(&down.system_first)),
                fmt_ms(pick(&down.direct_first))
            ),
            baseline: format!(
                "healthy primary: {:+.2} ms ({} ms; the primary simulator alone {} ms)",
                a_up,
                fmt_ms(pick(&up.system_first)),
                fmt_ms(pick(&up.direct_first))
            ),
            ratio: format!("{:+.2} ms", a_down - a_up),
            goal: format!("≤ healthy + {GOAL_MS} ms"),
            met: Some(a_down - a_up <= GOAL_MS && raw.circuits_open),
        }
    };
    let clean = |s: &Side| s.system_errors.is_empty() && s.direct_errors.is_empty();
    let n = raw.rounds;
    let mut rows = vec![
        first("p50", true),
        first("p99", false),
        Row::info(
            "time to `done`, p50 / p99: primary down, healthy primary",
            format!(
                "{} / {} ms, {} / {} ms (the simulators alone: {} / {} ms, {} / {} ms; the \
                 fallback's model writes another answer)",
                fmt_ms(down.system_done.p50_ms),
                fmt_ms(down.system_done.p99_ms),
                fmt_ms(up.system_done.p50_ms),
                fmt_ms(up.system_done.p99_ms),
                fmt_ms(down.direct_done.p50_ms),
                fmt_ms(down.direct_done.p99_ms),
                fmt_ms(up.direct_done.p50_ms),
                fmt_ms(up.direct_done.p99_ms),
            ),
        ),
        Row {
            what: "complete answers; primary down: each degraded, by the fallback's model"
                .to_owned(),
            measured: format!(
                "{}/{n}, {} degraded ({})",
                down.system_done.count,
                down.degraded,
                down.models.join(", ")
            ),
            baseline: format!(
                "healthy: {}/{n}, {} degraded ({})",
                up.system_done.count,
                up.degraded,
                up.models.join(", ")
            ),
            ratio: String::new(),
            goal: "all".to_owned(),
            met: Some(
                clean(down)
                    && clean(up)
                    && down.degraded == n
                    && up.degraded == 0
                    && down.system_done.count as usize == n
                    && up.system_done.count as usize == n,
            ),
        },
        Row {
            what: "chat calls that reached the failing primary during the misses with its \
                   circuit open"
                .to_owned(),
            measured: raw.down_primary_calls.to_string(),
            baseline: String::new(),
            ratio: String::new(),
            goal: "0".to_owned(),
            met: Some(raw.down_primary_calls == 0),
        },
        Row::info(
            "opening the circuits: misses (answered by the fallback), time; every worker's \
             circuit of the primary's chat open before / after the measured misses",
            format!(
                "{} misses in {:.1} s; {} / {}",
                raw.opening_misses,
                raw.opening_ms / 1e3,
                yes_no(raw.circuits_open),
                yes_no(raw.circuits_open_after)
            ),
        ),
        Row::info(
            "chat calls: healthy side (primary / fallback), primary down (fallback)",
            format!(
                "{} / {}, {} for {} requests a side",
                raw.healthy_primary_calls,
                raw.healthy_fallback_calls,
                raw.down_fallback_calls,
                2 * n
            ),
        ),
    ];
    if !raw.circuits_open {
        rows.push(Row::info(
            "caution",
            "not every worker's circuit was open: some measured misses may have tried the \
             primary first",
        ));
    }
    let mut notes = Vec::new();
    for (what, s) in [("healthy", up), ("primary down", down)] {
        for e in s.system_errors.iter().chain(&s.direct_errors) {
            notes.push(format!("Failed ({what}): {e}"));
        }
    }
    Ok(vec![Section {
        id: "P12",
        title,
        method: format!(
            "The workers (VERSUS_WORKER_CONCURRENCY as above, {workers} of them) are started \
             again with a fallback provider for text: a second simulator, model `{model}` \
             (`VERSUS_FALLBACKS`), its circuit open for an hour once opened \
             (`VERSUS_CIRCUIT_OPEN_SECS=3600`, `VERSUS_CIRCUIT_FAILURES` at its default). Both \
             simulators: {ttft} ms to the first token, {tps} tokens/s. One unique miss at a \
             time through the API (`/v1/fights/stream`, timed from just before the request to \
             its first `chunk`), each after the same request straight to the simulator that \
             serves it: {n} on a healthy primary, then {n} with the primary answering 500 to \
             every chat call (its moderation still answers, so both sides make the same \
             moderation call and differ only in the chat's provider) once misses, {per} at a \
             time, have opened every worker's circuit of the primary's chat \
             (`versus_circuit_state`). Added = a side's percentile − its simulator's; the goal \
             compares the two.",
            workers = raw.workers,
            model = raw.fallback_model,
            ttft = raw.ttft_ms,
            tps = raw.tokens_per_sec,
            per = 2 * raw.workers,
        ),
        rows,
        notes,
        skipped: None,
        appendix: String::new(),
    }])
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
