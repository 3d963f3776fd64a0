//! `versus-bench delay-proxy`: TCP forwarding that puts distance between two programs on one
//! machine (P11 puts it on the edges' leaf links to the hub).
//!
//! For each `--pair LISTEN=TARGET` it accepts connections on LISTEN and opens one to TARGET
//! for each. Every byte is held for the one-way delay in each direction, so a round trip
//! through the proxy gains twice the delay. Per direction a reader task stamps each read with
//! the time it arrived and queues it; a writer task sleeps until that time plus the delay and
//! writes it: order is kept, and throughput is that of the link (the queue holds what is in
//! flight, the delay's worth of traffic), as on a long fat pipe rather than a slow one.
//! `TCP_NODELAY` is set on both sides, so that small messages are not held back further.
//!
//! A side that half-closes (EOF) has its half-close passed on, after the delay, to the other
//! side; an error on either side (a reset, say) closes both at once.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// `LISTEN=TARGET`, both `host:port`: connections to LISTEN are forwarded to TARGET.
    #[arg(long = "pair", required = true)]
    pub pairs: Vec<String>,
    /// The delay added to every byte in each direction, in milliseconds.
    #[arg(long, default_value_t = 40)]
    pub delay_ms: u64,
}

/// Listens on every pair's address, prints one line once all of them listen, and forwards
/// until killed.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let delay = Duration::from_millis(args.delay_ms);
    let mut listening = Vec::new();
    let mut serving = Vec::new();
    for pair in &args.pairs {
        let Some((listen, target)) = pair.split_once('=') else {
            bail!("--pair takes LISTEN=TARGET, not '{pair}'");
        };
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        listening.push(format!("{}={target}", listener.local_addr()?));
        serving.push(tokio::spawn(serve(listener, target.to_owned(), delay)));
    }
    println!(
        "delay-proxy listening ({} ms each way): {}",
        args.delay_ms,
        listening.join(" ")
    );
    for task in serving {
        task.await??;
    }
    Ok(())
}

/// Accepts connections on `listener` and forwards each to `target` with `delay` each way.
pub async fn serve(listener: TcpListener, target: String, delay: Duration) -> anyhow::Result<()> {
    loop {
        let (inbound, peer) = listener.accept().await?;
        let target = target.clone();
        tokio::spawn(async move {
            if let Err(e) = forward(inbound, &target, delay).await {
                eprintln!("delay-proxy {peer} → {target}: {e:#}");
            }
        });
    }
}

/// One connection: both directions, until both ended or either failed.
async fn forward(inbound: TcpStream, target: &str, delay: Duration) -> anyhow::Result<()> {
    let outbound = TcpStream::connect(target)
        .await
        .with_context(|| format!("connecting to {target}"))?;
    inbound.set_nodelay(true)?;
    outbound.set_nodelay(true)?;
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let mut there = tokio::spawn(direction(in_read, out_write, delay));
    let mut back = tokio::spawn(direction(out_read, in_write, delay));
    // A direction that ends cleanly (EOF passed on) leaves the other running; one that fails
    // takes the other with it: dropping the halves closes both sockets.
    let (first, other) = tokio::select! {
        r = &mut there => (r, back),
        r = &mut back => (r, there),
    };
    match first {
        Ok(Ok(())) => {
            let result = other.await;
            result?
        }
        Ok(Err(e)) => {
            other.abort();
            Err(e)
        }
        Err(e) => {
            other.abort();
            Err(e.into())
        }
    }
}

/// Copies `from` to `to`, each read written `delay` after it arrived; passes EOF on as a
/// half-close once the data before it is written.
async fn direction(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    delay: Duration,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                return Ok(());
            }
        }
    });
    // The writer drains what was read before an EOF or an error, then stops.
    let written = async {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at + delay).await;
            to.write_all(&bytes).await?;
        }
        Ok::<_, std::io::Error>(())
    }
    .await;
    if let Err(e) = written {
        reader.abort();
        return Err(anyhow::Error::new(e).context("writing"));
    }
    reader.await?.context("reading")?;
    to.shutdown().await.context("passing the half-close on")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free port: writes back what it reads, half-closes on EOF.
    async fn echo() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    async fn proxy(target: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, target.to_string(), delay));
        addr
    }

    #[tokio::test]
    async fn a_round_trip_gains_twice_the_delay_and_every_byte_arrives_in_order() {
        let delay = Duration::from_millis(40);
        let addr = proxy(echo().await, delay).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.set_nodelay(true).unwrap();

        // One small message: its round trip.
        let start = std::time::Instant::now();
        client.write_all(b"ping").await.unwrap();
        let mut pong = [0; 4];
        client.read_exact(&mut pong).await.unwrap();
        let round_trip = start.elapsed();
        assert_eq!(&pong, b"ping");
        assert!(round_trip >= 2 * delay, "round trip {round_trip:?}");
        assert!(
            round_trip < 2 * delay + Duration::from_millis(200),
            "{round_trip:?}"
        );

        // Many writes, some far larger than one read, spread over more than the delay: they
        // come back whole and in order, and no later than the delay allows (the delay is not
        // paid once per write, which would be a slow link rather than a long one).
        let sent: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = client.into_split();
        let to_send = sent.clone();
        let start = std::time::Instant::now();
        let writer = tokio::spawn(async move {
            for chunk in to_send.chunks(100_000) {
                w.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        let took = start.elapsed();
        assert!(got == sent, "{} bytes back of {}", got.len(), sent.len());
        assert!(took >= 2 * delay, "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[tokio::test]
    async fn a_target_that_refuses_closes_the_client() {
        // A port with nothing behind it: bind, note, drop.
        let gone = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let addr = proxy(gone, Duration::from_millis(10)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the proxy closes the connection");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
}
