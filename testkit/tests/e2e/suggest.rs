//! Suggestions as you type (`GET /v1/names/suggest?q=`): the names of stored answers, found by
//! prefix and by small typos whatever the case or punctuation, at every replica and edge; never
//! a name only a refused matchup holds, nor one whose answers were purged; a bad query is 400,
//! and the route counts against the client's look-up rate.

use std::time::Duration;

use serde_json::{Value, json};
use versus_testkit::eventually;

use crate::{fight, fight_at, http, quick, run, shape};

const TOKEN: &str = "suggest-admin-token-0123456789abcdef";

/// How long a stored name may take to be suggested: the replica's watch hears of the answer in
/// milliseconds and builds its index again within a second; an edge's mirror adds its own lag.
/// Generous for a loaded two-core machine running another test beside this one.
const SUGGESTED_WITHIN: Duration = Duration::from_secs(10);

/// The suggestions' URL at `api`, for `q` (none: no `q` at all).
fn suggest_url(api: &str, q: Option<&str>) -> reqwest::Url {
    let url = format!("{api}/v1/names/suggest");
    match q {
        Some(q) => reqwest::Url::parse_with_params(&url, &[("q", q)]),
        None => reqwest::Url::parse(&url),
    }
    .unwrap()
}

/// `GET /v1/names/suggest?q=` at `api`: the status and the body.
async fn ask(api: &str, q: &str) -> (u16, Value) {
    let response = http().get(suggest_url(api, Some(q))).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// The names suggested for `q` at `api`.
async fn suggested(api: &str, q: &str) -> Vec<String> {
    let (status, body) = ask(api, q).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body["names"].clone()).unwrap()
}

/// Waits until `q` at `api` lists `name`.
async fn until_suggested(api: &str, q: &str, name: &str) {
    eventually(
        &format!("`{q}` suggests {name}"),
        SUGGESTED_WITHIN,
        || async { suggested(api, q).await.iter().any(|n| n == name) },
    )
    .await;
}

/// A fight that ends `done`: its key.
async fn stored(api: &str, a: &str, b: &str) -> String {
    let events = fight_at(api, a, b).await;
    assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
    events[0].json()["key"].as_str().unwrap().to_owned()
}

#[test]
fn a_stored_name_is_suggested_by_prefix_typo_and_case_until_its_answer_is_purged() {
    run(async {
        let sys = quick().env("VERSUS_ADMIN_TOKEN", TOKEN).start().await;
        let api = sys.api_url();
        assert!(suggested(api, "spid").await.is_empty());
        let key = stored(api, "Spider-Man", "Hulk").await;
        until_suggested(api, "spid", "Spider-Man").await;
        for q in ["spidrman", "SPIDER", "spider man", "Spider-Man"] {
            assert_eq!(suggested(api, q).await, ["Spider-Man"], "{q}");
        }
        assert_eq!(suggested(api, "hul").await, ["Hulk"]);
        // Briefly cacheable, as JSON.
        let response = http()
            .get(format!("{api}/v1/names/suggest?q=spid"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()["cache-control"],
            "public, max-age=60",
            "{response:?}"
        );
        assert_eq!(response.headers()["content-type"], "application/json");

        // A purged answer's names leave the suggestions.
        let purged = http()
            .delete(format!("{api}/v1/admin/fights/{key}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(purged.status(), 204);
        eventually("the purged names leave", SUGGESTED_WITHIN, || async {
            suggested(api, "spid").await.is_empty() && suggested(api, "hulk").await.is_empty()
        })
        .await;
    });
}

#[test]
fn a_name_only_in_a_refused_matchup_is_never_suggested() {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_MODERATION_FLAGS", "villain=hate")
            .start()
            .await;
        let api = sys.api_url();
        let refused = fight(&sys, "Villain Lord", "Paladin").await;
        assert_eq!(shape(&refused), ["meta", "error"], "{refused:?}");
        assert_eq!(refused[1].json()["code"], json!("refused"), "{refused:?}");
        // An answer stored after the refusal: once its names are suggested, the index has seen
        // everything before it.
        stored(api, "Squire", "Knight").await;
        until_suggested(api, "knig", "Knight").await;
        for q in ["villain", "vilain lord", "paladin", "pala"] {
            assert!(suggested(api, q).await.is_empty(), "{q}");
        }
    });
}

#[test]
fn a_name_stored_through_the_hub_is_suggested_at_every_edge() {
    run(async {
        let sys = quick().edges(2).start().await;
        stored(sys.api_url(), "Spider-Man", "Hulk").await;
        for edge in &sys.edges {
            until_suggested(edge.api_url(), "spidrman", "Spider-Man").await;
            assert_eq!(suggested(edge.api_url(), "SPIDER").await, ["Spider-Man"]);
        }
    });
}

#[test]
fn a_missing_empty_or_too_long_query_is_refused_and_suggestions_count_as_look_ups() {
    run(async {
        let sys = quick()
            .workers(1)
            .api_env("VERSUS_CLIENT_LOOKUPS_PER_SECOND", "1")
            .api_env("VERSUS_CLIENT_LOOKUPS_BURST", "5")
            .start()
            .await;
        let api = sys.api_url();
        let long = "x".repeat(101);
        for q in [Some(""), Some("   "), Some(long.as_str()), None] {
            let response = http().get(suggest_url(api, q)).send().await.unwrap();
            assert_eq!(response.status(), 400, "{q:?}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(
                body["error"]["code"],
                json!("invalid_query"),
                "{q:?}: {body}"
            );
        }
        // The fifth look-up of the burst, then none until the rate allows one.
        assert_eq!(ask(api, "x").await.0, 200);
        let (status, body) = ask(api, "x").await;
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["error"]["code"], json!("rate_limited"), "{body}");
    });
}
