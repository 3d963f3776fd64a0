//! Reports: visitors flag a stored answer or picture (`POST /v1/{fights,images}/{key}/report`);
//! one report per client per answer counts; `VERSUS_REPORTS_TO_HIDE` clients (3 by default)
//! who find it unsafe hide it at once everywhere (the API's memory, the bucket, the edges'
//! mirrors, the preview), where it is served as `refused` and not generated again until an
//! operator decides (`GET /v1/admin/reports`, `POST /v1/admin/reports/{kind}/{key}`). A report
//! costs no upstream call.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use versus_testkit::{eventually, pictures_in, sse};

use crate::{fight_at, http, image_stream_url, quick, run, stream_url_at, text_of, worker_metric};

const TOKEN: &str = "reports-admin-token-0123456789abcdef";

/// How soon a hidden answer is refused at every API, the edges' included (issue 29's bound).
const HIDDEN_EVERYWHERE_WITHIN: Duration = Duration::from_secs(2);

/// Reports `<kind>/<key>` at the API serving at `api`, as `client` (through the test's
/// loopback proxy); returns the status and the body.
async fn report(api: &str, kind: &str, key: &str, client: &str, reason: &str) -> (u16, Value) {
    let response = http()
        .post(format!("{api}/v1/{kind}/{key}/report"))
        .header("x-forwarded-for", client)
        .json(&json!({ "reason": reason }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Whether a report counted (202 and `counted`).
async fn counted(api: &str, kind: &str, key: &str, client: &str, reason: &str) -> bool {
    let (status, body) = report(api, kind, key, client, reason).await;
    assert_eq!(status, 202, "{body}");
    body["counted"].as_bool().unwrap()
}

/// The admin list's entry for `key`.
async fn listed(api: &str, key: &str) -> Value {
    let list: Value = http()
        .get(format!("{api}/v1/admin/reports"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == key)
        .cloned()
        .unwrap_or_else(|| panic!("{key} is not listed: {list}"))
}

/// Settles the reports of `<kind>/<key>` with `action`; returns the status.
async fn settle(api: &str, kind: &str, key: &str, action: &str) -> u16 {
    http()
        .post(format!("{api}/v1/admin/reports/{kind}/{key}"))
        .bearer_auth(TOKEN)
        .json(&json!({ "action": action }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// How a fight asked of `api` ends: `done` or the error's code.
async fn ending(api: &str, a: &str, b: &str) -> String {
    let events = fight_at(api, a, b).await;
    let last = events.last().unwrap();
    match last.event.as_str() {
        "error" => last.json()["code"].as_str().unwrap().to_owned(),
        other => other.to_owned(),
    }
}

/// The `og:title` of the page of a fight at `api`.
async fn preview_title(api: &str, a: &str, b: &str) -> String {
    let url = reqwest::Url::parse_with_params(&format!("{api}/"), &[("a", a), ("b", b)]).unwrap();
    let html = http().get(url).send().await.unwrap().text().await.unwrap();
    let marker = "property=\"og:title\" content=\"";
    let start = html.find(marker).map(|i| i + marker.len()).unwrap();
    html[start..].split('"').next().unwrap().to_owned()
}

#[test]
fn three_clients_reporting_an_answer_unsafe_hide_it_everywhere_until_an_operator_keeps_it() {
    run(async {
        let sys = quick()
            .edges(2)
            .env("VERSUS_ADMIN_TOKEN", TOKEN)
            .api_env("VERSUS_TRUSTED_PROXIES", "127.0.0.1/32")
            .start()
            .await;
        let (a, b) = ("Rude Robot", "Polite Panda");
        let hub = sys.api_url();
        let events = fight_at(hub, a, b).await;
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        let text = text_of(&events);
        for edge in &sys.edges {
            eventually(
                "the edge serves the answer",
                Duration::from_secs(10),
                || async { ending(edge.api_url(), a, b).await == "done" },
            )
            .await;
        }
        assert!(preview_title(hub, a, b).await.contains(a));

        // Two clients find it unsafe: an IPv4 address and an IPv6 /48, whose other /64s are
        // the same client; nobody's second report counts, and another reason hides nothing.
        assert!(counted(hub, "fights", &key, "198.51.100.1", "unsafe").await);
        assert!(counted(hub, "fights", &key, "2001:db8:7::1", "unsafe").await);
        assert!(!counted(hub, "fights", &key, "2001:db8:7:ffff::2", "unsafe").await);
        assert!(!counted(hub, "fights", &key, "198.51.100.1", "unsafe").await);
        assert!(counted(hub, "fights", &key, "198.51.100.3", "wrong").await);
        assert_eq!(
            ending(hub, a, b).await,
            "done",
            "two unsafe clients hide nothing"
        );

        // The third client, at an edge: hidden at once everywhere.
        assert!(
            counted(
                sys.edges[0].api_url(),
                "fights",
                &key,
                "198.51.100.4",
                "unsafe"
            )
            .await
        );
        let hidden = Instant::now();
        let apis: Vec<&str> = std::iter::once(hub)
            .chain(sys.edges.iter().map(|e| e.api_url()))
            .collect();
        eventually(
            "every API refuses the hidden answer",
            HIDDEN_EVERYWHERE_WITHIN,
            || async {
                for api in &apis {
                    if ending(api, a, b).await != "refused" {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        eprintln!(
            "hidden at the hub and both edges {:?} after the report",
            hidden.elapsed()
        );
        for api in &apis {
            let by_key = http()
                .get(format!("{api}/v1/fights/{key}"))
                .send()
                .await
                .unwrap();
            assert_eq!(by_key.status(), 404, "{api}");
        }
        let title = preview_title(hub, a, b).await;
        assert!(!title.contains(a), "{title}");
        assert_eq!(
            sys.sim.chat_calls().await,
            1,
            "reports cost no upstream call"
        );
        assert_eq!(
            worker_metric(&sys, "versus_answers_hidden_total", "text").await,
            1.0
        );

        let entry = listed(hub, &key).await;
        assert_eq!(entry["state"], "hidden", "{entry}");
        assert_eq!(
            entry["counts"],
            json!({"unsafe": 3, "wrong": 1, "poor": 0, "other": 0})
        );
        assert_eq!(
            (entry["a"].as_str(), entry["b"].as_str()),
            (Some(a), Some(b))
        );

        // Kept: the same answer is back everywhere, and more unsafe reports do not hide it.
        assert_eq!(settle(hub, "text", &key, "keep").await, 204);
        eventually(
            "every API serves the kept answer",
            HIDDEN_EVERYWHERE_WITHIN,
            || async {
                for api in &apis {
                    if ending(api, a, b).await != "done" {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        let again = fight_at(sys.edges[1].api_url(), a, b).await;
        assert_eq!(text_of(&again), text);
        for client in ["198.51.100.5", "198.51.100.6", "198.51.100.7"] {
            assert!(counted(hub, "fights", &key, client, "unsafe").await);
        }
        assert_eq!(ending(hub, a, b).await, "done");
        assert_eq!(listed(hub, &key).await["state"], "kept");
        assert_eq!(sys.sim.chat_calls().await, 1);
    });
}

#[test]
fn a_report_is_checked_before_anything_and_costs_nothing() {
    run(async {
        let sys = quick().env("VERSUS_ADMIN_TOKEN", TOKEN).start().await;
        let api = sys.api_url();
        let events = fight_at(api, "Checked Cat", "Tested Tiger").await;
        let key = events[0].json()["key"].as_str().unwrap().to_owned();

        let unknown = "0123456789abcdef0123456789abcdef";
        let (status, body) = report(api, "fights", unknown, "127.0.0.1", "unsafe").await;
        assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));
        let (status, body) = report(api, "fights", "not-a-key", "127.0.0.1", "unsafe").await;
        assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")));
        let (status, body) = report(api, "fights", &key, "127.0.0.1", "boring").await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("invalid_body"))
        );

        // Another site's page cannot have its visitors report (each would be a client).
        for (name, value) in [
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://evil.example"),
        ] {
            let response = http()
                .post(format!("{api}/v1/fights/{key}/report"))
                .header(name, value)
                .json(&json!({"reason": "unsafe"}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 403, "{name}: {value}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "cross_site");
        }

        // A picture that was never drawn cannot be reported.
        let (status, _) = report(api, "images", &key, "127.0.0.1", "unsafe").await;
        assert_eq!(status, 404);
        assert!(counted(api, "fights", &key, "127.0.0.1", "poor").await);
        assert_eq!(listed(api, &key).await["counts"]["poor"], 1);
        assert_eq!(sys.sim.chat_calls().await, 1);
        assert_eq!(sys.sim.image_calls().await, 0);
    });
}

#[test]
fn a_reported_picture_is_hidden_and_an_operator_refuses_it_for_good_or_purges_an_answer() {
    run(async {
        let sys = quick()
            .s3()
            .sim_env("VERSUS_SIM_IMAGE_LATENCY_MS", "100")
            .env("VERSUS_ADMIN_TOKEN", TOKEN)
            .api_env("VERSUS_TRUSTED_PROXIES", "127.0.0.1/32")
            .worker_env("VERSUS_REPORTS_TO_HIDE", "2")
            .start()
            .await;
        let api = sys.api_url();
        let (a, b) = ("Grim Gargoyle", "Sunny Sprite");
        let drawn = sse::open(&image_stream_url(&sys, a, b), None)
            .await
            .collect_all()
            .await;
        let done = drawn.last().unwrap().json();
        let image_key = done["key"].as_str().unwrap().to_owned();
        let file = format!("{api}{}", done["url"].as_str().unwrap());
        assert_eq!(http().get(&file).send().await.unwrap().status(), 200);

        assert!(counted(api, "images", &image_key, "198.51.100.1", "unsafe").await);
        assert!(counted(api, "images", &image_key, "198.51.100.2", "unsafe").await);
        let redrawn = sse::open(&image_stream_url(&sys, a, b), None)
            .await
            .collect_all()
            .await;
        let last = redrawn.last().unwrap();
        assert_eq!(
            (last.event.as_str(), &last.json()["code"]),
            ("error", &json!("refused"))
        );
        assert_eq!(http().get(&file).send().await.unwrap().status(), 404);
        assert_eq!(
            pictures_in(sys.s3.as_ref().unwrap().objects()),
            1,
            "hidden, not deleted"
        );
        assert_eq!(listed(api, &image_key).await["state"], "hidden");

        // Refused for good: the picture is deleted, and nothing brings it back.
        assert_eq!(settle(api, "image", &image_key, "refuse").await, 204);
        assert_eq!(pictures_in(sys.s3.as_ref().unwrap().objects()), 0);
        assert_eq!(listed(api, &image_key).await["state"], "refused");
        assert_eq!(settle(api, "image", &image_key, "keep").await, 404);
        assert_eq!(sys.sim.image_calls().await, 1, "never drawn again");

        // A text answer purged by the operator is generated anew on the next request.
        let events = fight_at(api, a, b).await;
        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        assert!(counted(api, "fights", &key, "198.51.100.1", "wrong").await);
        assert_eq!(settle(api, "text", &key, "purge").await, 204);
        assert_eq!(
            settle(api, "text", &key, "purge").await,
            404,
            "no reports left"
        );
        let url = stream_url_at(api, a, b);
        let again = sse::open(&url, None).await.collect_all().await;
        assert_eq!(again[0].json()["cached"], json!(false));
        assert_eq!(again.last().unwrap().event, "done");
        assert_eq!(sys.sim.chat_calls().await, 2);
    });
}
