//! Edges: a 3-node hub and two leaf edges, each edge a nats-server with a mirror of the
//! answers bucket and an API replica of its own. An answer made through one edge is a hit at
//! the other; a purge reaches every edge; an edge cut off from the hub serves hits, refuses
//! misses at once, and catches up when the link returns.

use std::time::{Duration, Instant};

use versus_shared::wire;
use versus_testkit::{Edge, NatsUser, System, eventually};

use crate::{fight_at, http, metric, metrics_of, quick, rows, run, shape, text_of};

const TOKEN: &str = "edge-admin-token-0123456789abcdef";

/// How long a purge may take to reach both edges (their mirrors and their memory). A connected
/// edge hears the purge notice in milliseconds, and its mirror gets the purge markers within
/// a second (README.md, "A purge is final"); but this test runs a hub of three, two edges and
/// their programs beside another test on two cores, where either can lag by seconds. An edge
/// that hears of the purge by neither path still fails.
const PURGE_REACHES_EDGES_WITHIN: Duration = Duration::from_secs(10);

/// How long a miss at an edge whose link was cut may wait for its refusal. The edge finds the
/// link down once its probes (every 250 ms) have found no route for 3 s, and refuses misses
/// from then on; the test asks a little after the cut. Ten seconds leaves a loaded machine
/// room, and still fails an edge that does not notice the cut: its miss would wait for the
/// API's 20 s of publish retries, or for the stream timeout (300 s).
const REFUSED_WITHIN: Duration = Duration::from_secs(10);

async fn edges() -> System {
    quick()
        .edges(2)
        .env("VERSUS_ADMIN_TOKEN", TOKEN)
        .start()
        .await
}

/// The key and text of a finished fight at the API serving at `api`.
async fn answered(api: &str, a: &str, b: &str) -> (String, String, bool) {
    let events = fight_at(api, a, b).await;
    assert_eq!(
        events.last().map(|e| e.event.as_str()),
        Some("done"),
        "{events:?}"
    );
    let meta = events[0].json();
    (
        meta["key"].as_str().unwrap().to_owned(),
        text_of(&events),
        meta["cached"].as_bool().unwrap(),
    )
}

/// Whether `kv_key` has a value in the edge's mirror of the answers bucket, if any.
async fn mirrored(edge: &Edge, kv_key: &str) -> bool {
    let client = edge.nats.connect_as(NatsUser::Admin).await.unwrap();
    let mirror = async_nats::jetstream::new(client)
        .get_key_value(wire::ANSWERS_BUCKET)
        .await
        .unwrap();
    mirror.get(kv_key).await.unwrap().is_some()
}

fn text_key(key: &str) -> String {
    format!("text.{key}")
}

/// Purges `key` through the admin route of the API at `api`.
async fn purge(api: &str, key: &str) {
    let purged = http()
        .delete(format!("{api}/v1/admin/fights/{key}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(purged.status(), 204);
}

/// The status of `GET /v1/fights/{key}` at `api`.
async fn status_of(api: &str, key: &str) -> u16 {
    http()
        .get(format!("{api}/v1/fights/{key}"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn an_answer_made_through_one_edge_is_a_hit_at_the_other() {
    run(async {
        let sys = edges().await;
        let (edge1, edge2) = (&sys.edges[0], &sys.edges[1]);
        let (key, text, cached) = answered(edge1.api_url(), "Edge Knight", "Far Dragon").await;
        assert!(!cached);
        assert_eq!(sys.sim.chat_calls().await, 1);
        assert_eq!(
            rows(&sys, &key).await,
            [("done".to_owned(), Some(text.clone()))]
        );

        // Edge 2's mirror gets the answer from the hub's bucket on its own.
        eventually(
            "edge 2's mirror holds the answer",
            Duration::from_secs(5),
            || async { mirrored(edge2, &text_key(&key)).await },
        )
        .await;
        let (hit_key, hit_text, cached) =
            answered(edge2.api_url(), "far dragon", "EDGE KNIGHT").await;
        assert_eq!(
            (hit_key.as_str(), hit_text.as_str(), cached),
            (key.as_str(), text.as_str(), true)
        );
        let events = fight_at(edge2.api_url(), "Edge Knight", "Far Dragon").await;
        assert_eq!(shape(&events), ["meta", "chunk*", "done"]);
        assert_eq!(
            sys.sim.chat_calls().await,
            1,
            "no upstream call for the hit"
        );

        // From the mirror, then from memory; no job from edge 2.
        let metrics = metrics_of(edge2.api_url()).await;
        assert_eq!(
            metric(&metrics, "versus_cache_hits_total", "layer=\"kv\""),
            1.0,
            "{metrics}"
        );
        assert!(metric(&metrics, "versus_cache_hits_total", "layer=\"memory\"") >= 1.0);
        assert_eq!(metric(&metrics, "versus_jobs_published_total", ""), 0.0);
        let stored =
            crate::json_of(http().get(format!("{}/v1/fights/{key}", edge2.api_url()))).await;
        assert_eq!(stored["text"].as_str(), Some(text.as_str()));

        // A POST at an edge answers once its generation is done, whether or not the mirror has
        // the answer yet; and so does a picture, whose URL serves the PNG at the other edge.
        let posted = crate::json_of(
            http()
                .post(format!("{}/v1/fights", edge2.api_url()))
                .json(&serde_json::json!({"a": "Posted Pirate", "b": "Ninja"})),
        )
        .await;
        assert_eq!(posted["cached"], false, "{posted}");
        assert!(!posted["text"].as_str().unwrap().is_empty(), "{posted}");
        let picture = crate::json_of(
            http()
                .post(format!("{}/v1/images", edge1.api_url()))
                .json(&serde_json::json!({"a": "Edge Knight", "b": "Far Dragon"})),
        )
        .await;
        let url = picture["url"]
            .as_str()
            .unwrap_or_else(|| panic!("{picture}"));
        let path = &url[url.find("/v1/images/").unwrap()..];
        let png = http()
            .get(format!("{}{path}", edge2.api_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(png.status(), 200);
        assert_eq!(png.headers()["content-type"], "image/png");
    });
}

#[test]
fn a_purge_reaches_every_edge_within_seconds() {
    run(async {
        let sys = edges().await;
        let (key, _, _) = answered(sys.edges[0].api_url(), "Purged Paladin", "Gone Golem").await;
        // Each edge holds it in its mirror and in memory.
        for edge in &sys.edges {
            eventually(
                "the mirror holds the answer",
                Duration::from_secs(5),
                || async { mirrored(edge, &text_key(&key)).await },
            )
            .await;
            for _ in 0..2 {
                assert_eq!(status_of(edge.api_url(), &key).await, 200);
            }
        }
        purge(sys.api_url(), &key).await;
        let purged = Instant::now();
        eventually(
            "both edges forget the purged answer",
            PURGE_REACHES_EDGES_WITHIN,
            || async {
                for edge in &sys.edges {
                    if mirrored(edge, &text_key(&key)).await
                        || status_of(edge.api_url(), &key).await != 404
                    {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        eprintln!(
            "both edges forgot the answer {:?} after the purge",
            purged.elapsed()
        );
        // Asked again, it is a new answer.
        let (again, _, cached) =
            answered(sys.edges[1].api_url(), "Purged Paladin", "Gone Golem").await;
        assert_eq!((again.as_str(), cached), (key.as_str(), false));
        assert_eq!(sys.sim.chat_calls().await, 2);
    });
}

#[test]
fn an_edge_cut_off_serves_hits_refuses_misses_and_catches_up() {
    run(async {
        let sys = edges().await;
        let (edge1, edge2) = (&sys.edges[0], &sys.edges[1]);
        // One answer asked at edge 1 (in its memory), one at edge 2 (only in edge 1's mirror).
        let (near, near_text, _) = answered(edge1.api_url(), "Local Hero", "Home Team").await;
        let (far, far_text, _) = answered(edge2.api_url(), "Remote Hero", "Away Team").await;
        eventually(
            "edge 1's mirror holds both",
            Duration::from_secs(5),
            || async { mirrored(edge1, &text_key(&far)).await },
        )
        .await;

        edge1.cut_link().await;
        let cut = Instant::now();
        // Hits go on, from memory and from the mirror.
        for (a, b, key, text) in [
            ("Local Hero", "Home Team", &near, &near_text),
            ("Remote Hero", "Away Team", &far, &far_text),
        ] {
            let (hit, hit_text, cached) = answered(edge1.api_url(), a, b).await;
            assert_eq!((&hit, &hit_text, cached), (key, text, true));
        }
        // A miss is refused, retryably, once the edge finds its link down.
        let asked = Instant::now();
        let events = fight_at(edge1.api_url(), "Stranded Sailor", "Lost Island").await;
        let refused_in = asked.elapsed();
        assert_eq!(shape(&events), ["meta", "error"], "{events:?}");
        let error = events[1].json();
        assert_eq!(error["code"], "unavailable", "{error}");
        assert_eq!(error["retryable"], true);
        assert!(
            refused_in < REFUSED_WITHIN,
            "refused after {refused_in:?}, not within {REFUSED_WITHIN:?}"
        );
        eprintln!("a miss at the cut-off edge was refused in {refused_in:?}");

        // Meanwhile the hub moves on: a new answer, and a purge of one edge 1 holds.
        let (fresh, fresh_text, _) = answered(edge2.api_url(), "New Kid", "Block").await;
        purge(sys.api_url(), &far).await;
        assert_eq!(
            status_of(edge1.api_url(), &far).await,
            200,
            "still cut off: stale"
        );
        let calls = sys.sim.chat_calls().await;

        edge1.restore_link().await;
        let restored = Instant::now();
        eprintln!("the link was cut for {:?}", restored - cut);
        eventually(
            "edge 1 catches up with the hub",
            Duration::from_secs(5),
            || async {
                status_of(edge1.api_url(), &far).await == 404
                    && mirrored(edge1, &text_key(&fresh)).await
            },
        )
        .await;
        eprintln!(
            "edge 1 caught up {:?} after the link returned",
            restored.elapsed()
        );
        let (hit, hit_text, cached) = answered(edge1.api_url(), "New Kid", "Block").await;
        assert_eq!((&hit, &hit_text, cached), (&fresh, &fresh_text, true));
        assert_eq!(sys.sim.chat_calls().await, calls, "the hit cost nothing");
        // Misses work again.
        eventually(
            "misses work again at edge 1",
            Duration::from_secs(5),
            || async {
                let events = fight_at(edge1.api_url(), "Stranded Sailor", "Lost Island").await;
                events.last().is_some_and(|e| e.event == "done")
            },
        )
        .await;
    });
}
