//! An edge's watch of its leaf link to the hub: [`HubLink`], kept up to date by asking the hub's
//! JetStream for its account information (`INFO`) across the link.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What an edge knows of its leaf link to the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubLink {
    Up,
    /// Found down at this instant.
    Down {
        since: tokio::time::Instant,
    },
}

/// How often an edge asks the hub's JetStream for its account information across the leaf
/// link, and how long it waits for the answer.
const LINK_PROBE_EVERY: Duration = Duration::from_millis(250);
const LINK_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The link is down once every ask for this long found no route ("no responders": the edge
/// server has no leaf connection to the hub, or has not yet had the hub's interest back after
/// reconnecting; the hub's servers answer `$JS.<hub>.API.>` whatever their streams are doing).
/// A leaf reconnecting to another hub server after one died takes half a second when idle and
/// over two on a loaded machine, which must not count.
const LINK_DOWN_NO_ROUTE: Duration = Duration::from_secs(3);
/// Or once nothing has answered for this long (a link that hangs without closing): longer
/// than a JetStream meta-leader election, during which the asks go unanswered.
const LINK_DOWN_SILENCE: Duration = Duration::from_secs(15);

/// Keeps `link` up to date: asks the hub's JetStream (`{api_prefix}.INFO`) every
/// [`LINK_PROBE_EVERY`]. Only the link's absence gives "no responders" at once; a hub busy
/// electing leaders gives no answer, which counts only after [`LINK_DOWN_SILENCE`].
pub(super) async fn watch_link(
    client: async_nats::Client,
    api_prefix: String,
    link: watch::Sender<HubLink>,
    shutdown: CancellationToken,
) {
    use async_nats::client::RequestErrorKind;
    let subject = format!("{api_prefix}.INFO");
    let mut answered_at = tokio::time::Instant::now();
    let mut routed_at = answered_at;
    let probe = async {
        loop {
            let asked = tokio::time::Instant::now();
            let ask = tokio::time::timeout(
                LINK_PROBE_TIMEOUT,
                client.request(subject.clone(), bytes::Bytes::new()),
            )
            .await;
            let now = tokio::time::Instant::now();
            let no_route = matches!(
                &ask,
                Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders
            );
            if !no_route {
                routed_at = now;
            }
            if matches!(ask, Ok(Ok(_))) {
                answered_at = now;
                link.send_if_modified(|state| {
                    let was_down = *state != HubLink::Up;
                    if was_down {
                        tracing::info!("the hub answers across the leaf link again");
                    }
                    *state = HubLink::Up;
                    was_down
                });
            } else {
                let (unrouted, silent) = (now - routed_at, now - answered_at);
                let down = unrouted >= LINK_DOWN_NO_ROUTE || silent >= LINK_DOWN_SILENCE;
                if down && *link.borrow() == HubLink::Up {
                    tracing::warn!(
                        ?unrouted,
                        ?silent,
                        "the hub does not answer across the leaf link: misses are refused until it does"
                    );
                    link.send_replace(HubLink::Down { since: now });
                }
            }
            tokio::time::sleep_until(asked + LINK_PROBE_EVERY).await;
        }
    };
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = probe => {}
    }
}
