//! Postgres and NATS as the admin routes use them: either one missing or failing is logged
//! and answered 503 (`unavailable`), since nothing an operator sent was wrong.

use crate::{app::App, error::ApiError};

impl App {
    /// The Postgres pool: unavailable when `DATABASE_URL` is unset.
    pub(super) fn db(&self) -> Result<&sqlx::PgPool, ApiError> {
        self.inner.db.as_ref().ok_or(ApiError::Unavailable)
    }
}

pub(super) fn database(e: sqlx::Error) -> ApiError {
    tracing::warn!(error = %e, "admin query failed");
    ApiError::Unavailable
}

pub(super) fn nats(e: &dyn std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "admin NATS operation failed");
    ApiError::Unavailable
}
