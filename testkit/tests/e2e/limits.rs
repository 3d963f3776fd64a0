//! Safe on the open internet: what a request may start, and what it may cost.

use serde_json::{Value, json};

use crate::{fight, http, quick, stream_url};

/// `GET url` with `headers`: the status and the whole body.
async fn get_with(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = http().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn a_miss_from_another_site_gets_403_and_costs_nothing_while_hits_and_allowed_sites_work() {
    let sys = quick()
        .api_env("VERSUS_ALLOWED_ORIGINS", "https://versus.example")
        .start()
        .await;
    let api = sys.api_url().to_owned();
    let refused_by = [
        ("origin", "https://elsewhere.example"),
        ("sec-fetch-site", "cross-site"),
    ];
    for header in refused_by {
        for url in [
            stream_url(&sys, "Kraken", "Leviathan"),
            format!("{api}/v1/images/stream?a=Kraken&b=Leviathan"),
        ] {
            let (status, body) = get_with(&url, &[header]).await;
            assert_eq!(status, 403, "{header:?} {url}: {body}");
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["error"]["code"], json!("cross_site"), "{body}");
        }
        for route in ["fights", "images"] {
            let response = http()
                .post(format!("{api}/v1/{route}"))
                .header(header.0, header.1)
                .json(&json!({"a": "Kraken", "b": "Leviathan"}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 403, "{header:?} POST /v1/{route}");
        }
    }
    assert_eq!(sys.sim.chat_calls().await, 0);
    assert_eq!(sys.sim.image_calls().await, 0);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM generations")
        .fetch_one(&sys.db.pool().await)
        .await
        .unwrap();
    assert_eq!(rows, 0, "nothing was claimed");

    // The page's own requests (its Origin is the API's), an allowed site's and curl's start
    // generations.
    let own = get_with(
        &stream_url(&sys, "Kraken", "Leviathan"),
        &[("origin", &api)],
    )
    .await;
    let allowed = get_with(
        &stream_url(&sys, "Golem", "Titan"),
        &[
            ("origin", "https://versus.example"),
            ("sec-fetch-site", "same-site"),
        ],
    )
    .await;
    for (status, body) in [&own, &allowed] {
        assert_eq!(*status, 200, "{body}");
        assert!(body.contains("event: done"), "{body}");
    }
    let curl = fight(&sys, "Hydra", "Cerberus").await;
    assert_eq!(curl.last().unwrap().event, "done", "{curl:?}");
    assert_eq!(sys.sim.chat_calls().await, 3);

    // A hit costs nothing: it is served whoever asks.
    let (status, body) = get_with(
        &stream_url(&sys, "Kraken", "Leviathan"),
        &[("origin", "https://elsewhere.example")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"cached\":true"), "{body}");
    assert_eq!(sys.sim.chat_calls().await, 3);
}
