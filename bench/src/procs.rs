//! Resident memory and CPU time of running processes, read from `/proc`.

use std::collections::HashMap;
use std::str::FromStr;

use anyhow::{Context, bail};

/// A process to watch, named on the command line as `NAME=PID`.
#[derive(Debug, Clone)]
pub struct Named {
    pub name: String,
    pub pid: u32,
}

impl FromStr for Named {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, pid) = s.split_once('=').ok_or("expected NAME=PID")?;
        Ok(Named {
            name: name.to_owned(),
            pid: pid.parse().map_err(|e| format!("bad pid {pid:?}: {e}"))?,
        })
    }
}

/// VmRSS of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kib = rest.trim().trim_end_matches("kB").trim();
            return Ok(kib.parse()?);
        }
    }
    bail!("/proc/{pid}/status has no VmRSS")
}

/// User and system CPU time, in clock ticks, of one process (`/proc/PID/stat` fields 14, 15).
/// Returns (parent pid, ticks).
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    let after = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// CPU ticks of `root` and all its descendants (Postgres serves each connection from a child
/// of the postmaster).
pub fn tree_ticks(root: u32) -> u64 {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut ticks: HashMap<u32, u64> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some((ppid, t)) = stat(pid) {
                children.entry(ppid).or_default().push(pid);
                ticks.insert(pid, t);
            }
        }
    }
    let mut total = 0;
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        total += ticks.get(&pid).copied().unwrap_or(0);
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids);
        }
    }
    total
}

/// CPU ticks per second (`getconf CLK_TCK`; 100 on every common Linux).
pub fn ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds of each named process tree, and of this process, between two readings.
pub struct CpuMeter {
    watched: Vec<Named>,
    start: Vec<u64>,
    own_start: u64,
}

impl CpuMeter {
    pub fn start(watched: &[Named]) -> CpuMeter {
        CpuMeter {
            start: watched.iter().map(|n| tree_ticks(n.pid)).collect(),
            watched: watched.to_vec(),
            own_start: tree_ticks(std::process::id()),
        }
    }

    /// (name, CPU seconds) per watched process, then ("load client", …) for this one.
    pub fn stop(&self) -> Vec<(String, f64)> {
        let hz = ticks_per_sec();
        let mut out: Vec<(String, f64)> = self
            .watched
            .iter()
            .zip(&self.start)
            .map(|(n, start)| {
                let used = tree_ticks(n.pid).saturating_sub(*start);
                (n.name.clone(), used as f64 / hz)
            })
            .collect();
        let own = tree_ticks(std::process::id()).saturating_sub(self.own_start);
        out.push(("load client (versus-bench)".to_owned(), own as f64 / hz));
        out
    }
}

/// "api 0.9 · worker 1.8 · … · total 5.0 ms": CPU milliseconds per answer of each process
/// (processes of one name added up), from CPU seconds over `answers`.
pub fn per_answer(cpu: &[(String, f64)], answers: usize) -> String {
    let mut by_name: Vec<(&str, f64)> = Vec::new();
    for (name, secs) in cpu {
        match by_name.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 += secs,
            None => by_name.push((name, *secs)),
        }
    }
    let per = |secs: f64| secs * 1e3 / answers.max(1) as f64;
    let total: f64 = by_name.iter().map(|(_, s)| s).sum();
    let parts: Vec<String> = by_name
        .iter()
        .map(|(name, secs)| format!("{name} {}", crate::stats::fmt_ms(per(*secs))))
        .collect();
    format!(
        "{} · total {} ms",
        parts.join(" · "),
        crate::stats::fmt_ms(per(total))
    )
}
