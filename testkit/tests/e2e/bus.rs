//! Who may do what on the bus: nats.conf's users, as the system runs with them.

use std::time::Duration;

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use serde_json::json;
use versus_testkit::{NatsUser, System};

use crate::{fight, http, quick};

const TOKEN: &str = "bus-admin-token";

/// A JetStream context that gives up on an acknowledgement soon: a refused publish gets none.
fn jetstream_of(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client)
}

/// The stream sequence of the last message on `subject` of `stream` (0: none), as the admin
/// sees it.
async fn last_seq(admin: &jetstream::Context, stream: &str, subject: &str) -> u64 {
    let stream = admin.get_stream(stream).await.unwrap();
    match stream.direct_get_last_for_subject(subject).await {
        Ok(message) => message.sequence,
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => 0,
        Err(e) => panic!("reading the last message on {subject}: {e}"),
    }
}

#[tokio::test]
async fn nobody_connects_anonymously_and_the_api_may_not_write_events_answers_or_streams() {
    let sys = quick().start().await;
    // The system, logged in as its users, serves a fight as ever.
    let events = fight(&sys, "Batman", "Superman").await;
    assert_eq!(events.last().unwrap().event, "done", "{events:?}");
    let key = events[0].json()["key"].as_str().unwrap().to_owned();
    let subject = format!("versus.events.text.{key}");
    let admin = jetstream_of(sys.nats.client().await);
    let done_seq = last_seq(&admin, "VERSUS_EVENTS", &subject).await;
    assert!(done_seq > 0);
    let answers = admin.get_key_value("versus_answers").await.unwrap();
    let stored = answers.get(format!("text.{key}")).await.unwrap().unwrap();

    // No user, or a wrong password: refused.
    let anonymous = async_nats::connect(&sys.nats.url).await;
    assert!(
        matches!(&anonymous, Err(e) if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation),
        "an anonymous client connected: {anonymous:?}"
    );
    let wrong = async_nats::ConnectOptions::with_user_and_password(
        "versus-api".to_owned(),
        "not-the-password".to_owned(),
    )
    .connect(&sys.nats.url)
    .await;
    assert!(wrong.is_err(), "a wrong password connected");

    // With the API's credentials: a forged `done` on the fight's events, a forged answer in
    // the KV bucket, a purge of it, a new bucket, a deleted stream: all refused.
    let api = async_nats::ConnectOptions::with_user_and_password(
        "versus-api".to_owned(),
        sys.nats.password(NatsUser::Api).to_owned(),
    )
    .name("forger")
    .connect(&sys.nats.url)
    .await
    .unwrap();
    let api = jetstream_of(api);
    let forged = json!({"type": "done", "attempt": 99, "model": "forged", "length": 0});
    let publish = api
        .publish(subject.clone(), forged.to_string().into())
        .await;
    let acked = match publish {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(!acked, "the API's user published an event");
    let api_answers = api
        .get_key_value("versus_answers")
        .await
        .expect("the API's user may look the bucket up");
    let forged_answer = json!({"key": key, "a": "Batman", "b": "Superman", "text": "forged",
        "model": "forged", "attempt": 99});
    assert!(
        api_answers
            .put(format!("text.{key}"), forged_answer.to_string().into())
            .await
            .is_err(),
        "the API's user wrote an answer"
    );
    assert!(
        api_answers.purge(format!("text.{key}")).await.is_err(),
        "the API's user purged an answer"
    );
    assert!(
        api.create_key_value(jetstream::kv::Config {
            bucket: "forged".to_owned(),
            ..Default::default()
        })
        .await
        .is_err(),
        "the API's user made a bucket"
    );
    assert!(
        api.delete_stream("VERSUS_EVENTS").await.is_err(),
        "the API's user deleted the events stream"
    );
    // It may read, as the API does.
    assert_eq!(
        api_answers.get(format!("text.{key}")).await.unwrap(),
        Some(stored.clone())
    );

    // Nothing of it reached the bus: the admin sees the genuine events and answer.
    assert_eq!(
        last_seq(&admin, "VERSUS_EVENTS", &subject).await,
        done_seq,
        "no forged event was stored"
    );
    assert_eq!(
        answers.get(format!("text.{key}")).await.unwrap(),
        Some(stored),
        "the answer is the genuine one"
    );
    assert!(admin.get_stream("VERSUS_EVENTS").await.is_ok());
    assert!(admin.get_key_value("forged").await.is_err());

    // The workers' user may not publish jobs.
    let worker = jetstream_of(sys.nats.connect_as(NatsUser::Worker).await.unwrap());
    let jobs_before = admin
        .get_stream("VERSUS_JOBS")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .last_sequence;
    let job = json!({"kind": "text", "key": key, "a": "Batman", "b": "Superman",
        "model": "gpt-4o-mini", "prompt_version": 1});
    let publish = worker
        .publish("versus.jobs.text", job.to_string().into())
        .await;
    let acked = match publish {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(!acked, "the workers' user published a job");
    let jobs_after = admin
        .get_stream("VERSUS_JOBS")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .last_sequence;
    assert_eq!(jobs_after, jobs_before, "no job was stored");

    // And the page still serves the genuine answer.
    let answer = http()
        .get(format!("{}/v1/fights/{key}", sys.api_url()))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_ne!(answer["text"], json!("forged"));
    assert_ne!(answer["model"], json!("forged"));

    // nats-server names the connection that tried each: this test's (the programs' are
    // checked to have none when the system drops).
    let forged = sys.nats.violations_of(&["forger"]);
    assert!(forged.len() >= 5, "{forged:#?}");
    assert_eq!(
        sys.nats.violations().len(),
        forged.len() + 1,
        "and the worker user's job"
    );
}

#[tokio::test]
async fn a_purge_is_carried_out_by_a_worker_and_refused_when_none_is_up() {
    let mut sys = System::builder()
        .workers(1)
        .env("VERSUS_ADMIN_TOKEN", TOKEN)
        .sim_env("VERSUS_SIM_TTFT_MS", "20")
        .start()
        .await;
    let events = fight(&sys, "Purge", "Nobody").await;
    assert_eq!(events.last().unwrap().event, "done", "{events:?}");
    let key = events[0].json()["key"].as_str().unwrap().to_owned();
    let url = format!("{}/v1/admin/fights/{key}", sys.api_url());
    let purge = || http().delete(&url).bearer_auth(TOKEN).send();

    // No worker: the API cannot purge by itself, and does nothing.
    for worker in &mut sys.workers {
        worker.terminate().await;
    }
    let refused = purge().await.unwrap();
    assert_eq!(refused.status(), 503);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM generations WHERE key = $1")
        .bind(&key)
        .fetch_one(&sys.db.pool().await)
        .await
        .unwrap();
    assert_eq!(rows, 1, "nothing was purged");
    let served = http()
        .get(format!("{}/v1/fights/{key}", sys.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);

    // A worker is back: the purge goes through.
    sys.spawn_worker().await;
    let purged = purge().await.unwrap();
    assert_eq!(purged.status(), 204);
    let admin = jetstream_of(sys.nats.client().await);
    let answers = admin.get_key_value("versus_answers").await.unwrap();
    assert_eq!(answers.get(format!("text.{key}")).await.unwrap(), None);
    let subject = format!("versus.events.text.{key}");
    let last = admin
        .get_stream("VERSUS_EVENTS")
        .await
        .unwrap()
        .direct_get_last_for_subject(&subject)
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&last.payload).unwrap()["type"],
        json!("purged")
    );
    let gone = http()
        .get(format!("{}/v1/fights/{key}", sys.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
}

#[tokio::test]
async fn a_worker_start_puts_back_only_the_stream_settings_versus_owns() {
    let mut sys = quick().workers(1).start().await;
    let admin = jetstream::new(sys.nats.client().await);
    let config = |name: &'static str| {
        let admin = admin.clone();
        async move {
            admin
                .get_stream(name)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .config
                .clone()
        }
    };
    // An operator's own settings, and one Versus owns (its duplicate window, which makes
    // identical misses one job).
    let mut changed = config("VERSUS_JOBS").await;
    changed.description = Some("an operator's note".into());
    changed.max_bytes = 1 << 30;
    changed.duplicate_window = Duration::from_secs(5);
    admin.update_stream(changed).await.unwrap();

    let worker = sys.spawn_worker().await;
    versus_testkit::eventually(
        "the new worker to put the duplicate window back",
        Duration::from_secs(15),
        || async { config("VERSUS_JOBS").await.duplicate_window == Duration::from_secs(120) },
    )
    .await;
    let after = config("VERSUS_JOBS").await;
    assert_eq!(after.description.as_deref(), Some("an operator's note"));
    assert_eq!(after.max_bytes, 1 << 30, "the operator's limit stays");
    assert!(
        worker.stderr_tail().contains("duplicate_window"),
        "the worker says what it put back:\n{}",
        worker.stderr_tail()
    );
    // And the system works as before.
    let events = fight(&sys, "Lion", "Tiger").await;
    assert_eq!(events.last().unwrap().event, "done", "{events:?}");
}
