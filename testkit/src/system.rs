//! The whole system for one test: nats-server, a fresh database, the simulator, workers and
//! the API, each a real process.

use std::path::Path;
use std::time::Duration;

use futures::future::join_all;

use std::path::PathBuf;

use versus_xtask::topology::{self, ApiWiring, WorkerWiring};

use crate::{
    Database, Edge, FALLBACK_API_KEY_ENV, Fallback, Hub, Nats, NatsUser, Proc, S3, Sim, TempDir,
};

/// Everything a test talks to. Dropping it kills every process and removes the NATS store.
pub struct System {
    /// The nats-server; on a hub ([`SystemBuilder::hub`]), `hub1`, and the other two are in
    /// [`System::hub_peers`]: [`System::hub_node`] finds any of them by name.
    pub nats: Nats,
    /// `hub2` and `hub3` on a hub; empty otherwise.
    pub hub_peers: Vec<Nats>,
    pub db: Database,
    /// The primary upstream (`OPENAI_BASE_URL`).
    pub sim: Sim,
    /// The second simulator, the workers' fallback ([`SystemBuilder::fallback_sim`]); see
    /// [`System::fallback`].
    pub fallback_sim: Option<Sim>,
    /// An API replica beside the hub (or the one server).
    pub api: Proc,
    /// The edges ([`SystemBuilder::edges`]): `edge1`, `edge2`, …, each with its own API.
    pub edges: Vec<Edge>,
    pub workers: Vec<Proc>,
    /// The S3-compatible store, when the system was built with [`SystemBuilder::s3`].
    pub s3: Option<S3>,
    api_envs: Vec<(String, String)>,
    /// The APIs' soft limit on open files ([`SystemBuilder::api_open_files`]).
    api_open_files: Option<u64>,
    worker_envs: Vec<(String, String)>,
    // Last: removed once the processes are gone.
    objects: TempDir,
}

/// Builds a [`System`]: `System::builder().workers(2).env("KEY", "value").start().await`.
#[derive(Debug, Clone)]
pub struct SystemBuilder {
    workers: usize,
    env: Vec<(String, String)>,
    api_env: Vec<(String, String)>,
    worker_env: Vec<(String, String)>,
    sim_env: Vec<(String, String)>,
    fallbacks: Vec<Fallback>,
    s3: bool,
    hub: bool,
    edges: usize,
    own_postgres: bool,
    api_open_files: Option<u64>,
}

impl Default for SystemBuilder {
    fn default() -> Self {
        SystemBuilder {
            workers: 1,
            env: Vec::new(),
            api_env: Vec::new(),
            worker_env: Vec::new(),
            sim_env: Vec::new(),
            fallbacks: Vec::new(),
            s3: false,
            hub: false,
            edges: 0,
            own_postgres: false,
            api_open_files: None,
        }
    }
}

impl SystemBuilder {
    /// How many workers to start (default 1; 0 starts none).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// A variable for the API and the workers; it overrides the kit's defaults.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// A variable for the API only.
    pub fn api_env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.api_env.push((key.to_owned(), value.into()));
        self
    }

    /// Starts every API process (the edges' and [`System::spawn_api`]'s too) with `soft` as
    /// its soft limit on open files (`RLIMIT_NOFILE`; the hard limit stays the test's), as on
    /// a host whose default is lower than the test's (commonly 1,024). Panics at start if
    /// `soft` is above the test's hard limit.
    pub fn api_open_files(mut self, soft: u64) -> Self {
        self.api_open_files = Some(soft);
        self
    }

    /// A variable for the workers only (e.g. `VERSUS_LEASE_SECS`).
    pub fn worker_env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.worker_env.push((key.to_owned(), value.into()));
        self
    }

    /// A variable for the simulator (e.g. `VERSUS_SIM_TTFT_MS`), and for the fallback one.
    pub fn sim_env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.sim_env.push((key.to_owned(), value.into()));
        self
    }

    /// Starts a second simulator ([`System::fallback`], with the same `sim_env`) and names it
    /// in the workers' `VERSUS_FALLBACKS`, after the primary, for each of `kinds` in that order
    /// (each with its own model, [`Fallback::model`], and a key of its own). A later `env` or
    /// `worker_env` of `VERSUS_FALLBACKS` overrides the list.
    pub fn fallback_sim(mut self, kinds: &[Fallback]) -> Self {
        assert!(
            !kinds.is_empty(),
            "a fallback simulator stands in for some kind"
        );
        self.fallbacks = kinds.to_vec();
        self
    }

    /// Stores pictures in a real S3-compatible server (s3s-fs) instead of a local folder.
    pub fn s3(mut self) -> Self {
        self.s3 = true;
        self
    }

    /// Runs the system on a 3-node JetStream cluster ([`Hub`]: `hub1`..`hub3`, domain `hub`)
    /// instead of one nats-server: the API and the workers get every server in `NATS_URL`
    /// and `VERSUS_NATS_REPLICAS=3` (a later `env` overrides it).
    pub fn hub(mut self) -> Self {
        self.hub = true;
        self.env.insert(
            0,
            (
                "VERSUS_NATS_REPLICAS".to_owned(),
                topology::HUB_REPLICAS.to_string(),
            ),
        );
        self
    }

    /// Runs the system on a hub (see [`SystemBuilder::hub`]) with `n` edges besides: each a
    /// nats-server joined to the hub as a leaf node through a proxy the test owns (`edge1`,
    /// `edge2`, …; see [`Edge`]), with an API replica of its own
    /// (`VERSUS_NATS_HUB_DOMAIN=hub`, and the same settings as [`System::api`] otherwise).
    pub fn edges(self, n: usize) -> Self {
        let mut built = if self.hub { self } else { self.hub() };
        built.edges = n;
        built
    }

    /// Puts the database on a Postgres server of its own ([`Database::on_own_server`]) rather
    /// than the one every test shares, so that the test may stop, pause and resume it.
    pub fn own_postgres(mut self) -> Self {
        self.own_postgres = true;
        self
    }

    /// Starts nats-server, the database (migrated as the superuser, as an operator migrates
    /// as the owner) and the simulator (and the fallback one, if any), then the first worker alone, the other workers
    /// together, and finally the API. The API connects to Postgres as the role `versus_api`
    /// and the workers as `versus_worker` (unless a test sets `DATABASE_URL`).
    pub async fn start(self) -> System {
        let sim_env = borrowed(&self.sim_env);
        let servers = async {
            if self.hub {
                let hub = Hub::start().await;
                let mut edges = Vec::with_capacity(self.edges);
                for i in 1..=self.edges {
                    let name = format!("edge{i}");
                    let (nats, link, leaf_login) = crate::edge::start_server(&name, &hub).await;
                    edges.push((name, nats, link, leaf_login));
                }
                let mut nodes = hub.nodes;
                let first = nodes.remove(0);
                (first, nodes, edges)
            } else {
                (Nats::start().await, Vec::new(), Vec::new())
            }
        };
        let db = async {
            let db = if self.own_postgres {
                Database::on_own_server().await
            } else {
                Database::fresh().await
            };
            db.migrate().await;
            db
        };
        let fallback_sim = async {
            if self.fallbacks.is_empty() {
                None
            } else {
                Some(Sim::start(&sim_env).await)
            }
        };
        let ((nats, hub_peers, edge_servers), db, sim, fallback_sim) =
            tokio::join!(servers, db, Sim::start(&sim_env), fallback_sim);
        // Every server of the hub, or the one server, as the programs' NATS_URL.
        let url_as = |user: NatsUser| {
            std::iter::once(&nats)
                .chain(&hub_peers)
                .map(|n| n.url_as(user))
                .collect::<Vec<_>>()
                .join(",")
        };
        // The pictures the workers store and the API serves: a folder of this system's own.
        let objects = TempDir::new("versus-objects");
        let object_store = format!("file://{}", objects.path().display());
        let s3 = if self.s3 {
            Some(S3::start().await)
        } else {
            None
        };
        // With S3, its object store and the AWS_* settings object_store reads.
        let (object_store, store_envs) = match &s3 {
            Some(s3) => {
                let (store, rest): (Vec<_>, Vec<_>) = s3
                    .envs()
                    .into_iter()
                    .partition(|(key, _)| key == "VERSUS_OBJECT_STORE");
                let store = store.into_iter().next().map(|(_, v)| v).unwrap_or_default();
                (store, rest)
            }
            None => (object_store, Vec::new()),
        };

        // What every API and worker gets wherever it runs (the launcher's description, shared
        // with scripts/dev and scripts/cluster): each logs in as its own user of nats.conf.
        let mut api_envs = topology::api_env(&ApiWiring {
            nats_url: &url_as(NatsUser::Api),
            // Only the admin routes use it; answers never touch Postgres.
            database_url: &db.url_as("versus_api"),
            object_store: &object_store,
            http_addr: "127.0.0.1:0",
            admin_token: None,
            hub_domain: None,
        });
        // Every test client is 127.0.0.1: the per-client limits (new generations, open
        // streams and connections, the daily quota) are off unless a test of them sets them.
        for limit in [
            "VERSUS_CLIENT_MISSES_PER_MINUTE",
            "VERSUS_CLIENT_PICTURES_PER_MINUTE",
            "VERSUS_CLIENT_MAX_STREAMS",
            "VERSUS_CLIENT_MAX_CONNECTIONS",
            "VERSUS_CLIENT_DAILY_USD",
            "VERSUS_CLIENT_JOINS_PER_MINUTE",
            "VERSUS_CLIENT_LOOKUPS_PER_SECOND",
        ] {
            api_envs.push((limit.to_owned(), "0".to_owned()));
        }
        // The workers' lease (below), which the API judges stalled generations by.
        api_envs.push(("VERSUS_LEASE_SECS".to_owned(), "3".to_owned()));
        // Tests start many answers (and pictures at list price): the daily budget is off unless
        // a test of it sets one.
        let unbudgeted = ("VERSUS_DAILY_BUDGET_USD".to_owned(), "0".to_owned());
        api_envs.push(unbudgeted.clone());
        api_envs.extend(store_envs.iter().cloned());
        api_envs.extend(self.env.iter().cloned());
        api_envs.extend(self.api_env);

        let mut worker_envs = topology::worker_env(&WorkerWiring {
            nats_url: &url_as(NatsUser::Worker),
            database_url: &db.url_as("versus_worker"),
            object_store: &object_store,
            hub: self.hub,
        });
        worker_envs.extend([
            ("OPENAI_BASE_URL".to_owned(), sim.openai_base_url()),
            ("OPENAI_API_KEY".to_owned(), "test-key".to_owned()),
            (
                "VERSUS_WORKER_HTTP_ADDR".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            // Short, so that tests of a crashed worker do not wait long for its lease.
            ("VERSUS_LEASE_SECS".to_owned(), "3".to_owned()),
            unbudgeted,
        ]);
        if let Some(fallback) = &fallback_sim {
            worker_envs.push((
                "VERSUS_FALLBACKS".to_owned(),
                fallback.fallbacks(&self.fallbacks),
            ));
            worker_envs.push((FALLBACK_API_KEY_ENV.to_owned(), "fallback-key".to_owned()));
        }
        worker_envs.extend(store_envs);
        worker_envs.extend(self.env);
        worker_envs.extend(self.worker_env);

        let mut workers = Vec::with_capacity(self.workers);
        if self.workers > 0 {
            let envs = borrowed(&worker_envs);
            workers.push(Proc::spawn("versus-worker", &envs).await);
            let rest = (1..self.workers).map(|_| Proc::spawn("versus-worker", &envs));
            workers.extend(join_all(rest).await);
        } else {
            // The API only looks the streams up, and waits for a worker to declare them: with
            // no worker, declare them here, as a worker with these settings would.
            declare_streams(&nats, &worker_envs).await;
        }
        let api =
            Proc::spawn_with_open_files("versus-api", &borrowed(&api_envs), self.api_open_files)
                .await;
        // The API serves at once, and misses once it has found the streams and buckets.
        api.until_ready().await;
        let mut edges = Vec::with_capacity(edge_servers.len());
        for (name, edge_nats, link, leaf_login) in edge_servers {
            let mut envs = api_envs.clone();
            envs.push(("NATS_URL".to_owned(), edge_nats.url_as(NatsUser::Api)));
            envs.push((
                "VERSUS_NATS_HUB_DOMAIN".to_owned(),
                topology::HUB_DOMAIN.to_owned(),
            ));
            let api =
                Proc::spawn_with_open_files("versus-api", &borrowed(&envs), self.api_open_files)
                    .await;
            api.until_ready().await;
            edges.push(Edge {
                name,
                api,
                link,
                nats: edge_nats,
                leaf_login,
            });
        }

        System {
            nats,
            hub_peers,
            db,
            sim,
            fallback_sim,
            api,
            edges,
            workers,
            s3,
            api_envs,
            api_open_files: self.api_open_files,
            worker_envs,
            objects,
        }
    }
}

impl System {
    pub fn builder() -> SystemBuilder {
        SystemBuilder::default()
    }

    /// The API's base URL, `http://127.0.0.1:PORT`.
    pub fn api_url(&self) -> &str {
        &self.api.url
    }

    /// The fallback simulator; panics unless the system was built with
    /// [`SystemBuilder::fallback_sim`].
    pub fn fallback(&self) -> &Sim {
        self.fallback_sim
            .as_ref()
            .expect("the system has no fallback simulator: build it with .fallback_sim(..)")
    }

    /// The hub's server `name` (`hub1`..`hub3`; `hub1` is [`System::nats`]).
    pub fn hub_node(&mut self, name: &str) -> &mut Nats {
        assert!(
            !self.hub_peers.is_empty(),
            "the system does not run on a hub"
        );
        match crate::hub::node_index(name) {
            0 => &mut self.nats,
            i => &mut self.hub_peers[i - 1],
        }
    }

    /// The hub's server `name` killed (SIGKILL) and started again after `down` on the same
    /// ports and store; returns once it is healthy again.
    pub async fn restart_hub_node(&mut self, name: &str, down: Duration) {
        let node = self.hub_node(name);
        node.kill().await;
        tokio::time::sleep(down).await;
        node.restart().await;
        crate::hub::wait_ready(std::slice::from_ref(node)).await;
    }

    /// A client with every right, to any server of the hub (or to the one server).
    pub async fn admin_client(&self) -> async_nats::Client {
        let urls: Vec<&str> = std::iter::once(&self.nats)
            .chain(&self.hub_peers)
            .map(|n| n.url.as_str())
            .collect();
        async_nats::ConnectOptions::with_user_and_password(
            NatsUser::Admin.name().to_owned(),
            self.nats.password(NatsUser::Admin).to_owned(),
        )
        .retry_on_initial_connect()
        .connect(urls)
        .await
        .expect("connect to nats-server as versus-admin")
    }

    /// The folder behind the system's object store (`VERSUS_OBJECT_STORE=file://…`), where
    /// the workers put pictures and the API reads them.
    pub fn objects_dir(&self) -> &Path {
        self.objects.path()
    }

    /// The pictures in the system's local object folder.
    pub fn stored_objects(&self) -> Vec<PathBuf> {
        crate::s3::files(self.objects.path())
    }

    /// Starts one more worker with the same environment as the others.
    pub async fn spawn_worker(&mut self) -> &mut Proc {
        let worker = Proc::spawn("versus-worker", &borrowed(&self.worker_envs)).await;
        self.workers.push(worker);
        let last = self.workers.len() - 1;
        &mut self.workers[last]
    }

    /// Starts another API replica with the same environment as [`System::api`] (on its own
    /// port), and waits until it is ready (`/readyz`); the caller owns it.
    pub async fn spawn_api(&self) -> Proc {
        let api = Proc::spawn_with_open_files(
            "versus-api",
            &borrowed(&self.api_envs),
            self.api_open_files,
        )
        .await;
        api.until_ready().await;
        api
    }

    /// The environment the API was started with (later entries win).
    pub fn api_envs(&self) -> &[(String, String)] {
        &self.api_envs
    }

    /// The environment the workers were started with (later entries win).
    pub fn worker_envs(&self) -> &[(String, String)] {
        &self.worker_envs
    }
}

impl Drop for System {
    fn drop(&mut self) {
        // Every test checks nats.conf too: the API and the workers never did what their users
        // may not (a permission they need and lack shows up as a violation).
        if !std::thread::panicking() {
            let refused: Vec<String> = std::iter::once(&self.nats)
                .chain(&self.hub_peers)
                .chain(self.edges.iter().map(|e| &e.nats))
                .flat_map(|n| n.violations_of(&["versus-api", "versus-worker"]))
                .collect();
            assert!(
                refused.is_empty(),
                "nats-server refused the API or a worker what it did (nats.conf or \
                 nats-edge.conf lacks a permission?):\n{}",
                refused.join("\n")
            );
        }
        // The API and the workers go first (each Proc would be killed on drop anyway), so
        // that none of them logs a lost NATS connection while the fields drop in order.
        self.api.start_kill();
        for edge in &mut self.edges {
            edge.api.start_kill();
        }
        for worker in &mut self.workers {
            worker.start_kill();
        }
    }
}

/// Declares the streams and buckets as a worker started with `envs` would (their
/// `VERSUS_MAX_QUEUED_JOBS` and `VERSUS_EVENTS_MAX_AGE_SECS`), logged in as the admin.
async fn declare_streams(nats: &Nats, envs: &[(String, String)]) {
    let setting = |key: &str, default: u64| {
        envs.iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(default)
    };
    let settings = versus_shared::config::NatsSettings {
        url: versus_shared::config::Secret::new(nats.admin_url()),
        creds: None,
        tls_ca: None,
        replicas: envs
            .iter()
            .rev()
            .find(|(k, _)| k == "VERSUS_NATS_REPLICAS")
            .and_then(|(_, v)| v.parse().ok()),
        events_max_age_secs: setting("VERSUS_EVENTS_MAX_AGE_SECS", 600),
        events_max_mib: setting("VERSUS_EVENTS_MAX_MIB", 192),
        max_queued_jobs: i64::try_from(setting("VERSUS_MAX_QUEUED_JOBS", 10_000))
            .unwrap_or(i64::MAX),
    };
    let tasks = versus_shared::tasks::Tasks::new();
    let declared =
        versus_shared::bus::Bus::connect(&settings, versus_shared::bus::Role::Worker, &tasks).await;
    tasks.shutdown().cancel();
    tasks.wait(Duration::from_secs(5)).await;
    if let Err(e) = declared {
        panic!("declaring the streams on nats-server failed: {e:#}");
    }
}

fn borrowed(envs: &[(String, String)]) -> Vec<(&str, String)> {
    envs.iter()
        .map(|(key, value)| (key.as_str(), value.clone()))
        .collect()
}
