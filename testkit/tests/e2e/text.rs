//! Text answers end to end: misses, hits, key variants, coalescing, late joiners and resume,
//! bad input, hits with the back end gone, and links taken out of answers.

use std::time::Duration;

use futures::future::join_all;
use serde_json::{Value, json};
use versus_testkit::{Proc, System, eventually, sse};

use crate::{
    fight, fight_at, http, json_of, metric, metrics_of, quick, rows, run, shape, stream_url,
    stream_url_at, text_of,
};

/// How long an unsubscription may take to reach nats-server.
const SETTLE: Duration = Duration::from_secs(10);

#[test]
fn a_miss_streams_the_answer_and_the_repeat_is_served_from_cache() {
    run(async {
        let sys = quick().start().await;
        let events = fight(&sys, "Batman", "Superman").await;
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
        let meta = events[0].json();
        assert_eq!(meta["cached"], json!(false));
        assert_eq!(meta["a"], "Batman");
        let key = meta["key"].as_str().expect("a key").to_owned();
        assert_eq!(events.last().unwrap().json()["key"], json!(key));
        assert!(
            events.len() > 5,
            "the answer came in several chunks: {events:?}"
        );
        let text = text_of(&events);
        assert_eq!(
            rows(&sys, &key).await,
            [("done".to_owned(), Some(text.clone()))]
        );

        let again = fight(&sys, "Batman", "Superman").await;
        assert_eq!(again[0].json()["cached"], json!(true));
        assert_eq!(again[0].json()["key"], json!(key));
        assert_eq!(shape(&again), ["meta", "chunk*", "done"]);
        assert_eq!(text_of(&again), text);
        assert_eq!(sys.sim.chat_calls().await, 1);

        let stored = json_of(http().get(format!("{}/v1/fights/{key}", sys.api_url()))).await;
        assert_eq!(stored["text"], json!(text));
        assert_eq!(stored["cached"], json!(true));
    });
}

#[test]
fn order_case_and_white_space_variants_reach_the_same_key() {
    run(async {
        let sys = quick().start().await;
        let first = fight(&sys, "Batman", "Superman").await;
        let key = first[0].json()["key"].clone();
        for (a, b) in [
            ("superman", "  BATMAN "),
            ("SUPERMAN", "batman"),
            ("Super\u{3000}man", "batman"),
            ("Ｂａｔｍａｎ", "superman"),
        ] {
            // Inner white space, even an ideographic space, is no part of a name's match key:
            // "Super man" is "Superman".
            let events = fight(&sys, a, b).await;
            let meta = events[0].json();
            assert_eq!(meta["key"], key, "{a} vs {b}");
            assert_eq!(meta["cached"], json!(true), "{a} vs {b}");
            // The display names of the first request are kept.
            assert_eq!(meta["a"], "Batman");
        }
        let posted = json_of(
            http()
                .post(format!("{}/v1/fights", sys.api_url()))
                .json(&json!({"a": " superman", "b": "batman "})),
        )
        .await;
        assert_eq!(posted["key"], key);
        assert_eq!(posted["cached"], json!(true));
        assert_eq!(posted["text"], json!(text_of(&first)));
        // Only the one unique matchup reached the upstream.
        assert_eq!(sys.sim.chat_calls().await, 1);
    });
}

#[test]
fn two_hundred_concurrent_identical_requests_make_one_upstream_call() {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_TTFT_MS", "300")
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "100")
            .start()
            .await;
        let url = stream_url(&sys, "Godzilla", "King Kong");
        let clients = (0..200).map(|_| {
            let url = url.clone();
            async move { sse::open(&url, None).await.collect_all().await }
        });
        let results = join_all(clients).await;
        let first = text_of(&results[0]);
        assert!(!first.is_empty());
        for events in &results {
            assert_eq!(shape(events), ["meta", "chunk*", "done"]);
            assert_eq!(text_of(events), first);
        }
        assert_eq!(sys.sim.chat_calls().await, 1);
    });
}

#[test]
fn identical_cold_misses_at_two_api_replicas_at_once_make_one_upstream_call() {
    run(async {
        // A slow first token: every client, at either replica, asks before any text exists.
        let sys = quick().sim_env("VERSUS_SIM_TTFT_MS", "1500").start().await;
        let replica = sys.spawn_api().await;
        let apis = [sys.api_url(), replica.url.as_str()];
        // One matchup, spelled as different clients would: order, case and white space.
        let spellings = [
            ("Godzilla", "King Kong"),
            ("king kong", "godzilla"),
            ("GODZILLA", "  King Kong "),
            ("King  Kong", "Godzilla"),
            ("kInG kOnG", "gOdZiLlA"),
        ];
        // Fifty clients at once, alternating between the replicas, each replica seeing every
        // spelling.
        let clients = (0..50).map(|i| {
            let (a, b) = spellings[i % spellings.len()];
            let url = stream_url_at(apis[i % apis.len()], a, b);
            async move { sse::open(&url, None).await.collect_all().await }
        });
        let results = join_all(clients).await;

        let key = results[0][0].json()["key"].clone();
        let text = text_of(&results[0]);
        assert!(!text.is_empty());
        for (i, events) in results.iter().enumerate() {
            assert_eq!(
                shape(events),
                ["meta", "chunk*", "done"],
                "client {i}: {events:?}"
            );
            assert_eq!(events[0].json()["key"], key, "client {i}");
            assert_eq!(events[0].json()["cached"], json!(false), "client {i}");
            assert_eq!(text_of(events), text, "client {i}");
        }
        // Each replica took the miss itself (one flight of its own, which its other clients
        // joined): the two met only through the bus and the workers.
        for api in apis {
            let misses = metric(&metrics_of(api).await, "versus_cache_misses_total", "");
            assert_eq!(misses, 1.0, "the cold misses at {api}");
        }
        // And the upstream was asked once, for this matchup.
        let calls = sys.sim.chat_requests().await;
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(sys.sim.chat_calls().await, 1);
        let prompt = calls[0]["messages"].to_string().to_lowercase();
        assert!(
            prompt.contains("godzilla") && prompt.contains("king kong"),
            "{prompt}"
        );
        let key = key.as_str().unwrap();
        assert_eq!(rows(&sys, key).await, [("done".to_owned(), Some(text))]);
    });
}

#[test]
fn a_late_joiner_gets_the_whole_text_and_a_resume_gets_exactly_the_rest() {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "20")
            .start()
            .await;
        let url = stream_url(&sys, "Ada Lovelace", "Alan Turing");
        let mut early = sse::open(&url, None).await;
        let mut held = String::new();
        let mut last_id = String::new();
        while held.chars().count() < 30 || last_id.is_empty() {
            let e = early.next().await.expect("the stream goes on");
            if e.event == "chunk" {
                held.push_str(e.json()["delta"].as_str().unwrap());
                last_id = e.id.clone();
            }
        }
        // A second client arrives mid-generation; the first one drops its connection.
        let late = tokio::spawn({
            let url = url.clone();
            async move { sse::open(&url, None).await.collect_all().await }
        });
        drop(early);
        let rest = sse::open(&url, Some(&last_id)).await.collect_all().await;
        let late = late.await.unwrap();
        let full = text_of(&late);
        assert_eq!(shape(&late), ["meta", "chunk*", "done"]);
        assert_eq!(shape(&rest), ["meta", "chunk*", "done"]);
        assert_eq!(
            format!("{held}{}", text_of(&rest)),
            full,
            "resume from {last_id}"
        );
        assert!(full.len() > held.len());

        // Resuming from the last chunk of a finished answer yields nothing more.
        let end_id = rest
            .iter()
            .rev()
            .find(|e| e.event == "chunk")
            .unwrap()
            .id
            .clone();
        let after_end = sse::open(&url, Some(&end_id)).await.collect_all().await;
        assert_eq!(shape(&after_end), ["meta", "done"]);
        assert_eq!(sys.sim.chat_calls().await, 1);
    });
}

#[test]
fn a_client_of_another_replica_joining_mid_generation_gets_the_whole_text() {
    run(async {
        // A long answer, so that the replica that joins late reads more than one batch of
        // stored events (a thousand) before it follows the rest live. Tokens are paced so that
        // the worker sends nearly every one as an event of its own (it merges only those that
        // arrive together).
        let sys = quick()
            .sim_env("VERSUS_SIM_ANSWER_TOKENS", "2400")
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "600")
            .worker_env("VERSUS_MAX_ANSWER_TOKENS", "2400")
            .start()
            .await;
        let replica = sys.spawn_api().await;
        let url = stream_url(&sys, "Grace Hopper", "Edsger Dijkstra");
        let mut first = sse::open(&url, None).await;
        let mut seen = first.until_chunks(1100).await;
        let query = url.split_once('?').unwrap().1;
        let late = sse::open(&format!("{}/v1/fights/stream?{query}", replica.url), None)
            .await
            .collect_all()
            .await;
        seen.extend(first.collect_all().await);
        assert_eq!(shape(&late), ["meta", "chunk*", "done"]);
        assert_eq!(shape(&seen), ["meta", "chunk*", "done"]);
        assert_eq!(text_of(&late), text_of(&seen));
        assert_eq!(sys.sim.chat_calls().await, 1);
    });
}

#[test]
fn bad_input_gets_a_clear_400_and_costs_nothing() {
    run(async {
        let sys = quick().start().await;
        let api = sys.api_url();
        let long = "x".repeat(101);
        let queries: Vec<Vec<(&str, &str)>> = vec![
            vec![("a", "Batman")],
            vec![("a", ""), ("b", "Superman")],
            vec![("a", "   "), ("b", "Superman")],
            vec![("a", &long), ("b", "Superman")],
            vec![("a", "Bat\u{1}man"), ("b", "Superman")],
            vec![("a", "Batman"), ("b", "Super\nman")],
        ];
        for query in &queries {
            let url =
                reqwest::Url::parse_with_params(&format!("{api}/v1/fights/stream"), query).unwrap();
            let response = http().get(url).send().await.unwrap();
            assert_eq!(response.status(), 400, "{query:?}");
            let body: Value = response.json().await.unwrap();
            assert!(body["error"]["code"].is_string(), "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("opponent"),
                "{body}"
            );
        }
        let bodies = [
            "not json",
            "{\"a\": \"Batman\"",
            "{\"a\": 5, \"b\": \"Superman\"}",
            "[\"Batman\", \"Superman\"]",
            "{\"a\": \"\", \"b\": \"Superman\"}",
        ];
        for body in bodies {
            let response = http()
                .post(format!("{api}/v1/fights"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{body}");
            let json: Value = response.json().await.unwrap();
            assert!(json["error"]["code"].is_string() && json["error"]["message"].is_string());
        }
        let exactly_100 = "é".repeat(100);
        let ok = fight(&sys, &exactly_100, "Superman").await;
        assert_eq!(shape(&ok), ["meta", "chunk*", "done"]);
        assert_eq!(
            sys.sim.chat_calls().await,
            1,
            "only the valid request cost a call"
        );
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM generations")
            .fetch_one(&sys.db.pool().await)
            .await
            .unwrap();
        assert_eq!(rows, 1);
    });
}

#[test]
fn a_query_or_body_that_is_not_utf8_gets_400_and_costs_nothing() {
    run(async {
        let sys = quick().start().await;
        let api = sys.api_url();
        for route in ["/v1/fights/stream", "/v1/images/stream"] {
            for query in ["a=%ff%fe&b=y", "a=Batman&b=Super%C3", "a=x&b%ff=y"] {
                let url = format!("{api}{route}?{query}");
                let response = http().get(&url).send().await.unwrap();
                assert_eq!(response.status(), 400, "{url}");
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["error"]["code"], "invalid_query", "{url}: {body}");
            }
        }
        let bodies: [&[u8]; 2] = [
            b"{\"a\": \"\xff\xfe\", \"b\": \"y\"}",
            // A lone surrogate is no character either.
            b"{\"a\": \"\\udcff\", \"b\": \"y\"}",
        ];
        for route in ["/v1/fights", "/v1/images"] {
            for body in bodies {
                let response = http()
                    .post(format!("{api}{route}"))
                    .header("content-type", "application/json")
                    .body(body.to_vec())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 400, "{route} {body:?}");
                let json: Value = response.json().await.unwrap();
                assert_eq!(json["error"]["code"], "invalid_body", "{json}");
            }
        }
        let stats = sys.sim.stats().await;
        for calls in ["chat_calls", "image_calls", "moderation_calls"] {
            assert_eq!(stats[calls], 0, "{calls}");
        }
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM generations")
            .fetch_one(&sys.db.pool().await)
            .await
            .unwrap();
        assert_eq!(rows, 0);
    });
}

#[test]
fn a_stored_answer_has_a_strong_etag_and_cdn_headers() {
    run(async {
        let sys = quick().start().await;
        let events = fight(&sys, "Cat", "Dog").await;
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        let url = format!("{}/v1/fights/{key}", sys.api_url());
        let response = http().get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let etag = response.headers()["etag"].to_str().unwrap().to_owned();
        assert!(etag.starts_with('"') && !etag.starts_with("W/"), "{etag}");
        assert!(
            response.headers()["cache-control"]
                .to_str()
                .unwrap()
                .contains("public")
        );
        let not_modified = http()
            .get(&url)
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(not_modified.status(), 304);
        let missing = http()
            .get(format!("{}/v1/fights/{}", sys.api_url(), "0".repeat(32)))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
        let bogus = http()
            .get(format!("{}/v1/fights/..%2F..%2Fetc", sys.api_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(bogus.status(), 404);
    });
}

#[test]
fn posting_a_fight_answers_once_the_text_is_complete() {
    run(async {
        let sys = quick().start().await;
        let response = http()
            .post(format!("{}/v1/fights", sys.api_url()))
            .json(&json!({"a": "Sherlock Holmes", "b": "Hercule Poirot"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["cached"], json!(false));
        assert_eq!(body["a"], "Sherlock Holmes");
        let key = body["key"].as_str().unwrap();
        assert_eq!(
            rows(&sys, key).await,
            [("done".to_owned(), body["text"].as_str().map(str::to_owned))]
        );
        assert_eq!(body["model"], "gpt-4o-mini");
    });
}

#[test]
fn a_hit_is_served_with_every_worker_and_postgres_gone() {
    run(async {
        let mut sys = quick().start().await;
        let first = fight(&sys, "Zeus", "Thor").await;
        let text = text_of(&first);
        for worker in &mut sys.workers {
            worker.kill().await;
        }
        // This system's Postgres is its own database: dropping it is Postgres gone for it.
        let admin = sqlx::PgPool::connect(&std::env::var("VERSUS_TEST_DATABASE_URL").unwrap())
            .await
            .unwrap();
        let name = sys.db.url.rsplit('/').next().unwrap().to_owned();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE \"{name}\" WITH (FORCE)"
        )))
        .execute(&admin)
        .await
        .unwrap();

        // From this API's memory, and from a fresh replica that only has the edge KV bucket.
        let fresh: Proc = sys.spawn_api().await;
        for api in [sys.api_url().to_owned(), fresh.url.clone()] {
            let url = reqwest::Url::parse_with_params(
                &format!("{api}/v1/fights/stream"),
                &[("a", "thor"), ("b", "zeus")],
            )
            .unwrap();
            let events = sse::open(url.as_str(), None).await.collect_all().await;
            assert_eq!(events[0].json()["cached"], json!(true), "{api}");
            assert_eq!(text_of(&events), text, "{api}");
        }
        assert_eq!(sys.sim.chat_calls().await, 1);
    });
}

#[test]
fn metrics_count_hits_misses_coalescing_and_upstream_calls() {
    run(async {
        // A slow first token, so that the three concurrent requests surely meet in one flight.
        let sys = quick()
            .workers(1)
            .sim_env("VERSUS_SIM_TTFT_MS", "1000")
            .start()
            .await;
        let url = stream_url(&sys, "Metric", "Gauge");
        join_all((0..3).map(|_| async { sse::open(&url, None).await.collect_all().await })).await;
        fight(&sys, "Metric", "Gauge").await;
        let api = http()
            .get(format!("{}/metrics", sys.api_url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for line in [
            "versus_cache_misses_total 1",
            "versus_coalesced_total 2",
            "versus_cache_hits_total{kind=\"text\",layer=\"kv\"} 1",
        ] {
            assert!(api.contains(line), "{line} in\n{api}");
        }
        let worker = http()
            .get(format!("{}/metrics", sys.workers[0].url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            worker.contains("versus_upstream_calls_total{kind=\"chat\"} 1"),
            "{worker}"
        );
        assert!(
            worker.contains("versus_upstream_tokens_total{type=\"completion\"}"),
            "{worker}"
        );
        for ops in ["healthz", "readyz"] {
            let r = http()
                .get(format!("{}/{ops}", sys.api_url()))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{ops}");
        }
    });
}

/// How many subscriptions nats-server holds on the events of `key` (the API's flights are the
/// only subscribers of events subjects).
async fn events_subscriptions(sys: &System, key: &str) -> usize {
    let subject = format!("versus.events.text.{key}");
    let connz: Value = json_of(http().get(format!(
        "http://127.0.0.1:{}/connz?subs=1&limit=1024",
        sys.nats.monitor_port
    )))
    .await;
    connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| {
            c["subscriptions_list"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|s| *s == json!(subject))
        .count()
}

#[test]
fn a_miss_holds_one_subscription_while_it_streams_and_hits_leave_none() {
    run(async {
        // A slow first token: the stream is open for a while before any text.
        let sys = quick()
            .workers(1)
            .sim_env("VERSUS_SIM_TTFT_MS", "1500")
            .start()
            .await;
        let mut miss = sse::open(&stream_url(&sys, "Subscribed", "Once"), None).await;
        let meta = miss.next().await.unwrap();
        assert_eq!(meta.event, "meta");
        let key = meta.json()["key"].as_str().unwrap().to_owned();
        // The subscription the request made while it read the caches is the reader's: one.
        assert_eq!(events_subscriptions(&sys, &key).await, 1);
        let rest = miss.collect_all().await;
        assert_eq!(shape(&rest), ["chunk*", "done"]);
        eventually(
            "the finished flight's subscription is gone",
            SETTLE,
            || async { events_subscriptions(&sys, &key).await == 0 },
        )
        .await;

        // A replica that never saw the answer reads it from KV (and subscribed meanwhile, in
        // case it was a miss): every hit gets the whole answer and leaves no subscription.
        let replica = sys.spawn_api().await;
        for _ in 0..3 {
            let hit = fight_at(&replica.url, "Subscribed", "Once").await;
            assert_eq!(shape(&hit), ["meta", "chunk*", "done"]);
            assert_eq!(hit[0].json()["cached"], json!(true));
            assert_eq!(text_of(&hit), text_of(&rest));
        }
        let metrics = metrics_of(&replica.url).await;
        assert_eq!(
            metric(&metrics, "versus_cache_hits_total", "layer=\"kv\""),
            1.0
        );
        assert_eq!(metric(&metrics, "versus_cache_misses_total", ""), 0.0);
        eventually("the hits' subscriptions are gone", SETTLE, || async {
            events_subscriptions(&sys, &key).await == 0
        })
        .await;
        assert_eq!(sys.sim.chat_calls().await, 1);
    });
}

#[test]
fn links_in_an_answer_reach_neither_its_readers_nor_the_store() {
    run(async {
        let sys = quick().start().await;
        // What names can steer a model into writing at the end of its answer (the simulator
        // sends a link in pieces: `https:`, `/`, `/evil`, `.example`, `/x`).
        sys.sim
            .fault(json!({
                "kind": "chat",
                "fault": {"type": "say", "text": "Readers should visit evil.example now, or https://evil.example/x. Dr. Strange agrees, e.g. at 3.5 vs. U.S. odds."},
                "times": 1
            }))
            .await;
        let live = fight(&sys, "Superman", "Lex Luthor").await;
        assert_eq!(shape(&live), ["meta", "chunk*", "done"], "{live:?}");
        let text = text_of(&live);
        assert!(
            text.ends_with(
                " Readers should visit now, or. Dr. Strange agrees, e.g. at 3.5 vs. U.S. odds."
            ),
            "the links went and the rest stayed: {text:?}"
        );
        // No trace of either link (and no name holds `evil`).
        let shown = |what: &str| !what.contains("evil");
        assert!(
            live.iter().all(|e| shown(&e.data)),
            "no event carried any of a link: {live:?}"
        );

        // A later visitor, on every route, is served the same text.
        let key = live[0].json()["key"].as_str().unwrap().to_owned();
        let stored = json_of(http().get(format!("{}/v1/fights/{key}", sys.api_url()))).await;
        assert_eq!(stored["text"], json!(text));
        let hit = fight(&sys, "Lex Luthor", "Superman").await;
        assert_eq!(hit[0].json()["cached"], json!(true));
        assert_eq!(text_of(&hit), text);
        assert_eq!(rows(&sys, &key).await, [("done".to_owned(), Some(text))]);
        let page = http()
            .get(format!("{}/?a=Superman&b=Lex%20Luthor", sys.api_url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(shown(&page), "the page and its preview tags hold no link");
        assert_eq!(sys.sim.chat_calls().await, 1, "removing costs no call");
    });
}
