//! The OpenAPI document: the one served is the one kept in `docs/openapi.json`, it is valid
//! OpenAPI 3.1, and schemathesis, fuzzing every operation of a live system with it, finds no
//! server error, no response the document does not describe, and no request that costs more
//! than one upstream call per unique matchup.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use versus_testkit::{TempDir, eventually, installed};

use crate::{http, quick, run, worker_metric};

const TOKEN: &str = "fuzz-admin-token-0123456789abcdef";

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// Runs `program args` in the temporary folder `dir` (it may leave files in its working
/// directory) to its end; panics with its output unless it succeeds.
async fn run_ok(program: &Path, args: &[&str], dir: &TempDir) -> String {
    let output = tokio::process::Command::new(program)
        .args(args)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{} {args:?} failed ({}):\n{text}",
        program.display(),
        output.status
    );
    text
}

#[test]
fn the_served_document_is_the_kept_one_and_valid_openapi_3_1() {
    run(async {
        let sys = quick().workers(1).start().await;
        let response = http()
            .get(format!("{}/openapi.json", sys.api_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/json");
        let served = response.text().await.unwrap();
        let kept = std::fs::read_to_string(repo_file("docs/openapi.json")).unwrap();
        assert!(
            served == kept,
            "/openapi.json differs from docs/openapi.json"
        );
        let document: serde_json::Value = serde_json::from_str(&served).unwrap();
        assert_eq!(document["openapi"], "3.1.0");

        let file = repo_file("docs/openapi.json");
        let validated = run_ok(
            &installed("OPENAPI_SPEC_VALIDATOR_BIN"),
            &[file.to_str().unwrap()],
            &TempDir::new("versus-openapi"),
        )
        .await;
        assert!(validated.contains("OK"), "{validated}");
    });
}

#[test]
fn schemathesis_finds_nothing_on_a_live_system() {
    run(async {
        let sys = quick()
            .workers(2)
            .env("VERSUS_ADMIN_TOKEN", TOKEN)
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "20")
            .start()
            .await;
        let report = TempDir::new("versus-schemathesis");
        // The kept document, which is the served one (the test above): loaded from its URL,
        // schemathesis would leave out the operation that serves it.
        let schema = repo_file("docs/openapi.json");
        let auth = format!("Authorization: Bearer {TOKEN}");
        let junit = report.path().join("junit.xml");
        let started = Instant::now();
        let output = run_ok(
            &installed("SCHEMATHESIS_BIN"),
            &[
                "--config-file",
                repo_file("testkit/schemathesis.toml").to_str().unwrap(),
                "run",
                schema.to_str().unwrap(),
                "--url",
                sys.api_url(),
                "--header",
                &auth,
                "--checks",
                "all",
                "--mode",
                "all",
                "--max-examples",
                "40",
                "--seed",
                "1",
                "--no-color",
                "--report",
                "junit",
                "--report-junit-path",
                junit.to_str().unwrap(),
            ],
            &report,
        )
        .await;
        eprintln!("schemathesis took {:?}:\n{output}", started.elapsed());

        // Every operation of the document was tested.
        let document: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&schema).unwrap()).unwrap();
        let junit = std::fs::read_to_string(&junit).unwrap();
        let mut operations = 0;
        for (path, item) in document["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                let case = format!("<testcase name=\"{} {path}\"", method.to_uppercase());
                assert!(junit.contains(&case), "{case} is missing:\n{junit}");
                operations += 1;
            }
        }
        let selected = format!("{operations} selected / {operations} total");
        assert!(
            output
                .lines()
                .any(|l| l.contains("Operations:") && l.contains(&selected)),
            "schemathesis did not select all {operations} operations"
        );

        // Nothing was paid for twice: at most one chat call per answer generated, one picture
        // call per picture drawn (those the fuzzer purged included: asking again after a purge
        // pays again, as it should). A generation the fuzzer started last may still be under way:
        // its row appears once it is claimed.
        let pool = sys.db.pool().await;
        let generated = |kind: &'static str| {
            let (pool, sys) = (pool.clone(), &sys);
            async move {
                let (rows,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM generations WHERE kind = $1 AND status <> 'purged'",
                )
                .bind(kind)
                .fetch_one(&pool)
                .await
                .unwrap();
                let label = format!("kind=\"{kind}\"");
                rows as u64 + worker_metric(sys, "versus_purged_total", &label).await as u64
            }
        };
        let paid_once = || async {
            let (chats, images) = (sys.sim.chat_calls().await, sys.sim.image_calls().await);
            let (texts, pictures) = (generated("text").await, generated("image").await);
            eprintln!(
                "{texts} answers and {pictures} pictures; {chats} chat and {images} picture calls"
            );
            chats > 0 && images > 0 && chats <= texts && images <= pictures
        };
        eventually(
            "one upstream call per generation (see the last line above)",
            Duration::from_secs(10),
            paid_once,
        )
        .await;
        let cancelled = worker_metric(&sys, "versus_upstream_cancelled_total", "").await;
        assert_eq!(cancelled, 0.0, "upstream calls were started and cancelled");
    });
}
