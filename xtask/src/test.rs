//! `test` (scripts/test, once it has installed the tools): a throwaway Postgres cluster for the
//! run, then `cargo fmt --check`, clippy, the build and `cargo test`, stopping at the first step
//! that fails; the cluster is stopped on every way out, a signal's too.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::out::{error, section};
use crate::pg;
use crate::supervisor::{Signals, Stop, status_code};

/// The variable that names the test cluster for the tests (a superuser URL).
const DATABASE_URL_VAR: &str = "VERSUS_TEST_DATABASE_URL";
/// How long a cargo step may take to end after the signal that stops the run is passed on.
const CHILD_STOP: Duration = Duration::from_secs(10);

/// Runs the checks, `args` going to `cargo test`; returns the exit status: the first failing
/// step's, or 130, 143, 129 after Ctrl-C, SIGTERM, SIGHUP.
pub async fn run(args: Vec<String>) -> i32 {
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(e) => {
            error(&format!("{e:#}"));
            return 1;
        }
    };
    let repo = match crate::repo() {
        Ok(repo) => repo,
        Err(e) => {
            error(&format!("{e:#}"));
            return 1;
        }
    };
    let mut cluster = Cluster::default();
    let status = match checks(&repo, &args, &mut cluster, &mut signals).await {
        Ok(status) => status,
        Err(e) => {
            error(&format!("{e:#}"));
            1
        }
    };
    cluster.remove().await;
    status
}

/// The variable that names the run's scratch folder, where the test kit makes its temporary
/// folders (its own Postgres servers' among them), so that what a test leaves behind when it
/// is killed (a signal runs no `Drop`) is found and stopped at the run's end.
pub const SCRATCH_VAR: &str = "VERSUS_TEST_SCRATCH";

/// The run's Postgres cluster, once it may be running, the scratch folder the tests are given,
/// and the temporary folder that holds both when they are not under the repo's `target`.
#[derive(Default)]
struct Cluster {
    dir: Option<PathBuf>,
    scratch: Option<PathBuf>,
    tmp: Option<PathBuf>,
}

impl Cluster {
    /// Stops the server (at once: its data is thrown away) and whatever Postgres server a test
    /// left in the scratch folder, and removes the scratch and temporary folders.
    async fn remove(&mut self) {
        if let Some(scratch) = self.scratch.take() {
            sweep(&scratch).await;
        }
        if let Some(dir) = self.dir.take() {
            pg::stop(&dir, "immediate").await;
        }
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_dir_all(tmp);
        }
    }
}

/// Stops every Postgres server whose data folder is two levels under `scratch` (a test kit
/// folder, then the cluster's: `versus-pg-…/data`), then removes `scratch`.
async fn sweep(scratch: &Path) {
    let folders = std::fs::read_dir(scratch).into_iter().flatten().flatten();
    for folder in folders {
        let inner = std::fs::read_dir(folder.path())
            .into_iter()
            .flatten()
            .flatten();
        for data in inner {
            if data.path().join("postmaster.pid").exists() {
                pg::stop(&data.path(), "immediate").await;
            }
        }
    }
    let _ = std::fs::remove_dir_all(scratch);
}

/// The cluster, then the cargo steps; the exit status.
async fn checks(
    repo: &Path,
    args: &[String],
    cluster: &mut Cluster,
    signals: &mut Signals,
) -> Result<i32> {
    section("postgres (throwaway cluster)");
    // Postgres' programs go on to the end (a signal meanwhile is handled once they have), so
    // that no server starts after the cluster was stopped.
    let url = {
        let start = start_postgres(repo, cluster);
        tokio::pin!(start);
        tokio::select! {
            url = &mut start => url?,
            stop = signals.next() => {
                let _ = start.await;
                return Ok(stop.status());
            }
        }
    };
    eprintln!("{DATABASE_URL_VAR}={url}");
    eprintln!(
        "NATS_SERVER_BIN={}",
        std::env::var("NATS_SERVER_BIN").unwrap_or_default()
    );

    let mut steps: Vec<Vec<String>> = Vec::new();
    if crate::non_empty("VERSUS_TEST_QUICK").is_none() {
        steps.push(words(&["fmt", "--all", "--", "--check"]));
        steps.push(words(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]));
    }
    steps.push(words(&["build", "--workspace", "--bins"]));
    steps.push(test_args(args));
    for step in steps {
        section(&format!("cargo {}", step.join(" ")));
        let mut cargo = Command::new("cargo");
        cargo.args(&step).env(DATABASE_URL_VAR, &url);
        if let Some(scratch) = &cluster.scratch {
            cargo.env(SCRATCH_VAR, scratch);
        }
        let status = run_child(cargo, signals).await?;
        if status != 0 {
            return Ok(status);
        }
    }
    Ok(0)
}

fn words(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

/// `cargo test`'s arguments: `--no-fail-fast`, `--workspace` unless the caller's arguments
/// choose packages (before a `--`, after which they are the tests'), then theirs.
fn test_args(args: &[String]) -> Vec<String> {
    let chooses_packages = args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--package" || a.starts_with("-p") || a.starts_with("--package="));
    let mut all = words(&["test", "--no-fail-fast"]);
    if !chooses_packages {
        all.push("--workspace".to_owned());
    }
    all.extend(args.iter().cloned());
    all
}

/// A fresh cluster for the run, on a free port: in `target/test-pg` (or `VERSUS_TEST_PG_DIR`)
/// unless the cluster owner (the postgres user, when we are root) cannot reach into the repo,
/// e.g. a clone under a folder only root may enter: then in a temporary folder under /tmp.
/// Returns the superuser's URL; `cluster` holds what to stop and remove.
async fn start_postgres(repo: &Path, cluster: &mut Cluster) -> Result<String> {
    let target = repo.join("target");
    std::fs::create_dir_all(&target).with_context(|| format!("mkdir {}", target.display()))?;
    let dir = if pg::usable(&target).await {
        let dir = match crate::non_empty("VERSUS_TEST_PG_DIR") {
            Some(dir) => std::path::absolute(dir)?,
            None => target.join("test-pg"),
        };
        // A run that was killed may have left its server running.
        pg::stop(&dir, "immediate").await;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("rm -r {}", dir.display()))?;
        }
        dir
    } else {
        let tmp = crate::temp_dir("versus-test-pg")?;
        cluster.tmp = Some(tmp.clone());
        let dir = tmp.join("data");
        eprintln!(
            "the postgres user cannot enter {}: using {}",
            target.display(),
            dir.display()
        );
        dir
    };
    let mut log = dir.clone().into_os_string();
    log.push(".log");
    let log = PathBuf::from(log);
    let _ = std::fs::remove_file(&log);
    cluster.dir = Some(dir.clone());
    // Beside the cluster, where its owner may enter too; emptied of what a killed run left.
    let mut scratch = dir.clone().into_os_string();
    scratch.push("-scratch");
    let scratch = PathBuf::from(scratch);
    sweep(&scratch).await;
    std::fs::create_dir_all(&scratch).with_context(|| format!("mkdir {}", scratch.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o755))?;
    }
    cluster.scratch = Some(scratch);

    // Durability off for speed (the data is thrown away); pg::MAX_CONNECTIONS, since every
    // test starts workers with pools of their own.
    pg::init(&dir, pg::THROWAWAY_CONF).await?;
    let port = pg::start_on_free_port(&dir, &log, pg::MAX_CONNECTIONS).await?;
    Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
}

/// Runs `cmd` to its end; its exit status (128 + the signal that ended it). It runs in a
/// process group of its own with what it starts (rustc, the test binaries): a signal to us
/// is passed on to that group, which gets [`CHILD_STOP`] to end before it is killed; the
/// status is then the signal's (130, 143, 129).
async fn run_child(mut cmd: Command, signals: &mut Signals) -> Result<i32> {
    let mut child = cmd
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .context("run cargo")?;
    let group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw)
        .context("a new process has a pid")?;
    let stop = tokio::select! {
        status = child.wait() => return Ok(status_code(status.context("wait for cargo")?)),
        stop = signals.next() => stop,
    };
    let _ = signal::killpg(group, forwarded(stop));
    tokio::select! {
        _ = child.wait() => {}
        () = tokio::time::sleep(CHILD_STOP) => {}
        _ = signals.next() => {}
    }
    kill_group(group, &mut child).await;
    Ok(stop.status())
}

/// SIGKILL to what is left of the group, and its leader reaped.
async fn kill_group(group: Pid, child: &mut Child) {
    let _ = signal::killpg(group, Signal::SIGKILL);
    let _ = child.wait().await;
}

fn forwarded(stop: Stop) -> Signal {
    match stop {
        Stop::Interrupt => Signal::SIGINT,
        Stop::Terminate => Signal::SIGTERM,
        Stop::HangUp => Signal::SIGHUP,
    }
}

#[cfg(test)]
mod tests {
    use super::{test_args, words};

    #[test]
    fn cargo_test_runs_the_workspace_unless_the_caller_chooses_packages() {
        assert_eq!(
            test_args(&[]),
            words(&["test", "--no-fail-fast", "--workspace"])
        );
        assert_eq!(
            test_args(&words(&["--", "-p"])),
            words(&["test", "--no-fail-fast", "--workspace", "--", "-p"])
        );
        for chosen in [
            &["-p", "versus-xtask"][..],
            &["-pversus-xtask"],
            &["--package", "versus-xtask"],
            &["--package=versus-xtask"],
            &["--test", "e2e", "-p", "versus-testkit", "--", "x"],
        ] {
            let mut expected = words(&["test", "--no-fail-fast"]);
            expected.extend(words(chosen));
            assert_eq!(test_args(&words(chosen)), expected, "{chosen:?}");
        }
    }
}
