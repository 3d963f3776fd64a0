//! Who may do what on the bus: nats.conf's users, as the system runs with them.

use std::time::Duration;

use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use futures::StreamExt;
use serde_json::json;
use versus_testkit::{NatsUser, System};

use crate::{fight, http, quick, run, worker_metric};

const TOKEN: &str = "bus-admin-token-0123456789abcdef";

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

#[test]
fn nobody_connects_anonymously_and_the_api_may_not_write_events_answers_or_streams() {
    run(async {
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
            matches!(
                &anonymous,
                Err(e) if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation
            ),
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
        .custom_inbox_prefix(NatsUser::Api.inbox_prefix())
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
        // The quota bucket is the one it writes (clients' counters), and it may neither purge
        // nor delete it.
        let quota = api
            .get_key_value("versus_quota")
            .await
            .expect("the API's user may look the quota bucket up");
        quota
            .put("day.1.ip4.192.0.2.1", "1".into())
            .await
            .expect("the API's user charges quotas");
        assert!(
            api.get_stream("KV_versus_quota")
                .await
                .unwrap()
                .purge()
                .await
                .is_err(),
            "the API's user purged the quota bucket"
        );
        assert!(
            api.delete_stream("KV_versus_quota").await.is_err(),
            "the API's user deleted the quota bucket"
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
    });
}

#[test]
fn a_purge_is_carried_out_by_a_worker_and_refused_when_none_is_up() {
    run(async {
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
    });
}

#[test]
fn a_worker_start_puts_back_only_the_stream_settings_versus_owns() {
    run(async {
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
    });
}

/// Every stream, bucket and durable consumer of ours, as (stream, consumer) pairs; the
/// consumer is "" for the stream itself.
const TOPOLOGY: [(&str, &str); 7] = [
    ("VERSUS_JOBS", ""),
    ("VERSUS_EVENTS", ""),
    ("KV_versus_answers", ""),
    ("KV_versus_spend", ""),
    ("KV_versus_quota", ""),
    ("VERSUS_JOBS", "versus-workers"),
    ("VERSUS_JOBS", "versus-prewarm"),
];

/// Whether every stream, bucket and durable consumer of ours exists, as the admin sees them.
async fn topology_is_whole(admin: &jetstream::Context) -> Result<(), String> {
    for (stream, consumer) in TOPOLOGY {
        let found = admin
            .get_stream(stream)
            .await
            .map_err(|e| format!("stream {stream}: {e}"))?;
        if !consumer.is_empty() {
            found
                .consumer_info(consumer)
                .await
                .map_err(|e| format!("consumer {stream}.{consumer}: {e}"))?;
        }
    }
    Ok(())
}

/// That the bucket still holds `stored` as `key`'s answer, and no refusal of it.
async fn answer_is_untouched(answers: &jetstream::kv::Store, key: &str, stored: &[u8]) {
    assert_eq!(
        answers.get(format!("text.{key}")).await.unwrap().as_deref(),
        Some(stored),
        "the answer is the genuine one"
    );
    assert_eq!(
        answers.get(format!("refused.text.{key}")).await.unwrap(),
        None,
        "no refusal was written"
    );
}

#[test]
fn no_request_to_the_workers_makes_one_publish_where_the_requester_chose() {
    run(async {
        let sys = quick().workers(1).start().await;
        let events = fight(&sys, "Batman", "Superman").await;
        assert_eq!(events.last().unwrap().event, "done", "{events:?}");
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        let admin = jetstream_of(sys.nats.client().await);
        topology_is_whole(&admin).await.unwrap();
        let answers = admin.get_key_value("versus_answers").await.unwrap();
        let stored = answers.get(format!("text.{key}")).await.unwrap().unwrap();

        // As a compromised API would: purge requests (an empty purge, which a worker would carry
        // out and answer with `{}`) whose reply subject is a stream's or a consumer's delete API,
        // or a KV key (a refusal, an answer).
        let api = sys.nats.connect_as(NatsUser::Api).await.unwrap();
        let mut replies: Vec<String> = ["VERSUS_JOBS", "VERSUS_EVENTS", "KV_versus_answers"]
            .iter()
            .chain(&["KV_versus_spend", "KV_versus_quota"])
            .map(|stream| format!("$JS.API.STREAM.DELETE.{stream}"))
            .collect();
        replies.extend(
            ["versus-workers", "versus-prewarm"]
                .map(|consumer| format!("$JS.API.CONSUMER.DELETE.VERSUS_JOBS.{consumer}")),
        );
        replies.push(format!("$KV.versus_answers.refused.text.{key}"));
        replies.push(format!("$KV.versus_answers.text.{key}"));
        // The same for every request a worker answers: a purge, a report, a decision on one.
        let requests = [
            ("versus.admin.purge", r#"{"answers":[]}"#),
            ("versus.reports", r#"{}"#),
            ("versus.admin.reports", r#"{}"#),
        ];
        for reply in &replies {
            for (subject, payload) in requests {
                api.publish_with_reply(subject, reply.clone(), payload.into())
                    .await
                    .unwrap();
            }
        }
        api.flush().await.unwrap();

        // The worker refuses each one before doing anything, and counts it.
        let refused = (replies.len() * requests.len()) as f64;
        versus_testkit::eventually(
            "the worker to refuse every request",
            Duration::from_secs(10),
            || async {
                worker_metric(&sys, "versus_bus_refused_total", "reply_subject").await >= refused
            },
        )
        .await;
        assert_eq!(
            worker_metric(&sys, "versus_bus_refused_total", "reply_subject").await,
            refused
        );

        // Afterwards every stream, bucket and consumer is there, the answer is the genuine one,
        // no refusal was written, and the key is still answered, and new misses work.
        topology_is_whole(&admin).await.unwrap();
        answer_is_untouched(&answers, &key, &stored).await;
        let hit = fight(&sys, "Superman", "Batman").await;
        assert_eq!(hit[0].json()["cached"], json!(true), "{hit:?}");
        assert_eq!(hit.last().unwrap().event, "done", "{hit:?}");
        let miss = fight(&sys, "Lion", "Tiger").await;
        assert_eq!(miss.last().unwrap().event, "done", "{miss:?}");

        // Nor would the worker's NATS user have let it: with no `allow_responses`, its answer to
        // a request is refused by the server whatever reply subject the request names, unless its
        // own permissions allow it (the API's inbox).
        let worker = sys.nats.connect_as(NatsUser::Worker).await.unwrap();
        let mut requests = worker.subscribe("versus.admin.purge").await.unwrap();
        worker.flush().await.unwrap();
        // Asked again each second until it arrives: under a loaded run the subscription has
        // once missed the first one.
        let mut request = None;
        for _ in 0..20 {
            api.publish_with_reply(
                "versus.admin.purge",
                "$JS.API.STREAM.DELETE.VERSUS_JOBS",
                r#"{"answers":[]}"#.into(),
            )
            .await
            .unwrap();
            api.flush().await.unwrap();
            if let Ok(next) = tokio::time::timeout(Duration::from_secs(1), requests.next()).await {
                request = next;
                break;
            }
        }
        let request = request.expect("the worker's subscription to get the request");
        worker
            .publish(request.reply.unwrap(), "{}".into())
            .await
            .unwrap();
        worker.flush().await.unwrap();
        versus_testkit::eventually(
            "the server to refuse the worker's answer",
            Duration::from_secs(5),
            || async {
                sys.nats
                    .violations()
                    .iter()
                    .any(|v| v.contains("$JS.API.STREAM.DELETE.VERSUS_JOBS"))
            },
        )
        .await;
        topology_is_whole(&admin).await.unwrap();
    });
}

#[test]
fn an_edge_leaf_login_can_neither_write_nor_delete_on_the_hub() {
    run(async {
        let sys = System::builder().workers(1).edges(1).start().await;
        let edge = &sys.edges[0];
        // The edge serves a miss and then a hit, across its leaf link, as ever.
        let first = crate::fight_at(edge.api_url(), "Batman", "Superman").await;
        assert_eq!(first.last().unwrap().event, "done", "{first:?}");
        let key = first[0].json()["key"].as_str().unwrap().to_owned();
        let admin = jetstream_of(sys.nats.client().await);
        topology_is_whole(&admin).await.unwrap();
        let answers = admin.get_key_value("versus_answers").await.unwrap();
        let stored = answers.get(format!("text.{key}")).await.unwrap().unwrap();
        let events_subject = format!("versus.events.text.{key}");
        let last_event = last_seq(&admin, "VERSUS_EVENTS", &events_subject).await;

        // The leaf login is no client's: nats-server refuses it on the client port.
        let (user, password) = edge.leaf_login.clone();
        let as_client = async_nats::ConnectOptions::with_user_and_password(user, password)
            .connect(&sys.nats.url)
            .await;
        assert!(as_client.is_err(), "the leaf login connected as a client");

        // A compromised edge: its server's own admin may do anything there, and the hub lets
        // through only what its leaf login allows. Asking on the edge API's inbox, whose answers
        // the hub does send back (a stream's info comes back), every write and delete below finds
        // no route to the hub's JetStream, or is dropped at the link.
        let rogue = async_nats::ConnectOptions::with_user_and_password(
            NatsUser::Admin.name().to_owned(),
            edge.nats.password(NatsUser::Admin).to_owned(),
        )
        .custom_inbox_prefix(NatsUser::Api.inbox_prefix())
        .connect(&edge.nats.url)
        .await
        .unwrap();
        let info = rogue
            .request("$JS.hub.API.STREAM.INFO.VERSUS_JOBS", "".into())
            .await
            .expect("an edge may read a stream's info on the hub");
        assert!(
            String::from_utf8_lossy(&info.payload).contains("VERSUS_JOBS"),
            "{info:?}"
        );
        let hub_api = |what: &str| format!("$JS.hub.API.{what}");
        for (what, payload) in [
            (format!("$KV.versus_answers.text.{key}"), "forged"),
            (hub_api(&format!("$KV.versus_answers.text.{key}")), "forged"),
            (
                hub_api(&format!("$KV.versus_answers.refused.text.{key}")),
                "{}",
            ),
            (hub_api("STREAM.DELETE.KV_versus_answers"), ""),
            (hub_api("STREAM.PURGE.KV_versus_answers"), ""),
            (hub_api("STREAM.DELETE.VERSUS_JOBS"), ""),
            (hub_api("STREAM.DELETE.VERSUS_EVENTS"), ""),
            (hub_api("CONSUMER.DELETE.VERSUS_JOBS.versus-workers"), ""),
            (hub_api("CONSUMER.DELETE.VERSUS_JOBS.versus-prewarm"), ""),
        ] {
            let answer = tokio::time::timeout(
                Duration::from_secs(3),
                rogue.request(what.clone(), payload.to_owned().into()),
            )
            .await;
            assert!(
                !matches!(answer, Ok(Ok(_))),
                "the hub answered {what}: {answer:?}"
            );
        }
        // A forged event, published as a plain message.
        let forged = json!({"type": "done", "attempt": 99, "model": "forged", "length": 0});
        rogue
            .publish(events_subject.clone(), forged.to_string().into())
            .await
            .unwrap();
        rogue.flush().await.unwrap();

        // Nothing of it reached the hub.
        topology_is_whole(&admin).await.unwrap();
        answer_is_untouched(&answers, &key, &stored).await;
        assert_eq!(
            last_seq(&admin, "VERSUS_EVENTS", &events_subject).await,
            last_event,
            "no forged event was stored"
        );

        // And the edge still serves hits (from its mirror, once it has the answer) and misses.
        versus_testkit::eventually(
            "the edge to serve the answer as a hit",
            Duration::from_secs(10),
            || async {
                let hit = crate::fight_at(edge.api_url(), "Superman", "Batman").await;
                hit[0].json()["cached"] == json!(true) && hit.last().unwrap().event == "done"
            },
        )
        .await;
        let miss = crate::fight_at(edge.api_url(), "Lion", "Tiger").await;
        assert_eq!(miss.last().unwrap().event, "done", "{miss:?}");
        assert_ne!(crate::text_of(&miss), "");
    });
}
