//! The operator files of `deploy/`: promtool accepts the rules and the example configuration
//! and the alerts pass their unit tests, and a real Prometheus scraping a running system
//! evaluates every recording rule, and every query of the Grafana dashboard, to a value.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::future::join_all;
use serde_json::{Value, json};
use versus_testkit::{Prometheus, System, eventually, promtool};

use crate::{fight, http, json_of, metric, metrics_of, quick, run, shape};

/// How long every recording rule has to produce a value once the traffic is made: a few
/// scrapes and evaluations (one a second) are enough, and this bounds a failing run.
const EVALUATED_WITHIN: Duration = Duration::from_secs(60);

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[test]
fn promtool_accepts_the_rules_and_the_alerts_pass_their_unit_tests() {
    run(async {
        for args in [
            ["check", "rules", "prometheus/rules.yml"],
            ["check", "config", "prometheus/prometheus.yml"],
            ["test", "rules", "prometheus/rules.test.yml"],
        ] {
            let out = tokio::process::Command::new(promtool())
                .args(args)
                .current_dir(deploy())
                .kill_on_drop(true)
                .output()
                .await
                .unwrap_or_else(|e| panic!("run promtool: {e}; scripts/test installs it"));
            assert!(
                out.status.success(),
                "promtool {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
}

#[test]
fn prometheus_evaluates_every_recording_rule_against_a_running_system() {
    run(async {
        // A budget, so that spend is measured against one.
        let sys = quick()
            .env("VERSUS_DAILY_BUDGET_USD", "100")
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "100")
            .start()
            .await;
        let prometheus = Prometheus::start(
            &[
                ("versus-api", vec![sys.api.url.clone()]),
                (
                    "versus-worker",
                    sys.workers.iter().map(|w| w.url.clone()).collect(),
                ),
            ],
            &[deploy().join("prometheus/rules.yml")],
        )
        .await;

        // A miss, a hit of the same fight, and a picture.
        let miss = fight(&sys, "Batman", "Superman").await;
        assert_eq!(shape(&miss), ["meta", "chunk*", "done"], "{miss:?}");
        assert_eq!(miss[0].json()["cached"], json!(false));
        let hit = fight(&sys, "Superman", "Batman").await;
        assert_eq!(hit[0].json()["cached"], json!(true), "{hit:?}");
        let picture = json_of(
            http()
                .post(format!("{}/v1/images", sys.api_url()))
                .json(&json!({"a": "Batman", "b": "Superman"})),
        )
        .await;
        assert!(picture["url"].is_string(), "{picture}");

        let recorded = recording_rules(&prometheus).await;
        let in_file = std::fs::read_to_string(deploy().join("prometheus/rules.yml"))
            .unwrap()
            .matches("- record:")
            .count();
        assert_eq!(
            recorded.len(),
            in_file,
            "Prometheus loaded {recorded:?}, rules.yml has {in_file} recording rules"
        );
        let panels = dashboard_queries();
        for expr in &panels {
            for name in metric_names(expr) {
                assert!(
                    recorded.contains(&name),
                    "the dashboard queries {name} ({expr}), which no recording rule records"
                );
            }
        }

        // Every rule healthy, and every recording rule and dashboard query with a sample.
        let queries: Vec<&String> = recorded.iter().chain(&panels).collect();
        let deadline = tokio::time::Instant::now() + EVALUATED_WITHIN;
        loop {
            let unhealthy = unhealthy_rules(&prometheus).await;
            let mut empty = Vec::new();
            for expr in &queries {
                if prometheus.query(expr).await.is_empty() {
                    empty.push(expr.as_str());
                }
            }
            if unhealthy.is_empty() && empty.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "after {EVALUATED_WITHIN:?} of scrapes and evaluations, rules not healthy: \
                 {unhealthy:?}; with no value: {empty:?}\nPrometheus's log:\n{}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

#[test]
fn a_worker_reports_the_jobs_waiting_and_how_long_the_oldest_has_waited() {
    run(async {
        // One worker running one job at a time, and answers that take seconds: of three misses
        // at once, two wait in the queue.
        let sys = System::builder()
            .workers(1)
            .worker_env("VERSUS_WORKER_CONCURRENCY", "1")
            .sim_env("VERSUS_SIM_TTFT_MS", "1500")
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "40")
            .sim_env("VERSUS_SIM_ANSWER_TOKENS", "40")
            .start()
            .await;
        let worker = sys.workers[0].url.clone();
        let interactive = "lane=\"interactive\"";
        let gauge = |name: &'static str| {
            let worker = worker.clone();
            async move { metric(&metrics_of(&worker).await, name, interactive) }
        };
        let fights = join_all(
            [
                ("Batman", "Superman"),
                ("Goku", "Naruto"),
                ("Alien", "Predator"),
            ]
            .map(|(a, b)| fight(&sys, a, b)),
        );
        let watched = async {
            eventually(
                "the worker reports interactive jobs waiting, the oldest for a while",
                Duration::from_secs(30),
                || async {
                    gauge("versus_jobs_waiting").await >= 1.0
                        && gauge("versus_jobs_oldest_waiting_age_seconds").await > 0.0
                },
            )
            .await;
        };
        let (answers, ()) = tokio::join!(fights, watched);
        for events in &answers {
            assert_eq!(shape(events), ["meta", "chunk*", "done"], "{events:?}");
        }

        eventually(
            "the worker reports the queue empty again, and the three deliveries",
            Duration::from_secs(30),
            || async {
                gauge("versus_jobs_waiting").await == 0.0
                    && gauge("versus_jobs_oldest_waiting_age_seconds").await == 0.0
                    && gauge("versus_jobs_ack_pending").await == 0.0
                    && gauge("versus_jobs_delivered_total").await >= 3.0
            },
        )
        .await;
    });
}

/// The names of the recording rules Prometheus evaluates.
async fn recording_rules(prometheus: &Prometheus) -> BTreeSet<String> {
    rules(prometheus)
        .await
        .into_iter()
        .filter(|r| r["type"] == "recording")
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Each rule whose last evaluation was not `ok` (not yet evaluated, or failed), with why.
async fn unhealthy_rules(prometheus: &Prometheus) -> Vec<String> {
    let rules = rules(prometheus).await;
    assert!(!rules.is_empty(), "Prometheus evaluates no rule");
    rules
        .into_iter()
        .filter(|r| r["health"] != "ok")
        .map(|r| format!("{} ({}: {})", r["name"], r["health"], r["lastError"]))
        .collect()
}

async fn rules(prometheus: &Prometheus) -> Vec<Value> {
    prometheus
        .rule_groups()
        .await
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Every query of the Grafana dashboard's panels.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(deploy().join("grafana/versus.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(!queries.is_empty(), "the dashboard has no queries");
    queries
}

/// The Versus metrics `expr` reads (`versus…` names; functions and labels aside).
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("versus"))
        .map(str::to_owned)
        .collect()
}
