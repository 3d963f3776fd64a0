//! The file against the programs it runs: every variable it sets is one they read (from their
//! `--help`, or for nats-server from its configuration), and a worker gets longer to stop than
//! it takes to drain.

use std::{
    collections::{BTreeMap, HashMap},
    process::Command,
    time::Duration,
};

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use serde_json::Value;

use crate::file::{compose, environment, interpolate, read_repo_file, services, words};

/// The Versus programs compose runs, by the name in a service's command.
const PROGRAMS: [&str; 3] = ["versus-api", "versus-worker", "versus-sim"];

/// The Versus program a service runs, if it runs one of ours: its command, or the program a
/// shell command (`/bin/sh -c SCRIPT …`) ends in with `exec`.
pub fn program(service: &Value) -> Option<&'static str> {
    let command = words(&service["command"]);
    let run = match command.as_slice() {
        [shell, flag, script, ..] if shell == "/bin/sh" && flag == "-c" => script
            .rsplit_once("exec ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or_default(),
        [first, ..] => first.as_str(),
        [] => "",
    };
    PROGRAMS.into_iter().find(|p| *p == run)
}

/// The variables `program --help` lists (`[env: NAME=]`, or `[env: NAME]` for a secret), each
/// with its `[default: …]`, if any.
pub fn help_variables(program: &str) -> BTreeMap<String, Option<String>> {
    // No variables of this process: clap would print their values.
    let output = Command::new(versus_testkit::bin_path(program))
        .arg("--help")
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("run {program} --help: {e}"));
    assert!(output.status.success(), "{program} --help: {output:?}");
    let help = String::from_utf8(output.stdout).unwrap();
    let mut variables = BTreeMap::new();
    for piece in help.split("[env: ").skip(1) {
        let name_end = piece.find(['=', ']']).expect("[env: NAME…]");
        let after = &piece[piece.find(']').expect("]") + 1..];
        let default = after
            .strip_prefix(" [default: ")
            .and_then(|d| d.split_once(']'))
            .map(|(d, _)| d.to_owned());
        variables.insert(piece[..name_end].to_owned(), default);
    }
    assert!(!variables.is_empty(), "{program} --help lists no variables");
    variables
}

#[test]
fn every_variable_compose_sets_for_a_versus_program_is_one_it_reads() {
    let compose = compose();
    let no_env = HashMap::new();
    let mut checked = 0;
    for (name, service) in services(&compose) {
        let Some(program) = program(service) else {
            assert!(
                service["image"] != "versus:local",
                "{name} runs the versus image but none of {PROGRAMS:?}"
            );
            continue;
        };
        let read = help_variables(program);
        let env = environment(service);
        let mut s3 = AmazonS3Builder::new();
        for (variable, value) in &env {
            checked += 1;
            if read.contains_key(variable) {
                continue;
            }
            if let Some(key) = variable.strip_prefix("AWS_") {
                // object_store reads these itself (AmazonS3Builder::from_env), by this parser;
                // a name it does not know it skips without a word.
                let key: AmazonS3ConfigKey = format!("aws_{}", key.to_ascii_lowercase())
                    .parse()
                    .unwrap_or_else(|_| {
                        panic!("{name} sets {variable}, which object_store does not read")
                    });
                s3 = s3.with_config(key, interpolate(value, &no_env));
                continue;
            }
            // tracing's EnvFilter (shared::telemetry) reads the log filter, not clap.
            if variable == "RUST_LOG" {
                continue;
            }
            panic!("{name} sets {variable}, which {program} does not read (see its --help)");
        }
        if let Some(store) = env.get("VERSUS_OBJECT_STORE") {
            let store = interpolate(store, &no_env);
            if store.starts_with("s3://") {
                // The TLS provider the programs install before they open a store.
                versus_shared::tls::install();
                s3.with_url(store)
                    .build()
                    .unwrap_or_else(|e| panic!("{name}'s S3 settings do not make a store: {e}"));
            }
        }
    }
    assert!(checked > 50, "only {checked} variables checked");
}

/// A Compose duration: `1m30s`, `45s`, `500ms`, `2h`.
fn duration(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits]
            .parse()
            .unwrap_or_else(|_| panic!("duration {text:?}"));
        rest = &rest[digits..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += match &rest[..unit_end] {
            "h" => Duration::from_secs(n * 3600),
            "m" => Duration::from_secs(n * 60),
            "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            unit => panic!("duration {text:?}: unit {unit:?}"),
        };
        rest = &rest[unit_end..];
    }
    total
}

#[test]
fn a_worker_gets_longer_to_stop_than_it_takes_to_drain() {
    let compose = compose();
    let default = help_variables("versus-worker")["VERSUS_SHUTDOWN_GRACE_SECS"]
        .clone()
        .expect("VERSUS_SHUTDOWN_GRACE_SECS has a default");
    let mut workers = 0;
    for (name, service) in services(&compose) {
        // A one-shot run (migrate) takes no jobs, so has none to drain.
        if program(service) != Some("versus-worker") || service["restart"] == "no" {
            continue;
        }
        workers += 1;
        let env = environment(service);
        let grace = env.get("VERSUS_SHUTDOWN_GRACE_SECS").unwrap_or(&default);
        assert!(
            !grace.contains('$'),
            "{name}: VERSUS_SHUTDOWN_GRACE_SECS is fixed, as stop_grace_period is set for it"
        );
        let grace = Duration::from_secs(grace.parse().unwrap());
        let stop = service["stop_grace_period"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has Docker's 10 s to stop, less than its drain"));
        // After the grace, jobs still running get 5 s to hand their claims back, and the
        // process 5 s to close its tasks (worker/src/consumer.rs, main.rs).
        let drain = grace + Duration::from_secs(10);
        assert!(
            duration(stop) > drain,
            "{name}: stop_grace_period {stop} is not longer than its drain ({drain:?})"
        );
    }
    assert!(workers >= 2, "worker and hub-worker");
}

#[test]
fn every_variable_compose_sets_for_a_nats_server_is_in_its_configuration() {
    let compose = compose();
    for (name, service) in services(&compose) {
        let image = service["image"].as_str().unwrap_or_default();
        if !image.starts_with("nats:") {
            continue;
        }
        // The configuration files it mounts (./X.conf:/etc/nats/X.conf:ro).
        let configs: Vec<String> = words(&service["volumes"])
            .iter()
            .filter_map(|volume| volume.strip_prefix("./"))
            .filter_map(|volume| volume.split(':').next())
            .map(read_repo_file)
            .collect();
        for variable in environment(service).keys() {
            assert!(
                configs.iter().any(|c| c.contains(&format!("${variable}"))),
                "{name} sets {variable}, which none of its configuration files reads"
            );
        }
    }
}

#[test]
fn compose_durations_read_as_compose_reads_them() {
    assert_eq!(duration("45s"), Duration::from_secs(45));
    assert_eq!(duration("1m30s"), Duration::from_secs(90));
    assert_eq!(duration("1h2m3s500ms"), Duration::from_millis(3_723_500));
}
