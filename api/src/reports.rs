//! `POST /v1/fights/{key}/report` and `POST /v1/images/{key}/report`: a visitor flags a
//! stored answer or picture as unsafe, wrong, poor or something else.
//!
//! A report costs no upstream call and no generation: it names an answer this replica can find
//! (memory, else the bucket: 404 otherwise) and goes to one worker (`versus.reports`), which
//! counts it once per client and answer in Postgres and, when `VERSUS_REPORTS_TO_HIDE` clients
//! have found the answer unsafe, hides it (see the worker's `reports`). What a hide withdrew
//! comes back as purge markers, which this replica spreads to every other, so the answer is
//! refused everywhere at once. Guards, in this order: the key's shape, the cross-site check
//! (a page of another site could otherwise have each of its visitors report an answer, every
//! one a distinct client), the client's look-up rate (a report is a request past memory), the
//! body.
//!
//! Who reports is counted per IPv4 address or IPv6 /48 (not /64: a /48 holds 65,536 of them,
//! and one allocation must not make many clients), as a pseudonym: the SHA-256 of that prefix,
//! which keeps addresses out of the table's casual reads (it is not anonymous: the hashes of
//! all IPv4 addresses can be computed).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use axum::{
    Json,
    extract::{ConnectInfo, FromRequest, Path, Request, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use versus_shared::{
    key::Key,
    wire::{self, Reason, Report, ReportReply},
};

use crate::{
    app::App,
    cache::{EdgeCache, Entry},
    error::{ApiError, ErrorBody},
};

/// How long a worker may take to count a report (a hide withdraws the answer too).
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// A report's body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReportBody {
    /// Why: `unsafe` (hateful, sexual, harmful), `wrong`, `poor` or `other`. Only `unsafe`
    /// reports hide an answer.
    #[schema(schema_with = reason_schema, example = "unsafe")]
    reason: Reason,
}

fn reason_schema() -> utoipa::openapi::schema::Object {
    crate::error::one_of(&Reason::ALL.map(Reason::as_str))
}

/// What a report did.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Reported {
    /// Whether it counted: false when this client had reported this answer already.
    counted: bool,
}

/// What a report can get instead of a 202.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // describes the responses `ApiError` builds, for the OpenAPI document
pub(crate) enum ReportRefusals {
    /// `invalid_body`: the body is not `{"reason": "unsafe" | "wrong" | "poor" | "other"}`.
    #[response(status = 400)]
    BadRequest(ErrorBody<'static>),
    /// `cross_site`: a browser sent it on behalf of another site.
    #[response(status = 403)]
    CrossSite(ErrorBody<'static>),
    /// `not_found`: nothing is stored under this key.
    #[response(status = 404)]
    NotFound(ErrorBody<'static>),
    /// `rate_limited`: this client looked up more than it may past the API's memory
    /// (`VERSUS_CLIENT_LOOKUPS_PER_SECOND`).
    #[response(status = 429, headers(("Retry-After" = u64, description = "Seconds to wait.")))]
    RateLimited(ErrorBody<'static>),
    /// `unavailable`: no worker or NATS is available; nothing was recorded.
    #[response(status = 503)]
    Unavailable(ErrorBody<'static>),
}

/// A report's body; one that is not `{"reason": …}` with a known reason is bad input (400).
pub(crate) struct JsonReport(Reason);

impl<S: Send + Sync> FromRequest<S> for JsonReport {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<JsonReport, ApiError> {
        let Json(body) = Json::<ReportBody>::from_request(request, state)
            .await
            .map_err(|e| ApiError::InvalidBody(e.body_text()))?;
        Ok(JsonReport(body.reason))
    }
}

/// Reports a stored text answer.
#[utoipa::path(
    post,
    path = "/v1/fights/{key}/report",
    tag = "fights",
    params(("key" = String, Path, description = "The answer's key, as `meta` and the JSON answers give it.", pattern = "^[0-9a-f]{32}$")),
    request_body = ReportBody,
    responses(
        (status = 202, description = "Recorded (`counted: false` when this client had reported this answer already).", body = Reported),
        ReportRefusals,
    ),
)]
pub(crate) async fn report_fight(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(key): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    report(&app, &app.inner.answers, peer, &key, &headers, request).await
}

/// Reports a stored picture.
#[utoipa::path(
    post,
    path = "/v1/images/{key}/report",
    tag = "images",
    params(("key" = String, Path, description = "The picture's key, as its stream's `meta` and `done` give it.", pattern = "^[0-9a-f]{32}$")),
    request_body = ReportBody,
    responses(
        (status = 202, description = "Recorded (`counted: false` when this client had reported this picture already).", body = Reported),
        ReportRefusals,
    ),
)]
pub(crate) async fn report_image(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(key): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    report(&app, &app.inner.images, peer, &key, &headers, request).await
}

/// Checks a report in the order of the module's doc, finds the answer it names, and has a
/// worker count it; spreads what a hide withdrew.
async fn report<V: Entry>(
    app: &App,
    cache: &EdgeCache<V>,
    peer: SocketAddr,
    key: &str,
    headers: &HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let key = Key::parse(key).ok_or(ApiError::NotFound)?;
    app.inner.origins.check(headers)?;
    let client = app.client(peer, headers);
    app.look_up(client)?;
    let JsonReport(reason) = JsonReport::from_request(request, &()).await?;
    let stored = match cache.get(&key).await {
        Ok(Some(stored)) => stored,
        Ok(None) => return Err(ApiError::NotFound),
        Err(_) => return Err(ApiError::Unavailable),
    };
    let report = Report {
        kind: V::KIND,
        key: key.clone(),
        attempt: stored.value.attempt(),
        client: pseudonym(client),
        reason,
    };
    let reply: ReportReply = app
        .ask_worker(wire::REPORT_SUBJECT, &report, REPORT_TIMEOUT)
        .await?;
    // Not found: stored no more (purged, or hidden meanwhile), though a copy here held it.
    let counted = app.carried_out(wire::REPORT_SUBJECT, key, reply).await?;
    let body = Reported { counted };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Who reports, as the reports table keeps it (see the module's doc).
fn pseudonym(client: IpAddr) -> String {
    let prefix = match client {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
    };
    let digest = Sha256::digest(format!("versus-report:{prefix}").as_bytes());
    hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reporter_is_an_ipv4_address_or_an_ipv6_48_and_never_the_address_itself() {
        let of = |ip: &str| pseudonym(ip.parse().unwrap());
        assert_ne!(of("192.0.2.1"), of("192.0.2.2"));
        assert!(!of("192.0.2.1").contains("192"));
        assert_eq!(of("2001:db8:1:2::1"), of("2001:db8:1:ffff::9"));
        assert_ne!(of("2001:db8:1::1"), of("2001:db8:2::1"));
        assert_eq!(of("192.0.2.1").len(), 32);
    }
}
