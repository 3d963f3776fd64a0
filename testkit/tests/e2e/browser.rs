//! A real browser for the page tests: Debian's `chromium`, headless, driven over WebDriver
//! through `chromedriver` on a free port, with a fresh profile. Dropping it kills chromedriver
//! and the browser it started (the whole process group), and removes the profile.
//!
//! `scripts/test` installs both (`apt-get install chromium chromium-driver`);
//! `VERSUS_CHROMIUM` and `VERSUS_CHROMEDRIVER` override their paths.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use hyper_util::client::legacy::connect::HttpConnector;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use versus_testkit::{eventually, free_port};

/// How long chromedriver may take to listen, and a page to reach a state.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The flags that make chromium quiet and self-contained here: no sandbox (we are root in a
/// container), no GPU, no network of its own beyond the page it is pointed at.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--window-size=1280,900",
];

pub struct Browser {
    pub client: Client,
    driver: Child,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver and opens a browser session; panics with a hint if either is
    /// missing.
    pub async fn start() -> Browser {
        Browser::start_with(&[]).await
    }

    /// [`Browser::start`] with more chromium flags (`--blink-settings=preferredColorScheme=0`
    /// for the dark colour scheme, say).
    pub async fn start_with(flags: &[&str]) -> Browser {
        let chromium = tool("VERSUS_CHROMIUM", "/usr/bin/chromium");
        let chromedriver = tool("VERSUS_CHROMEDRIVER", "/usr/bin/chromedriver");
        let profile =
            std::env::temp_dir().join(format!("versus-chromium-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&profile).expect("create the browser profile directory");

        let port = free_port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that dropping the Browser can end chromium too.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let mut browser_args: Vec<String> = CHROMIUM_FLAGS
            .iter()
            .chain(flags)
            .map(|f| f.to_string())
            .collect();
        browser_args.push(format!("--user-data-dir={}", profile.display()));
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": browser_args },
        });
        let capabilities = capabilities.as_object().cloned().expect("a JSON object");

        let url = format!("http://127.0.0.1:{port}");
        eventually("chromedriver listens", TIMEOUT, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("open a chromium session through chromedriver: {e}"));
        Browser {
            client,
            driver,
            profile,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    pub async fn find(&self, css: &str) -> Element {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("find {css}: {e}"))
    }

    /// Runs `script` (a function body: `return …`) in the page.
    pub async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("run {script:?} in the page: {e}"))
    }

    /// Waits until the expression `condition` is true in the page.
    pub async fn wait_for(&self, what: &str, condition: &str) {
        let script = format!("return Boolean({condition});");
        eventually(what, TIMEOUT, || async {
            self.js(&script).await == json!(true)
        })
        .await;
    }

    /// Runs Deque's axe-core in the page (WCAG 2.1 A and AA, and best practices) and returns
    /// its violations, each as `{id, impact, help, nodes: [selector]}`.
    pub async fn accessibility_violations(&self) -> Vec<Value> {
        let loaded = self.js("return typeof window.axe === 'object';").await;
        if loaded != json!(true) {
            let path = versus_testkit::installed("AXE_CORE_JS");
            let source = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read axe-core at {}: {e}", path.display()));
            self.client
                .execute(&source, Vec::new())
                .await
                .unwrap_or_else(|e| panic!("load axe-core into the page: {e}"));
        }
        let found = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, { runOnly: { type: 'tag', values:
                     ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice'] } })
                   .then(r => done(r.violations.map(v => ({ id: v.id, impact: v.impact,
                       help: v.help, nodes: v.nodes.map(n => n.target.join(' ')) }))))
                   .catch(e => done({ error: String(e) }));",
                Vec::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("run axe-core in the page: {e}"));
        match found {
            Value::Array(violations) => violations,
            other => panic!("axe-core failed: {other}"),
        }
    }

    /// Presses Tab until the element with `id` has the focus: it must be reachable from the
    /// keyboard, within `presses`.
    pub async fn tab_to(&self, id: &str, presses: usize) {
        let tab = char::from(fantoccini::key::Key::Tab).to_string();
        for _ in 0..presses {
            let focused = self.js("return document.activeElement?.id ?? '';").await;
            if focused == json!(id) {
                return;
            }
            self.client
                .active_element()
                .await
                .unwrap_or_else(|e| panic!("find the focused element: {e}"))
                .send_keys(&tab)
                .await
                .unwrap_or_else(|e| panic!("press Tab: {e}"));
        }
        let focused = self.js("return document.activeElement?.id ?? '';").await;
        assert_eq!(
            focused,
            json!(id),
            "#{id} is not reached with {presses} Tab presses"
        );
    }

    /// Types `keys` into the focused element.
    pub async fn type_keys(&self, keys: &str) {
        self.client
            .active_element()
            .await
            .unwrap_or_else(|e| panic!("find the focused element: {e}"))
            .send_keys(keys)
            .await
            .unwrap_or_else(|e| panic!("type {keys:?}: {e}"));
    }

    /// Saves a screenshot as `target/screenshots/<name>.png` and returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("take a screenshot: {e}"));
        let dir = target_dir().join("screenshots");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// Ends the session (chromedriver closes chromium) and stops chromedriver.
    pub async fn close(mut self) {
        let client = self.client.clone();
        if let Err(e) = client.close().await {
            eprintln!("closing the browser session: {e}");
        }
        self.kill_group();
        let _ = self.driver.wait().await;
    }
}

impl Browser {
    /// Kills chromedriver and whatever chromium processes are left in the group it leads
    /// (unless it has been reaped already, so that a recycled pid is never signalled).
    fn kill_group(&mut self) {
        if let Some(pid) = self.driver.id().and_then(|pid| i32::try_from(pid).ok()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A panicking test never reaches close().
        self.kill_group();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn tool(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from);
    if !path.is_file() {
        panic!(
            "{} is missing: scripts/test installs it (apt-get install chromium chromium-driver), \
             or set {var}",
            path.display()
        );
    }
    path
}

/// `target/`: the test executable runs from `target/<profile>/deps/`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .expect("the test executable lives in target/<profile>/deps")
}
