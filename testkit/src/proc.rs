//! A Versus binary run as a child process: started with its environment, ready once it prints
//! `listening on http://IP:PORT` (after `ops listening on http://IP:PORT` when it serves its
//! operator's routes apart), its output echoed to the test's stderr.

use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::resource::{Resource, getrlimit};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::bin_path;

/// How long a binary may take to print its `listening on` line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Proc::terminate`] waits for a graceful exit before it gives up.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How many stderr lines to keep for failure messages.
const TAIL_LINES: usize = 80;
/// The readiness line every Versus binary prints on stdout.
const READY_PREFIX: &str = "listening on ";
/// The line the API prints first when it serves its operator's routes on `VERSUS_OPS_ADDR`.
const OPS_PREFIX: &str = "ops listening on ";
/// How long [`Proc::until_ready`] waits for `/readyz` to answer 200.
const READYZ_TIMEOUT: Duration = Duration::from_secs(30);

/// Variables of the test's own environment that must not leak into a child: the binaries'
/// settings are exactly what the test passes (a developer's real `OPENAI_API_KEY` or
/// `DATABASE_URL` must never reach a binary under test, nor an `OTEL_EXPORTER_OTLP_ENDPOINT`
/// send the tests' spans to a developer's collector).
fn is_setting(key: &str) -> bool {
    key.starts_with("VERSUS_")
        || key.starts_with("OPENAI_")
        || key.starts_with("AWS_")
        || key.starts_with("NATS_")
        || key.starts_with("OTEL_")
        || key == "DATABASE_URL"
        || key == "RUST_LOG"
}

/// A spawned Versus binary. Killed (SIGKILL) when dropped.
pub struct Proc {
    /// `http://IP:PORT` from the binary's `listening on` line.
    pub url: String,
    /// `http://IP:PORT` from the API's `ops listening on` line: where `/metrics` and the admin
    /// routes are when `VERSUS_OPS_ADDR` is set.
    pub ops_url: Option<String>,
    label: String,
    pid: u32,
    child: Child,
    exit: Option<ExitStatus>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_drain: Option<JoinHandle<()>>,
}

impl Proc {
    /// Starts the binary `name` (see [`crate::bin_path`]) with `envs` on top of a clean
    /// environment (`RUST_LOG` defaults to the test's own, else `info`), and waits up to 30 s
    /// for its `listening on http://…` line. Panics with the tail of its stderr if it exits
    /// or stays silent instead.
    pub async fn spawn(name: &str, envs: &[(&str, String)]) -> Proc {
        Proc::spawn_with_open_files(name, envs, None).await
    }

    /// Like [`Proc::spawn`], with the soft limit on open files (`RLIMIT_NOFILE`) set to
    /// `open_files` in the child before the binary runs (the hard limit stays the test's).
    /// Panics if `open_files` is above the test's hard limit.
    pub async fn spawn_with_open_files(
        name: &str,
        envs: &[(&str, String)],
        open_files: Option<u64>,
    ) -> Proc {
        let bin = bin_path(name);
        let mut cmd = match open_files {
            None => Command::new(&bin),
            Some(soft) => {
                let (_, hard) =
                    getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit(RLIMIT_NOFILE)");
                assert!(
                    soft <= hard,
                    "{name} cannot start with {soft} open files: the test's hard limit is {hard}"
                );
                // A shell sets the limit, then becomes the binary (same pid): setting it in
                // the child before exec otherwise (`pre_exec`) takes unsafe code, which the
                // workspace forbids.
                let mut cmd = Command::new("/bin/sh");
                cmd.args([
                    "-c",
                    r#"ulimit -S -n "$1" && shift && exec "$@""#,
                    "versus-limit",
                ])
                .arg(soft.to_string())
                .arg(&bin);
                cmd
            }
        };
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(is_setting) {
                cmd.env_remove(&key);
            }
        }
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
        cmd.env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .envs(envs.iter().map(|(key, value)| (*key, value.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let pid = child.id().expect("a child that was just spawned has a pid");
        let label = format!("{name} {pid}");

        let (ready_tx, mut ready_rx) = oneshot::channel();
        let ops_url = Arc::new(Mutex::new(None));
        let stdout = child.stdout.take().expect("stdout is piped");
        tokio::spawn(drain_stdout(
            stdout,
            label.clone(),
            ready_tx,
            ops_url.clone(),
        ));
        let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let stderr = child.stderr.take().expect("stderr is piped");
        let stderr_drain = tokio::spawn(drain_stderr(stderr, label.clone(), stderr_tail.clone()));

        let mut proc = Proc {
            url: String::new(),
            ops_url: None,
            label,
            pid,
            child,
            exit: None,
            stderr_tail,
            stderr_drain: Some(stderr_drain),
        };
        let timeout = tokio::time::sleep(READY_TIMEOUT);
        tokio::select! {
            url = &mut ready_rx => match url {
                Ok(url) => {
                    proc.url = url;
                    // Printed before the `listening on` line, by the same reader.
                    proc.ops_url = ops_url.lock().unwrap_or_else(|e| e.into_inner()).clone();
                }
                Err(_) => proc.fail("closed its stdout without printing `listening on http://…`").await,
            },
            status = proc.child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                proc.fail(&format!("exited ({status}) before printing `listening on http://…`")).await
            }
            () = timeout => {
                proc.fail(&format!("did not print `listening on http://…` within {READY_TIMEOUT:?}")).await
            }
        }
        proc
    }

    /// Waits (up to 30 s, else panics) until `/readyz` answers 200: for the API, until it has
    /// found the streams and buckets (it serves its probes before).
    pub async fn until_ready(&self) {
        let http = crate::http_client();
        let url = format!("{}/readyz", self.url);
        let deadline = tokio::time::Instant::now() + READYZ_TIMEOUT;
        loop {
            let status = http.get(&url).send().await.map(|r| r.status().as_u16());
            if matches!(status, Ok(200)) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{} did not answer 200 on /readyz within {READYZ_TIMEOUT:?} (last: {status:?}); \
                     stderr tail:\n{}",
                    self.label,
                    self.stderr_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The binary's name and pid, as its echoed log lines are prefixed.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The last lines the process wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The exit status, if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Sends `signal` (unless the process has exited already, so that a recycled pid is never
    /// signalled).
    pub fn signal(&mut self, signal: Signal) {
        if self.try_status().is_some() {
            return;
        }
        let pid = i32::try_from(self.pid).expect("pids fit in i32");
        if let Err(e) = signal::kill(Pid::from_raw(pid), signal) {
            // ESRCH: it exited in between, which the next wait reports.
            if e != nix::errno::Errno::ESRCH {
                panic!("send {signal} to {}: {e}", self.label);
            }
        }
    }

    /// SIGKILL, then waits for the exit: a crash, as far as the rest of the system can tell.
    pub async fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.try_status() {
            return status;
        }
        // An error means it has exited already; wait() below reports how.
        let _ = self.child.start_kill();
        self.wait_exit(TERMINATE_TIMEOUT).await
    }

    /// Sends SIGKILL without waiting for the exit.
    pub fn start_kill(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.start_kill();
        }
    }

    /// SIGTERM, then waits (up to 60 s, else panics) for a graceful exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(TERMINATE_TIMEOUT).await
    }

    /// SIGSTOP: the process freezes (holds its sockets, does no work) until [`Proc::resume`].
    pub fn pause(&mut self) {
        self.signal(Signal::SIGSTOP);
    }

    /// SIGCONT after [`Proc::pause`].
    pub fn resume(&mut self) {
        self.signal(Signal::SIGCONT);
    }

    /// Waits for the process to exit; panics (and kills it) after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exit = Some(status);
                self.finish_stderr().await;
                status
            }
            Ok(Err(e)) => panic!("wait for {}: {e}", self.label),
            Err(_) => {
                let _ = self.child.start_kill();
                panic!(
                    "{} did not exit within {timeout:?}; stderr tail:\n{}",
                    self.label,
                    self.stderr_tail()
                );
            }
        }
    }

    /// Lets the stderr drain reach the end of the output of an exited process.
    async fn finish_stderr(&mut self) {
        if let Some(drain) = self.stderr_drain.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        }
    }

    async fn fail(&mut self, what: &str) -> ! {
        // Give a dying process a moment to finish, so that its last words are in the tail.
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        self.finish_stderr().await;
        panic!(
            "{} {what}; stderr tail:\n{}",
            self.label,
            self.stderr_tail()
        );
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("label", &self.label)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Reads stdout: the first `listening on http://…` line goes to `ready`, an `ops listening on
/// http://…` line to `ops`, the rest is echoed.
async fn drain_stdout(
    stdout: impl AsyncRead + Unpin,
    label: String,
    ready: oneshot::Sender<String>,
    ops: Arc<Mutex<Option<String>>>,
) {
    let mut ready = Some(ready);
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(url) = line
            .trim()
            .strip_prefix(OPS_PREFIX)
            .filter(|url| url.starts_with("http://"))
        {
            *ops.lock().unwrap_or_else(|e| e.into_inner()) = Some(url.to_owned());
            continue;
        }
        let url = line
            .trim()
            .strip_prefix(READY_PREFIX)
            .filter(|url| url.starts_with("http://"));
        match (url, ready.take()) {
            (Some(url), Some(tx)) => {
                let _ = tx.send(url.to_owned());
            }
            (_, not_sent) => {
                ready = not_sent;
                eprintln!("[{label} stdout] {line}");
            }
        }
    }
}

/// Reads stderr to the end: each line is echoed (the test harness captures it and shows it
/// for failing tests) and the last ones are kept for failure messages.
async fn drain_stderr(
    stderr: impl AsyncRead + Unpin,
    label: String,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[{label}] {line}");
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}
