//! The alias table: an operator says a name is another (`PUT /v1/admin/aliases/Kakarot`
//! `{"canonical": "Goku"}`), and every request naming the alias, however it is spelled, is the
//! canonical name's fight: a hit on the canonical's answer, or a new answer stored under the
//! canonical's names. The alias reaches every API replica and both edges of the hub within
//! 2 s, and so does its deletion, after which the alias is a fight of its own again. Chains,
//! cycles and a name aliased to itself are refused; the canonical name is suggested as you
//! type; a worker never pays for a job a replica made before it heard of an alias.

use std::time::{Duration, Instant};

use futures::{StreamExt, future::join_all};
use serde_json::{Value, json};
use versus_shared::{
    key::Matchup,
    prompt::TEXT_PROMPT_VERSION,
    wire::{self, Event, Job, Kind},
};
use versus_testkit::{eventually, sse};

use crate::{fight_at, http, quick, rows, run, shape, stream_url_at, text_of};

const TOKEN: &str = "alias-admin-token-0123456789abcdef";

/// How long an alias, or its deletion, may take to reach every API replica and every edge
/// (stored in Postgres and in the answers bucket, which edges mirror): the contract's 2 s,
/// counted from the admin route's answer.
const ALIAS_REACHES_WITHIN: Duration = Duration::from_secs(2);

/// How long an alias's canonical name may take to be suggested, or to leave the suggestions:
/// the alias's 2 s, then the replica's index is built again within a second; the rest is room
/// for a loaded two-core machine running another test beside this one.
const SUGGESTED_WITHIN: Duration = Duration::from_secs(5);

/// The model the workers write text with (the default).
const CHAT_MODEL: &str = "gpt-4o-mini";

/// The key of `a` vs `b` by their own names (no alias), as every replica derives it.
fn plain_key(a: &str, b: &str) -> String {
    Matchup::parse(Some(a), Some(b))
        .unwrap()
        .key(Kind::Text, TEXT_PROMPT_VERSION, CHAT_MODEL)
        .as_str()
        .to_owned()
}

/// The admin URL of `alias` at `api` (the name percent-encoded as one path segment).
fn alias_url(api: &str, alias: &str) -> reqwest::Url {
    let mut url = reqwest::Url::parse(&format!("{api}/v1/admin/aliases")).unwrap();
    url.path_segments_mut().unwrap().push(alias);
    url
}

/// Sends `request`: the status and the JSON body (null when there is none, as for a 204).
async fn sent(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    if body.is_empty() {
        return (status, Value::Null);
    }
    let json = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{status}: the body is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, json)
}

/// `PUT /v1/admin/aliases/{alias}` `{"canonical": canonical}` at `api`, as the operator.
async fn put_alias(api: &str, alias: &str, canonical: &str) -> (u16, Value) {
    sent(
        http()
            .put(alias_url(api, alias))
            .bearer_auth(TOKEN)
            .json(&json!({ "canonical": canonical })),
    )
    .await
}

/// `DELETE /v1/admin/aliases/{alias}` at `api`, as the operator.
async fn delete_alias(api: &str, alias: &str) -> (u16, Value) {
    sent(http().delete(alias_url(api, alias)).bearer_auth(TOKEN)).await
}

/// `GET /v1/admin/aliases` at `api`: the list, sorted by alias.
async fn listed(api: &str) -> Vec<Value> {
    let (status, body) = sent(
        http()
            .get(format!("{api}/v1/admin/aliases"))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut aliases: Vec<Value> = serde_json::from_value(body["aliases"].clone())
        .unwrap_or_else(|e| panic!("{{\"aliases\": [..]}} expected ({e}): {body}"));
    aliases.sort_by_key(|a| a["alias"].as_str().map(str::to_owned));
    aliases
}

/// A finished fight at `api`: its `meta` and its text. Panics unless it ends `done`.
async fn answered(api: &str, a: &str, b: &str) -> (Value, String) {
    let events = fight_at(api, a, b).await;
    assert_eq!(
        events.last().map(|e| e.event.as_str()),
        Some("done"),
        "{a} vs {b} at {api}: {events:?}"
    );
    (events[0].json(), text_of(&events))
}

/// Asks `a` vs `b` at `api` until its `meta` names `key` (each stream that names another is
/// dropped at once), and reads that one to its end; panics once [`ALIAS_REACHES_WITHIN`] has
/// passed `since`, the change that `what` describes.
async fn until_keyed(
    what: &str,
    api: &str,
    (a, b): (&str, &str),
    key: &str,
    since: Instant,
) -> Vec<sse::SseEvent> {
    let deadline = since + ALIAS_REACHES_WITHIN;
    let url = stream_url_at(api, a, b);
    loop {
        let mut stream = sse::open(&url, None).await;
        let meta = stream
            .next()
            .await
            .unwrap_or_else(|| panic!("{a} vs {b} at {api}: an empty stream"));
        assert_eq!(meta.event, "meta", "{meta:?}");
        let seen = meta.json()["key"].as_str().unwrap().to_owned();
        if seen == key {
            eprintln!(
                "{what}: `{a} vs {b}` at {api} had key {key} {:?} after",
                since.elapsed()
            );
            let mut events = vec![meta];
            events.extend(stream.collect_all().await);
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: `{a} vs {b}` at {api} still had key {seen}, not {key}, {:?} after \
             (the promise: {ALIAS_REACHES_WITHIN:?})",
            since.elapsed()
        );
        drop(stream);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`until_keyed`] at every API in `apis` at once: the fight at each, in the same order.
async fn everywhere(
    what: &str,
    apis: &[&str],
    fight: (&str, &str),
    key: &str,
    since: Instant,
) -> Vec<Vec<sse::SseEvent>> {
    join_all(
        apis.iter()
            .map(|api| until_keyed(what, api, fight, key, since)),
    )
    .await
}

/// The names suggested for `q` at `api`.
async fn suggested(api: &str, q: &str) -> Vec<String> {
    let url =
        reqwest::Url::parse_with_params(&format!("{api}/v1/names/suggest"), &[("q", q)]).unwrap();
    let (status, body) = sent(http().get(url)).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body["names"].clone()).unwrap()
}

/// Asserts that `events` are a hit on the answer `key` with `text`, shown as `a` vs `b`.
fn assert_hit(events: &[sse::SseEvent], key: &str, text: &str, (a, b): (&str, &str)) {
    assert_eq!(shape(events), ["meta", "chunk*", "done"], "{events:?}");
    let meta = events[0].json();
    assert_eq!(meta["key"], json!(key), "{meta}");
    assert_eq!(meta["cached"], json!(true), "{meta}");
    assert_eq!((&meta["a"], &meta["b"]), (&json!(a), &json!(b)), "{meta}");
    assert_eq!(text_of(events), text);
}

/// Asserts that `answers`, asked at once at several places, are one new answer shown as `a` vs
/// `b`: each ends `done` with the same text, and at least one was not cached.
fn assert_one_new_answer(answers: &[Vec<sse::SseEvent>], (a, b): (&str, &str)) {
    for events in answers {
        assert_eq!(shape(events), ["meta", "chunk*", "done"], "{events:?}");
        let meta = events[0].json();
        assert_eq!((&meta["a"], &meta["b"]), (&json!(a), &json!(b)), "{meta}");
        assert_eq!(text_of(events), text_of(&answers[0]));
    }
    assert!(
        answers
            .iter()
            .any(|events| events[0].json()["cached"] == json!(false)),
        "a new answer, not a stored one: {answers:?}"
    );
}

#[test]
fn an_alias_is_its_canonical_name_at_every_replica_until_it_is_deleted() {
    run(async {
        let sys = quick().env("VERSUS_ADMIN_TOKEN", TOKEN).start().await;
        let api = sys.api_url();
        // A second replica, running before the alias exists: it must hear of it.
        let replica = sys.spawn_api().await;
        let replicas = [api, replica.url.as_str()];
        assert_eq!(listed(api).await, Vec::<Value>::new());

        let (meta, text) = answered(api, "Goku", "Vegeta").await;
        assert_eq!(meta["cached"], json!(false), "{meta}");
        let goku = meta["key"].as_str().unwrap().to_owned();
        assert_eq!(goku, plain_key("Goku", "Vegeta"));
        assert_eq!(sys.sim.chat_calls().await, 1);

        let (status, body) = put_alias(api, "Kakarot", "Goku").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, json!({"alias": "Kakarot", "canonical": "Goku"}));
        let put = Instant::now();
        for events in everywhere("the alias", &replicas, ("Kakarot", "Vegeta"), &goku, put).await {
            assert_hit(&events, &goku, &text, ("Goku", "Vegeta"));
        }
        // However the alias is spelled (its match key), at either replica.
        for at in replicas {
            for a in ["kakarot", "KAKAROT", "Ka-karot", " Kakarot "] {
                let events = fight_at(at, a, "Vegeta").await;
                assert_hit(&events, &goku, &text, ("Goku", "Vegeta"));
            }
        }
        assert_eq!(
            sys.sim.chat_calls().await,
            1,
            "the alias's hits cost nothing"
        );

        // A new fight asked by the alias is the canonical's: stored under its key and names.
        let (meta, _) = answered(replica.url.as_str(), "Kakarot", "Piccolo").await;
        assert_eq!(meta["cached"], json!(false), "{meta}");
        let piccolo = meta["key"].as_str().unwrap().to_owned();
        assert_eq!(piccolo, plain_key("Goku", "Piccolo"));
        assert_eq!(
            (&meta["a"], &meta["b"]),
            (&json!("Goku"), &json!("Piccolo"))
        );
        let stored = crate::json_of(http().get(format!("{api}/v1/fights/{piccolo}"))).await;
        assert_eq!(
            (&stored["a"], &stored["b"]),
            (&json!("Goku"), &json!("Piccolo")),
            "{stored}"
        );
        let (meta, _) = answered(api, "Goku", "Piccolo").await;
        assert_eq!(
            (&meta["key"], &meta["cached"]),
            (&json!(piccolo), &json!(true))
        );
        assert_eq!(sys.sim.chat_calls().await, 2);

        // Chains and cycles are refused, as is a name aliased to itself (one match key), and
        // names the name rules refuse anywhere; none of them changes the table.
        for (alias, canonical, code) in [
            // The canonical is an alias: a chain.
            ("Son Goku", "Kakarot", "invalid_body"),
            ("Son Goku", "kakarot", "invalid_body"),
            // Both ways: a cycle.
            ("Goku", "Kakarot", "invalid_body"),
            // The alias is another alias's canonical: a chain.
            ("Goku", "Son Gohan", "invalid_body"),
            ("GOKU", "Son Gohan", "invalid_body"),
            // One name, by match key.
            ("Spider Man", "Spider-Man", "invalid_body"),
            ("Vegeta", "vegeta", "invalid_body"),
            ("Bat\u{200D}man", "Batman", "invisible_character"),
            ("Kid Goku", "Goku\u{7}", "control_character"),
        ] {
            let (status, body) = put_alias(api, alias, canonical).await;
            assert_eq!(status, 400, "{alias:?} -> {canonical:?}: {body}");
            assert_eq!(
                body["error"]["code"],
                json!(code),
                "{alias:?} -> {canonical:?}: {body}"
            );
        }
        // Only the operator may change the table.
        let (status, body) = sent(
            http()
                .put(alias_url(api, "Son Goku"))
                .json(&json!({"canonical": "Goku"})),
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], json!("unauthorized"), "{body}");
        assert_eq!(
            listed(api).await,
            [json!({"alias": "Kakarot", "canonical": "Goku"})]
        );

        // A canonical may have several aliases.
        let (status, body) = put_alias(api, "Son Goku", "Goku").await;
        assert_eq!(
            (status, &body),
            (200, &json!({"alias": "Son Goku", "canonical": "Goku"}))
        );
        assert_eq!(
            listed(api).await,
            [
                json!({"alias": "Kakarot", "canonical": "Goku"}),
                json!({"alias": "Son Goku", "canonical": "Goku"}),
            ]
        );

        // Deleted, the alias is a fight of its own again: a miss with a key of its own, paid
        // once, at every replica within the same 2 s.
        let (status, body) = delete_alias(api, "Kakarot").await;
        assert_eq!(status, 204, "{body}");
        let deleted = Instant::now();
        let own = plain_key("Kakarot", "Vegeta");
        assert_ne!(own, goku);
        let answers = everywhere(
            "the deletion",
            &replicas,
            ("Kakarot", "Vegeta"),
            &own,
            deleted,
        )
        .await;
        assert_one_new_answer(&answers, ("Kakarot", "Vegeta"));
        assert_eq!(sys.sim.chat_calls().await, 3);
        assert_eq!(
            rows(&sys, &own)
                .await
                .into_iter()
                .filter(|(status, _)| status == "done")
                .count(),
            1
        );
        // The canonical's answer is untouched.
        let events = fight_at(api, "Goku", "Vegeta").await;
        assert_hit(&events, &goku, &text, ("Goku", "Vegeta"));

        let (status, body) = delete_alias(api, "Kakarot").await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], json!("not_found"), "{body}");
        assert_eq!(
            listed(api).await,
            [json!({"alias": "Son Goku", "canonical": "Goku"})]
        );
        assert_eq!(sys.sim.chat_calls().await, 3);
    });
}

#[test]
fn an_alias_and_its_deletion_reach_both_edges_within_two_seconds() {
    run(async {
        let sys = quick()
            .edges(2)
            .env("VERSUS_ADMIN_TOKEN", TOKEN)
            .start()
            .await;
        let hub = sys.api_url();
        let places: Vec<&str> = std::iter::once(hub)
            .chain(sys.edges.iter().map(|e| e.api_url()))
            .collect();
        let (meta, text) = answered(hub, "Goku", "Vegeta").await;
        let goku = meta["key"].as_str().unwrap().to_owned();
        // Each edge holds the answer (its mirror has it) before the alias is made.
        for edge in &sys.edges {
            eventually(
                "the edge serves the canonical's answer",
                Duration::from_secs(5),
                || async {
                    http()
                        .get(format!("{}/v1/fights/{goku}", edge.api_url()))
                        .send()
                        .await
                        .unwrap()
                        .status()
                        == 200
                },
            )
            .await;
        }
        assert_eq!(sys.sim.chat_calls().await, 1);

        let (status, body) = put_alias(hub, "Kakarot", "Goku").await;
        assert_eq!(status, 200, "{body}");
        let put = Instant::now();
        for events in everywhere("the alias", &places, ("Kakarot", "Vegeta"), &goku, put).await {
            assert_hit(&events, &goku, &text, ("Goku", "Vegeta"));
        }
        for edge in &sys.edges {
            let events = fight_at(edge.api_url(), "KA-KAROT", "vegeta").await;
            assert_hit(&events, &goku, &text, ("Goku", "Vegeta"));
        }
        assert_eq!(
            sys.sim.chat_calls().await,
            1,
            "the alias's hits cost nothing"
        );

        let (status, body) = delete_alias(hub, "Kakarot").await;
        assert_eq!(status, 204, "{body}");
        let deleted = Instant::now();
        let own = plain_key("Kakarot", "Vegeta");
        assert_ne!(own, goku);
        // Asked everywhere at once: the first to hear of the deletion starts the answer, the
        // others join it or find it stored.
        let answers = everywhere(
            "the deletion",
            &places,
            ("Kakarot", "Vegeta"),
            &own,
            deleted,
        )
        .await;
        assert_one_new_answer(&answers, ("Kakarot", "Vegeta"));
        assert_eq!(
            sys.sim.chat_calls().await,
            2,
            "the alias's own fight is paid once"
        );
    });
}

#[test]
fn an_aliases_canonical_name_is_suggested_until_the_alias_is_deleted() {
    run(async {
        let sys = quick()
            .workers(1)
            .env("VERSUS_ADMIN_TOKEN", TOKEN)
            .start()
            .await;
        let api = sys.api_url();
        assert!(suggested(api, "gok").await.is_empty());
        let (status, body) = put_alias(api, "Kakarot", "Goku").await;
        assert_eq!(status, 200, "{body}");
        // No answer names Goku: the alias alone makes the name known.
        eventually("`gok` suggests Goku", SUGGESTED_WITHIN, || async {
            suggested(api, "gok").await.iter().any(|n| n == "Goku")
        })
        .await;
        for q in ["gok", "GOKU", "goku", "Go-ku"] {
            assert_eq!(suggested(api, q).await, ["Goku"], "{q}");
        }
        assert_eq!(sys.sim.chat_calls().await, 0);

        let (status, body) = delete_alias(api, "Kakarot").await;
        assert_eq!(status, 204, "{body}");
        eventually("Goku leaves the suggestions", SUGGESTED_WITHIN, || async {
            suggested(api, "gok").await.is_empty()
        })
        .await;
    });
}

#[test]
fn a_job_made_before_its_replica_heard_of_an_alias_is_ended_unpaid() {
    run(async {
        let sys = quick()
            .workers(1)
            .env("VERSUS_ADMIN_TOKEN", TOKEN)
            .start()
            .await;
        let (status, body) = put_alias(sys.api_url(), "Kakarot", "Goku").await;
        assert_eq!(status, 200, "{body}");
        // By now every process follows the alias.
        tokio::time::sleep(ALIAS_REACHES_WITHIN).await;

        // The job a replica that has not heard of the alias makes for "Kakarot vs Vegeta":
        // their own names, under their own key.
        let old = plain_key("Kakarot", "Vegeta");
        let key = versus_shared::key::Key::parse(&old).unwrap();
        let admin = sys.admin_client().await;
        let mut events = admin
            .subscribe(wire::events_subject(Kind::Text, &key))
            .await
            .unwrap();
        admin.flush().await.unwrap();
        let job = Job {
            kind: Kind::Text,
            key: key.clone(),
            a: "Kakarot".to_owned(),
            b: "Vegeta".to_owned(),
            model: CHAT_MODEL.to_owned(),
            prompt_version: TEXT_PROMPT_VERSION,
            size: None,
        };
        async_nats::jetstream::new(admin.clone())
            .publish(
                wire::job_subject(Kind::Text),
                serde_json::to_vec(&job).unwrap().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();

        // The worker ends it (an attempt may begin, but no text comes), retryably: asked again,
        // the replica knows the alias.
        let mut seen = Vec::new();
        let (code, retryable) = loop {
            let message = tokio::time::timeout(Duration::from_secs(15), events.next())
                .await
                .unwrap_or_else(|_| panic!("no end for the old key's job within 15 s: {seen:?}"))
                .expect("the subscription is open");
            match serde_json::from_slice(&message.payload).unwrap() {
                event @ Event::Started { .. } => seen.push(event),
                Event::Error {
                    code, retryable, ..
                } => break (code, retryable),
                other => panic!("the job was run: {other:?} after {seen:?}"),
            }
        };
        assert_eq!((code.as_str(), retryable), ("unavailable", true));
        // Nothing asked of the simulator, nothing stored under the old key, then or later.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stats = sys.sim.stats().await;
        for calls in ["chat_calls", "image_calls", "moderation_calls"] {
            assert_eq!(stats[calls], json!(0), "{calls}: {stats}");
        }
        let stored = rows(&sys, &old).await;
        assert!(
            stored.iter().all(|(status, _)| status != "done"),
            "{stored:?}"
        );
    });
}
