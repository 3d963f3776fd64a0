//! Connecting to NATS and what Versus needs on it (the jobs and events streams, the answers,
//! spend and quota KV buckets).
//!
//! Each process connects as its own NATS user (`nats.conf`), and only workers may change the
//! streams: a worker declares them (idempotently, at start-up, and again whenever one goes
//! missing: see `keep_declared`), while the API only looks them up, waiting until a
//! worker has declared them. The API does that in the background ([`Bus::dial`] returns at
//! once, [`Bus::attach`] waits), so that it serves before NATS is up.
//!
//! An API at an edge ([`Role::Edge`]) connects to its edge's nats-server, a leaf node of the
//! hub with a JetStream domain of its own (`nats-edge.conf`): it reaches the streams and the
//! buckets on the hub through the hub's domain, keeps a read-only mirror of the answers bucket
//! in its own domain (hits read it, with no hub round trip), and watches the leaf link.
//!
//! The module's parts:
//!
//! - this file: the roles ([`Role`]), the [`Bus`] handle (connecting, and its small accessors),
//!   and [`is_full`];
//! - `login`: how a process logs in: credentials out of `NATS_URL` or `NATS_CREDS`, TLS, and
//!   the connect options;
//! - `link`: an edge's watch of its leaf link to the hub ([`HubLink`]);
//! - [`follow`]: following a bucket's changes for as long as the process runs;
//! - `topology`: declaring, looking up and reconciling the streams and buckets (the edge's
//!   mirror included), and the worker's watchdog that declares a missing one again
//!   (`keep_declared`).

pub mod follow;
mod link;
mod login;
mod topology;

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, kv, stream};
use tokio::sync::watch;

pub use self::link::HubLink;
pub use self::topology::EVENTS_PER_SUBJECT;
use self::{
    link::watch_link,
    login::connect_options,
    topology::{
        Topology, declare, declare_mirror, keep_declared, look_up, until_done, zero_counters,
    },
};
use crate::{config::NatsSettings, tasks::Tasks, wire};

/// Whether a publish failed because the jobs stream is full (`VERSUS_MAX_QUEUED_JOBS`): the
/// server's "store failed" answer, which a stream that discards new messages gives when full.
pub fn is_full(error: &jetstream::context::PublishError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .is_some_and(|e| e.error_code() == jetstream::ErrorCode::STREAM_STORE_FAILED)
}

/// Who a process is on the bus. Its NATS user (`nats.conf`, `nats-edge.conf`) allows what the
/// role does, and nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role<'a> {
    /// Publishes jobs, popularity and purge notices, reads events and the KV buckets; looks
    /// the streams and buckets up, and waits for a worker to declare them.
    Api,
    /// The API at an edge: as [`Role::Api`], on the hub whose JetStream domain `hub` names,
    /// across the leaf link; it declares the mirror of the answers bucket in its own domain.
    Edge { hub: &'a str },
    /// Writes events, answers and spend; declares the streams, buckets and consumers.
    Worker,
}

impl Role<'_> {
    /// The client name the server shows for this process's connection.
    pub fn client_name(self) -> &'static str {
        match self {
            Role::Api | Role::Edge { .. } => "versus-api",
            Role::Worker => "versus-worker",
        }
    }

    /// Where this process's requests get their answers (its `_INBOX`): one prefix per role, so
    /// that each role may subscribe to its own answers only (`nats.conf`), and a worker
    /// answers a purge request only on the API's ([`wire::API_INBOX_PREFIX`]).
    pub fn inbox_prefix(self) -> &'static str {
        match self {
            Role::Api | Role::Edge { .. } => wire::API_INBOX_PREFIX,
            Role::Worker => wire::WORKER_INBOX_PREFIX,
        }
    }
}

/// A connected client with handles on everything Versus uses. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    /// JetStream where the streams are: the hub's domain at an edge.
    pub js: jetstream::Context,
    /// The subject prefix of that JetStream's API (`$JS.API`, or `$JS.<hub>.API` at an edge),
    /// for requests made by hand.
    pub api_prefix: String,
    pub jobs: stream::Stream,
    pub events: stream::Stream,
    /// The answers bucket itself, where workers write (on the hub).
    pub answers: kv::Store,
    /// Where this process reads answers first: the edge's mirror of [`Bus::answers`] at an
    /// edge (it may lag the bucket by a moment, or by an outage of the link), else the
    /// bucket.
    pub nearest_answers: kv::Store,
    /// Each UTC day's spend, cluster-wide (see [`crate::budget`]).
    pub spend: kv::Store,
    /// What each client's new generations were charged per UTC day, cluster-wide (the API's
    /// daily quota per client). At an edge it is the hub's bucket, reached through the hub's
    /// domain: async-nats then writes to `$JS.<hub>.API.$KV.versus_quota.<key>`, which the
    /// hub maps to the bucket's own subjects.
    pub quota: kv::Store,
    /// Moves whenever core NATS messages may have been lost on this connection: after a
    /// reconnect, or when a subscription overflowed. Readers of core subscriptions resync.
    pub losses: watch::Receiver<u64>,
    /// At an edge, whether the hub answers across the leaf link (see [`HubLink`]).
    pub hub_link: Option<watch::Receiver<HubLink>>,
}

/// A client that connects in the background ([`Bus::dial`]), before [`Bus::attach`] finds
/// the streams and buckets.
pub struct Dialed {
    pub client: async_nats::Client,
    losses: watch::Receiver<u64>,
    reconnects: watch::Receiver<u64>,
}

/// How often a client pings a server that has sent nothing. The client gives the server up at
/// the third tick without a word from it: after 15 s (async-nats's default of a minute made a
/// hung server look alive for three).
const PING_EVERY: Duration = Duration::from_secs(5);

impl Bus {
    /// Connects (retrying until NATS is up) as `role`: a worker declares the streams and
    /// buckets (and runs, on `tasks`, the watchdog that declares again any that goes missing:
    /// `keep_declared`); the API looks them up, waiting until they are there.
    pub async fn connect(
        settings: &NatsSettings,
        role: Role<'_>,
        tasks: &Tasks,
    ) -> anyhow::Result<Bus> {
        let dialed = Bus::dial(settings, role).await?;
        Bus::attach(dialed, settings, role, tasks).await
    }

    /// The first half of [`Bus::connect`], which returns at once: a client that connects (and
    /// reconnects) in the background. Requests made on it before it connects wait in its
    /// queue, and its subscriptions are made once it connects.
    pub async fn dial(settings: &NatsSettings, role: Role<'_>) -> anyhow::Result<Dialed> {
        let (lost, losses) = watch::channel(0u64);
        let (reconnected, reconnects) = watch::channel(0u64);
        let (options, servers) = connect_options(settings).await?;
        let client = options
            .name(role.client_name())
            .custom_inbox_prefix(role.inbox_prefix())
            .event_callback(move |event| {
                use async_nats::Event;
                match &event {
                    Event::Connected => {
                        reconnected.send_modify(|n| *n += 1);
                        lost.send_modify(|n| *n += 1);
                    }
                    Event::SlowConsumer(_) => lost.send_modify(|n| *n += 1),
                    _ => {}
                }
                // Events carry no address and no credentials.
                tracing::info!(%event, "nats connection");
                std::future::ready(())
            })
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            // A server that hangs (stopped, or a link that drops packets without closing)
            // answers no ping: the client reconnects, and the API refuses misses at once
            // meanwhile, rather than after each request's own timeouts. Anything the server
            // sends counts as an answer, so a busy one never trips it.
            .ping_interval(PING_EVERY)
            .connect(servers)
            .await
            .context("connecting to NATS (NATS_URL)")?;
        Ok(Dialed {
            client,
            losses,
            reconnects,
        })
    }

    /// The second half of [`Bus::connect`]: waits for the connection `dialed` makes, then
    /// declares or looks up the streams and buckets as `role` does, retrying until that works
    /// or `tasks` shut down.
    pub async fn attach(
        dialed: Dialed,
        settings: &NatsSettings,
        role: Role<'_>,
        tasks: &Tasks,
    ) -> anyhow::Result<Bus> {
        let Dialed {
            client,
            losses,
            reconnects,
        } = dialed;
        let (js, api_prefix) = match role {
            Role::Edge { hub } => (
                jetstream::with_domain(client.clone(), hub),
                format!("$JS.{hub}.API"),
            ),
            Role::Api | Role::Worker => (jetstream::new(client.clone()), "$JS.API".to_owned()),
        };
        let (jobs, events, answers, spend, quota) = match role {
            Role::Worker => {
                let topology = Topology::of(settings);
                let declared = until_done(
                    "declaring the streams and buckets failed (JetStream not ready?)",
                    tasks.shutdown(),
                    || declare(&js, &topology),
                )
                .await?;
                zero_counters(&topology);
                tasks.spawn(keep_declared(
                    js.clone(),
                    topology,
                    reconnects,
                    tasks.shutdown().clone(),
                ));
                declared
            }
            Role::Api | Role::Edge { .. } => {
                until_done(
                    "waiting for a worker to declare the streams and buckets",
                    tasks.shutdown(),
                    || look_up(&js),
                )
                .await?
            }
        };
        let (nearest_answers, hub_link) = match role {
            Role::Edge { hub } => {
                let local = jetstream::new(client.clone());
                let mirror = until_done(
                    "declaring the edge's mirror of the answers bucket",
                    tasks.shutdown(),
                    || declare_mirror(&local, hub),
                )
                .await?;
                let (link, hub_link) = watch::channel(HubLink::Up);
                tasks.spawn(watch_link(
                    client.clone(),
                    api_prefix.clone(),
                    link,
                    tasks.shutdown().clone(),
                ));
                (mirror, Some(hub_link))
            }
            Role::Api | Role::Worker => (answers.clone(), None),
        };
        Ok(Bus {
            client,
            js,
            api_prefix,
            jobs,
            events,
            answers,
            nearest_answers,
            spend,
            quota,
            losses,
            hub_link,
        })
    }

    /// True when the connection is up and JetStream answers: for both streams, or at an
    /// edge, for its mirror (a cut-off edge still serves hits).
    pub async fn ready(&self) -> bool {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return false;
        }
        if self.at_edge() {
            return self.nearest_answers.status().await.is_ok();
        }
        self.jobs.get_info().await.is_ok() && self.events.get_info().await.is_ok()
    }

    /// Whether this process is an API at an edge ([`Role::Edge`]).
    pub fn at_edge(&self) -> bool {
        self.hub_link.is_some()
    }

    /// False while an edge's link to the hub is down: a miss cannot reach the hub, so it is
    /// refused at once. Always true off an edge.
    pub fn hub_up(&self) -> bool {
        self.hub_link
            .as_ref()
            .is_none_or(|link| *link.borrow() == HubLink::Up)
    }

    /// Resolves once an edge's link to the hub has been down for `grace` (never off an
    /// edge): what a generation followed across the link waits for before it gives up.
    pub async fn hub_lost(&self, grace: Duration) {
        let Some(mut link) = self.hub_link.clone() else {
            return std::future::pending().await;
        };
        loop {
            let down_since = match *link.borrow_and_update() {
                HubLink::Down { since } => Some(since),
                HubLink::Up => None,
            };
            match down_since {
                Some(since) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(since + grace) => return,
                        changed = link.changed() => if changed.is_err() {
                            return std::future::pending().await;
                        },
                    }
                }
                None => {
                    if link.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                }
            }
        }
    }
}
