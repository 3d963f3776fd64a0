//! A circuit breaker per upstream provider, in this worker: after `failures` failed calls in a
//! row the provider is not called for `open_for` (its calls go to the next provider at once,
//! with no time spent on one that fails), then one call (the probe) decides: it succeeds and
//! the circuit closes, it fails and the circuit opens again.
//!
//! Small and ours rather than a crate's: the state machine is a few lines, and what it must
//! expose is ours: the state as a gauge (`versus_circuit_state{provider}`), its changes as a
//! counter (`versus_circuit_transitions_total{provider,to}`), and the primary's state, which
//! the upgrade of degraded answers waits on (`crate::upgrade`).

use std::{
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

/// What a circuit is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls go through.
    Closed,
    /// One call (the probe) is under way; the others go elsewhere.
    HalfOpen,
    /// No call goes through until the open time is over.
    Open,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }

    /// The gauge's value: 0 closed, 1 half-open, 2 open.
    fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::HalfOpen => 1.0,
            State::Open => 2.0,
        }
    }
}

/// The breaker of one provider (`name`, the metrics' `provider` label).
pub struct Circuit {
    name: String,
    failures: u32,
    open_for: Duration,
    inner: Mutex<Inner>,
}

struct Inner {
    state: State,
    /// Failed calls in a row.
    failed: u32,
    /// When an open circuit lets its probe through.
    until: Instant,
}

impl Circuit {
    /// A closed circuit that opens after `failures` failed calls in a row (0: never) for
    /// `open_for`.
    pub fn new(name: impl Into<String>, failures: u32, open_for: Duration) -> Circuit {
        let circuit = Circuit {
            name: name.into(),
            failures,
            open_for,
            inner: Mutex::new(Inner {
                state: State::Closed,
                failed: 0,
                until: Instant::now(),
            }),
        };
        metrics::gauge!("versus_circuit_state", "provider" => circuit.name.clone()).set(0.0);
        for to in [State::Closed, State::HalfOpen, State::Open] {
            metrics::counter!("versus_circuit_transitions_total", "provider" => circuit.name.clone(), "to" => to.as_str())
                .increment(0);
        }
        circuit
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The state now (an open circuit whose time is over still says `Open` until a call asks).
    pub fn state(&self) -> State {
        self.lock().state
    }

    /// Whether an open circuit's time is over: the next call it lets through is its probe.
    pub fn probe_due(&self) -> bool {
        let inner = self.lock();
        inner.state == State::Open && Instant::now() >= inner.until
    }

    /// Whether a call may go to this provider now. An open circuit whose time is over lets
    /// exactly one through (it becomes half-open); its outcome must be recorded.
    pub fn allow(&self) -> bool {
        let mut inner = self.lock();
        match inner.state {
            State::Closed => true,
            State::HalfOpen => false,
            State::Open if Instant::now() >= inner.until => {
                self.move_to(&mut inner, State::HalfOpen);
                true
            }
            State::Open => false,
        }
    }

    /// A call that the provider answered (whatever it said about the request).
    pub fn succeeded(&self) {
        let mut inner = self.lock();
        inner.failed = 0;
        if inner.state != State::Closed {
            self.move_to(&mut inner, State::Closed);
        }
    }

    /// A call that failed for the provider's sake (an outage, a rate limit, a timeout).
    pub fn failed(&self) {
        let mut inner = self.lock();
        inner.failed = inner.failed.saturating_add(1);
        let trips = match inner.state {
            State::HalfOpen => true,
            State::Closed => self.failures > 0 && inner.failed >= self.failures,
            State::Open => false,
        };
        if trips {
            inner.until = Instant::now() + self.open_for;
            self.move_to(&mut inner, State::Open);
            tracing::warn!(provider = self.name, open_for = ?self.open_for, "the provider failed too often in a row: its circuit is open");
        }
    }

    fn move_to(&self, inner: &mut Inner, to: State) {
        inner.state = to;
        metrics::gauge!("versus_circuit_state", "provider" => self.name.clone()).set(to.gauge());
        metrics::counter!("versus_circuit_transitions_total", "provider" => self.name.clone(), "to" => to.as_str())
            .increment(1);
        if to == State::Closed {
            tracing::info!(
                provider = self.name,
                "the provider answers again: its circuit is closed"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_circuit_opens_after_failures_in_a_row_and_one_probe_decides() {
        let circuit = Circuit::new("text/primary", 3, Duration::from_secs(30));
        // Failures that are not in a row do not open it.
        circuit.failed();
        circuit.failed();
        circuit.succeeded();
        circuit.failed();
        circuit.failed();
        assert!(circuit.allow());
        circuit.failed();
        assert_eq!(circuit.state(), State::Open);
        assert!(!circuit.allow());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!circuit.allow());
        tokio::time::advance(Duration::from_secs(1)).await;
        // One probe, and no other call meanwhile.
        assert!(circuit.allow());
        assert_eq!(circuit.state(), State::HalfOpen);
        assert!(!circuit.allow());
        // The probe fails: open again for the whole time.
        circuit.failed();
        assert_eq!(circuit.state(), State::Open);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!circuit.allow());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(circuit.allow());
        // The probe succeeds: closed, and calls go through.
        circuit.succeeded();
        assert_eq!(circuit.state(), State::Closed);
        assert!(circuit.allow());
        assert!(circuit.allow());
    }

    #[test]
    fn zero_failures_never_opens() {
        let circuit = Circuit::new("text/primary", 0, Duration::from_secs(30));
        for _ in 0..100 {
            circuit.failed();
        }
        assert!(circuit.allow());
    }
}
