//! The claim off the critical path: on a job's first delivery, a worker asks the upstream while
//! its claim commits. A claim it does not win drops that request at once, and nothing of it is
//! published or stored.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use versus_shared::{
    key::Key,
    wire::{self, Event, Kind},
};
use versus_testkit::{eventually, sse};

use crate::{quick, rows, run, shape, stream_url, text_of, worker_metric};

#[test]
fn a_claim_lost_while_its_upstream_request_is_in_flight_publishes_and_stores_nothing() {
    run(async {
        // A slow answer (40 tokens at 10 a second): the first generation is under way for seconds.
        let sys = quick()
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "10")
            .start()
            .await;
        let mut client = sse::open(&stream_url(&sys, "Slow Poke", "Quick Draw"), None).await;
        let meta = client.next_within(Duration::from_secs(10)).await.unwrap();
        let key = meta.json()["key"].as_str().unwrap().to_owned();
        let first = client.next_within(Duration::from_secs(10)).await.unwrap();
        assert_eq!(first.event, "chunk", "{first:?}");

        // The claim's row is locked here for a moment, so that the copy's claim waits while its
        // upstream request goes out: the loss is seen with the request surely in flight.
        let db = sys.db.pool().await;
        let mut lock = db.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM generations WHERE key = $1 FOR UPDATE")
            .bind(&key)
            .execute(&mut *lock)
            .await
            .unwrap();
        // The same job again, as a copy past the jobs stream's duplicate window would come: a
        // first delivery, so a worker asks the upstream while it claims, and finds the claim held.
        let js = jetstream::new(sys.admin_client().await);
        let jobs = js.get_stream(wire::JOBS_STREAM).await.unwrap();
        let job = jobs
            .get_last_raw_message_by_subject(&wire::job_subject(Kind::Text))
            .await
            .expect("the job under way is still on the stream, unacknowledged");
        js.publish(wire::job_subject(Kind::Text), job.payload)
            .await
            .unwrap()
            .await
            .unwrap();
        eventually(
            "the copy's upstream request goes out while its claim waits",
            Duration::from_secs(10),
            || async { sys.sim.chat_calls().await == 2 },
        )
        .await;
        assert_eq!(
            worker_metric(&sys, "versus_upstream_cancelled_total", "").await,
            0.0
        );
        lock.rollback().await.unwrap();
        eventually(
            "the worker that lost the claim cancels its upstream request",
            Duration::from_secs(10),
            || async { worker_metric(&sys, "versus_upstream_cancelled_total", "").await >= 1.0 },
        )
        .await;
        // The upstream saw the copy's request dropped while it was still answering.
        eventually(
            "the simulator sees the second request abandoned",
            Duration::from_secs(5),
            || async { sys.sim.chat_abandoned().await == 1 },
        )
        .await;
        assert_eq!(sys.sim.chat_calls().await, 2);

        // The client gets the one answer, untouched.
        let mut events = vec![meta, first];
        events.extend(client.collect_all().await);
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
        let text = text_of(&events);
        assert_eq!(
            rows(&sys, &key).await,
            [("done".to_owned(), Some(text.clone()))]
        );
        // The stream holds the winner's events only: one start, the chunks end to end, one done.
        let stream = js.get_stream(wire::EVENTS_STREAM).await.unwrap();
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: wire::events_subject(Kind::Text, &Key::parse(&key).unwrap()),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        let mut stored = Vec::new();
        while let Some(message) = messages.next().await {
            stored.push(serde_json::from_slice::<Event>(&message.unwrap().payload).unwrap());
        }
        let (mut starts, mut dones, mut end) = (0, 0, 0);
        for event in &stored {
            match event {
                Event::Started { attempt } => {
                    assert_eq!(*attempt, 1);
                    starts += 1;
                }
                Event::Chunk { offset, delta, .. } => {
                    assert_eq!(*offset, end, "{stored:?}");
                    end += delta.len();
                }
                Event::Done { .. } => dones += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((starts, dones, end), (1, 1, text.len()), "{stored:?}");
        // And the spend counts the answer and the dropped request, which the upstream may bill
        // for its prompt: its tokens are estimated.
        let (calls, estimated): (i64, i64) = sqlx::query_as(
            "SELECT sum(calls)::int8, sum(estimated)::int8 FROM spend WHERE kind = 'chat'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!((calls, estimated), (2, 1));
    });
}
