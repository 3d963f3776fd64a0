//! The file as Compose reads it: valid against the specification's schema, whole in every
//! profile, ready when it says so, and reachable from this machine only.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    process::Command,
};

use serde_json::Value;

use crate::file::{
    compose, depends_on, environment, interpolate, profiles, repo_file, services, words,
};

const SCHEMA: &str = "testkit/compose-spec/compose-spec.json";

/// check-jsonschema from scripts/test (`ensure_compose_checker`).
fn checker() -> PathBuf {
    versus_testkit::installed("CHECK_JSONSCHEMA_BIN")
}

#[test]
fn compose_yaml_is_valid_against_the_compose_specification() {
    // The schema covers the whole file, every profile's services included (profiles choose
    // what starts, not what is read).
    let output = Command::new(checker())
        .arg("--schemafile")
        .arg(repo_file(SCHEMA))
        .arg(repo_file("compose.yaml"))
        .output()
        .expect("run check-jsonschema");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "compose.yaml is invalid:\n{report}"
    );
}

#[test]
fn the_kept_schema_is_the_one_the_pinned_checker_ships() {
    let python = checker().with_file_name("python");
    let output = Command::new(&python)
        .args([
            "-c",
            "import pathlib, check_jsonschema.builtin_schemas.vendor as v; \
             print(pathlib.Path(v.__file__).with_name('compose-spec.json'))",
        ])
        .output()
        .expect("run the checker's python");
    assert!(output.status.success(), "{output:?}");
    let shipped = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
    let shipped_text = std::fs::read_to_string(&shipped).unwrap();
    let kept_text = std::fs::read_to_string(repo_file(SCHEMA)).unwrap();
    assert!(
        shipped_text == kept_text,
        "{SCHEMA} is not the schema the pinned check-jsonschema ships: cp {} {SCHEMA}",
        shipped.display()
    );
}

/// The services that start with `active` profiles (and nothing named on the command line).
fn enabled<'a>(compose: &'a Value, active: &[&str]) -> BTreeSet<&'a str> {
    services(compose)
        .iter()
        .filter(|(_, service)| {
            let wanted = profiles(service);
            wanted.is_empty() || wanted.iter().any(|p| active.contains(&p.as_str()))
        })
        .map(|(name, _)| name.as_str())
        .collect()
}

#[test]
fn every_profile_starts_what_its_services_depend_on() {
    let compose = compose();
    let all: BTreeSet<String> = services(&compose).values().flat_map(profiles).collect();
    let mut sets: Vec<Vec<&str>> = vec![vec![]];
    sets.extend(all.iter().map(|p| vec![p.as_str()]));
    sets.push(all.iter().map(String::as_str).collect());
    for active in sets {
        let enabled = enabled(&compose, &active);
        for name in &enabled {
            let service = &services(&compose)[*name];
            for (dependency, condition) in depends_on(service) {
                assert!(
                    enabled.contains(dependency.as_str()),
                    "with profiles {active:?}, {name} depends on {dependency}, which does not start"
                );
                let target = &services(&compose)[&dependency];
                match condition.as_str() {
                    "service_healthy" => assert!(
                        target["healthcheck"].is_object(),
                        "{name} waits for {dependency} to be healthy, but it has no healthcheck"
                    ),
                    "service_completed_successfully" => assert_eq!(
                        target["restart"], "no",
                        "{name} waits for {dependency} to complete, but it restarts"
                    ),
                    "service_started" => {}
                    other => panic!("{name}: unknown condition {other}"),
                }
            }
        }
    }
}

#[test]
fn a_bare_up_starts_the_whole_single_node_system() {
    let compose = compose();
    let bare = enabled(&compose, &[]);
    for name in ["nats", "postgres", "s3", "sim", "api", "worker"] {
        assert!(
            bare.contains(name),
            "`docker compose up` does not start {name}"
        );
    }
}

#[test]
fn every_long_running_service_has_a_healthcheck_that_means_ready() {
    let compose = compose();
    for (name, service) in services(&compose) {
        if service["restart"] == "no" {
            continue;
        }
        let test = words(&service["healthcheck"]["test"]);
        assert!(!test.is_empty(), "{name} has no healthcheck");
        assert_eq!(
            test[0], "CMD",
            "{name}: exec form, no shell of Docker's own"
        );
    }
    // pg_isready over the Unix socket passes while the image's first-run initialisation runs a
    // server that refuses TCP, which is what the programs use.
    let postgres = words(&services(&compose)["postgres"]["healthcheck"]["test"]);
    let host = postgres.iter().position(|w| w == "-h");
    assert!(
        host.is_some_and(|at| postgres[at + 1] == "127.0.0.1"),
        "postgres's healthcheck must use TCP (pg_isready -h 127.0.0.1): {postgres:?}"
    );
}

#[test]
fn every_published_port_is_on_loopback() {
    let compose = compose();
    for (name, service) in services(&compose) {
        for port in words(&service["ports"]) {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} on every interface"
            );
        }
    }
}

#[test]
fn every_host_in_a_services_urls_is_a_service_or_a_real_domain() {
    let compose = compose();
    let names: BTreeSet<&str> = services(&compose).keys().map(String::as_str).collect();
    let no_env = HashMap::new();
    for (name, service) in services(&compose) {
        for (variable, value) in environment(service) {
            let value = interpolate(&value, &no_env);
            // URLs a program connects to (not s3://BUCKET, which names a bucket).
            let Some((scheme, rest)) = value.split_once("://") else {
                continue;
            };
            if !["http", "https", "postgres", "nats", "tls"].contains(&scheme) {
                continue;
            }
            let authority = rest.split('/').next().unwrap_or_default();
            let host_port = authority.rsplit('@').next().unwrap_or_default();
            let host = host_port.split(':').next().unwrap_or_default();
            if host.is_empty() || host.contains('.') {
                continue;
            }
            assert!(
                names.contains(host),
                "{name}: {variable} names {host}, which is no service of compose.yaml"
            );
        }
    }
    // The store's keys are the ones the s3 service serves with.
    let s3 = services(&compose).get("s3").expect("an s3 service");
    let s3 = words(&s3["command"]);
    let env = environment(&services(&compose)["worker"]);
    for (flag, variable) in [
        ("--access-key", "AWS_ACCESS_KEY_ID"),
        ("--secret-key", "AWS_SECRET_ACCESS_KEY"),
    ] {
        let at = s3.iter().position(|w| w == flag).expect(flag);
        assert_eq!(s3[at + 1], env[variable], "s3's {flag} and {variable}");
    }
    // And it makes the bucket (a folder) the programs use.
    let bucket = env["VERSUS_OBJECT_STORE"]
        .strip_prefix("s3://")
        .expect("VERSUS_OBJECT_STORE is s3://BUCKET");
    assert!(
        s3.join(" ").contains(&format!("mkdir -p /data/{bucket} ")),
        "s3 does not make the bucket {bucket}: {s3:?}"
    );
}
