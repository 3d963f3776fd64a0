//! P11, a hub far away: the cluster of `scripts/cluster` with a delay proxy
//! (`versus-bench delay-proxy`) on each edge's leaf link, so that every message between an
//! edge and the hub takes the delay each way, beside an API at the hub (no delay) in the
//! same run:
//!
//! - a hit at the edge (from its memory) beside the same hit at the hub, at a fixed rate;
//! - a miss's added time to first token at the edge beside the hub's (P8's method), and
//!   where it goes (before the upstream call, after it);
//! - a purge asked at the hub: how long until the edge, and the hub's API, stop serving it;
//! - the leaf link's round trip as NATS sees it, to show the proxies are in the way.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::edge::{hit_urls, misses_in_turn};
use crate::load::{self, RateResult};
use crate::miss::summary;
use crate::report::{Row, Section};
use crate::sim::Sim;
use crate::sse::{self, Timeline};
use crate::stats::{Summary, fmt_count, fmt_ms};

const FILE: &str = "far.json";

/// How often the edge and the hub are asked whether a purged answer is still served.
const POLL_EVERY: Duration = Duration::from_millis(5);

#[derive(clap::Args)]
pub struct Args {
    /// An API beside the hub (every baseline).
    #[arg(long)]
    pub hub_api: String,
    /// An edge's API, whose leaf link goes through the delay proxies.
    #[arg(long)]
    pub edge_api: String,
    #[arg(long)]
    pub sim: String,
    #[arg(long)]
    pub out_dir: PathBuf,
    /// The proxies' delay each way, in milliseconds (a round trip is twice it).
    #[arg(long)]
    pub delay_ms: u64,
    /// Hits per second at each side.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of each fixed-rate run (after a second of warm-up).
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Misses, one at a time, on each side.
    #[arg(long, default_value_t = 40)]
    pub n: usize,
    /// The simulator's time to first token for the misses.
    #[arg(long, default_value_t = 100)]
    pub ttft_ms: u64,
    /// Purges, one at a time.
    #[arg(long, default_value_t = 10)]
    pub purges: usize,
    /// The edge's nats-server (`nats://host:port`), to time the leaf link's round trip
    /// (`$JS.hub.API.INFO`, answered by the hub) as `versus-admin`.
    #[arg(long)]
    pub edge_nats_url: Option<String>,
    #[arg(long)]
    pub nats_password: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub struct Raw {
    pub delay_ms: u64,
    pub hub_hit: RateResult,
    pub edge_hit: RateResult,
    pub connections: usize,
    pub secs: u64,
    pub n: usize,
    pub ttft_ms: u64,
    pub direct_first: Summary,
    pub hub_first: Summary,
    pub edge_first: Summary,
    /// From sending a miss to its chat call reaching the simulator (what crosses the link
    /// before the job does), and from there to the first token: at the hub, at the edge.
    #[serde(default)]
    pub hub_to_upstream: Option<(Summary, Summary)>,
    #[serde(default)]
    pub edge_to_upstream: Option<(Summary, Summary)>,
    pub purges: usize,
    /// From sending the purge to the first answer without the purged answer.
    pub hub_purge: Summary,
    pub edge_purge: Summary,
    /// The purge request itself (`DELETE`, answered 204 once a worker purged and the API told
    /// the others).
    pub purge_call: Summary,
    /// The leaf link's round trip as a NATS request from the edge's server to the hub.
    pub link_rtt: Option<Summary>,
    pub errors: Vec<String>,
}

impl Raw {
    fn rtt_ms(&self) -> f64 {
        2.0 * self.delay_ms as f64
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let token = std::env::var("VERSUS_ADMIN_TOKEN")
        .context("VERSUS_ADMIN_TOKEN (the APIs' admin token) is needed to purge")?;
    let sim = Sim::new(&args.sim)?;
    let client = sse::client()?;
    let run = crate::run_id();
    let mut errors = Vec::new();

    let link_rtt = match (&args.edge_nats_url, &args.nats_password) {
        (Some(url), Some(password)) => match link_round_trips(url, password, 20).await {
            Ok(rtt) => {
                eprintln!(
                    "the leaf link's round trip: p50 {} ms, max {} ms",
                    fmt_ms(rtt.p50_ms),
                    fmt_ms(rtt.max_ms)
                );
                Some(rtt)
            }
            Err(e) => {
                errors.push(format!("timing the leaf link: {e:#}"));
                None
            }
        },
        _ => None,
    };

    // Hits: one answer, made through the edge, a hit at both; then each at a fixed rate.
    sim.reset_with(0, 0).await?;
    let a = format!("Far {run}");
    let (_, edge_json) = hit_urls(&client, &args.edge_api, &a).await?;
    let (_, hub_json) = hit_urls(&client, &args.hub_api, &a).await?;
    let connections = 32;
    let secs = Duration::from_secs(args.secs);
    let hub_hit = load::run(&hub_json, args.rate, secs, connections).await?;
    let edge_hit = load::run(&edge_json, args.rate, secs, connections).await?;

    // Misses: P8's, one at a time.
    sim.reset_with(args.ttft_ms, 400).await?;
    let anchor = (Instant::now(), SystemTime::now());
    let (direct, sides) = misses_in_turn(
        &client,
        &sim,
        &format!("Far miss {run}"),
        &[("hub", &args.hub_api), ("edge", &args.edge_api)],
        args.n,
    )
    .await?;
    let [hub, at_edge] = <[Vec<Timeline>; 2]>::try_from(sides).expect("two sides");
    for t in direct.iter().chain(&hub).chain(&at_edge) {
        if let Some(e) = &t.error {
            errors.push(e.clone());
        }
    }
    let arrivals = sim.chat_arrivals().await.unwrap_or_default();
    let split = |ts: &[Timeline]| upstream_split(ts, &arrivals, anchor);
    let (hub_to_upstream, edge_to_upstream) = (split(&hub), split(&at_edge));

    // Purges, one at a time, each of an answer both sides serve from memory.
    sim.reset_with(0, 0).await?;
    let (mut hub_purge, mut edge_purge, mut purge_call) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.purges {
        match purge_once(&client, &args, &token, &format!("Far purge {run} {i}")).await {
            Ok(p) => {
                eprintln!(
                    "purge {i}: the hub's API {} ms, the edge {} ms (the call {} ms)",
                    fmt_ms(ms(p.hub)),
                    fmt_ms(ms(p.edge)),
                    fmt_ms(ms(p.call))
                );
                hub_purge.push(p.hub);
                edge_purge.push(p.edge);
                purge_call.push(p.call);
            }
            Err(e) => errors.push(format!("purge: {e:#}")),
        }
    }

    let first = |ts: &[Timeline]| summary(ts, |t| t.first_token);
    let raw = Raw {
        delay_ms: args.delay_ms,
        hub_hit,
        edge_hit,
        connections,
        secs: args.secs,
        n: args.n,
        ttft_ms: args.ttft_ms,
        direct_first: first(&direct),
        hub_first: first(&hub),
        edge_first: first(&at_edge),
        hub_to_upstream,
        edge_to_upstream,
        purges: args.purges,
        hub_purge: Summary::of(&hub_purge),
        edge_purge: Summary::of(&edge_purge),
        purge_call: Summary::of(&purge_call),
        link_rtt,
        errors: crate::stats::count_distinct(errors),
    };
    crate::write_json(&args.out_dir.join(FILE), &raw)
}

/// Each complete miss of `ts` split where its chat call reached the simulator (`arrivals`, Unix
/// microseconds; the first within the miss's time to first token): the time before, the time
/// after until the first token. `anchor` is one instant and the wall-clock time then, to place
/// the requests' starts on the simulator's clock (the same machine's). None if some miss has no
/// call within it.
fn upstream_split(
    ts: &[Timeline],
    arrivals: &[u64],
    anchor: (Instant, SystemTime),
) -> Option<(Summary, Summary)> {
    let anchor_us = anchor
        .1
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_micros() as u64;
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for t in ts.iter().filter(|t| t.complete()) {
        let (first, at) = (t.first_token?, t.first_token_at?);
        let start = at.checked_sub(first)?.checked_duration_since(anchor.0)?;
        let start_us = anchor_us + start.as_micros() as u64;
        let end_us = start_us + first.as_micros() as u64;
        let arrived = arrivals.iter().find(|&&a| a >= start_us && a <= end_us)?;
        let to_call = Duration::from_micros(arrived - start_us);
        before.push(to_call);
        after.push(first.saturating_sub(to_call));
    }
    (!before.is_empty()).then(|| (Summary::of(&before), Summary::of(&after)))
}

/// "+0.042 ms", "-1.20 ms".
fn signed_ms(ms: f64) -> String {
    let sign = if ms >= 0.0 { "+" } else { "" };
    format!("{sign}{} ms", fmt_ms(ms))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `n` requests of `$JS.hub.API.INFO` from the edge's server, one at a time: they cross the
/// leaf link to the hub's JetStream and back. The answers come on an inbox of the API's, the
/// only ones the hub sends an edge (`VERSUS_LEAF_PERMISSIONS` in `nats-hub.conf`).
async fn link_round_trips(url: &str, password: &str, n: usize) -> anyhow::Result<Summary> {
    let nats =
        async_nats::ConnectOptions::with_user_and_password("versus-admin".into(), password.into())
            .custom_inbox_prefix(versus_shared::wire::API_INBOX_PREFIX)
            .connect(url)
            .await
            .context("connecting to the edge's server")?;
    let mut samples = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(5),
            nats.request("$JS.hub.API.INFO", Default::default()),
        )
        .await
        .context("no answer within 5 s")??;
        samples.push(start.elapsed());
    }
    Ok(Summary::of(&samples))
}

/// How long one purge took to show.
struct PurgeTimes {
    hub: Duration,
    edge: Duration,
    call: Duration,
}

/// Makes an answer through the edge, makes sure both sides serve it from memory, purges it at
/// the hub's API, and polls both sides until each answers 404 for it.
async fn purge_once(
    client: &reqwest::Client,
    args: &Args,
    token: &str,
    a: &str,
) -> anyhow::Result<PurgeTimes> {
    let (_, edge_json) = hit_urls(client, &args.edge_api, a).await?;
    let (_, hub_json) = hit_urls(client, &args.hub_api, a).await?;
    for url in [&edge_json, &hub_json] {
        let status = client.get(url.as_str()).send().await?.status();
        anyhow::ensure!(
            status.is_success(),
            "{url} answered {status} before the purge"
        );
    }
    let key = edge_json.rsplit('/').next().context("no key")?;
    let delete = format!(
        "{}/v1/admin/fights/{key}",
        args.hub_api.trim_end_matches('/')
    );
    let start = Instant::now();
    let call = async {
        let response = client.delete(&delete).bearer_auth(token).send().await?;
        let status = response.status();
        if status != reqwest::StatusCode::NO_CONTENT {
            bail!("the purge answered {status}: {}", response.text().await?);
        }
        Ok(start.elapsed())
    };
    let (call, hub, edge) = tokio::join!(
        call,
        gone(client, &hub_json, start),
        gone(client, &edge_json, start)
    );
    Ok(PurgeTimes {
        call: call?,
        hub: hub?,
        edge: edge?,
    })
}

/// Asks for `url` every [`POLL_EVERY`] until it answers 404; the time from `start` to that
/// answer.
async fn gone(client: &reqwest::Client, url: &str, start: Instant) -> anyhow::Result<Duration> {
    let deadline = start + Duration::from_secs(30);
    loop {
        let asked = Instant::now();
        let status = client.get(url).send().await?.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(status.is_success(), "{url} answered {status} while purging");
        if Instant::now() > deadline {
            bail!("{url} still served the answer 30 s after its purge");
        }
        tokio::time::sleep_until((asked + POLL_EVERY).into()).await;
    }
}

pub fn sections(dir: &Path) -> anyhow::Result<Vec<Section>> {
    Ok(vec![match crate::report::load::<Raw>(dir, FILE)? {
        None => Section::skipped("P11", "A hub far away", "not in this run"),
        Some(raw) => section(&raw),
    }])
}

fn section(raw: &Raw) -> Section {
    let rtt = raw.rtt_ms();
    let p50_p99 = |s: &Summary| format!("{} / {} ms", fmt_ms(s.p50_ms), fmt_ms(s.p99_ms));
    let p50_max = |s: &Summary| format!("{} / {} ms", fmt_ms(s.p50_ms), fmt_ms(s.max_ms));
    let added = |s: &Summary| {
        format!(
            "{} / {} ms",
            fmt_ms(s.p50_ms - raw.direct_first.p50_ms),
            fmt_ms(s.p99_ms - raw.direct_first.p99_ms)
        )
    };
    let (hub_hit, edge_hit) = (&raw.hub_hit, &raw.edge_hit);
    let hub_added = raw.hub_first.p50_ms - raw.direct_first.p50_ms;
    let edge_added = raw.edge_first.p50_ms - raw.direct_first.p50_ms;
    let mut rows = vec![
        Row {
            what: format!(
                "a hit at the edge, `GET /v1/fights/{{key}}` at {} req/s, p50 / p99",
                fmt_count(hub_hit.target_rps)
            ),
            measured: p50_p99(&edge_hit.latency),
            baseline: format!("at the hub: {}", p50_p99(&hub_hit.latency)),
            ratio: signed_ms(edge_hit.latency.p50_ms - hub_hit.latency.p50_ms) + " (p50)",
            goal: "edge ≤ hub + 1 ms (p50)".to_owned(),
            met: Some(
                edge_hit.latency.p50_ms <= hub_hit.latency.p50_ms + 1.0
                    && edge_hit.errors == 0
                    && hub_hit.errors == 0,
            ),
        },
        Row {
            what: "a miss's added time to first token at the edge, p50 / p99".to_owned(),
            measured: added(&raw.edge_first),
            baseline: format!("at the hub: {}", added(&raw.hub_first)),
            ratio: format!("{:.2} RTT (p50)", (edge_added - hub_added) / rtt),
            goal: format!("edge ≤ hub + 1.2 RTT ({} ms) (p50)", fmt_ms(1.2 * rtt)),
            met: Some(
                raw.edge_first.count == raw.n as u64
                    && raw.hub_first.count == raw.n as u64
                    && edge_added <= hub_added + 1.2 * rtt,
            ),
        },
        Row {
            what: format!(
                "a purge at the hub: time to reach the far edge, p50 / max of {}",
                raw.purges
            ),
            measured: p50_max(&raw.edge_purge),
            baseline: format!("the hub's API: {}", p50_max(&raw.hub_purge)),
            ratio: format!(
                "{:.2} RTT (p50)",
                (raw.edge_purge.p50_ms - raw.hub_purge.p50_ms) / rtt
            ),
            goal: format!("≤ RTT + 1 s ({} ms), every one", fmt_ms(rtt + 1000.0)),
            met: Some(
                raw.edge_purge.count == raw.purges as u64 && raw.edge_purge.max_ms <= rtt + 1000.0,
            ),
        },
        Row::info(
            "first token p50 / p99: simulator, hub, edge",
            format!(
                "{}, {}, {}",
                p50_p99(&raw.direct_first),
                p50_p99(&raw.hub_first),
                p50_p99(&raw.edge_first)
            ),
        ),
        Row::info(
            "a miss, p50: from the request to the upstream call, then to the first token: \
             at the hub, at the edge",
            match (&raw.hub_to_upstream, &raw.edge_to_upstream) {
                (Some((hub_to, hub_from)), Some((edge_to, edge_from))) => format!(
                    "{} + {} ms, {} + {} ms",
                    fmt_ms(hub_to.p50_ms),
                    fmt_ms(hub_from.p50_ms),
                    fmt_ms(edge_to.p50_ms),
                    fmt_ms(edge_from.p50_ms)
                ),
                _ => "not measured".to_owned(),
            },
        ),
        Row::info(
            "the purge request itself (`DELETE /v1/admin/fights/{key}` → 204), p50 / max",
            p50_max(&raw.purge_call),
        ),
    ];
    if let Some(link) = &raw.link_rtt {
        rows.push(Row::info(
            "the leaf link's round trip (`$JS.hub.API.INFO` from the edge's server), p50 / max",
            p50_max(link),
        ));
    }
    let mut notes = Vec::new();
    if !raw.errors.is_empty() {
        notes.push(format!("Errors: {}.", raw.errors.join("; ")));
    }
    Section {
        id: "P11",
        title: "A hub far away",
        method: format!(
            "The cluster of `scripts/cluster` again, started apart from P7's, with \
             `versus-bench delay-proxy` in front of each hub server's leaf-node port: the edges \
             dial the proxies (`VERSUS_EDGE_LEAF_PORTS`), which hold every byte {d} ms in each \
             direction, so a round trip (RTT) across the leaf link takes {rtt} ms more; the \
             hub, its workers, the simulator, Postgres and an API beside the hub are not \
             delayed. The load generator sits next to each API it asks. The link's round \
             trip is timed first: 20 requests of `$JS.hub.API.INFO` from the edge's \
             nats-server, which the hub answers. Hits: one answer made \
             through the edge, a hit at both APIs, then `GET /v1/fights/{{key}}` at {rate} \
             req/s for {secs} s, open loop on {c} connections, at the hub's API, then at the \
             edge's (from memory: the link is not crossed). Misses: P8's method, {n} unique \
             misses one at a time straight to the simulator ({ttft} ms to the first token), \
             at the hub's API and at the edge's; added is each side's time to first token \
             minus the simulator's, and each miss is split where its chat call reached the \
             simulator (its arrival time, on the same clock). The clients' daily quota is off \
             here (`VERSUS_CLIENT_DAILY_USD=0`, as everywhere in `scripts/bench`): its charge, \
             which an edge makes on the hub's bucket before the job, is not in these figures. \
             Purges: {purges} times, an answer made through the edge \
             and read from memory at both APIs is purged at the hub's API (`DELETE \
             /v1/admin/fights/{{key}}`, a worker purges it, then the API tells every replica \
             on `versus.cache.purge`); both APIs are asked for it every {poll} ms, and the \
             time counts from sending the purge to the first 404. On this 2-core machine \
             everything shares the cores: the hit latencies are the generator's and the API's \
             scheduling (the link plays no part), the misses add the hub's fsyncs and three \
             replicas (as P8) to the link's delay, and a purge's time is mostly the worker's \
             purge (Postgres, the bucket and the events stream, each write synced to disk on \
             two of three servers) before the notice crosses the link.",
            d = raw.delay_ms,
            rate = fmt_count(raw.hub_hit.target_rps),
            secs = raw.secs,
            c = raw.connections,
            n = raw.n,
            ttft = raw.ttft_ms,
            purges = raw.purges,
            poll = POLL_EVERY.as_millis(),
        ),
        rows,
        notes,
        skipped: None,
        appendix: String::new(),
    }
}
