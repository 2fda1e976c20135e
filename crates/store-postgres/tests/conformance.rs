//! The backend conformance suite (`store::conformance`) on a fresh PostgreSQL database per check.
//! Skipped (with a printed reason) when `CAREBRIDGE_TEST_DATABASE_URL` is not set.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use store::conformance;
use store_postgres::PgOptions;

macro_rules! check {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            let Some(f) = common::fresh(stringify!($name), PgOptions::default()) else { return };
            conformance::$name(&f.store).await;
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
);

/// Every check, one after the other, on one store (as a deployment would see them).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_on_one_store() {
    let Some(f) = common::fresh("run_all", PgOptions::default()) else {
        return;
    };
    conformance::run_all(f.store.clone()).await;
}

/// The same with a savepoint per write, one read connection and no group commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_with_savepoints_without_group_commit() {
    let options = PgOptions {
        read_connections: 1,
        max_batch: 1,
        savepoint_per_write: true,
        ..PgOptions::default()
    };
    let Some(f) = common::fresh("run_all_single", options) else {
        return;
    };
    conformance::run_all(f.store.clone()).await;
}

/// The same with a savepoint per write and group commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_with_savepoints() {
    let options = PgOptions {
        savepoint_per_write: true,
        ..PgOptions::default()
    };
    let Some(f) = common::fresh("run_all_sp", options) else {
        return;
    };
    conformance::run_all(f.store.clone()).await;
}
