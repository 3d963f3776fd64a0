//! P4: identical concurrent misses. `n` clients ask for one new matchup at once; the
//! simulator counts the upstream calls; every client must get the whole answer, and their
//! first tokens must arrive close together. Beside it, the same `n` requests straight to the
//! simulator: what a gateway that does not coalesce would send upstream.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde::{Deserialize, Serialize};

use crate::report::{Row, Section};
use crate::sim::Sim;
use crate::sse::{self, Timeline};
use crate::stats::{Summary, fmt_count, fmt_ms};

const FILE: &str = "coalesce.json";

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub api: String,
    #[arg(long)]
    pub sim: String,
    #[arg(long)]
    pub out_dir: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    #[arg(long, default_value_t = 400)]
    pub ttft_ms: u64,
    #[arg(long, default_value_t = 60)]
    pub tokens_per_sec: u64,
}

#[derive(Serialize, Deserialize)]
pub struct Raw {
    pub n: usize,
    pub ttft_ms: u64,
    pub tokens_per_sec: u64,
    pub system: Side,
    pub direct: Side,
}

#[derive(Serialize, Deserialize)]
pub struct Side {
    pub upstream_calls: u64,
    pub complete: usize,
    /// Distinct answer texts among the complete streams (1 when all agree).
    pub distinct_texts: usize,
    /// Last client's first token minus the first client's.
    pub spread_ms: f64,
    /// Each client's first token after the earliest one.
    pub behind_first: Summary,
    pub first_token: Summary,
    pub errors: Vec<String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let sim = Sim::new(&args.sim)?;
    let client = sse::client()?;
    let api = args.api.trim_end_matches('/').to_owned();

    // Open the connections first: the figure is about fan-out, not about 1,000 handshakes.
    preconnect(&client, &format!("{api}/healthz"), args.n).await;
    sim.reset_with(args.ttft_ms, args.tokens_per_sec).await?;
    let url = sse::stream_url(&api, &format!("Crowd {}", crate::run_id()), "The Horde")?;
    let system = join_all((0..args.n).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(sse::within(sse::ANSWER_LIMIT, async move {
            sse::through_api(&client, url).await
        }))
    }))
    .await;
    let system = side(system, sim.chat_calls().await?);

    let base = sim.openai_base();
    preconnect(&client, &format!("{base}/models"), args.n).await;
    sim.reset_with(args.ttft_ms, args.tokens_per_sec).await?;
    let direct = join_all((0..args.n).map(|_| {
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(sse::within(sse::ANSWER_LIMIT, async move {
            sse::straight_to_sim(&client, &base, "Crowd", "Horde").await
        }))
    }))
    .await;
    let direct = side(direct, sim.chat_calls().await?);

    eprintln!(
        "coalescing: {} upstream calls, {}/{} complete, spread {:.2} ms",
        system.upstream_calls, system.complete, args.n, system.spread_ms
    );
    let raw = Raw {
        n: args.n,
        ttft_ms: args.ttft_ms,
        tokens_per_sec: args.tokens_per_sec,
        system,
        direct,
    };
    crate::write_json(&args.out_dir.join(FILE), &raw)
}

/// `n` concurrent GETs, so that the client's pool holds `n` open connections to the host.
pub async fn preconnect(client: &reqwest::Client, url: &str, n: usize) {
    join_all((0..n).map(|_| async {
        if let Ok(response) = client.get(url).send().await {
            let _ = response.bytes().await;
        }
    }))
    .await;
}

fn side(results: Vec<Result<Timeline, tokio::task::JoinError>>, upstream_calls: u64) -> Side {
    let timelines: Vec<Timeline> = results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|e| Timeline {
                error: Some(e.to_string()),
                ..Timeline::default()
            })
        })
        .collect();
    let complete: Vec<&Timeline> = timelines.iter().filter(|t| t.complete()).collect();
    let mut hashes: Vec<(u64, usize)> = complete
        .iter()
        .map(|t| (t.text_hash, t.text_bytes))
        .collect();
    hashes.sort_unstable();
    hashes.dedup();
    let firsts: Vec<Instant> = complete.iter().filter_map(|t| t.first_token_at).collect();
    let earliest = firsts.iter().min().copied();
    let behind: Vec<Duration> = earliest.map_or_else(Vec::new, |e| {
        firsts.iter().map(|t| t.duration_since(e)).collect()
    });
    let first_token: Vec<Duration> = complete.iter().filter_map(|t| t.first_token).collect();
    let behind_first = Summary::of(&behind);
    Side {
        upstream_calls,
        complete: complete.len(),
        distinct_texts: hashes.len(),
        spread_ms: behind_first.max_ms,
        behind_first,
        first_token: Summary::of(&first_token),
        errors: crate::miss::errors(&timelines, |_| None),
    }
}

pub fn sections(dir: &Path) -> anyhow::Result<Vec<Section>> {
    let Some(raw) = crate::report::load::<Raw>(dir, FILE)? else {
        return Ok(vec![Section::skipped(
            "P4",
            "Coalescing",
            "not in this run",
        )]);
    };
    let (s, d, n) = (&raw.system, &raw.direct, raw.n);
    let rows = vec![
        Row {
            what: format!(
                "upstream calls for {} identical concurrent misses",
                fmt_count(n as f64)
            ),
            measured: s.upstream_calls.to_string(),
            baseline: format!("straight to the simulator: {}", d.upstream_calls),
            ratio: format!(
                "1/{}",
                fmt_count(d.upstream_calls as f64 / s.upstream_calls.max(1) as f64)
            ),
            goal: "1".to_owned(),
            met: Some(s.upstream_calls == 1),
        },
        Row {
            what: "streams complete, all with the same text".to_owned(),
            measured: format!("{}/{n} ({} distinct texts)", s.complete, s.distinct_texts),
            baseline: format!("{}/{n}", d.complete),
            ratio: String::new(),
            goal: "all".to_owned(),
            met: Some(s.complete == n && s.distinct_texts == 1),
        },
        Row {
            what: "first token: last client behind the first".to_owned(),
            measured: format!(
                "{} ms (p50 {}, p99 {})",
                fmt_ms(s.spread_ms),
                fmt_ms(s.behind_first.p50_ms),
                fmt_ms(s.behind_first.p99_ms)
            ),
            baseline: format!(
                "simulator serving {n} streams itself: {} ms",
                fmt_ms(d.spread_ms)
            ),
            ratio: String::new(),
            goal: "≤ 20 ms".to_owned(),
            met: Some(s.spread_ms <= 20.0),
        },
        Row::info(
            "time to first token, p50 / p99",
            format!(
                "{} / {} ms (simulator alone: {} / {} ms)",
                fmt_ms(s.first_token.p50_ms),
                fmt_ms(s.first_token.p99_ms),
                fmt_ms(d.first_token.p50_ms),
                fmt_ms(d.first_token.p99_ms)
            ),
        ),
    ];
    let notes = s
        .errors
        .iter()
        .map(|e| format!("Through the API: {e}"))
        .chain(
            d.errors
                .iter()
                .map(|e| format!("Straight to the simulator: {e}")),
        )
        .collect();
    Ok(vec![Section {
        id: "P4",
        title: "Coalescing",
        method: format!(
            "{n} clients open `/v1/fights/stream` for one new matchup at the same moment, on \
             connections opened beforehand; the simulator ({} ms to the first token, {} \
             tokens/s) counts chat calls. Spread: the arrival of the first `chunk` at the \
             last client minus at the first, as seen by the one load-generating process. \
             Baseline: the same {n} requests sent straight to the simulator, as a gateway \
             without coalescing would.",
            raw.ttft_ms, raw.tokens_per_sec
        ),
        rows,
        notes,
        skipped: None,
        appendix: String::new(),
    }])
}
