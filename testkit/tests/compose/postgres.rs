//! Postgres's roles: the owner migrates in a one-shot run before any program starts, and the
//! API and the workers log in as the roles the migrations make, each with a password of its
//! own from a file only it sees.

use std::{collections::HashMap, process::Command};

use serde_json::Value;
use versus_testkit::TempDir;

use crate::{
    file::{compose, depends_on, environment, interpolate, read_repo_file, services, words},
    programs::program,
};

const MIGRATION: &str = "migrations/20261207000001_roles.sql";

/// Whether `service` waits for `dependency` to end in `condition`.
fn waits_for(service: &Value, dependency: &str, condition: &str) -> bool {
    depends_on(service)
        .iter()
        .any(|(name, c)| name == dependency && c == condition)
}

#[test]
fn the_owner_migrates_before_the_programs_start_as_their_roles() {
    let compose = compose();
    let services = services(&compose);
    let owner = &environment(&services["postgres"])["POSTGRES_USER"];

    let migrate = &services["migrate"];
    assert_eq!(program(migrate), Some("versus-worker"));
    assert!(
        words(&migrate["command"]).contains(&"--migrate-only".to_owned()),
        "migrate runs the migrations and exits"
    );
    let url = &environment(migrate)["DATABASE_URL"];
    assert!(
        url.starts_with(&format!("postgres://{owner}:")),
        "migrate runs as the owner, {owner}: {url}"
    );
    assert!(waits_for(migrate, "postgres", "service_healthy"));
    let auth = &services["postgres-auth"];
    assert!(waits_for(auth, "migrate", "service_completed_successfully"));

    let migration = read_repo_file(MIGRATION);
    for role in ["versus_api", "versus_worker"] {
        assert!(
            migration.contains(&format!("CREATE ROLE {role} LOGIN")),
            "{MIGRATION} does not make {role}"
        );
    }
    let mut programs = 0;
    for (name, service) in services {
        let (volume, role) = match program(service) {
            _ if service["restart"] == "no" => continue,
            Some("versus-api") => ("api-auth", "versus_api"),
            Some("versus-worker") => ("worker-auth", "versus_worker"),
            _ => continue,
        };
        programs += 1;
        assert!(
            !environment(service).contains_key("DATABASE_URL"),
            "{name} sets a DATABASE_URL of its own: it logs in as {role}, from /secrets/db.env"
        );
        assert!(
            words(&service["volumes"]).contains(&format!("{volume}:/secrets:ro")),
            "{name} does not see {volume}, where postgres-auth writes its DATABASE_URL"
        );
        assert!(
            words(&service["command"])
                .iter()
                .any(|word| word.contains("/secrets/db.env")),
            "{name} does not read its DATABASE_URL from /secrets/db.env"
        );
        assert!(
            waits_for(service, "postgres-auth", "service_completed_successfully"),
            "{name} may start before its role has a password (and the database its tables)"
        );
    }
    assert!(
        programs >= 5,
        "api, worker, api-edge1, api-edge2, hub-worker"
    );
}

/// What one run of postgres-auth's script left: each program's `DATABASE_URL` and the
/// arguments psql got.
struct Run {
    api: String,
    worker: String,
    psql: String,
}

/// Runs postgres-auth's script as its container would, with its `/secrets/` in `dir` and
/// `psql` (which records its arguments) and `chown` faked on `PATH`.
fn run_auth(service: &Value, dir: &TempDir) -> Run {
    let secrets = dir.path().join("secrets");
    for sub in ["postgres", "api", "worker"] {
        std::fs::create_dir_all(secrets.join(sub)).unwrap();
    }
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let psql_args = dir.path().join("psql.args");
    for (tool, body) in [
        (
            "psql",
            format!("printf '%s\\n' \"$@\" > '{}'", psql_args.display()),
        ),
        ("chown", "exit 0".to_owned()),
    ] {
        let path = bin.join(tool);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let no_env = HashMap::new();
    let entrypoint: Vec<String> = words(&service["entrypoint"])
        .iter()
        .map(|word| interpolate(word, &no_env))
        .collect();
    let [sh, flag, script] = entrypoint.as_slice() else {
        panic!("postgres-auth runs /bin/sh -euc SCRIPT, not {entrypoint:?}");
    };
    let script = script.replace("/secrets/", &format!("{}/", secrets.display()));
    let output = Command::new(sh)
        .args([flag, &script])
        .env_clear()
        .envs(
            environment(service)
                .iter()
                .map(|(name, value)| (name, interpolate(value, &no_env))),
        )
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .output()
        .expect("run postgres-auth's script");
    assert!(output.status.success(), "{output:?}");
    let read = |path: std::path::PathBuf| {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    for file in ["api/db.env", "worker/db.env"] {
        use std::os::unix::fs::MetadataExt;
        let mode = std::fs::metadata(secrets.join(file)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file} is readable by others");
    }
    Run {
        api: read(secrets.join("api/db.env")),
        worker: read(secrets.join("worker/db.env")),
        psql: read(psql_args),
    }
}

/// The password in `DATABASE_URL=postgres://ROLE:PASSWORD@postgres:5432/versus`.
fn password(db_env: &str, role: &str) -> String {
    let line = db_env.trim();
    let rest = line
        .strip_prefix(&format!("DATABASE_URL=postgres://{role}:"))
        .unwrap_or_else(|| panic!("not {role}'s DATABASE_URL: {line}"));
    let (password, database) = rest.split_once('@').unwrap();
    assert_eq!(database, "postgres:5432/versus");
    assert_eq!(password.len(), 32, "{line}");
    assert!(password.chars().all(|c| c.is_ascii_hexdigit()), "{line}");
    password.to_owned()
}

#[test]
fn postgres_auth_gives_each_role_a_password_of_its_own_and_keeps_it() {
    let compose = compose();
    let service = &services(&compose)["postgres-auth"];
    let dir = TempDir::new("versus-compose-postgres-auth");
    let first = run_auth(service, &dir);
    let api = password(&first.api, "versus_api");
    let worker = password(&first.worker, "versus_worker");
    assert_ne!(api, worker);
    for (role, password) in [("versus_api", &api), ("versus_worker", &worker)] {
        assert!(
            first
                .psql
                .contains(&format!("ALTER ROLE {role} PASSWORD '{password}'")),
            "psql does not set {role}'s password: {}",
            first.psql
        );
    }
    // As the owner: the user the postgres service makes, with its password.
    let postgres = environment(&services(&compose)["postgres"]);
    assert!(
        first
            .psql
            .contains(&format!("-U\n{}\n", postgres["POSTGRES_USER"])),
        "{}",
        first.psql
    );
    assert_eq!(
        environment(service)["PGPASSWORD"],
        postgres["POSTGRES_PASSWORD"]
    );

    // The next `up` keeps them.
    let again = run_auth(service, &dir);
    assert_eq!(password(&again.api, "versus_api"), api);
    assert_eq!(password(&again.worker, "versus_worker"), worker);
}
