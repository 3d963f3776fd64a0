//! Every task a process spawns: tracked, told when to stop, and waited for before the process
//! exits. `clippy.toml` bans a bare `tokio::spawn` in the services, so a task nobody waits for
//! cannot be written by accident.

use std::{future::Future, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The tasks of one process and the token that asks them to stop. Cheap to clone.
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Fires when the process should stop (a signal, or a part that failed).
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Runs `task` in the background, tracked: [`Tasks::wait`] waits for it.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Takes no new tasks once those running have ended, and waits up to `limit` for them;
    /// false when some were still running at the limit (they are then dropped with the runtime).
    pub async fn wait(&self, limit: Duration) -> bool {
        self.tracker.close();
        let ended = tokio::time::timeout(limit, self.tracker.wait())
            .await
            .is_ok();
        if !ended {
            tracing::warn!(running = self.tracker.len(), "tasks still running at exit");
        }
        ended
    }
}
