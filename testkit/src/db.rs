//! A fresh Postgres database per test, on the server of `VERSUS_TEST_DATABASE_URL`, or on a
//! Postgres server of its own that the test may stop and start again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection};
use tokio::process::Command;
use tokio::sync::OnceCell;
use versus_xtask::pg;

use crate::TempDir;

/// The variable that names the test Postgres server (a superuser URL); `scripts/test` sets it.
pub const DATABASE_URL_VAR: &str = "VERSUS_TEST_DATABASE_URL";

/// A new, empty database `versus_test_<uuid>`. It is not dropped afterwards: the test cluster
/// is thrown away whole at the end of a `scripts/test` run. (One made by
/// [`Database::on_own_server`] goes with its server when dropped.)
pub struct Database {
    /// The database's URL, for `DATABASE_URL`.
    pub url: String,
    /// The database's name.
    pub name: String,
    pool: OnceCell<PgPool>,
    /// The server of its own, for [`Database::on_own_server`]; stopped and removed on drop.
    server: Option<Server>,
}

/// Creates database `name` through `admin_url`; `context` says more when that fails.
async fn create_database(admin_url: &str, name: &str, context: impl Fn() -> String) {
    let mut conn = PgConnection::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("connect to {admin_url}: {e}\n{}", context()));
    // The name is ours (a prefix and hex digits), so formatting it into SQL is safe.
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("create database {name}: {e}"));
    let _ = conn.close().await;
}

impl Database {
    /// Creates the database. Panics if `VERSUS_TEST_DATABASE_URL` is unset or the server
    /// cannot be reached.
    pub async fn fresh() -> Database {
        let admin_url = std::env::var(DATABASE_URL_VAR).unwrap_or_else(|_| {
            panic!(
                "{DATABASE_URL_VAR} is not set: run scripts/test, which starts a throwaway \
                 Postgres and sets it (or point it at a Postgres superuser URL, e.g. \
                 postgres://postgres@127.0.0.1:5432/postgres)"
            )
        });
        let name = format!("versus_test_{}", uuid::Uuid::new_v4().simple());
        create_database(&admin_url, &name, || format!("({DATABASE_URL_VAR})")).await;
        Database {
            url: with_database(&admin_url, &name),
            name,
            pool: OnceCell::new(),
            server: None,
        }
    }

    /// A new database on a Postgres server of this database's own (initdb into a temporary
    /// folder, on a free port), so that a test can stop and start it
    /// ([`Database::stop_server`], [`Database::start_server`]) without touching the server
    /// every other test shares. The server is stopped and its folder removed on drop.
    ///
    /// Needs the PostgreSQL server programs that `scripts/test` installs (found under
    /// `/usr/lib/postgresql/$VERSUS_PG_MAJOR/bin`, else the newest version there, else on
    /// `PATH`); when run as root, the server runs as the `postgres` user, as `scripts/test`'s
    /// does.
    pub async fn on_own_server() -> Database {
        let server = Server::start().await;
        let name = "versus".to_owned();
        let admin_url = server.url("postgres");
        create_database(&admin_url, &name, || server.log_tail()).await;
        Database {
            url: server.url(&name),
            name,
            pool: OnceCell::new(),
            server: Some(server),
        }
    }

    /// Stops this database's own server (`pg_ctl stop -m fast`: sessions are ended, then
    /// the server stops listening): an outage, until [`Database::start_server`]. Panics for
    /// a database made by [`Database::fresh`].
    pub async fn stop_server(&self) {
        self.own_server().stop().await;
    }

    /// Starts this database's own server again, on the same port, and waits until it
    /// accepts connections.
    pub async fn start_server(&self) {
        self.own_server().start_again().await;
    }

    /// Freezes this database's own server (SIGSTOP to the postmaster and every backend it
    /// forked): connections stay open but nothing answers, until [`Database::resume_server`].
    pub fn pause_server(&self) {
        self.own_server()
            .signal_all(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`Database::pause_server`].
    pub fn resume_server(&self) {
        self.own_server()
            .signal_all(nix::sys::signal::Signal::SIGCONT);
    }

    fn own_server(&self) -> &Server {
        self.server
            .as_ref()
            .expect("only a database made by Database::on_own_server has a server to stop")
    }

    /// This database's URL with `role` for its user and no password (`versus_api`,
    /// `versus_worker`: the roles the migrations make). The test servers trust every login
    /// from 127.0.0.1, so the roles need none.
    pub fn url_as(&self, role: &str) -> String {
        with_user(&self.url, role)
    }

    /// Runs the migrations as the superuser, as an operator runs them as the owner before
    /// starting the programs.
    pub async fn migrate(&self) {
        versus_shared::db::migrate_all(&self.pool().await)
            .await
            .unwrap_or_else(|e| panic!("migrate {}: {e:#}", self.name));
    }

    /// A small pool on this database, for assertions (made on first use, then shared).
    pub async fn pool(&self) -> PgPool {
        self.pool
            .get_or_init(|| async {
                PgPoolOptions::new()
                    .max_connections(4)
                    .connect(&self.url)
                    .await
                    .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url))
            })
            .await
            .clone()
    }
}

/// The connections a server of a database's own takes (Postgres' default: a test on it runs
/// one system, not the many that share `scripts/test`'s cluster).
const MAX_CONNECTIONS: u32 = 100;
/// Attempts at starting the server again on its port (the old server's may take a moment to be
/// released).
const PORT_ATTEMPTS: usize = 3;

/// A throwaway Postgres cluster in a temporary folder, made, started and stopped by the
/// launcher's `pg` module (`versus_xtask::pg`, as `scripts/test`'s cluster is): as the
/// cluster owner, the `postgres` user when the tests run as root.
struct Server {
    port: u16,
    data: PathBuf,
    log: PathBuf,
    // Last: removed once the server is stopped.
    dir: TempDir,
}

impl Server {
    async fn start() -> Server {
        if !pg::bin_dir().join("pg_ctl").is_file() {
            panic!(
                "the PostgreSQL server programs (initdb, pg_ctl) were not found in {}: run \
                 scripts/test, which installs them, or set VERSUS_PG_MAJOR",
                pg::bin_dir().display()
            );
        }
        let dir = TempDir::new("versus-pg");
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");
        if pg::is_root() {
            // The server refuses to run as root: the folder goes to the postgres user, who
            // must enter it (whatever the umask made of it) to reach the data and the log.
            run(Command::new("chown").arg("postgres:").arg(dir.path())).await;
        }
        // Durability off: the data is thrown away.
        pg::init(&data, pg::THROWAWAY_CONF)
            .await
            .unwrap_or_else(|e| panic!("{e:#} (in {})", dir.path().display()));
        let port = match pg::start_on_free_port(&data, &log, MAX_CONNECTIONS).await {
            Ok(port) => port,
            Err(e) => panic!("{e:#}:\n{}", log_tail(&log)),
        };
        Server {
            port,
            data,
            log,
            dir,
        }
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    async fn stop(&self) {
        if let Err(e) = pg::stop_checked(&self.data, "fast").await {
            panic!("{e:#}; the server's log:\n{}", self.log_tail());
        }
    }

    async fn start_again(&self) {
        for _ in 0..PORT_ATTEMPTS {
            if pg::start(&self.data, self.port, &self.log, MAX_CONNECTIONS).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "Postgres did not start again on port {} (in {}):\n{}",
            self.port,
            self.dir.path().display(),
            self.log_tail()
        );
    }

    /// Sends `signal` to the postmaster (its pid is the first line of `postmaster.pid`), then
    /// to every process whose parent it is (its backends and helpers).
    fn signal_all(&self, signal: nix::sys::signal::Signal) {
        let pid_file = self.data.join("postmaster.pid");
        let postmaster: i32 = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no postmaster pid in {}", pid_file.display()));
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            // `pid (comm) state ppid …`: the command may hold spaces and parentheses.
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        for pid in pids {
            // A backend that exited in between is no matter.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// The last lines of the server's log.
    fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

/// The last lines of the server's log `log`.
fn log_tail(log: &Path) -> String {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Drop for Server {
    fn drop(&mut self) {
        // Synchronously, before the folder goes; an immediate stop is quick.
        pg::stop_now(&self.data);
    }
}

/// Runs `command` to its end; panics with its output unless it succeeds.
async fn run(command: &mut Command) {
    let output = command
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `url` with its database (the path) replaced by `name`; the query string is kept.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

/// `url` with its user (and password) replaced by `user`.
fn with_user(url: &str, user: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[authority_start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| authority_start + i);
    let host = match url[authority_start..authority_end].rsplit_once('@') {
        Some((_, host)) => host,
        None => &url[authority_start..authority_end],
    };
    format!(
        "{}{user}@{host}{}",
        &url[..authority_start],
        &url[authority_end..]
    )
}

#[cfg(test)]
mod tests {
    use super::{with_database, with_user};

    #[test]
    fn replaces_the_user_of_a_url() {
        assert_eq!(
            with_user("postgres://postgres@127.0.0.1:5433/x", "versus_api"),
            "postgres://versus_api@127.0.0.1:5433/x"
        );
        assert_eq!(
            with_user("postgres://u:p@h:1/x?sslmode=disable", "versus_worker"),
            "postgres://versus_worker@h:1/x?sslmode=disable"
        );
        assert_eq!(with_user("postgres://h:1/x", "r"), "postgres://r@h:1/x");
    }

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5433/postgres", "x"),
            "postgres://postgres@127.0.0.1:5433/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/db?sslmode=disable", "x"),
            "postgres://u:p@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "x"), "postgres://h:1/x");
    }
}
