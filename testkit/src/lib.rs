//! Test kit for Versus: real `nats-server`, a fresh Postgres database, and the Versus binaries
//! run as child processes, plus an SSE client and wait helpers for integration tests.
//!
//! The kit runs the binaries that `scripts/test` builds (`cargo build --workspace --bins`)
//! from the same target profile directory as the test executable, and needs:
//!
//! - `NATS_SERVER_BIN` (or `nats-server` on `PATH`), for [`Nats`] (run with the repository's
//!   `nats.conf`: the programs log in as its users, with passwords made per server);
//! - `VERSUS_TEST_DATABASE_URL`, a Postgres superuser URL, for [`Database`].
//!
//! `scripts/test` provides them (and `S3S_FS_BIN`, for [`S3`]; `PROMETHEUS_BIN` and
//! `PROMTOOL_BIN`, for [`Prometheus`]). A typical test:
//!
//! ```no_run
//! # async fn demo() {
//! let system = versus_testkit::System::builder().workers(2).start().await;
//! let url = format!("{}/v1/fights/stream?a=Batman&b=Superman", system.api_url());
//! let events = versus_testkit::sse::open(&url, None).await.collect_all().await;
//! assert!(!events.is_empty());
//! # }
//! ```
//!
//! Everything here panics with a clear message instead of returning errors: it is test code.

// Test code joins or drops its helper tasks with the test; the ban on a bare spawn is for the
// services.
#![allow(clippy::disallowed_methods)]

pub mod chaos;
mod db;
mod deadline;
mod edge;
mod hub;
mod nats;
mod otlp;
mod proc;
mod prometheus;
mod s3;
mod sim;
pub mod sse;
mod system;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

pub use db::Database;
pub use deadline::run_within;
pub use edge::{Edge, LinkProxy};
pub use hub::{HUB_NODES, Hub, MAX_EDGES, move_leader, stream_leader};
pub use nats::{Nats, NatsUser};
pub use nix::sys::signal::Signal;
pub use otlp::{Otlp, ReceivedSpan};
pub use proc::Proc;
pub use prometheus::{Prometheus, promtool};
pub use s3::S3;
pub use sim::{FALLBACK_API_KEY_ENV, Fallback, Sim};
pub use system::{System, SystemBuilder};

/// The path of a tool that `scripts/test` installs and names in the variable `var`
/// (`SCHEMATHESIS_BIN`, `AXE_CORE_JS`, ...); panics with that hint when it is not set.
/// How many of the stored `objects` (an object store's files) are pictures: partial images,
/// under `partials/` (removed 30 s after their picture is stored, or by the store's lifecycle
/// rule), are left out.
pub fn pictures_in(objects: Vec<PathBuf>) -> usize {
    objects
        .iter()
        .filter(|path| !path.components().any(|c| c.as_os_str() == "partials"))
        .count()
}

pub fn installed(var: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: run the tests with scripts/test, which installs it and sets it")
    })
}

/// The binary `name` (e.g. `versus-api`) built in the same target profile directory as the
/// running test executable (tests live in `target/<profile>/deps/`, binaries one level up).
/// `VERSUS_BIN_DIR` overrides the directory.
///
/// Panics if the binary is missing: `cargo test` does not build other packages' binaries.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("VERSUS_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => profile_dir(),
    };
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        panic!(
            "binary {name} not found at {}: run scripts/test, which builds the binaries first \
             (or `cargo build --workspace --bins` with the same profile as the tests)",
            path.display()
        );
    }
    path
}

/// `target/<profile>` of the running test executable.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let mut dir = exe
        .parent()
        .expect("the test executable lives in a directory")
        .to_path_buf();
    // Integration and unit tests live in target/<profile>/deps; examples in .../examples.
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    dir
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; another process may
/// still take it before you bind it, so callers that can should retry).
pub fn free_port() -> u16 {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("a bound listener has an address")
        .port()
}

/// Polls `f` every 50 ms until it returns true; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A new HTTP client for tests (plain HTTP; the rustls `ring` provider is installed once so
/// that reqwest, built without a default provider, can be constructed).
///
/// Build one per test rather than sharing one across tests: pooled connections belong to the
/// tokio runtime that opened them, and every `#[tokio::test]` has its own runtime.
pub fn http_client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("build a reqwest client")
}

fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means another provider is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A directory under the system temp dir, removed with its contents on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new folder `prefix-<uuid>` in the run's scratch folder (`VERSUS_TEST_SCRATCH`, which
    /// `scripts/test` sets and sweeps at the end, stopping any Postgres server a killed test
    /// left there), or else the system's temporary folder.
    pub fn new(prefix: &str) -> TempDir {
        let parent = std::env::var_os(versus_xtask::test::SCRATCH_VAR)
            .filter(|dir| !dir.is_empty())
            .map_or_else(std::env::temp_dir, PathBuf::from);
        let path = parent.join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
