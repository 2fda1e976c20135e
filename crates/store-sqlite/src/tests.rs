#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::json;
use store::{Put, ResourceType, Store, StoreError, Stored};

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

/// One batch (the writer is held busy while the jobs queue up) mixing successful and failing writes: the
/// first failure makes the writer roll back and replay the jobs before it, later ones use savepoints. Every
/// answer must match what was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_inside_one_batch_keep_every_answer_true() {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;
    use store::{Event, IdempotencyRecord, NewEvent};

    type Answer = store::Result<(Option<Stored>, Option<Event>)>;
    type Pending = Pin<Box<dyn Future<Output = Answer> + Send>>;
    type Closure = Box<dyn FnOnce(&mut dyn store::Tx) -> Answer + Send>;

    let dir = TempDir::new("batch-replay");
    let store =
        std::sync::Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    store.write(|tx| tx.put(patient("y"))).await.unwrap();

    /// Poll once: the job is then in the writer's queue, in call order.
    async fn enqueue(f: &mut Pending) {
        std::future::poll_fn(|cx| {
            assert!(f.as_mut().poll(cx).is_pending(), "the writer is busy");
            Poll::Ready(())
        })
        .await;
    }
    let event = |id: &str| NewEvent {
        subject: "Patient/x".into(),
        kind: "patient.updated".into(),
        rtype: ResourceType::Patient,
        id: id.into(),
        version: 1,
        data: serde_json::Value::Null,
    };
    let s = store.clone();
    let mut blocker: Pending = Box::pin(async move {
        s.write(|_| {
            std::thread::sleep(std::time::Duration::from_millis(150));
            Ok((None, None))
        })
        .await
    });
    enqueue(&mut blocker).await;
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;

    let mut jobs: Vec<(&str, Pending)> = Vec::new();
    let mut add = |name: &'static str, f: Closure| {
        let s = store.clone();
        jobs.push((name, Box::pin(async move { s.write(f).await })));
    };
    add(
        "a",
        Box::new(move |tx| {
            Ok((
                Some(tx.put(patient("x"))?),
                Some(tx.append_event(event("a"))?),
            ))
        }),
    );
    add(
        "b",
        Box::new(move |tx| {
            let p = tx.put(patient("x"))?;
            tx.idempotency_put(IdempotencyRecord {
                key: "k1".into(),
                request_hash: "h".into(),
                status: 200,
                headers: vec![],
                body: "b".into(),
                created_ms: 1,
            })?;
            Ok((Some(p), Some(tx.append_event(event("b"))?)))
        }),
    );
    add(
        "c",
        Box::new(move |tx| Ok((tx.delete(ResourceType::Patient, "y", None)?, None))),
    );
    add(
        "d (fails)",
        Box::new(move |tx| {
            tx.put(patient("z"))?;
            tx.append_event(event("d"))?;
            tx.put(patient("x"))?;
            Err(StoreError::Conflict("d".into()))
        }),
    );
    add(
        "e",
        Box::new(move |tx| {
            Ok((
                Some(tx.put(patient("x"))?),
                Some(tx.append_event(event("e"))?),
            ))
        }),
    );
    add(
        "f (panics)",
        Box::new(move |tx| {
            tx.put(patient("w"))?;
            tx.append_event(event("f"))?;
            panic!("f panics");
        }),
    );
    add(
        "g",
        Box::new(move |tx| {
            Ok((
                Some(tx.put(patient("g"))?),
                Some(tx.append_event(event("g"))?),
            ))
        }),
    );
    for (_, f) in jobs.iter_mut() {
        enqueue(f).await;
    }
    blocker.await.unwrap();
    let mut answers = BTreeMap::new();
    for (name, f) in jobs {
        answers.insert(name, f.await);
    }

    assert!(matches!(answers["d (fails)"], Err(StoreError::Conflict(_))));
    assert!(matches!(answers["f (panics)"], Err(StoreError::Backend(_))));
    let ok = |name: &str| {
        answers[name]
            .as_ref()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .clone()
    };
    let versions: Vec<u64> = ["a", "b", "e"]
        .iter()
        .map(|n| ok(n).0.unwrap().version)
        .collect();
    assert_eq!(
        versions,
        vec![1, 2, 3],
        "x's versions skip the failed write"
    );
    let x = store
        .read(ResourceType::Patient, "x")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Some(x), ok("e").0, "x as answered to e");
    assert_eq!(store.read(ResourceType::Patient, "z").await.unwrap(), None);
    assert_eq!(store.read(ResourceType::Patient, "w").await.unwrap(), None);
    assert_eq!(
        store.read(ResourceType::Patient, "g").await.unwrap(),
        ok("g").0
    );
    let y = store
        .read(ResourceType::Patient, "y")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Some(y), ok("c").0, "y's tombstone as answered to c");
    for v in 1..=3 {
        assert!(
            store
                .vread(ResourceType::Patient, "x", v)
                .await
                .unwrap()
                .is_some()
        );
    }
    assert!(
        store
            .vread(ResourceType::Patient, "x", 4)
            .await
            .unwrap()
            .is_none()
    );

    let stored: Vec<Event> = store.events_after(0, 100).await.unwrap();
    let answered: Vec<Event> = ["a", "b", "e", "g"]
        .iter()
        .map(|n| ok(n).1.unwrap())
        .collect();
    assert_eq!(
        stored, answered,
        "events exactly as answered, failed ones gone"
    );
    assert_eq!(
        stored.iter().map(|e| e.subject_seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4],
        "gap-free subject_seq"
    );
    let k1 = store.write(|tx| tx.idempotency_get("k1")).await.unwrap();
    assert_eq!(
        k1.map(|r| r.body),
        Some("b".to_string()),
        "b's idempotency record survived the replay"
    );
}
