//! Postgres stopped mid-generation for longer than the lease, then started again: no answer is
//! acknowledged without either being stored or reaching its clients as an error. The workers
//! use a Postgres server of this test's own (the one every other test shares stays up).

use std::time::Duration;

use serde_json::json;
use versus_testkit::{Database, System, sse};

use crate::{fight, http, json_of, quick, run, shape, stream_url, text_of};

/// The workers' lease (and the jobs' ack wait), in seconds, unless a test says otherwise.
const LEASE_SECS: u64 = 3;
/// How long Postgres stays away, unless a test says otherwise: well past the lease, and past
/// the pool's acquire timeout (5 s).
const OUTAGE: Duration = Duration::from_secs(10);
/// How long a client that was waiting may take to get the end of its stream once Postgres is
/// back (a retried generation of at most ten seconds, with room to spare).
const SETTLE: Duration = Duration::from_secs(45);

/// One outage of Postgres, while a generation streams.
struct Outage {
    lease_secs: u64,
    down: Duration,
    tokens_per_sec: u32,
    answer_tokens: u32,
}

/// The row of a key: (status, text).
async fn row(db: &Database, key: &str) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, text FROM generations WHERE kind = 'text' AND key = $1")
        .bind(key)
        .fetch_one(&db.pool().await)
        .await
        .expect("the key has a row")
}

/// Starts a system on a database of its own server, opens a stream for a miss, stops Postgres
/// once two chunks arrived, keeps it down, starts it again, then checks what the client got
/// against what is stored, and that a fresh request is answered.
async fn stopped_mid_generation(a: &str, b: &str, outage: Outage) {
    assert!(outage.down > Duration::from_secs(outage.lease_secs));
    let pg = Database::on_own_server().await;
    let sys: System = quick()
        // The API reads Postgres only in the admin routes; both point at the server we stop.
        .env("DATABASE_URL", pg.url.clone())
        .worker_env("VERSUS_LEASE_SECS", outage.lease_secs.to_string())
        .sim_env(
            "VERSUS_SIM_TOKENS_PER_SEC",
            outage.tokens_per_sec.to_string(),
        )
        .sim_env("VERSUS_SIM_ANSWER_TOKENS", outage.answer_tokens.to_string())
        .start()
        .await;
    let url = stream_url(&sys, a, b);
    let mut client = sse::open(&url, None).await;
    let mut events = client.until_chunks(2).await;
    let key = events[0].json()["key"].as_str().unwrap().to_owned();

    pg.stop_server().await;
    tokio::time::sleep(outage.down).await;
    pg.start_server().await;

    let rest = tokio::time::timeout(SETTLE, client.collect_all())
        .await
        .unwrap_or_else(|_| {
            panic!("the client's stream did not end within {SETTLE:?} of Postgres coming back")
        });
    events.extend(rest);
    let end = events.last().unwrap();
    match end.event.as_str() {
        // `done` only for a stored answer: the row, and the answer the API serves, hold the
        // very text the client assembled.
        "done" => {
            let text = text_of(&events);
            assert!(!text.is_empty(), "{events:?}");
            assert_eq!(
                row(&pg, &key).await,
                ("done".to_owned(), Some(text.clone())),
                "the client got done for this text: {events:?}"
            );
            let stored = json_of(http().get(format!("{}/v1/fights/{key}", sys.api_url()))).await;
            assert_eq!(stored["text"], json!(text));
        }
        // An error must be one the client may retry, for a generation recorded as failed.
        "error" => {
            assert_eq!(end.json()["retryable"], json!(true), "{events:?}");
            assert_eq!(row(&pg, &key).await.0, "failed", "{events:?}");
        }
        other => panic!("the stream ended with {other}, not done or error: {events:?}"),
    }

    // Whatever the waiting client got, a fresh request gets the stored answer.
    let again = fight(&sys, a, b).await;
    assert_eq!(again.last().unwrap().event, "done", "{again:?}");
    let (status, text) = row(&pg, &key).await;
    assert_eq!(status, "done");
    assert_eq!(Some(text_of(&again)), text);
    // Nothing was left claimed and forgotten.
    let unfinished: Vec<(String, String)> =
        sqlx::query_as("SELECT key, status FROM generations WHERE status <> 'done'")
            .fetch_all(&pg.pool().await)
            .await
            .unwrap();
    assert!(unfinished.is_empty(), "{unfinished:?}");
}

#[test]
fn postgres_stopped_mid_generation_past_the_lease_ends_the_stream_with_a_stored_answer() {
    run(async {
        // Sixty tokens at six a second: the answer is still streaming when the lease runs out
        // unconfirmed, and the worker stops.
        let outage = Outage {
            lease_secs: LEASE_SECS,
            down: OUTAGE,
            tokens_per_sec: 6,
            answer_tokens: 60,
        };
        stopped_mid_generation("Ganymede", "Callisto", outage).await;
    });
}

#[test]
fn an_answer_finished_while_postgres_is_down_is_stored_once_it_is_back() {
    run(async {
        // Twenty tokens at twenty a second: the answer ends a second into the outage and its
        // cost fails to be recorded five seconds later (the pool's acquire timeout), while the
        // lease still runs; then storing it fails too. Postgres stays down past the lease.
        let outage = Outage {
            lease_secs: 12,
            down: Duration::from_secs(15),
            tokens_per_sec: 20,
            answer_tokens: 20,
        };
        stopped_mid_generation("Io", "Europa", outage).await;
    });
}

#[test]
fn a_request_during_the_outage_gets_its_answer_once_postgres_is_back() {
    run(async {
        let pg = Database::on_own_server().await;
        let sys = quick()
            .env("DATABASE_URL", pg.url.clone())
            .worker_env("VERSUS_LEASE_SECS", LEASE_SECS.to_string())
            .start()
            .await;
        pg.stop_server().await;
        let url = stream_url(&sys, "Phobos", "Deimos");
        let waiting = tokio::spawn(async move {
            let mut client = sse::open(&url, None).await;
            tokio::time::timeout(OUTAGE + SETTLE, client.collect_all()).await
        });
        tokio::time::sleep(OUTAGE).await;
        pg.start_server().await;
        let events = waiting
            .await
            .unwrap()
            .expect("the stream ends once Postgres is back");
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        assert_eq!(
            row(&pg, &key).await,
            ("done".to_owned(), Some(text_of(&events)))
        );
    });
}
