//! What may be generated and cached: names and answers go through the upstream's moderation
//! endpoint, and a refusal is stored and served like a hit.

use serde_json::{Value, json};

use crate::{fight, http, image_stream_url, json_of, quick, run, shape, stream_url};
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
fn an_answer_flagged_twice_streams_then_ends_refused_and_is_never_stored_or_served() {
    run(async {
        // Every simulated answer has "the" in it ("the challenger", "the champion", …); these
        // names do not. So the answer is flagged, and generated again, and flagged again.
        let sys = quick()
            .sim_env("VERSUS_SIM_MODERATION_FLAGS", "the=harassment")
            .start()
            .await;
        let events = fight(&sys, "Cobra", "Mongoose").await;
        assert_eq!(
            shape(&events),
            ["meta", "chunk*", "reset", "chunk*", "error"],
            "it streamed, was generated again, then refused: {events:?}"
        );
        assert_refused(&events);
        assert_eq!(
            calls(&sys).await,
            (2, 0, 3),
            "names, then each answer: a single flag refuses nothing"
        );

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
        assert_eq!(calls(&sys).await, (2, 0, 3), "the refusal costs nothing");
    });
}

#[test]
fn an_answer_flagged_once_is_generated_again_and_the_clean_one_is_stored() {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_MODERATION_FLAGS", "gruesome=harassment")
            .start()
            .await;
        // The first answer ends with a term moderation flags; the second is as usual.
        sys.sim
            .fault(json!({"kind": "chat", "fault": {"type": "say", "text": "A gruesome end."}, "times": 1}))
            .await;
        let events = fight(&sys, "Cobra", "Mongoose").await;
        assert_eq!(
            shape(&events),
            ["meta", "chunk*", "reset", "chunk*", "done"],
            "{events:?}"
        );
        let flagged: String = events
            .iter()
            .take_while(|e| e.event != "reset")
            .filter(|e| e.event == "chunk")
            .map(|e| e.json()["delta"].as_str().unwrap().to_owned())
            .collect();
        assert!(flagged.ends_with("A gruesome end."), "{flagged:?}");
        let text = crate::text_of(&events);
        assert!(!text.contains("gruesome"), "{text:?}");
        assert_eq!(calls(&sys).await, (2, 0, 3), "names, then each answer");

        let key = events[0].json()["key"].as_str().unwrap().to_owned();
        let stored = json_of(http().get(format!("{}/v1/fights/{key}", sys.api_url()))).await;
        assert_eq!(stored["text"], json!(text));
        let hit = fight(&sys, "Mongoose", "Cobra").await;
        assert_eq!(hit[0].json()["cached"], json!(true));
        assert_eq!(crate::text_of(&hit), text);
        assert_eq!(calls(&sys).await, (2, 0, 3));
        // Operators see a second look, not a refusal.
        let looked = crate::worker_metric(&sys, "versus_answers_looked_at_again_total", "").await;
        let refused = crate::worker_metric(&sys, "versus_refusals_total", "").await;
        assert_eq!((looked, refused), (1.0, 0.0));
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

#[test]
fn a_flagged_term_in_mathematical_bold_is_refused_before_any_chat_call_and_so_is_its_plain_spelling()
 {
    run(async {
        let sys = quick()
            .sim_env("VERSUS_SIM_MODERATION_FLAGS", "badword=hate")
            .start()
            .await;
        // 𝐛𝐚𝐝𝐰𝐨𝐫𝐝: NFKC makes it the plain word, so its key is the plain word's.
        let bold = "\u{1D41B}\u{1D41A}\u{1D41D}\u{1D430}\u{1D428}\u{1D42B}\u{1D41D}";
        let fancy = fight(&sys, bold, "Superman").await;
        assert_eq!(shape(&fancy), ["meta", "error"], "{fancy:?}");
        assert_refused(&fancy);
        assert_eq!(
            calls(&sys).await,
            (0, 0, 1),
            "one moderation call, which read the canonical names, and no chat call"
        );

        // The plain spelling is the same matchup, refused from the cache at no cost.
        let plain = fight(&sys, "Badword", "Superman").await;
        assert_eq!(plain[0].json()["key"], fancy[0].json()["key"]);
        assert_eq!(shape(&plain), ["meta", "error"], "{plain:?}");
        assert_refused(&plain);
        assert_eq!(calls(&sys).await, (0, 0, 1));

        // What made the difference: the endpoint does not flag the bold letters themselves.
        let verdict = json_of(
            http()
                .post(format!("{}/moderations", sys.sim.openai_base_url()))
                .bearer_auth("sk-test")
                .json(&json!({"model": "omni-moderation-latest", "input": [bold, "badword"]})),
        )
        .await;
        assert_eq!(verdict["results"][0]["flagged"], json!(false), "{verdict}");
        assert_eq!(verdict["results"][1]["flagged"], json!(true), "{verdict}");
    });
}
