//! The launcher: a Versus system on this machine, as `scripts/dev` and `scripts/cluster` run it
//! (`cargo xtask dev`, `cargo xtask cluster`).
//!
//! - `topology`: what runs, written once: processes, names, ports and the variables that change
//!   them, the settings each program gets (`worker_env`, `api_env`, shared with the test kit);
//! - `supervisor`: runs the processes, starts again what exits, stops them in order;
//! - `secrets`: the NATS passwords and the admin token, made once per data folder;
//! - `pg`: Postgres clusters of our own: the data folder's, the tests' and the benchmark's;
//! - `dev`, `cluster`: the order in which each system starts, and what it prints;
//! - `test` (scripts/test): the checks, against a throwaway Postgres cluster of the run's own.
//! - `bench` (scripts/bench): the benchmarks' processes, the single node as `dev` describes
//!   it and `cluster` beside it, started and stopped around versus-bench's scenarios.
//!
//! The shell entry points keep what is not about processes: installing what is missing
//! (`scripts/lib.sh`) and building.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::Instant;

pub mod bench;
pub mod cluster;
pub mod dev;
mod out;
pub mod pg;
pub mod probe;
pub mod secrets;
pub mod supervisor;
pub mod test;
pub mod topology;

use out::{error, say, warn};
use supervisor::{Signals, Stop, Supervisor};
use topology::{Binaries, Process, Wiring};

/// The systems the launcher runs.
#[derive(Clone, Copy, Debug)]
pub enum System {
    /// `scripts/dev`: one NATS server, the workers, the API.
    Dev,
    /// `scripts/cluster`: a hub of three, two edges with an API each, the workers on the hub.
    Cluster,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::Dev => "scripts/dev",
            System::Cluster => "scripts/cluster",
        }
    }

    /// The exit status after `stop`: a shell's for dev (130 for Ctrl-C); 0 for the cluster,
    /// for which a signal is the normal way to stop.
    fn exit_status(self, stop: Stop) -> i32 {
        match self {
            System::Dev => stop.status(),
            System::Cluster => 0,
        }
    }
}

/// Runs `system` until a signal stops it (or it fails to come up); returns the exit status.
pub async fn run(system: System) -> i32 {
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(e) => {
            error(&format!("{e:#}"));
            return 1;
        }
    };
    let layout = match Layout::new(system) {
        Ok(layout) => layout,
        Err(e) => {
            error(&format!("{e:#}"));
            return 1;
        }
    };
    let mut sup = Supervisor::new(system.label(), &layout.logs, &layout.run);
    let up = async {
        match system {
            System::Dev => dev::up(&mut sup, &layout).await,
            System::Cluster => cluster::up(&mut sup, &layout).await,
        }
    };
    let outcome: Result<Stop> = tokio::select! {
        result = up => result.map(|never: Infallible| match never {}),
        stop = signals.next() => Ok(stop),
    };
    let status = match outcome {
        Ok(stop) => system.exit_status(stop),
        Err(e) => {
            error(&format!("{e:#}"));
            1
        }
    };
    sup.stop(&mut signals).await;
    status
}

/// Where a system keeps its state, and what it runs.
pub struct Layout {
    /// The repository (nats.conf and the others are there).
    pub repo: PathBuf,
    /// `VERSUS_DATA_DIR`: `.data` (dev) or `.data/cluster` (cluster) in the repo unless set.
    pub data: PathBuf,
    pub logs: PathBuf,
    /// The pid files.
    pub run: PathBuf,
}

impl Layout {
    fn new(system: System) -> Result<Layout> {
        let repo = repo()?;
        let data = match non_empty("VERSUS_DATA_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => match system {
                System::Dev => repo.join(".data"),
                System::Cluster => repo.join(".data").join("cluster"),
            },
        };
        std::fs::create_dir_all(&data).with_context(|| format!("mkdir {}", data.display()))?;
        let data = data.canonicalize()?;
        let layout = Layout {
            logs: data.join("logs"),
            run: data.join("run"),
            repo,
            data,
        };
        for dir in [
            layout.data.join("nats"),
            layout.data.join("objects"),
            layout.logs.clone(),
            layout.run.clone(),
        ] {
            std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        Ok(layout)
    }
}

/// The repository the entry point runs from (scripts/dev execs the launcher there), else the
/// one the launcher was built from (`cargo xtask` from a folder below), made the current
/// folder: its configuration files (nats.conf, ...) are there.
pub fn repo() -> Result<PathBuf> {
    let here = std::env::current_dir()?;
    let repo = if here.join("nats.conf").exists() {
        here
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    };
    let repo = repo.canonicalize()?;
    std::env::set_current_dir(&repo)?;
    Ok(repo)
}

/// A new folder /tmp/`prefix`.XXXXXXXXXXXX, mode 755 (so that the Postgres cluster's owner,
/// when it is not us, may enter it).
pub fn temp_dir(prefix: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("{prefix}.{}", secrets::random_hex(6)?));
    std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// A variable of the launcher's environment, unless unset or empty.
fn non_empty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The programs to run: those in `VERSUS_BIN_DIR`, or else beside the launcher (the build the
/// entry point made), and the nats-server of `NATS_SERVER_BIN` or on PATH.
fn binaries() -> Result<Binaries> {
    let dir = match non_empty("VERSUS_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_exe()?
            .parent()
            .context("the launcher lives in a folder")?
            .to_path_buf(),
    };
    for bin in ["versus-api", "versus-worker", "versus-sim"] {
        if !dir.join(bin).is_file() {
            bail!(
                "{}/{bin} is missing (build it, or point VERSUS_BIN_DIR elsewhere)",
                dir.display()
            );
        }
    }
    let nats_server = match non_empty("NATS_SERVER_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join("nats-server"))
            .find(|path| path.is_file())
            .context(
                "nats-server is missing: run scripts/dev (it installs it), or set NATS_SERVER_BIN",
            )?,
    };
    Ok(Binaries { dir, nats_server })
}

/// What every program gets: plain logs (tracing writes colour codes unless told not to), at
/// `RUST_LOG` (info unless set).
fn export_common(sup: &mut Supervisor) {
    let rust_log = non_empty("RUST_LOG").unwrap_or_else(|| "info".to_owned());
    sup.export("RUST_LOG", &rust_log);
    sup.export("NO_COLOR", "1");
}

/// With neither `OPENAI_API_KEY` nor `OPENAI_BASE_URL` set, starts the simulator `sim` and
/// points the programs at it; returns its URL if it did.
async fn start_sim_unless_upstream(sup: &mut Supervisor, sim: Process) -> Result<Option<String>> {
    if non_empty("OPENAI_API_KEY").is_some() || non_empty("OPENAI_BASE_URL").is_some() {
        return Ok(None);
    }
    let addr = sim
        .env
        .iter()
        .find(|(k, _)| k == "VERSUS_SIM_ADDR")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    say(&format!("starting versus-sim on {addr}"));
    sup.start(sim)?;
    let url = sup.wait_listening("sim", 60).await?;
    // A restart binds the same port (which matters when VERSUS_SIM_ADDR asked for any).
    sup.set_env("sim", "VERSUS_SIM_ADDR", url.trim_start_matches("http://"))?;
    sup.export("OPENAI_BASE_URL", &format!("{url}/v1"));
    sup.export("OPENAI_API_KEY", "sim");
    Ok(Some(url))
}

/// The upstream the workers call, for the summary.
fn upstream(sim_url: Option<&str>) -> String {
    match (sim_url, non_empty("OPENAI_BASE_URL")) {
        (Some(url), _) => format!("{url}/v1"),
        (None, Some(url)) => url,
        (None, None) => "https://api.openai.com/v1".to_owned(),
    }
}

/// The admin routes need a token of at least 32 characters: one kept per data folder unless
/// the caller brings their own `VERSUS_ADMIN_TOKEN`. The token, and a line saying where it is.
fn admin_token(data: &Path) -> Result<(String, String)> {
    if let Some(token) = non_empty("VERSUS_ADMIN_TOKEN") {
        return Ok((token, "VERSUS_ADMIN_TOKEN as you set it".to_owned()));
    }
    let token = secrets::admin_token(data)?;
    let note = format!(
        "export VERSUS_ADMIN_TOKEN=$(cat {}/admin-token)   (for the versus CLI)",
        data.display()
    );
    Ok((token, note))
}

/// What the workers and the APIs of the data folder `data` are wired with: the NATS
/// `passwords`, the Postgres roles of `started`, the folder's picture store and admin token;
/// and a line saying where that token is.
fn wiring(
    data: &Path,
    passwords: Vec<(String, String)>,
    started: &pg::Started,
) -> Result<(Wiring, String)> {
    let (admin_token, admin_note) = admin_token(data)?;
    let wiring = Wiring {
        passwords,
        worker_database_url: started.worker_database_url.clone(),
        api_database_url: started.api_database_url.clone(),
        object_store: object_store(data),
        admin_token,
    };
    Ok((wiring, admin_note))
}

/// Starts `workers`: the first alone, since the first worker of a system declares its streams
/// and buckets, then the others together. Their URLs, in order.
async fn start_workers(sup: &mut Supervisor, workers: Vec<Process>) -> Result<Vec<String>> {
    let names: Vec<String> = workers.iter().map(|w| w.name.clone()).collect();
    let mut urls = Vec::with_capacity(names.len());
    for (i, worker) in workers.into_iter().enumerate() {
        sup.start(worker)?;
        if i == 0 {
            urls.push(sup.wait_listening(&names[0], 60).await?);
        }
    }
    for name in names.iter().skip(1) {
        urls.push(sup.wait_listening(name, 60).await?);
    }
    Ok(urls)
}

/// Where the programs store and serve the pictures.
fn object_store(data: &Path) -> String {
    non_empty("VERSUS_OBJECT_STORE")
        .unwrap_or_else(|| format!("file://{}", data.join("objects").display()))
}

/// Waits up to 30 s for the API `name` to answer 200 on `url`/readyz (warns if it does not;
/// fails if it exits). `what` names it in messages.
async fn wait_api_ready(sup: &mut Supervisor, name: &str, url: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if probe::http_get(&format!("{url}/readyz"))
            .await
            .is_some_and(|(status, _)| status == 200)
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            warn(&format!(
                "{what} listens, but /readyz has not answered 200 within 30 s (log: {})",
                sup.log(name).display()
            ));
            return Ok(());
        }
        if !sup.running(name) {
            bail!("{what} exited (log: {})", sup.log(name).display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Says loudly that answers come from the simulator.
fn sim_banner(label: &str) {
    let real = format!("For real answers:  OPENAI_API_KEY=sk-... {label}");
    eprintln!(
        "
  +-----------------------------------------------------------------------+
  |                                                                       |
  |   NO OPENAI_API_KEY: ANSWERS COME FROM THE SIMULATOR (versus-sim),    |
  |   NOT FROM A REAL MODEL: every fight is simulated filler text.        |
  |                                                                       |
  |   {real:<69}|
  |                                                                       |
  +-----------------------------------------------------------------------+"
    );
}
