//! Tests under a deadline: [`run_within`] runs an async test body as `#[tokio::test]` would, and
//! fails the test when it outlives its deadline instead of stalling the whole run.

use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

/// Runs `body` to its end on a tokio runtime of its own (one thread, every driver: what
/// `#[tokio::test]` builds), and panics, naming the test and `limit`, if it has not ended
/// within `limit`. A test that hangs then fails like any other, with its processes killed.
///
/// On expiry the body is dropped during the panic, so that [`crate::System`] knows the test
/// failed (it skips its own checks then) and kills every process it started.
///
/// With `VERSUS_TEST_TIMES=<file>` set, appends `<seconds>\t<limit seconds>\t<test>` to that
/// file for every test that ends, passed or failed: how long each takes, to choose deadlines.
pub fn run_within<F>(limit: Duration, body: F)
where
    F: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build the test's tokio runtime");
    // Entered for the rest of the function: the body may be dropped after `block_on`, during
    // the panic below, and what it holds may need the runtime's context to close.
    let _entered = runtime.enter();
    let _timer = Timer {
        started: Instant::now(),
        limit,
    };
    let mut body = std::pin::pin!(body);
    let ended = runtime.block_on(tokio::time::timeout(limit, body.as_mut()));
    if ended.is_err() {
        panic!(
            "{} did not end within its deadline of {limit:?}: it hangs, or it needs a longer \
             deadline (see `DEADLINE` in testkit/tests/e2e/main.rs)",
            test_name()
        );
    }
}

/// The running test's name: libtest runs each test on a thread named after it.
fn test_name() -> String {
    std::thread::current()
        .name()
        .filter(|name| *name != "main")
        .unwrap_or("the test")
        .to_owned()
}

/// Records how long the test took when it ends, whether it passed or panicked.
struct Timer {
    started: Instant,
    limit: Duration,
}

impl Drop for Timer {
    fn drop(&mut self) {
        let Some(path) = std::env::var_os("VERSUS_TEST_TIMES") else {
            return;
        };
        let line = format!(
            "{:.1}\t{}\t{}\n",
            self.started.elapsed().as_secs_f64(),
            self.limit.as_secs(),
            test_name()
        );
        // One short write in append mode: lines of tests that end at once do not mix.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!(
                "VERSUS_TEST_TIMES: cannot append to {}: {e}",
                path.display()
            );
        }
    }
}
