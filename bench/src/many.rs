//! Tens of thousands of SSE streams from one process: each its own TCP connection with
//! nothing more than hyper's HTTP/1.1 client on it (no pool, no redirects, no timeouts), so
//! that the load generator's memory and CPU stay small beside the server's; spread over
//! loopback source addresses (127.B.0.1, 127.B.0.2, …: Linux routes all of 127/8 to
//! loopback), since one source address has about 28,000 ephemeral ports towards one server
//! port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, bail};
use bytes::Bytes;
use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::Stream;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;

/// Connections per source address: well under the ephemeral range of one.
const PER_SOURCE: usize = 10_000;

/// Loopback source addresses, handed out in turn.
pub struct Sources {
    addrs: Vec<IpAddr>,
    next: AtomicUsize,
}

impl Sources {
    /// Enough loopback addresses for `connections`, `PER_SOURCE` each, in a block of 127/8
    /// picked at random (127.B.0.1, 127.B.0.2, …): runs one after the other, in this process or
    /// another, do not find the ephemeral ports taken by an earlier run's closed connections
    /// (in TIME_WAIT for a minute on the side that closed first, this one).
    pub fn fresh(connections: usize) -> Sources {
        let block = 2 + (uuid::Uuid::new_v4().as_u128() % 253) as u8;
        let n = connections.div_ceil(PER_SOURCE).clamp(1, 254);
        let addrs = (1..=n)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, block, 0, i as u8)))
            .collect();
        Sources {
            addrs,
            next: AtomicUsize::new(0),
        }
    }

    fn pick(&self) -> IpAddr {
        self.addrs[self.next.fetch_add(1, Ordering::Relaxed) % self.addrs.len()]
    }
}

pub type Events = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<hyper::Error>>> + Send>>;

/// Where a URL's requests go: its address, its `Host` and its path with the query.
#[derive(Clone)]
pub struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

impl Target {
    pub fn of(url: &reqwest::Url) -> anyhow::Result<Target> {
        let addr = *url
            .socket_addrs(|| None)?
            .first()
            .with_context(|| format!("{url} has no address"))?;
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        let path = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        };
        Ok(Target { addr, host, path })
    }
}

/// Opens one event stream on a connection of its own from the next source address; fails
/// unless the answer is 200. Dropping the stream closes the connection.
pub async fn open(target: &Target, sources: &Sources) -> anyhow::Result<Events> {
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::new(sources.pick(), 0))
        .context("binding a source address")?;
    let stream = socket.connect(target.addr).await.context("connecting")?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection's own task ends when the response's body is dropped.
    tokio::spawn(connection);
    let request = Request::get(&target.path)
        .header(header::HOST, &target.host)
        .header(header::ACCEPT, "text/event-stream")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    if !status.is_success() {
        let body = response.into_body().collect().await?.to_bytes();
        bail!("status {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(Box::pin(
        response.into_body().into_data_stream().eventsource(),
    ))
}
