//! The Versus edge: validates requests, answers hits from memory and the edge KV bucket, and
//! on a miss publishes a generation job and streams its events over SSE.
//!
//! - [`fights`]: the text routes of the public contract;
//! - [`admin`]: operator routes (pre-warm batches, popularity, purge);
//! - [`popularity`]: counting requests off the request path;
//! - [`images`]: the picture routes, and serving stored pictures from object storage;
//! - [`cache`]: the bounded in-memory caches in front of the KV bucket;
//! - [`flights`]: one events reader per key in this process, feeding every local waiter;
//! - [`sse`]: turning generation events into the SSE events clients see, with resume;
//! - [`page`]: the fight page at `/`, embedded in the binary;
//! - [`error`]: the API's error type and its JSON shape.

pub mod admin;
pub mod cache;
pub mod error;
pub mod fights;
pub mod flights;
pub mod images;
pub mod page;
pub mod popularity;
pub mod sse;

use std::{sync::Arc, time::Duration};

use axum::Router;

use tokio_util::sync::CancellationToken;
use versus_shared::{
    bus::Bus,
    config::{ModelSettings, NatsSettings, Secret},
    objects::ObjectStoreSettings,
    telemetry::{self, PrometheusHandle},
    wire::{self, Answer, ImageAnswer},
};

/// API settings, from the environment (see `versus-api --help`).
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "versus-api", version, about)]
pub struct Settings {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, env = "VERSUS_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: String,
    #[command(flatten)]
    pub nats: NatsSettings,
    #[command(flatten)]
    pub models: ModelSettings,
    #[command(flatten)]
    pub objects: ObjectStoreSettings,
    /// Public base URL of the pictures (a CDN or the bucket); unset, this API serves them.
    #[arg(long, env = "VERSUS_PUBLIC_IMAGE_BASE_URL")]
    pub public_image_base_url: Option<String>,
    /// Bearer token of the admin routes; unset, they refuse every request.
    #[arg(long, env = "VERSUS_ADMIN_TOKEN")]
    pub admin_token: Option<Secret>,
    /// Postgres URL, used only by the admin routes (never by answers).
    #[arg(long, env = "DATABASE_URL")]
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
}

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct App {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub bus: Bus,
    pub answers: cache::EdgeCache<Answer>,
    pub images: cache::EdgeCache<ImageAnswer>,
    pub objects: Arc<dyn object_store::ObjectStore>,
    pub popularity: popularity::Popularity,
    /// For the admin routes only; connects on first use.
    pub db: Option<sqlx::PgPool>,
    pub flights: Arc<flights::Flights>,
    pub settings: Settings,
    pub metrics: PrometheusHandle,
}

impl App {
    /// Connects to NATS and declares what the API uses.
    pub async fn build(settings: Settings, metrics: PrometheusHandle) -> anyhow::Result<App> {
        let bus = Bus::connect(&settings.nats, "versus-api").await?;
        let flights = flights::Flights::new(
            bus.clone(),
            Duration::from_secs(settings.stream_timeout_secs.max(1)),
        );
        let public_base = settings.public_image_base_url.clone();
        let answers = cache::EdgeCache::new(
            bus.clone(),
            settings.memory_cache_mib << 20,
            |a: &Answer| {
                serde_json::json!({
                    "key": a.key, "a": a.a, "b": a.b, "text": a.text, "model": a.model, "cached": true,
                })
            },
        );
        // Picture entries are small: a sixteenth of the budget holds very many.
        let images = cache::EdgeCache::new(
            bus.clone(),
            settings.memory_cache_mib << 16,
            move |i: &ImageAnswer| {
                let url = images::image_url(public_base.as_deref(), i);
                serde_json::json!({"key": i.key, "url": url, "cached": true})
            },
        );
        Ok(App {
            inner: Arc::new(Inner {
                objects: settings.objects.open()?,
                popularity: popularity::Popularity::new(bus.client.clone()),
                db: settings
                    .database_url
                    .as_ref()
                    .map(|url| versus_shared::db::connect_lazy(url, 4))
                    .transpose()?,
                answers,
                images,
                bus,
                flights,
                settings,
                metrics,
            }),
        })
    }

    pub fn router(&self) -> Router {
        fights::routes()
            .merge(images::routes())
            .merge(admin::routes(self.clone()))
            .with_state(self.clone())
            .merge(page::routes())
            .merge(telemetry::ops_router(
                self.inner.metrics.clone(),
                self.inner.bus.clone(),
            ))
    }
}

/// Serves `app` on `listener` until `shutdown` fires.
pub async fn run(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let purges = app.inner.bus.client.subscribe(wire::PURGE_SUBJECT).await?;
    // `into_make_service` finishes the router once; served as is, axum would rebuild its
    // route table for every connection (about 14 KiB each, kept for the connection's life).
    let server = axum::serve(listener, app.router().into_make_service())
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    telemetry::announce(addr);
    tracing::info!(%addr, "api ready");
    let (served, (), ()) = tokio::join!(
        server.into_future(),
        app.inner.popularity.run(shutdown.clone()),
        app.apply_purges(purges, shutdown.clone()),
    );
    served?;
    Ok(())
}

impl App {
    /// Drops `keys` from this replica's memory caches.
    pub(crate) fn forget(&self, keys: &[versus_shared::key::Key]) {
        for key in keys {
            self.inner.answers.remove(key);
            self.inner.images.remove(key);
        }
    }

    /// Applies every replica's purges to this one's memory, until `shutdown`.
    async fn apply_purges(&self, mut purges: async_nats::Subscriber, shutdown: CancellationToken) {
        use futures::StreamExt;
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => return,
                msg = purges.next() => match msg { Some(m) => m, None => return },
            };
            match serde_json::from_slice::<wire::Purge>(&msg.payload) {
                Ok(purge) => self.forget(&purge.keys),
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable purge"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn settings_are_well_formed() {
        use clap::CommandFactory;
        super::Settings::command().debug_assert();
    }
}
