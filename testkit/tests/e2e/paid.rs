//! Paid work is never thrown away, and a hub failover costs the election, not the ack wait:
//! a picture whose store refuses it is kept and stored later, an answer whose Postgres write
//! fails is written again, and generations under way when the hub server leading the streams
//! is SIGKILLed pause for the election and go on, each paid for once.

use std::time::{Duration, Instant};

use futures::future::join_all;
use sha2::{Digest, Sha256};
use versus_shared::wire;
use versus_testkit::{eventually, pictures_in, sse, stream_leader};

use crate::{
    fight, http, image_stream_url, quick, rows, run, shape, stream_url, text_of, worker_metric,
};

#[test]
fn a_picture_the_store_refuses_is_kept_and_stored_once_it_is_back_without_being_drawn_again() {
    run(async {
        let mut sys = quick()
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "1500")
            .s3()
            .start()
            .await;
        let url = image_stream_url(&sys, "Kong", "Godzilla");
        let drawing = tokio::spawn(async move { sse::open(&url, None).await.collect_all().await });
        // The claim is won before the picture is asked for, which takes 1.5 s: the store goes
        // down meanwhile, and refuses the upload of the picture once it is drawn.
        let pool = sys.db.pool().await;
        eventually(
            "a worker claims the picture",
            Duration::from_secs(10),
            || async {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM generations WHERE kind = 'image' AND status = 'running'",
                )
                .fetch_one(&pool)
                .await
                .unwrap()
                    == 1
            },
        )
        .await;
        sys.s3.as_mut().unwrap().stop().await;
        eventually("the picture is drawn", Duration::from_secs(10), || async {
            sys.sim.image_calls().await == 1
        })
        .await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            !drawing.is_finished(),
            "the client was answered while the store refused the picture"
        );
        sys.s3.as_mut().unwrap().start_again().await;

        let events = drawing.await.unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[1].event, "done", "{events:?}");
        assert_eq!(
            sys.sim.image_calls().await,
            1,
            "the picture was drawn again"
        );
        let url = events[1].json()["url"].as_str().unwrap().to_owned();
        let bytes = http()
            .get(format!("{}{url}", sys.api_url()))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        // Stored under a name of its content, once.
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        assert!(
            url.ends_with(&format!("/{key}-{}.png", &sha256[..16])),
            "{url} does not name the picture's content"
        );
        assert_eq!(pictures_in(sys.s3.as_ref().unwrap().objects()), 1);
    });
}

#[test]
fn an_answer_whose_completion_write_postgres_refuses_once_is_stored_with_one_chat_call() {
    run(async {
        let sys = quick().start().await;
        // The first write that marks a generation done fails, as a Postgres error would (a
        // sequence counts the tries: it is not rolled back with the failed statement).
        let pool = sys.db.pool().await;
        for statement in [
            "CREATE SEQUENCE completion_writes",
            "CREATE FUNCTION refuse_the_first_completion() RETURNS trigger
             LANGUAGE plpgsql SECURITY DEFINER AS $$
             BEGIN
                 IF nextval('completion_writes') = 1 THEN
                     RAISE EXCEPTION 'the test refuses the first completion write';
                 END IF;
                 RETURN NEW;
             END $$",
            "CREATE TRIGGER refuse_the_first_completion BEFORE UPDATE ON generations
             FOR EACH ROW WHEN (NEW.status = 'done' AND OLD.status <> 'done')
             EXECUTE FUNCTION refuse_the_first_completion()",
        ] {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }

        let events = fight(&sys, "Achilles", "Hector").await;
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
        let text = text_of(&events);
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        assert_eq!(rows(&sys, &key).await, [("done".to_owned(), Some(text))]);
        let writes: i64 = sqlx::query_scalar("SELECT last_value FROM completion_writes")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(writes, 2, "the write was refused once, then made again");
        assert_eq!(
            sys.sim.chat_calls().await,
            1,
            "the answer was paid for again"
        );
    });
}

/// Misses in flight when the hub server leading the streams dies.
const IN_FLIGHT: usize = 100;
/// How long a client may wait between two events while the streams elect new leaders (4 to
/// 9 s from the kill): the election and a few seconds, well under a job's ack wait (30 s by
/// default), which is what a generation started again would cost.
const LONGEST_WAIT: Duration = Duration::from_secs(20);

/// Every event of a stream, and the longest the client waited for one.
async fn timed(url: String) -> (Vec<sse::SseEvent>, Duration) {
    let mut stream = sse::open(&url, None).await;
    let (mut events, mut longest, mut last) = (Vec::new(), Duration::ZERO, Instant::now());
    loop {
        let next = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .unwrap_or_else(|_| panic!("no event for 60 s after {events:?}"));
        longest = longest.max(last.elapsed());
        last = Instant::now();
        match next {
            Some(event) => events.push(event),
            None => return (events, longest),
        }
    }
}

#[test]
fn generations_under_way_when_the_hub_leader_dies_pause_for_the_election_and_are_paid_once() {
    run(async {
        let mut sys = quick()
            .hub()
            .worker_env("VERSUS_WORKER_CONCURRENCY", "128")
            // Longer than the kit's 3 s: a hundred generations share two cores with other tests,
            // and a heartbeat starved that long would restart a generation for a reason that is
            // not the election's. The ack wait is as long, still well under the 30 s default.
            .worker_env("VERSUS_LEASE_SECS", "10")
            // Each answer streams for about 8 s: every one is under way when the leader dies.
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "5")
            .sim_env("VERSUS_SIM_ANSWER_TOKENS", "40")
            .start()
            .await;
        let admin = sys.admin_client().await;
        // The same node leads the events stream and the answers bucket: its death interrupts the
        // workers' event publishes, KV writes, progress acks and acks at once.
        let (leader, moved) = crate::one_leader_for_every_write(&admin).await;
        assert!(
            moved,
            "the events stream and the answers bucket did not move to {leader}"
        );
        let streams: Vec<_> = (0..IN_FLIGHT)
            .map(|i| {
                tokio::spawn(timed(stream_url(
                    &sys,
                    &format!("Fighter {i}"),
                    "The Leader",
                )))
            })
            .collect();
        eventually(
            "every generation is under way",
            Duration::from_secs(30),
            || async { sys.sim.chat_calls().await >= IN_FLIGHT as u64 },
        )
        .await;
        eprintln!("killing {leader}, the leader of the streams");
        sys.hub_node(&leader).kill().await;
        let killed = Instant::now();
        let mut elected = None;
        while elected.is_none() && killed.elapsed() < Duration::from_secs(20) {
            elected = stream_leader(&admin, wire::EVENTS_STREAM)
                .await
                .filter(|l| *l != leader);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "{elected:?} leads {} {:?} after the kill",
            wire::EVENTS_STREAM,
            killed.elapsed()
        );

        let mut longest = Duration::ZERO;
        let mut keys = Vec::new();
        for (i, result) in join_all(streams).await.into_iter().enumerate() {
            let (events, waited) = result.unwrap();
            longest = longest.max(waited);
            assert!(
                events.iter().all(|e| e.event != "reset"),
                "stream {i} was reset: {events:?}"
            );
            assert_eq!(shape(&events), ["meta", "chunk*", "done"], "stream {i}");
            assert!(waited < LONGEST_WAIT, "stream {i} waited {waited:?}");
            let key = events[0].json()["key"].as_str().unwrap().to_owned();
            assert_eq!(
                rows(&sys, &key).await,
                [("done".to_owned(), Some(text_of(&events)))],
                "{key}"
            );
            keys.push(key);
        }
        eprintln!("the clients' longest wait between two events: {longest:?}");
        // The kill did interrupt the workers: what the streams refused meanwhile went out again.
        let retries = worker_metric(&sys, "versus_bus_write_retries_total", "").await;
        assert!(retries > 0.0, "no write to JetStream was tried again");
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), IN_FLIGHT, "one key per matchup");
        assert_eq!(
            sys.sim.chat_calls().await,
            IN_FLIGHT as u64,
            "a key was paid for twice"
        );
    });
}
