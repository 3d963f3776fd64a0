//! `cluster` (scripts/cluster): Postgres, the hub (hub1..hub3), the edges' servers (edge1,
//! edge2), the simulator (without an upstream), the workers on the hub, then an API at each
//! edge; prints `edge NAME URL` per edge API and keeps them running.

use std::convert::Infallible;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::Instant;

use crate::out::say;
use crate::probe::{http_get, port_in_use, tail};
use crate::supervisor::Supervisor;
use crate::topology::{Cluster, EDGES, HUBS};
use crate::{Layout, pg, secrets};

/// Brings the system up, then supervises it until the caller's signal.
pub async fn up(sup: &mut Supervisor, layout: &Layout) -> Result<Infallible> {
    let mut cluster = Cluster::from_env(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))?;
    let data = &layout.data;
    crate::export_common(sup);
    sup.stop_leftovers(Cluster::is_infra).await;
    let bins = crate::binaries()?;

    // Every port it binds, before it starts anything (the APIs' unless they pick one).
    for port in cluster.nats_ports() {
        if port_in_use(port).await {
            bail!(
                "port {port} is taken: set VERSUS_HUB_*_PORTS and VERSUS_EDGE_*_PORTS to other ports"
            );
        }
    }
    for addr in &cluster.edge_http_addrs {
        let port = addr.rsplit_once(':').map_or("", |(_, port)| port);
        let Ok(port) = port.parse::<u16>() else {
            bail!("VERSUS_EDGE_HTTP_ADDRS: '{addr}' is not HOST:PORT");
        };
        if port != 0 && port_in_use(port).await {
            bail!("port {port} is taken: set VERSUS_EDGE_HTTP_ADDRS to other addresses");
        }
    }

    // Postgres.
    let started = pg::start_dev(
        data,
        &layout.repo,
        cluster.pg_port,
        &layout.logs,
        &bins.versus("versus-worker"),
        |dir| sup.own_postgres(dir),
    )
    .await?;

    // NATS: nats.conf's users and each edge's leaf login, their passwords made on the first
    // run and kept with the data; the hub's configuration, which lists them; the hub, then the
    // edges.
    let auth = data.join("nats-auth.env");
    let passwords = secrets::nats_passwords(&auth, &Cluster::nats_users())?;
    let hub_conf = write_hub_conf(&layout.repo, data)?;
    say(&format!(
        "starting the hub: hub1..hub3 on 127.0.0.1:{} (JetStream stores: {}/)",
        joined(&cluster.hub_ports, ","),
        data.join("nats").display()
    ));
    for i in 0..HUBS.len() {
        sup.start(cluster.hub(i, &bins, &hub_conf, data, &passwords))?;
    }
    for (i, name) in HUBS.iter().enumerate() {
        sup.wait_nats_ready(name, cluster.hub_ports[i]).await?;
    }
    for (i, name) in HUBS.iter().enumerate() {
        let url = format!("http://127.0.0.1:{}/healthz", cluster.hub_monitor_ports[i]);
        let what = format!("{name}'s JetStream did not become healthy within 30 s");
        wait_until(sup, name, &what, || async {
            http_get(&url)
                .await
                .is_some_and(|(status, _)| status == 200)
        })
        .await?;
    }
    say(&format!(
        "starting the edges' servers: edge1, edge2 on 127.0.0.1:{}",
        joined(&cluster.edge_ports, ",")
    ));
    for i in 0..EDGES.len() {
        sup.start(cluster.edge(i, &bins, data, &passwords))?;
    }
    for (i, name) in EDGES.iter().enumerate() {
        sup.wait_nats_ready(name, cluster.edge_ports[i]).await?;
        let url = format!("http://127.0.0.1:{}/leafz", cluster.edge_monitor_ports[i]);
        let what = format!("{name} did not join the hub within 30 s");
        wait_until(sup, name, &what, || async {
            http_get(&url)
                .await
                .is_some_and(|(_, body)| has_leaf(&body))
        })
        .await?;
    }

    // The upstream: OpenAI, a compatible server, or the simulator.
    let sim_url = crate::start_sim_unless_upstream(sup, cluster.sim(&bins)).await?;

    // The workers and the edges' APIs.
    let (wiring, admin_note) = crate::wiring(data, passwords, &started)?;
    say(&format!("starting {} worker(s)", cluster.workers));
    let workers = (1..=cluster.workers)
        .map(|n| cluster.worker(n, &bins, &wiring))
        .collect();
    crate::start_workers(sup, workers).await?;
    say("starting the edges' APIs");
    for i in 0..EDGES.len() {
        sup.start(cluster.api(i, &bins, &wiring))?;
    }
    let mut urls = Vec::with_capacity(EDGES.len());
    for (i, edge) in EDGES.iter().enumerate() {
        let name = format!("api-{edge}");
        let url = sup.wait_listening(&name, 60).await?;
        // A restart binds the same port (which matters when VERSUS_EDGE_HTTP_ADDRS asked for
        // any).
        let addr = url.trim_start_matches("http://").to_owned();
        sup.set_env(&name, "VERSUS_HTTP_ADDR", &addr)?;
        cluster.edge_http_addrs[i] = addr;
        urls.push(url);
    }
    for (edge, url) in EDGES.iter().zip(&urls) {
        let name = format!("api-{edge}");
        crate::wait_api_ready(sup, &name, url, &name).await?;
    }

    // Up.
    if sim_url.is_some() {
        crate::sim_banner("scripts/cluster");
    }
    let mut summary = format!(
        "\n  Postgres  {}\n            the APIs as {}, the workers as {}\n",
        started.database_url, wiring.api_database_url, wiring.worker_database_url
    );
    for (i, name) in HUBS.iter().enumerate() {
        summary.push_str(&format!(
            "  {name}      nats://127.0.0.1:{}   (monitoring: http://127.0.0.1:{}, leaf nodes: {})\n",
            cluster.hub_ports[i], cluster.hub_monitor_ports[i], cluster.hub_leaf_ports[i]
        ));
    }
    for (i, name) in EDGES.iter().enumerate() {
        summary.push_str(&format!(
            "  {name}     nats://127.0.0.1:{}   (monitoring: http://127.0.0.1:{})\n",
            cluster.edge_ports[i], cluster.edge_monitor_ports[i]
        ));
    }
    summary.push_str(&format!(
        "            users versus-admin, versus-api, versus-worker; leaf logins versus-leaf-edge1, -edge2; passwords: {}
  upstream  {}
  workers   {}, on the hub (streams and buckets with 3 replicas)
  pictures  {}
  logs      {}/
  admin     {admin_note}
",
        auth.display(),
        crate::upstream(sim_url.as_deref()),
        cluster.workers,
        wiring.object_store,
        layout.logs.display(),
    ));
    eprintln!("{summary}");
    for (edge, url) in EDGES.iter().zip(&urls) {
        println!("edge {edge} {url}");
    }
    eprintln!(
        "Versus is up: try curl -N '{}/v1/fights/stream?a=Batman&b=Superman', then the same at {}.",
        urls[0], urls[1]
    );
    eprintln!("Press Ctrl-C to stop. A program that exits is started again.");
    sup.supervise().await
}

/// Writes the hub's configuration, as nats-hub.conf says a deployment does: hub.conf in
/// `data`/nats/conf, beside links to the repository's nats-hub.conf and nats.conf (which it
/// includes). Returns its path.
fn write_hub_conf(repo: &Path, data: &Path) -> Result<std::path::PathBuf> {
    let dir = data.join("nats").join("conf");
    std::fs::create_dir_all(&dir)?;
    for file in ["nats.conf", "nats-hub.conf"] {
        let link = dir.join(file);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(repo.join(file), &link)
            .with_context(|| format!("link {}", link.display()))?;
    }
    let conf = dir.join("hub.conf");
    std::fs::write(&conf, Cluster::hub_conf())
        .with_context(|| format!("write {}", conf.display()))?;
    Ok(conf)
}

/// Whether a `/leafz` body counts a leaf connection (`"leafnodes": N`, N from 1).
fn has_leaf(body: &str) -> bool {
    body.split("\"leafnodes\":").skip(1).any(|rest| {
        rest.trim_start()
            .starts_with(|c: char| c.is_ascii_digit() && c != '0')
    })
}

/// Waits up to 30 s, every 200 ms, until `check` holds; fails with `what` and the tail of
/// `name`'s log if it does not, or `name` exits.
async fn wait_until<F, Fut>(sup: &mut Supervisor, name: &str, what: &str, check: F) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        if !sup.running(name) || Instant::now() >= deadline {
            let log = sup.log(name);
            eprintln!("{}", tail(&log, 20));
            bail!("{what} (log: {})", log.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

fn joined(ports: &[u16], by: &str) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(by)
}

#[cfg(test)]
mod tests {
    use super::has_leaf;

    #[test]
    fn a_leafz_body_with_a_connection_counts() {
        assert!(has_leaf(r#"{"server_id":"x","leafnodes": 2,"leafs":[]}"#));
        assert!(!has_leaf(r#"{"server_id":"x","leafnodes":0}"#));
        assert!(!has_leaf("{}"));
    }
}
