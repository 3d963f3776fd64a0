//! Runs the topology's processes and keeps them running, then stops them in order.
//!
//! Each program runs in a process group of its own (a Ctrl-C at the terminal then reaches the
//! launcher alone, which stops the programs in order instead of all at once), its stdout in
//! `logs/NAME.out` and its stderr in `logs/NAME.log`, its pid in `run/NAME.pid` as
//! "PID PROGRAM" (for `stop_leftovers` after a launcher killed with -9). A program that exits is
//! started again, with a line saying so, after 1 s, doubling up to 30 s while it keeps exiting
//! within 30 s of its start. Stopping: the programs that are not infrastructure first, with
//! `VERSUS_SHUTDOWN_GRACE_SECS` + 5 s to drain, then the infrastructure with 5 s, then Postgres;
//! a second signal meanwhile kills what is left.

use std::convert::Infallible;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use crate::out::{say, warn};
use crate::pg;
use crate::probe::{file_holds, line_starting, port_in_use, tail};
use crate::topology::{Env, Process};

/// The longest delay before a program is started again.
const RESTART_MAX_SECS: u64 = 30;
/// A program that ran this long is started again after 1 s once more.
const RESTART_RESET: Duration = Duration::from_secs(30);
/// How often the supervisor looks for programs that exited.
const POLL: Duration = Duration::from_millis(100);
/// How long the infrastructure (NATS, the simulator) may take to stop.
const INFRA_STOP: Duration = Duration::from_secs(5);

/// The signals that stop the launcher: Ctrl-C, SIGTERM, SIGHUP.
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// Which signal came.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    Interrupt,
    Terminate,
    HangUp,
}

impl Stop {
    /// The exit status of a shell ended by this signal (130, 143, 129).
    pub fn status(self) -> i32 {
        match self {
            Stop::Interrupt => 130,
            Stop::Terminate => 143,
            Stop::HangUp => 129,
        }
    }
}

impl Signals {
    /// Takes the three signals over (from now on they no longer end the launcher at once).
    pub fn new() -> Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("handle SIGINT")?,
            term: signal(SignalKind::terminate()).context("handle SIGTERM")?,
            hup: signal(SignalKind::hangup()).context("handle SIGHUP")?,
        })
    }

    /// The next one that comes.
    pub async fn next(&mut self) -> Stop {
        tokio::select! {
            _ = self.int.recv() => Stop::Interrupt,
            _ = self.term.recv() => Stop::Terminate,
            _ = self.hup.recv() => Stop::HangUp,
        }
    }
}

enum State {
    Running {
        child: Child,
        pid: i32,
    },
    /// It exited; not yet scheduled to start again.
    Exited {
        status: i32,
    },
    /// Waiting to start again.
    Due {
        at: Instant,
    },
}

struct Program {
    spec: Process,
    state: State,
    started: Instant,
    /// The delay before its next start, in seconds.
    delay: u64,
}

impl Program {
    /// Whether it still runs (reaping it if it exited).
    fn poll(&mut self) -> bool {
        let State::Running { child, .. } = &mut self.state else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                self.state = State::Exited {
                    status: status_code(status),
                };
                false
            }
            Err(_) => {
                self.state = State::Exited { status: 1 };
                false
            }
        }
    }

    fn pid(&self) -> Option<i32> {
        match self.state {
            State::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }
}

/// The status a shell reports: the exit code, or 128 + the signal that ended it.
pub(crate) fn status_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// The programs of one system, by name, in the order of their first start.
pub struct Supervisor {
    /// `scripts/dev`, `scripts/cluster`: how the logs' restart lines name the launcher.
    label: String,
    logs: PathBuf,
    run: PathBuf,
    /// Given to every program after this is set (`RUST_LOG`, `NO_COLOR`, the upstream).
    common: Env,
    programs: Vec<Program>,
    /// How long the programs that are not infrastructure may take to stop.
    drain: Duration,
    /// The Postgres cluster, once it is ours to stop.
    pg_dir: Option<PathBuf>,
    stopping: bool,
}

impl Supervisor {
    pub fn new(label: &str, logs: &Path, run: &Path) -> Supervisor {
        // The workers finish what they generate within VERSUS_SHUTDOWN_GRACE_SECS of a SIGTERM.
        let grace = std::env::var("VERSUS_SHUTDOWN_GRACE_SECS")
            .ok()
            .filter(|g| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|g| g.parse().ok())
            .unwrap_or(30);
        Supervisor {
            label: label.to_owned(),
            logs: logs.to_owned(),
            run: run.to_owned(),
            common: Vec::new(),
            programs: Vec::new(),
            drain: Duration::from_secs(grace + 5),
            pg_dir: None,
            stopping: false,
        }
    }

    /// Gives `key`=`value` to every program started from now on.
    pub fn export(&mut self, key: &str, value: &str) {
        self.common.push((key.to_owned(), value.to_owned()));
    }

    /// How long the programs that are not infrastructure may take to stop (at most; they
    /// usually take less), in place of `VERSUS_SHUTDOWN_GRACE_SECS` + 5 s.
    pub fn set_drain(&mut self, drain: Duration) {
        self.drain = drain;
    }

    /// The Postgres cluster in `dir` is ours: it is stopped after everything else.
    pub fn own_postgres(&mut self, dir: PathBuf) {
        self.pg_dir = Some(dir);
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    /// Starts `spec` for the first time; returns its pid.
    pub fn start(&mut self, spec: Process) -> Result<i32> {
        let (child, pid) = self.spawn(&spec, false)?;
        self.programs.push(Program {
            spec,
            state: State::Running { child, pid },
            started: Instant::now(),
            delay: 1,
        });
        Ok(pid)
    }

    fn spawn(&self, spec: &Process, append: bool) -> Result<(Child, i32)> {
        let out = File::create(self.logs.join(format!("{}.out", spec.name)))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .truncate(false)
            .open(self.log(&spec.name))?;
        if !append {
            log.set_len(0)?;
        }
        let mut child = Command::new(&spec.program)
            .args(&spec.args)
            .envs(self.common.iter().map(|(k, v)| (k, v)))
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {} ({})", spec.name, spec.program.display()))?;
        let pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .context("a new program has a pid")?;
        let pid_file = self.run.join(format!("{}.pid", spec.name));
        if let Err(e) = fs::write(&pid_file, format!("{pid} {}\n", spec.program.display())) {
            let _ = child.start_kill();
            return Err(e).with_context(|| format!("write {}", pid_file.display()));
        }
        Ok((child, pid))
    }

    fn program(&mut self, name: &str) -> Result<&mut Program> {
        match self.programs.iter_mut().find(|p| p.spec.name == name) {
            Some(program) => Ok(program),
            None => bail!("no program is called '{name}'"),
        }
    }

    /// Its pid while it runs.
    pub fn pid(&self, name: &str) -> Option<i32> {
        self.programs
            .iter()
            .find(|p| p.spec.name == name)
            .and_then(Program::pid)
    }

    /// Changes what `name` gets when it is started again (a restart binds the address the
    /// first start bound).
    pub fn set_env(&mut self, name: &str, key: &str, value: &str) -> Result<()> {
        let program = self.program(name)?;
        program.spec.env.retain(|(k, _)| k != key);
        program.spec.env.push((key.to_owned(), value.to_owned()));
        Ok(())
    }

    /// Whether `name` runs now.
    pub fn running(&mut self, name: &str) -> bool {
        self.program(name).is_ok_and(Program::poll)
    }

    /// Waits (up to `secs`) for the `listening on http://…` line every Versus binary prints on
    /// stdout, and returns the URL. Fails, with the tail of the log, if the program exits or
    /// stays silent.
    pub async fn wait_listening(&mut self, name: &str, secs: u64) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let out = self.logs.join(format!("{name}.out"));
        let log = self.log(name);
        loop {
            if let Some(line) = line_starting(&out, "listening on http://") {
                return Ok(line["listening on ".len()..].to_owned());
            }
            if !self.running(name) {
                eprintln!("{}", tail(&log, 30));
                bail!("{name} exited before it was ready (log: {})", log.display());
            }
            if Instant::now() >= deadline {
                eprintln!("{}", tail(&log, 30));
                bail!(
                    "{name} did not say it was listening within {secs} s (log: {})",
                    log.display()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits up to 30 s for the nats-server `name` to log that it is ready and to accept
    /// connections on `port`.
    pub async fn wait_nats_ready(&mut self, name: &str, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = self.log(name);
        while !(file_holds(&log, "Server is ready") && port_in_use(port).await) {
            if !self.running(name) || Instant::now() >= deadline {
                eprintln!("{}", tail(&log, 20));
                bail!("nats-server did not start (log: {})", log.display());
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    /// Keeps every program running; only a signal (the caller's `select!`) ends it.
    pub async fn supervise(&mut self) -> Result<Infallible> {
        loop {
            let now = Instant::now();
            for i in 0..self.programs.len() {
                self.programs[i].poll();
                if let State::Exited { status } = self.programs[i].state {
                    self.schedule_restart(i, status, now);
                }
            }
            for i in 0..self.programs.len() {
                if matches!(self.programs[i].state, State::Due { at } if at <= now) {
                    self.restart(i)?;
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn schedule_restart(&mut self, i: usize, status: i32, now: Instant) {
        let program = &mut self.programs[i];
        let delay = if now - program.started >= RESTART_RESET {
            1
        } else {
            program.delay
        };
        program.state = State::Due {
            at: now + Duration::from_secs(delay),
        };
        program.delay = (delay * 2).min(RESTART_MAX_SECS);
        let name = program.spec.name.clone();
        warn(&format!(
            "{name} exited (status {status}); starting it again in {delay} s (log: {})",
            self.log(&name).display()
        ));
    }

    fn restart(&mut self, i: usize) -> Result<()> {
        let name = self.programs[i].spec.name.clone();
        let at = std::process::Command::new("date")
            .arg("+%F %T")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default();
        if let Ok(mut log) = OpenOptions::new().append(true).open(self.log(&name)) {
            let _ = write!(
                log,
                "\n--- {}: {name} exited; started again at {at} ---\n\n",
                self.label
            );
        }
        let (child, pid) = self.spawn(&self.programs[i].spec, true)?;
        let program = &mut self.programs[i];
        program.state = State::Running { child, pid };
        program.started = Instant::now();
        say(&format!("{name} started again (pid {pid})"));
        Ok(())
    }

    /// Stops the program `name` (SIGTERM, up to `time` to exit, then SIGKILL) and forgets it,
    /// so that its name may be used again.
    pub async fn stop_one(&mut self, name: &str, time: Duration) {
        let Some(i) = self.programs.iter().position(|p| p.spec.name == name) else {
            return;
        };
        if let Some(pid) = self.programs[i].pid() {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + time;
        while self.programs[i].poll() && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        if let State::Running { child, .. } = &mut self.programs[i].state {
            let _ = child.kill().await;
        }
        self.programs.remove(i);
        let _ = fs::remove_file(self.run.join(format!("{name}.pid")));
    }

    /// Stops everything: the programs that depend on the others first, while NATS is still
    /// there for them to drain against, then the rest, then Postgres. A signal meanwhile kills
    /// what still runs.
    pub async fn stop(&mut self, signals: &mut Signals) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        if !self.programs.is_empty() || self.pg_dir.is_some() {
            say("stopping Versus (Ctrl-C again to stop it at once)");
        }
        for infra in [false, true] {
            let group: Vec<usize> = (0..self.programs.len())
                .filter(|i| self.programs[*i].spec.infra == infra)
                .collect();
            let time = if infra { INFRA_STOP } else { self.drain };
            self.stop_group(&group, time, signals).await;
        }
        if let Some(dir) = &self.pg_dir {
            pg::stop(dir, "fast").await;
        }
        if let Ok(entries) = fs::read_dir(&self.run) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "pid") {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }

    async fn stop_group(&mut self, group: &[usize], time: Duration, signals: &mut Signals) {
        for i in group {
            if let Some(pid) = self.programs[*i].pid() {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + time;
        loop {
            let mut alive = false;
            for i in group {
                alive |= self.programs[*i].poll();
            }
            if !alive || Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                _ = signals.next() => self.hurry(),
            }
        }
        for i in group {
            if let State::Running { child, .. } = &mut self.programs[*i].state {
                let _ = child.kill().await;
            }
            self.programs[*i].poll();
        }
    }

    /// A second Ctrl-C while stopping: SIGKILL for what still runs.
    fn hurry(&mut self) {
        warn("stopping at once");
        for program in &self.programs {
            if let Some(pid) = program.pid() {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// Processes that an earlier run left behind (killed with -9, a closed terminal): each pid
    /// file holds "PID PATH"; the process is ours if its command line still starts with PATH.
    /// They are stopped in the same order as at Ctrl-C.
    pub async fn stop_leftovers(&self, is_infra: fn(&str) -> bool) {
        let mut groups: [Vec<i32>; 2] = [Vec::new(), Vec::new()];
        let Ok(entries) = fs::read_dir(&self.run) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let (Some(name), Some("pid")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|e| e.to_str()),
            ) else {
                continue;
            };
            let text = fs::read_to_string(&path).unwrap_or_default();
            if let Some((pid, program)) = text.trim().split_once(' ')
                && let Ok(pid) = pid.parse::<i32>()
                && first_word(pid).is_some_and(|first| first == program)
            {
                eprintln!("stopping {name} (pid {pid}) left by an earlier run");
                groups[usize::from(is_infra(name))].push(pid);
            }
            let _ = fs::remove_file(&path);
        }
        for (pids, time) in groups.iter().zip([self.drain, INFRA_STOP]) {
            stop_foreign(pids, time).await;
        }
    }
}

/// The first word of the command line of `pid`, if it runs.
fn first_word(pid: i32) -> Option<String> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let first = cmdline.split(|b| *b == 0).next()?;
    Some(String::from_utf8_lossy(first).into_owned())
}

/// SIGTERM to processes that are not our children, up to `time` for all to exit, then SIGKILL.
async fn stop_foreign(pids: &[i32], time: Duration) {
    if pids.is_empty() {
        return;
    }
    for pid in pids {
        let _ = signal::kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + time;
    while Instant::now() < deadline
        && pids
            .iter()
            .any(|pid| signal::kill(Pid::from_raw(*pid), None).is_ok())
    {
        tokio::time::sleep(POLL).await;
    }
    for pid in pids {
        let _ = signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
}
