//! One generation as this process sees it: its log, and the signal that wakes its waiters.
//! The reader offers events and closes it; waiters read it (see [`super::flights`]).

use std::sync::{Arc, Mutex, PoisonError, atomic::AtomicUsize};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Span;
use versus_shared::{
    traces,
    wire::{Event, Kind},
};

use super::log::{Log, Logged, Offer};

pub(crate) struct Flight {
    pub(crate) log: Mutex<Log>,
    /// Moves whenever the log grows or closes.
    pub(crate) notify: watch::Sender<usize>,
    /// Requests waiting on this flight; changed only under the registry's lock.
    pub(crate) waiters: AtomicUsize,
    /// Fires when the last waiter leaves: the reader stops.
    pub(crate) stop: CancellationToken,
    /// The reader's `flight` span, which requests that join link to (empty without traces).
    pub(crate) trace: traces::Link,
}

impl Flight {
    /// A flight of a generation of `kind` with an empty log, and `waiters` waiting on it.
    pub(crate) fn new(kind: Kind, waiters: usize, trace: traces::Link) -> Flight {
        let (notify, _) = watch::channel(0);
        let log = match kind {
            Kind::Text => Log::default(),
            Kind::Image => Log::of_picture(),
        };
        Flight {
            log: Mutex::new(log),
            notify,
            waiters: AtomicUsize::new(waiters),
            stop: CancellationToken::new(),
            trace,
        }
    }

    pub(crate) fn offer(&self, event: Event, stored: bool) -> Offer {
        let (offer, len) = {
            let mut log = self.log();
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
    pub(crate) fn close(&self, event: Option<Event>) {
        let len = {
            let mut log = self.log();
            if let Some(event) = event.filter(|_| !log.closed) {
                log.events.push(Arc::new(Logged::new(event)));
            }
            log.closed = true;
            log.events.len()
        };
        self.notify.send_replace(len);
    }

    pub(crate) fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        lock(&self.log)
    }
}

/// A lock that a panic elsewhere does not poison: the log and registry stay consistent
/// between statements.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
