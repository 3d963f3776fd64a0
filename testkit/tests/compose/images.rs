//! Every image is pinned: compose's to versions (nats-server's the one the scripts run), the
//! Dockerfile's bases too, and the images built here are never pulled.

use std::collections::BTreeSet;

use crate::{
    file::{compose, read_repo_file, services},
    programs::program,
};

/// `NAME=value` from scripts/lib.sh, the versions the scripts and tests run.
fn lib_version(name: &str) -> String {
    read_repo_file("scripts/lib.sh")
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("scripts/lib.sh sets no {name}"))
        .to_owned()
}

/// Whether `image` names a version: `repo:MAJOR.MINOR…` (`-variant` allowed after it).
fn pinned(image: &str) -> bool {
    let Some((_, tag)) = image.rsplit_once(':') else {
        return false;
    };
    let version = tag.split('-').next().unwrap_or_default();
    let parts: Vec<&str> = version.split('.').collect();
    parts.len() >= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

#[test]
fn pinned_means_a_version_to_the_minor_at_least() {
    for image in ["postgres:17.11", "nats:2.15.1-alpine", "rust:1.95.0-trixie"] {
        assert!(pinned(image), "{image}");
    }
    for image in [
        "postgres:17",
        "nats",
        "minio/minio",
        "rust:1-bookworm",
        "x:latest",
    ] {
        assert!(!pinned(image), "{image}");
    }
}

/// The Dockerfile's stages: `(base, name)` of each `FROM base [AS name]`.
fn dockerfile_stages() -> Vec<(String, Option<String>)> {
    read_repo_file("Dockerfile")
        .lines()
        .filter_map(|line| line.strip_prefix("FROM "))
        .map(|from| {
            let words: Vec<&str> = from.split_whitespace().collect();
            match words.as_slice() {
                [base] => (base.to_string(), None),
                [base, r#as, name] if r#as.eq_ignore_ascii_case("as") => {
                    (base.to_string(), Some(name.to_string()))
                }
                _ => panic!("a FROM this test does not read: {from}"),
            }
        })
        .collect()
}

#[test]
fn every_image_compose_pulls_is_pinned_and_nats_is_the_scripts_version() {
    let compose = compose();
    let nats = lib_version("NATS_SERVER_VERSION");
    let stages: Vec<String> = dockerfile_stages()
        .into_iter()
        .filter_map(|(_, name)| name)
        .collect();
    for (name, service) in services(&compose) {
        let image = service["image"].as_str().unwrap_or_default();
        if !service["build"].is_null() {
            // Ours: built from this checkout on every `up` (a stale image never runs), from a
            // stage of the Dockerfile named for it, under a name no registry has.
            assert!(image.ends_with(":local"), "{name}: {image}");
            assert_eq!(service["pull_policy"], "build", "{name}");
            let target = service["build"]["target"].as_str();
            assert!(
                target.is_some_and(|t| stages.iter().any(|s| s == t)),
                "{name} builds the stage {target:?}, which the Dockerfile lacks"
            );
            continue;
        }
        assert!(pinned(image), "{name}: {image} is not pinned to a version");
        if let Some(tag) = image.strip_prefix("nats:") {
            assert!(
                tag.starts_with(&format!("{nats}-")) || tag == nats,
                "{name} runs nats {tag}, the scripts and tests {nats} (scripts/lib.sh)"
            );
        }
    }
}

#[test]
fn every_dockerfile_base_is_pinned_and_it_builds_what_compose_runs() {
    let mut earlier = BTreeSet::new();
    for (base, name) in dockerfile_stages() {
        assert!(
            earlier.contains(&base) || pinned(&base),
            "FROM {base} is not pinned to a version"
        );
        earlier.extend(name);
    }
    let dockerfile = read_repo_file("Dockerfile");
    // The store's server is the version the tests run.
    let s3s_fs = lib_version("S3S_FS_VERSION");
    assert!(
        dockerfile.contains(&format!("s3s-fs@{s3s_fs}")),
        "the Dockerfile's s3s-fs is not {s3s_fs} (S3S_FS_VERSION in scripts/lib.sh)"
    );
    // Only the binaries the image ships are built, and every one compose runs is among them.
    let built: BTreeSet<&str> = dockerfile
        .split("--bin ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    let compose = compose();
    for (name, service) in services(&compose) {
        if let Some(program) = program(service) {
            assert!(
                built.contains(program),
                "{name} runs {program}, which is not built"
            );
        }
    }
    assert!(
        !built.contains("versus-bench"),
        "the image ships no benchmarks"
    );
    assert!(
        !dockerfile.contains("--bins"),
        "--bins would build the benchmarks too"
    );
}
