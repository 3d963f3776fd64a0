//! End-to-end checks of the simulator over real HTTP, with the server in-process on port 0.

// The ban on a bare spawn is for the services; a test's server ends with the test.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncBufReadExt;
use tokio::sync::oneshot;
use versus_sim::{Knobs, Sim};

/// A running simulator; dropping it shuts the server down.
struct Server {
    base: String,
    http: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

/// Knobs fast enough for tests but still exercising the timers.
fn quick() -> Knobs {
    Knobs {
        ttft_ms: 20,
        tokens_per_sec: 2000,
        answer_tokens: 40,
        image_latency_ms: 10,
        image_size: 64,
        ..Knobs::default()
    }
}

/// reqwest (built with `rustls-no-provider`) refuses to build even a plain-http client
/// until some rustls provider is installed; the workspace's choice is ring.
fn http_client() -> reqwest::Client {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn start(knobs: Knobs) -> Server {
    let listener = versus_sim::bind("127.0.0.1:0").await.expect("bind port 0");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(versus_sim::run(listener, Sim::new(knobs), async {
        let _ = stopped.await;
    }));
    Server {
        base,
        http: http_client(),
        _stop: stop,
    }
}

impl Server {
    fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth("sk-test")
            .json(body)
    }

    async fn control(&self, path: &str, body: &Value) -> Value {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .expect("control call");
        assert!(
            response.status().is_success(),
            "{path} answered {}",
            response.status()
        );
        response.json().await.expect("control JSON")
    }

    async fn stats(&self) -> Value {
        let response = self
            .http
            .get(format!("{}/_sim/stats", self.base))
            .send()
            .await
            .expect("stats");
        response.json().await.expect("stats JSON")
    }

    async fn chat(&self, prompt: &str, stream: bool) -> reqwest::Response {
        let body = json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You judge fights."},
                {"role": "user", "content": prompt},
            ],
            "stream": stream,
            "stream_options": {"include_usage": true},
        });
        self.post("/v1/chat/completions", &body)
            .send()
            .await
            .expect("chat call")
    }

    async fn whole_text(&self, prompt: &str) -> String {
        let body: Value = self
            .chat(prompt, false)
            .await
            .json()
            .await
            .expect("completion JSON");
        body["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_owned()
    }

    async fn image(&self, prompt: &str) -> reqwest::Response {
        let body = json!({"model": "gpt-image-1", "prompt": prompt, "size": "64x64"});
        self.post("/v1/images/generations", &body)
            .send()
            .await
            .expect("image call")
    }
}

/// The JSON payloads of an SSE body, with `[DONE]` kept as a string.
fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .expect("every event is a data line");
            if data == "[DONE]" {
                Value::from("[DONE]")
            } else {
                serde_json::from_str(data).expect("chunk JSON")
            }
        })
        .collect()
}

fn content_of(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

fn decode_png(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("PNG header");
    let mut pixels = vec![0; reader.output_buffer_size().expect("buffer size")];
    let frame = reader.next_frame(&mut pixels).expect("PNG pixels");
    assert_eq!(frame.color_type, png::ColorType::Rgb);
    (frame.width, frame.height)
}

#[tokio::test]
async fn a_streamed_answer_follows_the_chunk_format_and_matches_the_whole_answer() {
    let sim = start(quick()).await;
    let response = sim.chat("Who would win, a bear or a shark?", true).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = events(&response.text().await.expect("stream body"));

    assert_eq!(events[0]["object"], "chat.completion.chunk");
    assert_eq!(
        events[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let n = events.len();
    assert_eq!(events[n - 1], "[DONE]");
    let usage = &events[n - 2];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 40);
    assert_eq!(usage["usage"]["prompt_tokens"], 11);
    assert_eq!(usage["usage"]["total_tokens"], 51);
    let finish = &events[n - 3];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let tokens = &events[1..n - 3];
    assert_eq!(tokens.len(), 40);
    assert!(
        tokens
            .iter()
            .all(|t| t["choices"][0]["finish_reason"].is_null())
    );

    let streamed = content_of(&events);
    assert_eq!(
        streamed,
        sim.whole_text("Who would win, a bear or a shark?").await
    );
}

#[tokio::test]
async fn a_whole_answer_has_the_completion_shape_and_usage() {
    let sim = start(quick()).await;
    let body: Value = sim
        .chat("Tiger vs lion?", false)
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 40);
}

#[tokio::test]
async fn the_same_prompt_gives_the_same_text_and_another_prompt_differs() {
    let sim = start(quick()).await;
    let first = sim.whole_text("Batman vs Superman").await;
    assert_eq!(first, sim.whole_text("Batman vs Superman").await);
    assert_ne!(first, sim.whole_text("Godzilla vs Kong").await);
    assert_eq!(first.split(' ').count(), 40);
}

#[tokio::test]
async fn max_tokens_caps_the_answer_length() {
    let sim = start(quick()).await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 7});
    let body: Value = sim
        .post("/v1/chat/completions", &body)
        .send()
        .await
        .expect("call")
        .json()
        .await
        .expect("JSON");
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .expect("text")
            .split(' ')
            .count(),
        7
    );
}

#[tokio::test]
async fn a_missing_bearer_token_gets_a_401_that_is_still_counted() {
    let sim = start(quick()).await;
    let response = sim
        .http
        .post(format!("{}/v1/chat/completions", sim.base))
        .json(&json!({"model": "gpt-4o-mini", "messages": []}))
        .send()
        .await
        .expect("call");
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let stats = sim.stats().await;
    assert_eq!(stats["chat_calls"], 1);
    assert_eq!(stats["calls"][0]["status"], 401);
}

#[tokio::test]
async fn a_malformed_body_gets_an_openai_400() {
    let sim = start(quick()).await;
    let response = sim
        .post("/v1/chat/completions", &json!({"messages": "nope"}))
        .send()
        .await
        .expect("call");
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn a_429_fault_with_retry_after_is_answered_once_then_success() {
    let sim = start(quick()).await;
    let fault = json!({"kind": "chat", "fault": {"type": "status", "status": 429, "retry_after_secs": 2}, "times": 1});
    sim.control("/_sim/faults", &fault).await;

    let limited = sim.chat("Ali vs Tyson", true).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "2");
    let body: Value = limited.json().await.expect("error JSON");
    assert_eq!(body["error"]["type"], "rate_limit_error");

    let ok = sim.chat("Ali vs Tyson", true).await;
    assert_eq!(ok.status(), 200);
    assert!(ok.text().await.expect("body").ends_with("data: [DONE]\n\n"));

    let stats = sim.stats().await;
    assert_eq!(stats["calls"][0]["fault"], "status");
    assert_eq!(stats["calls"][0]["status"], 429);
    assert_eq!(stats["calls"][1]["fault"], Value::Null);
}

#[tokio::test]
async fn a_cut_fault_ends_the_stream_with_an_error_and_no_done() {
    let sim = start(quick()).await;
    let fault = json!({"kind": "any", "fault": {"type": "cut", "after_tokens": 5}, "times": 1});
    sim.control("/_sim/faults", &fault).await;

    let response = sim.chat("Cat vs dog", true).await;
    assert_eq!(response.status(), 200);
    let mut body = Vec::new();
    let mut failed = false;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => body.extend_from_slice(&bytes),
            Err(_) => failed = true,
        }
    }
    assert!(failed, "the body must end with an error, not a clean EOF");
    let text = String::from_utf8(body).expect("UTF-8");
    assert!(!text.contains("[DONE]") && !text.contains("\"stop\""));
    let events = events(&text);
    assert_eq!(events.len(), 6, "role chunk and five tokens");
    let whole = sim.whole_text("Cat vs dog").await;
    assert!(whole.starts_with(&content_of(&events)));
}

#[tokio::test]
async fn a_cut_fault_on_a_whole_answer_breaks_the_body() {
    let sim = start(quick()).await;
    sim.control(
        "/_sim/faults",
        &json!({"kind": "chat", "fault": {"type": "cut"}, "times": 1}),
    )
    .await;
    let body =
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Cat vs dog"}]});
    // The connection may die before the head or during the body; either way no answer arrives.
    let outcome = match sim.post("/v1/chat/completions", &body).send().await {
        Ok(response) => response.bytes().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(outcome.is_err());
    let call = &sim.stats().await["calls"][0];
    assert_eq!(
        (call["fault"].clone(), call["status"].clone()),
        (json!("cut"), json!(0))
    );
}

#[tokio::test]
async fn a_stall_fault_sends_some_tokens_then_goes_silent() {
    let sim = start(quick()).await;
    let fault =
        json!({"kind": "chat", "fault": {"type": "stall", "after_tokens": 3}, "times": null});
    sim.control("/_sim/faults", &fault).await;

    let mut stream = sim.chat("Owl vs hawk", true).await.bytes_stream();
    let mut text = String::new();
    while let Ok(Some(chunk)) =
        tokio::time::timeout(Duration::from_millis(300), stream.next()).await
    {
        text.push_str(std::str::from_utf8(&chunk.expect("no error while stalled")).expect("UTF-8"));
    }
    assert_eq!(
        events(&text).len(),
        4,
        "role chunk and three tokens, then nothing"
    );
    let stats = sim.stats().await;
    assert_eq!(stats["calls"][0]["fault"], "stall");
}

#[tokio::test]
async fn a_finish_fault_ends_the_answer_early_with_its_reason_and_usage() {
    let sim = start(quick()).await;
    let length =
        json!({"kind": "chat", "fault": {"type": "finish", "after_tokens": 5}, "times": 1});
    sim.control("/_sim/faults", &length).await;

    let cut = events(
        &sim.chat("Cat vs dog", true)
            .await
            .text()
            .await
            .expect("body"),
    );
    let n = cut.len();
    assert_eq!(cut[n - 1], "[DONE]");
    assert_eq!(cut[n - 2]["usage"]["completion_tokens"], 5);
    assert_eq!(cut[n - 3]["choices"][0]["finish_reason"], "length");
    assert_eq!(n, 9, "role chunk, five tokens, the finish, usage, [DONE]");
    let whole = sim.whole_text("Cat vs dog").await;
    assert!(whole.starts_with(&content_of(&cut)) && whole.len() > content_of(&cut).len());

    // Any reason, streamed or whole; `stop` after no tokens is an empty answer.
    let filtered = json!({"kind": "chat", "fault": {"type": "finish", "reason": "content_filter"}, "times": 1});
    sim.control("/_sim/faults", &filtered).await;
    let body: Value = sim
        .chat("Cat vs dog", false)
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(body["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(body["choices"][0]["message"]["content"], "");
    assert_eq!(body["usage"]["completion_tokens"], 0);
    let empty = json!({"kind": "chat", "fault": {"type": "finish", "reason": "stop"}, "times": 1});
    sim.control("/_sim/faults", &empty).await;
    let nothing = events(
        &sim.chat("Cat vs dog", true)
            .await
            .text()
            .await
            .expect("body"),
    );
    assert_eq!(content_of(&nothing), "");
    assert_eq!(
        nothing[nothing.len() - 3]["choices"][0]["finish_reason"],
        "stop"
    );
    assert_eq!(sim.stats().await["calls"][0]["fault"], "finish");
}

#[tokio::test]
async fn a_say_fault_ends_the_next_answers_with_its_text_then_they_are_as_before() {
    let sim = start(quick()).await;
    let plain = sim.whole_text("Owl vs hawk").await;
    let say = json!({"kind": "chat", "fault": {"type": "say", "text": "Visit https://evil.example/x now."}, "times": 2});
    sim.control("/_sim/faults", &say).await;

    let streamed = content_of(&events(
        &sim.chat("Owl vs hawk", true)
            .await
            .text()
            .await
            .expect("body"),
    ));
    assert_eq!(
        streamed,
        format!("{plain} Visit https://evil.example/x now.")
    );
    assert_eq!(sim.whole_text("Owl vs hawk").await, streamed);
    assert_eq!(sim.whole_text("Owl vs hawk").await, plain, "used up");
    assert_eq!(sim.stats().await["calls"][1]["fault"], "say");
}

#[tokio::test]
async fn streams_are_paced_by_ttft_and_tokens_per_second() {
    let knobs = Knobs {
        ttft_ms: 150,
        tokens_per_sec: 50,
        answer_tokens: 6,
        ..quick()
    };
    let sim = start(knobs).await;
    let started = Instant::now();
    let mut stream = sim.chat("Slow fight", true).await.bytes_stream();
    let first = stream.next().await.expect("role chunk").expect("bytes");
    assert!(
        std::str::from_utf8(&first)
            .expect("UTF-8")
            .contains("\"role\":\"assistant\"")
    );
    assert!(
        started.elapsed() < Duration::from_millis(140),
        "the role chunk comes at once"
    );
    while let Some(chunk) = stream.next().await {
        chunk.expect("clean stream");
    }
    // 150 ms to the first token, then five gaps of 20 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn images_are_real_pngs_that_differ_per_prompt_and_repeat_per_prompt() {
    let sim = start(quick()).await;
    let mut images = Vec::new();
    for prompt in ["a bear", "a shark", "a bear"] {
        let body: Value = sim.image(prompt).await.json().await.expect("JSON");
        let b64 = body["data"][0]["b64_json"].as_str().expect("b64_json mode");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        assert_eq!(decode_png(&bytes), (64, 64));
        images.push(bytes);
    }
    assert_ne!(images[0], images[1]);
    assert_eq!(images[0], images[2]);

    let stats = sim.stats().await;
    assert_eq!(stats["image_calls"], 3);
    assert_eq!(
        stats["calls"][0]["image_sha256"],
        hex::encode(Sha256::digest(&images[0]))
    );
}

#[tokio::test]
async fn url_mode_serves_the_png_bytes() {
    let sim = start(quick()).await;
    let config = sim
        .control(
            "/_sim/config",
            &json!({"image_mode": "url", "image_size": 32}),
        )
        .await;
    assert_eq!(config["image_mode"], "url");
    assert_eq!(config["ttft_ms"], 20);

    let body = json!({"model": "dall-e-3", "prompt": "a lion", "response_format": "b64_json"});
    let body: Value = sim
        .post("/v1/images/generations", &body)
        .send()
        .await
        .expect("call")
        .json()
        .await
        .expect("JSON");
    let url = body["data"][0]["url"].as_str().expect("url mode");
    assert!(
        url.starts_with(&sim.base),
        "{url} is served by this simulator"
    );
    let file = sim.http.get(url).send().await.expect("download");
    assert_eq!(file.headers()["content-type"], "image/png");
    let bytes = file.bytes().await.expect("bytes");
    assert_eq!(decode_png(&bytes), (32, 32));
    assert_eq!(
        sim.stats().await["calls"][0]["image_sha256"],
        hex::encode(Sha256::digest(&bytes))
    );
}

/// The body of a streamed image answer: its (event, data) pairs, and whether it broke.
async fn image_events(response: reqwest::Response) -> (Vec<(String, Value)>, bool) {
    let mut body = Vec::new();
    let mut broken = false;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => body.extend_from_slice(&bytes),
            Err(_) => broken = true,
        }
    }
    let text = String::from_utf8(body).expect("UTF-8");
    let events = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (event, data) = e.split_once('\n').expect("an event line and a data line");
            let event = event.strip_prefix("event: ").expect("event line");
            let data = data.strip_prefix("data: ").expect("data line");
            let data: Value = serde_json::from_str(data).expect("event JSON");
            assert_eq!(data["type"], event, "the data repeats the event type");
            (event.to_owned(), data)
        })
        .collect();
    (events, broken)
}

fn b64_png(event: &Value) -> Vec<u8> {
    let b64 = event["b64_json"].as_str().expect("b64_json");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    assert_eq!(decode_png(&bytes), (64, 64));
    bytes
}

fn streamed_image(prompt: &str, partials: Option<u32>) -> Value {
    let mut body =
        json!({"model": "gpt-image-1", "prompt": prompt, "size": "64x64", "stream": true});
    if let Some(n) = partials {
        body["partial_images"] = json!(n);
    }
    body
}

#[tokio::test]
async fn a_streamed_image_sends_its_partials_then_the_image_over_the_delay() {
    let sim = start(Knobs {
        image_latency_ms: 300,
        ..quick()
    })
    .await;
    let started = Instant::now();
    let response = sim
        .post(
            "/v1/images/generations",
            &streamed_image("a red fox", Some(2)),
        )
        .send()
        .await
        .expect("image call");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (events, broken) = image_events(response).await;
    let elapsed = started.elapsed();
    assert!(!broken);
    assert!(elapsed >= Duration::from_millis(290), "took {elapsed:?}");
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );
    for (i, (_, partial)) in events.iter().take(2).enumerate() {
        assert_eq!(partial["partial_image_index"], i);
        assert_eq!(partial["size"], "64x64");
        assert_eq!(partial["quality"], "medium");
        assert_eq!(partial["background"], "opaque");
        assert_eq!(partial["output_format"], "png");
        b64_png(partial);
    }
    let completed = &events[2].1;
    let image = b64_png(completed);
    assert_eq!(completed["usage"]["output_tokens"], 1056 + 200);
    assert_eq!(completed["usage"]["input_tokens"], 3);
    assert_eq!(
        completed["usage"]["input_tokens_details"]["image_tokens"],
        0
    );

    // The completed image is the one a whole answer gives for the same prompt.
    let whole: Value = sim.image("a red fox").await.json().await.expect("JSON");
    assert_eq!(b64_png(&whole["data"][0]), image);

    let stats = sim.stats().await;
    assert_eq!(stats["image_calls"], 2);
    assert_eq!(stats["image_stream_requests"], 1);
    assert_eq!(stats["partials_sent"], 2);
    assert_eq!(
        stats["calls"][0]["image_sha256"],
        hex::encode(Sha256::digest(&image))
    );
    let requests = &stats["image_requests"];
    assert_eq!(requests[0]["stream"], true);
    assert_eq!(requests[0]["partial_images"], 2);
    assert_eq!(requests[0]["prompt"], "a red fox");
    assert_eq!(requests[1]["stream"], false);
    assert_eq!(requests[1]["partial_images"], Value::Null);
}

#[tokio::test]
async fn a_stream_without_partial_images_sends_only_the_completed_image() {
    let sim = start(quick()).await;
    let response = sim
        .post("/v1/images/generations", &streamed_image("an owl", None))
        .send()
        .await
        .expect("image call");
    let (events, broken) = image_events(response).await;
    assert!(!broken);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "image_generation.completed");
    assert_eq!(events[0].1["usage"]["output_tokens"], 1056);
    assert_eq!(sim.stats().await["partials_sent"], 0);
}

#[tokio::test]
async fn the_image_stream_knob_refuses_or_ignores_stream() {
    let sim = start(quick()).await;
    sim.control("/_sim/config", &json!({"image_stream": "refuse"}))
        .await;
    let refused = sim
        .post("/v1/images/generations", &streamed_image("a bat", Some(1)))
        .send()
        .await
        .expect("image call");
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.expect("error JSON");
    assert_eq!(
        body,
        json!({"error": {
            "message": "Unknown parameter: 'stream'.",
            "type": "invalid_request_error",
            "param": "stream",
            "code": "unknown_parameter",
        }})
    );
    assert_eq!(sim.image("a bat").await.status(), 200);

    let config = sim
        .control("/_sim/config", &json!({"image_stream": "ignore"}))
        .await;
    assert_eq!(config["image_stream"], "ignore");
    let ignored = sim
        .post("/v1/images/generations", &streamed_image("a bat", Some(1)))
        .send()
        .await
        .expect("image call");
    assert_eq!(ignored.status(), 200);
    assert_eq!(ignored.headers()["content-type"], "application/json");
    let body: Value = ignored.json().await.expect("JSON");
    b64_png(&body["data"][0]);

    let stats = sim.stats().await;
    assert_eq!(stats["image_stream_requests"], 2);
    assert_eq!(stats["partials_sent"], 0);
    let statuses: Vec<&Value> = stats["calls"]
        .as_array()
        .expect("calls")
        .iter()
        .map(|c| &c["status"])
        .collect();
    assert_eq!(statuses, [&json!(400), &json!(200), &json!(200)]);
}

#[tokio::test]
async fn a_cut_fault_on_an_image_stream_breaks_it_after_its_partials() {
    let sim = start(quick()).await;
    let fault = json!({"kind": "image", "fault": {"type": "cut", "after_partials": 1}, "times": 1});
    sim.control("/_sim/faults", &fault).await;
    let response = sim
        .post("/v1/images/generations", &streamed_image("a cut", Some(3)))
        .send()
        .await
        .expect("image call");
    assert_eq!(response.status(), 200);
    let (events, broken) = image_events(response).await;
    assert!(broken, "the body must end with an error, not a clean EOF");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "image_generation.partial_image");
    b64_png(&events[0].1);

    // The next attempt runs to its end.
    let response = sim
        .post("/v1/images/generations", &streamed_image("a cut", Some(3)))
        .send()
        .await
        .expect("image call");
    let (events, broken) = image_events(response).await;
    assert!(!broken);
    assert_eq!(events.len(), 4);
    let stats = sim.stats().await;
    assert_eq!(stats["partials_sent"], 4);
    assert_eq!(stats["calls"][0]["fault"], "cut");
}

#[tokio::test]
async fn a_status_fault_applies_to_an_image_stream() {
    let sim = start(quick()).await;
    sim.control(
        "/_sim/faults",
        &json!({"kind": "image", "fault": {"type": "status", "status": 429, "retry_after_secs": 1}, "times": 1}),
    )
    .await;
    let response = sim
        .post("/v1/images/generations", &streamed_image("a hare", Some(2)))
        .send()
        .await
        .expect("image call");
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let bad = sim
        .post("/v1/images/generations", &streamed_image("a hare", Some(4)))
        .send()
        .await
        .expect("image call");
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.expect("error JSON");
    assert_eq!(body["error"]["param"], "partial_images");
}

#[tokio::test]
async fn stats_count_every_call_and_reset_clears_them_and_the_knobs() {
    let sim = start(quick()).await;
    sim.control(
        "/_sim/faults",
        &json!({"kind": "image", "fault": {"type": "status", "status": 503}, "times": 1}),
    )
    .await;
    assert_eq!(sim.image("a wolf").await.status(), 503);
    assert_eq!(sim.image("a wolf").await.status(), 200);
    sim.chat("Wolf vs bear", false).await;
    sim.control("/_sim/config", &json!({"answer_tokens": 3}))
        .await;

    let stats = sim.stats().await;
    assert_eq!(
        (stats["chat_calls"].clone(), stats["image_calls"].clone()),
        (json!(1), json!(2))
    );
    let calls = stats["calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[0]["kind"], "image");
    assert_eq!(calls[0]["image_sha256"], Value::Null);
    assert_eq!(calls[2]["kind"], "chat");
    assert!(
        calls
            .iter()
            .all(|c| c["at_ms"].as_u64().expect("at_ms") > 1_600_000_000_000)
    );

    let knobs = sim.control("/_sim/reset", &json!({})).await;
    assert_eq!(knobs["answer_tokens"], 40);
    let stats = sim.stats().await;
    assert_eq!(stats["chat_calls"], 0);
    assert_eq!(stats["calls"], json!([]));
}

#[tokio::test]
async fn models_lists_the_default_models() {
    let sim = start(quick()).await;
    let body: Value = sim
        .http
        .get(format!("{}/v1/models", sim.base))
        .send()
        .await
        .expect("call")
        .json()
        .await
        .expect("JSON");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(ids.contains(&"gpt-4o-mini") && ids.contains(&"gpt-image-1"));
}

#[tokio::test]
async fn the_binary_prints_one_listening_line_with_the_real_port() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_versus-sim"))
        .args(["--addr", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn versus-sim");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("announced in time")
        .expect("read")
        .expect("a line");
    let base = line.strip_prefix("listening on ").expect("listening line");
    assert!(!base.ends_with(":0"), "{line}");
    let models = http_client()
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .expect("reachable");
    assert_eq!(models.status(), 200);
    child.start_kill().expect("stop the child");
}

#[tokio::test]
async fn a_thousand_concurrent_streams_all_finish() {
    let knobs = Knobs {
        ttft_ms: 50,
        tokens_per_sec: 100,
        answer_tokens: 20,
        ..quick()
    };
    let sim = start(knobs).await;
    let started = Instant::now();
    let streams = (0..1000).map(|i| {
        let request = sim.post(
            "/v1/chat/completions",
            &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": format!("fight {i}")}], "stream": true}),
        );
        async move {
            let text = request.send().await.expect("stream opens").text().await.expect("stream body");
            text.ends_with("data: [DONE]\n\n")
        }
    });
    let finished = futures::future::join_all(streams).await;
    assert!(finished.iter().all(|done| *done));
    assert_eq!(sim.stats().await["chat_calls"], 1000);
    eprintln!(
        "1000 streams of 20 paced tokens took {:?}",
        started.elapsed()
    );
}
