//! What one connection may hold of a replica, before and beside any request's own limits:
//!
//! - [`Conns`]: how many connections one client holds at once
//!   (`VERSUS_CLIENT_MAX_CONNECTIONS`), counted when a connection is accepted. Nothing of a
//!   request has been read then, so the client is the peer's address (an IPv6 peer's /64, and
//!   its /48 may hold 16 times as many), never an `X-Forwarded-For`: behind a proxy every
//!   connection is the proxy's.
//! - [`Watched`]: the socket of a connection, whose writes may wait on a client that reads
//!   nothing for `VERSUS_SLOW_CLIENT_SECS` at most; then the connection is reset (and an event
//!   stream it carried resumes elsewhere with `Last-Event-ID`).
//! - [`TimedBody`]: a request body that must arrive within `VERSUS_BODY_TIMEOUT_SECS`.
//! - [`raise_open_files`]: how many connections the process itself can hold: each is an open
//!   file, and the soft limit most systems start a process with (1,024) would cap a replica at
//!   about a thousand streams whatever `VERSUS_MAX_CONNECTIONS` says.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, Ipv6Addr},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Sleep,
};

/// Files a replica keeps for what is not a client's connection: its listeners, NATS, Postgres
/// (the admin routes), the object store, its logs and the runtime's own.
const RESERVED_FILES: u64 = 256;

/// The open-file limit as the process started, and as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    pub before: u64,
    pub now: u64,
}

impl OpenFiles {
    /// How many client connections the limit leaves room for.
    pub fn connections(self) -> usize {
        usize::try_from(self.now.saturating_sub(RESERVED_FILES)).unwrap_or(usize::MAX)
    }
}

/// Raises this process's soft limit of open files to its hard limit (a kernel that refuses
/// leaves it as it was). None where the limit cannot be read.
pub fn raise_open_files() -> Option<OpenFiles> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let now = if hard > soft && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    Some(OpenFiles { before: soft, now })
}

/// The connections each client holds open, and how many one may (0: no cap).
pub struct Conns {
    open: Mutex<HashMap<Block, usize>>,
    max: usize,
}

/// An address block that connections count for: an address and its prefix length.
type Block = (IpAddr, u8);

/// How many times a client's cap an IPv6 /48 may hold (as many /64s' worth): a holder of a
/// /48 (or a /56) cannot take a replica's every connection by spreading them over its /64s.
const PER_48: usize = 16;

/// One open connection of a client (when they are counted); dropping it (the connection
/// closed) frees it.
pub struct ConnSlot {
    held: Option<(Blocks, Arc<Conns>)>,
}

/// The blocks one connection counts for: an IPv4 address, or an IPv6 /64 and its /48.
#[derive(Clone, Copy)]
struct Blocks {
    blocks: [Block; 2],
    len: usize,
}

impl Blocks {
    fn of(peer: IpAddr) -> Blocks {
        let prefix = |v6: Ipv6Addr, bits: u8| {
            let mask = !(u128::MAX >> bits);
            (IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)), bits)
        };
        match peer.to_canonical() {
            IpAddr::V6(v6) => Blocks {
                blocks: [prefix(v6, 64), prefix(v6, 48)],
                len: 2,
            },
            v4 => Blocks {
                blocks: [(v4, 32); 2],
                len: 1,
            },
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Block> {
        self.blocks.iter().take(self.len)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let Some((blocks, conns)) = &self.held else {
            return;
        };
        let mut open = conns.open.lock().unwrap_or_else(PoisonError::into_inner);
        for block in blocks.iter() {
            if let Some(held) = open.get_mut(block) {
                *held -= 1;
                if *held == 0 {
                    open.remove(block);
                }
            }
        }
    }
}

impl Conns {
    /// At most `max` connections per client, and `PER_48` times that per IPv6 /48 (0: no cap,
    /// and nothing is counted).
    pub fn new(max: usize) -> Arc<Conns> {
        Arc::new(Conns {
            open: Mutex::default(),
            max,
        })
    }

    /// A slot for one more connection from `peer`, held while it is open; None when the
    /// client (or its /48) holds as many as it may: the connection is to be closed at once.
    pub fn open(self: &Arc<Self>, peer: IpAddr) -> Option<ConnSlot> {
        if self.max == 0 {
            return Some(ConnSlot { held: None });
        }
        let blocks = Blocks::of(peer);
        let cap = |(_, bits): &Block| match bits {
            48 => self.max.saturating_mul(PER_48),
            _ => self.max,
        };
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if blocks
            .iter()
            .any(|block| open.get(block).is_some_and(|held| *held >= cap(block)))
        {
            return None;
        }
        for block in blocks.iter() {
            *open.entry(*block).or_default() += 1;
        }
        Some(ConnSlot {
            held: Some((blocks, self.clone())),
        })
    }
}

/// A connection's socket whose writes wait at most `limit` for the client to read: a write
/// (or flush, or shutdown) still pending after that fails, and the connection is reset, so
/// that what it holds (its buffers, its kernel's send queue, an event stream's slot) is freed.
/// The time counts from when a write first had to wait, and starts again after each write that
/// went through; a socket that drains, however slowly, is never cut.
pub struct Watched {
    io: TcpStream,
    limit: Option<Duration>,
    /// Since when a write has been waiting, when one is.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl Watched {
    /// `io`, whose writes wait at most `limit` (None: as long as it takes).
    pub fn new(io: TcpStream, limit: Option<Duration>) -> Watched {
        Watched {
            io,
            limit,
            stalled: None,
        }
    }

    /// `poll`, a write's outcome, unless the write has waited too long.
    fn guard<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let Some(limit) = self.limit else {
            return Poll::Pending;
        };
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if stalled.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.stalled = None;
        metrics::counter!("versus_slow_clients_total").increment(1);
        // A reset, not a close: a close would leave what the send queue holds to the kernel,
        // which keeps offering it to a client that reads nothing. A zero linger never blocks.
        #[allow(deprecated)]
        if let Err(error) = self.io.set_linger(Some(Duration::ZERO)) {
            tracing::debug!(%error, "cannot set SO_LINGER on a slow client's connection");
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read nothing for {} s", limit.as_secs()),
        )))
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.guard(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.guard(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.guard(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_shutdown(cx);
        this.guard(cx, poll)
    }
}

/// A request body that must arrive whole within `limit` of when its handler starts reading
/// it (right after the head): a slower one fails, so the handler answers 400 `invalid_body`
/// and the connection closes. Nothing is allocated for a request that has no body, nor when
/// there is no limit.
pub struct TimedBody {
    inner: Incoming,
    limit: Option<Duration>,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl TimedBody {
    pub fn new(inner: Incoming, limit: Option<Duration>) -> TimedBody {
        TimedBody {
            inner,
            limit,
            deadline: None,
        }
    }
}

/// A body that did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0} s")]
pub struct BodyTimeout(u64);

impl Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(limit) = this.limit else {
            return Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into);
        };
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        metrics::counter!("versus_body_timeouts_total").increment(1);
        Poll::Ready(Some(Err(BodyTimeout(limit.as_secs()).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_client_holds_at_most_its_connections_and_a_closed_one_frees_its_slot() {
        let conns = Conns::new(2);
        let first = conns.open(ip("198.51.100.1")).unwrap();
        let second = conns.open(ip("198.51.100.1")).unwrap();
        assert!(conns.open(ip("198.51.100.1")).is_none());
        // Another client is not affected; an IPv4-mapped peer is its IPv4 address.
        assert!(conns.open(ip("198.51.100.2")).is_some());
        assert!(conns.open(ip("::ffff:198.51.100.1")).is_none());
        drop(first);
        assert!(conns.open(ip("198.51.100.1")).is_some());
        // An IPv6 client counts by its /64.
        let a = conns.open(ip("2001:db8:1:2::1")).unwrap();
        let b = conns.open(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert!(conns.open(ip("2001:db8:1:2::3")).is_none());
        assert!(conns.open(ip("2001:db8:1:3::1")).is_some());
        // A /48 holds at most 16 clients' worth, however many /64s it spreads them over.
        let spread: Vec<_> = (0..16u16)
            .filter_map(|i| conns.open(ip(&format!("2001:db8:9:{i:x}::1"))))
            .chain((0..16u16).filter_map(|i| conns.open(ip(&format!("2001:db8:9:{i:x}::2")))))
            .collect();
        assert_eq!(spread.len(), 32);
        assert!(conns.open(ip("2001:db8:9:ff::1")).is_none());
        assert!(conns.open(ip("2001:db8:a::1")).is_some());
        drop(spread);
        // Every slot given back: nothing is remembered of the clients.
        drop((a, b, second));
        assert!(conns.open.lock().unwrap().is_empty());
    }

    #[test]
    fn no_cap_counts_nothing() {
        let conns = Conns::new(0);
        let held: Vec<_> = (0..100)
            .map(|_| conns.open(ip("198.51.100.1")).unwrap())
            .collect();
        assert_eq!(held.len(), 100);
        assert!(conns.open.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_write_the_client_never_reads_fails_after_the_limit_and_one_it_reads_does_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limit = Duration::from_millis(300);

        // A client that reads nothing: the socket fills, then the write fails.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let mut watched = Watched::new(stream, Some(limit));
        let began = tokio::time::Instant::now();
        let chunk = vec![b'x'; 64 * 1024];
        let error = loop {
            if let Err(error) = watched.write_all(&chunk).await {
                break error;
            }
            assert!(began.elapsed() < Duration::from_secs(10), "never timed out");
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");

        // A client that reads, if slowly, is never cut.
        let mut reader = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let mut watched = Watched::new(stream, Some(limit));
        let write = async {
            for _ in 0..16 {
                watched.write_all(&chunk).await.unwrap();
            }
            watched.shutdown().await.unwrap();
        };
        let read = async {
            let mut sink = vec![0; 64 * 1024];
            let mut total = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                match reader.read(&mut sink).await.unwrap() {
                    0 => break total,
                    n => total += n,
                }
            }
        };
        let ((), total) = tokio::join!(write, read);
        assert_eq!(total, 16 * 64 * 1024);
    }
}
