//! `dev` (scripts/dev): Postgres, nats-server, the simulator (without an upstream), the
//! workers, then the API; prints `Versus is up: URL` and keeps them running.

use std::convert::Infallible;

use anyhow::{Result, bail};

use crate::out::{say, warn};
use crate::probe::port_in_use;
use crate::supervisor::Supervisor;
use crate::topology::{Dev, NATS_USERS};
use crate::{Layout, pg, secrets};

/// Brings the system up, then supervises it until the caller's signal.
pub async fn up(sup: &mut Supervisor, layout: &Layout) -> Result<Infallible> {
    let dev = Dev::from_env(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))?;
    let data = &layout.data;
    crate::export_common(sup);
    sup.stop_leftovers(Dev::is_infra).await;
    let bins = crate::binaries()?;

    // Postgres.
    let started = pg::start_dev(
        data,
        &layout.repo,
        dev.pg_port,
        &layout.logs,
        &bins.versus("versus-worker"),
        |dir| sup.own_postgres(dir),
    )
    .await?;

    // NATS, with nats.conf's users: their passwords made on the first run, kept with the data.
    if port_in_use(dev.nats_port).await {
        bail!(
            "port {} is taken: set VERSUS_NATS_PORT to another port",
            dev.nats_port
        );
    }
    if port_in_use(dev.nats_monitor_port).await {
        bail!(
            "port {} is taken: set VERSUS_NATS_MONITOR_PORT to another port",
            dev.nats_monitor_port
        );
    }
    let auth = data.join("nats-auth.env");
    let users: Vec<String> = NATS_USERS.iter().map(|u| (*u).to_owned()).collect();
    let passwords = secrets::nats_passwords(&auth, &users)?;
    say(&format!(
        "starting nats-server on 127.0.0.1:{} (JetStream store: {})",
        dev.nats_port,
        data.join("nats").display()
    ));
    sup.start(dev.nats(&bins, data, &passwords))?;
    sup.wait_nats_ready("nats", dev.nats_port).await?;

    // The upstream: OpenAI, a compatible server, or the simulator.
    let sim_url = crate::start_sim_unless_upstream(sup, dev.sim(&bins)).await?;

    // The workers and the API.
    let (wiring, admin_note) = crate::wiring(data, passwords, &started)?;
    if dev.workers > 0 {
        say(&format!("starting {} worker(s)", dev.workers));
        let workers = (1..=dev.workers)
            .map(|n| dev.worker(n, &bins, &wiring))
            .collect();
        crate::start_workers(sup, workers).await?;
    } else {
        warn("VERSUS_WORKERS=0: nothing will generate answers");
    }
    say(&format!("starting the API on {}", dev.http_addr));
    sup.start(dev.api(&bins, &wiring))?;
    let api_url = sup.wait_listening("api", 60).await?;
    // A restart binds the same port (which matters when VERSUS_HTTP_ADDR asked for any).
    sup.set_env(
        "api",
        "VERSUS_HTTP_ADDR",
        api_url.trim_start_matches("http://"),
    )?;
    crate::wait_api_ready(sup, "api", &api_url, "the API").await?;

    // Up.
    if sim_url.is_some() {
        crate::sim_banner("scripts/dev");
    }
    eprintln!(
        "
  Postgres  {}
            the API as {}, the workers as {}
  NATS      nats://127.0.0.1:{}   (monitoring: http://127.0.0.1:{})
            users versus-admin, versus-api, versus-worker; passwords: {}
  upstream  {}
  workers   {}
  pictures  {}
  logs      {}/
  admin     {admin_note}
",
        started.database_url,
        wiring.api_database_url,
        wiring.worker_database_url,
        dev.nats_port,
        dev.nats_monitor_port,
        auth.display(),
        crate::upstream(sim_url.as_deref()),
        dev.workers,
        wiring.object_store,
        layout.logs.display(),
    );
    println!(
        "Versus is up: {api_url}  (try: curl -N '{api_url}/v1/fights/stream?a=Batman&b=Superman')"
    );
    eprintln!("Press Ctrl-C to stop. A program that exits is started again.");
    sup.supervise().await
}
