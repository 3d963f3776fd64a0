//! `bench` (scripts/bench): the benchmarks of BENCHMARKS.md against the whole system, started
//! here as `dev` describes it (one nats-server, a Postgres cluster, the simulator, the workers,
//! the API), each port a free one and its data in throwaway folders; `cluster` for the
//! scenarios of the hub and its edges. The measuring is versus-bench's (bench/): this runs its
//! subcommands, one per scenario, and then its report, which rewrites BENCHMARKS.md's results.
//! The scenarios, their sizes and what each needs running are listed in scripts/bench's
//! header.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;
use tokio::time::Instant;

use crate::out::{error, say, section, warn};
use crate::probe::{free_port, free_wildcard_port, http_get, line_starting};
use crate::supervisor::{Signals, Supervisor};
use crate::topology::{
    Binaries, Cluster, Dev, Env, NATS_USERS, Process, Wiring, nats_url, password_of,
};
use crate::{non_empty, pg, secrets};

/// How long a worker, an API or a helper may take to stop when the bench stops it.
const STOP: Duration = Duration::from_secs(5);
/// How long `cluster` may take to stop what it started.
const CLUSTER_STOP: Duration = Duration::from_secs(60);
/// The single node's workers, and the hub's.
const WORKERS: usize = 2;
/// Enough slots that P2's 200 concurrent misses measure the pipeline, not a queue.
const DEFAULT_WORKER_CONCURRENCY: usize = 128;
const MAX_IN_FLIGHT: usize = 256;
const COALESCE_N: usize = 1000;

/// What to run: `--quick`, `--only P1,P4`, `--no-write`.
pub struct Args {
    pub quick: bool,
    pub only: Vec<String>,
    pub write: bool,
}

impl Args {
    pub fn parse(args: &[String]) -> Result<Args> {
        let mut parsed = Args {
            quick: false,
            only: Vec::new(),
            write: true,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let only = match arg.as_str() {
                "--quick" => {
                    parsed.quick = true;
                    continue;
                }
                "--no-write" => {
                    parsed.write = false;
                    continue;
                }
                "--only" => args.next().context("--only needs a list, e.g. P1,P4")?,
                other => match other.strip_prefix("--only=") {
                    Some(list) => list,
                    None => bail!("unknown argument '{other}' (see scripts/bench --help)"),
                },
            };
            parsed.only = only.split(',').map(str::to_owned).collect();
            // A part of the results is printed, not written over the whole.
            parsed.write = false;
        }
        Ok(parsed)
    }

    fn wanted(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

/// The sizes of one mode. The goals name their own sizes (200 misses, 1,000 coalesced, 1,000
/// pre-warmed, 10,000 idle streams); `--quick` shrinks what it can without losing the point.
struct Sizes {
    wrk_secs: u32,
    rate_secs: u32,
    fractions: &'static str,
    miss_rounds: u32,
    miss_one_rounds: u32,
    capacity_secs: u32,
    prewarm_n: usize,
    streams_n: usize,
    refuse_n: usize,
    edge_miss_n: usize,
    failover_n: usize,
    suggest_names: usize,
    fallback_rounds: u32,
    purges: u32,
    m2: &'static [usize],
    viral: &'static [usize],
}

const FULL: Sizes = Sizes {
    wrk_secs: 10,
    rate_secs: 10,
    fractions: "0.5,0.25,0.125",
    miss_rounds: 2,
    miss_one_rounds: 100,
    capacity_secs: 10,
    prewarm_n: 1000,
    streams_n: 10_000,
    refuse_n: 2000,
    edge_miss_n: 40,
    failover_n: 100,
    suggest_names: 100_000,
    fallback_rounds: 50,
    purges: 10,
    m2: &[10_000, 50_000, 100_000],
    viral: &[1000, 10_000, 50_000],
};

const QUICK: Sizes = Sizes {
    wrk_secs: 3,
    rate_secs: 3,
    fractions: "0.5",
    miss_rounds: 1,
    miss_one_rounds: 20,
    capacity_secs: 4,
    prewarm_n: 200,
    streams_n: 2000,
    refuse_n: 500,
    edge_miss_n: 15,
    failover_n: 50,
    suggest_names: 100_000,
    fallback_rounds: 20,
    purges: 3,
    m2: &[1000, 4000],
    viral: &[500, 2000],
};

/// Runs the benchmarks; returns the exit status.
pub async fn run(args: Args, repo: &Path) -> i32 {
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(e) => {
            error(&format!("{e:#}"));
            return 1;
        }
    };
    let out = non_empty("BENCH_OUT_DIR").map_or_else(|| repo.join("target/bench"), PathBuf::from);
    let tmp = match crate::temp_dir("versus-bench") {
        Ok(tmp) => tmp,
        Err(e) => {
            error(&format!("{e:#}"));
            return 1;
        }
    };
    let mut bench = match Bench::new(args, repo, &out, &tmp) {
        Ok(bench) => bench,
        Err(e) => {
            error(&format!("{e:#}"));
            let _ = std::fs::remove_dir_all(&tmp);
            return 1;
        }
    };
    let outcome = tokio::select! {
        result = bench.run() => result.map(|()| 0),
        stop = signals.next() => Ok(stop.status()),
    };
    let status = outcome.unwrap_or_else(|e| {
        error(&format!("{e:#}"));
        1
    });
    bench.sup.stop(&mut signals).await;
    let _ = std::fs::remove_dir_all(&tmp);
    status
}

/// An API the bench started: its name, URL and pid.
#[derive(Clone)]
struct Api {
    name: String,
    url: String,
    pid: i32,
}

/// `cluster` beside the single node, and an API beside its hub.
struct ClusterRun {
    /// Its name, also its supervised process's.
    name: String,
    /// Its data folder (pid files in `run/`).
    data: PathBuf,
    edge_apis: Vec<String>,
    hub_ports: Vec<u16>,
    edge_ports: Vec<u16>,
    hub_api: Api,
    admin_password: String,
}

impl ClusterRun {
    fn pid_of(&self, name: &str) -> Result<String> {
        let file = self.data.join("run").join(format!("{name}.pid"));
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        Ok(text
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned())
    }
}

struct Bench {
    args: Args,
    sizes: Sizes,
    repo: PathBuf,
    out: PathBuf,
    results: PathBuf,
    logs: PathBuf,
    tmp: PathBuf,
    sup: Supervisor,
    bins: Binaries,
    /// versus-bench.
    measure: PathBuf,
    /// The single node, as `dev` describes it, on free ports.
    dev: Dev,
    wiring: Option<Wiring>,
    /// Given to every program and every versus-bench run (which starts a worker in P10).
    env: Env,
    /// The workers' `VERSUS_WORKER_CONCURRENCY`.
    concurrency: String,
    sim: String,
    sim_pid: i32,
    nats_pid: i32,
    pg_pid: String,
    pg_port: u16,
    workers: Vec<String>,
    worker_metrics: Vec<String>,
    worker_seq: usize,
    api: Option<Api>,
    load_at_start: String,
    profile: bool,
}

impl Bench {
    fn new(args: Args, repo: &Path, out: &Path, tmp: &Path) -> Result<Bench> {
        let mut sizes = if args.quick { QUICK } else { FULL };
        let bins = crate::binaries()?;
        let measure = bins.versus("versus-bench");
        if !measure.is_file() {
            bail!("{} is missing (scripts/bench builds it)", measure.display());
        }
        // Tens of thousands of streams need as many descriptors in the API and in the client:
        // the soft limit up to the hard one, for every process started from here.
        let most = raise_open_files()?;
        if most < (sizes.streams_n + 2000) as u64 {
            sizes.streams_n = usize::try_from(most.saturating_sub(2000)).unwrap_or(0);
            warn(&format!(
                "open files are limited to {most}: M1 opens {} streams",
                sizes.streams_n
            ));
        }
        let results = out.join("results");
        let logs = out.join("logs");
        for dir in [&results, &logs] {
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        std::fs::create_dir_all(tmp.join("run"))?;
        std::fs::create_dir_all(tmp.join("objects"))?;
        let mut sup = Supervisor::new("scripts/bench", &logs, &tmp.join("run"));
        // The workers here drain within 2 s; `cluster` takes up to a minute.
        sup.set_drain(CLUSTER_STOP);
        let load_at_start = std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        let dev = Dev {
            http_addr: "127.0.0.1:0".to_owned(),
            workers: WORKERS,
            pg_port: 0,
            nats_port: free_port()?,
            nats_monitor_port: free_port()?,
            sim_addr: "127.0.0.1:0".to_owned(),
        };
        let profile = !args.quick && perf_works(tmp);
        Ok(Bench {
            args,
            sizes,
            repo: repo.to_owned(),
            out: out.to_owned(),
            results,
            logs,
            tmp: tmp.to_owned(),
            sup,
            bins,
            measure,
            dev,
            wiring: None,
            env: Vec::new(),
            concurrency: non_empty("BENCH_WORKER_CONCURRENCY")
                .unwrap_or_else(|| DEFAULT_WORKER_CONCURRENCY.to_string()),
            sim: String::new(),
            sim_pid: 0,
            nats_pid: 0,
            pg_pid: String::new(),
            pg_port: 0,
            workers: Vec::new(),
            worker_metrics: Vec::new(),
            worker_seq: 0,
            api: None,
            load_at_start,
            profile,
        })
    }

    async fn run(&mut self) -> Result<()> {
        section("services");
        self.services().await?;
        self.start_workers(WORKERS, &[]).await?;
        let api = self.start_api("api", &[]).await?;
        self.api = Some(api);
        eprintln!(
            "api {} · sim {} · nats://127.0.0.1:{} · Postgres on 127.0.0.1:{}",
            self.api()?.url,
            self.sim,
            self.dev.nats_port,
            self.pg_port
        );
        self.scenarios().await?;
        self.report().await
    }

    fn api(&self) -> Result<&Api> {
        self.api.as_ref().context("the API runs")
    }

    fn wiring(&self) -> Result<&Wiring> {
        self.wiring.as_ref().context("the services run")
    }

    /// NATS, Postgres, the simulator, and the settings every program gets.
    async fn services(&mut self) -> Result<()> {
        // nats.conf's users, with passwords of this run's own.
        let users: Vec<String> = NATS_USERS.iter().map(|u| (*u).to_owned()).collect();
        let passwords = secrets::nats_passwords(&self.tmp.join("nats-auth.env"), &users)?;
        let mut nats = self.dev.nats(&self.bins, &self.tmp, &passwords);
        if let Some(conf) = non_empty("BENCH_NATS_CONF") {
            set_arg_after(&mut nats, "-c", &conf);
        }
        self.nats_pid = self.sup.start(nats)?;
        self.sup.wait_nats_ready("nats", self.dev.nats_port).await?;

        // A throwaway cluster with Postgres' own durable defaults (fsync on), as in production.
        let pg_dir = if pg::usable(&self.repo.join("target")).await {
            self.out.join("pg")
        } else {
            self.tmp.join("pg")
        };
        let sup = &mut self.sup;
        let started = pg::start_fresh(
            &pg_dir,
            &self.logs,
            &self.bins.versus("versus-worker"),
            |dir| sup.own_postgres(dir),
        )
        .await?;
        self.pg_port = started.port;
        self.pg_pid = std::fs::read_to_string(pg_dir.join("postmaster.pid"))
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();

        let mut sim = self.dev.sim(&self.bins);
        sim.env.push(("RUST_LOG".to_owned(), "warn".to_owned()));
        self.sim_pid = self.sup.start(sim)?;
        self.sim = self.sup.wait_listening("sim", 60).await?;

        let admin_token = format!("bench-{}", secrets::random_hex(32)?);
        let object_store = format!("file://{}", self.tmp.join("objects").display());
        let env = [
            ("OPENAI_BASE_URL", format!("{}/v1", self.sim)),
            ("OPENAI_API_KEY", "bench".to_owned()),
            ("VERSUS_OBJECT_STORE", object_store.clone()),
            ("VERSUS_ADMIN_TOKEN", admin_token.clone()),
            ("VERSUS_WORKER_CONCURRENCY", self.concurrency.clone()),
            ("VERSUS_MAX_IN_FLIGHT", MAX_IN_FLIGHT.to_string()),
            // A worker SIGTERMed with calls held by the simulator should not wait out its
            // grace; and M1 holds calls before their first token for longer than the default
            // idle timeout.
            ("VERSUS_SHUTDOWN_GRACE_SECS", "2".to_owned()),
            ("VERSUS_UPSTREAM_IDLE_TIMEOUT_SECS", "3600".to_owned()),
            // Every load generator here is one client (127.0.0.1) starting thousands of new
            // answers: the per-client limits (new generations, joins, look-ups past memory,
            // open streams and connections, the daily quota) would measure themselves. Hits
            // from memory never count against them, but they hold a thousand connections.
            ("VERSUS_CLIENT_MISSES_PER_MINUTE", "0".to_owned()),
            ("VERSUS_CLIENT_PICTURES_PER_MINUTE", "0".to_owned()),
            ("VERSUS_CLIENT_MAX_STREAMS", "0".to_owned()),
            ("VERSUS_CLIENT_JOINS_PER_MINUTE", "0".to_owned()),
            ("VERSUS_CLIENT_LOOKUPS_PER_SECOND", "0".to_owned()),
            ("VERSUS_CLIENT_MAX_CONNECTIONS", "0".to_owned()),
            // M2 and P10 hold more streams than the default cap of connections (10,000): the
            // replica's own open-file limit is the only cap here.
            ("VERSUS_MAX_CONNECTIONS", "0".to_owned()),
            ("VERSUS_CLIENT_DAILY_USD", "0".to_owned()),
            // Tens of thousands of answers and pictures at list prices would spend the default
            // budget.
            ("VERSUS_DAILY_BUDGET_USD", "0".to_owned()),
            // M1 queues one job per open stream with no worker running: more than the default
            // bound.
            ("VERSUS_MAX_QUEUED_JOBS", "100000".to_owned()),
            ("NO_COLOR", "1".to_owned()),
        ];
        for (key, value) in env {
            self.sup.export(key, &value);
            self.env.push((key.to_owned(), value));
        }
        self.wiring = Some(Wiring {
            passwords,
            worker_database_url: started.worker_database_url,
            api_database_url: started.api_database_url,
            object_store,
            admin_token,
        });
        Ok(())
    }

    /// Starts `n` workers (`worker-1`, ...) with `extra` on top of their settings.
    async fn start_workers(&mut self, n: usize, extra: &[(&str, &str)]) -> Result<()> {
        let mut workers = Vec::with_capacity(n);
        for _ in 0..n {
            self.worker_seq += 1;
            let mut worker = self.dev.worker(self.worker_seq, &self.bins, self.wiring()?);
            add_env(&mut worker, extra);
            self.workers.push(worker.name.clone());
            workers.push(worker);
        }
        let urls = crate::start_workers(&mut self.sup, workers).await?;
        self.worker_metrics
            .extend(urls.iter().map(|url| format!("{url}/metrics")));
        Ok(())
    }

    async fn stop_workers(&mut self) {
        for name in std::mem::take(&mut self.workers) {
            self.sup.stop_one(&name, STOP).await;
        }
        self.worker_metrics.clear();
    }

    fn worker_pids(&self) -> Vec<i32> {
        self.workers
            .iter()
            .filter_map(|name| self.sup.pid(name))
            .collect()
    }

    /// Starts an API (logs/`name`.*) with `extra` on top of its settings (a later setting
    /// wins), and waits until it is ready.
    async fn start_api(&mut self, name: &str, extra: &[(&str, &str)]) -> Result<Api> {
        let mut api = self.dev.api(&self.bins, self.wiring()?);
        api.name = name.to_owned();
        add_env(&mut api, extra);
        let pid = self.sup.start(api)?;
        let url = self.sup.wait_listening(name, 60).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(&format!("{url}/readyz"))
            .await
            .is_none_or(|(status, _)| status != 200)
        {
            if Instant::now() >= deadline {
                bail!(
                    "the API is not ready (log: {})",
                    self.sup.log(name).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Api {
            name: name.to_owned(),
            url,
            pid,
        })
    }

    async fn stop_api(&mut self, api: &Api) {
        self.sup.stop_one(&api.name, STOP).await;
    }

    /// Runs `versus-bench ARGV` (with the bench's settings and `extra` in its environment);
    /// fails unless it succeeds.
    async fn measure(&self, argv: &Argv, extra: &[(&str, &str)]) -> Result<()> {
        let status = Command::new(&self.measure)
            .args(&argv.0)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .status()
            .await
            .context("run versus-bench")?;
        if !status.success() {
            bail!(
                "versus-bench {} failed ({status})",
                argv.0.first().map_or("", String::as_str)
            );
        }
        Ok(())
    }

    /// The streams' sizes and consumer counts after a scenario, for a look afterwards.
    async fn nats_snapshot(&self, label: &str) {
        let url = format!(
            "http://127.0.0.1:{}/jsz?streams=true",
            self.dev.nats_monitor_port
        );
        if let Some((_, body)) = http_get(&url).await {
            let _ = std::fs::write(self.logs.join(format!("jsz-after-{label}.json")), body);
        }
    }

    /// `--nats-url` and `--nats-password` for versus-bench to log in to the single node as
    /// versus-admin.
    fn as_admin(&self, argv: Argv) -> Result<Argv> {
        Ok(argv
            .opt(
                "--nats-url",
                format!("nats://127.0.0.1:{}", self.dev.nats_port),
            )
            .opt("--nats-password", self.wiring()?.password("admin")))
    }

    /// `--proc NAME=PID` for the API, NATS, Postgres, the simulator and each worker.
    fn with_procs(&self, argv: Argv) -> Result<Argv> {
        Ok(argv
            .opt("--proc", format!("api={}", self.api()?.pid))
            .opt("--proc", format!("nats-server={}", self.nats_pid))
            .opt("--proc", format!("postgres={}", self.pg_pid))
            .opt("--proc", format!("simulator={}", self.sim_pid))
            .each(
                "--proc",
                self.worker_pids().iter().map(|pid| format!("worker={pid}")),
            ))
    }

    async fn scenarios(&mut self) -> Result<()> {
        let results = self.results.display().to_string();
        let api = self.api()?.clone();
        let sim = self.sim.clone();
        // A scenario of the single node: `--api`, `--sim`, then its own options.
        let on_node = |sub: &str| Argv::new(sub).opt("--api", &api.url).opt("--sim", &sim);
        let s = &self.sizes;
        let (wrk_secs, rate_secs, capacity_secs) = (s.wrk_secs, s.rate_secs, s.capacity_secs);

        if self.args.wanted("P1") {
            section("P1 cache hits");
            let mut argv = on_node("hits")
                .opt("--out-dir", &results)
                .opt("--secs", wrk_secs)
                .opt("--rate-secs", rate_secs)
                .opt("--fractions", self.sizes.fractions)
                .opt("--api-pid", api.pid);
            if self.profile {
                argv = argv.opt("--profile-pid", api.pid);
            }
            self.measure(&argv, &[]).await?;
            self.nats_snapshot("P1").await;
        }

        if self.args.wanted("P2") || self.args.wanted("P3") {
            section("P2 miss overhead, one miss at a time");
            // A faster stream than the concurrent run's: what is timed is the first token, and
            // the rounds add up.
            let miss = |n: &str, rounds: u32| {
                on_node("miss")
                    .opt("--out-dir", &results)
                    .opt("--n", n)
                    .opt("--rounds", rounds)
                    .opt("--metrics", format!("{}/metrics", api.url))
                    .each("--metrics", &self.worker_metrics)
            };
            let argv = miss("1", self.sizes.miss_one_rounds)
                .opt("--tokens-per-sec", 600)
                .opt("--file", "miss-1.json");
            let argv = self.with_procs(self.as_admin(argv)?)?;
            self.measure(&argv, &[]).await?;
            let miss_n = non_empty("BENCH_MISS_N").unwrap_or_else(|| "200".to_owned());
            section(&format!(
                "P2 miss overhead ({miss_n} at once), P3 cache value"
            ));
            let argv = self.with_procs(miss(&miss_n, self.sizes.miss_rounds))?;
            self.measure(&argv, &[]).await?;
            self.nats_snapshot("P2").await;
        }

        if self.args.wanted("P4") {
            section("P4 coalescing");
            let argv = on_node("coalesce")
                .opt("--out-dir", &results)
                .opt("--n", COALESCE_N);
            self.measure(&argv, &[]).await?;
            self.nats_snapshot("P4").await;
        }

        if self.args.wanted("P6") {
            section("P6 pre-warm");
            let argv = on_node("prewarm")
                .opt("--out-dir", &results)
                .opt("--n", self.sizes.prewarm_n)
                .opt("--workers", self.workers.len())
                .opt("--worker-bin", self.bins.versus("versus-worker").display());
            self.measure(&argv, &[]).await?;
            self.nats_snapshot("P6").await;
        }

        if self.args.wanted("P5") {
            section("P5 pipeline capacity");
            let capacity = |workers: usize| {
                on_node("capacity")
                    .opt("--workers", workers)
                    .opt("--secs", capacity_secs)
            };
            for n in [1, 2] {
                self.stop_workers().await;
                self.start_workers(n, &[]).await?;
                let mut argv = capacity(n).opt("--out", format!("{results}/capacity-{n}.json"));
                if n == 1 {
                    argv = argv.flag("--baseline");
                }
                self.measure(&self.with_procs(argv)?, &[]).await?;
                self.nats_snapshot(&format!("P5-{n}")).await;
            }
            if self.profile {
                self.profile_pipeline(capacity(2), capacity_secs).await?;
            }
        }

        if self.args.wanted("R1") {
            section("R1 refusing a miss");
            // One API that admits one new answer per client and minute, one whose budget is
            // smaller than any answer, one whose daily quota per client is (and which takes
            // each request's client from X-Forwarded-For): all refuse at once, without a job.
            let limited = self
                .start_api("api-limited", &[("VERSUS_CLIENT_MISSES_PER_MINUTE", "1")])
                .await?;
            let quota = self
                .start_api(
                    "api-quota",
                    &[
                        ("VERSUS_CLIENT_DAILY_USD", "0.000001"),
                        ("VERSUS_TRUSTED_PROXIES", "127.0.0.1/32"),
                    ],
                )
                .await?;
            let budget = self
                .start_api("api-budget", &[("VERSUS_DAILY_BUDGET_USD", "0.000001")])
                .await?;
            let argv = Argv::new("refuse")
                .opt("--api", &api.url)
                .opt("--limited-api", &limited.url)
                .opt("--budget-api", &budget.url)
                .opt("--quota-api", &quota.url)
                .opt("--out-dir", &results)
                .opt("--n", self.sizes.refuse_n);
            self.measure(&argv, &[]).await?;
            for other in [limited, quota, budget] {
                self.stop_api(&other).await;
            }
        }

        if self.args.wanted("S1") {
            section("S1 suggestions as you type");
            // An API of its own with no look-up limit (every request comes from one client),
            // fed by the answers the bench writes straight into the bucket: 100,000 known
            // names.
            let suggest = self
                .start_api("api-suggest", &[("VERSUS_CLIENT_LOOKUPS_PER_SECOND", "0")])
                .await?;
            let argv = Argv::new("suggest")
                .opt("--api", &suggest.url)
                .opt("--api-pid", suggest.pid)
                .opt("--out-dir", &results)
                .opt("--names", self.sizes.suggest_names)
                .opt("--secs", rate_secs);
            self.measure(&self.as_admin(argv)?, &[]).await?;
            self.stop_api(&suggest).await;
            self.nats_snapshot("S1").await;
        }

        if self.args.wanted("P7") || self.args.wanted("P8") || self.args.wanted("P9") {
            section("P7-P9 the hub and its edges (cluster)");
            // Before M1, which stops the single node's workers (P7 makes an answer there).
            let cluster = self.start_cluster("cluster", "api-hub", &[]).await?;
            if self.args.wanted("P7") || self.args.wanted("P8") {
                let argv = Argv::new("edge")
                    .opt("--single-api", &api.url)
                    .opt("--hub-api", &cluster.hub_api.url)
                    .opt("--edge-api", &cluster.edge_apis[0])
                    .opt("--sim", &sim)
                    .opt("--out-dir", &results)
                    .opt("--secs", wrk_secs)
                    .opt("--n", self.sizes.edge_miss_n);
                self.measure(&argv, &[]).await?;
            }
            if self.args.wanted("P5") {
                let mut argv = Argv::new("capacity")
                    .opt("--api", &cluster.hub_api.url)
                    .opt("--sim", &sim)
                    .opt("--out", format!("{results}/capacity-hub.json"))
                    .opt("--workers", 2)
                    .opt("--secs", capacity_secs)
                    .opt("--proc", format!("api={}", cluster.hub_api.pid));
                for name in ["hub1", "hub2", "hub3", "worker1", "worker2"] {
                    let label = name.trim_end_matches(|c: char| c.is_ascii_digit());
                    argv = argv.opt("--proc", format!("{label}={}", cluster.pid_of(name)?));
                }
                self.measure(&argv, &[]).await?;
            }
            if self.args.wanted("P9") {
                let hub_urls: Vec<String> = cluster
                    .hub_ports
                    .iter()
                    .map(|port| format!("nats://127.0.0.1:{port}"))
                    .collect();
                let mut argv = Argv::new("failover")
                    .each("--edge-api", &cluster.edge_apis)
                    .opt("--hub-api", &cluster.hub_api.url)
                    .opt("--sim", &sim)
                    .opt("--nats-url", hub_urls.join(","))
                    .opt("--nats-password", &cluster.admin_password)
                    .opt("--out", format!("{results}/failover.json"))
                    .opt("--n", self.sizes.failover_n);
                for name in ["hub1", "hub2", "hub3"] {
                    argv = argv.opt("--node", format!("{name}={}", cluster.pid_of(name)?));
                }
                self.measure(&argv, &[]).await?;
            }
            self.stop_cluster(&cluster).await;
        }

        if self.args.wanted("P11") {
            section("P11 a hub far away (cluster with its leaf links delayed)");
            // The cluster of P7-P9 once more, apart from theirs, with a delay proxy in front of
            // each hub server's leaf-node port: the edges dial the proxies
            // (VERSUS_EDGE_LEAF_PORTS), which hold every byte BENCH_HUB_DELAY_MS each way. The
            // hub, its workers, the simulator and the API beside the hub are as near as before.
            // State and logs: target/bench/cluster-far.
            let delay_ms = non_empty("BENCH_HUB_DELAY_MS").unwrap_or_else(|| "40".to_owned());
            if delay_ms.parse::<u32>().is_err() {
                bail!("BENCH_HUB_DELAY_MS must be a number of milliseconds");
            }
            let mut leaf_ports = Vec::new();
            let mut proxy_ports = Vec::new();
            let mut proxy = Argv::new("delay-proxy").opt("--delay-ms", &delay_ms);
            for _ in 0..3 {
                let (leaf, port) = (free_wildcard_port()?, free_port()?);
                proxy = proxy.opt("--pair", format!("127.0.0.1:{port}=127.0.0.1:{leaf}"));
                leaf_ports.push(leaf);
                proxy_ports.push(port);
            }
            self.sup.start(Process {
                name: "delay-proxy".to_owned(),
                program: self.measure.clone(),
                args: proxy.0,
                env: Vec::new(),
                infra: true,
            })?;
            self.wait_for_line("delay-proxy", "delay-proxy listening", 10)
                .await?;
            let cluster = self
                .start_cluster(
                    "cluster-far",
                    "api-hub-far",
                    &[
                        ("VERSUS_HUB_LEAF_PORTS", &words(&leaf_ports)),
                        ("VERSUS_EDGE_LEAF_PORTS", &words(&proxy_ports)),
                    ],
                )
                .await?;
            let argv = Argv::new("far")
                .opt("--hub-api", &cluster.hub_api.url)
                .opt("--edge-api", &cluster.edge_apis[0])
                .opt("--sim", &sim)
                .opt("--out-dir", &results)
                .opt("--delay-ms", &delay_ms)
                .opt("--secs", rate_secs)
                .opt("--n", self.sizes.edge_miss_n)
                .opt("--purges", self.sizes.purges)
                .opt(
                    "--edge-nats-url",
                    format!("nats://127.0.0.1:{}", cluster.edge_ports[0]),
                )
                .opt("--nats-password", &cluster.admin_password);
            self.measure(&argv, &[]).await?;
            self.stop_cluster(&cluster).await;
            self.sup.stop_one("delay-proxy", STOP).await;
        }

        if self.args.wanted("P12") {
            self.fallback(&api, &results).await?;
        }

        if self.args.wanted("P10") {
            section("P10 a viral fight");
            // Before M1 and M2, which leave thousands of jobs queued. No worker may run: the
            // viewers' flight queues its job, and versus-bench starts one worker once every
            // viewer has joined, and stops it after. The load generator and the API each hold
            // one socket per viewer, so the sizes stop at the hard open-file limit less a
            // margin.
            self.stop_workers().await;
            let sizes = self
                .sizes_that_fit(
                    "viral",
                    ", and the API holds one per viewer",
                    self.sizes.viral,
                )
                .await?;
            // An API of its own: tens of thousands of viewers grow its heap, which M1 would
            // then reuse.
            let viral = self.start_api("api-viral", &[]).await?;
            // The worker versus-bench starts gets a worker's settings, as the topology gives
            // them (its own name aside).
            let worker = self.dev.worker(0, &self.bins, self.wiring()?);
            let worker_env: Vec<(&str, &str)> = worker
                .env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            for n in sizes {
                let argv = Argv::new("viral")
                    .opt("--api", &viral.url)
                    .opt("--api-pid", viral.pid)
                    .opt("--sim", &sim)
                    .opt("--n", n)
                    .opt("--worker-bin", worker.program.display())
                    .opt(
                        "--worker-log",
                        self.logs.join(format!("worker-viral-{n}.log")).display(),
                    )
                    .opt("--out-dir", &results);
                self.measure(&self.as_admin(argv)?, &worker_env).await?;
            }
            self.stop_api(&viral).await;
            self.nats_snapshot("P10").await;
            self.start_workers(WORKERS, &[]).await?;
        }

        if self.args.wanted("M1") {
            section("M1 memory");
            self.stop_workers().await;
            // A fresh worker, its concurrency filled with calls the simulator holds.
            self.start_workers(1, &[]).await?;
            let worker_pid = self.worker_pids().first().copied().unwrap_or_default();
            let argv = on_node("worker-rss")
                .opt("--pid", worker_pid)
                .opt("--concurrency", &self.concurrency)
                .opt("--out-dir", &results);
            self.measure(&argv, &[]).await?;
            // No workers at all: every stream below waits for a generation that does not come.
            self.stop_workers().await;
            let streams_n = self.sizes.streams_n;
            let streams = || {
                Argv::new("streams")
                    .opt("--out-dir", &results)
                    .opt("--n", streams_n)
            };
            let on = |api: &Api| streams().opt("--api", &api.url).opt("--pid", api.pid);
            self.measure(&on(&api), &[]).await?;
            self.nats_snapshot("M1").await;
            // The same number of streams on one matchup, on a fresh API: the connection alone.
            self.stop_api(&api).await;
            let fresh = self.start_api("api-2", &[]).await?;
            self.measure(&on(&fresh).flag("--shared"), &[]).await?;
            self.api = Some(fresh);
            // And on a bare axum server: what an idle stream costs without any Versus code.
            self.measure(&streams().flag("--bare"), &[]).await?;
        }

        if self.args.wanted("M2") {
            section("M2 open streams at one replica");
            // Last: with no worker running, every stream here leaves its job queued. Each size
            // and kind on a fresh API, which takes the hard open-file limit as its own; so does
            // the load generator, and both keep a margin for everything else they hold.
            self.stop_workers().await;
            let sizes = self
                .sizes_that_fit("m2", ", and the API holds one per stream", self.sizes.m2)
                .await?;
            if let Some(api) = self.api.take() {
                self.stop_api(&api).await;
            }
            for kind in ["flights", "joins"] {
                for n in &sizes {
                    let api = self.start_api(&format!("api-m2-{kind}-{n}"), &[]).await?;
                    let argv = Argv::new("open-streams")
                        .opt("--api", &api.url)
                        .opt("--pid", api.pid)
                        .opt("--kind", kind)
                        .opt("--n", n)
                        .opt("--rate-secs", rate_secs)
                        .opt("--out-dir", &results);
                    self.measure(&self.as_admin(argv)?, &[]).await?;
                    self.stop_api(&api).await;
                }
            }
        }
        Ok(())
    }

    /// P12: a miss while the primary is down (a fallback provider, its circuit open).
    async fn fallback(&mut self, api: &Api, results: &str) -> Result<()> {
        section("P12 a miss while the primary is down (a fallback provider, its circuit open)");
        // A second simulator, the workers' fallback for text, paced by the bench exactly as
        // the primary. Only the primary's chat fails (a fault of kind chat), so both sides make
        // the same names' moderation call to the same simulator and differ in the chat's
        // provider alone: no moderation fallback is listed. The circuit, once open, stays open
        // for the whole scenario; quick retries only shorten the misses that open it (no
        // measured miss retries: the healthy primary answers, the open circuit is not called);
        // upgrades of degraded answers are off (a worker whose circuit is still closed would
        // queue the other's while the circuits open).
        let mut sim = self.dev.sim(&self.bins);
        sim.name = "sim-fallback".to_owned();
        sim.env.push(("RUST_LOG".to_owned(), "warn".to_owned()));
        self.sup.start(sim)?;
        let fallback_sim = self.sup.wait_listening("sim-fallback", 60).await?;
        let fallbacks = format!(
            r#"[{{"kind":"text","base_url":"{fallback_sim}/v1","model":"fallback-chat","api_key_env":"VERSUS_BENCH_FALLBACK_KEY"}}]"#
        );
        self.stop_workers().await;
        self.start_workers(
            WORKERS,
            &[
                ("VERSUS_FALLBACKS", &fallbacks),
                ("VERSUS_BENCH_FALLBACK_KEY", "bench"),
                ("VERSUS_CIRCUIT_OPEN_SECS", "3600"),
                ("VERSUS_UPSTREAM_BACKOFF_MS", "50"),
                ("VERSUS_UPGRADE_PER_MINUTE", "0"),
            ],
        )
        .await?;
        let argv = Argv::new("fallback")
            .opt("--api", &api.url)
            .opt("--sim", &self.sim)
            .opt("--fallback-sim", &fallback_sim)
            .opt("--fallback-model", "fallback-chat")
            .opt("--out-dir", results)
            .opt("--rounds", self.sizes.fallback_rounds)
            .opt("--tokens-per-sec", 600)
            .each("--metrics", &self.worker_metrics);
        self.measure(&argv, &[]).await?;
        self.nats_snapshot("P12").await;
        // Back to the usual workers. The degraded answers made here are marked queued for an
        // upgrade a day from now, so that the primary does not make them again (its calls,
        // the pre-warm lane) during the scenarios after this one.
        self.stop_workers().await;
        pg::psql(
            self.pg_port,
            &[
                "-d",
                "versus",
                "-c",
                "UPDATE generations SET upgrade_queued_at = now() + interval '1 day' \
                 WHERE degraded_until IS NOT NULL",
            ],
        )
        .await?;
        self.sup.stop_one("sim-fallback", STOP).await;
        self.start_workers(WORKERS, &[]).await
    }

    /// A profile of a third run of P5 (`capacity`, with 2 workers), so that sampling does not
    /// slow the measured ones: `perf record -e cpu-clock` on the API, the workers and
    /// nats-server, for `secs` and 2 more.
    async fn profile_pipeline(&self, capacity: Argv, secs: u32) -> Result<()> {
        say("profiling the pipeline (perf, cpu-clock) with 2 workers");
        let mut pids = vec![self.api()?.pid, self.nats_pid];
        pids.extend(self.worker_pids());
        let pids: Vec<String> = pids.iter().map(i32::to_string).collect();
        let data = self.tmp.join("perf.data");
        let mut perf = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "499", "-p"])
            .arg(pids.join(","))
            .arg("-o")
            .arg(&data)
            .args(["--", "sleep", &(secs + 2).to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("run perf record")?;
        let argv = capacity.opt("--out", self.tmp.join("capacity-profiled.json").display());
        self.measure(&argv, &[]).await?;
        let _ = perf.wait().await;
        let report = Command::new("perf")
            .args(["report", "-i"])
            .arg(&data)
            .args([
                "--no-children",
                "--sort",
                "comm,dso,sym",
                "--stdio",
                "--percent-limit",
                "1",
            ])
            .stderr(Stdio::null())
            .output()
            .await;
        let Ok(report) = report.map(|r| String::from_utf8_lossy(&r.stdout).into_owned()) else {
            warn("perf report failed");
            return Ok(());
        };
        let hottest: Vec<&str> = report
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .take(30)
            .collect();
        let text = format!(
            "Profile of a third run (2 workers), `perf record -e cpu-clock` on the API, the\n\
             workers and nats-server; the hottest symbols, as shares of all their samples:\n\n\
             ```\n{}\n```\n",
            hottest.join("\n")
        );
        std::fs::write(self.results.join("profile.md"), text)?;
        Ok(())
    }

    /// The `cluster` topology (three hub servers, two edges with an API each, two workers)
    /// beside the single node, run by this launcher as scripts/cluster runs it: the same
    /// binaries, the same simulator (OPENAI_BASE_URL is set, so it starts none), the bench's
    /// settings and admin token (so that the bench may purge), each port a free one, and
    /// `extra` on top; its state and logs in OUT/`name`, kept for a look afterwards (its
    /// output in logs/`name`.out and .log). Then an API beside its hub (logs/`api_name`.*).
    async fn start_cluster(
        &mut self,
        name: &str,
        api_name: &str,
        extra: &[(&str, &str)],
    ) -> Result<ClusterRun> {
        let data = self.out.join(name);
        let _ = std::fs::remove_dir_all(&data);
        let ports = |n: usize, free: fn() -> Result<u16>| -> Result<Vec<u16>> {
            (0..n).map(|_| free()).collect()
        };
        let hub_ports = ports(3, free_port)?;
        let edge_ports = ports(2, free_port)?;
        let mut env: Env = self.env.clone();
        for (key, value) in [
            ("VERSUS_BIN_DIR", self.bins.dir.display().to_string()),
            ("VERSUS_DATA_DIR", data.display().to_string()),
            ("VERSUS_PG_PORT", free_port()?.to_string()),
            ("VERSUS_HUB_PORTS", words(&hub_ports)),
            ("VERSUS_HUB_MONITOR_PORTS", words(&ports(3, free_port)?)),
            ("VERSUS_HUB_CLUSTER_PORTS", words(&ports(3, free_port)?)),
            (
                "VERSUS_HUB_LEAF_PORTS",
                words(&ports(3, free_wildcard_port)?),
            ),
            ("VERSUS_EDGE_PORTS", words(&edge_ports)),
            ("VERSUS_EDGE_MONITOR_PORTS", words(&ports(2, free_port)?)),
            (
                "VERSUS_EDGE_HTTP_ADDRS",
                "127.0.0.1:0 127.0.0.1:0".to_owned(),
            ),
            ("RUST_LOG", "warn".to_owned()),
        ] {
            env.push((key.to_owned(), value));
        }
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        self.sup.start(Process {
            name: name.to_owned(),
            program: std::env::current_exe()?,
            args: vec!["cluster".to_owned()],
            env,
            infra: false,
        })?;
        let out = self.logs.join(format!("{name}.out"));
        let deadline = Instant::now() + Duration::from_secs(180);
        let edge_apis = loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            let edges: Vec<String> = text
                .lines()
                .filter_map(|line| line.strip_prefix("edge "))
                .filter_map(|rest| rest.split_whitespace().nth(1))
                .map(str::to_owned)
                .collect();
            if edges.len() >= 2 {
                break edges;
            }
            let log = self.sup.log(name);
            if !self.sup.running(name) {
                bail!("the cluster exited (log: {})", log.display());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the cluster did not print its edges (log: {})",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        // An API beside the hub, logged in with the cluster's own passwords.
        let passwords =
            secrets::nats_passwords(&data.join("nats-auth.env"), &Cluster::nats_users())?;
        let hub_nats = nats_url("api", password_of(&passwords, "api"), &hub_ports);
        let hub_api = self.start_api(api_name, &[("NATS_URL", &hub_nats)]).await?;
        eprintln!("edges {} · hub api {}", edge_apis.join(" "), hub_api.url);
        Ok(ClusterRun {
            name: name.to_owned(),
            data,
            edge_apis,
            hub_ports,
            edge_ports,
            hub_api,
            admin_password: password_of(&passwords, "admin").to_owned(),
        })
    }

    /// Stops the API beside the hub, then the cluster (which stops what it started, given the
    /// time its programs take to drain).
    async fn stop_cluster(&mut self, cluster: &ClusterRun) {
        self.stop_api(&cluster.hub_api).await;
        self.sup.stop_one(&cluster.name, CLUSTER_STOP).await;
    }

    /// Waits up to `secs` for a line of `name`'s output that starts with `prefix`.
    async fn wait_for_line(&mut self, name: &str, prefix: &str, secs: u64) -> Result<()> {
        let out = self.logs.join(format!("{name}.out"));
        let deadline = Instant::now() + Duration::from_secs(secs);
        while line_starting(&out, prefix).is_none() {
            let log = self.sup.log(name);
            if !self.sup.running(name) {
                bail!("{name} exited (log: {})", log.display());
            }
            if Instant::now() >= deadline {
                bail!("{name} did not say '{prefix}' (log: {})", log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Of `sizes`, those that a process's open files allow (the hard limit, less 1,000 for
    /// everything else the API and the load generator hold), and the largest that fits in
    /// place of those above it, which versus-bench records as not measured (`why` ends the
    /// reason the report gives).
    async fn sizes_that_fit(
        &self,
        scenario: &str,
        why: &str,
        sizes: &[usize],
    ) -> Result<Vec<usize>> {
        let hard = hard_open_files()?;
        let most = usize::try_from(hard.saturating_sub(1000)).unwrap_or(usize::MAX);
        let (mut fit, too_big): (Vec<usize>, Vec<usize>) = sizes.iter().partition(|n| **n <= most);
        if !too_big.is_empty() {
            fit.push(most);
            let too_big: Vec<String> = too_big.iter().map(usize::to_string).collect();
            let argv = Argv::new("skipped")
                .opt("--out-dir", self.results.display())
                .opt("--scenario", scenario)
                .opt("--sizes", too_big.join(","))
                .opt(
                    "--why",
                    format!(
                        "a process may hold {hard} open files here (the hard limit, which only \
                         a privileged process raises){why}; the largest that fits, {most}, is \
                         measured instead"
                    ),
                );
            self.measure(&argv, &[]).await?;
        }
        Ok(fit)
    }

    /// versus-bench's report: rewrites BENCHMARKS.md's results, or prints them (and keeps
    /// them in OUT/results.md).
    async fn report(&self) -> Result<()> {
        section("report");
        let first_line = |program: &Path, args: &[&str]| -> String {
            std::process::Command::new(program)
                .args(args)
                .output()
                .map(|out| {
                    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                    text.push_str(&String::from_utf8_lossy(&out.stderr));
                    text.lines().next().unwrap_or_default().to_owned()
                })
                .unwrap_or_default()
        };
        let two_words = |line: String| {
            line.split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let postgres = first_line(&pg::bin_dir().join("postgres"), &["--version"]);
        let tools = format!(
            "{}, {}, {}, {}",
            first_line(&self.bins.nats_server, &["--version"]),
            postgres.replacen("postgres (PostgreSQL)", "PostgreSQL", 1),
            two_words(first_line(Path::new("wrk"), &["-v"])),
            two_words(first_line(Path::new("rustc"), &["--version"])),
        );
        let concurrency = &self.concurrency;
        let mut settings = format!(
            "release build; {WORKERS} workers (1 and 2 in P5) with \
             VERSUS_WORKER_CONCURRENCY={concurrency} and VERSUS_MAX_IN_FLIGHT={MAX_IN_FLIGHT}; \
             one API; nats-server with JetStream on disk; Postgres with its durable defaults; \
             everything on this one machine, load generators included"
        );
        if self.args.wanted("P12") {
            settings.push_str("; in P12 the workers also fall back to a second simulator");
        }
        if let Some(conf) = non_empty("BENCH_NATS_CONF") {
            settings.push_str(&format!("; nats-server config {conf} instead of nats.conf"));
        }
        let argv = Argv::new("report")
            .opt("--results", self.results.display())
            .opt("--file", self.repo.join("BENCHMARKS.md").display())
            .opt("--mode", if self.args.quick { "quick" } else { "full" })
            .opt("--tools", tools)
            .opt("--load-at-start", &self.load_at_start)
            .opt("--settings", settings);
        if self.args.write {
            self.measure(&argv, &[]).await?;
        } else {
            let out = Command::new(&self.measure)
                .args(&argv.flag("--dry-run").0)
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
                .await
                .context("run versus-bench report")?;
            if !out.status.success() {
                bail!("versus-bench report failed ({})", out.status);
            }
            print!("{}", String::from_utf8_lossy(&out.stdout));
            std::fs::write(self.out.join("results.md"), &out.stdout)?;
        }
        say(&format!("raw results and logs: {}", self.out.display()));
        Ok(())
    }
}

/// A versus-bench command line: a subcommand, then its options.
struct Argv(Vec<String>);

impl Argv {
    fn new(subcommand: &str) -> Argv {
        Argv(vec![subcommand.to_owned()])
    }

    /// `flag value`.
    fn opt(mut self, flag: &str, value: impl std::fmt::Display) -> Argv {
        self.0.push(flag.to_owned());
        self.0.push(value.to_string());
        self
    }

    /// `flag value` for each of `values`.
    fn each<T: std::fmt::Display>(self, flag: &str, values: impl IntoIterator<Item = T>) -> Argv {
        values
            .into_iter()
            .fold(self, |argv, value| argv.opt(flag, value))
    }

    /// `flag` alone.
    fn flag(mut self, flag: &str) -> Argv {
        self.0.push(flag.to_owned());
        self
    }
}

/// `ports` as a list of words, as the launcher's `VERSUS_*_PORTS` take them.
fn words(ports: &[u16]) -> String {
    let words: Vec<String> = ports.iter().map(u16::to_string).collect();
    words.join(" ")
}

/// `extra` on top of `process`'s settings (a later setting wins).
fn add_env(process: &mut Process, extra: &[(&str, &str)]) {
    process.env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
}

/// `process` with `value` in place of the argument after `flag`.
fn set_arg_after(process: &mut Process, flag: &str, value: &str) {
    if let Some(at) = process.args.iter().position(|a| a == flag)
        && let Some(arg) = process.args.get_mut(at + 1)
    {
        *arg = value.to_owned();
    }
}

/// The hard limit of open files of a process here.
fn hard_open_files() -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    Ok(hard)
}

/// Raises this process's soft limit of open files to the hard one (65,536 if unlimited), for
/// it and everything it starts; returns the new limit.
fn raise_open_files() -> Result<u64> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    let hard = hard_open_files()?;
    let soft = if hard == RLIM_INFINITY { 65_536 } else { hard };
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).context("setrlimit")?;
    Ok(soft)
}

/// Whether perf works here: it can sample a command (no hardware counters needed).
fn perf_works(tmp: &Path) -> bool {
    std::process::Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-o"])
        .arg(tmp.join("perf-probe.data"))
        .args(["--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
