//! The load: clients that each draw their operations from their own random stream (new
//! matchups, bursts of identical requests on a few hot matchups, hits, streams dropped and
//! resumed), and an operator who purges hot matchups now and then.

use std::time::Duration;

use futures::future::join_all;

use super::client::{self, Spec};
use super::history::{Op, OpKind, Purge, Sighting};
use super::run::Shared;
use super::schedule::{self, Site, Stream};

/// The hot matchups: asked for in bursts, hit, resumed, and purged. Each request writes the
/// names in its own mix of capitals and order: the same key, but the display names of the
/// request that starts a generation go into the prompt, so each purge's successor is (almost
/// always) a different text, and a resume that splices two answers shows.
pub const HOT: [(&str, &str); 4] = [
    ("Godzilla", "King Kong"),
    ("Batman", "Superman"),
    ("A Great White Shark", "A Grizzly Bear"),
    ("Sherlock Holmes", "Hercule Poirot"),
];

/// One client: operations one after another (a burst at once) until `until_ms`.
pub async fn client(shared: &Shared, index: usize, until_ms: u64) -> Vec<Op> {
    let mut rng = schedule::rng(shared.seed, Stream::Client(index));
    let mut ops = Vec::new();
    let mut own: Vec<(String, String)> = Vec::new();
    while shared.now_ms() < until_ms {
        let roll = rng.u32(0..100);
        if roll < 30 {
            let (a, b) = unique(shared.seed, index, own.len());
            own.push((a.clone(), b.clone()));
            let spec = spec(shared, &mut rng, index, OpKind::Miss, (a, b), None);
            ops.push(client::run(shared, spec).await);
        } else if roll < 50 {
            let hot = rng.usize(0..HOT.len());
            let names = variant(&mut rng, hot);
            let size = rng.usize(3..=6);
            let specs: Vec<Spec> = (0..size)
                .map(|_| {
                    spec(
                        shared,
                        &mut rng,
                        index,
                        OpKind::Burst,
                        names.clone(),
                        Some(hot),
                    )
                })
                .collect();
            ops.extend(join_all(specs.into_iter().map(|s| client::run(shared, s))).await);
        } else if roll < 75 {
            let (names, hot) = if own.is_empty() || rng.bool() {
                let hot = rng.usize(0..HOT.len());
                (variant(&mut rng, hot), Some(hot))
            } else {
                (own[rng.usize(0..own.len())].clone(), None)
            };
            let spec = spec(shared, &mut rng, index, OpKind::Hit, names, hot);
            ops.push(client::run(shared, spec).await);
        } else {
            let (names, hot) = if rng.u8(0..10) < 6 {
                let hot = rng.usize(0..HOT.len());
                (variant(&mut rng, hot), Some(hot))
            } else {
                let names = unique(shared.seed, index, own.len());
                own.push(names.clone());
                (names, None)
            };
            let mut spec = spec(shared, &mut rng, index, OpKind::Resume, names, hot);
            spec.drop_after = Some(rng.usize(1..=8));
            spec.resume_pause = Duration::from_millis(rng.u64(0..3_000));
            ops.push(client::run(shared, spec).await);
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(0..500))).await;
    }
    ops
}

/// An operation's plan: three APIs to try in turn, and the seed of its pauses.
fn spec(
    shared: &Shared,
    rng: &mut fastrand::Rng,
    client: usize,
    kind: OpKind,
    (a, b): (String, String),
    hot: Option<usize>,
) -> Spec {
    let sites = (0..3)
        .map(|_| Site::from_index(rng.usize(0..shared.sites())))
        .collect();
    Spec {
        client,
        kind,
        a,
        b,
        hot,
        sites,
        drop_after: None,
        resume_pause: Duration::ZERO,
        jitter: rng.u64(..),
    }
}

/// The `n`th new matchup of client `index`.
fn unique(seed: u64, index: usize, n: usize) -> (String, String) {
    (
        format!("Red Knight {seed} {index} {n}"),
        format!("Blue Golem {seed} {index} {n}"),
    )
}

/// Hot matchup `hot` with each letter's case and the order of the two names drawn at random.
fn variant(rng: &mut fastrand::Rng, hot: usize) -> (String, String) {
    let mut cased = |name: &str| -> String {
        name.chars()
            .map(|c| {
                if rng.bool() {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    };
    let (a, b) = HOT[hot];
    let (a, b) = (cased(a), cased(b));
    if rng.bool() { (a, b) } else { (b, a) }
}

/// How long the operator asks again for a purge that could not be carried out.
const PURGE_TRIES_MS: u64 = 60_000;

/// The operator: every 3–8 s, purges a hot matchup whose answer Postgres holds, through one of
/// the APIs (asking again while it answers 503), and records what the purge removed (a
/// sighting) and whether it took effect.
pub async fn operator(
    shared: &Shared,
    pool: &sqlx::PgPool,
    token: &str,
    until_ms: u64,
) -> (Vec<Purge>, Vec<Sighting>) {
    let mut rng = schedule::rng(shared.seed, Stream::Operator);
    let (mut purges, mut sightings) = (Vec::new(), Vec::new());
    loop {
        let pause = rng.u64(3_000..8_000);
        let hot = rng.usize(0..HOT.len());
        let site = Site::from_index(rng.usize(0..shared.sites()));
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if shared.now_ms() >= until_ms {
            return (purges, sightings);
        }
        let Some(key) = shared.hot_key(hot) else {
            continue;
        };
        let before = shared.now_ms();
        let Some(Some(text)) = stored(pool, &key).await else {
            continue;
        };
        sightings.push(Sighting {
            key: key.clone(),
            text: text.clone(),
            first_ms: before,
            last_ms: shared.now_ms(),
        });
        let start_ms = shared.now_ms();
        let url = format!("{}/v1/admin/fights/{key}", shared.endpoint(site));
        // As an operator does: a purge that could not be carried out (503, or no answer) is
        // asked again, for up to a minute (a purge is idempotent, and one that stopped half-way
        // is finished by the next).
        let mut answer;
        loop {
            let sent = shared.http.delete(&url).bearer_auth(token).send();
            answer = match tokio::time::timeout(Duration::from_secs(40), sent).await {
                Ok(Ok(response)) => response.status().as_u16().to_string(),
                Ok(Err(e)) => format!("no answer: {e}"),
                Err(_) => "no answer within 40 s".to_owned(),
            };
            if answer == "204" || answer == "404" || shared.now_ms() >= start_ms + PURGE_TRIES_MS {
                break;
            }
            eprintln!("chaos: purge of {key} at {site:?}: {answer}; asking again");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut end_ms = shared.now_ms();
        let effective = if answer == "204" {
            true
        } else {
            // Whether it took effect all the same: Postgres no longer holds what it purged.
            let mut gone = None;
            for _ in 0..10 {
                if let Some(now) = stored(pool, &key).await {
                    gone = Some(now.as_deref() != Some(text.as_str()));
                    break;
                }
            }
            end_ms = shared.now_ms();
            gone.unwrap_or(false)
        };
        eprintln!(
            "chaos: {start_ms} ms: purge of {key} at {site:?}: {answer} (effective: {effective})"
        );
        purges.push(Purge {
            key,
            site,
            start_ms,
            end_ms,
            answer,
            purged: text,
            effective,
        });
    }
}

/// The done text Postgres holds for `key` (Some(None): none), or None if Postgres did not
/// answer within 3 s.
pub async fn stored(pool: &sqlx::PgPool, key: &str) -> Option<Option<String>> {
    let query = sqlx::query_scalar::<_, Option<String>>(
        "SELECT text FROM generations WHERE kind = 'text' AND key = $1 AND status = 'done'",
    )
    .bind(key)
    .fetch_optional(pool);
    match tokio::time::timeout(Duration::from_secs(3), query).await {
        Ok(Ok(text)) => Some(text.flatten()),
        _ => None,
    }
}
