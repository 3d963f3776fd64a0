//! Running Debian's `wrk` (closed loop: each connection sends its next request when the
//! last one is answered) and reading its summary.

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// wrk's settings, the same for every target of a run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Load {
    pub threads: u32,
    pub connections: u32,
    pub secs: u32,
}

/// What wrk reported for one target.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WrkResult {
    pub url: String,
    pub requests_per_sec: f64,
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Non-2xx/3xx answers plus socket errors: any of them spoils the figure.
    pub errors: u64,
}

pub async fn run(url: &str, load: Load) -> anyhow::Result<WrkResult> {
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.secs))
        .arg("--latency")
        .arg(url)
        .output()
        .await
        .context("running wrk (is it installed? scripts/bench installs it)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {}\n{text}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut result = parse(&text).with_context(|| format!("reading wrk's output:\n{text}"))?;
    result.url = url.to_owned();
    eprintln!(
        "wrk {url}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, {} errors",
        result.requests_per_sec, result.p50_ms, result.p99_ms, result.errors
    );
    Ok(result)
}

fn parse(text: &str) -> anyhow::Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut have_rate = false;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", rate] => {
                r.requests_per_sec = rate.parse()?;
                have_rate = true;
            }
            ["50%", value] => r.p50_ms = millis(value)?,
            ["99%", value] => r.p99_ms = millis(value)?,
            [count, "requests", "in", ..] => r.requests = count.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>()?,
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                for n in rest.iter().skip(1).step_by(2) {
                    r.errors += n.trim_end_matches(',').parse::<u64>()?;
                }
            }
            _ => {}
        }
    }
    if !have_rate {
        bail!("no Requests/sec line");
    }
    Ok(r)
}

/// "512.00us", "1.20ms", "2.01s" → milliseconds.
fn millis(value: &str) -> anyhow::Result<f64> {
    let (number, scale) = if let Some(n) = value.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix("m") {
        (n, 60e3)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1e3)
    } else {
        bail!("unknown duration {value:?}")
    };
    Ok(number.parse::<f64>()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let text = "Running 10s test @ http://127.0.0.1:1/json
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   544.00us  200.00us   5.00ms   90.00%
    Req/Sec    29.00k     1.00k   31.00k    70.00%
  Latency Distribution
     50%  500.00us
     75%  600.00us
     90%  700.00us
     99%    1.20ms
  580000 requests in 10.00s, 300.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  58000.50
Transfer/sec:     30.00MB
";
        let r = parse(text).expect("parses");
        assert_eq!(r.requests_per_sec, 58000.50);
        assert_eq!(r.requests, 580000);
        assert!((r.p50_ms - 0.5).abs() < 1e-9);
        assert!((r.p99_ms - 1.2).abs() < 1e-9);
        assert_eq!(r.errors, 8);
    }
}
