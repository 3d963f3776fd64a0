//! Safe on the open internet: what one client's connections may hold of a replica. A client
//! holds at most `VERSUS_CLIENT_MAX_CONNECTIONS` connections, and one that stops reading is
//! cut off after `VERSUS_SLOW_CLIENT_SECS`, free to resume with `Last-Event-ID`. A replica
//! raises its own open-file limit at start, so that it holds more streams than a host's usual
//! default of 1,024 files allows.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use futures::StreamExt;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use versus_testkit::{System, sse};

use crate::{
    fight, http, json_of, metric, metrics_of, quick, run, run_within, shape, stream_url, text_of,
};

/// The API's address.
fn api_addr(sys: &System) -> SocketAddr {
    sys.api_url()
        .trim_start_matches("http://")
        .parse()
        .expect("the API's address")
}

/// A connection to `api` from the loopback address `from` (127.0.0.2 is another client than
/// 127.0.0.1, whose every other test request comes from), with `socket` set up first.
async fn connect_from(from: &str, api: SocketAddr, socket: impl FnOnce(&TcpSocket)) -> TcpStream {
    let tcp = TcpSocket::new_v4().unwrap();
    socket(&tcp);
    tcp.bind(format!("{from}:0").parse().unwrap()).unwrap();
    tcp.connect(api).await.unwrap()
}

/// `GET path` on `stream`, kept alive: the head of the answer (and what came with it).
async fn get_on(stream: &mut TcpStream, api: SocketAddr, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nhost: {api}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = [0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered within 5 s")
        .unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

/// Whether the API closes `stream` (end of file or a reset) within `limit` of a request,
/// without answering it.
async fn closed_unanswered(stream: &mut TcpStream, api: SocketAddr, limit: Duration) -> bool {
    let request = format!("GET /healthz HTTP/1.1\r\nhost: {api}\r\n\r\n");
    // The write itself may find the connection reset already.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    match tokio::time::timeout(limit, stream.read_to_end(&mut answer)).await {
        Ok(_) => answer.is_empty(),
        Err(_still_open) => false,
    }
}

#[test]
fn a_client_holding_its_connections_cannot_open_more_while_another_client_is_served_at_once() {
    run(async {
        let sys = quick()
            .workers(1)
            .api_env("VERSUS_CLIENT_MAX_CONNECTIONS", "8")
            // Idle keep-alive connections stay open for the whole test.
            .api_env("VERSUS_HEADER_TIMEOUT_SECS", "60")
            .start()
            .await;
        let api = api_addr(&sys);
        let events = fight(&sys, "Tortoise", "Hare").await;
        assert_eq!(events.last().unwrap().event, "done", "{events:?}");

        // One client (127.0.0.2) opens its 8 connections, each served and kept alive.
        let mut held = Vec::new();
        for _ in 0..8 {
            let mut stream = connect_from("127.0.0.2", api, |_| {}).await;
            let answer = get_on(&mut stream, api, "/healthz").await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            held.push(stream);
        }
        // Its ninth is closed at once, unanswered; so is every further one.
        for _ in 0..3 {
            let mut ninth = connect_from("127.0.0.2", api, |_| {}).await;
            assert!(
                closed_unanswered(&mut ninth, api, Duration::from_secs(1)).await,
                "a connection past the client's cap was served"
            );
        }
        let metrics = metrics_of(sys.api_url()).await;
        let refused = metric(&metrics, "versus_connections_refused_total", "client_cap");
        assert!(refused >= 3.0, "refused {refused}");

        // Meanwhile another client's hit is answered at once, on a new connection.
        let began = Instant::now();
        let hit = http()
            .get(stream_url(&sys, "Tortoise", "Hare"))
            .send()
            .await
            .unwrap();
        assert_eq!(hit.status(), 200);
        let body = hit.text().await.unwrap();
        assert!(body.contains("\"cached\":true"), "{body}");
        assert!(
            began.elapsed() < Duration::from_secs(1),
            "the hit took {:?}",
            began.elapsed()
        );

        // The held connections still serve their client, and one closed frees its slot.
        let answer = get_on(&mut held[0], api, "/healthz").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        drop(held.pop());
        versus_testkit::eventually(
            "a closed connection frees its slot",
            Duration::from_secs(5),
            || async {
                let mut stream = connect_from("127.0.0.2", api, |_| {}).await;
                let request = format!("GET /healthz HTTP/1.1\r\nhost: {api}\r\n\r\n");
                if stream.write_all(request.as_bytes()).await.is_err() {
                    return false;
                }
                let mut answer = [0; 64];
                matches!(stream.read(&mut answer).await, Ok(n) if answer[..n].starts_with(b"HTTP/1.1 200"))
            },
        )
        .await;
    });
}

/// The complete events in `bytes` (an SSE response's body, perhaps cut mid-event):
/// (name, data, id) each.
fn events_in(bytes: &[u8]) -> Vec<(String, String, String)> {
    let text = String::from_utf8_lossy(bytes);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let mut events = Vec::new();
    // The last block is complete only if the body ends with its blank line.
    let mut blocks: Vec<&str> = body.split("\n\n").collect();
    blocks.pop();
    for block in blocks {
        let (mut name, mut data, mut id) = (String::new(), String::new(), String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event: ") {
                name = v.to_owned();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = v.to_owned();
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = v.to_owned();
            }
        }
        if !name.is_empty() {
            events.push((name, data, id));
        }
    }
    events
}

#[test]
fn a_client_that_stops_reading_a_stream_is_cut_off_and_resumes_exactly_with_last_event_id() {
    run(async {
        const SLOW_SECS: u64 = 2;
        // A long answer (60,000 tokens, some 400 KB: a fast upstream's tokens go out a few
        // to an event), written in a few seconds: far more than the socket buffers of a client
        // that reads nothing hold (some 200 KB here, with its small ones below).
        let sys = quick()
            .workers(1)
            .env("VERSUS_MAX_ANSWER_TOKENS", "60000")
            .sim_env("VERSUS_SIM_ANSWER_TOKENS", "60000")
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "20000")
            .api_env("VERSUS_SLOW_CLIENT_SECS", SLOW_SECS.to_string())
            .start()
            .await;
        let api = api_addr(&sys);
        // Small socket buffers on the client's side (a small receive window, and a small
        // segment size, which keeps the API's send buffer small too), so that a few hundred
        // KB fill them.
        let mut stream = connect_from("127.0.0.1", api, |tcp| {
            tcp.set_recv_buffer_size(4096).unwrap();
            socket2::SockRef::from(tcp).set_tcp_mss(1000).unwrap();
        })
        .await;
        let url = reqwest::Url::parse(&stream_url(&sys, "Glacier", "Snail")).unwrap();
        let path = format!("{}?{}", url.path(), url.query().unwrap());
        let request =
            format!("GET {path} HTTP/1.1\r\nhost: {api}\r\naccept: text/event-stream\r\n\r\n");
        let asked = Instant::now();
        stream.write_all(request.as_bytes()).await.unwrap();
        // The client reads the head and the first event, then nothing more.
        let mut received = Vec::new();
        while events_in(&received).is_empty() {
            let mut piece = [0; 1024];
            let n = stream.read(&mut piece).await.unwrap();
            assert!(n > 0, "closed before meta");
            received.extend_from_slice(&piece[..n]);
        }
        let head = String::from_utf8_lossy(&received).into_owned();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let (name, meta, _) = events_in(&received).remove(0);
        assert_eq!(name, "meta");
        let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
        let key = meta["key"].as_str().unwrap().to_owned();

        // The answer completes (the stream goes on without the client), and the API gives up
        // on the client within SLOW_SECS of its socket filling up, which is before the answer
        // completes at the latest.
        let (mut stored_at, mut cut_at) = (None, None);
        let began = Instant::now();
        while stored_at.is_none() || cut_at.is_none() {
            assert!(
                began.elapsed() < Duration::from_secs(60),
                "stored after {stored_at:?}, cut after {cut_at:?}"
            );
            if stored_at.is_none() {
                let response = http()
                    .get(format!("{}/v1/fights/{key}", sys.api_url()))
                    .send()
                    .await
                    .unwrap();
                if response.status() == 200 {
                    stored_at = Some(asked.elapsed());
                }
            }
            if cut_at.is_none() {
                let metrics = metrics_of(sys.api_url()).await;
                if metric(&metrics, "versus_slow_clients_total", "") >= 1.0 {
                    cut_at = Some(asked.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (stored_at, cut_at) = (stored_at.unwrap(), cut_at.unwrap());
        let slow = Duration::from_secs(SLOW_SECS);
        assert!(
            cut_at >= slow && cut_at <= stored_at + slow + Duration::from_millis(1500),
            "cut {cut_at:?} after the request; the answer was stored after {stored_at:?}"
        );

        // What the client then reads is what its buffers held, and the connection's end.
        let rest = async {
            let mut piece = [0; 16 * 1024];
            loop {
                match stream.read(&mut piece).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received.extend_from_slice(&piece[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), rest)
            .await
            .expect("the connection was ended");
        let events = events_in(&received);
        assert!(
            events.iter().all(|(name, _, _)| name != "done"),
            "the whole answer reached a client that read nothing"
        );
        let chunks: Vec<_> = events
            .iter()
            .filter(|(name, _, _)| name == "chunk")
            .collect();
        assert!(!chunks.is_empty(), "no chunk before the cut");
        let mut held = String::new();
        for (_, data, _) in &chunks {
            let data: serde_json::Value = serde_json::from_str(data).unwrap();
            held.push_str(data["delta"].as_str().unwrap());
        }
        let last_id = chunks.last().unwrap().2.clone();

        // It resumes with the last id it holds, and gets exactly the rest.
        let resumed = sse::open(&stream_url(&sys, "Glacier", "Snail"), Some(&last_id))
            .await
            .collect_all()
            .await;
        assert_eq!(shape(&resumed), ["meta", "chunk*", "done"], "{last_id}");
        let stored: serde_json::Value = http()
            .get(format!("{}/v1/fights/{key}", sys.api_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let whole = stored["text"].as_str().unwrap();
        assert!(whole.len() > held.len(), "the client held it all already");
        assert_eq!(format!("{held}{}", text_of(&resumed)), whole);
    });
}

#[test]
fn a_body_sent_too_slowly_is_refused_and_its_connection_closed() {
    run(async {
        let sys = System::builder()
            .workers(0)
            .api_env("VERSUS_BODY_TIMEOUT_SECS", "1")
            .start()
            .await;
        let api = api_addr(&sys);
        let mut stream = connect_from("127.0.0.1", api, |_| {}).await;
        let body = r#"{"a": "Sloth", "b": "Snail"}"#;
        let head = format!(
            "POST /v1/fights HTTP/1.1\r\nhost: {api}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        // The head, and a third of the body; the rest never comes.
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body.as_bytes()[..10]).await.unwrap();
        let began = Instant::now();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            let mut piece = [0; 4096];
            loop {
                match stream.read(&mut piece).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&piece[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the connection is still open");
        let took = began.elapsed();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("invalid_body"), "{answer}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "answered after {took:?} (timeout 1 s)"
        );
        let metrics = metrics_of(sys.api_url()).await;
        assert_eq!(metric(&metrics, "versus_body_timeouts_total", ""), 1.0);
    });
}

#[test]
fn a_post_waiting_for_a_whole_answer_takes_one_of_its_clients_stream_slots() {
    run(async {
        // No worker: a miss waits until the stream timeout.
        let sys = quick()
            .workers(0)
            .api_env("VERSUS_CLIENT_MAX_STREAMS", "1")
            .api_env("VERSUS_STREAM_TIMEOUT_SECS", "3")
            .start()
            .await;
        let url = format!("{}/v1/fights", sys.api_url());
        let waiting = tokio::spawn({
            let url = url.clone();
            async move {
                http()
                    .post(url)
                    .json(&serde_json::json!({"a": "Waiting", "b": "Giant"}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            }
        });
        // Probing before the POST holds its slot would take the slot itself.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let other_stream = stream_url(&sys, "Another", "Giant");
        versus_testkit::eventually(
            "the waiting POST holds the client's one slot",
            Duration::from_secs(5),
            || async { http().get(&other_stream).send().await.unwrap().status() == 429 },
        )
        .await;
        let second = http()
            .post(&url)
            .json(&serde_json::json!({"a": "Another", "b": "Giant"}))
            .send()
            .await
            .unwrap();
        assert_eq!(second.status(), 429);

        // The POST times out (503), and its slot is free again.
        assert_eq!(waiting.await.unwrap(), 503);
        let stream = sse::open(&other_stream, None).await;
        drop(stream);
    });
}

/// The usual default soft limit on open files (`ulimit -Sn`), which the API starts with below.
const DEFAULT_OPEN_FILES: u64 = 1_024;
/// Streams held at once below: more than [`DEFAULT_OPEN_FILES`].
const MANY_STREAMS: usize = 1_100;
/// The hard limit the test needs: the API's files for [`MANY_STREAMS`] connections and the 256
/// it keeps for itself, and the test's own sockets with some room.
const NEEDED_HARD_LIMIT: u64 = 1_400;

/// The number after `name=` in a log line.
fn field(line: &str, name: &str) -> u64 {
    let at = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no field {name} in {line:?}"));
    let value: String = line[at + name.len() + 2..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    value
        .parse()
        .unwrap_or_else(|e| panic!("field {name} of {line:?}: {e}"))
}

#[test]
fn one_replica_started_with_the_default_open_file_limit_holds_more_streams_than_it_at_once() {
    run_within(Duration::from_secs(120), async {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert!(
            hard >= NEEDED_HARD_LIMIT,
            "the hard limit on open files is {hard}: this test holds {MANY_STREAMS} streams at \
             once and needs at least {NEEDED_HARD_LIMIT} (raise it: `ulimit -Hn`, or LimitNOFILE \
             of the service that runs the tests)"
        );
        // The first token comes long after every stream is open: each is open from its `meta`
        // to its `done`, so if every `meta` arrived before the first token could, every
        // stream was open at once.
        const TTFT: Duration = Duration::from_secs(8);
        let sys = quick()
            .workers(1)
            .sim_env("VERSUS_SIM_TTFT_MS", TTFT.as_millis().to_string())
            // A lease longer than the wait for the first token: the generation never looks
            // stalled, and no stream asks for it again.
            .env("VERSUS_LEASE_SECS", "30")
            // The kit turns the per-client limits off already (every stream is 127.0.0.1's);
            // the replica's own cap on connections stays its default, 10,000.
            .api_open_files(DEFAULT_OPEN_FILES)
            .start()
            .await;
        // The API found 1,024 open files, raised them and says how many connections it holds.
        let log = sys.api.stderr_tail();
        let line = log
            .lines()
            .find(|line| line.contains("connections at once"))
            .unwrap_or_else(|| panic!("the API did not say how many connections it holds:\n{log}"));
        assert_eq!(
            field(line, "open_files_before"),
            DEFAULT_OPEN_FILES,
            "{line}"
        );
        let open_files = field(line, "open_files");
        assert!(
            open_files > MANY_STREAMS as u64 && open_files <= hard,
            "{line}"
        );
        assert!(field(line, "connections") >= MANY_STREAMS as u64, "{line}");
        // The test's own sockets: its soft limit may be the usual default too (the API got
        // its limit above, not from the test).
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .unwrap_or_else(|e| panic!("raise the test's soft limit on open files to {hard}: {e}"));

        // One fight, asked by MANY_STREAMS streams at once: one miss, the rest join its flight.
        let url = stream_url(&sys, "Lighthouse", "Moth");
        let client = http();
        let began = Instant::now();
        let opened: Vec<_> = futures::stream::iter(0..MANY_STREAMS)
            .map(|_| {
                let (client, url) = (&client, url.as_str());
                let open = async move {
                    let mut stream = sse::open_on(client, url, None, &[]).await;
                    let meta = stream
                        .next()
                        .await
                        .expect("a stream that ended before its meta");
                    assert_eq!(meta.event, "meta", "{meta:?}");
                    (stream, meta.json())
                };
                async move {
                    tokio::time::timeout(Duration::from_secs(10), open)
                        .await
                        .expect("a stream was not answered (with its meta) within 10 s")
                }
            })
            // Opened 200 at a time: all at once would only overflow the listen backlog.
            .buffer_unordered(200)
            .collect()
            .await;
        let all_open = began.elapsed();
        assert_eq!(opened.len(), MANY_STREAMS);
        assert!(
            all_open < TTFT,
            "opening {MANY_STREAMS} streams took {all_open:?}, longer than the first token's \
             {TTFT:?}: they may not all have been open at once"
        );
        let key = opened[0].1["key"].as_str().unwrap().to_owned();
        assert!(opened.iter().all(|(_, meta)| meta["key"] == key.as_str()));

        // Every stream gets the whole answer and its end.
        let rests = futures::future::join_all(
            opened
                .into_iter()
                .map(|(mut stream, _)| async move { stream.collect_all().await }),
        )
        .await;
        let whole = text_of(&rests[0]);
        assert!(!whole.is_empty(), "{:?}", rests[0]);
        for rest in &rests {
            assert_eq!(shape(rest), ["chunk*", "done"], "{rest:?}");
            assert_eq!(text_of(rest), whole);
        }
        // It is the answer stored: one generation, one upstream call.
        let answer = format!("{}/v1/fights/{key}", sys.api_url());
        versus_testkit::eventually(
            "the answer to be stored",
            Duration::from_secs(10),
            || async { http().get(&answer).send().await.unwrap().status() == 200 },
        )
        .await;
        let stored = json_of(http().get(&answer)).await;
        assert_eq!(stored["text"].as_str(), Some(whole.as_str()));
        assert_eq!(sys.sim.chat_calls().await, 1);
    });
}
