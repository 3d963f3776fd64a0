//! The miss path: however many requests of this process wait on one answer, one reader
//! follows its generation, and every request replays that reader's log from the first event,
//! so a request that joins late gets everything. Across API replicas, the job's
//! `Nats-Msg-Id` makes identical misses one job.
//!
//! - this file: the registry of flights (one per key waited on) and their waiters;
//! - [`log`]: the pure log that takes each event of a generation once, in order;
//! - [`reader`]: the NATS side: the key's subscription, its stored history, the job.

mod log;
mod reader;

pub use reader::Early;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, field::Empty};
use versus_shared::{
    key::Key,
    tasks::Tasks,
    traces,
    wire::{Event, Job},
};

use log::{Log, Offer};

use crate::nats::LazyBus;

/// Every flight of this process, by key.
pub struct Flights {
    bus: LazyBus,
    timeout: Duration,
    tasks: Tasks,
    live: Mutex<HashMap<Key, Arc<Flight>>>,
}

/// One generation as this process sees it.
struct Flight {
    log: Mutex<Log>,
    /// Moves whenever the log grows or closes.
    notify: watch::Sender<usize>,
    /// Requests waiting on this flight; changed only under the `live` lock.
    waiters: AtomicUsize,
    /// Fires when the last waiter leaves: the reader stops.
    stop: CancellationToken,
    /// The reader's `flight` span, which requests that join link to (empty without traces).
    trace: traces::Link,
}

/// Puts the miss and join counters at zero, so that rules over every lookup (hits, misses,
/// joins) have a value before the first miss.
pub fn zero_counters() {
    metrics::counter!("versus_cache_misses_total").increment(0);
    metrics::counter!("versus_coalesced_total").increment(0);
}

impl Flights {
    /// Readers run on `tasks`; a reader gives up on a generation after `timeout`.
    pub fn new(bus: LazyBus, timeout: Duration, tasks: Tasks) -> Arc<Flights> {
        Arc::new(Flights {
            bus,
            timeout,
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
    /// (which takes over `early`, when the request read it).
    pub fn join(self: &Arc<Self>, job: Job, early: Option<Early>) -> Waiter {
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
                let (notify, _) = watch::channel(0);
                let flight = Arc::new(Flight {
                    log: Mutex::new(Log::default()),
                    notify,
                    waiters: AtomicUsize::new(0),
                    stop: CancellationToken::new(),
                    trace: traces::Link::of(&span),
                });
                live.insert(job.key.clone(), flight.clone());
                (flight, Some(span))
            }
        };
        flight.waiters.fetch_add(1, Ordering::SeqCst);
        drop(live);
        let key = job.key.clone();
        if let Some(span) = created {
            metrics::counter!("versus_cache_misses_total").increment(1);
            self.tasks.spawn(
                reader::run(self.clone(), flight.clone(), job, early.map(Box::new))
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

    /// Forgets `flight` if it is still the live one for `key`.
    fn remove(&self, key: &Key, flight: &Arc<Flight>) {
        forget(&mut lock(&self.live), key, flight);
    }
}

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
        let (notify, rx) = watch::channel(0);
        let flight = Arc::new(Flight {
            log: Mutex::new(Log::default()),
            notify,
            waiters: AtomicUsize::new(1),
            stop: CancellationToken::new(),
            trace: traces::Link::default(),
        });
        flight.close(Some(event));
        Waiter {
            flight,
            rx,
            next: 0,
            registry: None,
        }
    }

    /// The next event, or None once the log closed and every event in it was returned.
    pub async fn next(&mut self) -> Option<Arc<Event>> {
        loop {
            {
                let log = lock(&self.flight.log);
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

impl Flight {
    fn offer(&self, event: Event, stored: bool) -> Offer {
        let (offer, len) = {
            let mut log = lock(&self.log);
            let offer = log.offer(event, stored);
            (offer, log.events.len())
        };
        if matches!(offer, Offer::Taken { .. }) {
            self.notify.send_replace(len);
            if len == 1 {
                // Called by the reader, inside its flight's span.
                traces::event(&Span::current(), "first event");
            }
        }
        offer
    }

    /// Closes the log, first ending it with `event` of this process's own (a timeout, a lost
    /// bus) unless it already ended.
    fn close(&self, event: Option<Event>) {
        let len = {
            let mut log = lock(&self.log);
            if let Some(event) = event.filter(|_| !log.closed) {
                log.events.push(Arc::new(event));
            }
            log.closed = true;
            log.events.len()
        };
        self.notify.send_replace(len);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
