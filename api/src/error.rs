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
    wire::{self, Event},
};

/// The code of a miss refused because today's budget is spent.
pub const BUDGET_EXHAUSTED: &str = "budget_exhausted";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error("{0}")]
    InvalidBody(String),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("no such answer")]
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
    /// The client holds as many open streams as it may.
    #[error("you have too many answers open at once; close some and try again")]
    TooManyStreams,
    /// A browser asked for a new answer on behalf of another site.
    #[error("a new answer cannot be started from another site; open Versus itself to ask")]
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
        match self {
            ApiError::InvalidName(e) => (StatusCode::BAD_REQUEST, e.code()),
            ApiError::InvalidBody(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            ApiError::InvalidQuery(_) => (StatusCode::BAD_REQUEST, "invalid_query"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Generation {
                code, retryable, ..
            } => {
                let status = if code == wire::REFUSED {
                    StatusCode::UNPROCESSABLE_ENTITY
                } else if *retryable {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_GATEWAY
                };
                (status, code.as_str())
            }
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::CrossSite => (StatusCode::FORBIDDEN, "cross_site"),
            ApiError::RateLimited { .. } | ApiError::TooManyStreams => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
            }
        }
    }
}

/// Every error response's body: `{"error":{"code","message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail<'a> {
    /// What went wrong, for programs: `missing_name`, `empty_name`, `name_too_long`,
    /// `control_character`, `invisible_character`, `unassigned_character`, `too_many_marks`,
    /// `mixed_scripts`, `invalid_body`, `invalid_query`, `not_found`, `unauthorized`,
    /// `cross_site`, `rate_limited`, `refused`, `busy`, `budget_exhausted`, `unavailable`, or
    /// the code a generation ended with.
    #[schema(example = "empty_name")]
    pub code: &'a str,
    /// What went wrong, for people.
    pub message: &'a str,
    /// For a generation that ended with an error: whether asking again may succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
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
            ApiError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            ApiError::TooManyStreams => Some(1),
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
