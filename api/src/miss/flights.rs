//! The registry of flights: however many requests of this process wait on one answer, one
//! flight (and one reader) follows its generation, and every request replays the flight's log
//! from the first event, so a request that joins late gets everything.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::sync::watch;
use tracing::{Instrument, Span, field::Empty};
use versus_shared::{
    key::Key,
    tasks::Tasks,
    traces,
    wire::{Event, Job, Kind},
};

use super::{
    flight::{Flight, lock},
    log::Logged,
    prefetch::Prefetch,
    reader,
};
use crate::nats::LazyBus;

/// Every flight of this process, by key.
pub struct Flights {
    bus: LazyBus,
    timing: reader::Timing,
    tasks: Tasks,
    live: Mutex<HashMap<Key, Arc<Flight>>>,
}

/// Puts the miss and join counters at zero, so that rules over every lookup (hits, misses,
/// joins) have a value before the first miss.
pub fn zero_counters() {
    metrics::counter!("versus_cache_misses_total").increment(0);
    metrics::counter!("versus_coalesced_total").increment(0);
}

impl Flights {
    /// Readers run on `tasks`; a reader gives up on a generation after `timeout`, and takes
    /// a generation whose last event is older than `lease` (the workers') for dead.
    pub fn new(bus: LazyBus, timeout: Duration, lease: Duration, tasks: Tasks) -> Arc<Flights> {
        Arc::new(Flights {
            bus,
            timing: reader::Timing { timeout, lease },
            tasks,
            live: Mutex::new(HashMap::new()),
        })
    }

    /// Waits on the generation of `key` if this process follows it already.
    pub fn join_existing(self: &Arc<Self>, key: &Key) -> Option<Waiter> {
        let live = lock(&self.live);
        let flight = live.get(key)?.clone();
        flight.waiters.fetch_add(1, Ordering::SeqCst);
        drop(live);
        metrics::counter!("versus_coalesced_total").increment(1);
        traces::link(&Span::current(), &flight.trace);
        Some(self.waiter(flight, key.clone()))
    }

    /// Whether this process follows the generation of `key`.
    pub fn follows(&self, key: &Key) -> bool {
        lock(&self.live).contains_key(key)
    }

    /// Waits on the generation of `job.key`, starting a reader if this process has none yet
    /// (which takes over `prefetch`, when the request made it).
    pub fn join(self: &Arc<Self>, job: Job, prefetch: Option<Prefetch>) -> Waiter {
        let mut live = lock(&self.live);
        let (flight, created) = match live.get(&job.key) {
            Some(flight) => (flight.clone(), None),
            None => {
                // A child of the request that starts the flight: the job it publishes, and
                // through it the worker's generation, are in that request's trace.
                let span = tracing::info_span!(
                    "flight",
                    versus.kind = %job.kind,
                    versus.key = %job.key,
                    versus.outcome = Empty,
                );
                let flight = Arc::new(Flight::new(job.kind, 0, traces::Link::of(&span)));
                live.insert(job.key.clone(), flight.clone());
                (flight, Some(span))
            }
        };
        flight.waiters.fetch_add(1, Ordering::SeqCst);
        drop(live);
        let key = job.key.clone();
        if let Some(span) = created {
            metrics::counter!("versus_cache_misses_total").increment(1);
            let (flights, flight, key) = (self.clone(), flight.clone(), key.clone());
            // Boxed: the reader's future stays small while it waits (M1 in BENCHMARKS.md).
            let prefetch = prefetch.map(Box::new);
            self.tasks.spawn(
                async move {
                    reader::run(&flights.bus, flights.timing, &flight, job, prefetch).await;
                    forget(&mut lock(&flights.live), &key, &flight);
                }
                .instrument(span),
            );
        } else {
            metrics::counter!("versus_coalesced_total").increment(1);
            traces::link(&Span::current(), &flight.trace);
        }
        self.waiter(flight, key)
    }

    fn waiter(self: &Arc<Self>, flight: Arc<Flight>, key: Key) -> Waiter {
        Waiter {
            rx: flight.notify.subscribe(),
            flight,
            next: 0,
            registry: Some((self.clone(), key)),
        }
    }
}

/// Forgets `flight` if it is still the live one for `key`.
fn forget(live: &mut HashMap<Key, Arc<Flight>>, key: &Key, flight: &Arc<Flight>) {
    if live.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
        live.remove(key);
    }
}

/// One request's place in a flight's log.
pub struct Waiter {
    flight: Arc<Flight>,
    rx: watch::Receiver<usize>,
    next: usize,
    /// Where the flight is registered, under which key (none for [`Waiter::ended`]).
    registry: Option<(Arc<Flights>, Key)>,
}

impl Waiter {
    /// A waiter on no generation that gets `event` and ends: a miss refused before any job.
    pub fn ended(event: Event) -> Waiter {
        let flight = Arc::new(Flight::new(Kind::Text, 1, traces::Link::default()));
        let rx = flight.notify.subscribe();
        flight.close(Some(event));
        Waiter {
            flight,
            rx,
            next: 0,
            registry: None,
        }
    }

    /// Whether this waiter follows a generation (one started or joined), rather than holding
    /// only the event that refused it ([`Waiter::ended`]).
    pub fn admitted(&self) -> bool {
        self.registry.is_some()
    }

    /// The next event, or None once the log closed and every event in it was returned.
    pub async fn next(&mut self) -> Option<Arc<Logged>> {
        loop {
            {
                let log = self.flight.log();
                if let Some(event) = log.events.get(self.next) {
                    self.next += 1;
                    return Some(event.clone());
                }
                if log.closed {
                    return None;
                }
            }
            // The sender lives in the flight this waiter holds, so this never fails; and the
            // reader always closes the log (and notifies) before it ends.
            let _ = self.rx.changed().await;
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let Some((flights, key)) = &self.registry else {
            return;
        };
        let mut live = lock(&flights.live);
        if self.flight.waiters.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Nobody here waits any more: stop reading. The generation itself goes on in the
            // workers, and a later request starts a new reader that replays it.
            self.flight.stop.cancel();
            forget(&mut live, key, &self.flight);
        }
    }
}
