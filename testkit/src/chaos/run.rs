//! One fault run from start to report: the system, the load, the operator, the poller and the
//! nemesis at once; then healing, a settle period, the final audit and the invariants; and
//! what it saw written under `target/chaos/<seed>/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::join_all;
use serde::Serialize;
use serde_json::json;

use super::history::{History, Outcome, Violation};
use super::schedule::{self, Shape, Site};
use super::{audit, invariants, load, nemesis};
use crate::System;

/// The simulator's answers: 40 words, the first after 300 ms, then 30 a second (about 1.6 s).
pub const ANSWER_TOKENS: usize = 40;
/// How long the healed system settles before the audit.
const SETTLE: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub seed: u64,
    /// How long the load and the faults last.
    pub duration: Duration,
    /// How many clients at once.
    pub clients: usize,
}

impl Settings {
    /// `VERSUS_CHAOS_SEED` (else `default_seed`), `VERSUS_CHAOS_SECS` (else 60) and
    /// `VERSUS_CHAOS_CLIENTS` (else 20). Panics on a value that is not a number.
    pub fn from_env(default_seed: u64) -> Settings {
        let var = |name: &str, default: u64| match std::env::var(name) {
            Ok(v) if !v.trim().is_empty() => v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
            _ => default,
        };
        Settings {
            seed: var("VERSUS_CHAOS_SEED", default_seed),
            duration: Duration::from_secs(var("VERSUS_CHAOS_SECS", 60)),
            clients: usize::try_from(var("VERSUS_CHAOS_CLIENTS", 20)).unwrap_or(20),
        }
    }
}

/// What a run found.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    /// Where it kept what it saw.
    pub dir: PathBuf,
    pub violations: Vec<Violation>,
    /// Counts of what happened, one line each.
    pub summary: String,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The seed, the violations and where to look, for a failed test's message.
    pub fn failure(&self) -> String {
        let shown: Vec<String> = self
            .violations
            .iter()
            .take(20)
            .map(|v| format!("  - {v}"))
            .collect();
        format!(
            "the fault run with seed {} broke {} invariant(s) (replay: VERSUS_CHAOS_SEED={} \
             scripts/chaos):\n{}{}\n{}\nwhat it saw: {}",
            self.seed,
            self.violations.len(),
            self.seed,
            shown.join("\n"),
            if self.violations.len() > 20 {
                "\n  - …"
            } else {
                ""
            },
            self.summary,
            self.dir.display()
        )
    }
}

/// What the load's parts share: the clock, the APIs' addresses, the hot matchups' keys.
pub struct Shared {
    pub seed: u64,
    pub http: reqwest::Client,
    start: tokio::time::Instant,
    endpoints: Mutex<Vec<String>>,
    hot_keys: Mutex<BTreeMap<usize, String>>,
    next_op: AtomicU64,
    load_done: AtomicBool,
}

impl Shared {
    fn new(seed: u64, endpoints: Vec<String>) -> Shared {
        Shared {
            seed,
            http: crate::http_client(),
            start: tokio::time::Instant::now(),
            endpoints: Mutex::new(endpoints),
            hot_keys: Mutex::new(BTreeMap::new()),
            next_op: AtomicU64::new(1),
            load_done: AtomicBool::new(false),
        }
    }

    /// Milliseconds since the load began.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub async fn sleep_until_ms(&self, ms: u64) {
        tokio::time::sleep_until(self.start + Duration::from_millis(ms)).await;
    }

    pub fn next_op_id(&self) -> u64 {
        self.next_op.fetch_add(1, Ordering::Relaxed)
    }

    /// How many APIs: the hub's and one per edge.
    pub fn sites(&self) -> usize {
        lock(&self.endpoints).len()
    }

    pub fn endpoint(&self, site: Site) -> String {
        lock(&self.endpoints)[site.index()].clone()
    }

    pub fn set_endpoint(&self, site: Site, url: &str) {
        lock(&self.endpoints)[site.index()] = url.to_owned();
    }

    pub fn stream_url(&self, site: Site, a: &str, b: &str) -> String {
        let base = format!("{}/v1/fights/stream", self.endpoint(site));
        reqwest::Url::parse_with_params(&base, &[("a", a), ("b", b)])
            .map(|url| url.to_string())
            .unwrap_or(base)
    }

    pub fn learn_hot_key(&self, hot: usize, key: &str) {
        lock(&self.hot_keys).insert(hot, key.to_owned());
    }

    pub fn hot_key(&self, hot: usize) -> Option<String> {
        lock(&self.hot_keys).get(&hot).cloned()
    }

    pub fn load_done(&self) -> bool {
        self.load_done.load(Ordering::Relaxed)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the whole thing (see the module's doc) and reports.
pub async fn run(settings: Settings) -> Report {
    let Settings {
        seed,
        duration,
        clients,
    } = settings;
    eprintln!(
        "chaos: seed {seed}, {} s of faults, {clients} clients (replay: VERSUS_CHAOS_SEED={seed} \
         VERSUS_CHAOS_SECS={} scripts/chaos)",
        duration.as_secs(),
        duration.as_secs()
    );
    let token = format!("chaos-{}", uuid::Uuid::new_v4().simple());
    let mut system = start_system(&token).await;
    let shape = Shape {
        workers: system.workers.len(),
        edges: system.edges.len(),
        hub_nodes: 1 + system.hub_peers.len(),
    };
    let steps = schedule::plan(seed, duration, shape);
    let endpoints = std::iter::once(system.api_url().to_owned())
        .chain(system.edges.iter().map(|e| e.api_url().to_owned()))
        .collect();
    let shared = Shared::new(seed, endpoints);
    let pool = system.db.pool().await;
    let until_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);

    let load = async {
        let ops = join_all((0..clients).map(|i| load::client(&shared, i, until_ms))).await;
        shared.load_done.store(true, Ordering::Relaxed);
        ops
    };
    let (ops, (purges, mut sightings), polled, faults) = tokio::join!(
        load,
        load::operator(&shared, &pool, &token, until_ms),
        audit::poll(&shared, &pool),
        nemesis::run(&mut system, &shared, &steps),
    );
    eprintln!(
        "chaos: {} ms: load done; healing, settling",
        shared.now_ms()
    );
    nemesis::heal_all(&mut system).await;
    tokio::time::sleep(SETTLE).await;
    let (last, final_sightings) = audit::final_state(&mut system, &shared).await;
    sightings.extend(polled);
    sightings.extend(final_sightings);
    let mut ops: Vec<_> = ops.into_iter().flatten().collect();
    ops.sort_by_key(|op| (op.start_ms, op.id));
    let history = History {
        ops,
        purges,
        sightings,
        faults,
    };
    let violations = invariants::check(&history, &last, ANSWER_TOKENS);
    let summary = summary(&history, &last, steps.len());
    let dir = out_dir(seed);
    keep(
        &dir,
        seed,
        &settings_json(seed, duration, clients),
        &history,
        &violations,
        &summary,
    );
    keep_logs(&dir.join("logs"), &system);
    eprintln!("chaos: seed {seed}: {summary}");
    eprintln!(
        "chaos: seed {seed}: {} violation(s); what it saw: {}",
        violations.len(),
        dir.display()
    );
    Report {
        seed,
        dir,
        violations,
        summary,
    }
}

/// The cluster under test: a 3-node hub, two edges with an API each, the hub's API, two
/// workers, Postgres of its own (so that it may be paused), and answers of a second or two.
async fn start_system(token: &str) -> System {
    System::builder()
        .edges(2)
        .workers(2)
        .own_postgres()
        .sim_env("VERSUS_SIM_TTFT_MS", "300")
        .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "30")
        .sim_env("VERSUS_SIM_ANSWER_TOKENS", ANSWER_TOKENS.to_string())
        .api_env("VERSUS_ADMIN_TOKEN", token)
        // No wait without an end, and a short one: a client hears within 30 s.
        .api_env("VERSUS_STREAM_TIMEOUT_SECS", "30")
        .worker_env("VERSUS_JOB_MAX_WAIT_SECS", "30")
        // A stalled upstream is given up on in seconds, not the default half minute.
        .worker_env("VERSUS_UPSTREAM_IDLE_TIMEOUT_SECS", "5")
        .worker_env("VERSUS_UPSTREAM_HEADERS_TIMEOUT_SECS", "5")
        // Upstream faults come and go: a hot matchup must not cool down for a minute after.
        .worker_env("VERSUS_COOLDOWN_AFTER_FAILURES", "0")
        // Two workers' pools within the own server's 100 connections.
        .worker_env("VERSUS_WORKER_CONCURRENCY", "8")
        .start()
        .await
}

fn summary(history: &History, last: &super::invariants::Final, planned: usize) -> String {
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for op in &history.ops {
        let name = match &op.outcome {
            Outcome::Done { .. } => "done".to_owned(),
            Outcome::GaveUp { code } => format!("gave up ({code})"),
            Outcome::Refused => "refused".to_owned(),
            Outcome::Fatal { code, .. } => format!("fatal ({code})"),
            Outcome::Hung { .. } => "hung".to_owned(),
        };
        *outcomes.entry(name).or_default() += 1;
    }
    let resumed = history
        .ops
        .iter()
        .filter(|op| op.attempts.iter().any(|a| a.last_event_id.is_some()))
        .count();
    let troubled = history
        .faults
        .iter()
        .filter(|f| f.trouble.is_some())
        .count();
    let effective = history.purges.iter().filter(|p| p.effective).count();
    let finished = last.rows.iter().filter(|r| r.status == "done").count();
    format!(
        "{} ops {outcomes:?}, {resumed} resumed with Last-Event-ID; {} of {planned} faults \
         injected ({troubled} with trouble); {} purges ({effective} took effect); {finished} \
         answers stored; {} upstream chat calls",
        history.ops.len(),
        history.faults.len(),
        history.purges.len(),
        last.chat_calls_after_hits
    )
}

fn settings_json(seed: u64, duration: Duration, clients: usize) -> serde_json::Value {
    json!({"seed": seed, "secs": duration.as_secs(), "clients": clients})
}

/// `target/chaos/<seed>/`, emptied.
fn out_dir(seed: u64) -> PathBuf {
    let target = crate::profile_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"));
    let dir = target.join("chaos").join(seed.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("logs"))
        .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// `history.ndjson` (a line per fault, purge, operation, sighting and violation, each with its
/// `type`) and `summary.json`.
fn keep(
    dir: &Path,
    seed: u64,
    settings: &serde_json::Value,
    history: &History,
    violations: &[Violation],
    summary: &str,
) {
    let mut lines: Vec<String> = Vec::new();
    lines.extend(history.faults.iter().map(|r| line("fault", r)));
    lines.extend(history.purges.iter().map(|r| line("purge", r)));
    lines.extend(history.ops.iter().map(|r| line("op", r)));
    lines.extend(history.sightings.iter().map(|r| line("sighting", r)));
    lines.extend(violations.iter().map(|r| line("violation", r)));
    write(&dir.join("history.ndjson"), &(lines.join("\n") + "\n"));
    let summary = json!({
        "seed": seed,
        "settings": settings,
        "summary": summary,
        "violations": violations.iter().map(ToString::to_string).collect::<Vec<_>>(),
    });
    write(
        &dir.join("summary.json"),
        &serde_json::to_string_pretty(&summary).unwrap_or_default(),
    );
}

/// The last lines each process logged.
fn keep_logs(dir: &Path, system: &System) {
    let procs = system
        .workers
        .iter()
        .chain(std::iter::once(&system.api))
        .chain(system.edges.iter().map(|e| &e.api))
        .chain(std::iter::once(&system.sim.proc));
    for proc in procs {
        let name = proc.label().replace(' ', "-");
        write(&dir.join(format!("{name}.log")), &proc.stderr_tail());
    }
    let hub = std::iter::once(&system.nats).chain(&system.hub_peers);
    for (i, nats) in hub.enumerate() {
        write(
            &dir.join(format!("nats-hub{}.log", i + 1)),
            &nats.log_tail(),
        );
    }
    for edge in &system.edges {
        write(
            &dir.join(format!("nats-{}.log", edge.name)),
            &edge.nats.log_tail(),
        );
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// `record` as one JSON line, with its `type`.
fn line(kind: &str, record: &impl Serialize) -> String {
    let mut value = serde_json::to_value(record).unwrap_or_default();
    value["type"] = json!(kind);
    value.to_string()
}
