//! Least privilege in Postgres: the kit migrates as the superuser (the owner), the API
//! connects as the role `versus_api` and the workers as `versus_worker`, and each may run only
//! its own statements.

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use versus_testkit::{Database, System};

use crate::{fight, http, json_of, quick, rows, run, text_of};

/// At least 32 characters, as the API requires of an admin token.
const TOKEN: &str = "s3cret-admin-token-of-the-roles-test";
/// Postgres's `insufficient_privilege`.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// The `DATABASE_URL` a program was started with (the last one set wins).
fn database_url(envs: &[(String, String)]) -> String {
    envs.iter()
        .rev()
        .find(|(key, _)| key == "DATABASE_URL")
        .map(|(_, url)| url.clone())
        .expect("a DATABASE_URL")
}

/// Connects as `url` and checks that it is `role`.
async fn connect_as(url: &str, role: &str) -> PgConnection {
    let mut conn = PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    let user: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(user, role);
    conn
}

/// The SQLSTATE with which Postgres refused a statement; panics if it ran.
fn refusal<T: std::fmt::Debug>(result: sqlx::Result<T>, what: &str) -> String {
    match result {
        Ok(done) => panic!("{what} was allowed: {done:?}"),
        Err(sqlx::Error::Database(e)) => e.code().map(|c| c.into_owned()).unwrap_or_default(),
        Err(e) => panic!("{what} failed other than by a refusal: {e}"),
    }
}

#[test]
fn the_api_role_cannot_change_or_delete_generations() {
    run(async {
        let sys = quick()
            .workers(1)
            .env("VERSUS_ADMIN_TOKEN", TOKEN)
            .start()
            .await;
        let first = fight(&sys, "Ada", "Grace").await;
        let key = first[0].json()["key"].as_str().unwrap().to_owned();
        let text = text_of(&first);
        let stored = rows(&sys, &key).await;
        assert_eq!(stored, [("done".to_owned(), Some(text.clone()))]);

        let url = database_url(sys.api_envs());
        let mut api = connect_as(&url, "versus_api").await;
        let update = sqlx::query("UPDATE generations SET text = 'defaced' WHERE key = $1")
            .bind(&key)
            .execute(&mut api)
            .await;
        assert_eq!(refusal(update, "UPDATE"), INSUFFICIENT_PRIVILEGE);
        let delete = sqlx::query("DELETE FROM generations WHERE key = $1")
            .bind(&key)
            .execute(&mut api)
            .await;
        assert_eq!(refusal(delete, "DELETE"), INSUFFICIENT_PRIVILEGE);
        let insert = sqlx::query(
            "INSERT INTO generations (kind, key, a, b, model, prompt_version, status)
             VALUES ('text', 'forged', 'a', 'b', 'm', 1, 'running')",
        )
        .execute(&mut api)
        .await;
        assert_eq!(refusal(insert, "INSERT"), INSUFFICIENT_PRIVILEGE);
        let truncate = sqlx::query("TRUNCATE generations").execute(&mut api).await;
        assert_eq!(refusal(truncate, "TRUNCATE"), INSUFFICIENT_PRIVILEGE);
        // What its admin routes read, it may.
        let (a, b): (String, String) =
            sqlx::query_as("SELECT a, b FROM generations WHERE kind = 'text' AND key = $1")
                .bind(&key)
                .fetch_one(&mut api)
                .await
                .unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("Ada", "Grace"));
        api.close().await.unwrap();

        // The row is as the worker stored it, and the answer is served as before.
        assert_eq!(rows(&sys, &key).await, stored);
        let again = fight(&sys, "grace", "ADA").await;
        assert_eq!(again[0].json()["cached"], json!(true), "{again:?}");
        assert_eq!(text_of(&again), text);

        // The admin routes work as the role: popularity, spend, a pre-warm batch and its progress.
        let admin = |path: &str| {
            http()
                .get(format!("{}/v1/admin/{path}", sys.api_url()))
                .bearer_auth(TOKEN)
        };
        let popular = admin("popular").send().await.unwrap();
        assert_eq!(popular.status(), 200);
        assert!(popular.json::<Value>().await.unwrap()["matchups"].is_array());
        let spend = admin("spend").send().await.unwrap();
        assert_eq!(spend.status(), 200);
        let batch = http()
            .post(format!("{}/v1/admin/prewarm", sys.api_url()))
            .bearer_auth(TOKEN)
            .json(&json!({"matchups": [{"a": "Ada", "b": "Grace"}], "images": false}))
            .send()
            .await
            .unwrap();
        assert_eq!(batch.status(), 202);
        let batch: Value = batch.json().await.unwrap();
        assert_eq!(batch["already_cached"], 1, "{batch}");
        let id = batch["batch"].as_str().unwrap();
        assert_eq!(
            json_of(admin(&format!("prewarm/{id}"))).await,
            json!({"total": 1, "done": 1, "failed": 0, "pending": 0})
        );

        // An operator's purge still removes the answer: a worker, as its role, marks the row
        // purged (it keeps only its attempt).
        let purge = http()
            .delete(format!("{}/v1/admin/fights/{key}", sys.api_url()))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(purge.status(), 204);
        assert_eq!(rows(&sys, &key).await, [("purged".to_owned(), None)]);
    });
}

#[test]
fn the_worker_role_cannot_change_the_schema() {
    run(async {
        let sys: System = System::builder().start().await;
        // The worker started as its role, on the database the kit migrated, and answers.
        let events = fight(&sys, "Tortoise", "Hare").await;
        assert_eq!(events.last().unwrap().event, "done", "{events:?}");

        let url = database_url(sys.worker_envs());
        let mut worker = connect_as(&url, "versus_worker").await;
        for statement in [
            "DROP TABLE generations",
            "CREATE TABLE intruder (x int)",
            "ALTER TABLE generations ADD COLUMN intruder int",
            "DELETE FROM _sqlx_migrations",
            "DELETE FROM prewarm_batches",
        ] {
            let refused = sqlx::raw_sql(statement).execute(&mut worker).await;
            assert_eq!(refusal(refused, statement), INSUFFICIENT_PRIVILEGE);
        }
        worker.close().await.unwrap();
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables
             WHERE table_schema = 'public' AND table_name IN ('generations', 'intruder')",
        )
        .fetch_one(&sys.db.pool().await)
        .await
        .unwrap();
        assert_eq!(tables, 1, "generations is there, and nothing was added");
    });
}

#[test]
fn a_worker_as_its_role_cannot_migrate_and_says_to_migrate_as_the_owner() {
    run(async {
        // The roles belong to the whole cluster: migrating one database makes them. This one is
        // new, and not migrated.
        Database::fresh().await.migrate().await;
        let db = Database::fresh().await;
        let output = tokio::process::Command::new(versus_testkit::bin_path("versus-worker"))
            .arg("--migrate-only")
            .env_clear()
            .env("DATABASE_URL", db.url_as("versus_worker"))
            .env("NO_COLOR", "1")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(
            stderr.contains("run them as the database's owner"),
            "no hint to migrate as the owner: {stderr}"
        );

        // As the owner it migrates; then a second run changes nothing.
        for _ in 0..2 {
            let output = tokio::process::Command::new(versus_testkit::bin_path("versus-worker"))
                .arg("--migrate-only")
                .env_clear()
                .env("DATABASE_URL", &db.url)
                .env("NO_COLOR", "1")
                .output()
                .await
                .unwrap();
            assert!(output.status.success(), "{output:?}");
        }
        let roles_migrated: bool = sqlx::query_scalar(
            "SELECT has_table_privilege('versus_worker', 'generations', 'DELETE')
                AND NOT has_table_privilege('versus_api', 'generations', 'UPDATE')",
        )
        .fetch_one(&db.pool().await)
        .await
        .unwrap();
        assert!(roles_migrated);
    });
}
