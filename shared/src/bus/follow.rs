//! Following a KV bucket's changes for as long as the process runs: a watch that breaks starts
//! again after the last change it gave, so nothing is missed meanwhile (the ordered consumer
//! under it already starts again by itself after a gap; this covers a watch that ends or
//! fails). Used for an edge's purges and for the known names (the API's), and for the aliases
//! (both processes').

use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;

/// How long a watch that failed waits before it watches again: a mirror is usually back
/// within that (and an edge's floors heard meanwhile on the purge subject still apply).
const RETRY: Duration = Duration::from_millis(500);

/// Where a watch begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// What each entry holds now, then every change.
    Now,
    /// Only the changes made from here on.
    Next,
}

/// Hands every change of `store`'s entries matching `filter` to `each`, from `from` on, and
/// never returns (drop it to stop). `what` names the watch in the logs.
pub async fn changes(
    store: &kv::Store,
    filter: &str,
    from: From,
    what: &str,
    mut each: impl FnMut(kv::Entry),
) {
    // The revision to start from again: after the last change seen.
    let mut next = None;
    loop {
        let watch = match (next, from) {
            (Some(revision), _) => store.watch_from_revision(filter, revision).await,
            (None, From::Now) => store.watch_with_history(filter).await,
            (None, From::Next) => store.watch(filter).await,
        };
        match watch {
            Ok(mut watch) => {
                while let Some(change) = watch.next().await {
                    match change {
                        Ok(entry) => {
                            next = Some(entry.revision + 1);
                            each(entry);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "watching {what} failed");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "watching {what} failed"),
        }
        tokio::time::sleep(RETRY).await;
    }
}
