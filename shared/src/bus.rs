//! Connecting to NATS and what Versus needs on it (the jobs and events streams, the answers and
//! spend KV buckets).
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

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use async_nats::{
    ServerAddr,
    jetstream::{self, kv, stream},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{NatsSettings, Secret},
    tasks::Tasks,
    wire,
};

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

/// What an edge knows of its leaf link to the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubLink {
    Up,
    /// Found down at this instant.
    Down {
        since: tokio::time::Instant,
    },
}

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
        let (jobs, events, answers, spend) = match role {
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

/// How often an edge asks the hub's JetStream for its account information across the leaf
/// link, and how long it waits for the answer.
const LINK_PROBE_EVERY: Duration = Duration::from_millis(250);
const LINK_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The link is down once every ask for this long found no route ("no responders": the edge
/// server has no leaf connection to the hub, or has not yet had the hub's interest back after
/// reconnecting; the hub's servers answer `$JS.<hub>.API.>` whatever their streams are doing).
/// A leaf reconnecting to another hub server after one died takes half a second when idle and
/// over two on a loaded machine, which must not count.
const LINK_DOWN_NO_ROUTE: Duration = Duration::from_secs(3);
/// Or once nothing has answered for this long (a link that hangs without closing): longer
/// than a JetStream meta-leader election, during which the asks go unanswered.
const LINK_DOWN_SILENCE: Duration = Duration::from_secs(15);

/// Keeps `link` up to date: asks the hub's JetStream (`{api_prefix}.INFO`) every
/// [`LINK_PROBE_EVERY`]. Only the link's absence gives "no responders" at once; a hub busy
/// electing leaders gives no answer, which counts only after [`LINK_DOWN_SILENCE`].
async fn watch_link(
    client: async_nats::Client,
    api_prefix: String,
    link: watch::Sender<HubLink>,
    shutdown: CancellationToken,
) {
    use async_nats::client::RequestErrorKind;
    let subject = format!("{api_prefix}.INFO");
    let mut answered_at = tokio::time::Instant::now();
    let mut routed_at = answered_at;
    let probe = async {
        loop {
            let asked = tokio::time::Instant::now();
            let ask = tokio::time::timeout(
                LINK_PROBE_TIMEOUT,
                client.request(subject.clone(), bytes::Bytes::new()),
            )
            .await;
            let now = tokio::time::Instant::now();
            let no_route = matches!(
                &ask,
                Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders
            );
            if !no_route {
                routed_at = now;
            }
            if matches!(ask, Ok(Ok(_))) {
                answered_at = now;
                link.send_if_modified(|state| {
                    let was_down = *state != HubLink::Up;
                    if was_down {
                        tracing::info!("the hub answers across the leaf link again");
                    }
                    *state = HubLink::Up;
                    was_down
                });
            } else {
                let (unrouted, silent) = (now - routed_at, now - answered_at);
                let down = unrouted >= LINK_DOWN_NO_ROUTE || silent >= LINK_DOWN_SILENCE;
                if down && *link.borrow() == HubLink::Up {
                    tracing::warn!(
                        ?unrouted,
                        ?silent,
                        "the hub does not answer across the leaf link: misses are refused until it does"
                    );
                    link.send_replace(HubLink::Down { since: now });
                }
            }
            tokio::time::sleep_until(asked + LINK_PROBE_EVERY).await;
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = probe => {}
    }
}

/// The edge's mirror of the hub's answers bucket, in the edge's own domain, created when
/// missing. It has the origin's name, so it is read like the bucket.
async fn declare_mirror(local: &jetstream::Context, hub: &str) -> anyhow::Result<kv::Store> {
    let name = format!("KV_{}", wire::ANSWERS_BUCKET);
    if existing_config(local, &name).await?.is_none() {
        local
            .create_key_value(kv::Config {
                bucket: wire::ANSWERS_BUCKET.to_owned(),
                description: format!(
                    "A read-only mirror of the answers bucket of the hub (domain {hub})"
                ),
                history: 1,
                storage: stream::StorageType::File,
                // The hub's domain, as its API prefix: async-nats would turn `domain` into
                // this too, but also send `domain` itself, which nats-server refuses.
                mirror: Some(stream::Source {
                    name: wire::ANSWERS_BUCKET.to_owned(),
                    external: Some(stream::External {
                        api_prefix: format!("$JS.{hub}.API"),
                        delivery_prefix: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .context("creating the edge's mirror of the answers bucket")?;
    }
    local
        .get_key_value(wire::ANSWERS_BUCKET)
        .await
        .context("opening the edge's mirror of the answers bucket")
}

/// The streams and buckets: jobs, events, answers, spend.
type Handles = (stream::Stream, stream::Stream, kv::Store, kv::Store);

/// What a worker declares: the streams and buckets as its settings make them, and their
/// replicas. The watchdog declares a missing one again from the same.
#[derive(Debug, Clone)]
struct Topology {
    jobs: stream::Config,
    events: stream::Config,
    answers: kv::Config,
    spend: kv::Config,
    replicas: Option<usize>,
}

impl Topology {
    fn of(settings: &NatsSettings) -> Topology {
        Topology {
            jobs: jobs_stream(settings.max_queued_jobs),
            events: events_stream(settings.events_max_age()),
            answers: answers_bucket(),
            spend: spend_bucket(),
            replicas: settings.replicas.map(usize::from),
        }
    }

    /// Each stream, a bucket's included, in the order they are declared.
    fn parts(&self) -> [Part<'_>; 4] {
        [
            Part::Stream(&self.jobs),
            Part::Stream(&self.events),
            Part::Bucket(&self.answers),
            Part::Bucket(&self.spend),
        ]
    }
}

/// One stream of the [`Topology`]: a stream, or the stream behind a KV bucket.
#[derive(Debug, Clone, Copy)]
enum Part<'a> {
    Stream(&'a stream::Config),
    Bucket(&'a kv::Config),
}

impl Part<'_> {
    /// The stream's name (`KV_<bucket>` for a bucket).
    fn stream_name(self) -> String {
        match self {
            Part::Stream(config) => config.name.clone(),
            Part::Bucket(config) => format!("KV_{}", config.bucket),
        }
    }

    fn in_memory(self) -> bool {
        let storage = match self {
            Part::Stream(config) => config.storage,
            Part::Bucket(config) => config.storage,
        };
        storage == stream::StorageType::Memory
    }

    async fn declare(self, js: &jetstream::Context, replicas: Option<usize>) -> anyhow::Result<()> {
        match self {
            Part::Stream(config) => declare_stream(js, config.clone(), replicas).await.map(drop),
            Part::Bucket(config) => declare_bucket(js, config.clone(), replicas).await.map(drop),
        }
    }
}

/// Declares the streams and buckets (a worker's part): idempotent, so every worker does it.
async fn declare(js: &jetstream::Context, topology: &Topology) -> anyhow::Result<Handles> {
    let replicas = topology.replicas;
    let jobs = declare_stream(js, topology.jobs.clone(), replicas).await?;
    let events = declare_stream(js, topology.events.clone(), replicas).await?;
    let answers = declare_bucket(js, topology.answers.clone(), replicas).await?;
    let spend = declare_bucket(js, topology.spend.clone(), replicas).await?;
    Ok((jobs, events, answers, spend))
}

/// How often a process tries again to declare or look up the streams and buckets.
const LOOK_UP_EVERY: Duration = Duration::from_millis(500);
/// How often it says it is still trying.
const LOOK_UP_LOG_EVERY: u32 = 20;

/// `attempt`, tried again every [`LOOK_UP_EVERY`] until it succeeds or `shutdown` fires;
/// `waiting` is logged with its error every ten seconds. The API waits so for a worker to
/// declare the streams and buckets, and a worker for JetStream to take them (a cluster whose
/// streams have not elected their leaders yet answers nothing).
async fn until_done<T, F, Fut>(
    waiting: &str,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut tries = 0u32;
    loop {
        match attempt().await {
            Ok(done) => {
                if tries > 0 {
                    tracing::info!("the streams and buckets are there");
                }
                return Ok(done);
            }
            Err(e) => {
                if tries.is_multiple_of(LOOK_UP_LOG_EVERY) {
                    tracing::info!(error = format!("{e:#}"), "{waiting}");
                }
                tries += 1;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                anyhow::bail!("stopped while {waiting}")
            }
            () = tokio::time::sleep(LOOK_UP_EVERY) => {}
        }
    }
}

/// Looks the streams and buckets up (the API's part: it may not declare them).
async fn look_up(js: &jetstream::Context) -> anyhow::Result<Handles> {
    let stream = |name: &'static str| async move {
        js.get_stream(name)
            .await
            .with_context(|| format!("looking up stream {name}"))
    };
    let bucket = |name: &'static str| async move {
        js.get_key_value(name)
            .await
            .with_context(|| format!("looking up KV bucket {name}"))
    };
    Ok((
        stream(wire::JOBS_STREAM).await?,
        stream(wire::EVENTS_STREAM).await?,
        bucket(wire::ANSWERS_BUCKET).await?,
        bucket(wire::SPEND_BUCKET).await?,
    ))
}

/// How this process logs in, from `settings`: the options (a user and password taken out of
/// `NATS_URL`, a token, or `NATS_CREDS`; TLS) and the servers, without credentials, so that
/// nothing the client logs about a server can show them.
async fn connect_options(
    settings: &NatsSettings,
) -> anyhow::Result<(async_nats::ConnectOptions, Vec<ServerAddr>)> {
    let (servers, login) = servers(&settings.url)?;
    let mut options = async_nats::ConnectOptions::new();
    match (login, &settings.creds) {
        (Some(_), Some(_)) => anyhow::bail!(
            "NATS_URL carries a user and NATS_CREDS names a credentials file: set one of them"
        ),
        (Some(Login::User(user, password)), None) => {
            options = options.user_and_password(user, password.expose().to_owned());
        }
        (Some(Login::Token(token)), None) => options = options.token(token.expose().to_owned()),
        (None, Some(creds)) => {
            options = options
                .credentials_file(creds)
                .await
                .with_context(|| format!("reading NATS_CREDS {}", creds.display()))?;
        }
        (None, None) => {}
    }
    if let Some(ca) = &settings.tls_ca {
        anyhow::ensure!(ca.is_file(), "NATS_TLS_CA {} is not a file", ca.display());
        options = options
            .add_root_certificates(PathBuf::from(ca))
            .require_tls(true);
    }
    Ok((options, servers))
}

/// Credentials a NATS URL carries: `user:password@` or `token@`.
#[derive(Debug, PartialEq, Eq)]
enum Login {
    User(String, Secret),
    Token(Secret),
}

/// The servers of a `NATS_URL` (comma-separated), with their credentials taken out, and the
/// first credentials found. Errors never quote the URL.
fn servers(url: &Secret) -> anyhow::Result<(Vec<ServerAddr>, Option<Login>)> {
    let mut servers = Vec::new();
    let mut login = None;
    for (i, part) in url.expose().split(',').map(str::trim).enumerate() {
        let server: ServerAddr = part
            .parse()
            .map_err(|e: std::io::Error| anyhow::anyhow!("{e}"))
            .with_context(|| format!("NATS_URL: server {} is not a NATS URL", i + 1))?;
        let mut url = server.into_inner();
        if login.is_none() && !url.username().is_empty() {
            let user = percent_decoded(url.username());
            login = Some(match url.password() {
                Some(password) => Login::User(user, Secret::new(percent_decoded(password))),
                // `nats://TOKEN@host`: a token alone.
                None => Login::Token(Secret::new(user)),
            });
        }
        // Cannot fail for the URLs ServerAddr takes (they all have a host).
        let _ = url.set_password(None);
        let _ = url.set_username("");
        servers.push(ServerAddr::from_url(url)?);
    }
    Ok((servers, login))
}

/// `%XX` escapes decoded (a password with `@`, `:` or `/` is written escaped in a URL).
fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn answers_bucket() -> kv::Config {
    kv::Config {
        bucket: wire::ANSWERS_BUCKET.to_owned(),
        description: "Finished answers: the edge cache in front of Postgres".to_owned(),
        history: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

fn spend_bucket() -> kv::Config {
    kv::Config {
        bucket: wire::SPEND_BUCKET.to_owned(),
        description: "Each UTC day's upstream spend, cluster-wide".to_owned(),
        history: 1,
        max_age: Duration::from_secs(3 * 24 * 3600),
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

fn jobs_stream(max_queued: i64) -> stream::Config {
    stream::Config {
        name: wire::JOBS_STREAM.to_owned(),
        description: Some("Generation jobs, one per unique answer; workers pull them".to_owned()),
        subjects: vec![
            wire::JOBS_SUBJECTS.to_owned(),
            wire::PREWARM_SUBJECTS.to_owned(),
        ],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        // Identical misses published by any API replica within this window become one job.
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::from_secs(24 * 3600),
        // A bounded queue: a flood is refused at once (and costs nothing) rather than queued
        // for hours and paid for after its clients left.
        max_messages: max_queued.max(1),
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

fn events_stream(max_age: Duration) -> stream::Config {
    stream::Config {
        name: wire::EVENTS_STREAM.to_owned(),
        description: Some("Generation events per answer, replayable for late joiners".to_owned()),
        subjects: vec![wire::EVENTS_SUBJECTS.to_owned()],
        retention: stream::RetentionPolicy::Limits,
        // Events are worth minutes: memory is faster, and a lost stream is repaired by the
        // job's redelivery, which starts a new attempt.
        storage: stream::StorageType::Memory,
        max_age,
        duplicate_window: Duration::from_secs(30),
        // Readers catch up with direct gets (any replica answers), never with a consumer.
        allow_direct: true,
        // nats-server caps a stream that sets no consumer limit at 1,000 consumers; tools and
        // operators may attach some, and a stream cannot lower this limit once declared.
        max_consumers: 1_000_000,
        ..Default::default()
    }
}

/// How often a worker's watchdog looks for each stream.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// Streams (a bucket's included) this worker found missing and declared again, by `stream`.
const REDECLARED: &str = "versus_bus_redeclared_total";

/// The counter of streams declared again, at zero for each stream: an alert sees the first
/// increase.
fn zero_counters(topology: &Topology) {
    for part in topology.parts() {
        metrics::counter!(REDECLARED, "stream" => part.stream_name()).increment(0);
    }
}

/// A worker's watchdog: every [`WATCH_EVERY`], and at once after a reconnect, looks each stream
/// of `topology` up (one `STREAM.INFO` each, all at once), and declares any that is missing
/// again, as at start-up. Nothing else repairs a stream an operator (or anyone with the rights)
/// deleted while the workers run: misses would fail until a worker restarts. A missing stream
/// is logged as an error and counted in [`REDECLARED`], except one kept in memory that is
/// missing right after a reconnect: a restarted nats-server comes back without it (the events
/// stream, unless replicated).
async fn keep_declared(
    js: jetstream::Context,
    topology: Topology,
    mut reconnects: watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    let parts = topology.parts();
    let mut watched = [Watched::default(); 4];
    let mut seen = *reconnects.borrow_and_update();
    let watch = async {
        loop {
            let connection = *reconnects.borrow_and_update();
            let reconnected = connection != seen;
            seen = connection;
            let looks = parts.iter().zip(&mut watched).map(|(part, watched)| {
                watched.reconnected |= reconnected;
                look_after(&js, *part, topology.replicas, watched)
            });
            futures::future::join_all(looks).await;
            // A closed channel (the client is gone) leaves the timer.
            tokio::select! {
                () = tokio::time::sleep(WATCH_EVERY) => {}
                Ok(()) = reconnects.changed() => {}
            }
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = watch => {}
    }
}

/// What the watchdog remembers of one stream: whether looking it up, or declaring it again,
/// failed last time (each is logged once per run of failures), and whether the connection
/// came back since it last got an answer.
#[derive(Debug, Default, Clone, Copy)]
struct Watched {
    look_failed: bool,
    declare_failed: bool,
    reconnected: bool,
}

/// One look at `part`, and its declaration again if it is missing.
async fn look_after(
    js: &jetstream::Context,
    part: Part<'_>,
    replicas: Option<usize>,
    watched: &mut Watched,
) {
    let name = part.stream_name();
    match existing_config(js, &name).await {
        Ok(Some(_)) => *watched = Watched::default(),
        Err(e) => {
            if !watched.look_failed {
                tracing::info!(stream = %name, error = format!("{e:#}"), "looking the stream up failed; trying again");
            }
            watched.look_failed = true;
        }
        Ok(None) => {
            watched.look_failed = false;
            // Told once per absence, however many tries declaring it takes.
            if !watched.declare_failed {
                if std::mem::take(&mut watched.reconnected) && part.in_memory() {
                    tracing::info!(stream = %name, "the server came back without the stream, which it keeps in memory: declaring it again");
                } else {
                    tracing::error!(stream = %name, "the stream is missing (deleted while the workers run?): declaring it again");
                    metrics::counter!(REDECLARED, "stream" => name.clone()).increment(1);
                }
            }
            match part.declare(js, replicas).await {
                Ok(()) => {
                    tracing::info!(stream = %name, "declared the stream again");
                    watched.declare_failed = false;
                }
                Err(e) => {
                    if !watched.declare_failed {
                        tracing::warn!(stream = %name, error = format!("{e:#}"), "declaring the stream again failed; trying again");
                    }
                    watched.declare_failed = true;
                }
            }
        }
    }
}

/// Creates the stream `wanted` describes when it is missing (with `replicas`, else 1). When it
/// exists, only the settings Versus owns are brought back to `wanted` (see [`reconcile`]);
/// whatever else an operator changed stays, and a setting that cannot change in place is
/// logged as a conflict.
async fn declare_stream(
    js: &jetstream::Context,
    mut wanted: stream::Config,
    replicas: Option<usize>,
) -> anyhow::Result<stream::Stream> {
    let name = wanted.name.clone();
    match existing_config(js, &name).await? {
        Some(existing) => update_owned(js, &existing, &wanted, replicas).await?,
        None => {
            wanted.num_replicas = replicas.unwrap_or(1);
            js.create_stream(wanted)
                .await
                .with_context(|| format!("creating stream {name}"))?;
        }
    }
    js.get_stream(&name)
        .await
        .with_context(|| format!("opening stream {name}"))
}

/// Creates the bucket when it is missing; when it exists, reconciles its stream
/// (`KV_<bucket>`) like [`declare_stream`]: its history and age are Versus's.
async fn declare_bucket(
    js: &jetstream::Context,
    mut wanted: kv::Config,
    replicas: Option<usize>,
) -> anyhow::Result<kv::Store> {
    let bucket = wanted.bucket.clone();
    match existing_config(js, &format!("KV_{bucket}")).await? {
        Some(existing) => {
            let mut owned = existing.clone();
            owned.max_messages_per_subject = wanted.history;
            owned.max_age = wanted.max_age;
            update_owned(js, &existing, &owned, replicas).await?;
        }
        None => {
            wanted.num_replicas = replicas.unwrap_or(1);
            js.create_key_value(wanted)
                .await
                .with_context(|| format!("creating KV bucket {bucket}"))?;
        }
    }
    js.get_key_value(&bucket)
        .await
        .with_context(|| format!("opening KV bucket {bucket}"))
}

/// The configuration of stream `name`, or None when there is no such stream.
async fn existing_config(
    js: &jetstream::Context,
    name: &str,
) -> anyhow::Result<Option<stream::Config>> {
    use jetstream::context::GetStreamErrorKind;
    // The lookup answers with the stream's info: one request.
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream.cached_info().config.clone())),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(error)
                if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(e).with_context(|| format!("looking up stream {name}")),
        },
    }
}

/// Brings the settings Versus owns in `existing` back to `wanted`'s, if any differ.
async fn update_owned(
    js: &jetstream::Context,
    existing: &stream::Config,
    wanted: &stream::Config,
    replicas: Option<usize>,
) -> anyhow::Result<()> {
    let name = &existing.name;
    let Reconciled {
        config,
        changed,
        conflicts,
    } = reconcile(existing, wanted, replicas);
    for conflict in &conflicts {
        tracing::error!(stream = %name, %conflict, "the stream differs from what Versus needs, and this cannot change in place: an operator must recreate it");
    }
    if !changed.is_empty() {
        tracing::info!(stream = %name, changed = ?changed, "bringing the settings Versus owns back to what it needs; the rest stays as it is");
        js.update_stream(config)
            .await
            .with_context(|| format!("updating stream {name}"))?;
    }
    Ok(())
}

/// What [`reconcile`] found.
#[derive(Debug)]
struct Reconciled {
    /// The existing configuration with Versus's settings put back.
    config: stream::Config,
    /// The settings that were put back.
    changed: Vec<&'static str>,
    /// Settings that differ but cannot change in place.
    conflicts: Vec<String>,
}

/// The existing configuration with the settings Versus owns taken from `wanted`: its subjects,
/// limits on messages and age, discard policy, duplicate window, direct gets, and the replica
/// count when `replicas` is set. Everything else (description, byte limits, placement,
/// compression, metadata, consumer limits, …) is the operator's and stays.
fn reconcile(
    existing: &stream::Config,
    wanted: &stream::Config,
    replicas: Option<usize>,
) -> Reconciled {
    let mut config = existing.clone();
    let mut changed = Vec::new();
    macro_rules! own {
        ($($field:ident),*) => {$(
            if config.$field != wanted.$field {
                config.$field = wanted.$field.clone();
                changed.push(stringify!($field));
            }
        )*};
    }
    own!(subjects, max_age, discard, duplicate_window, allow_direct);
    // The server stores "no limit" as -1 whatever a request said (0 or -1).
    let limit = |n: i64| if n <= 0 { -1 } else { n };
    if limit(config.max_messages) != limit(wanted.max_messages) {
        config.max_messages = wanted.max_messages;
        changed.push("max_messages");
    }
    if limit(config.max_messages_per_subject) != limit(wanted.max_messages_per_subject) {
        config.max_messages_per_subject = wanted.max_messages_per_subject;
        changed.push("max_messages_per_subject");
    }
    if let Some(replicas) = replicas.filter(|r| *r != config.num_replicas) {
        config.num_replicas = replicas;
        changed.push("num_replicas");
    }
    let mut conflicts = Vec::new();
    if existing.storage != wanted.storage {
        conflicts.push(format!(
            "storage is {:?}, Versus needs {:?}",
            existing.storage, wanted.storage
        ));
    }
    if existing.retention != wanted.retention {
        conflicts.push(format!(
            "retention is {:?}, Versus needs {:?}",
            existing.retention, wanted.retention
        ));
    }
    Reconciled {
        config,
        changed,
        conflicts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_settings_versus_owns_are_put_back() {
        let wanted = jobs_stream(10_000);
        let mut existing = wanted.clone();
        // An operator's changes, and a limit another setting changed.
        existing.description = Some("ours now".into());
        existing.max_bytes = 1 << 30;
        existing.num_replicas = 3;
        existing.max_messages = 500;
        let r = reconcile(&existing, &wanted, None);
        assert_eq!(r.changed, ["max_messages"]);
        assert_eq!(r.config.max_messages, 10_000);
        assert_eq!(r.config.description.as_deref(), Some("ours now"));
        assert_eq!(r.config.max_bytes, 1 << 30);
        assert_eq!(
            r.config.num_replicas, 3,
            "replicas stay unless VERSUS_NATS_REPLICAS says"
        );
        assert!(r.conflicts.is_empty());

        let r = reconcile(&existing, &wanted, Some(1));
        assert!(r.changed.contains(&"num_replicas"));
        assert_eq!(r.config.num_replicas, 1);

        // The server writes "no limit" as -1.
        let mut stored = events_stream(Duration::from_secs(600));
        stored.max_messages = -1;
        stored.max_messages_per_subject = -1;
        let r = reconcile(&stored, &events_stream(Duration::from_secs(600)), None);
        assert!(r.changed.is_empty(), "{:?}", r.changed);

        let mut memory = wanted.clone();
        memory.storage = stream::StorageType::Memory;
        assert_eq!(reconcile(&memory, &wanted, None).conflicts.len(), 1);
    }

    #[test]
    fn the_watchdog_looks_after_the_four_streams_and_only_the_events_live_in_memory() {
        let topology = Topology::of(&NatsSettings {
            url: Secret::new("nats://127.0.0.1:4222"),
            creds: None,
            tls_ca: None,
            replicas: None,
            events_max_age_secs: 600,
            max_queued_jobs: 10_000,
        });
        let parts = topology.parts();
        let names = parts.map(Part::stream_name);
        assert_eq!(
            names,
            [
                wire::JOBS_STREAM.to_owned(),
                wire::EVENTS_STREAM.to_owned(),
                format!("KV_{}", wire::ANSWERS_BUCKET),
                format!("KV_{}", wire::SPEND_BUCKET),
            ]
        );
        // Only a stream a restarted server loses is expected to be missing after a reconnect.
        assert_eq!(parts.map(Part::in_memory), [false, true, false, false]);
    }

    fn parsed(url: &str) -> (Vec<String>, Option<Login>) {
        let (servers, login) = servers(&Secret::new(url)).unwrap();
        let servers = servers.iter().map(|s| s.as_url_str().to_owned()).collect();
        (servers, login)
    }

    #[test]
    fn credentials_come_out_of_the_url_and_never_stay_in_it() {
        let (servers, login) = parsed("nats://versus-api:s3cr%40t@127.0.0.1:4222");
        assert_eq!(servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(
            login,
            Some(Login::User("versus-api".into(), Secret::new("s3cr@t")))
        );

        let (servers, login) =
            parsed("tls://tok3n@nats.example.com, tls://nats-2.example.com:4443");
        assert_eq!(
            servers,
            ["tls://nats.example.com", "tls://nats-2.example.com:4443"]
        );
        assert_eq!(login, Some(Login::Token(Secret::new("tok3n"))));

        let (servers, login) = parsed("127.0.0.1:4222");
        assert_eq!(servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(login, None);
    }

    #[test]
    fn a_bad_url_is_named_without_its_credentials() {
        let error = servers(&Secret::new("http://versus-api:hunter2@host:4222")).unwrap_err();
        let text = format!("{error:#}");
        assert!(text.contains("NATS_URL"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn percent_escapes_are_decoded_and_stray_percents_kept() {
        assert_eq!(percent_decoded("a%2Fb%3Ac%25"), "a/b:c%");
        assert_eq!(percent_decoded("100%"), "100%");
        assert_eq!(percent_decoded("%zz%4"), "%zz%4");
    }
}
