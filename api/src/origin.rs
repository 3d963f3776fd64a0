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

impl Origins {
    /// Whether the page's own document request (`GET /?a=A&b=B`) may start the text of a new
    /// answer as the page loads: an address the visitor typed or bookmarked
    /// (`Sec-Fetch-Site: none`, no `Referer`), or a navigation from this site itself or from
    /// an allowed origin. A link, a form, a pop-up or a redirect from anywhere else waits for
    /// the visitor to press Fight. `own` is this API's public origin (`scheme://host[:port]`);
    /// the `Host` the request was sent to counts as own too, as in [`Origins::check`].
    ///
    /// `Sec-Fetch-Site` compares sites, not origins (another port or subdomain is
    /// `same-site`), so `same-site` counts only with a `Referer` of an own or allowed origin,
    /// and `cross-site` only with a `Referer` of an allowed one. A `Referer` of another origin
    /// always tells, whatever else the request says; a stripped `Referer`
    /// (`Referrer-Policy: no-referrer` on the linking page) still leaves `Sec-Fetch-Site`. A
    /// document for a frame, an object or anything but a top-level page never starts.
    pub fn document_may_start(&self, headers: &HeaderMap, own: &str) -> bool {
        if header_str(headers, "sec-fetch-dest").is_some_and(|dest| dest != "document") {
            return false;
        }
        let own = own.trim_end_matches('/').to_ascii_lowercase();
        let host = header_str(headers, header::HOST.as_str());
        // None: no Referer; else whether it names an own (or allowed) origin, and an allowed one.
        let referer = headers.get(header::REFERER).map(|value| {
            let origin = value.to_str().ok().and_then(origin_of);
            let allowed = origin.as_ref().is_some_and(|o| self.allowed.contains(o));
            let own = origin.as_ref().is_some_and(|o| {
                *o == own
                    || o.split_once("://").is_some_and(|(_, authority)| {
                        host.is_some_and(|host| authority.eq_ignore_ascii_case(host))
                    })
            });
            (own || allowed, allowed)
        });
        match (header_str(headers, "sec-fetch-site"), referer) {
            (_, Some((false, _))) => false,
            (Some("cross-site"), referer) => referer.is_some_and(|(_, allowed)| allowed),
            (Some("same-site"), referer) => referer.is_some(),
            (Some("same-origin" | "none") | None, _) => true,
            (Some(_), _) => false,
        }
    }
}

/// The origin (`scheme://host[:port]`, lower case) of an `http` or `https` URL.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if !matches!(scheme.as_str(), "http" | "https") {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    Some(format!("{scheme}://{}", authority.to_ascii_lowercase()))
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
    fn only_a_typed_address_or_an_own_navigation_starts_the_page_s_fight() {
        let origins = Origins::parse("https://partner.example").unwrap();
        let own = "http://127.0.0.1:8080";
        let starts = |pairs| origins.document_may_start(&headers(pairs), own);
        const HOST: (&str, &str) = ("host", "127.0.0.1:8080");
        // Typed, bookmarked, or a client that is no browser.
        assert!(starts(&[HOST, ("sec-fetch-site", "none")]));
        assert!(starts(&[HOST]));
        // The site's own navigation (and a browser without Sec-Fetch-Site).
        assert!(starts(&[
            HOST,
            ("sec-fetch-site", "same-origin"),
            ("referer", "http://127.0.0.1:8080/?a=x&b=y")
        ]));
        assert!(starts(&[HOST, ("referer", "HTTP://127.0.0.1:8080")]));
        // An allowed origin counts as own, on another site as well.
        assert!(starts(&[
            HOST,
            ("sec-fetch-site", "cross-site"),
            ("referer", "https://partner.example/page")
        ]));
        // Another site: a link, whether or not its Referer is stripped.
        assert!(!starts(&[
            HOST,
            ("sec-fetch-site", "cross-site"),
            ("referer", "http://localhost:9000/")
        ]));
        assert!(!starts(&[HOST, ("sec-fetch-site", "cross-site")]));
        // Another origin of the same site (a port, a subdomain): same-site, but not own.
        assert!(!starts(&[
            HOST,
            ("sec-fetch-site", "same-site"),
            ("referer", "http://127.0.0.1:9000/")
        ]));
        assert!(!starts(&[HOST, ("sec-fetch-site", "same-site")]));
        // A Referer of another origin tells, whatever else is said.
        assert!(!starts(&[HOST, ("referer", "http://localhost:9000/")]));
        assert!(!starts(&[
            HOST,
            ("sec-fetch-site", "none"),
            ("referer", "https://evil.example/")
        ]));
        assert!(!starts(&[HOST, ("referer", "null")]));
        // An own Referer on a request that crossed sites (a redirect elsewhere and back).
        assert!(!starts(&[
            HOST,
            ("sec-fetch-site", "cross-site"),
            ("referer", "http://127.0.0.1:8080/")
        ]));
        // A frame, even the site's own, and values no browser sends.
        assert!(!starts(&[
            HOST,
            ("sec-fetch-site", "same-origin"),
            ("sec-fetch-dest", "iframe")
        ]));
        assert!(!starts(&[HOST, ("sec-fetch-site", "elsewhere")]));
        // VERSUS_PUBLIC_URL's origin is own, whatever Host a proxy sent.
        assert!(starts(&[
            ("host", "internal:8080"),
            ("sec-fetch-site", "same-origin"),
            ("referer", "http://127.0.0.1:8080/")
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
