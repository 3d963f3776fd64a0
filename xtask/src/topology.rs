//! The topology of a Versus system on this machine, written once: which processes `dev` and
//! `cluster` run, their names, ports and the variables that change them, the settings each
//! program is given, and which of them are infrastructure (stopped after the others).
//!
//! The settings every worker or API gets wherever it runs (`worker_env`, `api_env`) are the
//! ones the test kit's systems give theirs too: a setting added there reaches `scripts/dev`,
//! `scripts/cluster` and the tests. The order in which the processes start, and what each
//! waits for, is the launcher's (`dev.rs`, `cluster.rs`).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// nats.conf's users, in the order their passwords are kept: versus-admin (operators, tools),
/// versus-api and versus-worker.
pub const NATS_USERS: [&str; 3] = ["admin", "api", "worker"];
/// The hub's servers (`cluster`).
pub const HUBS: [&str; 3] = ["hub1", "hub2", "hub3"];
/// The edges (`cluster`): each a nats-server joined to the hub as a leaf node, with an API.
pub const EDGES: [&str; 2] = ["edge1", "edge2"];
/// The hub's JetStream domain, through which the edges' APIs reach its streams.
pub const HUB_DOMAIN: &str = "hub";
/// Replicas of every stream and bucket on the hub.
pub const HUB_REPLICAS: u8 = 3;

/// Settings whose value is the same in every deployment of the topology (here, in the tests and
/// in compose.yaml, which `testkit/tests/compose/topology.rs` compares); the others are
/// addresses, ports, paths and secrets, which each place makes its own.
pub const SAME_EVERYWHERE: [&str; 3] = [
    "VERSUS_NATS_REPLICAS",
    "VERSUS_NATS_HUB_DOMAIN",
    "VERSUS_NATS_DOMAIN",
];

/// Variables and their values, in the order given (a later one wins).
pub type Env = Vec<(String, String)>;

/// A program the supervisor runs and keeps running.
#[derive(Clone, Debug)]
pub struct Process {
    /// `nats`, `worker-1`, `api-edge2`, ...: its log, pid file and lines are named after it.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// On top of the launcher's environment, which passes through (the programs' other
    /// settings: `VERSUS_LEASE_SECS`, `VERSUS_SIM_TOKENS_PER_SEC`, ...).
    pub env: Env,
    /// Something the others depend on (NATS, the simulator): stopped after them.
    pub infra: bool,
}

/// nats-server's command line here (before any flags of one server's own): the configuration
/// `conf`, clients on 127.0.0.1 at `port`, monitoring at `monitor_port`, the JetStream store
/// in `store`.
pub fn nats_server_args(conf: &Path, port: u16, monitor_port: u16, store: &Path) -> Vec<String> {
    vec![
        "-c".to_owned(),
        conf.display().to_string(),
        "-a".to_owned(),
        "127.0.0.1".to_owned(),
        "-p".to_owned(),
        port.to_string(),
        "-m".to_owned(),
        monitor_port.to_string(),
        "-sd".to_owned(),
        store.display().to_string(),
    ]
}

/// The variable that holds the NATS password of `user` (`admin`, `leaf_edge1`, ...).
pub fn password_var(user: &str) -> String {
    format!("VERSUS_NATS_{}_PASSWORD", user.to_uppercase())
}

/// The URL that logs in as versus-`user` on 127.0.0.1 at each port, separated by commas, as
/// the programs take several servers in `NATS_URL` (a secret: never on a command line).
pub fn nats_url(user: &str, password: &str, ports: &[u16]) -> String {
    ports
        .iter()
        .map(|port| format!("nats://versus-{user}:{password}@127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Where a worker finds the others.
pub struct WorkerWiring<'a> {
    /// `NATS_URL`, logged in as versus-worker.
    pub nats_url: &'a str,
    /// Postgres, as the role versus_worker.
    pub database_url: &'a str,
    /// Where it stores the pictures (`VERSUS_OBJECT_STORE`).
    pub object_store: &'a str,
    /// Whether it runs on the hub of three, whose streams and buckets have three replicas.
    pub hub: bool,
}

/// What every worker is given, wherever it runs.
pub fn worker_env(wiring: &WorkerWiring) -> Env {
    let mut env = vec![
        var("NATS_URL", wiring.nats_url),
        var("DATABASE_URL", wiring.database_url),
        var("VERSUS_OBJECT_STORE", wiring.object_store),
    ];
    if wiring.hub {
        env.push(var("VERSUS_NATS_REPLICAS", &HUB_REPLICAS.to_string()));
    }
    env
}

/// Where an API replica finds the others, and what it serves on.
pub struct ApiWiring<'a> {
    /// `NATS_URL`, logged in as versus-api.
    pub nats_url: &'a str,
    /// Postgres, as the role versus_api (the admin routes only).
    pub database_url: &'a str,
    /// Where it reads the pictures (`VERSUS_OBJECT_STORE`).
    pub object_store: &'a str,
    /// `VERSUS_HTTP_ADDR`.
    pub http_addr: &'a str,
    /// `VERSUS_ADMIN_TOKEN`, when the system makes one.
    pub admin_token: Option<&'a str>,
    /// At an edge, the hub's JetStream domain (`VERSUS_NATS_HUB_DOMAIN`).
    pub hub_domain: Option<&'a str>,
}

/// What every API replica is given, wherever it runs.
pub fn api_env(wiring: &ApiWiring) -> Env {
    let mut env = vec![
        var("NATS_URL", wiring.nats_url),
        var("DATABASE_URL", wiring.database_url),
        var("VERSUS_OBJECT_STORE", wiring.object_store),
        var("VERSUS_HTTP_ADDR", wiring.http_addr),
    ];
    if let Some(token) = wiring.admin_token {
        env.push(var("VERSUS_ADMIN_TOKEN", token));
    }
    if let Some(domain) = wiring.hub_domain {
        env.push(var("VERSUS_NATS_HUB_DOMAIN", domain));
    }
    env
}

/// What the simulator is given.
pub fn sim_env(addr: &str) -> Env {
    vec![var("VERSUS_SIM_ADDR", addr)]
}

fn var(key: &str, value: &str) -> (String, String) {
    (key.to_owned(), value.to_owned())
}

/// The binaries the launcher runs.
pub struct Binaries {
    /// versus-api, versus-worker and versus-sim are here.
    pub dir: PathBuf,
    pub nats_server: PathBuf,
}

impl Binaries {
    pub fn versus(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The programs' passwords by user (`admin`, `leaf_edge1`, ...), as nats-server reads them.
pub fn password_env(passwords: &[(String, String)], users: &[&str]) -> Env {
    users
        .iter()
        .filter_map(|user| {
            let var = password_var(user);
            passwords
                .iter()
                .find(|(v, _)| *v == var)
                .map(|(_, password)| (var, password.clone()))
        })
        .collect()
}

/// The leaf login of the edge `edge` on the hub (`versus-leaf-edge1`); its password is in
/// `password_var("leaf_<edge>")`.
pub fn leaf_user(edge: &str) -> String {
    format!("versus-leaf-{edge}")
}

/// The hub's leaf-node URLs on 127.0.0.1 at `ports`, with the login `user`, as an edge's
/// server takes them in `VERSUS_NATS_HUB_LEAF_URLS`: a list in nats config syntax (a secret).
pub fn leaf_urls(user: &str, password: &str, ports: &[u16]) -> String {
    let urls: Vec<String> = ports
        .iter()
        .map(|port| format!("\"nats-leaf://{user}:{password}@127.0.0.1:{port}\""))
        .collect();
    format!("[{}]", urls.join(","))
}

/// The hub's configuration, as nats-hub.conf says a deployment writes it (`hub.conf`, beside
/// links to nats-hub.conf and nats.conf, which it includes): nats.conf's users and one leaf
/// login per edge of `edges`, each with the edges' permissions (the users' default there) and
/// a password read from the environment (`password_var("leaf_<edge>")`).
pub fn hub_conf(edges: &[&str]) -> String {
    let users: Vec<String> = edges
        .iter()
        .map(|edge| {
            format!(
                "    {{ user: {}, password: ${}, allowed_connection_types: [\"LEAFNODE\"] }}",
                leaf_user(edge),
                password_var(&format!("leaf_{edge}"))
            )
        })
        .collect();
    format!(
        "# The hub with its edges' leaf logins (nats-hub.conf), from xtask/src/topology.rs.\n\
         include ./nats-hub.conf\n\
         authorization {{\n  default_permissions: $VERSUS_LEAF_PERMISSIONS\n  users = [\n\
         \x20   $VERSUS_ADMIN_USER, $VERSUS_API_USER, $VERSUS_WORKER_USER,\n{}\n  ]\n}}\n",
        users.join(",\n")
    )
}

// --- scripts/dev -------------------------------------------------------------------------

/// `dev`: Postgres, one nats-server with JetStream, the simulator (without an upstream), the
/// workers (`worker-1`, ...) and the API.
#[derive(Clone, Debug)]
pub struct Dev {
    /// `VERSUS_HTTP_ADDR`, default 127.0.0.1:8080.
    pub http_addr: String,
    /// `VERSUS_WORKERS`, default 2.
    pub workers: usize,
    /// `VERSUS_PG_PORT`, default 5433 (beside a system Postgres).
    pub pg_port: u16,
    /// `VERSUS_NATS_PORT`, default 4222.
    pub nats_port: u16,
    /// `VERSUS_NATS_MONITOR_PORT`, default 8222.
    pub nats_monitor_port: u16,
    /// `VERSUS_SIM_ADDR`, default 127.0.0.1:8787.
    pub sim_addr: String,
}

impl Dev {
    /// The settings from the environment (`var` reads a variable).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Dev> {
        let workers = var("VERSUS_WORKERS").unwrap_or_else(|| "2".to_owned());
        let Some(workers) = whole(&workers) else {
            bail!("VERSUS_WORKERS must be a number, not '{workers}'");
        };
        let port = |name: &str, default: u16| -> Result<u16> {
            let value = var(name).unwrap_or_else(|| default.to_string());
            match whole(&value).and_then(|n| u16::try_from(n).ok()) {
                Some(port) => Ok(port),
                None => bail!("{name} must be a port number, not '{value}'"),
            }
        };
        Ok(Dev {
            http_addr: var("VERSUS_HTTP_ADDR").unwrap_or_else(|| "127.0.0.1:8080".to_owned()),
            workers,
            pg_port: port("VERSUS_PG_PORT", 5433)?,
            nats_port: port("VERSUS_NATS_PORT", 4222)?,
            nats_monitor_port: port("VERSUS_NATS_MONITOR_PORT", 8222)?,
            sim_addr: var("VERSUS_SIM_ADDR").unwrap_or_else(|| "127.0.0.1:8787".to_owned()),
        })
    }

    /// What the others depend on, stopped after them: NATS and the simulator.
    pub fn is_infra(name: &str) -> bool {
        name == "nats" || name == "sim"
    }

    pub fn worker_name(n: usize) -> String {
        format!("worker-{n}")
    }

    /// nats-server with nats.conf, its store in `data`/nats; only it gets the passwords.
    pub fn nats(&self, bins: &Binaries, data: &Path, passwords: &[(String, String)]) -> Process {
        Process {
            name: "nats".to_owned(),
            program: bins.nats_server.clone(),
            args: nats_server_args(
                Path::new("nats.conf"),
                self.nats_port,
                self.nats_monitor_port,
                &data.join("nats"),
            ),
            env: password_env(passwords, &NATS_USERS),
            infra: true,
        }
    }

    pub fn sim(&self, bins: &Binaries) -> Process {
        sim(bins, &self.sim_addr)
    }

    /// Worker `n` (from 1), logged in to the one server.
    pub fn worker(&self, n: usize, bins: &Binaries, wiring: &Wiring) -> Process {
        let nats_url = nats_url("worker", wiring.password("worker"), &[self.nats_port]);
        worker(Dev::worker_name(n), bins, &nats_url, wiring, false)
    }

    pub fn api(&self, bins: &Binaries, wiring: &Wiring) -> Process {
        let nats_url = nats_url("api", wiring.password("api"), &[self.nats_port]);
        api(
            "api".to_owned(),
            bins,
            &nats_url,
            &self.http_addr,
            None,
            wiring,
        )
    }
}

// --- scripts/cluster ---------------------------------------------------------------------

/// `cluster`: Postgres, the hub (hub1..hub3), the edges' servers (edge1, edge2), the
/// simulator (without an upstream), the workers on the hub (`worker1`, ...) and an API at each
/// edge (`api-edge1`, `api-edge2`).
#[derive(Clone, Debug)]
pub struct Cluster {
    /// `VERSUS_EDGE_HTTP_ADDRS`, default "127.0.0.1:8081 127.0.0.1:8082" (port 0 picks one).
    pub edge_http_addrs: Vec<String>,
    /// `VERSUS_WORKERS`, default 2, at least 1.
    pub workers: usize,
    /// `VERSUS_PG_PORT`, default 5434.
    pub pg_port: u16,
    /// `VERSUS_HUB_PORTS`, default "4231 4232 4233".
    pub hub_ports: Vec<u16>,
    /// `VERSUS_HUB_MONITOR_PORTS`, default "8231 8232 8233".
    pub hub_monitor_ports: Vec<u16>,
    /// `VERSUS_HUB_CLUSTER_PORTS`, default "6231 6232 6233".
    pub hub_cluster_ports: Vec<u16>,
    /// `VERSUS_HUB_LEAF_PORTS`, default "7231 7232 7233".
    pub hub_leaf_ports: Vec<u16>,
    /// `VERSUS_EDGE_LEAF_PORTS`: the hub's leaf-node ports as the edges dial them (default
    /// the hub's own, `VERSUS_HUB_LEAF_PORTS`).
    pub edge_leaf_ports: Vec<u16>,
    /// `VERSUS_EDGE_PORTS`, default "4241 4242".
    pub edge_ports: Vec<u16>,
    /// `VERSUS_EDGE_MONITOR_PORTS`, default "8241 8242".
    pub edge_monitor_ports: Vec<u16>,
    /// `VERSUS_SIM_ADDR`, default 127.0.0.1:8788.
    pub sim_addr: String,
}

impl Cluster {
    /// The settings from the environment (`var` reads a variable). Lists take words
    /// separated by spaces or commas, one per server.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Cluster> {
        let list = |name: &str, count: usize, default: &str| -> Result<Vec<String>> {
            let value = var(name).filter(|v| !v.is_empty());
            let value = value.as_deref().unwrap_or(default);
            let words: Vec<String> = value
                .replace(',', " ")
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if words.len() != count {
                bail!("{name} must list {count} values, not '{value}'");
            }
            Ok(words)
        };
        let ports = |name: &str, count: usize, default: &str| -> Result<Vec<u16>> {
            list(name, count, default)?
                .into_iter()
                .map(|word| match word.parse::<u16>() {
                    Ok(port) if port > 0 && !word.starts_with('0') => Ok(port),
                    _ => bail!(
                        "'{word}' is not a port number (VERSUS_HUB_*_PORTS, VERSUS_EDGE_*_PORTS)"
                    ),
                })
                .collect()
        };
        let hub_ports = ports("VERSUS_HUB_PORTS", 3, "4231 4232 4233")?;
        let hub_monitor_ports = ports("VERSUS_HUB_MONITOR_PORTS", 3, "8231 8232 8233")?;
        let hub_cluster_ports = ports("VERSUS_HUB_CLUSTER_PORTS", 3, "6231 6232 6233")?;
        let hub_leaf_ports = ports("VERSUS_HUB_LEAF_PORTS", 3, "7231 7232 7233")?;
        let hub_leaf_default = hub_leaf_ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        let edge_leaf_ports = ports("VERSUS_EDGE_LEAF_PORTS", 3, &hub_leaf_default)?;
        let edge_ports = ports("VERSUS_EDGE_PORTS", 2, "4241 4242")?;
        let edge_monitor_ports = ports("VERSUS_EDGE_MONITOR_PORTS", 2, "8241 8242")?;
        let edge_http_addrs = list("VERSUS_EDGE_HTTP_ADDRS", 2, "127.0.0.1:8081 127.0.0.1:8082")?;
        let workers = var("VERSUS_WORKERS").unwrap_or_else(|| "2".to_owned());
        let workers = match whole(&workers) {
            Some(n) if n > 0 && !workers.starts_with('0') => n,
            _ => bail!("VERSUS_WORKERS must be a number from 1 up, not '{workers}'"),
        };
        let pg_port = var("VERSUS_PG_PORT").unwrap_or_else(|| "5434".to_owned());
        let Some(pg_port) = whole(&pg_port).and_then(|n| u16::try_from(n).ok()) else {
            bail!("VERSUS_PG_PORT must be a port number, not '{pg_port}'");
        };
        let cluster = Cluster {
            edge_http_addrs,
            workers,
            pg_port,
            hub_ports,
            hub_monitor_ports,
            hub_cluster_ports,
            hub_leaf_ports,
            edge_leaf_ports,
            edge_ports,
            edge_monitor_ports,
            sim_addr: var("VERSUS_SIM_ADDR").unwrap_or_else(|| "127.0.0.1:8788".to_owned()),
        };
        let bound = cluster.nats_ports();
        let mut unique = bound.clone();
        unique.sort_unstable();
        unique.dedup();
        if unique.len() != bound.len() {
            let all: Vec<String> = bound.iter().map(u16::to_string).collect();
            bail!(
                "the NATS servers' ports must differ from each other: {}",
                all.join(" ")
            );
        }
        Ok(cluster)
    }

    /// Every port the NATS servers bind.
    pub fn nats_ports(&self) -> Vec<u16> {
        [
            &self.hub_ports,
            &self.hub_monitor_ports,
            &self.hub_cluster_ports,
            &self.hub_leaf_ports,
            &self.edge_ports,
            &self.edge_monitor_ports,
        ]
        .into_iter()
        .flatten()
        .copied()
        .collect()
    }

    /// What the others depend on, stopped after them: the NATS servers and the simulator.
    pub fn is_infra(name: &str) -> bool {
        let numbered = |prefix: &str| {
            name.strip_prefix(prefix)
                .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        };
        numbered("hub") || numbered("edge") || name == "sim"
    }

    pub fn worker_name(n: usize) -> String {
        format!("worker{n}")
    }

    /// The NATS users whose passwords the cluster keeps: nats.conf's, and each edge's own leaf
    /// login to the hub (`leaf_edge1`, ...).
    pub fn nats_users() -> Vec<String> {
        NATS_USERS
            .iter()
            .map(|user| (*user).to_owned())
            .chain(EDGES.iter().map(|edge| format!("leaf_{edge}")))
            .collect()
    }

    /// The hub's configuration for its two edges (see [`hub_conf`]).
    pub fn hub_conf() -> String {
        hub_conf(&EDGES)
    }

    /// Hub server `i` (from 0): routes to the other two; its configuration reads the users'
    /// and the edges' leaf passwords and its leaf-node port from the environment.
    pub fn hub(
        &self,
        i: usize,
        bins: &Binaries,
        conf: &Path,
        data: &Path,
        passwords: &[(String, String)],
    ) -> Process {
        let name = HUBS[i];
        let routes: Vec<String> = (0..HUBS.len())
            .filter(|j| *j != i)
            .map(|j| format!("nats://127.0.0.1:{}", self.hub_cluster_ports[j]))
            .collect();
        let users = Cluster::nats_users();
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let mut env = password_env(passwords, &users);
        env.push(var(
            "VERSUS_NATS_LEAF_PORT",
            &self.hub_leaf_ports[i].to_string(),
        ));
        Process {
            name: name.to_owned(),
            program: bins.nats_server.clone(),
            args: [
                nats_server_args(
                    conf,
                    self.hub_ports[i],
                    self.hub_monitor_ports[i],
                    &data.join("nats").join(name),
                ),
                vec![
                    "-n".to_owned(),
                    name.to_owned(),
                    "--cluster_name".to_owned(),
                    HUB_DOMAIN.to_owned(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{}", self.hub_cluster_ports[i]),
                    "--routes".to_owned(),
                    routes.join(","),
                ],
            ]
            .concat(),
            env,
            infra: true,
        }
    }

    /// The hub's leaf-node URLs as the edge server `edge` takes them: a list in nats config
    /// syntax, with its own leaf login (a secret).
    pub fn leaf_urls(&self, edge: &str, passwords: &[(String, String)]) -> String {
        let password = password_of(passwords, &format!("leaf_{edge}"));
        leaf_urls(&leaf_user(edge), password, &self.edge_leaf_ports)
    }

    /// Edge server `i` (from 0): its own users (the admin and the API; the workers never log
    /// in at an edge), its JetStream domain, and the hub's leaf-node URLs with its own login.
    pub fn edge(
        &self,
        i: usize,
        bins: &Binaries,
        data: &Path,
        passwords: &[(String, String)],
    ) -> Process {
        let name = EDGES[i];
        let mut env = password_env(passwords, &["admin", "api"]);
        env.push(var("VERSUS_NATS_DOMAIN", name));
        env.push(var(
            "VERSUS_NATS_HUB_LEAF_URLS",
            &self.leaf_urls(name, passwords),
        ));
        Process {
            name: name.to_owned(),
            program: bins.nats_server.clone(),
            args: [
                nats_server_args(
                    Path::new("nats-edge.conf"),
                    self.edge_ports[i],
                    self.edge_monitor_ports[i],
                    &data.join("nats").join(name),
                ),
                vec!["-n".to_owned(), name.to_owned()],
            ]
            .concat(),
            env,
            infra: true,
        }
    }

    pub fn sim(&self, bins: &Binaries) -> Process {
        sim(bins, &self.sim_addr)
    }

    /// Worker `n` (from 1), logged in to all three hub servers.
    pub fn worker(&self, n: usize, bins: &Binaries, wiring: &Wiring) -> Process {
        let nats_url = nats_url("worker", wiring.password("worker"), &self.hub_ports);
        worker(Cluster::worker_name(n), bins, &nats_url, wiring, true)
    }

    /// The API of edge `i` (from 0), logged in to its edge's server.
    pub fn api(&self, i: usize, bins: &Binaries, wiring: &Wiring) -> Process {
        let nats_url = nats_url("api", wiring.password("api"), &[self.edge_ports[i]]);
        api(
            format!("api-{}", EDGES[i]),
            bins,
            &nats_url,
            &self.edge_http_addrs[i],
            Some(HUB_DOMAIN),
            wiring,
        )
    }
}

// --- both --------------------------------------------------------------------------------

/// What the launcher made before it starts the workers and the APIs.
pub struct Wiring {
    /// The NATS passwords, by variable (`VERSUS_NATS_API_PASSWORD`, ...).
    pub passwords: Vec<(String, String)>,
    pub worker_database_url: String,
    pub api_database_url: String,
    pub object_store: String,
    pub admin_token: String,
}

impl Wiring {
    pub fn password(&self, user: &str) -> &str {
        password_of(&self.passwords, user)
    }
}

/// The password of `user` (`admin`, `leaf_edge1`, ...) among `passwords` (by variable), or
/// nothing.
pub fn password_of<'a>(passwords: &'a [(String, String)], user: &str) -> &'a str {
    let var = password_var(user);
    passwords
        .iter()
        .find(|(v, _)| *v == var)
        .map_or("", |(_, password)| password.as_str())
}

fn sim(bins: &Binaries, addr: &str) -> Process {
    Process {
        name: "sim".to_owned(),
        program: bins.versus("versus-sim"),
        args: Vec::new(),
        env: sim_env(addr),
        infra: true,
    }
}

fn worker(name: String, bins: &Binaries, nats_url: &str, wiring: &Wiring, hub: bool) -> Process {
    Process {
        name,
        program: bins.versus("versus-worker"),
        args: Vec::new(),
        env: worker_env(&WorkerWiring {
            nats_url,
            database_url: &wiring.worker_database_url,
            object_store: &wiring.object_store,
            hub,
        }),
        infra: false,
    }
}

fn api(
    name: String,
    bins: &Binaries,
    nats_url: &str,
    http_addr: &str,
    hub_domain: Option<&str>,
    wiring: &Wiring,
) -> Process {
    Process {
        name,
        program: bins.versus("versus-api"),
        args: Vec::new(),
        env: api_env(&ApiWiring {
            nats_url,
            database_url: &wiring.api_database_url,
            object_store: &wiring.object_store,
            http_addr,
            admin_token: Some(&wiring.admin_token),
            hub_domain,
        }),
        infra: false,
    }
}

/// A whole number of ASCII digits.
fn whole(text: &str) -> Option<usize> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn dev_defaults_are_the_documented_ports() {
        let dev = Dev::from_env(env(&[])).unwrap();
        assert_eq!(dev.http_addr, "127.0.0.1:8080");
        assert_eq!(dev.workers, 2);
        assert_eq!(
            (dev.pg_port, dev.nats_port, dev.nats_monitor_port),
            (5433, 4222, 8222)
        );
        assert_eq!(dev.sim_addr, "127.0.0.1:8787");
    }

    #[test]
    fn a_bad_port_is_refused_by_its_variable() {
        let err = Dev::from_env(env(&[("VERSUS_NATS_PORT", "x")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "VERSUS_NATS_PORT must be a port number, not 'x'"
        );
    }

    #[test]
    fn cluster_lists_take_commas_and_the_edges_dial_the_hubs_leaf_ports_by_default() {
        let cluster = Cluster::from_env(env(&[("VERSUS_EDGE_PORTS", "5001,5002")])).unwrap();
        assert_eq!(cluster.edge_ports, [5001, 5002]);
        assert_eq!(cluster.edge_leaf_ports, [7231, 7232, 7233]);
        let cluster =
            Cluster::from_env(env(&[("VERSUS_EDGE_LEAF_PORTS", "9001 9002 9003")])).unwrap();
        assert_eq!(cluster.hub_leaf_ports, [7231, 7232, 7233]);
        let urls = cluster.leaf_urls(
            "edge1",
            &[("VERSUS_NATS_LEAF_EDGE1_PASSWORD".into(), "pw".into())],
        );
        assert_eq!(
            urls,
            "[\"nats-leaf://versus-leaf-edge1:pw@127.0.0.1:9001\",\"nats-leaf://versus-leaf-edge1:pw@127.0.0.1:9002\",\"nats-leaf://versus-leaf-edge1:pw@127.0.0.1:9003\"]"
        );
    }

    #[test]
    fn cluster_ports_must_differ() {
        let err = Cluster::from_env(env(&[("VERSUS_EDGE_PORTS", "4231 4242")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the NATS servers' ports must differ")
        );
    }

    #[test]
    fn hub_workers_get_three_replicas_and_edge_apis_the_hub_domain() {
        let wiring = Wiring {
            passwords: vec![],
            worker_database_url: "w".into(),
            api_database_url: "a".into(),
            object_store: "file:///o".into(),
            admin_token: "t".into(),
        };
        let bins = Binaries {
            dir: PathBuf::from("/b"),
            nats_server: PathBuf::from("/n"),
        };
        let cluster = Cluster::from_env(env(&[])).unwrap();
        let worker = cluster.worker(1, &bins, &wiring);
        assert_eq!(worker.name, "worker1");
        assert!(worker.env.contains(&var("VERSUS_NATS_REPLICAS", "3")));
        let api = cluster.api(1, &bins, &wiring);
        assert_eq!(api.name, "api-edge2");
        assert!(api.env.contains(&var("VERSUS_NATS_HUB_DOMAIN", "hub")));
        assert!(api.env.contains(&var("VERSUS_HTTP_ADDR", "127.0.0.1:8082")));
        let dev = Dev::from_env(env(&[])).unwrap();
        assert!(
            !dev.worker(1, &bins, &wiring)
                .env
                .iter()
                .any(|(k, _)| k == "VERSUS_NATS_REPLICAS")
        );
    }
}
