//! A request's way through the miss path: [`Path::find`] looks the answer up (memory, then
//! the KV bucket, the refusals and the flight's [`Prefetch`] at once), and [`Path::wait_on`]
//! gathers what [`admit`] needs, carries out its decision and hands back a [`Waiter`].

use std::{net::IpAddr, pin::pin, sync::Arc};

use axum::http::HeaderMap;
use futures::future::{self, Either};
use versus_shared::{
    budget::{self, Budget},
    bus::Bus,
    history,
    key::Key,
    wire::{self, Job},
};

use super::{
    admit::{Admission, Facts, Reach, admit},
    flights::{Flights, Waiter},
    prefetch::{LastStored, Prefetch},
};
use crate::{cache, error::ApiError, limits::Limits, nats::LazyBus, origin::Origins, quota::Quota};

/// What the miss path reads and decides with: borrowed from the app's state.
pub(crate) struct Path<'a> {
    pub bus: &'a LazyBus,
    pub flights: &'a Arc<Flights>,
    pub refusals: &'a cache::Refusals,
    pub origins: &'a Origins,
    pub limits: &'a Limits,
    pub quota: &'a Quota,
    pub budget: &'a Budget,
}

/// What [`Path::find`] found of a matchup.
pub(crate) enum Found<V> {
    /// Its finished answer.
    Stored(Arc<cache::Cached<V>>),
    /// No answer: [`Path::wait_on`] takes it from there.
    Missing(Miss),
}

/// A matchup with no stored answer: whether moderation refused it, and the first steps of its
/// flight when they were taken meanwhile.
pub(crate) struct Miss {
    refused: bool,
    prefetch: Option<Prefetch>,
}

impl Path<'_> {
    /// The stored answer of `key` from this replica's memory; else, all at once, the KV
    /// bucket and, unless this process follows the key already (its flight's first request
    /// read them), the refusals and the first steps of the flight a miss starts
    /// ([`Prefetch`]; not while an edge's link to the hub is down, when a miss is refused
    /// anyway, nor without `prefetch`, for a client known to be refused a new generation): a
    /// miss then costs one round trip before its job is published, not three. A
    /// hit is answered as soon as the KV bucket has it; the other reads are dropped.
    pub async fn find<V: cache::Entry>(
        &self,
        cache: &cache::EdgeCache<V>,
        key: &Key,
        prefetch: bool,
    ) -> Found<V> {
        if let Some(hit) = cache.in_memory(key) {
            return Found::Stored(hit);
        }
        let following = self.flights.follows(key);
        // While NATS is not connected, a reconnect may be moments away (a restart, a failover);
        // past that, the miss is refused at once (`wait_on`). Joining a flight of this process
        // needs no NATS.
        let bus = if following {
            self.bus.now()
        } else {
            self.bus.within_grace().await
        };
        let Some(bus) = bus else {
            return Found::Missing(Miss {
                refused: false,
                prefetch: None,
            });
        };
        let stored = pin!(cache.lookup(key));
        let rest = pin!(async {
            tokio::join!(
                async { !following && self.refusals.refused(V::KIND, key).await },
                async {
                    if following || !prefetch || !bus.hub_up() {
                        None
                    } else {
                        Prefetch::read(bus, V::KIND, key).await
                    }
                },
            )
        });
        let (stored, (refused, prefetch)) = match future::select(stored, rest).await {
            Either::Left((Some(hit), _)) => return Found::Stored(hit),
            Either::Left((None, rest)) => (None, rest.await),
            Either::Right((rest, stored)) => (stored.await, rest),
        };
        match stored {
            Some(hit) => Found::Stored(hit),
            None => Found::Missing(Miss { refused, prefetch }),
        }
    }

    /// Waits on the generation `job` asks for, on a `miss`, as [`admit`] decides from what is
    /// known: a request from `client` with `headers`.
    pub async fn wait_on(
        &self,
        job: Job,
        miss: Miss,
        headers: &HeaderMap,
        client: IpAddr,
    ) -> Result<Waiter, ApiError> {
        let bus = self.bus.now();
        let mut facts = Facts {
            other_site: self.origins.check(headers).is_err(),
            followed: self.flights.follows(&job.key),
            refused: miss.refused,
            reach: match bus {
                None => Reach::NoBus,
                Some(bus) if !bus.hub_up() => Reach::NoHub,
                Some(_) => Reach::Workers,
            },
            budget_spent_until: self
                .budget
                .exhausted_for(job.kind)
                .then(|| wire::unix_ms() + budget::until_tomorrow().as_millis() as u64),
            limited: self.limits.limited(job.kind),
            quota: self.quota.on(),
            joins_limited: self.limits.joins_limited(),
            under_way: miss
                .prefetch
                .as_ref()
                .and_then(|prefetch| prefetch.last.under_way()),
        };
        loop {
            match admit(&facts) {
                Admission::Refuse(error) => return Err(error),
                Admission::Join { charged } => match self.flights.join_existing(&job.key) {
                    Some(waiter) => {
                        if charged {
                            // Refused, the waiter is dropped: it leaves the flight.
                            self.limits.admit_join(client)?;
                        }
                        return Ok(waiter);
                    }
                    // Its flight ended meanwhile.
                    None => facts.followed = false,
                },
                Admission::End(ending) => {
                    metrics::counter!(ending.counter(), "kind" => job.kind.as_str()).increment(1);
                    return Ok(Waiter::ended(ending.event()));
                }
                Admission::ReadUnderWay => {
                    // Reach::Workers: the bus is there.
                    let under_way = match bus {
                        Some(bus) => under_way(bus, &job).await,
                        None => false,
                    };
                    facts.under_way = Some(under_way);
                }
                Admission::Follow { charged } => {
                    if charged {
                        self.limits.admit_join(client)?;
                    }
                    let waiter = self.flights.join(job, miss.prefetch);
                    tokio::task::yield_now().await;
                    return Ok(waiter);
                }
                Admission::Start { charged } => {
                    if charged {
                        // The per-minute limit first: it is this replica's own, so a client
                        // over it costs the quota bucket nothing.
                        self.limits.admit(job.kind, client)?;
                        if let Some(bus) = bus {
                            let worst = self.budget.worst_case(job.kind);
                            self.quota
                                .charge(&bus.quota, job.kind, client, worst)
                                .await?;
                        }
                    }
                    let waiter = self.flights.join(job, miss.prefetch);
                    // A reader spawned from this task waits in this worker thread's LIFO slot
                    // until this task yields: yield now, so that it publishes the job before
                    // this task writes the response's head and first event rather than after.
                    tokio::task::yield_now().await;
                    return Ok(waiter);
                }
            }
        }
    }
}

/// Whether the events stream shows `job` being generated now (by a worker that a request to
/// another replica, or an operator's pre-warm, set going). Unsure counts as no.
async fn under_way(bus: &Bus, job: &Job) -> bool {
    let subject = wire::events_subject(job.kind, &job.key);
    LastStored::of(history::last(bus, &subject).await)
        .under_way()
        .unwrap_or(false)
}
