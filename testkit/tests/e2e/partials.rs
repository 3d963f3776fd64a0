//! Pictures drawn before the viewers' eyes (issue 32): the worker streams the picture with
//! partial images (`VERSUS_PARTIAL_IMAGES`), stores each in the object store (a real S3 server,
//! s3s-fs) and publishes it; the API forwards each as `event: partial` `{index, url}` with the
//! id `<attempt>:<index + 1>`, to every viewer, late ones and resuming ones included, and the
//! page shows each one before the final picture.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use versus_testkit::{System, SystemBuilder, eventually, sse, sse::SseEvent};

use crate::accessibility::assert_accessible;
use crate::browser::Browser;
use crate::{http, image_stream_url, quick, run};

/// The first bytes of every PNG file.
const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// How long a viewer may wait for the next event of a picture being drawn: the slowest one here
/// takes 6 s, twice when it is drawn again.
const NEXT_EVENT_WITHIN: Duration = Duration::from_secs(30);

/// How long the worker keeps a picture's partials after it is stored (30 s), with room.
const PARTIALS_REMOVED_WITHIN: Duration = Duration::from_secs(60);

/// A system that stores pictures in S3 and draws each with two partial images, over
/// `latency_ms` (the simulator sends the partials at a third and two thirds of it).
fn drawing(latency_ms: u64) -> SystemBuilder {
    quick()
        .s3()
        .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", latency_ms.to_string())
        .worker_env("VERSUS_PARTIAL_IMAGES", "2")
}

/// A `partial` event as a viewer reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Partial {
    attempt: i32,
    index: u32,
    url: String,
}

/// Reads a `partial` event, checking that its id is `<attempt>:<index + 1>` and its URL the
/// partial route's name for that picture, attempt and index.
fn partial_of(event: &SseEvent, key: &str) -> Partial {
    assert_eq!(event.event, "partial", "{event:?}");
    let data = event.json();
    let index = u32::try_from(data["index"].as_u64().expect("an index")).unwrap();
    let url = data["url"].as_str().expect("a URL").to_owned();
    let (attempt, count) = event
        .id
        .split_once(':')
        .unwrap_or_else(|| panic!("a partial's id is <attempt>:<count>: {event:?}"));
    let attempt: i32 = attempt.parse().unwrap();
    assert_eq!(count, (index + 1).to_string(), "{event:?}");
    assert_eq!(
        url,
        format!("/v1/images/partials/{key}-{attempt}-{index}.png"),
        "{event:?}"
    );
    Partial {
        attempt,
        index,
        url,
    }
}

/// `GET` a path of the API: status, headers and body.
async fn get(sys: &System, path: &str) -> (StatusCode, HeaderMap, Vec<u8>) {
    let response = http()
        .get(format!("{}{path}", sys.api_url()))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap().to_vec();
    (status, headers, body)
}

/// Fetches a partial image as a browser would the moment its event arrives; asserts that it
/// is a PNG served with a short cache lifetime, and returns its bytes.
async fn fetch_partial(sys: &System, partial: &Partial) -> Vec<u8> {
    let (status, headers, body) = get(sys, &partial.url).await;
    assert_eq!(status, StatusCode::OK, "{partial:?} is not served");
    assert_eq!(headers["content-type"], "image/png", "{partial:?}");
    assert_eq!(
        headers["cache-control"], "public, max-age=60",
        "{partial:?}"
    );
    assert!(body.starts_with(PNG_MAGIC), "{partial:?} is not a PNG");
    body
}

/// The stored picture's record: (status, image_path, image_sha256).
async fn record(sys: &System, key: &str) -> (String, Option<String>, Option<String>) {
    let rows: Vec<(String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT status, image_path, image_sha256 FROM generations WHERE key = $1")
            .bind(key)
            .fetch_all(&sys.db.pool().await)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1, "one record per picture: {rows:?}");
    rows[0].clone()
}

/// Checks the final picture a viewer was given by `done`: the stored one (its record under
/// `images/`, its bytes those the simulator completed and those in the bucket), never one of
/// `partials`; returns its bytes.
async fn assert_final_picture(
    sys: &System,
    key: &str,
    done: &SseEvent,
    partials: &[(Partial, Vec<u8>)],
) -> Vec<u8> {
    assert_eq!(done.event, "done", "{done:?}");
    let data = done.json();
    assert_eq!(data["key"], json!(key), "{done:?}");
    assert_eq!(data["model"], json!("gpt-image-1"), "{done:?}");
    assert_eq!(data["degraded"], json!(false), "{done:?}");
    let url = data["url"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with("/v1/images/") && !url.starts_with("/v1/images/partials/"),
        "{url}"
    );
    let (status, headers, bytes) = get(sys, &url).await;
    assert_eq!(status, StatusCode::OK, "{url}");
    assert_eq!(headers["content-type"], "image/png");
    assert!(bytes.starts_with(PNG_MAGIC));
    let sha256 = hex::encode(Sha256::digest(&bytes));

    // The stored record is the picture the simulator completed, under `images/`.
    let (status, path, stored_sha256) = record(sys, key).await;
    assert_eq!(status, "done");
    let path = path.expect("a stored picture has a path");
    assert!(
        path.starts_with("images/") && !path.contains("partial"),
        "{path}"
    );
    assert_eq!(stored_sha256.as_deref(), Some(sha256.as_str()));
    let completed: Vec<String> = sys
        .sim
        .calls_of("image")
        .await
        .iter()
        .filter(|c| c["status"] == 200)
        .filter_map(|c| c["image_sha256"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        completed.last(),
        Some(&sha256),
        "the simulator's completed picture: {completed:?}"
    );
    // In the bucket, the stored path holds the final picture's bytes.
    let objects = sys.s3.as_ref().unwrap().objects();
    let object = objects
        .iter()
        .find(|o| o.to_string_lossy().ends_with(&path))
        .unwrap_or_else(|| panic!("{path} is not in the bucket: {objects:?}"));
    assert_eq!(std::fs::read(object).unwrap(), bytes, "{path}");

    // No partial is served as the picture: not at its URL, and not at the picture route
    // under a partial's name.
    for (partial, partial_bytes) in partials {
        assert_ne!(
            &bytes, partial_bytes,
            "the final picture's URL serves {partial:?}"
        );
        let name = partial.url.rsplit('/').next().unwrap();
        let (status, _, _) = get(sys, &format!("/v1/images/{name}")).await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "the picture route serves {partial:?}"
        );
    }
    bytes
}

/// The next event a viewer gets, within [`NEXT_EVENT_WITHIN`]; panics if the stream ends.
async fn next(stream: &mut sse::SseStream, so_far: &[SseEvent]) -> SseEvent {
    stream
        .next_within(NEXT_EVENT_WITHIN)
        .await
        .unwrap_or_else(|| panic!("the stream ended before `done`: {so_far:?}"))
}

fn names(events: &[SseEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.as_str()).collect()
}

#[test]
fn a_picture_miss_streams_partials_that_are_served_while_it_is_drawn_then_the_stored_picture() {
    run(async {
        // Partials at 1.5 s and 3 s, the picture at 4.5 s.
        let sys = drawing(4500).start().await;
        let pool = sys.db.pool().await;
        let mut stream = sse::open(&image_stream_url(&sys, "Batman", "Superman"), None).await;
        let meta = next(&mut stream, &[]).await;
        assert_eq!(meta.event, "meta", "{meta:?}");
        assert_eq!(meta.json()["cached"], json!(false));
        let key = meta.json()["key"].as_str().unwrap().to_owned();

        let mut events = vec![meta];
        let mut partials: Vec<(Partial, Vec<u8>)> = Vec::new();
        let done = loop {
            let event = next(&mut stream, &events).await;
            events.push(event.clone());
            match event.event.as_str() {
                "partial" => {
                    let partial = partial_of(&event, &key);
                    // Fetched the moment it arrives, while the picture is still being drawn.
                    let bytes = fetch_partial(&sys, &partial).await;
                    let status: String =
                        sqlx::query_scalar("SELECT status FROM generations WHERE key = $1")
                            .bind(&key)
                            .fetch_one(&pool)
                            .await
                            .unwrap();
                    assert_eq!(
                        status, "running",
                        "{partial:?} was served while the picture was drawn"
                    );
                    partials.push((partial, bytes));
                }
                "done" => break event,
                _ => panic!("unexpected event {event:?}; events so far: {events:?}"),
            }
        };
        assert_eq!(stream.next().await, None, "the stream ends with `done`");
        assert_eq!(names(&events), ["meta", "partial", "partial", "done"]);
        let attempt = partials[0].0.attempt;
        for (i, (partial, _)) in partials.iter().enumerate() {
            assert_eq!(partial.index as usize, i, "{partials:?}");
            assert_eq!(partial.attempt, attempt, "{partials:?}");
        }
        assert_ne!(
            partials[0].1, partials[1].1,
            "each partial is a new drawing"
        );

        assert_final_picture(&sys, &key, &done, &partials).await;
        assert_eq!(sys.sim.image_calls().await, 1);
        let stats = sys.sim.stats().await;
        assert_eq!(stats["partials_sent"], json!(2), "{stats}");
        let asked = &stats["image_requests"][0];
        assert_eq!(asked["stream"], json!(true), "{asked}");
        assert_eq!(asked["partial_images"], json!(2), "{asked}");

        // The spend counts the two partials' image output tokens (100 each).
        let spend_of_pictures = || async {
            sqlx::query_as::<_, (String, i64, i64, i64)>(
                "SELECT model, calls, images, output_tokens FROM spend WHERE kind = 'image'",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        };
        eventually("the picture's spend", Duration::from_secs(10), || async {
            !spend_of_pictures().await.is_empty()
        })
        .await;
        let spend = spend_of_pictures().await;
        assert_eq!(spend, [("gpt-image-1".to_owned(), 1, 1, 200)]);

        // Once the picture is stored, its partials are removed: gone from the bucket and no
        // longer served (the picture still is).
        eventually(
            "the partials to be removed",
            PARTIALS_REMOVED_WITHIN,
            || async {
                sys.s3
                    .as_ref()
                    .unwrap()
                    .objects()
                    .iter()
                    .all(|o| !o.to_string_lossy().contains("partials"))
            },
        )
        .await;
        for (partial, _) in &partials {
            let (status, _, _) = get(&sys, &partial.url).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{partial:?} once removed");
        }
        let objects = sys.s3.as_ref().unwrap().objects();
        assert_eq!(objects.len(), 1, "the picture alone: {objects:?}");
        let url = done.json()["url"].as_str().unwrap().to_owned();
        assert_eq!(get(&sys, &url).await.0, StatusCode::OK);
    });
}

#[test]
fn a_late_viewer_gets_every_partial_so_far_and_a_resume_gets_exactly_what_it_missed() {
    run(async {
        // Partials at 2 s and 4 s, the picture at 6 s: the viewers below arrive between the
        // first partial and the second.
        let sys = drawing(6000).start().await;
        let url = image_stream_url(&sys, "Godzilla", "King Kong");
        let mut first = sse::open(&url, None).await;
        let mut seen = vec![next(&mut first, &[]).await];
        assert_eq!(seen[0].event, "meta", "{seen:?}");
        let key = seen[0].json()["key"].as_str().unwrap().to_owned();
        let event = next(&mut first, &seen).await;
        seen.push(event.clone());
        let partial = partial_of(&event, &key);
        assert_eq!(partial.index, 0, "{seen:?}");
        let held = event.id.clone();
        assert_eq!(held, format!("{}:1", partial.attempt));

        // A second viewer arrives now, and a viewer that holds the first partial comes back.
        let mut late = sse::open(&url, None).await;
        let mut resumed = sse::open(&url, Some(&held)).await;
        let sent = sys.sim.stats().await["partials_sent"].clone();
        assert_eq!(
            sent,
            json!(1),
            "the viewers arrived after the first partial and before the second"
        );
        let (rest, late, resumed) = tokio::join!(
            first.collect_all(),
            late.collect_all(),
            resumed.collect_all()
        );
        seen.extend(rest);

        assert_eq!(names(&seen), ["meta", "partial", "partial", "done"]);
        let partials: Vec<Partial> = seen[1..3].iter().map(|e| partial_of(e, &key)).collect();
        assert_eq!(partials[1].index, 1);
        assert_eq!(partials[1].attempt, partial.attempt);

        // The late viewer: the first partial (replayed), then the second, then the picture,
        // exactly as the first viewer got them.
        assert_eq!(
            names(&late),
            ["meta", "partial", "partial", "done"],
            "{late:?}"
        );
        assert_eq!(late[0].json()["key"], json!(key));
        assert_eq!(late[1..], seen[1..], "the late viewer's events");

        // The resumed viewer: what it missed (the second partial and the picture), not the
        // first partial again.
        assert_eq!(names(&resumed), ["meta", "partial", "done"], "{resumed:?}");
        assert_eq!(resumed[1..], seen[2..], "what the resumed viewer missed");

        let done = seen.last().unwrap();
        let mut fetched = Vec::new();
        for partial in partials {
            let bytes = fetch_partial(&sys, &partial).await;
            fetched.push((partial, bytes));
        }
        assert_final_picture(&sys, &key, done, &fetched).await;
        assert_eq!(sys.sim.image_calls().await, 1, "one picture drawn for all");
    });
}

#[test]
fn an_attempt_cut_after_a_partial_is_reset_and_drawn_again_and_nothing_partial_is_stored() {
    run(async {
        // Partials at 1 s and 2 s, the picture at 3 s; the first try is cut after its first
        // partial.
        let sys = drawing(3000).start().await;
        sys.sim
            .fault(json!({
                "kind": "image",
                "fault": {"type": "cut", "after_partials": 1},
                "times": 1,
            }))
            .await;
        let url = image_stream_url(&sys, "Alien", "Predator");
        let mut stream = sse::open(&url, None).await;
        let meta = next(&mut stream, &[]).await;
        assert_eq!(meta.event, "meta", "{meta:?}");
        let key = meta.json()["key"].as_str().unwrap().to_owned();

        let mut events = vec![meta];
        let mut partials: Vec<(Partial, Vec<u8>)> = Vec::new();
        let mut resumed = None;
        let done = loop {
            let event = next(&mut stream, &events).await;
            events.push(event.clone());
            match event.event.as_str() {
                "partial" => {
                    let partial = partial_of(&event, &key);
                    let bytes = fetch_partial(&sys, &partial).await;
                    partials.push((partial, bytes));
                }
                "reset" => {
                    // A viewer that holds the cut attempt's partial comes back now.
                    let held = events
                        .iter()
                        .rev()
                        .find(|e| e.event == "partial")
                        .unwrap_or_else(|| panic!("`reset` before any partial: {events:?}"))
                        .id
                        .clone();
                    resumed = Some(sse::open(&url, Some(&held)).await);
                }
                "done" => break event,
                _ => panic!("unexpected event {event:?}; events so far: {events:?}"),
            }
        };
        assert_eq!(
            names(&events),
            ["meta", "partial", "reset", "partial", "partial", "done"],
            "{events:?}"
        );
        let (cut, again) = (&partials[0].0, &partials[1].0);
        assert_eq!(cut.index, 0);
        assert!(
            again.attempt > cut.attempt,
            "the next try is a new attempt: {partials:?}"
        );
        for (i, (partial, _)) in partials[1..].iter().enumerate() {
            assert_eq!(partial.attempt, again.attempt, "{partials:?}");
            assert_eq!(partial.index as usize, i, "the partials start afresh");
        }

        // A viewer resuming with the cut attempt's id: `reset`, then the new attempt's
        // partials from the first, then the picture.
        let resumed = resumed
            .expect("a viewer resumed at the reset")
            .collect_all()
            .await;
        assert_eq!(
            names(&resumed),
            ["meta", "reset", "partial", "partial", "done"],
            "{resumed:?}"
        );
        assert_eq!(resumed[2..], events[3..], "the resumed viewer's events");

        assert_final_picture(&sys, &key, &done, &partials).await;
        let calls = sys.sim.calls_of("image").await;
        assert_eq!(
            calls.len(),
            2,
            "the cut call and the one drawn again: {calls:?}"
        );
    });
}

#[test]
fn an_upstream_that_refuses_to_stream_pictures_still_draws_them_without_partials() {
    run(async {
        // One worker: it remembers that this upstream does not stream.
        let sys = drawing(100)
            .workers(1)
            .sim_env("VERSUS_SIM_IMAGE_STREAM", "refuse")
            .start()
            .await;
        for (i, (a, b)) in [("Cat", "Mouse"), ("Tortoise", "Hare")]
            .into_iter()
            .enumerate()
        {
            let events = sse::open(&image_stream_url(&sys, a, b), None)
                .await
                .collect_all()
                .await;
            assert_eq!(names(&events), ["meta", "done"], "{a} vs {b}: {events:?}");
            let key = events[0].json()["key"].as_str().unwrap().to_owned();
            assert_final_picture(&sys, &key, &events[1], &[]).await;

            let stats = sys.sim.stats().await;
            assert_eq!(stats["partials_sent"], json!(0), "{stats}");
            // One streamed request, refused, then plain ones only.
            assert_eq!(stats["image_stream_requests"], json!(1), "{stats}");
            let asked: Vec<bool> = stats["image_requests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["stream"] == json!(true))
                .collect();
            let statuses: Vec<Value> = sys
                .sim
                .calls_of("image")
                .await
                .iter()
                .map(|c| c["status"].clone())
                .collect();
            if i == 0 {
                assert_eq!(asked, [true, false], "{stats}");
                assert_eq!(statuses, [json!(400), json!(200)]);
            } else {
                assert_eq!(asked, [true, false, false], "{stats}");
                assert_eq!(statuses, [json!(400), json!(200), json!(200)]);
            }
        }
    });
}

#[test]
fn an_upstream_that_ignores_stream_draws_pictures_without_partials() {
    run(async {
        let sys = drawing(100)
            .sim_env("VERSUS_SIM_IMAGE_STREAM", "ignore")
            .start()
            .await;
        let events = sse::open(&image_stream_url(&sys, "Kirk", "Picard"), None)
            .await
            .collect_all()
            .await;
        assert_eq!(names(&events), ["meta", "done"], "{events:?}");
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        assert_final_picture(&sys, &key, &events[1], &[]).await;
        let calls = sys.sim.calls_of("image").await;
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0]["status"], 200);
    });
}

/// Every `src` the `<img>` elements of the picture's frame have had, in order (recorded by
/// [`record_frame`]).
async fn frame_sources(browser: &Browser) -> Vec<String> {
    let sources = browser.js("return window.frameSources;").await;
    sources
        .as_array()
        .unwrap_or_else(|| panic!("no sources recorded: {sources}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Makes the page record in `window.frameSources` every `src` an `<img>` of the picture's
/// frame takes, in order (test code watching the page; the page exposes nothing for tests).
async fn record_frame(browser: &Browser) {
    browser
        .js("window.frameSources = []; \
             const frame = document.querySelector('#picture .picture-frame'); \
             const note = () => { \
               for (const img of frame.querySelectorAll('img')) { \
                 const src = img.getAttribute('src') || ''; \
                 if (src && window.frameSources[window.frameSources.length - 1] !== src \
                     && !window.frameSources.includes(src)) window.frameSources.push(src); \
               } \
             }; \
             new MutationObserver(note).observe(frame, \
               { childList: true, subtree: true, attributes: true, attributeFilter: ['src'] }); \
             return true;")
        .await;
}

#[test]
fn the_page_shows_a_partial_before_the_final_picture_and_passes_axe_core() {
    run(async {
        // Partials at 2 s and 4 s, the picture at 6 s.
        let sys = drawing(6000).start().await;
        let browser = Browser::start().await;
        browser
            .goto(&format!("{}/?a=Batman&b=Superman", sys.api_url()))
            .await;
        browser
            .wait_for(
                "the picture's own button",
                "!document.getElementById('draw').hidden",
            )
            .await;
        record_frame(&browser).await;
        browser
            .find("#draw")
            .await
            .click()
            .await
            .expect("press Draw the picture");

        // A partial, loaded, in the picture's frame, while the picture is drawn.
        browser
            .wait_for(
                "a partial image shown in the picture's frame",
                "document.getElementById('picture').dataset.state === 'drawing' \
                 && [...document.querySelectorAll('#picture .picture-frame img')].some((img) => \
                      (img.getAttribute('src') || '').startsWith('/v1/images/partials/') \
                      && img.complete && img.naturalWidth > 0)",
            )
            .await;
        browser.screenshot("picture-partial").await;
        assert_accessible(&browser, "picture being drawn").await;

        browser
            .wait_for(
                "the picture to be drawn or given up",
                "['ready', 'unavailable']\
                 .includes(document.getElementById('picture').dataset.state)",
            )
            .await;
        let shown = browser
            .js("const p = document.getElementById('picture'); \
                 return [p.dataset.state, \
                   [...p.querySelectorAll('.picture-frame img')].map((img) => \
                     [img.getAttribute('src') || '', img.naturalWidth])];")
            .await;
        assert_eq!(
            shown[0],
            json!("ready"),
            "the picture was not shown: {shown}"
        );
        let images = shown[1].as_array().unwrap();
        assert_eq!(images.len(), 1, "the picture alone in its frame: {shown}");
        let final_src = images[0][0].as_str().unwrap().to_owned();
        assert!(
            final_src.starts_with("/v1/images/") && !final_src.contains("/partials/"),
            "the final picture: {shown}"
        );
        assert!(images[0][1].as_u64().unwrap_or(0) > 0, "it loaded: {shown}");

        // The frame showed a partial first, then the final picture.
        let sources = frame_sources(&browser).await;
        let first_partial = sources
            .iter()
            .position(|s| s.starts_with("/v1/images/partials/"))
            .unwrap_or_else(|| panic!("no partial in the frame: {sources:?}"));
        let first_final = sources
            .iter()
            .position(|s| *s == final_src)
            .unwrap_or_else(|| panic!("the final picture never in the frame: {sources:?}"));
        assert!(
            first_partial < first_final,
            "a partial before the final picture: {sources:?}"
        );
        assert_accessible(&browser, "picture drawn").await;
        browser.screenshot("picture-after-partials").await;
        browser.close().await;
    });
}
