//! The Postgres pool and the migrations, embedded in the binary from `migrations/`. The
//! migrations run as the database's owner; the programs connect as the roles they make
//! (`versus_api`, `versus_worker`), which may not change the schema ([`migrate`]).
//!
//! Every connection is bounded in time, so that a Postgres that is slow, stopped or cut off
//! never holds a job (or an admin request) for long:
//!
//! - taking a connection from the pool, or opening one, gives up after [`ACQUIRE_TIMEOUT`]
//!   (refused connections are retried until then: a restarting Postgres is waited for);
//! - an idle connection is checked (a round trip) before it is handed out, so the dead
//!   connections a Postgres restart leaves in the pool are dropped rather than used;
//! - Postgres cancels any statement that runs past [`STATEMENT_TIMEOUT`];
//! - Postgres sends TCP keep-alives on each connection ([`TCP_KEEPALIVES_IDLE`], then every
//!   [`TCP_KEEPALIVES_INTERVAL`], [`TCP_KEEPALIVES_COUNT`] times), so the session, and any
//!   lock, of a client that vanished without closing its connection ends within about a
//!   minute rather than the two hours of the usual kernel default.
//!
//! sqlx 0.9 has no way to set keep-alives on the client's own socket. The client's side of a
//! lost connection is bounded instead by the callers: the worker's statements give up after
//! [`CLIENT_TIMEOUT`] (`worker/src/claims.rs`), and its lease heartbeats after a third of the
//! lease.
//!
//! The settings go to Postgres as startup options (`-c name=value`); one that `DATABASE_URL`
//! already sets (`?options=-c statement_timeout=…`) is left as the URL has it. A connection
//! pooler in front of Postgres must let the `options` startup parameter through (PgBouncer:
//! `ignore_startup_parameters = options` drops it, and then set the values on the role with
//! `ALTER ROLE … SET`).

use std::time::Duration;

use anyhow::Context;
use sqlx::{
    Connection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::Secret;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// How long taking a connection (from the pool, or a new one) may take.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long Postgres lets one statement run before it cancels it (`statement_timeout`).
/// Migrations run without it.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a caller waits for a statement's answer before it gives the connection up for
/// lost: a connection taken, the statement run, and a margin. Past it, Postgres has either
/// cancelled the statement or cannot be reached.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Seconds of silence on a connection before Postgres sends a TCP keep-alive probe.
pub const TCP_KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
/// Seconds between unanswered keep-alive probes.
pub const TCP_KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which Postgres drops the connection.
pub const TCP_KEEPALIVES_COUNT: u32 = 3;

/// Connects with a bounded pool; fails fast rather than hanging when Postgres is down.
pub async fn connect(url: &Secret, max_connections: u32) -> anyhow::Result<PgPool> {
    pool(max_connections)
        .connect_with(options(url)?)
        .await
        .context("connecting to Postgres (DATABASE_URL)")
}

/// A pool that connects on first use, for a process that needs Postgres only now and then
/// (the API's admin routes): starting up never waits for, or fails on, Postgres.
pub fn connect_lazy(url: &Secret, max_connections: u32) -> anyhow::Result<PgPool> {
    Ok(pool(max_connections).connect_lazy_with(options(url)?))
}

fn pool(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // The default, said out loud: a connection left dead by a Postgres restart fails
        // this check and is replaced instead of failing a statement.
        .test_before_acquire(true)
}

/// `DATABASE_URL` with the timeouts and keep-alives above, unless the URL sets them itself.
fn options(url: &Secret) -> anyhow::Result<PgConnectOptions> {
    let options: PgConnectOptions = url.expose().parse().context("reading DATABASE_URL")?;
    let given = options.get_options().unwrap_or_default().to_owned();
    let ours = [
        (
            "statement_timeout",
            STATEMENT_TIMEOUT.as_millis().to_string(),
        ),
        (
            "tcp_keepalives_idle",
            TCP_KEEPALIVES_IDLE.as_secs().to_string(),
        ),
        (
            "tcp_keepalives_interval",
            TCP_KEEPALIVES_INTERVAL.as_secs().to_string(),
        ),
        ("tcp_keepalives_count", TCP_KEEPALIVES_COUNT.to_string()),
    ];
    Ok(options.options(
        ours.into_iter()
            .filter(|(name, _)| !given.contains(&format!("{name}="))),
    ))
}

/// Applies pending migrations, if any, at a worker's start-up. When every migration this
/// build embeds is already applied (with the same checksum) nothing is run: a worker connected
/// as `versus_worker`, which may not change the schema, starts on a database the owner has
/// migrated. Otherwise they run as [`migrate_all`] runs them, which needs the owner.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    if pending(pool).await? == 0 {
        return Ok(());
    }
    match migrate_all(pool).await {
        // The owner's run finished while this one waited for its lock: everything is applied,
        // which is all a worker needs (sqlx's run fails at once for a role that may not create
        // its table).
        Err(e) if pending(pool).await.is_ok_and(|n| n == 0) => {
            tracing::info!(error = %format!("{e:#}"), "the migrations were applied meanwhile");
            Ok(())
        }
        ran => ran,
    }
}

/// Runs the migrations (checking the applied ones against those embedded). sqlx serialises
/// concurrent runs with an advisory lock, so every worker can call this at start-up. They run
/// on a connection of their own without the statement timeout (waiting for another worker's
/// migrations, or building an index, may take longer), which is closed afterwards rather than
/// given back to the pool.
pub async fn migrate_all(pool: &PgPool) -> anyhow::Result<()> {
    let mut conn = pool
        .acquire()
        .await
        .context("connecting to Postgres for the migrations")?
        .detach();
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut conn)
        .await
        .context("lifting the statement timeout for the migrations")?;
    let ran = MIGRATOR.run(&mut conn).await;
    let _ = conn.close().await;
    match ran {
        Ok(()) => Ok(()),
        Err(e) if denied(&e) => Err(anyhow::Error::new(e).context(
            "running database migrations: this DATABASE_URL's role may not change the schema \
             (versus_worker may not); run them as the database's owner first: \
             versus-worker --migrate-only with the owner's DATABASE_URL",
        )),
        Err(e) => Err(anyhow::Error::new(e).context("running database migrations")),
    }
}

/// How many of the embedded migrations the database lacks (or has in another version).
async fn pending(pool: &PgPool) -> anyhow::Result<usize> {
    let applied: Vec<(i64, Vec<u8>)> =
        match sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
        {
            Ok(applied) => applied,
            // A new database: nothing is applied yet.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNDEFINED_TABLE) => {
                Vec::new()
            }
            Err(e) => return Err(e).context("reading the applied migrations"),
        };
    Ok(MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .filter(|m| {
            !applied
                .iter()
                .any(|(version, checksum)| *version == m.version && **checksum == *m.checksum)
        })
        .count())
}

/// Postgres's `undefined_table`.
const UNDEFINED_TABLE: &str = "42P01";
/// Postgres's `insufficient_privilege`.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// Whether a migration failed because the role may not do what it says.
fn denied(e: &sqlx::migrate::MigrateError) -> bool {
    use sqlx::migrate::MigrateError;
    let (MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _)) = e else {
        return false;
    };
    matches!(e, sqlx::Error::Database(e) if e.code().as_deref() == Some(INSUFFICIENT_PRIVILEGE))
}

#[cfg(test)]
mod tests {
    use super::options;
    use crate::config::Secret;

    #[test]
    fn connections_get_the_timeouts_and_keep_alives() {
        let options = options(&Secret::new("postgres://u@h:5432/db")).unwrap();
        assert_eq!(
            options.get_options(),
            Some(
                "-c statement_timeout=10000 -c tcp_keepalives_idle=30 \
                 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"
            )
        );
    }

    #[test]
    fn what_the_url_sets_wins() {
        let url =
            "postgres://u@h/db?options=-c%20statement_timeout%3D2s&options[tcp_keepalives_count]=9";
        let options = options(&Secret::new(url)).unwrap();
        assert_eq!(
            options.get_options(),
            Some(
                "-c statement_timeout=2s -c tcp_keepalives_count=9 \
                 -c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10"
            )
        );
    }
}
