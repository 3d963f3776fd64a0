//! Looking at what runs: whether a port accepts connections, a plain HTTP GET (status and
//! body), and a line in a program's output.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub async fn port_in_use(port: u16) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(("127.0.0.1", port))).await,
        Ok(Ok(_))
    )
}

/// A TCP port on 127.0.0.1 that is free right now (another program may take it before it is
/// bound: callers that can, try again).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A TCP port free on every address, as a listener on 0.0.0.0 needs it (a hub's leaf-node
/// port): one free on 127.0.0.1 may still be held on another loopback address (a client bound
/// to 127.0.0.151, say, in TIME_WAIT, as tests of many clients leave them).
pub fn free_wildcard_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", 0)).context("bind 0.0.0.0:0")?;
    Ok(listener.local_addr()?.port())
}

/// GET `url` (plain `http://HOST:PORT/PATH`): its status and body, or None if the connection
/// fails.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (hostport, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let exchange = async {
        let mut stream = TcpStream::connect(hostport).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        Some(response)
    };
    let response = tokio::time::timeout(PROBE_TIMEOUT, exchange).await.ok()??;
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Some((status, body.to_owned()))
}

/// The first line of the file `path` that starts with `prefix`, if it holds one yet.
pub fn line_starting(path: &Path, prefix: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|line| line.starts_with(prefix))
        .map(str::to_owned)
}

/// Whether the file `path` holds `text`.
pub fn file_holds(path: &Path, text: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains(text))
}

/// The last `n` lines of the file `path`, for a message about a program that failed.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
