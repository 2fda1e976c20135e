//! Test helpers shared by the integration tests: a fresh, migrated database per test on the server named by
//! `CAREBRIDGE_TEST_DATABASE_URL` (tests print a skip line and pass when it is absent).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::sync::Arc;

use store_postgres::testing::TestDatabase;
use store_postgres::{PgOptions, PgStore};

/// A store on its own database. Field order matters: the store closes before the database is dropped.
pub struct Fixture {
    pub store: Arc<PgStore>,
    pub db: TestDatabase,
}

/// A fresh empty database (no schema), or `None` when no test server is configured.
pub fn database(tag: &str) -> Option<TestDatabase> {
    TestDatabase::from_env(tag).expect("creating a test database")
}

/// A fresh migrated database with a store open on it, or `None` when no test server is configured.
pub fn fresh(tag: &str, options: PgOptions) -> Option<Fixture> {
    let db = database(tag)?;
    store_postgres::migrate(db.url()).expect("migrate");
    let store = PgStore::connect(db.url(), options).expect("connect");
    Some(Fixture {
        store: Arc::new(store),
        db,
    })
}

/// Run one SQL text (no parameters) on `url`, on a runtime of its own.
pub fn exec(url: &str, sql: &str) {
    run_sql(url, sql, false);
}

/// The first column of the first row of one query (no parameters) on `url`, as an integer.
pub fn query_i64(url: &str, sql: &str) -> i64 {
    run_sql(url, sql, true).expect("a query returns its first column")
}

/// `sql` on a connection and runtime of their own; with `first`, its first row's first column.
fn run_sql(url: &str, sql: &str, first: bool) -> Option<i64> {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            if first {
                Some(client.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0))
            } else {
                client.batch_execute(&sql).await.unwrap();
                None
            }
        })
    })
    .join()
    .unwrap()
}
