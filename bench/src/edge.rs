//! P7, P8 and P9: the hub and its edges, as `scripts/cluster` runs them (three hub servers,
//! two leaf edges with an API each, two workers), beside the single-node system of the same
//! run and an API at the hub.
//!
//! - P7: hits at an edge (read from its mirror, then memory) beside hits at the single node.
//! - P8: one miss at a time through an edge, beside the same at the hub's API and straight to
//!   the simulator: what the leaf link adds to the first token.
//! - P9 ([`run_failover`]): the jobs stream's leader SIGKILLed under load: acknowledged jobs
//!   lost, the time until a miss asked after the kill streams, how many streams completed,
//!   the clients' longest wait, and the keys paid for twice.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::future::join_all;
use serde::{Deserialize, Serialize};

use crate::miss::summary;
use crate::report::{Row, Section};
use crate::sim::Sim;
use crate::sse::{self, Timeline};
use crate::stats::{Summary, fmt_count, fmt_ms};
use crate::wrk::{self, Load, WrkResult};

const FILE: &str = "edge.json";
const FAILOVER_FILE: &str = "failover.json";

#[derive(clap::Args)]
pub struct Args {
    /// The single-node system's API (P7's baseline).
    #[arg(long)]
    pub single_api: String,
    /// An API beside the hub (P8's baseline).
    #[arg(long)]
    pub hub_api: String,
    /// An edge's API.
    #[arg(long)]
    pub edge_api: String,
    #[arg(long)]
    pub sim: String,
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Seconds of each wrk run.
    #[arg(long, default_value_t = 10)]
    pub secs: u32,
    /// Misses, one at a time, on each side of P8.
    #[arg(long, default_value_t = 40)]
    pub n: usize,
    /// The simulator's time to first token in P8.
    #[arg(long, default_value_t = 100)]
    pub ttft_ms: u64,
}

#[derive(Serialize, Deserialize)]
pub struct Raw {
    pub load: Load,
    pub single_sse: WrkResult,
    pub edge_sse: WrkResult,
    pub single_json: WrkResult,
    pub edge_json: WrkResult,
    pub n: usize,
    pub ttft_ms: u64,
    pub direct_first: Summary,
    pub hub_first: Summary,
    pub edge_first: Summary,
    pub errors: Vec<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let sim = Sim::new(&args.sim)?;
    let client = sse::client()?;
    let run = crate::run_id();
    sim.reset_with(0, 0).await?;

    // P7: one answer per side, then hits of it.
    let load = Load {
        threads: 2,
        connections: 32,
        secs: args.secs,
    };
    let single = hit_urls(&client, &args.single_api, &format!("Single {run}")).await?;
    let edge = hit_urls(&client, &args.edge_api, &format!("Edge {run}")).await?;
    let single_sse = wrk::run(single.0.as_str(), load).await?;
    let edge_sse = wrk::run(edge.0.as_str(), load).await?;
    let single_json = wrk::run(&single.1, load).await?;
    let edge_json = wrk::run(&edge.1, load).await?;

    // P8: one miss at a time, in turn straight to the simulator, at the hub, at the edge.
    sim.reset_with(args.ttft_ms, 400).await?;
    let (direct, sides) = misses_in_turn(
        &client,
        &sim,
        &format!("Miss {run}"),
        &[("hub", &args.hub_api), ("edge", &args.edge_api)],
        args.n,
    )
    .await?;
    let [hub, at_edge] = <[Vec<Timeline>; 2]>::try_from(sides).expect("two sides");
    let mut errors = Vec::new();
    for t in direct.iter().chain(&hub).chain(&at_edge) {
        if let Some(e) = &t.error {
            errors.push(e.clone());
        }
    }
    let first = |ts: &[Timeline]| summary(ts, |t| t.first_token);
    let raw = Raw {
        load,
        single_sse,
        edge_sse,
        single_json,
        edge_json,
        n: args.n,
        ttft_ms: args.ttft_ms,
        direct_first: first(&direct),
        hub_first: first(&hub),
        edge_first: first(&at_edge),
        errors: crate::stats::count_distinct(errors),
    };
    crate::write_json(&args.out_dir.join(FILE), &raw)
}

/// P8's method: `n` unique misses one at a time (`{prefix} {i}` against "Its Rival"), each in
/// turn straight to the simulator, then at each of `sides` (`(name, API)`, the name added to
/// the first name so that every side's miss is new). The simulator's timelines, and each
/// side's, in the order of `sides`.
pub async fn misses_in_turn(
    client: &reqwest::Client,
    sim: &Sim,
    prefix: &str,
    sides: &[(&str, &str)],
    n: usize,
) -> anyhow::Result<(Vec<Timeline>, Vec<Vec<Timeline>>)> {
    let base = sim.openai_base();
    let mut direct = Vec::new();
    let mut out: Vec<Vec<Timeline>> = sides.iter().map(|_| Vec::new()).collect();
    for i in 0..n {
        let (a, b) = (format!("{prefix} {i}"), "Its Rival".to_owned());
        direct.push(sse::straight_to_sim(client, &base, &a, &b).await);
        for ((side, api), out) in sides.iter().zip(&mut out) {
            let url = sse::stream_url(api, &format!("{a} {side}"), &b)?;
            out.push(sse::within(sse::ANSWER_LIMIT, sse::through_api(client, url)).await);
        }
    }
    Ok((direct, out))
}

/// Makes an answer at `api` and waits until asking for it there is a hit; its stream and JSON
/// URLs.
pub async fn hit_urls(
    client: &reqwest::Client,
    api: &str,
    a: &str,
) -> anyhow::Result<(reqwest::Url, String)> {
    let url = sse::stream_url(api, a, "Its Rival")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = sse::within(sse::ANSWER_LIMIT, sse::through_api(client, url.clone())).await;
        if let (Some(true), Some(key)) = (t.cached, &t.key) {
            return Ok((
                url,
                format!("{}/v1/fights/{key}", api.trim_end_matches('/')),
            ));
        }
        if Instant::now() > deadline {
            bail!("{api} never served {a} as a hit: {:?}", t.error);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(clap::Args)]
pub struct FailoverArgs {
    /// The edges' APIs; misses go to each in turn.
    #[arg(long = "edge-api", required = true)]
    pub edge_apis: Vec<String>,
    /// An API beside the hub, to read the stored answers back.
    #[arg(long)]
    pub hub_api: String,
    #[arg(long)]
    pub sim: String,
    /// The hub's servers, as `NATS_URL` takes them, logged in as `versus-admin`.
    #[arg(long)]
    pub nats_url: String,
    #[arg(long)]
    pub nats_password: String,
    /// `hub1=PID` for each hub server: the one that leads the jobs stream is killed.
    #[arg(long = "node", required = true)]
    pub nodes: Vec<String>,
    #[arg(long)]
    pub out: PathBuf,
    /// Misses in flight when the leader is killed, and as many again right after.
    #[arg(long, default_value_t = 100)]
    pub n: usize,
}

#[derive(Serialize, Deserialize)]
pub struct FailoverRaw {
    pub n: usize,
    pub killed: String,
    /// From the kill until another server leads the jobs stream.
    pub election_ms: Option<f64>,
    /// From the kill until the first miss asked after it streamed its first token.
    pub first_token_after_kill_ms: Option<f64>,
    pub completed: usize,
    /// Streams that ended without `done`: their jobs were lost or never acknowledged.
    pub incomplete: Vec<String>,
    /// Stored answers that differ from what their client was streamed.
    pub mismatched: usize,
    pub first_token_before: Summary,
    pub first_token_after: Summary,
    /// The longest a client waited for an event, over every stream.
    #[serde(default)]
    pub longest_wait_ms: Option<f64>,
    /// Streams that got `reset` (a generation started again).
    #[serde(default)]
    pub reset: usize,
    /// Upstream calls beyond one per key asked: keys paid for twice.
    #[serde(default)]
    pub paid_twice: Option<u64>,
    /// The streams whose leadership moved to the killed server before the kill.
    #[serde(default)]
    pub moved: Vec<String>,
}

pub async fn run_failover(args: FailoverArgs) -> anyhow::Result<()> {
    let sim = Sim::new(&args.sim)?;
    // Every answer takes a few seconds: the first wave is streaming when the leader dies.
    sim.reset_with(200, 20).await?;
    let client = sse::client()?;
    let nats = crate::nats_as_admin(&args.nats_url, &args.nats_password).await?;
    let run = crate::run_id();
    let miss = |i: usize| {
        let api = &args.edge_apis[i % args.edge_apis.len()];
        let url = sse::stream_url(api, &format!("Failover {run} {i}"), "The Leader");
        let client = client.clone();
        tokio::spawn(async move {
            match url {
                Ok(url) => {
                    sse::within(Duration::from_secs(120), sse::through_api(&client, url)).await
                }
                Err(e) => Timeline {
                    error: Some(e.to_string()),
                    ..Timeline::default()
                },
            }
        })
    };
    let calls = sim.chat_calls().await?;
    let mut streams: Vec<_> = (0..args.n).map(miss).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while sim.chat_calls().await? < calls + args.n as u64 {
        if Instant::now() > deadline {
            bail!("the first wave did not reach the simulator within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = jobs_leader(&nats)
        .await
        .context("the jobs stream has no leader")?;
    // The same server leads the events stream and the answers bucket, when they can move
    // there: its death then interrupts the workers' event publishes and KV writes too.
    let mut moved = Vec::new();
    for stream in [
        versus_shared::wire::EVENTS_STREAM.to_owned(),
        format!("KV_{}", versus_shared::wire::ANSWERS_BUCKET),
    ] {
        if move_leader(&nats, &stream, &leader).await {
            moved.push(stream);
        }
    }
    let pid = args
        .nodes
        .iter()
        .find_map(|n| n.strip_prefix(&format!("{leader}=")))
        .with_context(|| format!("no --node {leader}=PID"))?;
    eprintln!("killing {leader} (pid {pid}), the leader of the jobs stream");
    let status = std::process::Command::new("kill")
        .args(["-9", pid])
        .status()?;
    anyhow::ensure!(status.success(), "kill -9 {pid} failed");
    let killed = Instant::now();
    streams.extend((args.n..2 * args.n).map(miss));
    let mut election_ms = None;
    while killed.elapsed() < Duration::from_secs(30) {
        if jobs_leader(&nats).await.is_some_and(|l| l != leader) {
            election_ms = Some(killed.elapsed().as_secs_f64() * 1e3);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let timelines: Vec<Timeline> = join_all(streams)
        .await
        .into_iter()
        .map(|t| {
            t.unwrap_or_else(|e| Timeline {
                error: Some(e.to_string()),
                ..Timeline::default()
            })
        })
        .collect();
    let (before, after) = timelines.split_at(args.n);
    let keys = timelines
        .iter()
        .filter_map(|t| t.key.as_deref())
        .collect::<std::collections::HashSet<_>>()
        .len();
    let first_token_after_kill_ms = after
        .iter()
        .filter_map(|t| t.first_token_at)
        .min()
        .map(|at| at.saturating_duration_since(killed).as_secs_f64() * 1e3);
    let mut mismatched = 0;
    for t in timelines.iter().filter(|t| t.complete()) {
        let Some(key) = &t.key else { continue };
        let stored: serde_json::Value = client
            .get(format!(
                "{}/v1/fights/{key}",
                args.hub_api.trim_end_matches('/')
            ))
            .send()
            .await?
            .json()
            .await
            .unwrap_or_default();
        if sse::hash(stored["text"].as_str().unwrap_or_default()) != t.text_hash {
            mismatched += 1;
        }
    }
    let first = |ts: &[Timeline]| summary(ts, |t| t.first_token);
    let raw = FailoverRaw {
        n: args.n,
        killed: leader,
        election_ms,
        first_token_after_kill_ms,
        completed: timelines.iter().filter(|t| t.complete()).count(),
        incomplete: crate::stats::count_distinct(
            timelines
                .iter()
                .filter(|t| !t.complete())
                .map(|t| t.error.clone().unwrap_or_else(|| "no done".to_owned())),
        ),
        mismatched,
        first_token_before: first(before),
        first_token_after: first(after),
        longest_wait_ms: timelines
            .iter()
            .map(|t| t.longest_wait.as_secs_f64() * 1e3)
            .reduce(f64::max),
        reset: timelines.iter().filter(|t| t.reset).count(),
        paid_twice: sim
            .chat_calls()
            .await
            .ok()
            .map(|now| (now - calls).saturating_sub(keys as u64)),
        moved,
    };
    crate::write_json(&args.out, &raw)
}

/// The server that leads `stream`, if any answers.
async fn leader_of(nats: &async_nats::Client, stream: &str) -> Option<String> {
    let subject = format!("$JS.API.STREAM.INFO.{stream}");
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        nats.request(subject, Default::default()),
    )
    .await
    .ok()?
    .ok()?;
    let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
    info.pointer("/cluster/leader")?.as_str().map(str::to_owned)
}

/// Asks the leader of `stream` to step down in favour of `to`, until `to` leads it (up to
/// 10 s); false if it did not move.
async fn move_leader(nats: &async_nats::Client, stream: &str, to: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match leader_of(nats, stream).await {
            Some(leader) if leader == to => return true,
            Some(_) => {
                let request = serde_json::json!({"placement": {"preferred": to}});
                let _ = tokio::time::timeout(
                    Duration::from_secs(3),
                    nats.request(
                        format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                        request.to_string().into(),
                    ),
                )
                .await;
            }
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// The server that leads the jobs stream, if any answers.
async fn jobs_leader(nats: &async_nats::Client) -> Option<String> {
    leader_of(nats, versus_shared::wire::JOBS_STREAM).await
}

pub fn sections(dir: &Path) -> anyhow::Result<Vec<Section>> {
    let mut sections = Vec::new();
    match crate::report::load::<Raw>(dir, FILE)? {
        None => {
            sections.push(Section::skipped("P7", "Hits at an edge", "not in this run"));
            sections.push(Section::skipped(
                "P8",
                "A miss through an edge",
                "not in this run",
            ));
        }
        Some(raw) => {
            sections.push(hits_section(&raw));
            sections.push(miss_section(&raw));
        }
    }
    sections.push(
        match crate::report::load::<FailoverRaw>(dir, FAILOVER_FILE)? {
            None => Section::skipped("P9", "A hub server killed under load", "not in this run"),
            Some(raw) => failover_section(&raw),
        },
    );
    Ok(sections)
}

fn hits_section(raw: &Raw) -> Section {
    let l = raw.load;
    let row = |name: &str, edge: &WrkResult, single: &WrkResult| {
        let ratio = edge.requests_per_sec / single.requests_per_sec;
        Row {
            what: format!(
                "{name} at an edge (wrk -t{} -c{})",
                l.threads, l.connections
            ),
            measured: format!(
                "{} req/s, p99 {} ms",
                fmt_count(edge.requests_per_sec),
                fmt_ms(edge.p99_ms)
            ),
            baseline: format!(
                "single node: {} req/s, p99 {} ms",
                fmt_count(single.requests_per_sec),
                fmt_ms(single.p99_ms)
            ),
            ratio: format!("{ratio:.2}×"),
            goal: "≥ 0.9× single node".to_owned(),
            met: Some(ratio >= 0.9 && edge.errors == 0),
        }
    };
    Section {
        id: "P7",
        title: "Hits at an edge",
        method: format!(
            "The cluster of `scripts/cluster` (three hub servers, two leaf edges with an API \
             each, two workers) runs beside the single-node system of this run, on the same \
             machine. One answer is made at an edge and one at the single node; once each is \
             a hit, `wrk -t{} -c{} -d{}s` asks for it over and over, at the edge's API and at \
             the single node's. An edge's hit reads its mirror of the answers bucket once, \
             then its memory, with no hub round trip.",
            l.threads, l.connections, l.secs
        ),
        rows: vec![
            row("hit of `/v1/fights/stream`", &raw.edge_sse, &raw.single_sse),
            row("`GET /v1/fights/{key}`", &raw.edge_json, &raw.single_json),
        ],
        notes: Vec::new(),
        skipped: None,
        appendix: String::new(),
    }
}

fn miss_section(raw: &Raw) -> Section {
    let added = |s: &Summary| {
        format!(
            "{} / {} ms",
            fmt_ms(s.p50_ms - raw.direct_first.p50_ms),
            fmt_ms(s.p99_ms - raw.direct_first.p99_ms)
        )
    };
    let mut notes = Vec::new();
    if !raw.errors.is_empty() {
        notes.push(format!("Errors: {}.", raw.errors.join("; ")));
    }
    Section {
        id: "P8",
        title: "A miss through an edge",
        method: format!(
            "{} unique misses, one at a time, each in turn straight to the simulator (time \
             to first token {} ms), through the API beside the hub, and through an edge's API \
             (the job crosses the leaf link to the hub's jobs stream, the events come back \
             across it). Added time is each side's time to first token minus the \
             simulator's, at p50 and p99. The hub's servers sync every write to disk \
             (`sync_interval: always`) and keep three replicas.",
            raw.n, raw.ttft_ms
        ),
        rows: vec![
            Row {
                what: "added to the first token, p50 / p99: through an edge".to_owned(),
                measured: added(&raw.edge_first),
                baseline: format!("at the hub: {}", added(&raw.hub_first)),
                ratio: String::new(),
                goal: "edge ≤ hub + 2 ms (p50)".to_owned(),
                met: Some(raw.edge_first.p50_ms <= raw.hub_first.p50_ms + 2.0),
            },
            Row::info(
                "first token p50 / p99: simulator, hub, edge",
                format!(
                    "{} / {} ms, {} / {} ms, {} / {} ms",
                    fmt_ms(raw.direct_first.p50_ms),
                    fmt_ms(raw.direct_first.p99_ms),
                    fmt_ms(raw.hub_first.p50_ms),
                    fmt_ms(raw.hub_first.p99_ms),
                    fmt_ms(raw.edge_first.p50_ms),
                    fmt_ms(raw.edge_first.p99_ms)
                ),
            ),
        ],
        notes,
        skipped: None,
        appendix: String::new(),
    }
}

fn failover_section(raw: &FailoverRaw) -> Section {
    let total = 2 * raw.n;
    let lost = total - raw.completed;
    let ms = |v: Option<f64>| v.map_or("never".to_owned(), |v| format!("{} ms", fmt_ms(v)));
    let mut notes = Vec::new();
    if !raw.incomplete.is_empty() {
        notes.push(format!(
            "Incomplete streams: {}.",
            raw.incomplete.join("; ")
        ));
    }
    Section {
        id: "P9",
        title: "A hub server killed under load",
        method: format!(
            "On the cluster of P7, {n} unique misses are asked at the two edges in turn; once \
             the simulator (200 ms to the first token, then 20 tokens a second) has all of \
             them, the server that leads the jobs stream ({killed} this run; moved there \
             first: {moved}) is SIGKILLed and {n} more misses are asked at once, during the \
             election. Every stream is read to its end; every finished answer is read back \
             from the hub's API. A client's wait is the longest time between two events of \
             its stream; keys paid twice are the simulator's chat calls beyond one per key.",
            n = raw.n,
            killed = raw.killed,
            moved = if raw.moved.is_empty() {
                "nothing".to_owned()
            } else {
                raw.moved.join(", ")
            }
        ),
        rows: vec![
            Row {
                what: "acknowledged jobs lost (streams that never ended with `done`)".to_owned(),
                measured: format!("{lost} of {total}"),
                baseline: String::new(),
                ratio: String::new(),
                goal: "0".to_owned(),
                met: Some(lost == 0 && raw.mismatched == 0),
            },
            Row::info(
                "from the kill to a new leader of the jobs stream",
                ms(raw.election_ms),
            ),
            Row::info(
                "from the kill to the first token of a miss asked after it",
                ms(raw.first_token_after_kill_ms),
            ),
            Row::info(
                "first token p50 / p99: misses before the kill, misses after it",
                format!(
                    "{} / {} ms, {} / {} ms",
                    fmt_ms(raw.first_token_before.p50_ms),
                    fmt_ms(raw.first_token_before.p99_ms),
                    fmt_ms(raw.first_token_after.p50_ms),
                    fmt_ms(raw.first_token_after.p99_ms)
                ),
            ),
            Row::info(
                "stored answers that differ from what their client was streamed",
                raw.mismatched.to_string(),
            ),
            Row::info(
                "the clients' longest wait for an event; streams reset",
                format!("{}; {} of {total}", ms(raw.longest_wait_ms), raw.reset),
            ),
            Row::info(
                "keys paid for twice (upstream calls beyond one per key)",
                raw.paid_twice
                    .map_or("not measured".to_owned(), |n| format!("{n} of {total}")),
            ),
        ],
        notes,
        skipped: None,
        appendix: String::new(),
    }
}
