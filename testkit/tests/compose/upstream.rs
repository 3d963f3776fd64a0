//! What the containers run, run here: a worker's start script picks its upstream from
//! `OPENAI_API_KEY` alone and says which, and the programs' healthcheck reads a real server's
//! status.

use std::{collections::HashMap, path::Path, process::Command};

use serde_json::Value;
use versus_testkit::{Sim, TempDir};

use crate::{
    file::{compose, environment, interpolate, services, words},
    programs::{help_variables, program},
};

/// What a worker's command hands to `versus-worker`, and what it logged, when Compose runs it
/// with the shell's variables `shell`.
struct Started {
    env: HashMap<String, String>,
    log: String,
}

/// Runs `service`'s command as its container would, with the environment Compose gives it
/// (interpolated with `shell`), its NATS and Postgres files in a temporary folder, and on
/// `PATH` a `versus-worker` that prints the environment it was started with.
fn start(service: &Value, shell: &HashMap<&str, &str>) -> Started {
    let dir = TempDir::new("versus-compose-worker");
    let fake = dir.path().join("versus-worker");
    std::fs::write(&fake, "#!/bin/sh\nexec env\n").unwrap();
    make_executable(&fake);
    let nats_env = dir.path().join("nats.env");
    std::fs::write(
        &nats_env,
        "NATS_URL=nats://versus-worker:secret@nats:4222\n",
    )
    .unwrap();
    let db_env = dir.path().join("db.env");
    std::fs::write(
        &db_env,
        "DATABASE_URL=postgres://versus_worker:secret@postgres:5432/versus\n",
    )
    .unwrap();

    let command: Vec<String> = words(&service["command"])
        .iter()
        .map(|word| interpolate(word, shell))
        .collect();
    let [sh, flag, script, arg0, _nats_file, _db_file] = command.as_slice() else {
        panic!("a worker runs /bin/sh -c SCRIPT NAME NATS_FILE DB_FILE, not {command:?}");
    };
    let output = Command::new(sh)
        .args([flag, script, arg0])
        .arg(&nats_env)
        .arg(&db_env)
        .env_clear()
        .envs(
            environment(service)
                .iter()
                .map(|(name, value)| (name, interpolate(value, shell))),
        )
        .env("PATH", format!("{}:/usr/bin:/bin", dir.path().display()))
        .output()
        .expect("run the worker's command");
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{output:?}");
    let env = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    Started { env, log }
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The simulator's URL inside the compose network, from the sim service's own address.
fn sim_url(compose: &Value) -> String {
    let addr = &environment(&services(compose)["sim"])["VERSUS_SIM_ADDR"];
    let port = addr.rsplit(':').next().unwrap();
    format!("http://sim:{port}/v1")
}

/// The services that run workers (not the one-shot migrate, which runs `versus-worker` too).
fn workers(compose: &Value) -> Vec<(&String, &Value)> {
    let workers: Vec<_> = services(compose)
        .iter()
        .filter(|(_, service)| {
            program(service) == Some("versus-worker") && service["restart"] != "no"
        })
        .collect();
    assert!(workers.len() >= 2, "worker and hub-worker");
    workers
}

#[test]
fn without_a_key_a_worker_calls_the_simulator_and_says_so_loudly() {
    let compose = compose();
    let sim = sim_url(&compose);
    for (name, service) in workers(&compose) {
        // Nothing set, a key set empty (offline from a shell that exports one), and a base URL
        // without a key: the simulator every time, whatever the URL says.
        let cases = [
            HashMap::new(),
            HashMap::from([("OPENAI_API_KEY", "")]),
            HashMap::from([("OPENAI_BASE_URL", "http://elsewhere:8000/v1")]),
        ];
        for shell in cases {
            let started = start(service, &shell);
            assert_eq!(started.env["OPENAI_BASE_URL"], sim, "{name} with {shell:?}");
            assert!(
                !started.env["OPENAI_API_KEY"].is_empty(),
                "{name}: the simulator wants a bearer token"
            );
            assert_eq!(
                started.env["NATS_URL"], "nats://versus-worker:secret@nats:4222",
                "{name}: NATS_URL comes from its file"
            );
            assert_eq!(
                started.env["DATABASE_URL"], "postgres://versus_worker:secret@postgres:5432/versus",
                "{name}: DATABASE_URL comes from its file"
            );
            assert!(
                started.log.contains("ANSWERS COME FROM THE SIMULATOR"),
                "{name} does not say it uses the simulator: {}",
                started.log
            );
            if let Some(url) = shell.get("OPENAI_BASE_URL") {
                assert!(
                    started.log.contains(&format!("not {url}")),
                    "{name} does not say it leaves {url} alone: {}",
                    started.log
                );
            }
        }
    }
}

#[test]
fn with_a_key_a_worker_calls_openai_or_openai_base_url_and_says_which() {
    let compose = compose();
    let openai = help_variables("versus-worker")["OPENAI_BASE_URL"]
        .clone()
        .expect("OPENAI_BASE_URL has a default");
    for (name, service) in workers(&compose) {
        let cases = [
            (
                HashMap::from([("OPENAI_API_KEY", "sk-test")]),
                openai.as_str(),
            ),
            (
                HashMap::from([
                    ("OPENAI_API_KEY", "sk-test"),
                    ("OPENAI_BASE_URL", "http://vllm:8000/v1"),
                ]),
                "http://vllm:8000/v1",
            ),
        ];
        for (shell, upstream) in cases {
            let started = start(service, &shell);
            assert_eq!(started.env["OPENAI_API_KEY"], "sk-test", "{name}");
            assert_eq!(
                started.env["OPENAI_BASE_URL"], upstream,
                "{name} with {shell:?}"
            );
            assert!(
                started
                    .log
                    .contains(&format!("answers come from {upstream}")),
                "{name} does not say where answers come from: {}",
                started.log
            );
            assert!(
                !started.log.contains("SIMULATOR"),
                "{name}: {}",
                started.log
            );
            assert!(!started.log.contains("sk-test"), "{name} logs the key");
        }
    }
}

/// A service's healthcheck command (`CMD` dropped), interpolated as Compose would.
fn healthcheck(service: &Value) -> Vec<String> {
    let test = words(&service["healthcheck"]["test"]);
    assert_eq!(test.first().map(String::as_str), Some("CMD"));
    test[1..]
        .iter()
        .map(|word| interpolate(word, &HashMap::new()))
        .collect()
}

fn passes(check: &[String]) -> bool {
    Command::new(&check[0])
        .args(&check[1..])
        .status()
        .expect("run the healthcheck")
        .success()
}

#[tokio::test]
async fn the_programs_healthcheck_passes_on_200_only() {
    let compose = compose();
    // Each Versus program's probe asks the port its address variable names.
    for (name, service) in services(&compose) {
        // A one-shot run (migrate) has no healthcheck: it exits.
        let Some(program) = program(service).filter(|_| service["restart"] != "no") else {
            continue;
        };
        let check = healthcheck(service);
        let port = &check[check.len() - 2];
        let env = environment(service);
        let addr = [
            "VERSUS_HTTP_ADDR",
            "VERSUS_WORKER_HTTP_ADDR",
            "VERSUS_SIM_ADDR",
        ]
        .iter()
        .find_map(|variable| env.get(*variable))
        .unwrap_or_else(|| panic!("{name} ({program}) sets no address"));
        assert!(
            addr.ends_with(&format!(":{port}")),
            "{name}'s healthcheck asks port {port}, but it listens on {addr}"
        );
    }

    // The sim service's own check, against a real versus-sim on another port.
    let sim = Sim::start(&[]).await;
    let port = sim.url.rsplit(':').next().unwrap().to_owned();
    let mut check = healthcheck(&services(&compose)["sim"]);
    let at = check.len() - 2;
    check[at] = port;
    let probe = check.clone();
    let ok = tokio::task::spawn_blocking(move || passes(&probe))
        .await
        .unwrap();
    assert!(ok, "{check:?} fails against a running versus-sim");

    let last = check.len() - 1;
    check[last] = "/no-such-route".to_owned();
    let probe = check.clone();
    let ok = tokio::task::spawn_blocking(move || passes(&probe))
        .await
        .unwrap();
    assert!(!ok, "{check:?} passes on a 404");

    drop(sim);
}
