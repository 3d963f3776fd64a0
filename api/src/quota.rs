//! The daily quota per client, cluster-wide: what one client's new generations may cost in a
//! UTC day (`VERSUS_CLIENT_DAILY_USD`), however many API replicas and edges it asks.
//!
//! A request that starts a new generation (the miss path's last gate, after the per-minute
//! limit) charges its client the generation's worst case (`Budget::worst_case`: a text
//! answer's longest prompt and answer, a picture's price) in the KV bucket `versus_quota`,
//! whose keys are the UTC day and the client's bucket ([`counters`]), and whose values are
//! what the bucket was charged that day, in millionths of a US dollar. A charge is a
//! compare-and-set: read the entry, refuse if the charge would take it past its cap, else write
//! the new total on the condition that the entry's revision has not moved (`kv.update`), and
//! read again if it has ([`retry::quota_charge`]). So no bucket is ever charged past its cap,
//! whatever the number of replicas charging it at once. Hits, joins and generations already
//! under way are never charged; a charge is never given back (a flight that then finds its
//! answer under way elsewhere, or whose job fails, has been charged all the same).
//!
//! IPv4 clients count per address; IPv6 clients at their /64 and at their /48, whose cap is
//! [`NET48_QUOTAS`] times the quota: one allocation spread over many /64s stops at 16 quotas,
//! not 65,536. A charge adds to every counter of the client at once, and is refused when any
//! of them would pass its cap (what was added to the others is taken back). A client's keys
//! derive from its own address alone (`Limits::client`, trusted proxies' `X-Forwarded-For`
//! included), so no client can spend another's quota.
//!
//! A counter known to be past what a charge needs is refused without a round trip: counts only
//! grow within a day, so this replica remembers the last total it read of a refused counter
//! ([`Quota`]'s memo, bounded). A quota store that fails or does not answer within
//! [`CHARGE_TIMEOUT`] lets the request through (logged, and counted in
//! `versus_quota_unavailable_total`): the quota spreads the day's budget among clients, while
//! the budget's reservations still cap what is spent, so an outage of the bucket must not lock
//! every client out.

use std::{
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use quick_cache::sync::Cache;
use versus_shared::{budget, retry, wire::Kind};

use crate::error::ApiError;

/// How many quotas an IPv6 /48 may spend: an allocation of 65,536 /64s gets 16 clients'
/// worth, not 65,536.
pub const NET48_QUOTAS: u64 = 16;

/// How long a charge may take before the request goes through uncharged.
pub const CHARGE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many counters known to be spent each replica remembers (a few dozen bytes each).
const MEMO: usize = 100_000;

/// How often a failing quota store is logged (each failure is counted).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The refusals, by kind.
const REFUSALS: &str = "versus_quota_refusals_total";
/// Charges that could not be made (the store failed or was slow): let through.
const UNAVAILABLE: &str = "versus_quota_unavailable_total";

/// One counter a client is charged on: its bucket in the key, and how many quotas it may spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Counter {
    /// `ip4.<a.b.c.d>`, `net64.<16 hex digits>` or `net48.<12 hex digits>`.
    pub bucket: String,
    pub quotas: u64,
}

/// The counters `client` is charged on: an IPv4 address its own; an IPv6 address its /48
/// (16 quotas) and its /64 (one).
pub(crate) fn counters(client: IpAddr) -> Vec<Counter> {
    match client.to_canonical() {
        IpAddr::V4(v4) => vec![Counter {
            bucket: format!("ip4.{v4}"),
            quotas: 1,
        }],
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            vec![
                Counter {
                    bucket: format!("net48.{:012x}", bits >> 80),
                    quotas: NET48_QUOTAS,
                },
                Counter {
                    bucket: format!("net64.{:016x}", bits >> 64),
                    quotas: 1,
                },
            ]
        }
    }
}

/// The key of `counter` on UTC `day` (days since 1970-01-01) in the quota bucket.
pub(crate) fn key(day: u32, counter: &Counter) -> String {
    format!("day.{day}.{}", counter.bucket)
}

/// `usd` in millionths of a US dollar, rounded up (a charge never rounds to less), but for
/// the noise of floating point: $0.1 + $0.2 is 300,000, not 300,001.
pub(crate) fn micros(usd: f64) -> u64 {
    if !usd.is_finite() || usd <= 0.0 {
        return 0;
    }
    let exact = usd * 1e6;
    let nearest = exact.round();
    if (exact - nearest).abs() < 1e-6 {
        nearest as u64
    } else {
        exact.ceil() as u64
    }
}

/// Whether a counter `charged` so far has room for `cost` more under `cap`.
pub(crate) fn fits(charged: u64, cost: u64, cap: u64) -> bool {
    charged.saturating_add(cost) <= cap
}

/// A stored total; anything unreadable counts as nothing (only the API writes the bucket).
fn total(value: &[u8]) -> u64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// What a charge came to.
enum Charged {
    Yes,
    /// The counter under `key` holds `charged`: the charge would pass its cap.
    Over {
        key: String,
        charged: u64,
    },
    /// Concurrent charges of the same client kept beating this one.
    Contended,
}

/// What one compare-and-set loop on a counter came to.
enum Added {
    Yes,
    Over(u64),
    Contended,
}

/// The daily quota per client (see the module's doc).
pub struct Quota {
    /// Millionths of a US dollar one client may be charged per UTC day; 0: no quota.
    limit: u64,
    /// Keys of counters this replica found spent past a charge, with the total it read: the
    /// total only grows within a day (a key names its day), so a charge that would not fit it
    /// is refused at once.
    memo: Cache<String, u64>,
    /// When a failure of the store was last logged.
    warned: Mutex<Option<Instant>>,
}

impl Quota {
    /// A quota of `daily_usd` per client and UTC day (0: none).
    pub fn new(daily_usd: f64) -> anyhow::Result<Quota> {
        if !daily_usd.is_finite() || daily_usd < 0.0 {
            anyhow::bail!("VERSUS_CLIENT_DAILY_USD must be a number ≥ 0");
        }
        Ok(Quota {
            limit: micros(daily_usd),
            memo: Cache::new(MEMO),
            warned: Mutex::new(None),
        })
    }

    /// Whether new generations are charged to their clients at all.
    pub fn on(&self) -> bool {
        self.limit > 0
    }

    /// The quota in US dollars (0: none).
    pub fn daily_usd(&self) -> f64 {
        self.limit as f64 / 1e6
    }

    /// The refusal and failure counters, at zero: an alert sees the first increase.
    pub fn zero_counters(&self) {
        for kind in [Kind::Text, Kind::Image] {
            metrics::counter!(REFUSALS, "kind" => kind.as_str()).increment(0);
        }
        metrics::counter!(UNAVAILABLE).increment(0);
    }

    /// Charges `client` `usd` (a new generation of `kind`'s worst case) on today's counters in
    /// `store`, or refuses with `quota_exhausted` (429, until midnight UTC) when any counter
    /// would pass its cap; nothing is charged then. A charge that concurrent charges of the
    /// same client keep beating gets `rate_limited` (retry in a second). A store that fails or
    /// is slow lets the request through, uncharged (or charged on some counters only).
    pub async fn charge(
        &self,
        store: &kv::Store,
        kind: Kind,
        client: IpAddr,
        usd: f64,
    ) -> Result<(), ApiError> {
        if !self.on() {
            return Ok(());
        }
        let cost = micros(usd);
        let counters = self.counters_of(client);
        if self.spent(&counters, cost) {
            return Err(self.refused(kind));
        }
        match tokio::time::timeout(CHARGE_TIMEOUT, charge_all(store, &counters, cost)).await {
            Ok(Ok(Charged::Yes)) => Ok(()),
            Ok(Ok(Charged::Over { key, charged })) => {
                self.memo.insert(key, charged);
                Err(self.refused(kind))
            }
            Ok(Ok(Charged::Contended)) => {
                metrics::counter!("versus_rate_limited_total", "kind" => "quota").increment(1);
                Err(ApiError::RateLimited {
                    retry_after_secs: 1,
                })
            }
            Ok(Err(error)) => {
                self.unavailable(&format!("{error:#}"));
                Ok(())
            }
            Err(_) => {
                self.unavailable(&format!("no answer within {CHARGE_TIMEOUT:?}"));
                Ok(())
            }
        }
    }

    /// Whether this replica knows, with no round trip, that `client` cannot be charged `usd`
    /// today: one of its counters was found spent past it. A miss then skips its early reads
    /// (the flight's subscription and last event), which a refusal would waste.
    pub fn known_spent(&self, client: IpAddr, usd: f64) -> bool {
        self.on() && self.spent(&self.counters_of(client), micros(usd))
    }

    /// `client`'s counters of today: each key with its cap.
    fn counters_of(&self, client: IpAddr) -> Vec<(String, u64)> {
        let day = budget::today();
        counters(client)
            .iter()
            .map(|counter| (key(day, counter), self.limit.saturating_mul(counter.quotas)))
            .collect()
    }

    /// Whether one of `counters` is remembered spent past a charge of `cost`.
    fn spent(&self, counters: &[(String, u64)], cost: u64) -> bool {
        counters.iter().any(|(key, cap)| {
            self.memo
                .get(key)
                .is_some_and(|charged| !fits(charged, cost, *cap))
        })
    }

    fn refused(&self, kind: Kind) -> ApiError {
        metrics::counter!(REFUSALS, "kind" => kind.as_str()).increment(1);
        ApiError::QuotaExhausted {
            retry_after_secs: budget::until_tomorrow().as_secs(),
        }
    }

    /// A charge that could not be made: counted, logged now and then, and let through.
    fn unavailable(&self, error: &str) {
        metrics::counter!(UNAVAILABLE).increment(1);
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *warned = Some(Instant::now());
            tracing::warn!(
                error,
                "the quota bucket cannot be charged: new answers go through uncharged \
                 (the daily budget still caps spend); counted in {UNAVAILABLE}"
            );
        }
    }
}

/// Adds `cost` to every counter of `counters` (key, cap), all at once (one round trip for the
/// reads and one for the writes, however many counters), or to none: a counter that would
/// pass its cap (or keeps being beaten) stops the charge, and what was added to the others is
/// taken back. A counter that fails lets the charge through (the error), keeping what was
/// added to the others.
async fn charge_all(
    store: &kv::Store,
    counters: &[(String, u64)],
    cost: u64,
) -> anyhow::Result<Charged> {
    let tries = counters
        .iter()
        .map(|(key, cap)| add(store, key, cost, *cap));
    let results = futures::future::join_all(tries).await;
    let (mut over, mut contended, mut failed, mut added) = (None, false, None, Vec::new());
    for ((key, _), result) in counters.iter().zip(results) {
        match result {
            Ok(Added::Yes) => added.push(key),
            Ok(Added::Over(charged)) => {
                over.get_or_insert((key.clone(), charged));
            }
            Ok(Added::Contended) => contended = true,
            Err(error) => failed = Some(error),
        }
    }
    let stop = match (over, contended, failed) {
        (Some((key, charged)), _, _) => Charged::Over { key, charged },
        (None, _, Some(error)) => return Err(error),
        (None, true, None) => Charged::Contended,
        (None, false, None) => return Ok(Charged::Yes),
    };
    let taken_back = added.into_iter().map(|key| take_back(store, key, cost));
    futures::future::join_all(taken_back).await;
    Ok(stop)
}

/// The total under `key` and its revision (0: no entry).
async fn read(store: &kv::Store, key: &str) -> anyhow::Result<(u64, u64)> {
    Ok(match store.entry(key).await? {
        Some(entry) if entry.operation == Operation::Put => (total(&entry.value), entry.revision),
        Some(entry) => (0, entry.revision),
        None => (0, 0),
    })
}

/// One compare-and-set loop: `cost` added to `key` unless that passes `cap`.
async fn add(store: &kv::Store, key: &str, cost: u64, cap: u64) -> anyhow::Result<Added> {
    let mut delays = retry::quota_charge().delays();
    loop {
        let (charged, revision) = read(store, key).await?;
        if !fits(charged, cost, cap) {
            return Ok(Added::Over(charged));
        }
        let value = (charged + cost).to_string();
        match store.update(key, value.into(), revision).await {
            Ok(_) => return Ok(Added::Yes),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => match delays.next() {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return Ok(Added::Contended),
            },
            Err(e) => return Err(e.into()),
        }
    }
}

/// Takes `cost` back from `key` (a charge another counter refused), as far as the store lets
/// it: a take-back that fails leaves the client charged a little more, never less.
async fn take_back(store: &kv::Store, key: &str, cost: u64) {
    let mut delays = retry::quota_charge().delays();
    loop {
        let Ok((charged, revision)) = read(store, key).await else {
            return;
        };
        let value = charged.saturating_sub(cost).to_string();
        match store.update(key, value.into(), revision).await {
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => match delays.next() {
                Some(delay) => tokio::time::sleep(delay).await,
                None => return,
            },
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn buckets(client: &str) -> Vec<(String, u64)> {
        counters(ip(client))
            .into_iter()
            .map(|c| (c.bucket, c.quotas))
            .collect()
    }

    #[test]
    fn a_client_remembered_spent_is_known_spent_without_a_round_trip_and_others_are_not() {
        let quota = Quota::new(1.0).unwrap();
        let spent = ip("203.0.113.7");
        assert!(!quota.known_spent(spent, 0.4), "nothing is remembered yet");
        let (key, _) = quota.counters_of(spent).remove(0);
        quota.memo.insert(key, micros(0.9));
        assert!(quota.known_spent(spent, 0.4), "0.9 + 0.4 passes 1.0");
        assert!(!quota.known_spent(spent, 0.1), "0.9 + 0.1 fits");
        assert!(!quota.known_spent(ip("203.0.113.8"), 0.4), "another client");
        assert!(
            !Quota::new(0.0).unwrap().known_spent(spent, 0.4),
            "0: no quota"
        );
    }

    #[test]
    fn an_ipv4_client_counts_per_address_and_an_ipv4_mapped_one_as_ipv4() {
        assert_eq!(buckets("203.0.113.7"), [("ip4.203.0.113.7".to_owned(), 1)]);
        assert_eq!(
            buckets("::ffff:203.0.113.7"),
            [("ip4.203.0.113.7".to_owned(), 1)]
        );
        assert_ne!(buckets("203.0.113.7"), buckets("203.0.113.8"));
    }

    #[test]
    fn an_ipv6_client_counts_at_its_48_with_16_quotas_and_at_its_64_with_one() {
        assert_eq!(
            buckets("2001:db8:1:2:aaaa::1"),
            [
                ("net48.20010db80001".to_owned(), NET48_QUOTAS),
                ("net64.20010db800010002".to_owned(), 1),
            ]
        );
        assert_eq!(NET48_QUOTAS, 16);
        // Every address of one /64 is one client; another /64 of the same /48 is another
        // client on the same /48 counter; another /48 shares nothing.
        assert_eq!(
            buckets("2001:db8:1:2::"),
            buckets("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        let (one, neighbour) = (buckets("2001:db8:1:2::1"), buckets("2001:db8:1:3::1"));
        assert_eq!(one[0], neighbour[0]);
        assert_ne!(one[1], neighbour[1]);
        let elsewhere = buckets("2001:db8:2:2::1");
        assert_ne!(one[0], elsewhere[0]);
        assert_ne!(one[1], elsewhere[1]);
    }

    #[test]
    fn keys_name_the_day_and_the_bucket_and_are_valid_kv_keys() {
        let day = budget::day_of(std::time::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400));
        for client in ["203.0.113.7", "2001:db8:1:2::1", "::1", "0.0.0.0"] {
            for counter in counters(ip(client)) {
                let key = key(day, &counter);
                assert!(key.starts_with("day.20000."), "{key}");
                assert!(
                    key.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-/_=.".contains(c))
                        && !key.starts_with('.')
                        && !key.ends_with('.'),
                    "{key} is not a KV key"
                );
            }
        }
        let yesterday = key(day - 1, &counters(ip("203.0.113.7"))[0]);
        assert_ne!(yesterday, key(day, &counters(ip("203.0.113.7"))[0]));
    }

    #[test]
    fn charges_are_whole_millionths_rounded_up_and_fill_a_cap_exactly() {
        assert_eq!(micros(0.4), 400_000);
        assert_eq!(micros(0.5), 500_000);
        assert_eq!(micros(0.000_000_1), 1);
        assert_eq!(micros(0.1 + 0.2), 300_000);
        assert_eq!(micros(0.000_000_5), 1);
        assert_eq!(micros(1.000_000_4), 1_000_001);
        assert_eq!(micros(0.0), 0);
        assert_eq!(micros(f64::NAN), 0);
        assert_eq!(micros(-1.0), 0);
        // Three answers of $0.40 fit $1.20 exactly, a fourth does not.
        let (cost, cap) = (micros(0.4), micros(1.2));
        assert!(fits(2 * cost, cost, cap));
        assert!(!fits(3 * cost, cost, cap));
        assert!(!fits(u64::MAX, cost, cap));
        assert_eq!(total(b"400000"), 400_000);
        assert_eq!(total(b"forged"), 0);
    }

    #[test]
    fn a_quota_is_a_number_of_dollars_and_zero_turns_it_off() {
        assert!(!Quota::new(0.0).unwrap().on());
        let quota = Quota::new(0.5).unwrap();
        assert!(quota.on());
        assert_eq!(quota.daily_usd(), 0.5);
        assert!(Quota::new(-1.0).is_err());
        assert!(Quota::new(f64::INFINITY).is_err());
    }
}
