//! Coalescing within one API process: one reader of a key's events subject, however many HTTP
//! requests wait on that key. The reader keeps every event of the generation in a log, so a
//! request that joins late replays it from the first message; across API replicas, the job's
//! `Nats-Msg-Id` makes identical misses one job.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, push},
    message::PublishMessage,
    stream::LastRawMessageErrorKind,
};
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use versus_shared::{
    bus::Bus,
    key::Key,
    wire::{self, Event, Job},
};

/// Every flight of this process, by key.
pub struct Flights {
    bus: Bus,
    timeout: Duration,
    live: Mutex<HashMap<Key, Arc<Flight>>>,
}

/// One generation as this process sees it.
pub struct Flight {
    log: Mutex<Log>,
    notify: watch::Sender<usize>,
    /// Requests waiting on this flight; changed only under the `live` lock.
    waiters: AtomicUsize,
    stop: CancellationToken,
}

#[derive(Default)]
struct Log {
    events: Vec<Arc<Event>>,
    closed: bool,
}

impl Flights {
    pub fn new(bus: Bus, timeout: Duration) -> Arc<Flights> {
        Arc::new(Flights {
            bus,
            timeout,
            live: Mutex::new(HashMap::new()),
        })
    }

    /// Waits on the generation of `job.key`, starting it if this process has no reader yet.
    pub fn join(self: &Arc<Self>, job: Job) -> Waiter {
        let mut live = lock(&self.live);
        let (flight, created) = match live.get(&job.key) {
            Some(flight) => (flight.clone(), false),
            None => {
                let (notify, _) = watch::channel(0);
                let flight = Arc::new(Flight {
                    log: Mutex::new(Log::default()),
                    notify,
                    waiters: AtomicUsize::new(0),
                    stop: CancellationToken::new(),
                });
                live.insert(job.key.clone(), flight.clone());
                (flight, true)
            }
        };
        flight.waiters.fetch_add(1, Ordering::SeqCst);
        drop(live);
        let key = job.key.clone();
        if created {
            metrics::counter!("versus_cache_misses_total").increment(1);
            tokio::spawn(read(self.clone(), flight.clone(), job));
        } else {
            metrics::counter!("versus_coalesced_total").increment(1);
        }
        Waiter {
            rx: flight.notify.subscribe(),
            flight,
            next: 0,
            flights: self.clone(),
            key,
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
    flights: Arc<Flights>,
    key: Key,
}

impl Waiter {
    /// The next event, or None once the generation's last event was returned.
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
            if self.rx.changed().await.is_err() {
                // The reader is gone; whatever it logged was drained above on the next turn.
                let log = lock(&self.flight.log);
                if self.next >= log.events.len() {
                    return None;
                }
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut live = lock(&self.flights.live);
        if self.flight.waiters.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Nobody here waits any more: stop reading. The generation itself goes on in the
            // workers, and a later request starts a new reader that replays it.
            self.flight.stop.cancel();
            forget(&mut live, &self.key, &self.flight);
        }
    }
}

impl Flight {
    fn push(&self, event: Event) -> bool {
        let terminal = event.is_terminal();
        let len = {
            let mut log = lock(&self.log);
            log.events.push(Arc::new(event));
            log.closed = terminal;
            log.events.len()
        };
        self.notify.send_replace(len);
        terminal
    }
}

/// The reader of one flight: decides where the key's history starts, publishes the job, and
/// logs events until a terminal one, the timeout, or the last waiter leaves.
async fn read(flights: Arc<Flights>, flight: Arc<Flight>, job: Job) {
    let key = job.key.clone();
    let ending = tokio::select! {
        () = flight.stop.cancelled() => None,
        r = tokio::time::timeout(flights.timeout, follow(&flights.bus, &flight, job)) => match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                tracing::warn!(%key, error = format!("{e:#}"), "following a generation failed");
                Some(Event::Error {
                    attempt: 0,
                    code: "unavailable".to_owned(),
                    message: "The service could not follow this answer. Please try again.".to_owned(),
                    retryable: true,
                })
            }
            Err(_) => Some(Event::Error {
                attempt: 0,
                code: "timeout".to_owned(),
                message: "The answer took too long. Please try again.".to_owned(),
                retryable: true,
            }),
        },
    };
    if let Some(event) = ending {
        flight.push(event);
    }
    {
        let mut log = lock(&flight.log);
        log.closed = true;
    }
    flight.notify.send_modify(|_| {});
    flights.remove(&key, &flight);
}

async fn follow(bus: &Bus, flight: &Flight, job: Job) -> anyhow::Result<()> {
    let subject = wire::events_subject(job.kind, &job.key);
    // The subject holds at most one attempt (workers purge before a new one). If that attempt
    // ended badly, read after it and ask for a new job; otherwise read it all, and ask for a
    // job anyway: it is a no-op for a live or finished generation, and restarts a lost one.
    let (deliver_policy, after) = match bus.events.get_last_raw_message_by_subject(&subject).await {
        Ok(last) => match serde_json::from_slice::<Event>(&last.payload) {
            Ok(Event::Error { .. } | Event::Purged) => (
                DeliverPolicy::ByStartSequence {
                    start_sequence: last.sequence + 1,
                },
                last.sequence,
            ),
            _ => (DeliverPolicy::All, last.sequence),
        },
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => (DeliverPolicy::All, 0),
        Err(e) => return Err(e.into()),
    };
    // Named, so that it can be deleted as soon as the flight ends: the server would otherwise
    // keep it for its inactivity threshold, and streams cap their consumers.
    let name = format!("flight-{}", uuid::Uuid::new_v4().simple());
    let consumer = bus.events.create_consumer(push::OrderedConfig {
        name: Some(name.clone()),
        deliver_subject: bus.client.new_inbox(),
        filter_subject: subject,
        deliver_policy,
        ..Default::default()
    });
    let publish = publish_job(&bus.js, &job, after);
    let (consumer, published) = tokio::join!(consumer, publish);
    let _delete = DeleteOnDrop {
        events: bus.events.clone(),
        name,
    };
    published?;
    let mut messages = consumer?.messages().await?;
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let event: Event = match serde_json::from_slice(&msg.payload) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "skipping an unreadable event");
                continue;
            }
        };
        if flight.push(event) {
            return Ok(());
        }
    }
    anyhow::bail!("the events subscription ended")
}

/// Deletes a flight's consumer when the flight ends, however it ends.
struct DeleteOnDrop {
    events: jetstream::stream::Stream,
    name: String,
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let events = self.events.clone();
        let name = std::mem::take(&mut self.name);
        tokio::spawn(async move {
            if let Err(e) = events.delete_consumer(&name).await {
                tracing::debug!(consumer = %name, error = %e, "deleting a flight's consumer failed");
            }
        });
    }
}

async fn publish_job(js: &jetstream::Context, job: &Job, after: u64) -> anyhow::Result<()> {
    let payload = serde_json::to_vec(job)?;
    let ack = js
        .send_publish(
            wire::job_subject(job.kind),
            PublishMessage::build()
                .payload(payload.into())
                .message_id(wire::job_msg_id(job.kind, &job.key, after)),
        )
        .await?
        .await?;
    if !ack.duplicate {
        metrics::counter!("versus_jobs_published_total").increment(1);
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
