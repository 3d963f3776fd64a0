//! What the system holds: Postgres's stored answers read every quarter second while the load
//! runs (sightings), and, once healed, the rows, the answers bucket, a hit for every finished
//! key at every API, and whether every process is up.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;

use super::client;
use super::history::Sighting;
use super::invariants::{Final, HitCheck, Row};
use super::run::Shared;
use super::schedule::Site;
use crate::System;

/// Polls are at most this far apart for a sighting to go on across them: an answer takes longer
/// than this to make again, so a run of sightings never hides a purge and a new answer.
const MAX_POLL_GAP_MS: u64 = 1_000;

/// Reads every done text answer until the load is done, and returns the runs of unchanged
/// texts.
pub async fn poll(shared: &Shared, pool: &sqlx::PgPool) -> Vec<Sighting> {
    let mut open: BTreeMap<String, Sighting> = BTreeMap::new();
    let mut closed = Vec::new();
    let mut last_ok_ms = 0;
    while !shared.load_done() {
        let sent_ms = shared.now_ms();
        let query = sqlx::query_as::<_, (String, String)>(
            "SELECT key, text FROM generations WHERE kind = 'text' AND status = 'done' \
             AND text IS NOT NULL",
        )
        .fetch_all(pool);
        if let Ok(Ok(rows)) = tokio::time::timeout(Duration::from_secs(2), query).await {
            let got_ms = shared.now_ms();
            if sent_ms.saturating_sub(last_ok_ms) > MAX_POLL_GAP_MS {
                closed.extend(std::mem::take(&mut open).into_values());
            }
            let mut now: BTreeMap<String, String> = rows.into_iter().collect();
            for (key, seen) in std::mem::take(&mut open) {
                match now.remove(&key) {
                    Some(text) if text == seen.text => {
                        open.insert(
                            key,
                            Sighting {
                                last_ms: got_ms,
                                ..seen
                            },
                        );
                    }
                    Some(text) => {
                        closed.push(seen);
                        open.insert(key.clone(), sighting(key, text, sent_ms, got_ms));
                    }
                    None => closed.push(seen),
                }
            }
            for (key, text) in now {
                open.insert(key.clone(), sighting(key, text, sent_ms, got_ms));
            }
            last_ok_ms = got_ms;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    closed.extend(open.into_values());
    closed
}

fn sighting(key: String, text: String, first_ms: u64, last_ms: u64) -> Sighting {
    Sighting {
        key,
        text,
        first_ms,
        last_ms,
    }
}

/// The healed system's state (see [`Final`]); also the sightings of its final answers.
pub async fn final_state(system: &mut System, shared: &Shared) -> (Final, Vec<Sighting>) {
    let pool = system.db.pool().await;
    let sent_ms = shared.now_ms();
    let rows: Vec<(String, String, Option<String>, String, String)> =
        sqlx::query_as("SELECT key, status, text, a, b FROM generations WHERE kind = 'text'")
            .fetch_all(&pool)
            .await
            .unwrap_or_else(|e| panic!("reading the stored answers: {e}"));
    let got_ms = shared.now_ms();
    let sightings = rows
        .iter()
        .filter(|r| r.1 == "done")
        .filter_map(|r| Some(sighting(r.0.clone(), r.2.clone()?, sent_ms, got_ms)))
        .collect();
    let kv = answers_bucket(system).await;
    let before = system.sim.chat_calls().await;
    let finished: Vec<(String, String, String)> = rows
        .iter()
        .filter(|r| r.1 == "done")
        .map(|r| (r.0.clone(), r.3.clone(), r.4.clone()))
        .collect();
    let hits = hits(shared, &finished).await;
    let after = system.sim.chat_calls().await;
    let last = Final {
        rows: rows
            .into_iter()
            .map(|(key, status, text, _, _)| Row { key, status, text })
            .collect(),
        kv,
        hits,
        chat_calls_before_hits: before,
        chat_calls_after_hits: after,
        down: down(system).await,
    };
    (last, sightings)
}

/// Every `text.<key>` entry of the hub's answers bucket: key → its text.
async fn answers_bucket(system: &System) -> BTreeMap<String, String> {
    let js = async_nats::jetstream::new(system.admin_client().await);
    let bucket = js
        .get_key_value(versus_shared::wire::ANSWERS_BUCKET)
        .await
        .unwrap_or_else(|e| panic!("opening the answers bucket: {e}"));
    let mut keys = bucket
        .keys()
        .await
        .unwrap_or_else(|e| panic!("listing the answers bucket: {e}"));
    let mut texts = BTreeMap::new();
    while let Some(Ok(entry)) = keys.next().await {
        let Some(key) = entry.strip_prefix("text.") else {
            continue;
        };
        let Ok(Some(value)) = bucket.get(&entry).await else {
            continue;
        };
        let answer: serde_json::Value = serde_json::from_slice(&value).unwrap_or_default();
        let text = answer["text"].as_str().unwrap_or_default().to_owned();
        texts.insert(key.to_owned(), text);
    }
    texts
}

/// Every finished key asked for at every API, 16 at a time; one not served from a cache is
/// asked again (up to 5 times, 2 s apart: a mirror catching up after a cut link).
async fn hits(shared: &Shared, finished: &[(String, String, String)]) -> Vec<HitCheck> {
    let asks = finished.iter().flat_map(|(key, a, b)| {
        (0..shared.sites()).map(move |i| async move {
            let site = Site::from_index(i);
            let mut tries = 0;
            loop {
                tries += 1;
                let result = client::once(shared, site, a, b).await;
                let cached = matches!(result, Ok((true, _)));
                if cached || tries == 5 {
                    return HitCheck {
                        key: key.clone(),
                        site,
                        cached,
                        result: result.map(|(_, text)| text),
                    };
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    });
    futures::stream::iter(asks)
        .buffer_unordered(16)
        .collect()
        .await
}

/// The processes that are not running or not ready.
async fn down(system: &mut System) -> Vec<String> {
    let http = crate::http_client();
    let mut down = Vec::new();
    let ready = |label: String, url: String| {
        let http = http.clone();
        async move {
            match http.get(&url).timeout(Duration::from_secs(5)).send().await {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("{label}: {url} answered {}", r.status())),
                Err(e) => Some(format!("{label}: {url}: {e}")),
            }
        }
    };
    let mut probes = Vec::new();
    for worker in &mut system.workers {
        if !worker.is_running() {
            down.push(format!("{} exited", worker.label()));
        }
        probes.push(ready(
            worker.label().to_owned(),
            format!("{}/readyz", worker.url),
        ));
    }
    let apis = std::iter::once(&mut system.api).chain(system.edges.iter_mut().map(|e| &mut e.api));
    for api in apis {
        if !api.is_running() {
            down.push(format!("{} exited", api.label()));
        }
        probes.push(ready(api.label().to_owned(), format!("{}/readyz", api.url)));
    }
    if !system.sim.proc.is_running() {
        down.push("versus-sim exited".to_owned());
    }
    let servers = std::iter::once(&system.nats)
        .chain(&system.hub_peers)
        .chain(system.edges.iter().map(|e| &e.nats));
    for (i, nats) in servers.enumerate() {
        let url = format!("http://127.0.0.1:{}/healthz", nats.monitor_port);
        probes.push(ready(format!("nats-server {i}"), url));
    }
    down.extend(
        futures::future::join_all(probes)
            .await
            .into_iter()
            .flatten(),
    );
    down
}
