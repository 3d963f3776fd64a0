//! The kit's own servers work: a real nats-server and a fresh Postgres database.

use std::time::Duration;

use versus_testkit::{Database, Nats, eventually, run_within};

/// Each test's deadline: a hung server fails the test instead of stalling the run.
const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn nats_starts_accepts_connections_and_cleans_up() {
    run_within(DEADLINE, async {
        let mut nats = Nats::start().await;
        assert!(nats.url.starts_with("nats://127.0.0.1:"), "{}", nats.url);
        let addr = ("127.0.0.1", nats.port);
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // A NATS server greets every client with an INFO line that says JetStream is on.
        let mut greeting = vec![0; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut stream, &mut greeting)
            .await
            .expect("read INFO");
        let greeting = String::from_utf8_lossy(&greeting[..n]);
        assert!(greeting.starts_with("INFO "), "{greeting}");
        assert!(greeting.contains("\"jetstream\":true"), "{greeting}");
        drop(stream);

        // A restart keeps the port and the store.
        let store = nats.store_dir().to_path_buf();
        nats.restart().await;
        tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect after restart");

        drop(nats);
        assert!(
            !store.exists(),
            "the store {} was not removed",
            store.display()
        );
        eventually("the port to close", Duration::from_secs(5), || async {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await;
    });
}

#[test]
fn two_fresh_databases_are_distinct_and_usable() {
    run_within(DEADLINE, async {
        let (a, b) = tokio::join!(Database::fresh(), Database::fresh());
        assert_ne!(a.name, b.name);
        assert!(a.url.ends_with(&a.name), "{}", a.url);

        let pool = a.pool().await;
        let current: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&pool)
            .await
            .expect("query");
        assert_eq!(current, a.name);

        sqlx::query("CREATE TABLE t (x int)")
            .execute(&pool)
            .await
            .expect("create a table");
        let other: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 't'",
        )
        .fetch_one(&b.pool().await)
        .await
        .expect("query the other database");
        assert_eq!(other, 0, "databases share tables");
    });
}
