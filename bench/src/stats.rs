//! Latency summaries: exact percentiles of a few hundred samples, and of HDR histograms.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Percentiles of one set of latencies, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    /// Nearest-rank percentiles of `samples`.
    pub fn of(samples: &[Duration]) -> Summary {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        // No samples: zeros (JSON has no NaN); `count` says there were none.
        let rank = |q: f64| -> f64 {
            if ms.is_empty() {
                return 0.0;
            }
            let index = ((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1;
            ms[index]
        };
        Summary {
            count: ms.len() as u64,
            p50_ms: rank(0.50),
            p90_ms: rank(0.90),
            p99_ms: rank(0.99),
            max_ms: rank(1.0),
        }
    }

    /// Percentiles of a histogram of microseconds.
    pub fn of_histogram(h: &Histogram<u64>) -> Summary {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        Summary {
            count: h.len(),
            p50_ms: ms(0.50),
            p90_ms: ms(0.90),
            p99_ms: ms(0.99),
            max_ms: h.max() as f64 / 1e3,
        }
    }
}

/// The distinct messages of `items`, each with how often it came: "3× timed out".
pub fn count_distinct(items: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for item in items {
        *counts.entry(item).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(e, n)| format!("{n}× {e}"))
        .collect()
}

/// A histogram of microseconds, from 1 µs to an hour, three significant digits.
pub fn micros_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 3_600_000_000, 3)?)
}

/// `ms` with a precision that suits its size: "0.084", "1.27", "412".
pub fn fmt_ms(ms: f64) -> String {
    if !ms.is_finite() {
        "n/a".to_owned()
    } else if ms.abs() < 1.0 {
        format!("{ms:.3}")
    } else if ms.abs() < 10.0 {
        format!("{ms:.2}")
    } else if ms.abs() < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// A count with thousands separators: 41230 → "41,230".
pub fn fmt_count(n: f64) -> String {
    let rounded = n.round() as i64;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_pick_real_samples() {
        let samples: Vec<Duration> = (1..=200).map(Duration::from_millis).collect();
        let s = Summary::of(&samples);
        assert_eq!(s.count, 200);
        assert_eq!(s.p50_ms, 100.0);
        assert_eq!(s.p99_ms, 198.0);
        assert_eq!(s.max_ms, 200.0);
    }

    #[test]
    fn counts_get_thousands_separators() {
        assert_eq!(fmt_count(41230.4), "41,230");
        assert_eq!(fmt_count(999.0), "999");
        assert_eq!(fmt_count(1_000_000.0), "1,000,000");
    }
}
