//! The API's hold on NATS ([`LazyBus`]): the client from the start, which connects in the
//! background, and the streams and buckets once they are found, so that the API serves (its
//! probes, the page, memory hits) whether NATS is up or not. And JetStream's health, probed
//! in the background for `/readyz` and the `versus_jetstream_up` gauge.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use async_nats::connection::State;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use versus_shared::{
    bus::{Bus, Role},
    config::NatsSettings,
    tasks::Tasks,
    wire,
};

/// How long a miss waits for NATS when it is not connected (a restart, a failover to another
/// server) before it is refused with a retryable `unavailable`: long enough for a reconnect,
/// short enough that no client waits without an end.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(5);

/// How often JetStream is probed, and how long a probe may take.
/// How often a miss waiting for a reconnect looks at the client's state.
const RECONNECT_POLL: Duration = Duration::from_millis(50);
const PROBE_EVERY: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// JetStream as the last probe found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JetStream {
    /// Not probed yet (or nothing to probe: the streams were not found yet).
    Unknown,
    Up,
    Down,
}

impl JetStream {
    pub fn as_str(self) -> &'static str {
        match self {
            JetStream::Unknown => "unknown",
            JetStream::Up => "up",
            JetStream::Down => "down",
        }
    }
}

/// The client at once, the [`Bus`] once attached. Cheap to clone.
#[derive(Clone)]
pub struct LazyBus {
    client: async_nats::Client,
    bus: Arc<OnceLock<Bus>>,
    attached: watch::Receiver<bool>,
    edge: bool,
    jetstream: Arc<AtomicU8>,
}

impl LazyBus {
    /// Dials NATS (returns at once) and attaches in the background, on `tasks`: the streams
    /// and buckets are looked up (and at an edge, the mirror declared and the leaf link
    /// watched) once NATS answers and a worker has declared them. Also returns the
    /// subscription to purge notices, made first, so that no answer read from KV can be read
    /// before this replica hears of purges.
    pub async fn start(
        settings: &NatsSettings,
        hub: Option<&str>,
        tasks: &Tasks,
    ) -> anyhow::Result<(LazyBus, async_nats::Subscriber)> {
        let role = match hub {
            Some(hub) => Role::Edge { hub },
            None => Role::Api,
        };
        let dialed = Bus::dial(settings, role).await?;
        // Queued in the client until it connects (and made again after every reconnect).
        let purges = dialed.client.subscribe(wire::PURGE_SUBJECT).await?;
        let (attached, attached_rx) = watch::channel(false);
        let lazy = LazyBus {
            client: dialed.client.clone(),
            bus: Arc::new(OnceLock::new()),
            attached: attached_rx,
            edge: hub.is_some(),
            jetstream: Arc::new(AtomicU8::new(JetStream::Unknown as u8)),
        };
        let (settings, hub, cell, attaching) = (
            settings.clone(),
            hub.map(str::to_owned),
            lazy.bus.clone(),
            tasks.clone(),
        );
        tasks.spawn(async move {
            let role = match &hub {
                Some(hub) => Role::Edge { hub },
                None => Role::Api,
            };
            match Bus::attach(dialed, &settings, role, &attaching).await {
                Ok(bus) => {
                    tracing::info!("found the streams and buckets: misses are served");
                    let _ = cell.set(bus);
                    attached.send_replace(true);
                }
                // Only when stopped meanwhile.
                Err(e) => tracing::info!(error = format!("{e:#}"), "not attached to NATS"),
            }
        });
        Ok((lazy, purges))
    }

    /// The client, connected or not (what is sent meanwhile waits for the connection).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The bus once the streams and buckets were found, connected or not.
    pub fn get(&self) -> Option<&Bus> {
        self.bus.get()
    }

    /// The bus if it was found and its connection is up now.
    pub fn now(&self) -> Option<&Bus> {
        self.get().filter(|_| self.connected())
    }

    /// [`LazyBus::now`], waiting up to [`RECONNECT_GRACE`] for it when it is not.
    pub async fn within_grace(&self) -> Option<&Bus> {
        if let Some(bus) = self.now() {
            return Some(bus);
        }
        let deadline = tokio::time::Instant::now() + RECONNECT_GRACE;
        loop {
            // The client says when it connects only through its state: look often.
            tokio::time::sleep(RECONNECT_POLL).await;
            if let Some(bus) = self.now() {
                return Some(bus);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// The bus once attached (None if `shutdown` fires first): for what runs in the
    /// background.
    pub async fn attached(&self, shutdown: &CancellationToken) -> Option<&Bus> {
        let mut attached = self.attached.clone();
        tokio::select! {
            () = shutdown.cancelled() => None,
            found = attached.wait_for(|attached| *attached) => found.ok().and(self.get()),
        }
    }

    /// Whether the client is connected to a server now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// The connection, in a word: `connected`, `connecting` (never yet), `disconnected`.
    pub fn connection(&self) -> &'static str {
        match self.client.connection_state() {
            State::Connected => "connected",
            State::Pending => "connecting",
            State::Disconnected => "disconnected",
        }
    }

    /// Whether this API runs at an edge (`VERSUS_NATS_HUB_DOMAIN`).
    pub fn at_edge(&self) -> bool {
        self.edge
    }

    /// JetStream as the last probe found it.
    pub fn jetstream(&self) -> JetStream {
        match self.jetstream.load(Ordering::Relaxed) {
            x if x == JetStream::Up as u8 => JetStream::Up,
            x if x == JetStream::Down as u8 => JetStream::Down,
            _ => JetStream::Unknown,
        }
    }

    /// Probes JetStream every [`PROBE_EVERY`] once attached ([`Bus::ready`]: the streams, or at
    /// an edge its mirror), for [`LazyBus::jetstream`] and the `versus_jetstream_up` gauge,
    /// until `shutdown`. `/readyz` reads what this found and never asks JetStream itself.
    pub async fn probe(&self, shutdown: CancellationToken) {
        metrics::gauge!("versus_jetstream_up").set(0.0);
        let Some(bus) = self.attached(&shutdown).await else {
            return;
        };
        let probe = async {
            loop {
                let up = tokio::time::timeout(PROBE_TIMEOUT, bus.ready())
                    .await
                    .unwrap_or(false);
                let found = if up { JetStream::Up } else { JetStream::Down };
                let was = self.jetstream();
                if was != found && was != JetStream::Unknown {
                    tracing::info!(jetstream = found.as_str(), "JetStream's health changed");
                }
                self.jetstream.store(found as u8, Ordering::Relaxed);
                metrics::gauge!("versus_jetstream_up").set(if up { 1.0 } else { 0.0 });
                tokio::time::sleep(PROBE_EVERY).await;
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = probe => {}
        }
    }
}
