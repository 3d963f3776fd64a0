//! A real Prometheus for a test (`PROMETHEUS_BIN`, else `prometheus` on `PATH`; `scripts/test`
//! installs Debian's): scraping the given jobs and evaluating the given rule files every
//! second, on a free port, with its store in a temporary folder; killed when dropped. Also
//! where `promtool` is (`PROMTOOL_BIN`).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::{TempDir, free_port, http_client};

/// How long Prometheus may take to answer `/-/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running Prometheus. Killed (SIGKILL) when dropped; its store goes with it.
pub struct Prometheus {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    child: Child,
    http: reqwest::Client,
    // Last: removed once the server is gone.
    dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping each job of `jobs` (its name, and the base URLs whose
    /// `/metrics` it scrapes, e.g. [`crate::Proc::url`]) and evaluating `rule_files`, both every
    /// second, and waits until it is ready. Panics with its log if it does not start.
    pub async fn start(jobs: &[(&str, Vec<String>)], rule_files: &[PathBuf]) -> Prometheus {
        let scrape_configs: Vec<Value> = jobs
            .iter()
            .map(|(name, urls)| {
                let targets: Vec<&str> = urls
                    .iter()
                    .map(|url| url.trim_start_matches("http://"))
                    .collect();
                json!({"job_name": name, "static_configs": [{"targets": targets}]})
            })
            .collect();
        // JSON is YAML: Prometheus reads it as it is.
        let config = json!({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": rule_files,
            "scrape_configs": scrape_configs,
        });
        // Another process may take the port between choosing it and binding it: try a few.
        let mut log = String::new();
        for _ in 0..3 {
            let mut prometheus = Prometheus::spawn(&config, free_port());
            if prometheus.ready().await {
                return prometheus;
            }
            log = prometheus.log();
            if !log.contains("address already in use") {
                break;
            }
        }
        panic!("prometheus did not start; its log:\n{log}");
    }

    fn spawn(config: &Value, port: u16) -> Prometheus {
        let dir = TempDir::new("versus-prometheus");
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config.to_string()).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.path().join("prometheus.log"))
            .expect("create prometheus.log");
        let child = Command::new(bin("PROMETHEUS_BIN", "prometheus"))
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start prometheus: {e}; scripts/test installs it"));
        Prometheus {
            url: format!("http://127.0.0.1:{port}"),
            child,
            http: http_client(),
            dir,
        }
    }

    /// Waits for `/-/ready`; false if Prometheus exits or stays unready.
    async fn ready(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            let ready = self.http.get(format!("{}/-/ready", self.url)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// What Prometheus has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/{path}` with `query`: its `data`. Panics unless Prometheus answers
    /// `"status": "success"`.
    pub async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let url = reqwest::Url::parse_with_params(&format!("{}/api/v1/{path}", self.url), query)
            .expect("a valid URL");
        let response = self
            .http
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("prometheus /api/v1/{path}: {e}"));
        let body: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("prometheus /api/v1/{path} answered no JSON: {e}"));
        assert_eq!(
            body["status"], "success",
            "/api/v1/{path} {query:?}: {body}"
        );
        body["data"].clone()
    }

    /// The samples an instant query of `expr` returns now.
    pub async fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", expr)]).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The rule groups Prometheus evaluates (`/api/v1/rules`), with their rules' health.
    pub async fn rule_groups(&self) -> Vec<Value> {
        let data = self.api("rules", &[]).await;
        data["groups"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// `promtool`: `PROMTOOL_BIN`, else `promtool` on `PATH`.
pub fn promtool() -> PathBuf {
    bin("PROMTOOL_BIN", "promtool")
}

fn bin(var: &str, name: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| Path::new(name).to_path_buf(), PathBuf::from)
}
