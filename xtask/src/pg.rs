//! Postgres clusters of our own, on 127.0.0.1: the data folder's for `dev` and `cluster` (made
//! on the first run, kept), the benchmark's and the tests' (thrown away). Every cluster has
//! superuser `postgres`, trust authentication and TCP on 127.0.0.1 only, and runs as the
//! cluster owner: the `postgres` user when we run as root (Postgres refuses to run as root),
//! else the developer themself. The launcher, `scripts/test`'s run and the test kit's own
//! servers all start and stop clusters through this module. The Postgres server itself comes
//! from scripts/lib.sh's installer (`ensure_postgres_server`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::out::{say, warn};
use crate::probe::{port_in_use, tail};

/// Settings a throwaway cluster adds to its postgresql.conf: its data is thrown away, so
/// durability is off, for speed.
pub const THROWAWAY_CONF: &str = "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n";

/// The server's programs: `/usr/lib/postgresql/$VERSUS_PG_MAJOR/bin` when it is set (as
/// `scripts/lib.sh` reads it), else the newest `/usr/lib/postgresql/*/bin`, else the folder of
/// `pg_ctl` on `PATH` (or 15's, which the installer puts there).
pub fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    if let Some(major) = std::env::var("VERSUS_PG_MAJOR")
        .ok()
        .filter(|m| !m.is_empty())
    {
        return root.join(major).join("bin");
    }
    let newest = std::fs::read_dir(root).ok().and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let major: u32 = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("pg_ctl").is_file().then_some((major, bin))
            })
            .max_by_key(|(major, _)| *major)
            .map(|(_, bin)| bin)
    });
    newest
        .or_else(|| {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path).find(|dir| dir.join("pg_ctl").is_file())
        })
        .unwrap_or_else(|| root.join("15").join("bin"))
}

/// Whether we run as root (the owner of our own /proc entry).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `program` run as the cluster owner.
fn as_pg(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

async fn quiet(mut cmd: Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Whether the cluster owner can reach `dir` (every folder above it must be searchable by
/// that user; a data folder under a root-only folder is not).
pub async fn usable(dir: &Path) -> bool {
    let mut cmd = as_pg("test");
    cmd.arg("-x").arg(dir);
    quiet(cmd).await
}

async fn chown_to_owner(path: &Path) -> Result<()> {
    if is_root() {
        let mut cmd = Command::new("chown");
        cmd.arg("postgres:").arg(path);
        if !quiet(cmd).await {
            bail!("chown postgres: {}", path.display());
        }
    }
    Ok(())
}

/// A new cluster in `dir`, with `conf` (lines of settings, or nothing) added to its
/// postgresql.conf.
pub async fn init(dir: &Path, conf: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    chown_to_owner(dir).await?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let mut initdb = as_pg(bin_dir().join("initdb"));
    initdb
        .arg("-D")
        .arg(dir)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ])
        .stdout(Stdio::null());
    if !initdb.status().await.is_ok_and(|s| s.success()) {
        bail!("initdb {} failed", dir.display());
    }
    // No Unix socket, whose directory may not exist and whose path length is limited.
    let mut tee = as_pg("tee");
    tee.arg("-a")
        .arg(dir.join("postgresql.conf"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = tee.spawn().context("run tee")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(
                format!(
                    "\n# Added by xtask/src/pg.rs.\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n{conf}"
                )
                .as_bytes(),
            )
            .await?;
    }
    if !child.wait().await.is_ok_and(|s| s.success()) {
        bail!("could not write {}/postgresql.conf", dir.display());
    }
    Ok(())
}

/// Each worker's pool holds up to VERSUS_WORKER_CONCURRENCY + 4 connections (132 by default)
/// and each API 4: Postgres' default of 100 would turn a busy pair of workers' waits into
/// "too many clients" and failed jobs.
pub const MAX_CONNECTIONS: u32 = 600;

/// Starts the cluster in `dir` on `port`, its log in `log`, and waits until it accepts queries
/// (whether it did: the reason it did not is in `log`).
pub async fn start(dir: &Path, port: u16, log: &Path, max_connections: u32) -> bool {
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log);
    if chown_to_owner(log).await.is_err() {
        return false;
    }
    let mut cmd = as_pg(bin_dir().join("pg_ctl"));
    cmd.arg("-D")
        .arg(dir)
        .arg("-l")
        .arg(log)
        .args(["-w", "-t", "60", "-o"])
        .arg(format!("-p {port} -c max_connections={max_connections}"))
        .arg("start");
    quiet(cmd).await
}

/// Stops the cluster in `dir` if it runs (`mode`: fast, or immediate).
pub async fn stop(dir: &Path, mode: &str) {
    if dir.join("postmaster.pid").exists() {
        let _ = stop_checked(dir, mode).await;
    }
}

/// Stops the cluster in `dir` (`mode`: fast, or immediate) and waits until it has; fails, with
/// what `pg_ctl` said, if it did not (a server that was not running included).
pub async fn stop_checked(dir: &Path, mode: &str) -> Result<()> {
    let mut cmd = as_pg(bin_dir().join("pg_ctl"));
    let out = cmd
        .arg("-D")
        .arg(dir)
        .args(["-m", mode, "-w", "stop"])
        .stdin(Stdio::null())
        .output()
        .await
        .context("run pg_ctl stop")?;
    if !out.status.success() {
        bail!(
            "pg_ctl stop {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Stops the cluster in `dir` at once (`-m immediate`), blocking: for a `Drop`.
pub fn stop_now(dir: &Path) {
    let pg_ctl = bin_dir().join("pg_ctl");
    let mut cmd = if is_root() {
        let mut cmd = std::process::Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(pg_ctl);
        cmd
    } else {
        std::process::Command::new(pg_ctl)
    };
    let _ = cmd
        .arg("-D")
        .arg(dir)
        .args(["-m", "immediate", "-w", "stop"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Starts the cluster in `dir` on a free port, trying another if one is taken in between (by
/// another program); returns the port.
pub async fn start_on_free_port(dir: &Path, log: &Path, max_connections: u32) -> Result<u16> {
    const ATTEMPTS: usize = 3;
    for _ in 0..ATTEMPTS {
        let port = crate::probe::free_port()?;
        if start(dir, port, log, max_connections).await {
            return Ok(port);
        }
    }
    eprintln!("{}", tail(log, 20));
    bail!(
        "Postgres did not start in {} (log: {})",
        dir.display(),
        log.display()
    )
}

/// psql as the superuser `postgres` at `port`, with `args`; its output.
pub async fn psql(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new(bin_dir().join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["-U", "postgres"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("run psql")?;
    if !out.status.success() {
        bail!(
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where the cluster of the data folder `data` lives: `data`/pg, or, when the postgres user
/// cannot enter `data`, a folder under /var/tmp (still kept across runs; named after the repo
/// for the default data folder of `dev`, `repo`/.data, as it always was, else after `data`).
async fn dir_of(data: &Path, repo: &Path) -> Result<PathBuf> {
    if usable(data).await {
        return Ok(data.join("pg"));
    }
    let owner = if data == repo.join(".data") {
        repo
    } else {
        data
    };
    // md5sum of the path and a newline, as `echo "$owner" | md5sum` hashed it.
    let mut md5 = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("run md5sum")?;
    if let Some(mut stdin) = md5.stdin.take() {
        stdin
            .write_all(format!("{}\n", owner.display()).as_bytes())
            .await?;
    }
    let out = md5.wait_with_output().await?;
    let hash: String = String::from_utf8_lossy(&out.stdout)
        .chars()
        .take(8)
        .collect();
    let parent = PathBuf::from(format!("/var/tmp/versus-dev-{hash}"));
    std::fs::create_dir_all(&parent)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755))?;
    }
    let dir = parent.join("pg");
    warn(&format!(
        "the postgres user cannot enter {}: keeping the dev database in {}",
        data.display(),
        dir.display()
    ));
    Ok(dir)
}

/// A running cluster, migrated: its port, the superuser's URL, and the roles' the programs
/// connect as.
pub struct Started {
    pub port: u16,
    pub database_url: String,
    pub api_database_url: String,
    pub worker_database_url: String,
}

/// Starts the cluster of `data` (made on the first run) on `port`, creates the database
/// `versus` unless it is there, and migrates it with `worker` ([`migrate_as_owner`], its
/// output in `logs/migrate.log`). `started` is called with the folder once the server runs,
/// so that it is stopped even if what follows fails.
pub async fn start_dev(
    data: &Path,
    repo: &Path,
    port: u16,
    logs: &Path,
    worker: &Path,
    started: impl FnOnce(PathBuf),
) -> Result<Started> {
    let dir = dir_of(data, repo).await?;
    if !dir.join("PG_VERSION").exists() {
        say(&format!(
            "creating the Postgres cluster in {}",
            dir.display()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        init(&dir, "").await?;
    }
    // A server left running by an earlier run may be on another port: restart it on ours.
    stop(&dir, "fast").await;
    if port_in_use(port).await {
        bail!("port {port} is taken: set VERSUS_PG_PORT to another port");
    }
    say(&format!("starting Postgres on 127.0.0.1:{port}"));
    let log = logs.join("postgres.log");
    if !start(&dir, port, &log, MAX_CONNECTIONS).await {
        eprintln!("{}", tail(&log, 20));
        bail!("Postgres did not start (log: {})", log.display());
    }
    started(dir);
    create_and_migrate(port, logs, worker).await
}

/// A throwaway cluster in `dir` (whatever was there is removed first), with Postgres' own
/// durable defaults, on a free port, its database `versus` migrated as [`start_dev`] does.
pub async fn start_fresh(
    dir: &Path,
    logs: &Path,
    worker: &Path,
    started: impl FnOnce(PathBuf),
) -> Result<Started> {
    stop(dir, "immediate").await;
    let _ = std::fs::remove_dir_all(dir);
    init(dir, "").await?;
    let port = start_on_free_port(dir, &logs.join("postgres.log"), MAX_CONNECTIONS).await?;
    started(dir.to_owned());
    create_and_migrate(port, logs, worker).await
}

/// Creates the database `versus` at `port` unless it is there, and migrates it with `worker`
/// ([`migrate_as_owner`], its output in `logs/migrate.log`).
async fn create_and_migrate(port: u16, logs: &Path, worker: &Path) -> Result<Started> {
    let exists = psql(
        port,
        &[
            "-d",
            "postgres",
            "-tAc",
            "SELECT 1 FROM pg_database WHERE datname = 'versus'",
        ],
    )
    .await?;
    if exists.trim().is_empty() {
        psql(port, &["-d", "postgres", "-c", "CREATE DATABASE versus"]).await?;
    }
    let database_url = format!("postgres://postgres@127.0.0.1:{port}/versus");
    let (api_database_url, worker_database_url) =
        migrate_as_owner(worker, &database_url, port, &logs.join("migrate.log")).await?;
    Ok(Started {
        port,
        database_url,
        api_database_url,
        worker_database_url,
    })
}

/// Runs the migrations on the database `versus` at `port` as its owner (`database_url`, the
/// superuser) with `versus-worker --migrate-only`, its output in `log`; returns the URLs of the
/// roles the migrations make, which the programs connect as (the API's, the workers'). The
/// cluster trusts logins from 127.0.0.1, so the roles need no password.
async fn migrate_as_owner(
    worker: &Path,
    database_url: &str,
    port: u16,
    log: &Path,
) -> Result<(String, String)> {
    say("running the migrations as the owner (versus-worker --migrate-only)");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let status = Command::new(worker)
        .arg("--migrate-only")
        .env("DATABASE_URL", database_url)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .await
        .context("run versus-worker --migrate-only")?;
    if !status.success() {
        eprintln!("{}", tail(log, 20));
        bail!("the migrations failed (log: {})", log.display());
    }
    Ok((
        format!("postgres://versus_api@127.0.0.1:{port}/versus"),
        format!("postgres://versus_worker@127.0.0.1:{port}/versus"),
    ))
}
