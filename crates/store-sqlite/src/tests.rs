#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};

use serde_json::json;
use store::{Put, ResourceType, Store, StoreError};

use crate::{DB_FILE, SqliteOptions, SqliteStore};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "store-sqlite-{tag}-{}-{nanos}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn user_version(dir: &Path) -> i64 {
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

fn patient(id: &str) -> Put {
    Put {
        rtype: ResourceType::Patient,
        id: id.to_string(),
        resource: json!({"resourceType": "Patient", "active": true}),
        index: Vec::new(),
        expected_version: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_data_and_schema_version() {
    let dir = TempDir::new("reopen");
    {
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        store.write(|tx| tx.put(patient("p1"))).await.unwrap();
    }
    assert_eq!(user_version(dir.path()), SqliteStore::schema_version());
    let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    let p = store
        .read(ResourceType::Patient, "p1")
        .await
        .unwrap()
        .expect("p1 after reopen");
    assert_eq!(p.version, 1);
    let p2 = store.write(|tx| tx.put(patient("p1"))).await.unwrap();
    assert_eq!(p2.version, 2);
    assert!(p2.last_updated_ms >= p.last_updated_ms);
    assert_eq!(user_version(dir.path()), SqliteStore::schema_version());
}

#[test]
fn newer_schema_is_refused_and_left_alone() {
    let dir = TempDir::new("newer");
    drop(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let newer = SqliteStore::schema_version() + 1;
    {
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", newer).unwrap();
    }
    match SqliteStore::open(dir.path(), SqliteOptions::default()) {
        Err(StoreError::Unavailable(msg)) => {
            assert!(msg.contains("newer than this binary"), "{msg}")
        }
        Err(e) => panic!("expected Unavailable, got {e:?}"),
        Ok(_) => panic!("a newer schema must be refused"),
    }
    assert_eq!(
        user_version(dir.path()),
        newer,
        "the refused database must not be touched"
    );
}

#[test]
fn partial_migration_state_is_completed() {
    // A database at version 0 (e.g. created by hand) is migrated; an empty directory is created.
    let dir = TempDir::new("fresh");
    let nested = dir.path().join("a/b");
    drop(SqliteStore::open(&nested, SqliteOptions::default()).unwrap());
    assert_eq!(user_version(&nested), SqliteStore::schema_version());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_after_panic() {
    let dir = TempDir::new("panic");
    let store =
        std::sync::Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let r: Result<(), _> = store
        .write(|tx| {
            tx.put(patient("ghost"))?;
            panic!("boom");
        })
        .await;
    assert!(
        matches!(r, Err(StoreError::Backend(ref m)) if m.contains("boom")),
        "{r:?}"
    );
    assert!(
        store
            .read(ResourceType::Patient, "ghost")
            .await
            .unwrap()
            .is_none()
    );
    store.write(|tx| tx.put(patient("alive"))).await.unwrap();
    assert!(
        store
            .read(ResourceType::Patient, "alive")
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_closure_in_a_batch_only_loses_itself() {
    let dir = TempDir::new("panic-batch");
    let store =
        std::sync::Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let handles: Vec<_> = (0..30)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(move |tx| {
                        let s = tx.put(patient(&format!("pb-{i}")))?;
                        if i % 10 == 3 {
                            panic!("closure {i} panics");
                        }
                        Ok(s)
                    })
                    .await
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.await.unwrap();
        let stored = store
            .read(ResourceType::Patient, &format!("pb-{i}"))
            .await
            .unwrap();
        if i % 10 == 3 {
            assert!(matches!(r, Err(StoreError::Backend(_))), "{r:?}");
            assert!(stored.is_none(), "panicked write {i} left data");
        } else {
            assert_eq!(stored, Some(r.unwrap()), "write {i}");
        }
    }
}
