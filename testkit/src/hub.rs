//! A real 3-node JetStream cluster on loopback (`hub1`..`hub3`, cluster `hub`, JetStream
//! domain `hub`, `sync_interval: always`), each server run with the repository's `nats.conf`
//! (its users and their permissions) and the same fresh passwords, each with its own store. A
//! test can SIGKILL a node and start it again, and ask which node leads a stream.

use std::sync::Arc;
use std::time::Duration;

use crate::{Nats, NatsUser, TempDir, free_port, nats::Launch};

/// How long the cluster may take to elect its JetStream meta leader.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at finding ports that stay free until the servers bind them.
const PORT_ATTEMPTS: usize = 5;
/// How many servers.
pub const HUB_NODES: usize = 3;

/// The three servers of the hub. Killed, and their stores removed, when dropped.
pub struct Hub {
    /// `hub1`, `hub2`, `hub3`, in that order.
    pub nodes: Vec<Nats>,
}

impl Hub {
    /// Starts the three servers and waits until JetStream answers on every one of them (the
    /// meta leader is elected).
    pub async fn start() -> Hub {
        let passwords = NatsUser::ALL.map(|_| uuid::Uuid::new_v4().simple().to_string());
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            match try_start(&passwords).await {
                Ok(hub) => {
                    hub.wait_ready().await;
                    return hub;
                }
                // Most likely another test took a port in between: try others.
                Err(e) => last_error = e,
            }
        }
        panic!("the hub did not start after {PORT_ATTEMPTS} attempts: {last_error}");
    }

    /// The server named `name` (`hub1`..`hub3`).
    pub fn node(&mut self, name: &str) -> &mut Nats {
        let i = node_index(name);
        &mut self.nodes[i]
    }

    /// `nats://USER:PASSWORD@127.0.0.1:P1,nats://USER:PASSWORD@127.0.0.1:P2,…`: every
    /// server, as the binaries take it in `NATS_URL`.
    pub fn url_as(&self, user: NatsUser) -> String {
        self.nodes
            .iter()
            .map(|node| node.url_as(user))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client logged in as `user`, to whichever server answers (and to another after a
    /// node dies).
    pub async fn connect_as(
        &self,
        user: NatsUser,
    ) -> Result<async_nats::Client, async_nats::ConnectError> {
        let urls: Vec<&str> = self.nodes.iter().map(|n| n.url.as_str()).collect();
        async_nats::ConnectOptions::with_user_and_password(
            user.name().to_owned(),
            self.nodes[0].password(user).to_owned(),
        )
        .retry_on_initial_connect()
        .connect(urls)
        .await
    }

    /// A client with every right (`versus-admin`).
    pub async fn client(&self) -> async_nats::Client {
        self.connect_as(NatsUser::Admin)
            .await
            .expect("connect to the hub as versus-admin")
    }

    /// SIGKILLs the server `name` and waits for it to exit: a crash, until [`Hub::restart`].
    pub async fn kill(&mut self, name: &str) {
        self.node(name).kill().await;
    }

    /// Starts the server `name` again (same ports, same store) and waits until it is healthy.
    pub async fn restart(&mut self, name: &str) {
        self.node(name).restart().await;
        wait_ready(&self.nodes[node_index(name)..=node_index(name)]).await;
    }

    /// Waits until every running server says JetStream is healthy (`/healthz`).
    pub async fn wait_ready(&self) {
        wait_ready(&self.nodes).await;
    }

    /// Violations of the connections named one of `names`, on any server.
    pub fn violations_of(&self, names: &[&str]) -> Vec<String> {
        self.nodes
            .iter()
            .flat_map(|n| n.violations_of(names))
            .collect()
    }
}

/// The index of `hub1`..`hub3`.
pub(crate) fn node_index(name: &str) -> usize {
    name.strip_prefix("hub")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| (1..=HUB_NODES).contains(n))
        .map(|n| n - 1)
        .unwrap_or_else(|| panic!("no hub node named {name:?} (hub1..hub{HUB_NODES})"))
}

/// The answer to `$JS.API.STREAM.INFO.<stream>`, asked with `client` (any user that may read
/// the stream's info; the admin may); None without one within 3 s.
async fn stream_info(client: &async_nats::Client, stream: &str) -> Option<serde_json::Value> {
    let subject = format!("$JS.API.STREAM.INFO.{stream}");
    let reply = tokio::time::timeout(
        Duration::from_secs(3),
        client.request(subject, Default::default()),
    )
    .await
    .ok()?
    .ok()?;
    serde_json::from_slice(&reply.payload).ok()
}

/// The server that leads `stream` now (`hub1`..`hub3`); None while the stream has no leader
/// (or its info cannot be had).
pub async fn stream_leader(client: &async_nats::Client, stream: &str) -> Option<String> {
    let info = stream_info(client, stream).await?;
    info.pointer("/cluster/leader")
        .and_then(|l| l.as_str())
        .map(str::to_owned)
}

/// Asks the leader of `stream` to step down in favour of server `to` (an admin request) and
/// waits up to 10 s until `to` leads it. False if it did not move (a stream with one replica
/// never does).
pub async fn move_leader(client: &async_nats::Client, stream: &str, to: &str) -> bool {
    let replicas = stream_info(client, stream).await.and_then(|info| {
        info.pointer("/config/num_replicas")
            .and_then(|n| n.as_u64())
    });
    if replicas.unwrap_or(1) < 2 {
        return false;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        match stream_leader(client, stream).await {
            Some(leader) if leader == to => return true,
            Some(_) => {
                let request = serde_json::json!({"placement": {"preferred": to}});
                let _ = tokio::time::timeout(
                    Duration::from_secs(3),
                    client.request(
                        format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                        serde_json::to_vec(&request).unwrap_or_default().into(),
                    ),
                )
                .await;
            }
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// Starts the three servers on fresh ports.
async fn try_start(passwords: &[String; 3]) -> Result<Hub, String> {
    // The configuration files, removed with the last server that reads them.
    let confs = Arc::new(TempDir::new("versus-hub"));
    let ports: Vec<(u16, u16, u16)> = (0..HUB_NODES)
        .map(|_| (free_port(), free_port(), free_port()))
        .collect();
    let mut all: Vec<u16> = ports.iter().flat_map(|p| [p.0, p.1, p.2]).collect();
    all.sort_unstable();
    all.dedup();
    if all.len() != HUB_NODES * 3 {
        return Err("the OS gave the same port twice".to_owned());
    }
    let base = std::fs::read_to_string(crate::nats::nats_conf())
        .map_err(|e| format!("read nats.conf: {e}"))?;
    // The hub's JetStream domain, and an fsync after every write as issue 13's hub runs, in
    // the repository's own jetstream block (a second block would replace it).
    assert_eq!(
        base.matches("\njetstream {").count(),
        1,
        "nats.conf should have one jetstream block"
    );
    let base = base.replacen(
        "\njetstream {",
        "\njetstream {\n  domain: hub\n  sync_interval: always",
        1,
    );
    let mut starting = Vec::new();
    for (i, &(port, monitor_port, cluster_port)) in ports.iter().enumerate() {
        let name = format!("hub{}", i + 1);
        let routes: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("\"nats://127.0.0.1:{}\"", p.2))
            .collect();
        let conf = format!(
            "{base}\n# The test kit's hub.\nserver_name: {name}\ncluster {{\n  name: hub\n  \
             listen: \"127.0.0.1:{cluster_port}\"\n  routes: [{}]\n}}\n",
            routes.join(", ")
        );
        let path = confs.path().join(format!("{name}.conf"));
        std::fs::write(&path, conf).map_err(|e| format!("write {}: {e}", path.display()))?;
        let launch = Launch {
            conf: path,
            args: Vec::new(),
            _conf_dir: Some(confs.clone()),
        };
        starting.push(Nats::start_member(
            port,
            monitor_port,
            passwords.clone(),
            launch,
        ));
    }
    let started = futures::future::join_all(starting).await;
    let mut nodes = Vec::with_capacity(HUB_NODES);
    let mut errors = Vec::new();
    for node in started {
        match node {
            Ok(node) => nodes.push(node),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    Ok(Hub { nodes })
}

/// Waits until every running node's `/healthz` answers 200 (JetStream current).
pub(crate) async fn wait_ready(nodes: &[Nats]) {
    let http = crate::http_client();
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    for node in nodes.iter().filter(|n| n.is_running()) {
        let url = format!("http://127.0.0.1:{}/healthz", node.monitor_port);
        loop {
            let ok = match http.get(&url).send().await {
                Ok(response) => response.status().is_success(),
                Err(_) => false,
            };
            if ok {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "the hub node on port {} did not become healthy within {READY_TIMEOUT:?}; log:\n{}",
                    node.port,
                    node.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
