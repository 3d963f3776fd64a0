//! Edges of a [`crate::Hub`]: each a nats-server run with the repository's `nats-edge.conf`
//! (a leaf node of the hub, with a JetStream domain named after the edge), whose leaf link
//! goes through a TCP proxy the test owns, so that a test can cut the link and restore it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::{Nats, NatsUser, Proc, free_port, nats::Launch};

/// How long an edge may take to join the hub.
const LINK_TIMEOUT: Duration = Duration::from_secs(20);

/// An edge: its nats-server, the proxy its leaf link goes through, and its API replica.
pub struct Edge {
    /// `edge1`, `edge2`, …: also its JetStream domain.
    pub name: String,
    pub api: Proc,
    pub link: LinkProxy,
    pub nats: Nats,
    /// The user and password its server logs in to the hub with: this edge's alone, with what
    /// an edge may do there (`nats-hub.conf`).
    pub leaf_login: (String, String),
}

impl Edge {
    /// The edge API's base URL.
    pub fn api_url(&self) -> &str {
        &self.api.url
    }

    /// Cuts the leaf link (every connection through the proxy closes, new ones are refused)
    /// and waits until the edge's server sees no leaf connection.
    pub async fn cut_link(&self) {
        self.link.cut();
        wait_leafs(&self.nats, false).await;
    }

    /// Lets the leaf link through again and waits until the edge's server is joined.
    pub async fn restore_link(&self) {
        self.link.restore();
        wait_leafs(&self.nats, true).await;
    }
}

/// Starts edge `name`'s nats-server, its leaf link to the hub's leaf-node ports (logging in
/// with the edge's own leaf login) through a new [`LinkProxy`], and waits until it is joined.
pub(crate) async fn start_server(
    name: &str,
    hub: &crate::Hub,
) -> (Nats, LinkProxy, (String, String)) {
    let link = LinkProxy::start(hub.leaf_ports.clone()).await;
    let (leaf_user, leaf_password) = hub.leaf_login(name);
    let passwords = NatsUser::ALL.map(|_| uuid::Uuid::new_v4().simple().to_string());
    let launch = Launch {
        conf: crate::nats::repo_file("nats-edge.conf"),
        args: vec!["-n".to_owned(), name.to_owned()],
        envs: vec![
            ("VERSUS_NATS_DOMAIN".to_owned(), name.to_owned()),
            (
                "VERSUS_NATS_HUB_LEAF_URLS".to_owned(),
                crate::hub::leaf_urls(&leaf_user, leaf_password, &[link.port]),
            ),
        ],
        _conf_dir: None,
    };
    let mut last_error = String::new();
    for _ in 0..5 {
        let (port, monitor_port) = (free_port(), free_port());
        if port == monitor_port {
            continue;
        }
        match Nats::start_member(port, monitor_port, passwords.clone(), launch.clone()).await {
            Ok(nats) => {
                wait_leafs(&nats, true).await;
                return (nats, link, (leaf_user, leaf_password.to_owned()));
            }
            Err(e) => last_error = e,
        }
    }
    panic!("the nats-server of {name} did not start: {last_error}");
}

/// Waits until the server's `/leafz` shows a leaf connection (`joined`) or none.
async fn wait_leafs(nats: &Nats, joined: bool) {
    let http = crate::http_client();
    let url = format!("http://127.0.0.1:{}/leafz", nats.monitor_port);
    let deadline = tokio::time::Instant::now() + LINK_TIMEOUT;
    loop {
        let leafs = match http.get(&url).send().await {
            Ok(response) => response
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| v["leafnodes"].as_u64()),
            Err(_) => None,
        };
        if leafs.is_some_and(|n| (n > 0) == joined) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge on port {} did not {} the hub within {LINK_TIMEOUT:?}; log:\n{}",
            nats.port,
            if joined { "join" } else { "leave" },
            nats.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy on loopback in front of the hub's leaf-node ports: each connection goes to the
/// first of them that accepts, starting from the next one in turn. [`LinkProxy::cut`] closes
/// every connection and refuses new ones until [`LinkProxy::restore`].
pub struct LinkProxy {
    pub port: u16,
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    async fn start(targets: Vec<u16>) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the link proxy");
        let port = listener.local_addr().expect("the proxy's address").port();
        let (open, _) = watch::channel(true);
        let gate = open.clone();
        let next = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !*gate.borrow() {
                    continue;
                }
                let closed = gate.subscribe();
                let start = next.fetch_add(1, Ordering::Relaxed);
                let targets = targets.clone();
                tokio::spawn(forward(inbound, targets, start, closed));
            }
        });
        LinkProxy { port, open, task }
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards `inbound` to the first of `targets` (from `start` on, in turn) that accepts,
/// until either side closes or the proxy is cut.
async fn forward(
    mut inbound: TcpStream,
    targets: Vec<u16>,
    start: usize,
    mut open: watch::Receiver<bool>,
) {
    for i in 0..targets.len() {
        let port = targets[(start + i) % targets.len()];
        let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", port)).await else {
            continue;
        };
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
            _ = open.wait_for(|open| !open) => {}
        }
        return;
    }
}
