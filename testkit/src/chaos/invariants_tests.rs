//! Hand-made histories that keep, and that break, each invariant.

use super::*;
use crate::chaos::history::{Attempt, OpKind};

const TOKENS: usize = 4;
const OLD: &str = "Early on the champion.";
const NEW: &str = "At the bell lands.";
/// The first half of OLD, the second half of NEW: a resume that spliced two answers.
const SPLICE: &str = "Early on bell lands.";

fn done(id: u64, key: &str, start_ms: u64, end_ms: u64, text: &str) -> Op {
    Op {
        id,
        client: 0,
        kind: OpKind::Hit,
        a: "A".to_owned(),
        b: "B".to_owned(),
        key: Some(key.to_owned()),
        start_ms,
        end_ms,
        attempts: vec![Attempt {
            site: Site::Hub,
            start_ms,
            end_ms,
            last_event_id: None,
            events: "meta chunk*4 done".to_owned(),
        }],
        outcome: Outcome::Done {
            text: text.to_owned(),
        },
    }
}

fn purge(key: &str, start_ms: u64, end_ms: u64, purged: &str) -> Purge {
    Purge {
        key: key.to_owned(),
        site: Site::Edge(0),
        start_ms,
        end_ms,
        answer: "204".to_owned(),
        purged: purged.to_owned(),
        effective: true,
    }
}

fn seen(key: &str, text: &str, first_ms: u64, last_ms: u64) -> Sighting {
    Sighting {
        key: key.to_owned(),
        text: text.to_owned(),
        first_ms,
        last_ms,
    }
}

/// A key answered OLD, purged at 10 s, answered NEW since; both held and served as they should.
fn good() -> (History, Final) {
    let history = History {
        ops: vec![
            done(1, "k", 0, 2_000, OLD),
            done(2, "k", 3_000, 3_100, OLD),
            done(3, "k", 9_500, 10_300, OLD),
            done(4, "k", 11_000, 13_000, NEW),
            done(5, "k", 14_000, 14_100, NEW),
        ],
        purges: vec![purge("k", 10_000, 10_500, OLD)],
        sightings: vec![seen("k", OLD, 2_000, 9_800), seen("k", NEW, 12_900, 20_000)],
        faults: Vec::new(),
    };
    let last = Final {
        rows: vec![Row {
            key: "k".to_owned(),
            status: "done".to_owned(),
            text: Some(NEW.to_owned()),
        }],
        kv: [("k".to_owned(), NEW.to_owned())].into(),
        hits: vec![HitCheck {
            key: "k".to_owned(),
            site: Site::Edge(1),
            cached: true,
            result: Ok(NEW.to_owned()),
        }],
        chat_calls_before_hits: 2,
        chat_calls_after_hits: 2,
        down: Vec::new(),
    };
    (history, last)
}

fn broken(history: &History, last: &Final) -> Vec<&'static str> {
    check(history, last, TOKENS)
        .into_iter()
        .map(|v| v.invariant)
        .collect()
}

#[test]
fn a_clean_history_keeps_every_invariant() {
    let (history, last) = good();
    assert_eq!(check(&history, &last, TOKENS), Vec::new());
}

#[test]
fn a_non_retryable_error_or_a_hang_is_a_violation_and_a_retryable_one_or_refused_is_not() {
    let (mut history, last) = good();
    let mut op = done(9, "k", 0, 1, OLD);
    for outcome in [
        Outcome::GaveUp {
            code: "unavailable".to_owned(),
        },
        Outcome::Refused,
    ] {
        op.outcome = outcome;
        history.ops.push(op.clone());
    }
    assert_eq!(broken(&history, &last), Vec::<&str>::new());
    op.outcome = Outcome::Fatal {
        code: "internal".to_owned(),
        message: "oops".to_owned(),
    };
    history.ops.push(op.clone());
    op.outcome = Outcome::Hung { attempt_ms: 60_000 };
    history.ops.push(op);
    let violations = check(&history, &last, TOKENS);
    assert_eq!(violations.len(), 2, "{violations:?}");
    assert!(violations.iter().all(|v| v.invariant
        == "every operation ends in done or a retryable error"
        && v.ops == [9]));
}

#[test]
fn a_cut_short_text_is_not_whole() {
    let (mut history, last) = good();
    history.ops.push(done(9, "k", 14_000, 14_100, "At the"));
    assert!(broken(&history, &last).contains(&"every done text is whole"));
}

#[test]
fn a_resume_that_spliced_two_answers_is_named_with_its_attempts() {
    let (mut history, last) = good();
    let mut op = done(9, "k", 9_000, 12_000, SPLICE);
    op.kind = OpKind::Resume;
    op.attempts.push(Attempt {
        site: Site::Edge(1),
        start_ms: 11_000,
        end_ms: 12_000,
        last_event_id: Some("1:8".to_owned()),
        events: "meta chunk*2 done".to_owned(),
    });
    history.ops.push(op);
    let violations = check(&history, &last, TOKENS);
    assert_eq!(violations.len(), 1, "{violations:?}");
    let v = &violations[0];
    assert_eq!(v.invariant, "every done text is the stored answer");
    assert_eq!((v.key.as_deref(), &v.ops[..]), (Some("k"), &[9][..]));
    assert!(v.detail.contains("Last-Event-ID 1:8"), "{}", v.detail);
}

#[test]
fn the_purged_answer_served_after_the_purge_is_a_violation() {
    let (mut history, last) = good();
    history.ops.push(done(9, "k", 12_000, 12_050, OLD));
    let violations = check(&history, &last, TOKENS);
    let names: Vec<_> = violations.iter().map(|v| v.invariant).collect();
    assert!(
        names.contains(&"no purged answer is served after its purge"),
        "{violations:?}"
    );
    // It also disagrees with op 5, which got the new answer in the same epoch.
    assert!(names.contains(&"one text per key between two purges"));
}

#[test]
fn an_answer_still_seen_while_its_purge_ran_is_not_served_after_it() {
    // A cut-off edge serves the answer from its memory after the purge that Postgres was last
    // seen holding it during.
    let (mut history, last) = good();
    history.sightings[0].last_ms = 10_200;
    history.ops.push(done(9, "k", 10_600, 10_610, OLD));
    let violations = check(&history, &last, TOKENS);
    assert!(
        violations
            .iter()
            .any(|v| v.invariant == "no purged answer is served after its purge" && v.ops == [9]),
        "{violations:?}"
    );
}

#[test]
fn an_edge_cut_off_while_the_purge_ran_may_serve_the_old_answer_until_it_catches_up() {
    use crate::chaos::{history::FaultRecord, schedule::Fault};
    let at_edge = |id: u64, start_ms: u64| {
        let mut op = done(id, "k", start_ms, start_ms + 50, OLD);
        op.attempts[0].site = Site::Edge(0);
        op
    };
    let (mut history, last) = good();
    // Edge 0's leaf link was cut from 9 s to 12 s, across the purge (10..10.5 s).
    history.faults.push(FaultRecord {
        start_ms: 9_000,
        end_ms: 12_000,
        fault: Fault::CutLink { edge: 0 },
        trouble: None,
    });
    // It served the old answer while cut, and just after its link came back: allowed.
    history.ops.push(at_edge(9, 11_000));
    history.ops.push(at_edge(10, 13_000));
    assert_eq!(check(&history, &last, TOKENS), Vec::new());
    // Long after its link came back, at the hub, or at the other edge: the purge was final.
    for (id, op) in [
        (11, at_edge(11, 12_000 + EDGE_CATCH_UP_MS + 1)),
        (12, done(12, "k", 11_000, 11_050, OLD)),
        (13, {
            let mut op = at_edge(13, 11_000);
            op.attempts[0].site = Site::Edge(1);
            op
        }),
    ] {
        let mut broken = history.clone();
        broken.ops.push(op);
        let violations = check(&broken, &last, TOKENS);
        assert!(
            violations.iter().any(|v| {
                v.invariant == "no purged answer is served after its purge" && v.ops == [id]
            }),
            "op {id}: {violations:?}"
        );
    }
}

#[test]
fn a_replica_stopped_while_the_purge_ran_may_serve_the_old_answer_just_after_it_runs_again() {
    use crate::chaos::{history::FaultRecord, schedule::Fault};
    let (mut history, last) = good();
    // The hub's API was stopped from 9.5 s to 11 s, across the purge (10..10.5 s).
    history.faults.push(FaultRecord {
        start_ms: 9_500,
        end_ms: 11_000,
        fault: Fault::PauseApi { site: Site::Hub },
        trouble: None,
    });
    history.ops.push(done(9, "k", 10_800, 11_010, OLD));
    assert_eq!(check(&history, &last, TOKENS), Vec::new());
    // Once it has caught up, the purge is final there too.
    history
        .ops
        .push(done(10, "k", 11_000 + REPLICA_CATCH_UP_MS + 1, 16_100, OLD));
    let violations = check(&history, &last, TOKENS);
    assert!(
        violations
            .iter()
            .any(|v| v.invariant == "no purged answer is served after its purge" && v.ops == [10]),
        "{violations:?}"
    );
}

#[test]
fn an_operation_across_a_purge_may_get_either_answer() {
    let (mut history, last) = good();
    history.ops.push(done(9, "k", 9_900, 12_000, OLD));
    history.ops.push(done(10, "k", 9_900, 13_500, NEW));
    assert_eq!(check(&history, &last, TOKENS), Vec::new());
}

#[test]
fn a_purge_that_did_not_take_effect_separates_nothing() {
    let (mut history, last) = good();
    history.purges[0].effective = false;
    let names = broken(&history, &last);
    assert!(names.contains(&"a stored answer changes only across a purge"));
    assert!(names.contains(&"one text per key between two purges"));
}

#[test]
fn two_texts_between_the_same_purges_are_a_violation() {
    let (mut history, last) = good();
    // Both stored (one replaced the other without a purge), both served.
    history.sightings.push(seen("k", SPLICE, 15_000, 15_200));
    history.ops.push(done(9, "k", 15_000, 15_100, SPLICE));
    let names = broken(&history, &last);
    assert!(names.contains(&"one text per key between two purges"));
    assert!(names.contains(&"a stored answer changes only across a purge"));
}

#[test]
fn an_answer_postgres_kept_through_a_purge_is_a_violation() {
    let (mut history, last) = good();
    history.sightings[0].last_ms = 10_700;
    assert!(broken(&history, &last).contains(&"a purge removes the answer"));
}

#[test]
fn a_partial_row_or_a_bucket_that_disagrees_is_a_violation() {
    let (history, mut last) = good();
    last.rows.push(Row {
        key: "p".to_owned(),
        status: "done".to_owned(),
        text: Some("At the".to_owned()),
    });
    last.rows.push(Row {
        key: "f".to_owned(),
        status: "failed".to_owned(),
        text: Some(OLD.to_owned()),
    });
    last.kv.insert("p".to_owned(), "At the".to_owned());
    last.kv.insert("gone".to_owned(), OLD.to_owned());
    last.kv.insert("k".to_owned(), OLD.to_owned());
    let names = broken(&history, &last);
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "nothing partial stored")
            .count(),
        2,
        "{names:?}"
    );
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "the answers bucket matches Postgres")
            .count(),
        2,
        "{names:?}"
    );
}

#[test]
fn a_miss_a_wrong_text_or_an_upstream_call_after_healing_is_a_violation() {
    let (history, mut last) = good();
    last.hits.push(HitCheck {
        key: "k".to_owned(),
        site: Site::Hub,
        cached: false,
        result: Ok(NEW.to_owned()),
    });
    last.hits.push(HitCheck {
        key: "k".to_owned(),
        site: Site::Edge(0),
        cached: true,
        result: Ok(OLD.to_owned()),
    });
    last.hits.push(HitCheck {
        key: "k".to_owned(),
        site: Site::Edge(1),
        cached: false,
        result: Err("http 503".to_owned()),
    });
    last.chat_calls_after_hits = 3;
    let names = broken(&history, &last);
    assert_eq!(names, vec!["every finished key is a hit everywhere"; 4]);
}

#[test]
fn a_process_down_after_healing_is_a_violation() {
    let (history, mut last) = good();
    last.down.push("hub2: /healthz 503".to_owned());
    assert_eq!(broken(&history, &last), vec!["every process alive"]);
}

#[test]
fn whole_means_the_simulators_number_of_words() {
    assert!(is_whole(OLD, 4));
    assert!(!is_whole(OLD, 5));
    assert!(!is_whole("", 0));
    assert!(!is_whole("Early  on the.", 4));
}
