//! `scripts/dev`, run as a user runs it; and [`Script`], which runs it (and scripts/cluster) so.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;
use versus_testkit::{bin_path, eventually, free_port, sse};

use crate::{http, json_of, run, text_of};

/// How long scripts/dev may take to say it is up (a new Postgres cluster included; it builds
/// nothing: the test points it at the binaries that are there).
const UP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a script may take to stop everything after a Ctrl-C.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn scripts_dev_restarts_a_killed_worker_without_losing_the_answer_and_stops_on_ctrl_c() {
    run(async {
        let [http_port, pg_port, nats_port, monitor_port, sim_port] =
            <[u16; 5]>::try_from(free_ports(5)).unwrap();
        let mut dev = Script::start(
            "dev",
            &[
                ("VERSUS_HTTP_ADDR", format!("127.0.0.1:{http_port}")),
                ("VERSUS_PG_PORT", pg_port.to_string()),
                ("VERSUS_NATS_PORT", nats_port.to_string()),
                ("VERSUS_NATS_MONITOR_PORT", monitor_port.to_string()),
                ("VERSUS_SIM_ADDR", format!("127.0.0.1:{sim_port}")),
                ("VERSUS_WORKERS", "2".to_owned()),
                // A dead worker's job comes back within seconds.
                ("VERSUS_LEASE_SECS", "3".to_owned()),
                // An answer takes two seconds: long enough to kill its worker half-way.
                ("VERSUS_SIM_TOKENS_PER_SEC", "20".to_owned()),
                ("VERSUS_SIM_ANSWER_TOKENS", "40".to_owned()),
                ("VERSUS_SIM_TTFT_MS", "50".to_owned()),
            ],
        );
        let up = dev
            .line("Versus is up: ", UP_TIMEOUT)
            .await
            .expect("scripts/dev says it is up");
        let api = up
            .split("Versus is up: ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("the URL after `Versus is up: `")
            .to_owned();

        // Its NATS has users: nobody connects anonymously, and the passwords it made for them
        // are kept with its data, readable by their owner alone.
        let nats = format!("nats://127.0.0.1:{nats_port}");
        let anonymous = async_nats::connect(&nats).await;
        assert!(
            matches!(
                &anonymous,
                Err(e) if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation
            ),
            "an anonymous client connected to scripts/dev's NATS: {anonymous:?}"
        );
        let passwords = dev.nats_passwords();
        let admin_password = passwords
            .iter()
            .find_map(|(user, password)| (user == "ADMIN").then(|| password.clone()))
            .expect("the admin's password");
        async_nats::ConnectOptions::with_user_and_password(
            "versus-admin".to_owned(),
            admin_password,
        )
        .connect(&nats)
        .await
        .expect("the admin logs in");
        // No log shows a password: not the programs', not nats-server's, not scripts/dev's.
        dev.assert_no_password_shown();

        let url = reqwest::Url::parse_with_params(
            &format!("{api}/v1/fights/stream"),
            &[("a", "Godzilla"), ("b", "King Kong")],
        )
        .unwrap()
        .to_string();
        let mut client = sse::open(&url, None).await;
        let mut events = client.until_chunks(3).await;

        // The worker that generates it: `<pid>-<uuid>`, one of scripts/dev's two.
        let db = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("postgres://postgres@127.0.0.1:{pg_port}/versus"))
            .await
            .expect("connect to scripts/dev's Postgres");
        let (key, owner): (String, String) =
            sqlx::query_as("SELECT key, worker FROM generations WHERE status = 'running'")
                .fetch_one(&db)
                .await
                .unwrap();
        // The workers log in as their role, not as the owner the migrations ran as.
        let users: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT usename::text FROM pg_stat_activity
             WHERE datname = 'versus' AND backend_type = 'client backend'
               AND pid <> pg_backend_pid()",
        )
        .fetch_all(&db)
        .await
        .unwrap();
        assert_eq!(users, ["versus_worker"]);
        let victim: i32 = owner
            .split('-')
            .next()
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("a worker id starts with its pid: {owner}"));
        let slot = ["worker-1", "worker-2"]
            .into_iter()
            .find(|name| dev.pid_file(name).map(|(pid, _)| pid) == Some(victim))
            .unwrap_or_else(|| panic!("worker {owner} is not one scripts/dev started"));
        signal::kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        let killed_at = Instant::now();

        // The client gets the whole answer, as stored.
        events.extend(client.collect_all().await);
        assert_eq!(events.last().unwrap().event, "done", "{events:?}");
        let text = text_of(&events);
        let stored: (String, Option<String>) =
            sqlx::query_as("SELECT status, text FROM generations WHERE key = $1")
                .bind(&key)
                .fetch_one(&db)
                .await
                .unwrap();
        assert_eq!(stored, ("done".to_owned(), Some(text.clone())));
        db.close().await;

        // The killed worker is back within seconds, and scripts/dev said so.
        dev.line(
            &format!("{slot} exited (status 137); starting it again"),
            Duration::from_secs(10),
        )
        .await
        .expect("scripts/dev reports the worker's exit");
        let (again, again_at) = dev
            .line_at(
                &format!("{slot} started again (pid "),
                Duration::from_secs(10),
            )
            .await
            .expect("scripts/dev starts the worker again");
        assert!(
            again_at - killed_at < Duration::from_secs(5),
            "started again {:?} after the kill",
            again_at - killed_at
        );
        let new_pid: i32 = again
            .split("(pid ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("a pid in {again:?}"));
        assert_ne!(new_pid, victim);
        let (recorded, program) = dev.pid_file(slot).expect("the worker's pid file");
        assert_eq!(recorded, new_pid, "the pid file names the new process");
        assert!(program.ends_with("/versus-worker"), "{program}");
        assert!(runs(new_pid, &program), "the new worker runs");

        // Nothing else stopped.
        assert!(
            dev.child.try_wait().unwrap().is_none(),
            "scripts/dev still runs"
        );
        let health = http().get(format!("{api}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
        let answer = json_of(http().get(format!("{api}/v1/fights/{key}"))).await;
        assert_eq!(answer["text"], json!(text));

        // Ctrl-C: everything it started stops, Postgres included.
        let started = dev.started();
        assert_eq!(
            started.len(),
            6,
            "nats, sim, 2 workers, api, postgres: {started:?}"
        );
        signal::killpg(Pid::from_raw(dev.pid), Signal::SIGINT).unwrap();
        let status = tokio::time::timeout(STOP_TIMEOUT, dev.child.wait())
            .await
            .unwrap_or_else(|_| panic!("scripts/dev did not stop within {STOP_TIMEOUT:?}"))
            .unwrap();
        assert_eq!(status.code(), Some(130), "{status}");
        eventually(
            "every process scripts/dev started is gone",
            Duration::from_secs(10),
            || {
                let left = started.iter().any(|(pid, program)| runs(*pid, program));
                async move { !left }
            },
        )
        .await;
        let left = dev.pid_files();
        assert!(
            left.is_empty(),
            "scripts/dev removes its pid files: {left:?}"
        );
    });
}

/// `n` different ports that are free now.
pub(crate) fn free_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let port = free_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

/// `scripts/<name>` (dev, cluster) as a child process in a process group of its own, with a
/// data folder of its own and the binaries of this test run; when dropped, it is stopped with
/// everything it started (and its logs are shown if the test failed), and the data folder is
/// removed.
pub(crate) struct Script {
    pub(crate) child: Child,
    pub(crate) pid: i32,
    pub(crate) data: PathBuf,
    /// `scripts/dev`, ...
    name: String,
    /// Lines of its stdout and stderr, as they come, with when they came.
    lines: mpsc::UnboundedReceiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
}

impl Script {
    /// Starts scripts/`name` with `envs`, a new data folder and the binaries of this test run.
    pub(crate) fn start(name: &str, envs: &[(&str, String)]) -> Script {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        // Under /tmp and open to all: as root, Postgres runs as the postgres user, which must
        // be able to enter it.
        let data = Path::new("/tmp").join(format!(
            "versus-{name}-test-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin_dir = bin_path("versus-api")
            .parent()
            .expect("a binary lives in a folder")
            .to_path_buf();
        let name = format!("scripts/{name}");

        let mut cmd = Command::new("bash");
        cmd.arg(root.join(&name)).current_dir(&root);
        // The settings are exactly these: none of the test's own (a developer's
        // OPENAI_API_KEY would make it call OpenAI), but the nats-server scripts/test chose.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|key| {
                key != "NATS_SERVER_BIN"
                    && (key.starts_with("VERSUS_")
                        || key.starts_with("OPENAI_")
                        || key.starts_with("AWS_")
                        || key.starts_with("NATS_")
                        || key == "DATABASE_URL"
                        || key == "RUST_LOG")
            }) {
                cmd.env_remove(&key);
            }
        }
        cmd.env("VERSUS_DATA_DIR", &data)
            .env("VERSUS_BIN_DIR", &bin_dir)
            .envs(envs.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start bash {name}: {e}"));
        let pid = i32::try_from(child.id().expect("a new child has a pid")).unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(read_lines(
            name.clone(),
            child.stdout.take().unwrap(),
            tx.clone(),
        ));
        tokio::spawn(read_lines(name.clone(), child.stderr.take().unwrap(), tx));
        Script {
            child,
            pid,
            data,
            name,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line of its output that contains `text`, waiting up to `timeout` for it;
    /// None if it exits or stays silent instead.
    pub(crate) async fn line(&mut self, text: &str, timeout: Duration) -> Option<String> {
        self.line_at(text, timeout).await.map(|(line, _)| line)
    }

    /// [`Script::line`], with when the line came.
    pub(crate) async fn line_at(
        &mut self,
        text: &str,
        timeout: Duration,
    ) -> Option<(String, Instant)> {
        if let Some((at, line)) = self.seen.iter().find(|(_, line)| line.contains(text)) {
            return Some((line.clone(), *at));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let (at, line) = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .ok()??;
            self.seen.push((at, line.clone()));
            if line.contains(text) {
                return Some((line, at));
            }
        }
    }

    /// The NATS passwords it made (its `nats-auth.env`, which must be its owner's alone):
    /// (`ADMIN`, password), (`API`, …), ...
    pub(crate) fn nats_passwords(&self) -> Vec<(String, String)> {
        let auth = self.data.join("nats-auth.env");
        let mode = std::fs::metadata(&auth).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", auth.display());
        std::fs::read_to_string(&auth)
            .unwrap()
            .lines()
            .map(|line| {
                let (var, password) = line.split_once('=').unwrap();
                let user = var
                    .strip_prefix("VERSUS_NATS_")
                    .and_then(|v| v.strip_suffix("_PASSWORD"))
                    .unwrap_or_else(|| panic!("a password's line: {var}"));
                (user.to_owned(), password.to_owned())
            })
            .collect()
    }

    /// Asserts that no log (the programs', nats-server's, the script's own output so far)
    /// shows one of the NATS passwords.
    pub(crate) fn assert_no_password_shown(&self) {
        let mut logs: Vec<(String, String)> = std::fs::read_dir(self.data.join("logs"))
            .unwrap()
            .map(|entry| {
                let path = entry.unwrap().path();
                (
                    path.display().to_string(),
                    std::fs::read_to_string(&path).unwrap_or_default(),
                )
            })
            .collect();
        logs.extend(
            self.seen
                .iter()
                .map(|(_, line)| (self.name.clone(), line.clone())),
        );
        for (user, password) in self.nats_passwords() {
            for (name, text) in &logs {
                assert!(
                    !text.contains(&password),
                    "{name} shows {user}'s NATS password"
                );
            }
        }
    }

    /// The pid file of `name` (`worker-1`, `api`, ...): "PID PROGRAM".
    pub(crate) fn pid_file(&self, name: &str) -> Option<(i32, String)> {
        let text =
            std::fs::read_to_string(self.data.join("run").join(format!("{name}.pid"))).ok()?;
        let (pid, program) = text.trim().split_once(' ')?;
        Some((pid.parse().ok()?, program.to_owned()))
    }

    /// Every pid file: (pid, program).
    pub(crate) fn pid_files(&self) -> Vec<(i32, String)> {
        let Ok(dir) = std::fs::read_dir(self.data.join("run")) else {
            return Vec::new();
        };
        let mut files: Vec<_> = dir
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                self.pid_file(name.strip_suffix(".pid")?)
            })
            .collect();
        files.sort();
        files
    }

    /// The Postgres server's pid and program, from its lock file.
    pub(crate) fn postmaster(&self) -> Option<(i32, String)> {
        let text = std::fs::read_to_string(self.data.join("pg/postmaster.pid")).ok()?;
        let pid = text.lines().next()?.trim().parse().ok()?;
        Some((pid, program_of(pid)?))
    }

    /// Every process it started and that runs now: (pid, program).
    pub(crate) fn started(&self) -> Vec<(i32, String)> {
        let mut started = self.pid_files();
        started.extend(self.postmaster());
        started.retain(|(pid, program)| runs(*pid, program));
        started
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        // The script stops what it started on SIGTERM: give it the time that takes.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = signal::kill(Pid::from_raw(self.pid), Signal::SIGTERM);
            let deadline = std::time::Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Then whatever is left: its process group, the programs (in sessions of their own)
        // and Postgres (immediate shutdown).
        let _ = signal::killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        for (pid, program) in self.pid_files() {
            if runs(pid, &program) {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if let Some((pid, program)) = self.postmaster() {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGQUIT);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while runs(pid, &program) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if std::thread::panicking() {
            show_logs(&self.data.join("logs"));
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// Sends each line of `from` to `to`, with when it came, and echoes it to the test's output
/// after `[name]`.
async fn read_lines(
    name: String,
    from: impl AsyncRead + Unpin,
    to: mpsc::UnboundedSender<(Instant, String)>,
) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[{name}] {line}");
        let _ = to.send((Instant::now(), line));
    }
}

/// The program `pid` runs (the first word of its command line), unless it has exited.
fn program_of(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the command name in parentheses; a zombie has exited.
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let first = cmdline.split(|b| *b == 0).next()?;
    Some(String::from_utf8_lossy(first).into_owned())
}

/// Whether `pid` runs `program` (a pid of a process that has exited may be taken again).
pub(crate) fn runs(pid: i32, program: &str) -> bool {
    program_of(pid).is_some_and(|running| running == program)
}

/// The last lines of every log in `dir`, for a failed test.
fn show_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("--- {} (last 40 lines)", entry.path().display());
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{line}");
        }
    }
}
