//! A real S3-compatible server for a test: `s3s-fs` (installed by `scripts/test`) on a free
//! port, whose buckets are folders under a temporary root.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::process::{Child, Command};

use crate::{TempDir, free_port};

pub const BUCKET: &str = "versus";
const ACCESS_KEY: &str = "versus-test";
const SECRET_KEY: &str = "versus-test-secret";

pub struct S3 {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    port: u16,
    child: Option<Child>,
    // Last: removed once the server is gone.
    root: TempDir,
}

impl S3 {
    /// Starts s3s-fs (`S3S_FS_BIN`, else `s3s-fs` on `PATH` or in `~/.cargo/bin`) with an
    /// empty bucket.
    pub async fn start() -> S3 {
        let root = TempDir::new("versus-s3");
        std::fs::create_dir_all(root.path().join(BUCKET)).expect("create the bucket folder");
        let port = free_port();
        let mut s3 = S3 {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            child: None,
            root,
        };
        s3.start_again().await;
        s3
    }

    /// The variables that point the API and workers at this server.
    pub fn envs(&self) -> Vec<(String, String)> {
        [
            ("VERSUS_OBJECT_STORE", format!("s3://{BUCKET}")),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Kills the server (an outage); its data stays.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port and data.
    pub async fn start_again(&mut self) {
        self.stop().await;
        let child = Command::new(bin())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start s3s-fs ({}): {e}; scripts/test installs it",
                    bin().display()
                )
            });
        self.child = Some(child);
        crate::eventually(
            "s3s-fs accepts connections",
            Duration::from_secs(20),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    /// The objects in the bucket (files, s3s-fs's own bookkeeping excluded).
    pub fn objects(&self) -> Vec<PathBuf> {
        files(&self.root.path().join(BUCKET))
    }
}

fn bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("S3S_FS_BIN") {
        return PathBuf::from(bin);
    }
    let cargo_bin = std::env::var_os("HOME")
        .map(|home| Path::new(&home).join(".cargo/bin/s3s-fs"))
        .filter(|p| p.is_file());
    cargo_bin.unwrap_or_else(|| PathBuf::from("s3s-fs"))
}

/// Every file under `dir`, recursively, skipping hidden files and folders.
pub(crate) fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}
