//! Every retry and back-off policy of Versus, by name: what is tried again, how long it waits
//! between tries, and when it stops. A call site takes a named policy from here rather than
//! building a schedule of its own, so that a policy is read, compared and changed here, next to
//! the others.
//!
//! A [`Policy`] either runs a fallible call until it succeeds ([`Policy::retry`], backon's
//! `Retry`, to which `.when`, `.notify` and `.adjust` chain), or hands its delays out one by
//! one ([`Policy::delays`]) to a loop that does more between tries than sleep: log, keep a
//! lease alive, publish, or wait as long as a server's `Retry-After` asks
//! ([`Delays::next_honoring`]).
//!
//! Most schedules double from a first delay up to a ceiling. "Jittered" means each delay is
//! drawn between the scheduled one and twice it, so that callers that failed together (every
//! flight of a replica when NATS restarts, every job when the upstream rate-limits) do not try
//! again together. A policy "without a count" never runs out of delays: its caller stops at a
//! deadline of its own, and says which.

// backon is used here, behind the named policies: clippy.toml's bans on its builders and on
// `Retryable::retry` (disallowed_types, disallowed_methods) do not apply in this file.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::{future::Future, time::Duration};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder, Retryable};

/// A named schedule of delays between tries. Get one from the constructors of this module.
#[derive(Debug, Clone, Copy)]
pub struct Policy(ExponentialBuilder);

impl Policy {
    /// Runs `call` until it succeeds, sleeping the policy's delays between tries, and returns
    /// its last error once they run out. Chain `.when(..)` (which errors are tried again),
    /// `.notify(..)` (called before each sleep) or `.adjust(..)` before awaiting it.
    pub fn retry<T, E, Fut, F>(self, call: F) -> backon::Retry<ExponentialBackoff, T, E, Fut, F>
    where
        Fut: Future<Output = Result<T, E>>,
        F: FnMut() -> Fut,
    {
        call.retry(self.0)
    }

    /// The delays of one run of tries, for a loop that sleeps them itself.
    pub fn delays(&self) -> Delays {
        Delays(self.0.build())
    }
}

/// The delays of one run of tries under a [`Policy`]: None once the policy's tries are spent.
#[derive(Debug)]
pub struct Delays(ExponentialBackoff);

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.0.next()
    }
}

impl Delays {
    /// The wait before the next try when the server asked for `retry_after` (its
    /// `Retry-After`): that wait, which wins over the schedule since trying earlier would only
    /// be refused again. None when the schedule is spent, or when the server asks for longer
    /// than `longest` (worth no more tries). Either way the try uses up one of the schedule's.
    pub fn next_honoring(
        &mut self,
        retry_after: Option<Duration>,
        longest: Duration,
    ) -> Option<Duration> {
        let scheduled = self.next()?;
        match retry_after {
            Some(after) if after > longest => None,
            Some(after) => Some(after),
            None => Some(scheduled),
        }
    }
}

/// How long a write to JetStream (an event, a job, a KV put, a purge) is tried for in all:
/// longer than a leader election (up to about 10 s from a server's death, as measured on a
/// loopback hub), well within the duplicate windows of the events (30 s) and jobs (2 min)
/// streams, so that a try that had landed is taken for a duplicate.
pub const BUS_WRITE_FOR: Duration = Duration::from_secs(20);

/// A write to JetStream through an outage or a leader election (the stream accepts nothing
/// for 4 to 9 s, and async-nats does not retry): 100 ms doubling up to 1 s, jittered, without a
/// count; the caller stops after [`BUS_WRITE_FOR`]. Used by the worker's
/// `events::through_election` (events, edge KV puts, purges) and the API's job publish.
pub fn bus_write() -> Policy {
    Policy(
        ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(1))
            .with_jitter()
            .without_max_times(),
    )
}

/// A read of a key's stored events that a waiting client needs (the API's replay of the
/// history): 50 ms doubling up to 1 s, jittered, without a count; the flight's own timeout
/// bounds it. Reads start sooner than writes: JetStream answers 503 for only a moment after a
/// restart.
pub fn history_read() -> Policy {
    Policy(
        ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(1))
            .with_jitter()
            .without_max_times(),
    )
}

/// The API's read of a key's last event before its flight publishes a job: [`history_read`],
/// giving up once its delays add up to [`BUS_WRITE_FOR`] (as long as the job's publish would
/// be tried).
pub fn last_event_read() -> Policy {
    let Policy(builder) = history_read();
    Policy(builder.with_total_delay(Some(BUS_WRITE_FOR)))
}

/// The longest wait between two upstream calls of one job.
pub const UPSTREAM_MAX_DELAY: Duration = Duration::from_secs(10);

/// The upstream (chat, moderation and image calls), per job: `first` doubling up to
/// [`UPSTREAM_MAX_DELAY`], jittered, `tries` calls in all (so `tries - 1` delays: the retry
/// budget). The worker's upstream loops sleep them with [`Delays::next_honoring`].
pub fn upstream(first: Duration, tries: usize) -> Policy {
    Policy(
        ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay(UPSTREAM_MAX_DELAY)
            .with_max_times(tries.saturating_sub(1))
            .with_jitter(),
    )
}

/// The Postgres write of a finished answer, which is paid for and so written again rather than
/// made again: 100 ms doubling up to 2 s, jittered, without a count; the worker stops after
/// `VERSUS_STORE_RETRY_SECS`, or before its lease could run out unconfirmed.
pub fn answer_write() -> Policy {
    Policy(
        ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times(),
    )
}

/// The Postgres write of what calls cost (a batch of spend records, which settle their
/// reservations): what was paid is recorded, so the write is tried again, 100 ms doubling up to
/// 5 s, jittered, for up to [`SPEND_WRITE_FOR`]; past that the records are logged as lost and
/// their reservations expire.
pub fn spend_write() -> Policy {
    Policy(
        ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .with_total_delay(Some(SPEND_WRITE_FOR)),
    )
}

/// How long a batch of spend records is tried: longer than a Postgres failover.
pub const SPEND_WRITE_FOR: Duration = Duration::from_secs(300);

/// A picture's upload to the object store, from the bytes in hand (a picture is paid for):
/// 200 ms doubling up to 5 s, jittered, without a count; the worker stops after
/// `VERSUS_STORE_RETRY_SECS`.
pub fn picture_upload() -> Policy {
    Policy(
        ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times(),
    )
}

/// A compare-and-set of a client's daily quota (the API's `quota`) that a concurrent charge of
/// the same client beat (its revision moved): read again and try again after 5 ms doubling up
/// to 100 ms, jittered, 8 times more at most. Only one client's own requests contend for its
/// counter, so a client that still loses after that is told to slow down.
pub fn quota_charge() -> Policy {
    Policy(
        ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(5))
            .with_max_delay(Duration::from_millis(100))
            .with_max_times(8)
            .with_jitter(),
    )
}

/// How long a job lane waits after a failed pull, or a failed declaration of its consumer,
/// before it tries again (a fixed interval: the loop is one per lane, not one per job).
pub const JOB_PULL_RETRY: Duration = Duration::from_millis(250);

/// The first and the longest wait of [`job_redelivery`].
const REDELIVERY_FIRST: Duration = Duration::from_secs(1);
const REDELIVERY_MAX: Duration = Duration::from_secs(16);

/// How long a job that failed on its `delivered`th delivery waits before the next one (the
/// delay of its nak): 1 s after the first delivery, doubling with each up to 16 s, without
/// jitter. An outage of Postgres or NATS of about five minutes (the API's stream timeout) then
/// does not use up a job's deliveries (the worker's `MAX_DELIVER`), as a retry every second
/// would in under two minutes.
pub fn job_redelivery(delivered: i64) -> Duration {
    let doublings = delivered.saturating_sub(1).clamp(0, 8) as u32;
    (REDELIVERY_FIRST * 2u32.pow(doublings)).min(REDELIVERY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `delays` are the jittered schedule `scheduled`: each between its delay and twice it.
    fn jittered(delays: impl Iterator<Item = Duration>, scheduled: &[u64]) -> bool {
        let delays: Vec<Duration> = delays.collect();
        delays.len() == scheduled.len()
            && delays.iter().zip(scheduled).all(|(d, ms)| {
                let ms = Duration::from_millis(*ms);
                *d >= ms && *d <= ms * 2
            })
    }

    #[test]
    fn the_upstream_budget_is_its_tries_less_one() {
        let policy = upstream(Duration::from_millis(500), 4);
        assert!(jittered(policy.delays(), &[500, 1000, 2000]));
        let longer = upstream(Duration::from_secs(4), 5);
        assert!(jittered(longer.delays(), &[4000, 8000, 10_000, 10_000]));
        assert_eq!(upstream(Duration::from_millis(500), 1).delays().count(), 0);
        assert_eq!(upstream(Duration::from_millis(500), 0).delays().count(), 0);
    }

    #[test]
    fn writes_and_reads_double_up_to_their_ceiling_without_a_count() {
        assert!(jittered(
            bus_write().delays().take(6),
            &[100, 200, 400, 800, 1000, 1000]
        ));
        assert!(jittered(
            history_read().delays().take(6),
            &[50, 100, 200, 400, 800, 1000]
        ));
        assert!(jittered(
            answer_write().delays().take(6),
            &[100, 200, 400, 800, 1600, 2000]
        ));
        assert!(jittered(
            picture_upload().delays().take(7),
            &[200, 400, 800, 1600, 3200, 5000, 5000]
        ));
        assert_eq!(bus_write().delays().take(1000).count(), 1000);
    }

    #[test]
    fn the_last_event_read_stops_once_its_delays_reach_the_bus_write_bound() {
        let slept: Duration = last_event_read().delays().sum();
        assert!(slept <= BUS_WRITE_FOR, "{slept:?}");
        // It stops only when the next delay (at most twice 1 s) would not fit.
        assert!(slept > BUS_WRITE_FOR - Duration::from_secs(2), "{slept:?}");
    }

    #[test]
    fn a_retry_after_wins_over_the_schedule_unless_it_is_too_long() {
        let longest = Duration::from_secs(30);
        let mut delays = upstream(Duration::from_millis(500), 3).delays();
        let asked = Some(Duration::from_secs(7));
        assert_eq!(delays.next_honoring(asked, longest), asked);
        let scheduled = delays.next_honoring(None, longest).unwrap();
        assert!(scheduled >= Duration::from_secs(1) && scheduled <= Duration::from_secs(2));
        // The schedule is spent (three tries), whatever the server asks.
        assert_eq!(delays.next_honoring(asked, longest), None);
        let mut delays = upstream(Duration::from_millis(500), 3).delays();
        assert_eq!(
            delays.next_honoring(Some(Duration::from_secs(31)), longest),
            None
        );
    }

    #[test]
    fn a_beaten_quota_charge_is_tried_again_briefly_and_a_few_times_only() {
        assert!(jittered(
            quota_charge().delays(),
            &[5, 10, 20, 40, 80, 100, 100, 100]
        ));
    }

    #[test]
    fn a_failing_job_waits_longer_with_each_delivery() {
        let delays: Vec<u64> = (1..=7).map(|n| job_redelivery(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 16, 16]);
        assert_eq!(job_redelivery(0), Duration::from_secs(1));
        assert_eq!(job_redelivery(i64::MAX), Duration::from_secs(16));
    }

    #[tokio::test]
    async fn a_retried_call_runs_until_it_succeeds() {
        let mut failures = 2;
        let tries = std::cell::Cell::new(0);
        let call = || {
            tries.set(tries.get() + 1);
            let failed = failures > 0;
            failures -= 1;
            async move { if failed { Err("not yet") } else { Ok(()) } }
        };
        assert_eq!(history_read().retry(call).await, Ok(()));
        assert_eq!(tries.get(), 3);
    }
}
