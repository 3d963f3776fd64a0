//! A fixed-rate, open-loop HTTP/1.1 load generator (what wrk2 does; wrk2 is not in Debian).
//!
//! `connections` keep-alive connections share the schedule: request `i` is due at
//! `start + i / rate` on connection `i % connections`. A request that is due while its
//! connection is still busy is sent as soon as the connection frees, and its latency counts
//! from when it was due, so a stall shows in the percentiles rather than lowering the rate
//! (no coordinated omission). A request sent on time counts from when it was sent: the
//! timer wakes up to a millisecond late, and that is the load generator's delay, not the
//! server's.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, Uri, header};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::stats::{Summary, micros_histogram};

/// The first second is not recorded: connections and caches settle.
const WARM_UP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateResult {
    pub url: String,
    pub target_rps: f64,
    pub achieved_rps: f64,
    pub latency: Summary,
    pub errors: u64,
}

/// `versus-bench rate`: one fixed-rate run, its result printed as JSON.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub url: String,
    /// Requests per second.
    #[arg(long)]
    pub rps: f64,
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
}

pub async fn run_cli(args: Args) -> anyhow::Result<()> {
    let result = run(
        &args.url,
        args.rps,
        Duration::from_secs(args.secs),
        args.connections,
    )
    .await?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

/// Sends GET `url` at `rate` requests per second for `duration` (plus a second of warm-up).
pub async fn run(
    url: &str,
    rate: f64,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<RateResult> {
    // On the multi-threaded runtime: a single-threaded one measured a higher p50 and far
    // higher p99 on 2 cores, since requests due on the same timer tick queue behind each other.
    let (histogram, errors) = generate(url, rate, duration, connections).await?;
    let result = RateResult {
        url: url.to_owned(),
        target_rps: rate,
        achieved_rps: histogram.len() as f64 / duration.as_secs_f64(),
        latency: Summary::of_histogram(&histogram),
        errors,
    };
    eprintln!(
        "rate {url}: {:.0}/{:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms, {} errors",
        result.achieved_rps,
        rate,
        result.latency.p50_ms,
        result.latency.p99_ms,
        result.latency.max_ms,
        errors
    );
    Ok(result)
}

async fn generate(
    url: &str,
    rate: f64,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let uri: Uri = url.parse()?;
    let authority = uri.authority().context("URL without host")?.to_string();
    let path = uri
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    let start = Instant::now() + Duration::from_millis(100);
    let record_from = start + WARM_UP;
    let end = record_from + duration;
    let period = Duration::from_secs_f64(connections as f64 / rate);
    let mut tasks = Vec::new();
    for k in 0..connections {
        let first = start + Duration::from_secs_f64(k as f64 / rate);
        let connection = Connection::open(&authority, &path).await?;
        tasks.push(tokio::spawn(connection.drive(
            first,
            period,
            record_from,
            end,
        )));
    }
    let mut histogram = micros_histogram()?;
    let mut errors = 0;
    for task in tasks {
        let (h, e) = task.await??;
        histogram.add(h)?;
        errors += e;
    }
    Ok((histogram, errors))
}

struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    authority: String,
    path: String,
}

impl Connection {
    async fn open(authority: &str, path: &str) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(authority).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("load connection ended: {e}");
            }
        });
        Ok(Connection {
            sender,
            authority: authority.to_owned(),
            path: path.to_owned(),
        })
    }

    /// Runs this connection's share of the schedule; returns its histogram and error count.
    async fn drive(
        mut self,
        mut due: Instant,
        period: Duration,
        record_from: Instant,
        end: Instant,
    ) -> anyhow::Result<(Histogram<u64>, u64)> {
        let mut histogram = micros_histogram()?;
        let mut errors = 0;
        while due < end {
            let sent = if Instant::now() < due {
                tokio::time::sleep_until(due.into()).await;
                Instant::now()
            } else {
                due
            };
            let ok = self.get().await;
            let latency = sent.elapsed();
            if due >= record_from {
                match ok {
                    Ok(()) => histogram.saturating_record(latency.as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            if let Err(e) = ok
                && self.sender.is_closed()
            {
                bail!("connection closed: {e:#}");
            }
            due += period;
        }
        Ok((histogram, errors))
    }

    async fn get(&mut self) -> anyhow::Result<()> {
        self.sender.ready().await?;
        let request = Request::get(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
            .body(Empty::new())?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        if !status.is_success() {
            bail!("status {status}");
        }
        Ok(())
    }
}
