//! The file against the launcher's description of the topology (`versus_xtask::topology`, what
//! scripts/dev and scripts/cluster run): compose runs the same processes, publishes them on the
//! same ports, and gives each program every variable the description gives it (in its
//! `environment`, or in a secrets file its command sources), with the same value where the
//! value is the same everywhere (`SAME_EVERYWHERE`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use versus_xtask::topology::{
    Binaries, Cluster, Dev, EDGES, HUBS, Process, SAME_EVERYWHERE, Wiring, password_var,
};

use crate::file::{compose, environment, services, words};

/// Compose's own services, which the launcher does in its own way (makes the credentials,
/// runs Postgres and the migrations itself; stores pictures in a folder).
const COMPOSE_ONLY: [&str; 5] = ["nats-auth", "postgres", "migrate", "postgres-auth", "s3"];

/// Each process of the description at its defaults, with the service that runs it in compose
/// and the host port it publishes there, if any.
fn described() -> Vec<(Process, String, Option<u16>)> {
    let dev = Dev::from_env(|_| None).unwrap();
    let cluster = Cluster::from_env(|_| None).unwrap();
    let bins = Binaries {
        dir: PathBuf::from("/bin"),
        nats_server: PathBuf::from("/bin/nats-server"),
    };
    let data = Path::new("/data");
    let passwords: Vec<(String, String)> = Cluster::nats_users()
        .iter()
        .map(|user| (password_var(user), "password".to_owned()))
        .collect();
    let wiring = Wiring {
        passwords: passwords.clone(),
        worker_database_url: "postgres://versus_worker@db/versus".to_owned(),
        api_database_url: "postgres://versus_api@db/versus".to_owned(),
        object_store: "file:///data/objects".to_owned(),
        admin_token: "token".to_owned(),
    };
    let port = |addr: &str| addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
    let mut all = vec![
        (
            dev.nats(&bins, data, &passwords),
            "nats".to_owned(),
            Some(dev.nats_port),
        ),
        (dev.sim(&bins), "sim".to_owned(), port(&dev.sim_addr)),
        (dev.worker(1, &bins, &wiring), "worker".to_owned(), None),
        (
            dev.api(&bins, &wiring),
            "api".to_owned(),
            port(&dev.http_addr),
        ),
        (
            cluster.worker(1, &bins, &wiring),
            "hub-worker".to_owned(),
            None,
        ),
    ];
    for (i, hub) in HUBS.iter().enumerate() {
        let process = cluster.hub(i, &bins, Path::new("/hub.conf"), data, &passwords);
        all.push((process, (*hub).to_owned(), Some(cluster.hub_ports[i])));
    }
    for (i, edge) in EDGES.iter().enumerate() {
        all.push((
            cluster.edge(i, &bins, data, &passwords),
            (*edge).to_owned(),
            None,
        ));
        all.push((
            cluster.api(i, &bins, &wiring),
            format!("api-{edge}"),
            port(&cluster.edge_http_addrs[i]),
        ));
    }
    all
}

/// The host ports a service publishes (`127.0.0.1:HOST:CONTAINER`).
fn published(service: &Value) -> Vec<u16> {
    words(&service["ports"])
        .iter()
        .filter_map(|mapping| {
            let parts: Vec<&str> = mapping.split(':').collect();
            parts.get(parts.len().checked_sub(2)?)?.parse().ok()
        })
        .collect()
}

/// Whether `service` gets `name` from a secrets file: its command names one, and a service of
/// the file writes `name=` lines.
fn from_secrets(service: &Value, all: &serde_json::Map<String, Value>, name: &str) -> bool {
    let script = |s: &Value| {
        let mut text = words(&s["entrypoint"]);
        text.extend(words(&s["command"]));
        text.join(" ")
    };
    // A file under /secrets/ in its command (sourced there, or passed to a script that does).
    script(service).contains("/secrets/")
        && all
            .values()
            .any(|writer| script(writer).contains(&format!("{name}=")))
}

#[test]
fn compose_runs_the_launchers_processes_on_its_ports_with_its_settings() {
    let compose = compose();
    let services = services(&compose);
    let described = described();

    // The same processes: every described one is a service, and every service is one of them
    // or one of compose's own.
    let expected: BTreeSet<&str> = described
        .iter()
        .map(|(_, service, _)| service.as_str())
        .chain(COMPOSE_ONLY)
        .collect();
    let actual: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        actual, expected,
        "compose.yaml's services against the launcher's processes (xtask/src/topology.rs)"
    );

    for (process, name, port) in &described {
        let service = &services[name];
        // The same ports: what compose publishes is the description's default.
        let ports = published(service);
        match port {
            Some(port) => assert_eq!(
                ports,
                [*port],
                "{name} publishes {ports:?}, the launcher's {} uses {port}",
                process.name
            ),
            None => assert!(ports.is_empty(), "{name} publishes {ports:?}"),
        }
        // The same settings.
        let env = environment(service);
        for (key, value) in &process.env {
            match env.get(key) {
                Some(set) if SAME_EVERYWHERE.contains(&key.as_str()) => assert_eq!(
                    set, value,
                    "{name} sets {key}={set}, the launcher's {} {value}",
                    process.name
                ),
                Some(_) => {}
                None => assert!(
                    from_secrets(service, services, key),
                    "{name} does not get {key}, which the launcher gives its {}",
                    process.name
                ),
            }
        }
    }
    // A value the description holds the same everywhere is never set otherwise in compose.
    for (name, service) in services {
        for (key, value) in environment(service) {
            if SAME_EVERYWHERE.contains(&key.as_str()) {
                assert!(
                    described.iter().any(|(p, s, _)| {
                        s == name && p.env.iter().any(|(k, v)| *k == key && *v == value)
                    }),
                    "{name} sets {key}={value}, which the launcher does not"
                );
            }
        }
    }
}
