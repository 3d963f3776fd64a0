//! End-to-end tests: a real nats-server, a fresh Postgres database, the upstream simulator over
//! HTTP, and the API and workers as processes. One binary, one module per area.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]
// The ban on a bare spawn is for the services; a test's tasks end with the test.
#![allow(clippy::disallowed_methods)]

mod accessibility;
mod aliases;
mod availability;
mod browser;
mod budget;
mod bus;
mod chaos;
mod claims;
mod cli;
mod cluster;
mod connections;
mod deadlines;
mod degraded;
mod dev;
mod edges;
mod events;
mod fallbacks;
mod faults;
mod hub;
mod images;
mod joins;
mod limits;
mod lookups;
mod moderation;
mod names;
mod openapi;
mod ops;
mod page;
mod page_links;
mod paid;
mod partials;
mod postgres;
mod preview;
mod prewarm;
mod prometheus;
mod purges;
mod quota;
mod reports;
mod reservations;
mod roles;
mod shutdown;
mod spellings;
mod suggest;
mod text;
mod traces;

use std::future::Future;
use std::time::Duration;

pub use versus_testkit::run_within;
use versus_testkit::{
    System, SystemBuilder,
    sse::{self, SseEvent},
};

/// How long an e2e test may run before it fails rather than stalls the run. The slowest tests
/// (hub servers killed and Raft elections waited out, Postgres stopped past a lease,
/// schemathesis, a browser) take up to about 25 s in a full run on a two-core machine, two
/// tests at a time. Five minutes leave them ten times that, and leave the tests' own waits
/// (a minute at most) room to fail with their own messages first. A test that needs longer
/// says so with [`run_within`], as the fault run does. `VERSUS_TEST_TIMES=<file>` records how
/// long each test took.
pub const DEADLINE: Duration = Duration::from_secs(300);

/// Runs a test's body under [`DEADLINE`]. Every e2e test is written
///
/// ```ignore
/// #[test]
/// fn a_sentence_that_states_the_promise() {
///     run(async {
///         // ...
///     });
/// }
/// ```
///
/// (or with `run_within(limit, async { .. })`), never as a `#[tokio::test]`, which has no
/// deadline: `deadlines::every_test_runs_under_a_deadline` checks it.
pub fn run(body: impl Future<Output = ()>) {
    run_within(DEADLINE, body);
}

/// A system whose simulator answers quickly: 40 tokens at 400 tokens/s after 50 ms.
pub fn quick() -> SystemBuilder {
    System::builder()
        .workers(2)
        .sim_env("VERSUS_SIM_TTFT_MS", "50")
        .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "400")
        .sim_env("VERSUS_SIM_ANSWER_TOKENS", "40")
}

/// The SSE URL of a fight.
pub fn stream_url(sys: &System, a: &str, b: &str) -> String {
    stream_url_at(sys.api_url(), a, b)
}

/// The SSE URL of a fight's picture.
pub fn image_stream_url(sys: &System, a: &str, b: &str) -> String {
    reqwest::Url::parse_with_params(
        &format!("{}/v1/images/stream", sys.api_url()),
        &[("a", a), ("b", b)],
    )
    .expect("a valid URL")
    .to_string()
}

/// The SSE URL of a fight at the API serving at `api` (an edge's, say).
pub fn stream_url_at(api: &str, a: &str, b: &str) -> String {
    reqwest::Url::parse_with_params(&format!("{api}/v1/fights/stream"), &[("a", a), ("b", b)])
        .expect("a valid URL")
        .to_string()
}

/// Every event of one fight, from connect to the end of the stream.
pub async fn fight(sys: &System, a: &str, b: &str) -> Vec<SseEvent> {
    fight_at(sys.api_url(), a, b).await
}

/// Every event of one fight asked of the API serving at `api`.
pub async fn fight_at(api: &str, a: &str, b: &str) -> Vec<SseEvent> {
    sse::open(&stream_url_at(api, a, b), None)
        .await
        .collect_all()
        .await
}

/// The text a client ends up with: chunks appended, dropped on `reset`.
pub fn text_of(events: &[SseEvent]) -> String {
    let mut text = String::new();
    for e in events {
        match e.event.as_str() {
            "chunk" => text.push_str(e.json()["delta"].as_str().expect("a delta")),
            "reset" => text.clear(),
            _ => {}
        }
    }
    text
}

/// The names of the events, in order, with consecutive chunks folded into one `chunk*`.
pub fn shape(events: &[SseEvent]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in events {
        let name = if e.event == "chunk" {
            "chunk*"
        } else {
            e.event.as_str()
        };
        if out.last().map(String::as_str) != Some(name) || name != "chunk*" {
            out.push(name.to_owned());
        }
    }
    out
}

/// The stored answers for a key: (status, text).
pub async fn rows(sys: &System, key: &str) -> Vec<(String, Option<String>)> {
    sqlx::query_as("SELECT status, text FROM generations WHERE key = $1")
        .bind(key)
        .fetch_all(&sys.db.pool().await)
        .await
        .expect("query generations")
}

pub fn http() -> reqwest::Client {
    versus_testkit::http_client()
}

/// Sends `request` and reads its body as JSON.
pub async fn json_of(request: reqwest::RequestBuilder) -> serde_json::Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// The `/metrics` text of the process serving at `url`.
pub async fn metrics_of(url: &str) -> String {
    http()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The sum of the series of `name` (with `label`, if any) in every worker's `/metrics`.
pub async fn worker_metric(sys: &System, name: &str, label: &str) -> f64 {
    let mut sum = 0.0;
    for worker in &sys.workers {
        sum += metric(&metrics_of(&worker.url).await, name, label);
    }
    sum
}

/// The sum of the series of `name` whose labels hold `label` ("" for all) in a `/metrics` text.
pub fn metric(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']) && rest.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The hub server that leads the jobs stream, with the events stream's and the answers
/// bucket's leaders moved to it (where they are replicated): its death interrupts every write
/// a worker makes at once. Also whether both moved.
pub async fn one_leader_for_every_write(admin: &async_nats::Client) -> (String, bool) {
    use versus_shared::wire;
    let leader = versus_testkit::stream_leader(admin, wire::JOBS_STREAM)
        .await
        .expect("the jobs stream has a leader");
    let mut moved = true;
    for stream in [
        wire::EVENTS_STREAM.to_owned(),
        format!("KV_{}", wire::ANSWERS_BUCKET),
    ] {
        let here = versus_testkit::move_leader(admin, &stream, &leader).await;
        eprintln!("{stream} led by {leader}: {here}");
        moved &= here;
    }
    (leader, moved)
}
