//! The Postgres pool and the migrations, embedded in the binary from `migrations/`.

use std::time::Duration;

use anyhow::Context;
use sqlx::{PgPool, postgres::PgPoolOptions};

use crate::config::Secret;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connects with a bounded pool; fails fast rather than hanging when Postgres is down.
pub async fn connect(url: &Secret, max_connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url.expose())
        .await
        .context("connecting to Postgres (DATABASE_URL)")
}

/// A pool that connects on first use, for a process that needs Postgres only now and then
/// (the API's admin routes): starting up never waits for, or fails on, Postgres.
pub fn connect_lazy(url: &Secret, max_connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(url.expose())
        .context("reading DATABASE_URL")
}

/// Applies pending migrations. sqlx serialises concurrent runs with an advisory lock, so every
/// worker can call this at start-up.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("running database migrations")
}
