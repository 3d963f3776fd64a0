//! One handler for Ctrl-C and SIGTERM, driving the cancellation token that every task watches.

use crate::tasks::Tasks;

/// Cancels `tasks.shutdown()` on the first Ctrl-C or SIGTERM. The handler is a tracked task
/// that also ends when the token fires for another reason.
pub fn on_signal(tasks: &Tasks) {
    let token = tasks.shutdown().clone();
    tasks.spawn(async move {
        tokio::select! {
            () = token.cancelled() => return,
            () = signalled() => {}
        }
        tracing::info!("shutdown requested");
        token.cancel();
    });
}

async fn signalled() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                () = ctrl_c => {}
                _ = term.recv() => {}
            },
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}
