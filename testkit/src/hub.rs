//! A real 3-node JetStream cluster on loopback (`hub1`..`hub3`, cluster `hub`, JetStream
//! domain `hub`, `sync_interval: always`), each server run with the repository's
//! `nats-hub.conf` (`nats.conf`'s users and permissions, a leaf-node listener for edges, and
//! what an edge may do there) and the same fresh passwords, each with its own store. As a
//! deployment does, the kit writes the hub's configuration beside it: `nats-hub.conf` with
//! one leaf login per edge (`versus-leaf-edge1`.., each its own password). A test can SIGKILL a
//! node and start it again, and ask which node leads a stream.

use std::{sync::Arc, time::Duration};

use versus_xtask::topology;

use crate::{Nats, NatsUser, TempDir, free_port, nats::Launch};

/// How long the cluster may take to elect its JetStream meta leader.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at finding ports that stay free until the servers bind them.
const PORT_ATTEMPTS: usize = 5;
/// How many servers.
pub const HUB_NODES: usize = 3;
/// How many edges may join: each has a leaf login of its own (`versus-leaf-edge<i>`).
pub const MAX_EDGES: usize = 4;

/// The three servers of the hub. Killed, and their stores removed, when dropped.
pub struct Hub {
    /// `hub1`, `hub2`, `hub3`, in that order.
    pub nodes: Vec<Nats>,
    /// Each node's leaf-node port, in the same order.
    pub leaf_ports: Vec<u16>,
    /// The password of each edge's leaf login, `versus-leaf-edge1`.. in that order.
    pub leaf_passwords: Vec<String>,
}

impl Hub {
    /// Starts the three servers and waits until JetStream answers on every one of them (the
    /// meta leader is elected).
    pub async fn start() -> Hub {
        let passwords = NatsUser::ALL.map(|_| uuid::Uuid::new_v4().simple().to_string());
        let leaf_passwords: Vec<String> = (0..MAX_EDGES)
            .map(|_| uuid::Uuid::new_v4().simple().to_string())
            .collect();
        let conf = Arc::new(hub_conf());
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            match try_start(&passwords, &leaf_passwords, &conf).await {
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

    /// The leaf login of edge `name` (`edge1`..): its user and password.
    pub fn leaf_login(&self, name: &str) -> (String, &str) {
        let i = name
            .strip_prefix("edge")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=MAX_EDGES).contains(n))
            .unwrap_or_else(|| panic!("no leaf login for {name:?} (edge1..edge{MAX_EDGES})"));
        (leaf_user(i), &self.leaf_passwords[i - 1])
    }

    /// `["nats-leaf://versus-leaf-NAME:PASSWORD@127.0.0.1:L1", …]`: every node's leaf-node URL
    /// with edge `name`'s login, as its server takes them in `VERSUS_NATS_HUB_LEAF_URLS` (see
    /// `nats-edge.conf`).
    pub fn leaf_urls(&self, name: &str) -> String {
        let (user, password) = self.leaf_login(name);
        leaf_urls(&user, password, &self.leaf_ports)
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

/// `["nats-leaf://USER:PASSWORD@127.0.0.1:P", …]` for the leaf-node `ports`.
pub(crate) fn leaf_urls(user: &str, password: &str, ports: &[u16]) -> String {
    topology::leaf_urls(user, password, ports)
}

/// `edge1`, `edge2`, …: the `i`th edge (from 1).
fn edge_name(i: usize) -> String {
    format!("edge{i}")
}

/// The leaf login of the `i`th edge (from 1).
fn leaf_user(i: usize) -> String {
    topology::leaf_user(&edge_name(i))
}

/// The variable the hub's configuration reads the `i`th edge's leaf password from.
fn leaf_password_var(i: usize) -> String {
    topology::password_var(&format!("leaf_{}", edge_name(i)))
}

/// The hub's configuration, as `nats-hub.conf` says a deployment writes it, for `MAX_EDGES`
/// edges (`topology::hub_conf`, as scripts/cluster writes it): a `hub.conf` in a folder of its
/// own, beside links to the repository's `nats-hub.conf` and `nats.conf`.
fn hub_conf() -> TempDir {
    let dir = TempDir::new("versus-hub-conf");
    for file in ["nats.conf", "nats-hub.conf"] {
        std::os::unix::fs::symlink(crate::nats::repo_file(file), dir.path().join(file))
            .unwrap_or_else(|e| panic!("linking {file} into {}: {e}", dir.path().display()));
    }
    let edges: Vec<String> = (1..=MAX_EDGES).map(edge_name).collect();
    let edges: Vec<&str> = edges.iter().map(String::as_str).collect();
    std::fs::write(dir.path().join("hub.conf"), topology::hub_conf(&edges))
        .unwrap_or_else(|e| panic!("writing the hub's configuration: {e}"));
    dir
}

/// Starts the three servers on fresh ports, as `nats-hub.conf` says to run them.
async fn try_start(
    passwords: &[String; 3],
    leaf_passwords: &[String],
    conf: &Arc<TempDir>,
) -> Result<Hub, String> {
    // Each node's client, monitoring, cluster and leaf-node ports.
    let ports: Vec<[u16; 4]> = (0..HUB_NODES)
        .map(|_| [free_port(), free_port(), free_port(), free_port()])
        .collect();
    let mut all: Vec<u16> = ports.iter().flatten().copied().collect();
    all.sort_unstable();
    all.dedup();
    if all.len() != HUB_NODES * 4 {
        return Err("the OS gave the same port twice".to_owned());
    }
    let mut starting = Vec::new();
    for (i, &[port, monitor_port, cluster_port, leaf_port]) in ports.iter().enumerate() {
        let routes: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("nats://127.0.0.1:{}", p[2]))
            .collect();
        let mut envs = vec![("VERSUS_NATS_LEAF_PORT".to_owned(), leaf_port.to_string())];
        envs.extend(
            leaf_passwords
                .iter()
                .enumerate()
                .map(|(i, password)| (leaf_password_var(i + 1), password.clone())),
        );
        let launch = Launch {
            conf: conf.path().join("hub.conf"),
            _conf_dir: Some(conf.clone()),
            args: vec![
                "-n".to_owned(),
                format!("hub{}", i + 1),
                "--cluster_name".to_owned(),
                "hub".to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{cluster_port}"),
                "--routes".to_owned(),
                routes.join(","),
            ],
            envs,
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
    Ok(Hub {
        nodes,
        leaf_ports: ports.iter().map(|p| p[3]).collect(),
        leaf_passwords: leaf_passwords.to_vec(),
    })
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
