//! What may be generated and cached: names and answers go through the upstream's moderation
//! endpoint, and a refusal is stored and served like a hit.

use serde_json::{Value, json};

use crate::{fight, http, image_stream_url, quick, run, shape, stream_url};
use versus_testkit::{System, sse};

const TOKEN: &str = "moderation-admin-token-0123456789abcdef";

async fn calls(sys: &System) -> (u64, u64, u64) {
    let stats = sys.sim.stats().await;
    let n = |field: &str| stats[field].as_u64().unwrap();
    (n("chat_calls"), n("image_calls"), n("moderation_calls"))
}

async fn picture(sys: &System, a: &str, b: &str) -> Vec<sse::SseEvent> {
    let url = image_stream_url(sys, a, b);
    sse::open(url.as_str(), None).await.collect_all().await
}

fn assert_refused(events: &[sse::SseEvent]) {
    let error = events.last().unwrap();
    assert_eq!(error.event, "error", "{events:?}");
    let error: Value = error.json();
    assert_eq!(error["code"], json!("refused"), "{error}");
    assert_eq!(error["retryable"], json!(false), "{error}");
    assert_eq!(
        error["message"],
        json!("Versus does not answer this matchup.")
    );
}

#[test]
fn a_flagged_name_is_refused_before_any_generation_and_for_free_until_purged() {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_MODERATION_FLAGS", "villain=hate")
            .env("VERSUS_ADMIN_TOKEN", TOKEN)
            .start()
            .await;
        let text = fight(&sys, "Villain", "Hero").await;
        assert_eq!(shape(&text), ["meta", "error"], "{text:?}");
        assert_refused(&text);
        let image = picture(&sys, "Villain", "Hero").await;
        assert_eq!(shape(&image), ["meta", "error"], "{image:?}");
        assert_refused(&image);
        assert_eq!(
            calls(&sys).await,
            (0, 0, 2),
            "one moderation call per kind, nothing else"
        );

        // Asked again, in any order and on any route, the refusal costs no call of any kind.
        assert_refused(&fight(&sys, "hero", "VILLAIN").await);
        assert_refused(&picture(&sys, "Hero", "Villain").await);
        let post = http()
            .post(format!("{}/v1/fights", sys.api_url()))
            .json(&json!({"a": "Villain", "b": "Hero"}))
            .send()
            .await
            .unwrap();
        assert_eq!(post.status(), 422);
        let body: Value = post.json().await.unwrap();
        assert_eq!(body["error"]["code"], json!("refused"), "{body}");
        assert_eq!(calls(&sys).await, (0, 0, 2));

        // A purge clears it: the next request is judged afresh.
        let key = text[0].json()["key"].as_str().unwrap().to_owned();
        let purged = http()
            .delete(format!("{}/v1/admin/fights/{key}", sys.api_url()))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(purged.status(), 204);
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM generations WHERE status <> 'purged'")
                .fetch_one(&sys.db.pool().await)
                .await
                .unwrap();
        assert_eq!(rows, 0, "the purge removed both refusals");
        assert_refused(&fight(&sys, "Villain", "Hero").await);
        assert_eq!(calls(&sys).await, (0, 0, 3));
    });
}

#[test]
fn a_flagged_answer_streams_then_ends_refused_and_is_never_stored_or_served() {
    run(async {
        // Every simulated answer has "the" in it ("the challenger", "the champion", …); these
        // names do not.
        let sys = quick()
            .sim_env("VERSUS_SIM_MODERATION_FLAGS", "the=harassment")
            .start()
            .await;
        let events = fight(&sys, "Cobra", "Mongoose").await;
        let shape = shape(&events);
        assert_eq!(
            shape.first().map(String::as_str),
            Some("meta"),
            "{events:?}"
        );
        assert!(
            shape.contains(&"chunk*".to_owned()),
            "it streamed first: {events:?}"
        );
        assert_refused(&events);
        assert_eq!(calls(&sys).await, (1, 0, 2), "names, then the answer");

        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        let (status, text): (String, Option<String>) =
            sqlx::query_as("SELECT status, text FROM generations WHERE key = $1")
                .bind(&key)
                .fetch_one(&sys.db.pool().await)
                .await
                .unwrap();
        assert_eq!((status.as_str(), text), ("refused", None));
        let stored = http()
            .get(format!("{}/v1/fights/{key}", sys.api_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(stored.status(), 404, "no answer in any cache");

        let again = fight(&sys, "Mongoose", "Cobra").await;
        assert_eq!(crate::shape(&again), ["meta", "error"], "{again:?}");
        assert_refused(&again);
        assert_eq!(calls(&sys).await, (1, 0, 2), "the refusal costs nothing");
    });
}

#[test]
fn an_ordinary_fight_passes_moderation_with_the_default_settings() {
    run(async {
        // Fight talk is violent, and the endpoint says so; the default settings let it through.
        let sys = quick()
            .sim_env(
                "VERSUS_SIM_MODERATION_FLAGS",
                "batman=violence,the=violence/graphic",
            )
            .start()
            .await;
        let events = sse::open(&stream_url(&sys, "Batman", "Superman"), None)
            .await
            .collect_all()
            .await;
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
        assert_eq!(
            calls(&sys).await,
            (1, 0, 2),
            "the names and the answer were checked"
        );
    });
}

#[test]
fn a_name_that_passed_before_costs_no_second_check() {
    run(async {
        let sys = quick().workers(1).start().await;
        for (a, b) in [("Batman", "Joker"), ("Batman", "Penguin")] {
            let events = fight(&sys, a, b).await;
            assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
        }
        assert_eq!(
            calls(&sys).await,
            (2, 0, 4),
            "the names, then the answer, of each"
        );
        // Both names passed before: only the new answer is checked.
        let events = fight(&sys, "Joker", "Penguin").await;
        assert_eq!(shape(&events), ["meta", "chunk*", "done"], "{events:?}");
        assert_eq!(calls(&sys).await, (3, 0, 5));
    });
}
