//! Which requests may start a generation: none that a browser sends for another site. A page
//! elsewhere could otherwise make its visitors' browsers pay for new answers. Browsers say
//! where a request comes from (`Sec-Fetch-Site`, `Origin`); requests without either (curl,
//! servers) are not browsers acting for someone else, and are left to the other limits.
//! Hits are never refused: a cached answer costs nothing.

use axum::http::{HeaderMap, header};

use crate::error::ApiError;

/// The origins whose pages may start generations, besides this API's own.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    allowed: Vec<String>,
}

impl Origins {
    /// From `VERSUS_ALLOWED_ORIGINS`: a comma-separated list of `scheme://host[:port]`.
    pub fn parse(list: &str) -> anyhow::Result<Origins> {
        let mut allowed = Vec::new();
        for origin in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let normal = origin.trim_end_matches('/').to_ascii_lowercase();
            let Some((scheme, authority)) = normal.split_once("://") else {
                anyhow::bail!("VERSUS_ALLOWED_ORIGINS: `{origin}` is not scheme://host[:port]");
            };
            if !matches!(scheme, "http" | "https")
                || authority.is_empty()
                || authority.contains('/')
            {
                anyhow::bail!("VERSUS_ALLOWED_ORIGINS: `{origin}` is not scheme://host[:port]");
            }
            allowed.push(normal);
        }
        Ok(Origins { allowed })
    }

    /// Refuses (`cross_site`) a request that a browser sent on behalf of another site: one
    /// marked `Sec-Fetch-Site: cross-site`, or whose `Origin` is neither this API's own (the
    /// `Host` it was sent to) nor an allowed one.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if header_str(headers, "sec-fetch-site") == Some("cross-site") {
            return Err(ApiError::CrossSite);
        }
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin
            .to_str()
            .map_err(|_| ApiError::CrossSite)?
            .trim_end_matches('/')
            .to_ascii_lowercase();
        let own = header_str(headers, header::HOST.as_str()).is_some_and(|host| {
            origin
                .split_once("://")
                .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
        });
        if own || self.allowed.contains(&origin) {
            Ok(())
        } else {
            Err(ApiError::CrossSite)
        }
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::Origins;
    use axum::http::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn only_the_own_origin_and_listed_ones_may_start_generations() {
        let origins =
            Origins::parse("https://versus.example, https://www.versus.example/").unwrap();
        let ok = |pairs| origins.check(&headers(pairs)).is_ok();
        // curl and servers send neither header.
        assert!(ok(&[("host", "api.local:8080")]));
        // The page itself, and the listed sites.
        assert!(ok(&[
            ("host", "api.local:8080"),
            ("origin", "http://api.local:8080")
        ]));
        assert!(ok(&[
            ("sec-fetch-site", "same-origin"),
            ("origin", "https://Versus.example")
        ]));
        assert!(ok(&[("origin", "https://www.versus.example")]));
        // Anything else a browser sends for another site.
        assert!(!ok(&[
            ("host", "api.local:8080"),
            ("origin", "https://elsewhere.example")
        ]));
        assert!(!ok(&[("origin", "null")]));
        assert!(!ok(&[("sec-fetch-site", "cross-site")]));
        assert!(!ok(&[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://versus.example")
        ]));
    }

    #[test]
    fn a_malformed_allowed_origin_is_refused_at_start_up() {
        assert!(Origins::parse("versus.example").is_err());
        assert!(Origins::parse("ftp://versus.example").is_err());
        assert!(Origins::parse("https://versus.example/page").is_err());
        assert!(Origins::parse("").unwrap().allowed.is_empty());
    }
}
