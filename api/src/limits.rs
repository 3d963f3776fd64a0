//! Per-client limits on new generations. A client (its address, or the address a trusted
//! proxy forwarded for) may start `VERSUS_CLIENT_MISSES_PER_MINUTE` new answers and
//! `VERSUS_CLIENT_PICTURES_PER_MINUTE` new pictures a minute, each with a burst of the same
//! size (GCRA, from `governor`). Only requests that would start a generation count: hits and
//! joins of a generation in progress never do, and a refusal costs the client nothing. Each API
//! replica counts on its own, so behind N replicas a client may start up to N times as many.
//! A client may also hold at most `VERSUS_CLIENT_MAX_STREAMS` event streams open at once.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::{Arc, Mutex, PoisonError},
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
    /// clients count by their /64, the block one subscriber usually holds.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if self.is_trusted(client) {
            let forwarded = headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .collect::<Vec<_>>();
            for hop in forwarded.iter().rev() {
                let Ok(address) = hop.trim().parse::<IpAddr>() else {
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

    fn limiter(&self, kind: Kind) -> Option<&DefaultKeyedRateLimiter<IpAddr>> {
        match kind {
            Kind::Text => self.text.as_ref(),
            Kind::Image => self.image.as_ref(),
        }
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
            for limiter in [&self.text, &self.image].into_iter().flatten() {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
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
