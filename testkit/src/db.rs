//! A fresh Postgres database per test, on the server of `VERSUS_TEST_DATABASE_URL`.

use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::OnceCell;

/// The variable that names the test Postgres server (a superuser URL); `scripts/test` sets it.
pub const DATABASE_URL_VAR: &str = "VERSUS_TEST_DATABASE_URL";

/// A new, empty database `versus_test_<uuid>`. It is not dropped afterwards: the test cluster
/// is thrown away whole at the end of a `scripts/test` run.
pub struct Database {
    /// The database's URL, for `DATABASE_URL`.
    pub url: String,
    /// The database's name.
    pub name: String,
    pool: OnceCell<PgPool>,
}

impl Database {
    /// Creates the database. Panics if `VERSUS_TEST_DATABASE_URL` is unset or the server
    /// cannot be reached.
    pub async fn fresh() -> Database {
        let admin_url = std::env::var(DATABASE_URL_VAR).unwrap_or_else(|_| {
            panic!(
                "{DATABASE_URL_VAR} is not set: run scripts/test, which starts a throwaway \
                 Postgres and sets it (or point it at a Postgres superuser URL, e.g. \
                 postgres://postgres@127.0.0.1:5432/postgres)"
            )
        });
        let name = format!("versus_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("connect to {DATABASE_URL_VAR}={admin_url}: {e}"));
        // The name is ours (a prefix and hex digits), so formatting it into SQL is safe.
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        let _ = conn.close().await;
        Database {
            url: with_database(&admin_url, &name),
            name,
            pool: OnceCell::new(),
        }
    }

    /// A small pool on this database, for assertions (made on first use, then shared).
    pub async fn pool(&self) -> PgPool {
        self.pool
            .get_or_init(|| async {
                PgPoolOptions::new()
                    .max_connections(4)
                    .connect(&self.url)
                    .await
                    .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url))
            })
            .await
            .clone()
    }
}

/// `url` with its database (the path) replaced by `name`; the query string is kept.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5433/postgres", "x"),
            "postgres://postgres@127.0.0.1:5433/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/db?sslmode=disable", "x"),
            "postgres://u:p@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "x"), "postgres://h:1/x");
    }
}
