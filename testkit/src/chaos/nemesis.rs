//! The nemesis: injects the planned faults into a running [`System`] at their times and heals
//! each after its hold (a killed process started again, a paused one resumed, the upstream's
//! faults cleared, a cut link restored). A fault that cannot be injected or healed is recorded,
//! not fatal: the run goes on and reports it.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use serde_json::json;

use super::history::FaultRecord;
use super::run::Shared;
use super::schedule::{Fault, Site, Step, Upstream};
use crate::{NatsUser, Proc, System};

/// Injects every step at its time (late, if healing the one before took longer) and heals it.
pub async fn run(system: &mut System, shared: &Shared, steps: &[Step]) -> Vec<FaultRecord> {
    let mut records = Vec::with_capacity(steps.len());
    for step in steps {
        shared.sleep_until_ms(step.at_ms).await;
        let start_ms = shared.now_ms();
        eprintln!(
            "chaos: {start_ms} ms: {:?} for {} ms",
            step.fault, step.hold_ms
        );
        let mut trouble = guarded(inject(system, step.fault)).await;
        tokio::time::sleep(Duration::from_millis(step.hold_ms)).await;
        if let Some(more) = guarded(heal(system, shared, step.fault)).await {
            trouble = Some(trouble.map_or(more.clone(), |t| format!("{t}; {more}")));
        }
        let end_ms = shared.now_ms();
        eprintln!("chaos: {end_ms} ms: healed {:?}", step.fault);
        records.push(FaultRecord {
            start_ms,
            end_ms,
            fault: step.fault,
            trouble,
        });
    }
    records
}

/// Runs `action`; a panic (the kit panics when a process will not start) becomes its message.
async fn guarded(action: impl std::future::Future<Output = ()>) -> Option<String> {
    match AssertUnwindSafe(action).catch_unwind().await {
        Ok(()) => None,
        Err(panic) => Some(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".to_owned()),
        ),
    }
}

async fn inject(system: &mut System, fault: Fault) {
    match fault {
        Fault::KillWorker { worker } => {
            system.workers[worker].kill().await;
        }
        Fault::PauseWorker { worker } => system.workers[worker].pause(),
        Fault::KillApi { site } => {
            api(system, site).kill().await;
        }
        Fault::PauseApi { site } => api(system, site).pause(),
        Fault::KillHubNode { node } => system.hub_node(&hub_name(node)).kill().await,
        Fault::PauseHubNode { node } => system.hub_node(&hub_name(node)).pause(),
        Fault::KillEdgeNats { edge } => system.edges[edge].nats.kill().await,
        Fault::PauseEdgeNats { edge } => system.edges[edge].nats.pause(),
        Fault::PausePostgres => system.db.pause_server(),
        Fault::Upstream { upstream } => {
            let fault = match upstream {
                Upstream::TooManyRequests => {
                    json!({"type": "status", "status": 429, "retry_after_secs": 1})
                }
                Upstream::ServerError => json!({"type": "status", "status": 500}),
                Upstream::Cut { after_tokens } => {
                    json!({"type": "cut", "after_tokens": after_tokens})
                }
                Upstream::Stall { after_tokens } => {
                    json!({"type": "stall", "after_tokens": after_tokens})
                }
            };
            system
                .sim
                .fault(json!({"kind": "chat", "fault": fault, "times": null}))
                .await;
        }
        Fault::CutLink { edge } => system.edges[edge].cut_link().await,
    }
}

async fn heal(system: &mut System, shared: &Shared, fault: Fault) {
    match fault {
        Fault::KillWorker { worker } => {
            let envs = borrowed(system.worker_envs());
            system.workers[worker] = Proc::spawn("versus-worker", &envs).await;
        }
        Fault::PauseWorker { worker } => system.workers[worker].resume(),
        Fault::KillApi { site } => restart_api(system, shared, site).await,
        Fault::PauseApi { site } => api(system, site).resume(),
        Fault::KillHubNode { node } => {
            let node = system.hub_node(&hub_name(node));
            node.restart().await;
            crate::hub::wait_ready(std::slice::from_ref(node)).await;
        }
        Fault::PauseHubNode { node } => system.hub_node(&hub_name(node)).resume(),
        Fault::KillEdgeNats { edge } => {
            let edge = &mut system.edges[edge];
            edge.nats.restart().await;
            // Waits until its leaf link is up again (the proxy was never cut).
            edge.restore_link().await;
        }
        Fault::PauseEdgeNats { edge } => {
            system.edges[edge].nats.resume();
            system.edges[edge].restore_link().await;
        }
        Fault::PausePostgres => system.db.resume_server(),
        Fault::Upstream { .. } => system.sim.clear_faults().await,
        Fault::CutLink { edge } => system.edges[edge].restore_link().await,
    }
}

/// Resumes every paused process and clears the upstream's faults: after a run that was cut
/// short, nothing stays frozen.
pub async fn heal_all(system: &mut System) {
    for worker in &mut system.workers {
        worker.resume();
    }
    system.api.resume();
    for edge in &mut system.edges {
        edge.api.resume();
        if edge.nats.is_running() {
            edge.nats.resume();
        }
        edge.link.restore();
    }
    for node in std::iter::once(&system.nats).chain(&system.hub_peers) {
        if node.is_running() {
            node.resume();
        }
    }
    system.db.resume_server();
    let _ = guarded(system.sim.clear_faults()).await;
}

/// Starts an API replica again on the address it had (as a load balancer's target comes
/// back), or on another if that is taken; clients are told its URL.
async fn restart_api(system: &mut System, shared: &Shared, site: Site) {
    let old = api(system, site).url.clone();
    let mut envs: Vec<(String, String)> = system.api_envs().to_vec();
    if let Site::Edge(i) = site {
        let edge = &system.edges[i];
        envs.push(("NATS_URL".to_owned(), edge.nats.url_as(NatsUser::Api)));
        envs.push(("VERSUS_NATS_HUB_DOMAIN".to_owned(), "hub".to_owned()));
    }
    let mut same = envs.clone();
    same.push((
        "VERSUS_HTTP_ADDR".to_owned(),
        old.trim_start_matches("http://").to_owned(),
    ));
    let mut spawned = None;
    for envs in [same, envs] {
        let envs = borrowed(&envs);
        let attempt = AssertUnwindSafe(async {
            let api = Proc::spawn("versus-api", &envs).await;
            api.until_ready().await;
            api
        })
        .catch_unwind()
        .await;
        if let Ok(api) = attempt {
            spawned = Some(api);
            break;
        }
    }
    let new = spawned.unwrap_or_else(|| panic!("the API at {site:?} did not start again"));
    shared.set_endpoint(site, &new.url);
    *api(system, site) = new;
}

fn api(system: &mut System, site: Site) -> &mut Proc {
    match site {
        Site::Hub => &mut system.api,
        Site::Edge(i) => &mut system.edges[i].api,
    }
}

fn hub_name(node: usize) -> String {
    format!("hub{}", node + 1)
}

fn borrowed(envs: &[(String, String)]) -> Vec<(&str, String)> {
    envs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect()
}
