//! Traces across the bus: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the API and the workers
//! export their spans to the test kit's OTLP/HTTP receiver, and one miss is one trace from the
//! API's request through the job to the worker's claim, the upstream call and the events.

use std::{collections::HashMap, time::Duration};

use versus_testkit::{Otlp, ReceivedSpan, SystemBuilder, sse};

use crate::{fight, quick, run, shape, stream_url};

/// A quick system (one worker) whose API and worker export their spans to `otlp`, in batches
/// sent every 100 ms.
fn traced(otlp: &Otlp) -> SystemBuilder {
    quick()
        .workers(1)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
}

/// How long the spans of a finished request may take to arrive.
const ARRIVAL: Duration = Duration::from_secs(30);

/// The spans of the trace that holds the API's `flight` for `key`, once that trace holds a
/// span of every name in `names` (spans come in batches, from each process on its own).
async fn trace_of_flight(otlp: &Otlp, key: &str, names: &[&str]) -> Vec<ReceivedSpan> {
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    loop {
        let spans = otlp.spans();
        let flight = spans
            .iter()
            .find(|s| s.name == "flight" && s.attribute("versus.key") == Some(key));
        if let Some(flight) = flight {
            let trace: Vec<ReceivedSpan> = spans
                .iter()
                .filter(|s| s.trace_id == flight.trace_id)
                .cloned()
                .collect();
            if names.iter().all(|n| trace.iter().any(|s| s.name == *n)) {
                return trace;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let got: Vec<_> = spans
                .iter()
                .map(|s| format!("{} {} {}", s.service, s.name, s.trace_id))
                .collect();
            panic!(
                "no trace of the flight of {key} with {names:?} within {ARRIVAL:?}; got {got:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The one span named `name` in `trace`.
fn one<'a>(trace: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = trace.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span in {trace:#?}");
    found[0]
}

/// The names of `span`'s ancestors within `trace`, nearest first, up to a span whose parent
/// is not in `trace`.
fn ancestors(trace: &[ReceivedSpan], span: &ReceivedSpan) -> Vec<String> {
    let by_id: HashMap<&str, &ReceivedSpan> =
        trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut names = Vec::new();
    let mut at = span;
    while let Some(parent) = by_id.get(at.parent_span_id.as_str()) {
        names.push(parent.name.clone());
        at = parent;
        assert!(
            names.len() <= trace.len(),
            "a cycle of parents in {trace:#?}"
        );
    }
    names
}

#[test]
fn one_miss_is_one_trace_from_the_api_through_the_worker_to_the_upstream() {
    run(async {
        let otlp = Otlp::start().await;
        let sys = traced(&otlp).start().await;
        // A client's own trace context is not continued: it is no trusted proxy.
        let foreign_trace = "0af7651916cd43dd8448eb211c80319c";
        let traceparent = format!("00-{foreign_trace}-b7ad6b7169203331-01");
        let url = stream_url(&sys, "Batman", "Superman");
        let events = sse::open_with(&url, None, &[("traceparent", &traceparent)])
            .await
            .collect_all()
            .await;
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
        let key = events[0].json()["key"].as_str().unwrap().to_owned();

        let names = [
            "http.request",
            "flight",
            "job.publish",
            "job",
            "claim",
            "moderation",
            "upstream.chat",
            "generate",
            "events.start",
            "events.finish",
        ];
        let trace = trace_of_flight(&otlp, &key, &names).await;
        let trace_id = &trace[0].trace_id;

        // Every span about this key, on either side, is in this one trace.
        let keyed: Vec<_> = otlp
            .spans()
            .into_iter()
            .filter(|s| s.attribute("versus.key") == Some(key.as_str()))
            .collect();
        assert!(
            keyed.iter().any(|s| s.service == "versus-worker"),
            "{keyed:#?}"
        );
        assert!(keyed.iter().all(|s| &s.trace_id == trace_id), "{keyed:#?}");

        // One root, the API's request, and every other span hangs from it by parents that are
        // all in the trace.
        let request = one(&trace, "http.request");
        assert_eq!(request.service, "versus-api");
        assert_eq!(request.parent_span_id, "", "the request started the trace");
        assert_ne!(
            trace_id, foreign_trace,
            "the client's traceparent was ignored"
        );
        assert_eq!(request.attribute("http.route"), Some("/v1/fights/stream"));
        assert_eq!(request.attribute("http.request.method"), Some("GET"));
        assert_eq!(request.attribute("http.response.status_code"), Some("200"));
        for span in trace.iter().filter(|s| s.span_id != request.span_id) {
            assert_eq!(
                ancestors(&trace, span).last().map(String::as_str),
                Some("http.request"),
                "{} ({}) does not reach the request: {trace:#?}",
                span.name,
                span.service
            );
        }

        // Both services, and the hand-over across the bus: the worker's job continues the API's
        // publish of it.
        for (name, service) in [
            ("flight", "versus-api"),
            ("job.publish", "versus-api"),
            ("job", "versus-worker"),
            ("claim", "versus-worker"),
            ("upstream.chat", "versus-worker"),
            ("events.finish", "versus-worker"),
        ] {
            assert_eq!(one(&trace, name).service, service, "{name}");
        }
        let job = one(&trace, "job");
        assert_eq!(
            ancestors(&trace, job)[..2],
            ["job.publish".to_owned(), "flight".to_owned()]
        );
        assert_eq!(job.attribute("versus.outcome"), Some("ack"));
        assert_eq!(one(&trace, "claim").attribute("versus.claim"), Some("won"));

        // The upstream call, with its model and its first token.
        let chat = one(&trace, "upstream.chat");
        assert!(ancestors(&trace, chat).contains(&"job".to_owned()));
        assert!(
            chat.attribute("gen_ai.request.model")
                .is_some_and(|m| !m.is_empty()),
            "{chat:?}"
        );
        assert!(chat.events.iter().any(|e| e == "first token"), "{chat:?}");
        assert!(
            chat.attribute("gen_ai.usage.output_tokens").is_some(),
            "{chat:?}"
        );

        // The completion the worker published, and the flight that read it.
        assert_eq!(
            one(&trace, "events.finish").attribute("versus.event"),
            Some("done")
        );
        let flight = one(&trace, "flight");
        assert_eq!(flight.attribute("versus.outcome"), Some("done"));
        assert!(
            flight.events.iter().any(|e| e == "first event"),
            "{flight:?}"
        );
    });
}

#[test]
fn a_request_that_joins_a_generation_in_flight_links_to_its_trace() {
    run(async {
        let otlp = Otlp::start().await;
        // Slow enough (40 tokens at 20 a second) for a second request to join mid-way. The test's
        // client is a trusted proxy, whose trace context is continued.
        let sys = traced(&otlp)
            .sim_env("VERSUS_SIM_TOKENS_PER_SEC", "20")
            .api_env("VERSUS_TRUSTED_PROXIES", "127.0.0.1")
            .start()
            .await;
        let url = stream_url(&sys, "Godzilla", "King Kong");
        // The first request continues the trace a proxy passes on (a browser's, say).
        let browser_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let browser_span = "00f067aa0ba902b7";
        let traceparent = format!("00-{browser_trace}-{browser_span}-01");
        let mut first = sse::open_with(&url, None, &[("traceparent", &traceparent)]).await;
        let mut seen = first.until_chunks(1).await;
        let key = seen[0].json()["key"].as_str().unwrap().to_owned();

        let joined = sse::open(&url, None).await.collect_all().await;
        seen.extend(first.collect_all().await);
        assert_eq!(shape(&seen), ["meta", "chunk*", "done"], "{seen:?}");
        assert_eq!(shape(&joined), ["meta", "chunk*", "done"], "{joined:?}");
        assert_eq!(sys.sim.chat_calls().await, 1, "the second request joined");

        let trace = trace_of_flight(&otlp, &key, &["http.request", "job", "upstream.chat"]).await;
        let flight = one(&trace, "flight");
        assert_eq!(
            &flight.trace_id, browser_trace,
            "the browser's trace went on"
        );
        let request = one(&trace, "http.request");
        assert_eq!(request.parent_span_id, browser_span);

        // The joiner's request is a trace of its own, linked to the flight it joined.
        let deadline = tokio::time::Instant::now() + ARRIVAL;
        let joiner = loop {
            let joiner = otlp.spans().into_iter().find(|s| {
                s.name == "http.request"
                    && s.trace_id != browser_trace
                    && s.attribute("http.route") == Some("/v1/fights/stream")
            });
            if let Some(joiner) = joiner {
                break joiner;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no span of the joining request within {ARRIVAL:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            joiner.links,
            [(flight.trace_id.clone(), flight.span_id.clone())],
            "{joiner:?}"
        );
        assert_eq!(joiner.attribute("versus.coalesced"), Some("true"));
        // It started nothing: no flight or job of its own.
        assert!(
            otlp.spans()
                .iter()
                .filter(|s| s.trace_id == joiner.trace_id)
                .all(|s| s.name == "http.request"),
            "{:#?}",
            otlp.spans()
        );
    });
}

#[test]
fn the_last_spans_are_flushed_when_the_programs_stop() {
    run(async {
        let otlp = Otlp::start().await;
        // Batches would wait a minute: only the flush at shutdown can send these spans.
        let mut sys = traced(&otlp)
            .env("OTEL_BSP_SCHEDULE_DELAY", "60000")
            .start()
            .await;
        let events = fight(&sys, "Alien", "Predator").await;
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        assert!(otlp.spans().is_empty(), "{:#?}", otlp.spans());

        assert!(sys.api.terminate().await.success());
        assert!(sys.workers[0].terminate().await.success());
        let trace = trace_of_flight(&otlp, &key, &["http.request", "job", "upstream.chat"]).await;
        assert!(trace.iter().any(|s| s.service == "versus-api"));
        assert!(trace.iter().any(|s| s.service == "versus-worker"));
    });
}
