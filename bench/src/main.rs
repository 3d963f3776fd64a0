//! `versus-bench`: the measuring half of `scripts/bench`.
//!
//! The script starts and stops the processes (NATS, Postgres, the simulator, workers, the
//! API); each subcommand here measures one scenario against what is running and writes its
//! raw figures as JSON; `report` turns a folder of them into the results section of
//! `BENCHMARKS.md`. Modules:
//!
//! - [`bare`]: the baseline server, a bare axum handler returning fixed bytes;
//! - [`wrk`]: running Debian's `wrk` and reading its output;
//! - [`load`]: a fixed-rate, open-loop HTTP/1.1 load generator with HDR histograms;
//! - [`sse`]: timed SSE clients, of the API and straight of the simulator; [`many`]: tens of
//!   thousands of SSE streams from one process;
//! - [`sim`]: the simulator's control routes; [`procs`]: RSS and CPU time from `/proc`;
//!   [`profile`]: `perf record` of running processes; [`proxy`]: a TCP proxy that delays
//!   every byte (`delay-proxy`, P11's distance);
//! - [`stats`]: percentiles; [`report`]: sections, tables, the machine, `BENCHMARKS.md`;
//! - one module per scenario: [`hits`] (P1), [`miss`] (P2, P3), [`coalesce`] (P4),
//!   [`capacity`] (P5), [`prewarm`] (P6), [`memory`] (M1), [`streams`] (M2), [`refuse`] (R1), [`suggest`] (S1),
//!   [`edge`] (P7 to P9, on the cluster of `scripts/cluster`), [`far`] (P11, the same with
//!   the hub far away), [`viral`] (P10), [`fallback`] (P12).

// The load generators join every task they spawn; the ban on a bare spawn is for the services.
#![allow(clippy::disallowed_methods)]

mod bare;
mod capacity;
mod coalesce;
mod edge;
mod fallback;
mod far;
mod hits;
mod hops;
mod load;
mod many;
mod memory;
mod miss;
mod prewarm;
mod procs;
mod profile;
mod proxy;
mod refuse;
mod report;
mod sim;
mod sse;
mod stats;
mod streams;
mod suggest;
mod viral;
mod wrk;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "versus-bench",
    about = "Versus benchmarks (run them with scripts/bench)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves fixed bytes from a bare axum handler: the ceiling P1 compares against.
    Bare(bare::Args),
    /// P1: cache hits under wrk and at a fixed rate, beside the bare handler.
    Hits(hits::Args),
    /// P2 and P3: unique misses through the system beside the same calls to the simulator,
    /// then hits of the same matchups.
    Miss(miss::Args),
    /// P4: identical concurrent misses.
    Coalesce(coalesce::Args),
    /// P5: unique answers per second with an instant simulator.
    Capacity(capacity::Args),
    /// P6: a pre-warm batch against a simulator with a fixed latency.
    Prewarm(prewarm::Args),
    /// M1: the API's memory with many idle open streams.
    Streams(memory::StreamsArgs),
    /// M1: a worker's memory with its full concurrency in flight.
    WorkerRss(memory::WorkerArgs),
    /// M2: thousands of streams held open at one replica, and a hit's latency meanwhile.
    OpenStreams(streams::Args),
    /// R1: how fast a miss over a client's limit, the daily budget or a client's daily quota
    /// is refused.
    Refuse(refuse::Args),
    /// S1: suggestions as you type, with 100,000 known names.
    Suggest(suggest::Args),
    /// P7 and P8: hits and misses at an edge of the cluster, beside the single node and the
    /// hub.
    Edge(edge::Args),
    /// P9: the jobs stream's leader killed under load.
    Failover(edge::FailoverArgs),
    /// P11: hits, misses and purges at an edge whose hub is far away (behind delay proxies),
    /// beside the same at the hub.
    Far(far::Args),
    /// Forwards TCP with a fixed delay each way (P11's distance between the edges and the
    /// hub); runs until killed.
    DelayProxy(proxy::Args),
    /// P10: thousands of viewers of one generation at one replica, beside a bare broadcast
    /// SSE server writing the same frames to as many sockets.
    Viral(viral::Args),
    /// P12: a miss while the primary provider is down (its circuit open), served by the
    /// fallback, beside a miss on a healthy primary.
    Fallback(fallback::Args),
    /// Sends GETs at a fixed rate and prints the latency percentiles (P1's method, alone).
    Rate(load::Args),
    /// Sets the simulator's pace (after a reset).
    Sim(sim::Args),
    /// Records the sizes a scenario (M2, P10) could not run at here, for the report.
    Skipped(report::SkippedArgs),
    /// Renders the raw results of a folder into BENCHMARKS.md.
    Report(report::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    versus_shared::tls::install();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Bare(args) => bare::run(args).await,
            Command::Hits(args) => hits::run(args).await,
            Command::Miss(args) => miss::run(args).await,
            Command::Coalesce(args) => coalesce::run(args).await,
            Command::Capacity(args) => capacity::run(args).await,
            Command::Prewarm(args) => prewarm::run(args).await,
            Command::Streams(args) => memory::run_streams(args).await,
            Command::WorkerRss(args) => memory::run_worker(args).await,
            Command::OpenStreams(args) => streams::run(args).await,
            Command::Refuse(args) => refuse::run(args).await,
            Command::Suggest(args) => suggest::run(args).await,
            Command::Edge(args) => edge::run(args).await,
            Command::Failover(args) => edge::run_failover(args).await,
            Command::Far(args) => far::run(args).await,
            Command::DelayProxy(args) => proxy::run(args).await,
            Command::Viral(args) => viral::run(args).await,
            Command::Fallback(args) => fallback::run(args).await,
            Command::Rate(args) => load::run_cli(args).await,
            Command::Sim(args) => sim::run(args).await,
            Command::Skipped(args) => report::record_skipped(args),
            Command::Report(args) => report::run(args),
        }
    })
}

/// Writes `value` as pretty JSON to `path` and says so on stderr.
pub fn write_json(path: &PathBuf, value: &impl serde::Serialize) -> anyhow::Result<()> {
    use anyhow::Context;
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// NATS (`NATS_URL`'s form: URLs separated by commas), logged in as `versus-admin`.
pub async fn nats_as_admin(urls: &str, password: &str) -> anyhow::Result<async_nats::Client> {
    use anyhow::Context;
    async_nats::ConnectOptions::with_user_and_password(
        "versus-admin".to_owned(),
        password.to_owned(),
    )
    .connect(urls.split(',').map(str::trim).collect::<Vec<_>>())
    .await
    .context("connecting to NATS as versus-admin")
}

/// A short id that makes this run's matchup names new to every cache.
pub fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}
