//! The API's errors and their JSON shape, `{"error":{"code","message"}}`.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;
use versus_shared::{
    key::NameError,
    wire::{ErrorCode, Event},
};

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("{0}")]
    InvalidBody(String),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("{}", ErrorCode::NotFound.message())]
    NotFound,
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The generation ended with an error event.
    #[error("{message}")]
    Generation {
        code: String,
        message: String,
        retryable: bool,
        /// Seconds until asking again may succeed, when the error says.
        retry_after_secs: Option<u64>,
    },
    #[error("the service is unavailable; try again")]
    Unavailable,
    /// The client started as many new answers as it may for now.
    #[error("you have asked for many new matchups; try again in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// The client's new answers used up its allowance for the UTC day
    /// (`VERSUS_CLIENT_DAILY_USD`): until midnight UTC, `retry_after_secs` from now.
    #[error("{}", ErrorCode::QuotaExhausted.message())]
    QuotaExhausted { retry_after_secs: u64 },
    /// The client holds as many open streams as it may.
    #[error("you have too many answers open at once; close some and try again")]
    TooManyStreams,
    /// A browser asked for a new answer on behalf of another site.
    #[error("{}", ErrorCode::CrossSite.message())]
    CrossSite,
}

impl ApiError {
    /// The error a generation ended with (an `error` or `purged` event).
    pub fn ended(event: &Event) -> ApiError {
        match event {
            Event::Error {
                code,
                message,
                retryable,
                ..
            } => ApiError::Generation {
                code: code.clone(),
                message: message.clone(),
                retryable: *retryable,
                retry_after_secs: event.retry_after().map(|d| d.as_secs()),
            },
            _ => ApiError::Unavailable,
        }
    }

    fn status_and_code(&self) -> (StatusCode, &str) {
        let of = |status, code: ErrorCode| (status, code.as_str());
        match self {
            ApiError::InvalidName(e) => of(StatusCode::BAD_REQUEST, e.code()),
            ApiError::InvalidBody(_) => of(StatusCode::BAD_REQUEST, ErrorCode::InvalidBody),
            ApiError::InvalidQuery(_) => of(StatusCode::BAD_REQUEST, ErrorCode::InvalidQuery),
            ApiError::NotFound => of(StatusCode::NOT_FOUND, ErrorCode::NotFound),
            ApiError::Unauthorized(_) => of(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            ApiError::Generation {
                code, retryable, ..
            } => {
                let status = if *code == ErrorCode::Refused {
                    StatusCode::UNPROCESSABLE_ENTITY
                } else if *retryable {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_GATEWAY
                };
                (status, code.as_str())
            }
            ApiError::Unavailable => of(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            ApiError::CrossSite => of(StatusCode::FORBIDDEN, ErrorCode::CrossSite),
            ApiError::RateLimited { .. } | ApiError::TooManyStreams => {
                of(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited)
            }
            ApiError::QuotaExhausted { .. } => {
                of(StatusCode::TOO_MANY_REQUESTS, ErrorCode::QuotaExhausted)
            }
        }
    }
}

/// When a client at its cap of open streams may try again: a slot frees as soon as any of
/// its streams ends, so soon.
const STREAM_SLOT_RETRY_SECS: u64 = 1;

/// Every error response's body: `{"error":{"code","message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail<'a> {
    /// What went wrong, for programs (`ErrorCode` in the shared crate lists them all).
    #[schema(schema_with = code_schema, example = "empty_name")]
    pub code: &'a str,
    /// What went wrong, for people.
    pub message: &'a str,
    /// For a generation that ended with an error: whether asking again may succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
}

/// The schema of an error's `code`: one of every code there is, so a client can match on
/// them exhaustively and the document cannot miss one.
pub(crate) fn code_schema() -> utoipa::openapi::schema::Object {
    let mut schema = one_of(&ErrorCode::ALL.map(ErrorCode::as_str));
    schema.description = Some(
        "What went wrong, for programs: one code of the README's table of codes, which says \
         what each means and whether asking again may help."
            .to_owned(),
    );
    schema
}

/// The schema of a string that is one of `values`: for an enum of the shared crate, which
/// knows nothing of OpenAPI (an error's code, a report's reason, an operator's decision).
pub(crate) fn one_of(values: &[&'static str]) -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(values.iter().copied()))
        .build()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let retryable = match &self {
            ApiError::Generation { retryable, .. } => Some(*retryable),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: &self.to_string(),
                retryable,
            },
        };
        if status.is_client_error() {
            metrics::counter!("versus_bad_requests_total", "code" => code.to_owned()).increment(1);
        } else {
            metrics::counter!("versus_errors_total", "code" => code.to_owned()).increment(1);
        }
        let mut response = (status, Json(body)).into_response();
        let retry_after = match &self {
            ApiError::RateLimited { retry_after_secs }
            | ApiError::QuotaExhausted { retry_after_secs } => Some(*retry_after_secs),
            ApiError::TooManyStreams => Some(STREAM_SLOT_RETRY_SECS),
            ApiError::Generation {
                retry_after_secs, ..
            } => *retry_after_secs,
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The refusals a request that may start a generation can get before its stream opens.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // describes the responses `ApiError` builds, for the OpenAPI document
pub(crate) enum Refusals {
    /// A missing or invalid name (`code` says which rule), or a malformed query or body.
    #[response(status = 400)]
    BadRequest(ErrorBody<'static>),
    /// `cross_site`: a browser asked for a new answer on behalf of another site.
    #[response(status = 403)]
    CrossSite(ErrorBody<'static>),
    /// `refused`: moderation refused this matchup (asking again costs nothing).
    #[response(status = 422)]
    Refused(ErrorBody<'static>),
    /// `rate_limited`: this client started many new answers, or holds many streams;
    /// `quota_exhausted`: its new answers used up its allowance for the UTC day (`Retry-After`
    /// until midnight UTC).
    #[response(status = 429, headers(("Retry-After" = u64, description = "Seconds to wait.")))]
    RateLimited(ErrorBody<'static>),
    /// `busy`, `budget_exhausted` or `unavailable`: retry later.
    #[response(status = 503, headers(("Retry-After" = u64, description = "Seconds to wait, when known.")))]
    Unavailable(ErrorBody<'static>),
}
