//! One fight, one answer, however it is spelled: names with the same match key (case, accents
//! of Latin letters, hyphens, spaces, dots and apostrophes aside) are one name to every key, so
//! a fight is paid for once; names that merely look alike are never merged.

use crate::{fight, metric, metrics_of, quick, run, text_of};

/// The key, text and `cached` of a finished fight.
async fn answered(sys: &versus_testkit::System, a: &str, b: &str) -> (String, String, bool) {
    let events = fight(sys, a, b).await;
    assert_eq!(
        events.last().map(|e| e.event.as_str()),
        Some("done"),
        "{a} vs {b}: {events:?}"
    );
    let meta = events[0].json();
    (
        meta["key"].as_str().unwrap().to_owned(),
        text_of(&events),
        meta["cached"].as_bool().unwrap(),
    )
}

#[test]
fn every_spelling_of_a_fight_is_one_answer_and_one_upstream_call() {
    run(async {
        let sys = quick().start().await;
        let (key, text, cached) = answered(&sys, "Spider-Man", "Hulk").await;
        assert!(!cached);
        for (a, b) in [
            ("spiderman", "HULK"),
            ("Spider Man", "  hulk"),
            ("Hulk", "Spider\u{2010}Man"),
        ] {
            let (again, same, cached) = answered(&sys, a, b).await;
            assert_eq!((again.as_str(), cached), (key.as_str(), true), "{a} vs {b}");
            assert_eq!(same, text, "{a} vs {b}");
        }
        let (pokemon, _, cached) = answered(&sys, "Pokémon", "Digimon").await;
        assert!(!cached);
        let (again, _, cached) = answered(&sys, "Pokemon", "Digimon").await;
        assert_eq!((again, cached), (pokemon, true));
        assert_eq!(sys.sim.chat_calls().await, 2);
        // Four of those hits were spellings another had paid for (`HULK` alone would not be:
        // case always was one name).
        let merged = metric(
            &metrics_of(sys.api_url()).await,
            "versus_spellings_merged_total",
            "text",
        );
        assert_eq!(merged, 4.0);
    });
}

#[test]
fn names_that_only_look_alike_are_never_merged() {
    run(async {
        let sys = quick().start().await;
        let mut keys = Vec::new();
        for (a, b) in [
            ("Batman", "Joker"),
            ("Batwoman", "Joker"),
            ("Wonder Woman", "Thor"),
            ("Wonder Man", "Thor"),
            ("Spider-Man", "Hulk"),
            ("Spider-Woman", "Hulk"),
        ] {
            let (key, _, cached) = answered(&sys, a, b).await;
            assert!(!cached, "{a} vs {b} was merged with another");
            keys.push(key);
        }
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 6);
        assert_eq!(sys.sim.chat_calls().await, 6);
    });
}
