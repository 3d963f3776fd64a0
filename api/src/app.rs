//! The state every request handler shares: the settings, the bus, the caches, the flights, and
//! the shutdown token that ends waits and hands streams over.

use bytes::Bytes;
use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{http::HeaderMap, response::Response};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use versus_shared::{
    aliases::{Aliases, Changed},
    budget::{Budget, BudgetSettings},
    bus::Bus,
    config::{ModelSettings, NatsSettings, Secret},
    objects::ObjectStoreSettings,
    tasks::Tasks,
    telemetry::PrometheusHandle,
    wire::{self, Answer, ImageAnswer, Kind},
};

use crate::{
    admin::token::AdminToken,
    body, cache, error,
    limits::{self, StreamSlot},
    miss, names,
    nats::LazyBus,
    origin, popularity, quota, sse,
};

/// API settings, from the environment (see `versus-api --help`).
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "versus-api", version, about, after_help = versus_shared::traces::HELP)]
pub struct Settings {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "VERSUS_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: String,
    /// A second address, for the operator's routes alone (`/metrics` and `/v1/admin/*`, which
    /// then answer 404 on `VERSUS_HTTP_ADDR`): a private one, such as `127.0.0.1:9090` or an
    /// internal network's. `/healthz` and `/readyz` answer on both. Unset: everything is served
    /// on `VERSUS_HTTP_ADDR`.
    #[arg(long, env = "VERSUS_OPS_ADDR")]
    pub ops_addr: Option<String>,
    #[command(flatten)]
    pub nats: NatsSettings,
    /// Run at an edge: `NATS_URL` is this edge's nats-server (`nats-edge.conf`), a leaf node
    /// of the hub whose JetStream domain this names (`hub`). Hits are read from a mirror of
    /// the answers bucket kept there; misses go to the hub across the leaf link, and are
    /// refused at once (`unavailable`) while the link is down.
    #[arg(long, env = "VERSUS_NATS_HUB_DOMAIN")]
    pub hub_domain: Option<String>,
    #[command(flatten)]
    pub models: ModelSettings,
    #[command(flatten)]
    pub objects: ObjectStoreSettings,
    #[command(flatten)]
    pub budget: BudgetSettings,
    /// The site's public address (`https://versus.example`), for the absolute URLs of link
    /// previews; unset, the `Host` of a request from loopback, and none for any other
    /// (`preview::PublicBase`).
    #[arg(long, env = "VERSUS_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Public base URL of the pictures (a CDN or the bucket); unset, this API serves them.
    #[arg(long, env = "VERSUS_PUBLIC_IMAGE_BASE_URL")]
    pub public_image_base_url: Option<String>,
    /// Bearer token of the admin routes, at least 32 characters once trimmed (e.g.
    /// `openssl rand -hex 32`); unset or empty, they refuse every request.
    #[arg(long, env = "VERSUS_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// Postgres URL, used only by the admin routes (never by answers).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,
    /// Memory for the in-process answer cache, in MiB.
    #[arg(long, env = "VERSUS_MEMORY_CACHE_MIB", default_value_t = 256)]
    pub memory_cache_mib: u64,
    /// How long a client waits for a generation before it gets a retryable error, in seconds.
    #[arg(long, env = "VERSUS_STREAM_TIMEOUT_SECS", default_value_t = 300)]
    pub stream_timeout_secs: u64,
    /// Seconds between SSE heartbeat comments on idle streams.
    #[arg(long, env = "VERSUS_SSE_HEARTBEAT_SECS", default_value_t = 15)]
    pub heartbeat_secs: u64,
    /// Origins (comma-separated `scheme://host[:port]`) whose pages may start new answers,
    /// besides this API's own; a browser request from any other site gets 403 `cross_site`.
    #[arg(long, env = "VERSUS_ALLOWED_ORIGINS", default_value = "")]
    pub allowed_origins: String,
    /// New text answers one client may start per minute (and at once); 0: no limit. Hits and
    /// joins of a generation in progress never count. Each replica counts on its own.
    #[arg(long, env = "VERSUS_CLIENT_MISSES_PER_MINUTE", default_value_t = 20)]
    pub client_misses_per_minute: u32,
    /// New pictures one client may start per minute (and at once); 0: no limit.
    #[arg(long, env = "VERSUS_CLIENT_PICTURES_PER_MINUTE", default_value_t = 5)]
    pub client_pictures_per_minute: u32,
    /// Joins one client may make per minute (and at once) of generations already under way
    /// (another request's, here or elsewhere, or a pre-warm): free of the limits above, but not
    /// of this looser one, so a client reconnecting in a loop is refused (429 `rate_limited`)
    /// at no cost to anyone. Each replica counts on its own. 0: no limit.
    #[arg(long, env = "VERSUS_CLIENT_JOINS_PER_MINUTE", default_value_t = 120)]
    pub client_joins_per_minute: u32,
    /// The workers' lease, in seconds (set it as the workers' `VERSUS_LEASE_SECS`): a
    /// generation under way whose last event is older than this looks dead, and a request that
    /// joins it then publishes a job to restart it (one per lease, however many join); while
    /// it lives, joining publishes nothing.
    #[arg(long, env = "VERSUS_LEASE_SECS", default_value_t = 30)]
    pub lease_secs: u64,
    /// What one client's new answers may cost in a UTC day, in US dollars, counted across every
    /// API replica and edge (each new answer or picture is charged its worst case, at
    /// `VERSUS_PRICES`, when it starts); past it, 429 `quota_exhausted` until midnight UTC.
    /// IPv6 clients count by their /64 and also by their /48, which may spend 16 times this.
    /// Hits and joins of a generation in progress never count. 0: no quota.
    #[arg(long, env = "VERSUS_CLIENT_DAILY_USD", default_value_t = 0.5)]
    pub client_daily_usd: f64,
    /// Look-ups past this replica's memory one client may make per second (a read of the KV
    /// bucket, of the refusals, a flight's first steps, a picture's file), in a burst of
    /// `VERSUS_CLIENT_LOOKUPS_BURST`; past it, 429 `rate_limited` before any NATS or Postgres
    /// work. Hits served from memory never count. Each replica counts on its own. 0: no limit.
    #[arg(long, env = "VERSUS_CLIENT_LOOKUPS_PER_SECOND", default_value_t = 50)]
    pub client_lookups_per_second: u32,
    /// How many look-ups past memory one client may make at once (see
    /// `VERSUS_CLIENT_LOOKUPS_PER_SECOND`; at least that many).
    #[arg(long, env = "VERSUS_CLIENT_LOOKUPS_BURST", default_value_t = 100)]
    pub client_lookups_burst: u32,
    /// Event streams one client may hold open at once; 0: no cap.
    #[arg(long, env = "VERSUS_CLIENT_MAX_STREAMS", default_value_t = 16)]
    pub client_max_streams: usize,
    /// Proxies (comma-separated CIDRs) whose `X-Forwarded-For` names the client (the
    /// right-most element that is not a trusted proxy; `ip:port` and `[v6]:port` are read too).
    /// Behind a load balancer, its addresses: unset, every visitor is one client (a warning is
    /// logged once when a private-range peer forwards for someone).
    #[arg(long, env = "VERSUS_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,
    /// Seconds a connection has to send the whole head of a request, counted from when it
    /// opens or its previous response ends; a slower one is closed without an answer. So it is
    /// also how long an idle keep-alive connection stays open.
    #[arg(long, env = "VERSUS_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Connections served at once; at the cap, new ones wait in the listen backlog until one
    /// closes. 0: no cap.
    #[arg(long, env = "VERSUS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Connections one client may hold open at once; the next is closed as soon as it is
    /// accepted. The client is the peer's address (an IPv6 peer's /64; its /48 may hold 16
    /// times as many), never `X-Forwarded-For`, which is not read yet: behind a proxy or load balancer every
    /// connection is the proxy's, so set it to 0 (or above what the proxy opens) there. Clients
    /// behind one NAT share it. 0: no cap.
    #[arg(long, env = "VERSUS_CLIENT_MAX_CONNECTIONS", default_value_t = 64)]
    pub client_max_connections: usize,
    /// Seconds a request's body has to arrive, from when it starts being read (right after the
    /// head); a slower one gets 400 `invalid_body` and its connection is closed. 0: no limit.
    #[arg(long, env = "VERSUS_BODY_TIMEOUT_SECS", default_value_t = 10)]
    pub body_timeout_secs: u64,
    /// Seconds a response may wait for a client that reads nothing (its connection's socket
    /// does not drain); then the connection is reset. An event stream cut so can be resumed
    /// with `Last-Event-ID`. 0: no limit.
    #[arg(long, env = "VERSUS_SLOW_CLIENT_SECS", default_value_t = 30)]
    pub slow_client_secs: u64,
}

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct App {
    pub(crate) inner: Arc<Inner>,
}

pub struct Inner {
    /// NATS: the client at once, the streams and buckets once found (see [`LazyBus`]).
    pub bus: LazyBus,
    pub answers: cache::EdgeCache<Answer>,
    pub images: cache::EdgeCache<ImageAnswer>,
    /// Matchups moderation refused: answered `refused` at no cost.
    pub refusals: cache::Refusals,
    /// The known names, for suggestions as visitors type (see [`names`]).
    pub names: Arc<names::Names>,
    /// The aliases, applied to every request's names (`App::ask`).
    pub aliases: Arc<Aliases>,
    /// The purges this replica heard of: what the bucket may still hold of them is stale.
    pub floors: Arc<cache::Floors>,
    pub objects: Arc<dyn object_store::ObjectStore>,
    pub popularity: popularity::Popularity,
    /// For the admin routes only; connects on first use.
    pub db: Option<sqlx::PgPool>,
    /// The admin routes' token (its digest); None: they refuse every request.
    pub admin_token: Option<AdminToken>,
    /// Purge notices from every replica, until `run` takes them (see `LazyBus::start`).
    pub(crate) purges: Mutex<Option<async_nats::Subscriber>>,
    pub flights: Arc<miss::Flights>,
    /// Who may start a generation (see `origin` and `limits`).
    pub origins: origin::Origins,
    pub limits: limits::Limits,
    /// What each client's new generations may cost in a UTC day, cluster-wide.
    pub quota: quota::Quota,
    /// The daily budget, cluster-wide: once spent, no new generation starts.
    pub budget: Arc<Budget>,
    /// Fires when this process stops: open streams hand over, waits end.
    pub shutdown: CancellationToken,
    pub settings: Settings,
    pub metrics: PrometheusHandle,
}

impl App {
    /// Everything the handlers share, at once: NATS is dialled, and what the API uses on it
    /// looked up in the background (see [`LazyBus`]), so that the API serves meanwhile.
    pub async fn build(
        settings: Settings,
        metrics: PrometheusHandle,
        tasks: &Tasks,
    ) -> anyhow::Result<App> {
        let admin_token = AdminToken::parse(settings.admin_token.as_ref())?;
        let budget = Budget::new(&settings.budget, &settings.models)?;
        for model in [&settings.models.chat_model, &settings.models.image_model] {
            if budget.capped() && !budget.prices.knows(model) {
                tracing::warn!(%model, "no price for this model (VERSUS_PRICES): it is counted at the dearest known price");
            }
        }
        let quota = quota::Quota::new(settings.client_daily_usd)?;
        for kind in [Kind::Text, Kind::Image] {
            if quota.on() && budget.worst_case(kind) > quota.daily_usd() {
                tracing::warn!(%kind, worst_case_usd = budget.worst_case(kind), "VERSUS_CLIENT_DAILY_USD is below what one new answer of this kind may cost: every new one is refused `quota_exhausted`");
            }
        }
        quota.zero_counters();
        cache::zero_counters(settings.hub_domain.is_some());
        miss::zero_counters();
        let (bus, purges) =
            LazyBus::start(&settings.nats, settings.hub_domain.as_deref(), tasks).await?;
        let (following, spend, shutdown) = (budget.clone(), bus.clone(), tasks.shutdown().clone());
        tasks.spawn(async move {
            if let Some(bus) = spend.attached(&shutdown).await {
                following.follow(bus.spend.clone(), shutdown).await;
            }
        });
        // The known names and the aliases, from the answers nearest to this replica (an edge's
        // mirror); each alias's names are known names too.
        let names = names::Names::new();
        let aliases = Aliases::new();
        let (indexing, following, answers_bus, shutdown) = (
            names.clone(),
            aliases.clone(),
            bus.clone(),
            tasks.shutdown().clone(),
        );
        tasks.spawn(async move {
            let Some(bus) = answers_bus.attached(&shutdown).await else {
                return;
            };
            let answers = bus.nearest_answers.clone();
            let aliases =
                following.follow(
                    answers.clone(),
                    shutdown.clone(),
                    |entry, changed| match changed {
                        Changed::Put { alias, canonical } => {
                            indexing.put_alias(&entry.key, alias, canonical);
                        }
                        Changed::Removed { .. } => indexing.remove(&entry.key),
                        Changed::Nothing => {}
                    },
                );
            tokio::join!(indexing.clone().follow(answers, shutdown), aliases);
        });
        let flights = miss::Flights::new(
            bus.clone(),
            Duration::from_secs(settings.stream_timeout_secs.max(1)),
            Duration::from_secs(settings.lease_secs.max(1)),
            tasks.clone(),
        );
        let public_base = settings.public_image_base_url.clone();
        // Every purged entry this replica heard of (a few dozen bytes each).
        let floors = Arc::new(cache::Floors::new(PURGE_FLOORS));
        let answers = cache::EdgeCache::new(
            bus.clone(),
            settings.memory_cache_mib << 20,
            floors.clone(),
            |a: &Answer| serde_json::to_vec(&body::TextBody::of(a, true)),
        );
        // Picture entries are small: a sixteenth of the budget holds very many.
        let images = cache::EdgeCache::new(
            bus.clone(),
            settings.memory_cache_mib << 16,
            floors.clone(),
            move |i: &ImageAnswer| {
                let url = body::image_url(public_base.as_deref(), i);
                serde_json::to_vec(&body::ImageBody::of(i, &url, true))
            },
        );
        Ok(App {
            inner: Arc::new(Inner {
                origins: origin::Origins::parse(&settings.allowed_origins)?,
                limits: limits::Limits::new(
                    settings.client_misses_per_minute,
                    settings.client_pictures_per_minute,
                    settings.client_max_streams,
                    &settings.trusted_proxies,
                )?
                .with_joins(settings.client_joins_per_minute)
                .with_lookups(
                    settings.client_lookups_per_second,
                    settings.client_lookups_burst,
                ),
                quota,
                budget,
                objects: settings.objects.open()?,
                popularity: popularity::Popularity::new(bus.client().clone()),
                db: settings
                    .database_url
                    .as_ref()
                    .map(|url| versus_shared::db::connect_lazy(url, ADMIN_DB_POOL))
                    .transpose()?,
                admin_token,
                purges: Mutex::new(Some(purges)),
                answers,
                images,
                refusals: cache::Refusals::new(bus.clone(), REFUSALS_IN_MEMORY, floors.clone()),
                names,
                aliases,
                floors,
                bus,
                flights,
                shutdown: tasks.shutdown().clone(),
                settings,
                metrics,
            }),
        })
    }

    /// The bus, if it was found and is connected now; else `unavailable` (503).
    pub(crate) fn bus(&self) -> Result<&Bus, error::ApiError> {
        self.inner.bus.now().ok_or(error::ApiError::Unavailable)
    }

    /// Who sent the request (see [`limits::Limits::client`]).
    pub(crate) fn client(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        self.inner.limits.client(peer.ip(), headers)
    }

    /// `key`'s answer from this replica's memory; else, once `client` may look past memory
    /// (`VERSUS_CLIENT_LOOKUPS_PER_SECOND`, 429 before any NATS work), what the miss path
    /// finds. `client` is worked out only then: a memory hit costs nothing more.
    pub(crate) async fn find<V: cache::Entry>(
        &self,
        cache: &cache::EdgeCache<V>,
        key: &versus_shared::key::Key,
        client: impl FnOnce() -> IpAddr,
    ) -> Result<miss::Found<V>, error::ApiError> {
        if let Some(hit) = cache.in_memory(key) {
            return Ok(miss::Found::Stored(hit));
        }
        let client = client();
        self.look_up(client)?;
        // A client this replica knows to be over its daily quota would be refused a new
        // generation: its miss takes none of the flight's early reads.
        let worst = self.inner.budget.worst_case(V::KIND);
        let prefetch = !self.inner.quota.known_spent(client, worst);
        Ok(self.misses().find(cache, key, prefetch).await)
    }

    /// Counts a look-up past memory for `client`, or refuses it (429 `rate_limited`).
    pub(crate) fn look_up(&self, client: IpAddr) -> Result<(), error::ApiError> {
        self.inner.limits.look_up(client)
    }

    /// A slot for one more open stream of `client`: taken before anything else is done for
    /// the stream, so that a refused one (429) costs nothing.
    pub(crate) fn stream_slot(&self, client: IpAddr) -> Result<StreamSlot, error::ApiError> {
        self.inner.limits.open_stream(client)
    }

    /// A live SSE response (see [`sse::live`]) that holds `slot` until it ends, handed over
    /// when this process stops.
    pub(crate) fn sse(
        &self,
        slot: StreamSlot,
        events: impl Stream<Item = Bytes> + Send + 'static,
    ) -> Response {
        let events = events.map(move |event| {
            let _held = &slot;
            event
        });
        let heartbeat = Duration::from_secs(self.inner.settings.heartbeat_secs.max(1));
        sse::live(events, heartbeat, self.inner.shutdown.clone())
    }

    /// The miss path (see [`miss`]), over this replica's state.
    pub(crate) fn misses(&self) -> miss::Path<'_> {
        let inner = &self.inner;
        miss::Path {
            bus: &inner.bus,
            flights: &inner.flights,
            refusals: &inner.refusals,
            origins: &inner.origins,
            limits: &inner.limits,
            quota: &inner.quota,
            budget: &inner.budget,
        }
    }

    /// Waits for `wait` unless this process stops first: then the client is told to retry
    /// (503, retryable), here or on another replica.
    pub(crate) async fn unless_stopping<T>(
        &self,
        wait: impl Future<Output = T>,
    ) -> Result<T, error::ApiError> {
        tokio::select! {
            () = self.inner.shutdown.cancelled() => Err(error::ApiError::Unavailable),
            out = wait => Ok(out),
        }
    }

    /// Applies a purge to this replica: its markers' revisions become the floors of their
    /// entries (an older value read from the bucket or a mirror is stale, for good), then its
    /// keys leave memory. In this order, a read under way either sees the floor or has what it
    /// read taken back out of memory.
    pub(crate) fn forget(&self, purge: &wire::Purge) {
        for marker in &purge.markers {
            self.inner.floors.raise(&marker.entry, marker.revision);
        }
        for key in &purge.keys {
            self.inner.answers.remove(key);
            self.inner.images.remove(key);
            self.inner.refusals.remove(key);
        }
    }

    /// Drops every answer and refusal from this replica's memory: purge notices may have been
    /// lost (the connection dropped, or a subscription overflowed), and what memory holds is
    /// read again from the bucket, where purges are kept.
    pub(crate) fn forget_all(&self) {
        self.inner.answers.clear();
        self.inner.images.clear();
        self.inner.refusals.clear();
    }
}

/// Postgres connections of the admin routes: operators' requests, a few at a time.
const ADMIN_DB_POOL: u32 = 4;

/// How many refused matchups each replica remembers (a few dozen bytes each); beyond that,
/// the least used are read from the bucket again.
const REFUSALS_IN_MEMORY: usize = 100_000;

/// How many purged entries each replica remembers ([`cache::Floors`]).
const PURGE_FLOORS: usize = 100_000;
