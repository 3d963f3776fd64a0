//! The reader of one flight: follows its key's events with a core NATS subscription, reads
//! what the stream held before with batched direct gets, and publishes the job.
//!
//! A core subscription costs nats-server nothing per event of other keys (it matches subjects
//! through its subject tree; a JetStream consumer per key made every event visit every
//! consumer's filter). Core NATS loses messages in two ways, a reconnect and a subscription
//! overflow (`Bus::losses`), and an event that does not fit the log (a chunk after a hole, an
//! end the log never saw begin, a `done` longer than the text held) means one was lost: each
//! sends the reader back to the stored history. A `done` whose text the history cannot
//! complete (a nats-server restart empties the in-memory events stream) is completed from the
//! stored answer in the edge KV bucket.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, SystemTime},
};

use anyhow::Context;
use async_nats::jetstream;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use versus_shared::{
    bus::{self, Bus},
    history::{self, Last},
    retry, traces,
    wire::{self, Answer, ErrorCode, Event, ImageAnswer, Job, Kind},
};

use super::{
    flight::Flight,
    log::Offer,
    prefetch::{LastStored, Prefetch},
};
use crate::nats::LazyBus;

/// How long a flight waits for its generation, and how long the workers' lease lasts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// A flight gives up after this (`VERSUS_STREAM_TIMEOUT_SECS`); its job is published
    /// with this per-message TTL, so the stream drops it once nobody waits for it.
    pub timeout: Duration,
    /// The workers' lease (`VERSUS_LEASE_SECS`): a generation whose last event is older than
    /// this looks dead, and only then does a flight that joins it publish a job.
    pub lease: Duration,
}

/// Follows one flight until a terminal event, `timing.timeout`, or the last waiter leaves;
/// then closes its log.
pub(crate) async fn run(
    bus: &LazyBus,
    timing: Timing,
    flight: &Flight,
    job: Job,
    prefetch: Option<Box<Prefetch>>,
) {
    let key = job.key.clone();
    let queued = AtomicBool::new(false);
    // Flights start once the bus is found (`Path::wait_on`), and it stays.
    let Some(bus) = bus.get() else {
        flight.close(Some(Event::failed_with(
            ErrorCode::Unavailable,
            "This server cannot reach its message bus right now. Please try again shortly.",
            None,
        )));
        return;
    };
    let reading = tokio::time::timeout(
        timing.timeout,
        read_events(bus, timing, flight, job, prefetch, &queued),
    );
    let ending = tokio::select! {
        () = flight.stop.cancelled() => None,
        () = link_lost(bus, &queued) => Some(Event::failed_with(
            ErrorCode::Unavailable,
            "This server lost its link to the one that writes new answers. Please try again shortly.",
            None,
        )),
        read = reading => match read {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                tracing::warn!(%key, error = format!("{e:#}"), "following a generation failed");
                Some(Event::failed_with(
                    ErrorCode::Unavailable,
                    "The service could not follow this answer. Please try again.",
                    None,
                ))
            }
            Err(_) => Some(Event::failed(ErrorCode::Timeout, None)),
        },
    };
    flight.close(ending);
    if traces::enabled() {
        let outcome = match flight.log().events.last().map(|e| &***e) {
            Some(Event::Done { .. }) => "done".to_owned(),
            Some(Event::Error { code, .. }) => code.clone(),
            Some(Event::Purged) => "purged".to_owned(),
            _ => "left".to_owned(),
        };
        tracing::Span::current().record("versus.outcome", outcome);
    }
}

/// Resolves once a flight at an edge should give up on the hub: at once when the link is found
/// down before the hub acknowledged the flight's job (nothing is being generated for it), or
/// once the link has stayed down for [`LINK_GRACE`] after that.
async fn link_lost(bus: &Bus, queued: &AtomicBool) {
    bus.hub_lost(Duration::ZERO).await;
    if queued.load(Ordering::Relaxed) {
        bus.hub_lost(LINK_GRACE).await;
    }
}

/// At an edge, how long the link to the hub may stay down, once found down, before a
/// generation followed across it is given up (its clients are told to try again; the
/// generation itself goes on, and is a hit afterwards). Shorter outages, such as a leaf
/// reconnecting to another hub server after one died, cost its clients a pause: the flight
/// reads what it missed from the history when the link returns.
const LINK_GRACE: Duration = Duration::from_secs(10);

/// At an edge, how long a flight hears nothing before it reads the history, in case the event
/// that would have ended it was lost on the leaf link.
const EDGE_IDLE_CHECK: Duration = Duration::from_secs(1);

/// How many times a reader reads the history again for one event that does not fit, and how
/// long it waits first: an event reaches subscribers just before the stream stores it.
const RESYNC_TRIES: u32 = 4;
const RESYNC_PAUSE: Duration = Duration::from_millis(2);

/// Where a flight picks up a key's events, once the last stored one is known.
struct Resume {
    /// Replays of the history read what follows this sequence.
    base: u64,
    /// What job the flight asks for.
    ask: Ask,
}

/// The job a flight asks for, from the last event stored for its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// A new generation: the message id names the stream sequence of the last event seen
    /// (0 for none), so identical misses after the same event are one job, and a miss after a
    /// failed attempt is a new one.
    New { after: u64 },
    /// A generation is under way (its last event, stream sequence `last`, stored at `at`): a
    /// job only if it looks dead ([`stalled_for`]), so that joiners, however many and however
    /// often they reconnect, cost the workers nothing while it lives.
    UnderWay { last: u64, at: SystemTime },
    /// The stored events end otherwise (a `done` whose history the log could not complete,
    /// an unreadable event): a job named by that event, marked as for a generation under
    /// way, which finds the answer stored and announces it again.
    Repair { after: u64 },
}

/// How many whole leases a generation whose last event was stored at `at` has been silent
/// for, at `now`; None while it is within one lease (its worker is alive, or its job will be
/// delivered again once the lease runs out). A job published for a stall names this number
/// ([`wire::stalled_job_msg_id`]), so a dead generation gets one job per lease, whoever asks.
fn stalled_for(at: SystemTime, now: SystemTime, lease: Duration) -> Option<u64> {
    let quiet = now.duration_since(at).unwrap_or_default();
    let lease = lease.as_millis().max(1);
    let leases = (quiet.as_millis() / lease) as u64;
    (leases >= 1).then_some(leases)
}

/// The message id and `Versus-Live` mark of the job `ask` means at `now`; None when no job is
/// wanted (a generation under way and alive).
fn job_to_publish(job: &Job, ask: Ask, now: SystemTime, lease: Duration) -> Option<(String, bool)> {
    match ask {
        Ask::New { after } => Some((wire::job_msg_id(job.kind, &job.key, after), false)),
        Ask::Repair { after } => Some((wire::job_msg_id(job.kind, &job.key, after), true)),
        Ask::UnderWay { last, at } => stalled_for(at, now, lease).map(|leases| {
            (
                wire::stalled_job_msg_id(job.kind, &job.key, last, leases),
                true,
            )
        }),
    }
}

/// Logs the generation's events until it ends, starting from `prefetch` when the request
/// took the first steps. `queued` is set once the jobs stream acknowledged the job.
async fn read_events(
    bus: &Bus,
    timing: Timing,
    flight: &Flight,
    job: Job,
    prefetch: Option<Box<Prefetch>>,
    queued: &AtomicBool,
) -> anyhow::Result<()> {
    let subject = wire::events_subject(job.kind, &job.key);
    // Subscribe first: the server takes this connection's messages in order, so the
    // subscription is in place before the history is read and before the job is published.
    let Prefetch {
        began,
        mut live,
        losses,
        last,
    } = match prefetch {
        Some(prefetch) => *prefetch,
        None => Prefetch::subscribe(bus, &subject).await?,
    };
    // The rare or one-off steps are boxed: the reader's future stays small while it waits,
    // which is most of its life (M1 in BENCHMARKS.md).
    let last = match last {
        LastStored::Found(last) => Some(last),
        LastStored::Nothing => None,
        LastStored::Unread => Box::pin(read_last(bus, &subject)).await?,
    };
    let Some(resume) = Box::pin(resume_point(bus, flight, &job, &subject, last, &mut live)).await?
    else {
        return Ok(());
    };
    let accepted = match job_to_publish(&job, resume.ask, SystemTime::now(), timing.lease) {
        Some((msg_id, under_way)) => {
            Box::pin(publish_job(
                &bus.js,
                &job,
                msg_id,
                under_way,
                timing.timeout,
            ))
            .await?
        }
        // Joined a live generation: its worker holds the claim, and its own job comes back
        // should that worker die. Nothing to publish.
        None => {
            metrics::counter!("versus_joins_without_job_total").increment(1);
            true
        }
    };
    queued.store(true, Ordering::Relaxed);
    if !accepted && flight.log().attempt.is_none() {
        // The queue is full and nothing is being generated for this key: say so at once
        // rather than wait for a job that was never queued.
        flight.close(Some(Event::failed(
            ErrorCode::Busy,
            Some(wire::unix_ms() + QUEUE_FULL_RETRY.as_millis() as u64),
        )));
        return Ok(());
    }
    metrics::histogram!("versus_flight_setup_seconds").record(began.elapsed());
    follow(
        bus,
        timing,
        flight,
        &job,
        &subject,
        resume.base,
        live,
        losses,
    )
    .await
}

/// How long a client refused for a full queue is told to wait: a full queue drains in seconds.
const QUEUE_FULL_RETRY: Duration = Duration::from_secs(2);

/// The last event stored under `subject`. Through a NATS outage or an election of the events
/// stream's leader, the read is tried again for as long as a job publish would be.
async fn read_last(bus: &Bus, subject: &str) -> anyhow::Result<Option<Last>> {
    retry::last_event_read()
        .retry(|| history::last(bus, subject))
        .notify(|e, delay| {
            tracing::info!(%subject, error = format!("{e:#}"), ?delay, "reading the last event failed; retrying");
        })
        .await
}

/// Where the flight picks up, from the `last` event stored; None when the flight ended
/// already (a cool-down, or a history that holds the whole generation).
async fn resume_point(
    bus: &Bus,
    flight: &Flight,
    job: &Job,
    subject: &str,
    last: Option<Last>,
    live: &mut async_nats::Subscriber,
) -> anyhow::Result<Option<Resume>> {
    // A matchup cooling down after repeated failures (or refused for the day's budget) says
    // until when; before then a worker would only refuse again, so no job is published. A
    // refusal is final (only an operator's purge or `keep` changes it, and both clear the
    // events): a job would find the row refused, and the worker has nothing to tell again.
    if let Some(Last {
        event: Some(ended @ Event::Error { code, .. }),
        ..
    }) = &last
        && (ended.retry_after().is_some() || code == ErrorCode::Refused.as_str())
    {
        flight.close(Some(ended.clone()));
        return Ok(None);
    }
    // The subject holds at most one attempt (workers purge before a new one). If that attempt
    // ended badly, follow what comes after it and ask for a new job; otherwise read it all,
    // and ask for a job only if the generation looks dead (see `Ask::UnderWay`): one that
    // restarts a lost generation, never one that would wait on a live one.
    let resume = match last {
        Some(Last {
            seq,
            payload,
            event: Some(Event::Error { .. } | Event::Purged),
            ..
        }) => {
            // Whatever reached the subscription up to that end belongs to the failed attempt:
            // every copy of it arrived before the answer above, and it ends with that event.
            let mut early = Vec::new();
            while let Some(Some(msg)) = live.next().now_or_never() {
                early.push(msg.payload);
            }
            let stale = early
                .iter()
                .position(|p| *p == payload)
                .map_or(0, |i| i + 1);
            for payload in early.drain(stale..) {
                if offer_live(bus, flight, job, subject, seq, payload).await? {
                    return Ok(None);
                }
            }
            Resume {
                base: seq,
                ask: Ask::New { after: seq },
            }
        }
        Some(Last {
            seq, time, event, ..
        }) => {
            if replay(bus, flight, subject, 0).await? {
                return Ok(None);
            }
            let ask = match event {
                Some(Event::Started { .. } | Event::Chunk { .. } | Event::Partial { .. }) => {
                    Ask::UnderWay {
                        last: seq,
                        at: time,
                    }
                }
                _ => Ask::Repair { after: seq },
            };
            Resume { base: 0, ask }
        }
        None => Resume {
            base: 0,
            ask: Ask::New { after: 0 },
        },
    };
    Ok(Some(resume))
}

/// How long past the lease a flight hears nothing before it looks whether its generation
/// stalled.
const STALL_MARGIN: Duration = Duration::from_secs(1);

/// Follows the live events until the generation ends, reading the history (after `base`)
/// when one may have been lost. A flight that hears nothing for longer than the lease looks
/// whether the generation stalled ([`restart_stalled`]).
#[allow(clippy::too_many_arguments)]
async fn follow(
    bus: &Bus,
    timing: Timing,
    flight: &Flight,
    job: &Job,
    subject: &str,
    base: u64,
    mut live: async_nats::Subscriber,
    mut losses: watch::Receiver<u64>,
) -> anyhow::Result<()> {
    // At an edge, events also cross the leaf link, which drops them unseen while it reconnects
    // (to another hub server, say): a flight that hears nothing for a while reads the history.
    let idle = if bus.at_edge() {
        EDGE_IDLE_CHECK
    } else {
        Duration::MAX
    };
    let stall = timing.lease + STALL_MARGIN;
    loop {
        tokio::select! {
            () = tokio::time::sleep(stall) => {
                Box::pin(restart_stalled(bus, timing, job, subject)).await;
            }
            () = tokio::time::sleep(idle) => {
                if Box::pin(replay(bus, flight, subject, base)).await? {
                    return Ok(());
                }
            }
            msg = live.next() => {
                let msg = msg.context("the events subscription ended")?;
                // Only `started` and the end carry a trace context: a generation another
                // request (on another replica, say) set going is linked to.
                if let Some(headers) = &msg.headers {
                    traces::link_foreign(&tracing::Span::current(), headers);
                }
                if offer_live(bus, flight, job, subject, base, msg.payload).await? {
                    return Ok(());
                }
            }
            changed = losses.changed() => {
                changed.context("the NATS connection is gone")?;
                tracing::debug!(%subject, "messages may have been lost; reading the history");
                if Box::pin(replay(bus, flight, subject, base)).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// Offers one live event to the log, reading the history (from after `after`) when it does
/// not fit. True once the generation has ended.
async fn offer_live(
    bus: &Bus,
    flight: &Flight,
    job: &Job,
    subject: &str,
    after: u64,
    payload: bytes::Bytes,
) -> anyhow::Result<bool> {
    let Some(event) = history::decode(subject, &payload) else {
        return Ok(false);
    };
    let mut pause = RESYNC_PAUSE;
    for _ in 0..RESYNC_TRIES {
        match flight.offer(event.clone(), false) {
            Offer::Taken { ended } => return Ok(ended),
            Offer::Stale => return Ok(false),
            Offer::Gap => {}
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
        if Box::pin(replay(bus, flight, subject, after)).await? {
            return Ok(true);
        }
    }
    if let Event::Done { attempt, .. } = event {
        // The stream lost part of a finished attempt (a NATS restart empties the memory
        // stream), but the answer is whole in the edge KV bucket, written before `done`.
        return Box::pin(finish_from_store(bus, flight, job, attempt, event)).await;
    }
    // Still no place for it: it belongs to an attempt the history no longer holds.
    tracing::debug!(%subject, "dropping an event that fits no attempt");
    Ok(false)
}

/// Completes the log from the stored answer of `attempt`, then ends it with `done`.
async fn finish_from_store(
    bus: &Bus,
    flight: &Flight,
    job: &Job,
    attempt: i32,
    done: Event,
) -> anyhow::Result<bool> {
    let Some(bytes) = bus.answers.get(wire::kv_key(job.kind, &job.key)).await? else {
        return Ok(false);
    };
    let (stored, filler) = match job.kind {
        Kind::Text => {
            let answer: Answer = serde_json::from_slice(&bytes)?;
            let chunk = Event::Chunk {
                attempt,
                offset: 0,
                delta: answer.text,
            };
            (answer.attempt, chunk)
        }
        Kind::Image => {
            let answer: ImageAnswer = serde_json::from_slice(&bytes)?;
            (answer.attempt, Event::Started { attempt })
        }
    };
    // The picture is whole in the store: the partial images shown while it was drawn, lost
    // with the stream, are not needed any more.
    let done = match (job.kind, done) {
        (Kind::Image, Event::Done { attempt, model, .. }) => Event::Done {
            attempt,
            model,
            length: 0,
        },
        (_, done) => done,
    };
    if stored != attempt {
        return Ok(false);
    }
    tracing::info!(key = %job.key, attempt, "events were lost; finishing from the stored answer");
    flight.offer(filler, true);
    Ok(flight.offer(done, true) == Offer::Taken { ended: true })
}

/// Offers the stored events after sequence `after` to the log. True once the generation has
/// ended. An event that does not follow yet is offered again once what came before it is
/// taken: a worker publishes an event again (with the same message id) when a leader election
/// left it unacknowledged, and the stream may store it after later ones. A hole that nothing
/// fills waits for a new attempt, or for a `done` the stored answer completes.
async fn replay(bus: &Bus, flight: &Flight, subject: &str, after: u64) -> anyhow::Result<bool> {
    // Mid-generation, a NATS outage is worth waiting out (JetStream answers 503 for a moment
    // after a restart); the flight's own timeout bounds the wait.
    let stored = retry::history_read()
        .retry(|| history::read(bus, subject, after + 1))
        .notify(|e, delay| {
            tracing::info!(%subject, error = format!("{e:#}"), ?delay, "reading stored events failed; retrying");
        })
        .await?;
    let mut early: Vec<Event> = Vec::new();
    for event in stored {
        match flight.offer(event.clone(), true) {
            Offer::Taken { ended: true } => return Ok(true),
            Offer::Gap => early.push(event),
            Offer::Stale => {}
            Offer::Taken { ended: false } => {
                // What waited for this event may follow now, and what waited for that.
                let mut taken = true;
                while taken && !early.is_empty() {
                    taken = false;
                    for event in std::mem::take(&mut early) {
                        match flight.offer(event.clone(), true) {
                            Offer::Taken { ended: true } => return Ok(true),
                            Offer::Taken { ended: false } => taken = true,
                            Offer::Gap => early.push(event),
                            Offer::Stale => {}
                        }
                    }
                }
            }
        }
    }
    if !early.is_empty() {
        tracing::debug!(%subject, "the stored events have a hole");
    }
    Ok(false)
}

/// After a lease with no event: when the key's last stored event is a generation's
/// (`started`, a chunk, a partial image) older than the lease, its worker is presumably gone
/// and its job may be too (acknowledged by a copy that found the claim busy, say): a job for
/// the stall is published, named by it, so that every flight on every replica that finds the same stall
/// makes one job. A worker that finds the claim alive after all acknowledges it at once.
/// Failures are logged; the next silent lease tries again.
async fn restart_stalled(bus: &Bus, timing: Timing, job: &Job, subject: &str) {
    let last = match history::last(bus, subject).await {
        Ok(Some(last)) => last,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(%subject, error = format!("{e:#}"), "reading the last event failed");
            return;
        }
    };
    if !matches!(
        last.event,
        Some(Event::Started { .. } | Event::Chunk { .. } | Event::Partial { .. })
    ) {
        return;
    }
    let ask = Ask::UnderWay {
        last: last.seq,
        at: last.time,
    };
    let Some((msg_id, under_way)) = job_to_publish(job, ask, SystemTime::now(), timing.lease)
    else {
        return;
    };
    tracing::info!(key = %job.key, %msg_id, "the generation stalled for a lease; asking for a job");
    if let Err(e) = publish_job(&bus.js, job, msg_id, under_way, timing.timeout).await {
        tracing::warn!(key = %job.key, error = format!("{e:#}"), "publishing a job for a stalled generation failed");
    }
}

/// Publishes the job with `msg_id` (and `Versus-Live` when `under_way`), to expire from the
/// stream after `ttl`; false when the jobs stream is full (`VERSUS_MAX_QUEUED_JOBS`). A try that
/// fails or goes unacknowledged (a NATS outage, a leader election) is made again with the same
/// message id, so a job that had landed is not queued twice (see [`crate::publish`]).
async fn publish_job(
    js: &jetstream::Context,
    job: &Job,
    msg_id: String,
    under_way: bool,
    ttl: Duration,
) -> anyhow::Result<bool> {
    let payload = serde_json::to_vec(job)?;
    let acked = crate::publish::job(
        js,
        wire::job_subject(job.kind),
        payload.into(),
        msg_id,
        under_way,
        Some(ttl),
    )
    .await;
    match acked {
        Ok(ack) => {
            if !ack.duplicate {
                metrics::counter!("versus_jobs_published_total").increment(1);
            }
            Ok(true)
        }
        Err(e) if bus::is_full(&e) => {
            metrics::counter!("versus_jobs_refused_total", "reason" => "queue_full").increment(1);
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use versus_shared::{
        key::Key,
        wire::{self, Job, Kind},
    };

    use super::{Ask, job_to_publish, stalled_for};

    fn job() -> Job {
        Job {
            kind: Kind::Text,
            key: Key::parse("0123456789abcdef0123456789abcdef").unwrap(),
            a: "a".into(),
            b: "b".into(),
            model: "m".into(),
            prompt_version: 1,
            size: None,
        }
    }

    #[test]
    fn a_live_generation_is_joined_without_a_job_and_a_dead_one_gets_one_per_lease() {
        let lease = Duration::from_secs(30);
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let after = |secs| at + Duration::from_secs(secs);
        assert_eq!(stalled_for(at, after(0), lease), None);
        assert_eq!(stalled_for(at, after(29), lease), None);
        // A clock behind the server's is no stall.
        assert_eq!(stalled_for(after(5), at, lease), None);
        assert_eq!(stalled_for(at, after(30), lease), Some(1));
        assert_eq!(stalled_for(at, after(59), lease), Some(1));
        assert_eq!(stalled_for(at, after(61), lease), Some(2));

        let job = job();
        let under_way = Ask::UnderWay { last: 42, at };
        assert_eq!(job_to_publish(&job, under_way, after(10), lease), None);
        // Every joiner within the same lease names the same job; the next lease, another.
        let first = job_to_publish(&job, under_way, after(31), lease).unwrap();
        assert_eq!(
            first,
            job_to_publish(&job, under_way, after(50), lease).unwrap()
        );
        assert!(first.1, "marked under way: its claim may still be held");
        let second = job_to_publish(&job, under_way, after(65), lease).unwrap();
        assert_ne!(first.0, second.0);
        assert_ne!(first.0, wire::job_msg_id(job.kind, &job.key, 42));
        // Stored events that end otherwise ask for the job that repairs them, at once.
        assert_eq!(
            job_to_publish(&job, Ask::Repair { after: 42 }, at, lease),
            Some((wire::job_msg_id(job.kind, &job.key, 42), true))
        );
        // A new generation is asked for at once, named by what was seen.
        assert_eq!(
            job_to_publish(&job, Ask::New { after: 7 }, at, lease),
            Some((wire::job_msg_id(job.kind, &job.key, 7), false))
        );
    }
}
