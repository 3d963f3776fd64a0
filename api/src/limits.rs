//! Per-client limits on new generations. A client (its address, or the address a trusted
//! proxy forwarded for) may start `VERSUS_CLIENT_MISSES_PER_MINUTE` new answers and
//! `VERSUS_CLIENT_PICTURES_PER_MINUTE` new pictures a minute, each with a burst of the same
//! size (GCRA, from `governor`). Only requests that would start a generation count: hits and
//! joins of a generation in progress never do, and a refusal costs the client nothing. Each API
//! replica counts on its own, so behind N replicas a client may start up to N times as many.
//! Joins of a generation under way (here or elsewhere) have a looser limit of their own,
//! `VERSUS_CLIENT_JOINS_PER_MINUTE`, so that reconnecting in a loop is not free either.
//! A client may also hold at most `VERSUS_CLIENT_MAX_STREAMS` event streams open at once.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    num::NonZeroU32,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::http::HeaderMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use versus_shared::wire::Kind;

use crate::error::ApiError;

/// How often the limiters forget clients that are back to a full burst.
const HOUSEKEEPING: Duration = Duration::from_secs(60);

pub struct Limits {
    text: Option<DefaultKeyedRateLimiter<IpAddr>>,
    image: Option<DefaultKeyedRateLimiter<IpAddr>>,
    trusted: Vec<IpNet>,
    /// Open streams per client, and how many one may hold (0: no cap).
    streams: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_streams: usize,
    /// Joins of generations under way per client (`VERSUS_CLIENT_JOINS_PER_MINUTE`), a looser
    /// limit of its own; None: no limit.
    joins: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Whether a request forwarded by a private-range peer was seen while no proxy is trusted
    /// (warned about once).
    untrusted_forwarding: AtomicBool,
    /// Look-ups past this replica's memory per client (`VERSUS_CLIENT_LOOKUPS_PER_SECOND`);
    /// None: no limit.
    lookups: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

/// One open stream of a client; dropping it (the stream ended or the client left) frees it.
pub struct StreamSlot {
    client: IpAddr,
    streams: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(open) = streams.get_mut(&self.client) {
            *open -= 1;
            if *open == 0 {
                streams.remove(&self.client);
            }
        }
    }
}

impl Limits {
    /// Limits of `misses` new answers and `pictures` new pictures per client and minute (0:
    /// none); `trusted_proxies` is a comma-separated list of CIDRs (or addresses).
    pub fn new(
        misses: u32,
        pictures: u32,
        max_streams: usize,
        trusted_proxies: &str,
    ) -> anyhow::Result<Limits> {
        let limiter = |per_minute: u32| {
            NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)))
        };
        let mut trusted = Vec::new();
        for entry in trusted_proxies
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let net = match entry.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => entry.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
                    anyhow::anyhow!("VERSUS_TRUSTED_PROXIES: `{entry}` is not a CIDR")
                })?,
            };
            trusted.push(net);
        }
        Ok(Limits {
            text: limiter(misses),
            image: limiter(pictures),
            trusted,
            streams: Arc::default(),
            max_streams,
            joins: None,
            untrusted_forwarding: AtomicBool::new(false),
            lookups: None,
        })
    }

    /// A slot for one more open stream of `client`, or `too_many_streams` (429) when it
    /// holds as many as it may.
    pub fn open_stream(&self, client: IpAddr) -> Result<StreamSlot, ApiError> {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let open = streams.entry(client).or_default();
        if self.max_streams > 0 && *open >= self.max_streams {
            metrics::counter!("versus_rate_limited_total", "kind" => "streams").increment(1);
            return Err(ApiError::TooManyStreams);
        }
        *open += 1;
        Ok(StreamSlot {
            client,
            streams: self.streams.clone(),
        })
    }

    /// Who sent the request: the peer, unless the peer is a trusted proxy; then the right-most
    /// address of `X-Forwarded-For` that is not one (proxies append what they saw). IPv6
    /// clients count by their /64, the block one subscriber usually holds. An element may carry
    /// a port (`203.0.113.7:41234`, `[2001:db8::1]:41234`), as some proxies write it.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if self.untrusted_forwarding(client, headers) {
            tracing::warn!(
                %peer,
                "requests arrive with X-Forwarded-For from a private address while \
                 VERSUS_TRUSTED_PROXIES is empty: every client behind that proxy counts as one \
                 (one rate limit, one quota); set VERSUS_TRUSTED_PROXIES to the load balancer's \
                 addresses (docs/deploy.md)"
            );
        }
        if self.is_trusted(client) {
            let forwarded = headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .collect::<Vec<_>>();
            for hop in forwarded.iter().rev() {
                let Some(address) = forwarded_address(hop) else {
                    break;
                };
                client = address.to_canonical();
                if !self.is_trusted(client) {
                    break;
                }
            }
        }
        match client {
            IpAddr::V6(v6) => {
                let block = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(block))
            }
            v4 => v4,
        }
    }

    pub(crate) fn is_trusted(&self, address: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&address))
    }

    /// True the first time a private-range `peer` forwards for someone (`X-Forwarded-For`)
    /// while no proxy is trusted: a load balancer is most likely in front, unconfigured. One
    /// relaxed load per request afterwards.
    fn untrusted_forwarding(&self, peer: IpAddr, headers: &HeaderMap) -> bool {
        self.trusted.is_empty()
            && !self.untrusted_forwarding.load(Ordering::Relaxed)
            && is_private(peer)
            && headers.contains_key("x-forwarded-for")
            && !self.untrusted_forwarding.swap(true, Ordering::Relaxed)
    }

    fn limiter(&self, kind: Kind) -> Option<&DefaultKeyedRateLimiter<IpAddr>> {
        match kind {
            Kind::Text => self.text.as_ref(),
            Kind::Image => self.image.as_ref(),
        }
    }

    /// These limits with `per_minute` joins per client of generations under way (and a burst
    /// of as many); 0: no limit on joins.
    pub fn with_joins(mut self, per_minute: u32) -> Limits {
        self.joins = NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)));
        self
    }

    /// Whether joins are limited at all.
    pub fn joins_limited(&self) -> bool {
        self.joins.is_some()
    }

    /// Counts a join of a generation under way for `client`, or refuses it (`rate_limited`,
    /// with when to try again) without counting it. Cheap: one GCRA step in memory.
    pub fn admit_join(&self, client: IpAddr) -> Result<(), ApiError> {
        let Some(limiter) = &self.joins else {
            return Ok(());
        };
        limiter.check_key(&client).map_err(|not_until| {
            let wait = not_until.wait_time_from(limiter.clock().now());
            metrics::counter!("versus_rate_limited_total", "kind" => "joins").increment(1);
            ApiError::RateLimited {
                retry_after_secs: wait.as_secs() + 1,
            }
        })
    }

    /// Whether new generations of `kind` are limited at all.
    pub fn limited(&self, kind: Kind) -> bool {
        self.limiter(kind).is_some()
    }

    /// Counts a new generation of `kind` for `client`, or refuses it (`rate_limited`, with
    /// when to try again) without counting it.
    pub fn admit(&self, kind: Kind, client: IpAddr) -> Result<(), ApiError> {
        let Some(limiter) = self.limiter(kind) else {
            return Ok(());
        };
        limiter.check_key(&client).map_err(|not_until| {
            let wait = not_until.wait_time_from(limiter.clock().now());
            metrics::counter!("versus_rate_limited_total", "kind" => kind.as_str()).increment(1);
            ApiError::RateLimited {
                retry_after_secs: wait.as_secs() + 1,
            }
        })
    }

    /// Forgets, once a minute, the clients that are back to a full burst, so that the
    /// limiters' memory follows the clients of the last minute, not all clients ever seen.
    pub async fn housekeep(&self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(HOUSEKEEPING);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for limiter in [&self.text, &self.image, &self.joins].into_iter().flatten() {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
            if let Some(limiter) = &self.lookups {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
    }
}

impl Limits {
    /// These limits with `per_second` look-ups per client past this replica's memory, in a
    /// burst of `burst` (at least `per_second`); 0 per second: no limit.
    pub fn with_lookups(mut self, per_second: u32, burst: u32) -> Limits {
        self.lookups = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst.max(rate.get())).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        self
    }

    /// Counts a look-up past memory (the KV bucket, the refusals, a flight's first steps, the
    /// object store) for `client`, or refuses it (`rate_limited`, with when to try again)
    /// before any of that is asked. Memory hits never come here.
    pub fn look_up(&self, client: IpAddr) -> Result<(), ApiError> {
        let Some(limiter) = &self.lookups else {
            return Ok(());
        };
        limiter.check_key(&client).map_err(|not_until| {
            let wait = not_until.wait_time_from(limiter.clock().now());
            metrics::counter!("versus_rate_limited_total", "kind" => "lookups").increment(1);
            ApiError::RateLimited {
                retry_after_secs: wait.as_secs() + 1,
            }
        })
    }
}

/// One element of `X-Forwarded-For`: an address, perhaps with a port (`a.b.c.d:port`,
/// `[v6]:port`), or a bracketed IPv6 address without one.
fn forwarded_address(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .or_else(|| {
            hop.strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })
}

/// Whether `address` is one a load balancer in front of the API would have: private (RFC 1918,
/// unique local IPv6), shared (100.64.0.0/10), loopback or link-local.
fn is_private(address: IpAddr) -> bool {
    match address.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unique_local() || v6.is_unicast_link_local(),
    }
}

#[cfg(test)]
mod tests {
    use super::Limits;
    use axum::http::{HeaderMap, HeaderValue};
    use std::net::IpAddr;
    use versus_shared::wire::Kind;

    fn forwarded(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static(value));
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_forwarded_for_someone() {
        let limits = Limits::new(1, 1, 0, "10.0.0.0/8, 127.0.0.1").unwrap();
        let spoofed = forwarded("203.0.113.7");
        // An untrusted peer cannot name someone else.
        assert_eq!(
            limits.client(ip("198.51.100.1"), &spoofed),
            ip("198.51.100.1")
        );
        // Through trusted proxies: the right-most address that is not one of them.
        let chain = forwarded("6.6.6.6, 203.0.113.7, 10.1.2.3");
        assert_eq!(limits.client(ip("127.0.0.1"), &chain), ip("203.0.113.7"));
        assert_eq!(
            limits.client(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1")
        );
        // IPv6 clients count by their /64; IPv4-mapped addresses as IPv4.
        assert_eq!(
            limits.client(ip("2001:db8:1:2:aaaa::1"), &HeaderMap::new()),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            limits.client(ip("::ffff:198.51.100.1"), &HeaderMap::new()),
            ip("198.51.100.1")
        );
        assert!(Limits::new(1, 1, 0, "not-a-cidr").is_err());
    }

    #[test]
    fn look_ups_past_memory_have_a_rate_and_a_burst_per_client_and_0_means_none() {
        let limits = Limits::new(0, 0, 0, "").unwrap().with_lookups(50, 100);
        let (one, two) = (ip("198.51.100.1"), ip("198.51.100.2"));
        let allowed = (0..150).filter(|_| limits.look_up(one).is_ok()).count();
        // The burst, and perhaps a token or two that came back meanwhile.
        assert!((100..=103).contains(&allowed), "{allowed}");
        let refused = limits.look_up(one).unwrap_err();
        assert!(
            matches!(
                refused,
                crate::error::ApiError::RateLimited {
                    retry_after_secs: 1
                }
            ),
            "{refused:?}"
        );
        assert!(limits.look_up(two).is_ok());
        let off = Limits::new(0, 0, 0, "").unwrap().with_lookups(0, 100);
        assert!((0..1000).all(|_| off.look_up(one).is_ok()));
    }

    #[test]
    fn forwarded_elements_may_carry_ports() {
        let limits = Limits::new(1, 1, 0, "10.0.0.0/8, fd00::/8").unwrap();
        let through = |value: &'static str| limits.client(ip("10.0.0.1"), &forwarded(value));
        assert_eq!(through("203.0.113.7:41234"), ip("203.0.113.7"));
        assert_eq!(through("[2001:db8:1:2::7]:41234"), ip("2001:db8:1:2::"));
        assert_eq!(through("[2001:db8:1:2::7]"), ip("2001:db8:1:2::"));
        // A proxy with a port is walked past like one without.
        assert_eq!(
            through("6.6.6.6, 203.0.113.7:1, 10.9.9.9:443"),
            ip("203.0.113.7")
        );
        assert_eq!(through("203.0.113.7, [fd00::1]:8443"), ip("203.0.113.7"));
        // What is not an address stops the walk at the last trusted hop.
        assert_eq!(through("203.0.113.7, unknown"), ip("10.0.0.1"));
        assert_eq!(through("203.0.113.7:port"), ip("10.0.0.1"));
        assert_eq!(through("[203.0.113.7]:1"), ip("10.0.0.1"));
    }

    #[test]
    fn forwarding_from_a_private_peer_with_no_trusted_proxy_is_noticed_once() {
        let limits = Limits::new(1, 1, 0, "").unwrap();
        let headers = forwarded("203.0.113.7");
        // A public peer, or a private one that forwards for no one, is not a proxy to warn about.
        assert!(!limits.untrusted_forwarding(ip("198.51.100.1"), &headers));
        assert!(!limits.untrusted_forwarding(ip("10.0.0.1"), &HeaderMap::new()));
        assert!(limits.untrusted_forwarding(ip("10.0.0.1"), &headers));
        assert!(!limits.untrusted_forwarding(ip("10.0.0.1"), &headers));
        assert!(!limits.untrusted_forwarding(ip("192.168.1.1"), &headers));
        // The peer still is the client: nothing is trusted.
        assert_eq!(limits.client(ip("10.0.0.1"), &headers), ip("10.0.0.1"));
        // With proxies trusted, there is nothing to warn about.
        let configured = Limits::new(1, 1, 0, "10.0.0.0/8").unwrap();
        assert!(!configured.untrusted_forwarding(ip("172.16.0.1"), &headers));
        for private in [
            "10.1.2.3",
            "172.31.0.1",
            "192.168.0.1",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.1.1",
            "fd12::1",
            "fe80::1",
            "::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(super::is_private(ip(private)), "{private}");
        }
        for public in ["203.0.113.7", "100.128.0.1", "172.32.0.1", "2001:db8::1"] {
            assert!(!super::is_private(ip(public)), "{public}");
        }
    }

    #[test]
    fn a_client_over_its_limit_is_refused_with_when_to_retry_and_others_are_not() {
        let limits = Limits::new(2, 0, 0, "").unwrap();
        let (one, two) = (ip("198.51.100.1"), ip("198.51.100.2"));
        assert!(limits.admit(Kind::Text, one).is_ok());
        assert!(limits.admit(Kind::Text, one).is_ok());
        let refused = limits.admit(Kind::Text, one).unwrap_err();
        assert!(
            matches!(refused, crate::error::ApiError::RateLimited { retry_after_secs } if (1..=31).contains(&retry_after_secs)),
            "{refused:?}"
        );
        assert!(limits.admit(Kind::Text, two).is_ok());
        // 0 means no limit.
        for _ in 0..100 {
            assert!(limits.admit(Kind::Image, one).is_ok());
        }
    }

    #[test]
    fn joins_have_a_limit_of_their_own_and_0_means_none() {
        let limits = Limits::new(1, 1, 0, "").unwrap().with_joins(3);
        let (one, two) = (ip("198.51.100.1"), ip("198.51.100.2"));
        assert!(limits.joins_limited());
        for _ in 0..3 {
            assert!(limits.admit_join(one).is_ok());
        }
        let refused = limits.admit_join(one).unwrap_err();
        assert!(
            matches!(refused, crate::error::ApiError::RateLimited { retry_after_secs } if (1..=21).contains(&retry_after_secs)),
            "{refused:?}"
        );
        assert!(limits.admit_join(two).is_ok());
        // Joins spend nothing of the limit on new generations.
        assert!(limits.admit(Kind::Text, one).is_ok());
        let off = Limits::new(0, 0, 0, "").unwrap().with_joins(0);
        assert!(!off.joins_limited());
        for _ in 0..1000 {
            assert!(off.admit_join(one).is_ok());
        }
    }

    #[test]
    fn a_client_holds_at_most_its_streams_and_a_closed_one_frees_its_slot() {
        let limits = Limits::new(0, 0, 2, "").unwrap();
        let (one, two) = (ip("198.51.100.1"), ip("198.51.100.2"));
        let first = limits.open_stream(one).unwrap();
        let _second = limits.open_stream(one).unwrap();
        assert!(limits.open_stream(one).is_err());
        assert!(limits.open_stream(two).is_ok());
        drop(first);
        assert!(limits.open_stream(one).is_ok());
    }
}
