//! The backend conformance suite (`store::conformance`) on a fresh SQLite store per check.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::sync::Arc;

use common::TempDir;
use store::conformance;
use store_sqlite::{SqliteOptions, SqliteStore};

fn fresh(tag: &str) -> (TempDir, Arc<SqliteStore>) {
    let dir = TempDir::new(tag);
    let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    (dir, Arc::new(store))
}

macro_rules! check {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let (_dir, store) = fresh(stringify!($name));
            conformance::$name(&store).await;
        }
    )*};
}

check!(
    create_read_update,
    index_follows_updates,
    version_conflicts,
    delete_and_recreate,
    history,
    search_predicates,
    references_stored_as_another,
    date_and_last_updated_prefixes,
    sorting_and_paging,
    savepoint_isolation,
    concurrent_creates,
    concurrent_conditional_creates,
    searches_told_ahead,
    events,
    events_concurrent_gap_free,
    idempotency,
    kv,
    delivery_lifecycle,
    deliveries_enqueued_together,
    delivery_listing,
    due_per_subscription,
    delivery_no_head_of_line_blocking,
    events_watch,
    delivery_batch_isolation,
    delivery_claim_and_put_at,
);

/// Every check, one after the other, on one store (as a deployment would see them).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_on_one_store() {
    let (_dir, store) = fresh("run_all");
    conformance::run_all(store).await;
}

/// The same on a store that commits every write alone, with `synchronous=NORMAL`, and leaves the writes of
/// WAL frames to SQLite (without the buffering VFS).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_without_group_commit() {
    let dir = TempDir::new("run_all_single");
    let options = SqliteOptions {
        durability: store_sqlite::Durability::OsCrash,
        read_connections: 1,
        max_batch: 1,
        wal_buffer: false,
    };
    let store = Arc::new(SqliteStore::open(dir.path(), options).unwrap());
    conformance::run_all(store).await;
}
