//! A CPU profile of running processes with `perf record -e cpu-clock` (a software event:
//! it works where hardware counters are not exposed, as in most VMs), summarised as the
//! hottest symbols.

use std::time::Duration;

use anyhow::{Context, bail};

/// Samples `pids` for `secs` while `work` runs; returns `work`'s output and the top of
/// `perf report` (symbols with at least 1% of the samples, at most `lines` of them).
pub async fn record<F: Future>(
    pids: &[u32],
    secs: u64,
    lines: usize,
    work: F,
) -> anyhow::Result<(F::Output, String)> {
    let data = std::env::temp_dir().join(format!("versus-bench-{}.perf", crate::run_id()));
    let pid_list = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut perf = tokio::process::Command::new("perf")
        .args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            "999",
            "-p",
            &pid_list,
            "-o",
        ])
        .arg(&data)
        .args(["--", "sleep", &secs.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("running perf")?;
    // perf needs a moment to attach before the work starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let output = work.await;
    let status = perf.wait().await?;
    if !status.success() {
        bail!("perf record failed ({status})");
    }
    let report = tokio::process::Command::new("perf")
        .args(["report", "--no-children", "--sort", "dso,sym", "--stdio"])
        .args(["--percent-limit", "1", "-i"])
        .arg(&data)
        .output()
        .await?;
    let _ = std::fs::remove_file(&data);
    let text = String::from_utf8_lossy(&report.stdout);
    let top: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .take(lines)
        .collect();
    Ok((output, top.join("\n")))
}
