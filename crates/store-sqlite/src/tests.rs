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
        body: None,
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

/// The plan of `sql`, one detail line per step.
fn plan(conn: &rusqlite::Connection, sql: &str) -> Vec<String> {
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
    let unbound = vec![rusqlite::types::Null; stmt.parameter_count()];
    stmt.query_map(rusqlite::params_from_iter(unbound), |r| {
        r.get::<_, String>(3)
    })
    .unwrap()
    .collect::<Result<Vec<_>, _>>()
    .unwrap()
}

/// A Patient `name` search reads the `name`, `family` and `given` rows through the string index's primary key
/// (one range per parameter), not by scanning the table.
#[test]
fn a_patient_name_search_uses_the_string_index() {
    use store::{Predicate, SearchQuery};

    let dir = TempDir::new("name-plan");
    let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    let conn = crate::schema::open_reader(store.path()).unwrap();
    for exact in [None, Some("Smith".to_string())] {
        let q = SearchQuery::new(ResourceType::Patient).with(
            "name",
            Predicate::String {
                value: "smith".into(),
                exact: exact.clone(),
            },
        );
        let filter = crate::sql::from_where(&q);
        assert!(filter.sql.contains("param IN (?, ?, ?)"), "{}", filter.sql);
        let steps = plan(&conn, &format!("SELECT r.rid{}", filter.sql));
        assert!(
            steps
                .iter()
                .any(|d| d.contains("idx_string USING PRIMARY KEY (rtype=? AND param=? AND value")),
            "{exact:?}: {}",
            steps.join(" | ")
        );
        assert!(
            !steps.iter().any(|d| d.starts_with("SCAN")),
            "{}",
            steps.join(" | ")
        );
    }
}

/// Finding due work reads a range of the heads' index in order (no sort, no scan of `deliveries`), whatever
/// the table sizes: with fixed planner statistics this holds at any data size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_statements_use_their_indexes() {
    use crate::sql;
    use store::{DeliveryQuery, DeliveryState};

    let dir = TempDir::new("plans");
    let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    let conn = crate::schema::open_reader(store.path()).unwrap();
    let show = |p: &[String]| p.join(" | ");

    let due = plan(&conn, sql::DUE_DELIVERIES);
    assert!(
        due.iter()
            .any(|d| d.contains("INDEX delivery_heads_due (next_attempt_ms<?)"))
            && due
                .iter()
                .any(|d| d.starts_with("SEARCH d USING PRIMARY KEY"))
            && !due.iter().any(|d| d.contains("TEMP B-TREE")),
        "due: {}",
        show(&due)
    );
    let next = plan(&conn, sql::NEXT_DUE);
    assert!(
        next.iter().any(|d| d.contains("delivery_heads_due")),
        "next due: {}",
        show(&next)
    );
    let lowest = plan(&conn, sql::LOWEST_PENDING);
    assert!(
        lowest.iter().any(|d| d
            .contains("USING INDEX deliveries_subject (subscription=? AND subject=? AND state=?)"))
            && !lowest.iter().any(|d| d.contains("TEMP B-TREE")),
        "lowest pending: {}",
        show(&lowest)
    );
    let counts = plan(&conn, sql::DELIVERY_COUNTS);
    assert!(
        counts
            .iter()
            .any(|d| d.contains("COVERING INDEX deliveries_state (subscription=?)"))
            && !counts.iter().any(|d| d.contains("TEMP B-TREE")),
        "counts: {}",
        show(&counts)
    );
    let q = DeliveryQuery {
        subscription: Some("s".into()),
        state: Some(DeliveryState::Dead),
        after_seq: 0,
        limit: 10,
    };
    let by_state = sql::deliveries_sql(&q);
    let listed = plan(&conn, &by_state.sql);
    assert!(
        listed
            .iter()
            .any(|d| d.contains("deliveries_state (subscription=? AND state=? AND seq>?)"))
            && !listed.iter().any(|d| d.contains("TEMP B-TREE")),
        "listing by state: {}",
        show(&listed)
    );
    let q = DeliveryQuery {
        subscription: Some("s".into()),
        limit: 10,
        ..DeliveryQuery::default()
    };
    let by_sub = sql::deliveries_sql(&q);
    let listed = plan(&conn, &by_sub.sql);
    assert!(
        listed
            .iter()
            .any(|d| d.contains("PRIMARY KEY (subscription=? AND seq>?)"))
            && !listed.iter().any(|d| d.contains("TEMP B-TREE")),
        "listing: {}",
        show(&listed)
    );
}

/// A database at schema version 1 (before deliveries) is migrated in place; the events watch starts at its
/// last event; deliveries, heads and named values survive a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_2_and_reopen() {
    use store::{DeliveryCounts, DeliveryUpdate, NewEvent};

    let dir = TempDir::new("migrate2");
    {
        let mut conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute_batch(crate::schema::MIGRATIONS[0]).unwrap();
        tx.execute_batch(
            "INSERT INTO outbox (subject, subject_seq, kind, rtype, id, version, time_ms, data)
             VALUES ('Patient/1', 1, 'patient.registered', 'Patient', '1', 1, 1000, 'null'),
                    ('Patient/1', 2, 'patient.updated', 'Patient', '1', 2, 2000, 'null');
             INSERT INTO subjects (subject, last_seq) VALUES ('Patient/1', 2);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let event = |id: &str| NewEvent {
        subject: "Patient/1".into(),
        kind: "patient.updated".into(),
        rtype: ResourceType::Patient,
        id: id.into(),
        version: 3,
        data: serde_json::Value::Null,
    };
    let (e3, t) = {
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        assert_eq!(user_version(dir.path()), SqliteStore::schema_version());
        assert_eq!(
            *store.watch_events().borrow(),
            2,
            "the watch starts at MAX(seq)"
        );
        let old = store.events_after(0, 10).await.unwrap();
        let e = event("1");
        store
            .write(move |tx| {
                let e3 = tx.append_event(e)?;
                for ev in old.iter().chain([&e3]) {
                    assert!(tx.enqueue_delivery("sub", ev)?);
                }
                tx.update_delivery(
                    "sub",
                    1,
                    DeliveryUpdate::Retry {
                        attempts: 1,
                        next_attempt_ms: 5_000,
                        status: None,
                        error: "refused".into(),
                    },
                )?;
                tx.kv_put("cursor", "sub", Some("3"))?;
                Ok((e3, tx.now_ms()))
            })
            .await
            .unwrap()
    };
    assert_eq!(e3.seq, 3);
    let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    assert_eq!(*store.watch_events().borrow(), 3);
    assert_eq!(
        store.kv_get("cursor", "sub").await.unwrap().as_deref(),
        Some("3")
    );
    assert_eq!(store.next_due_ms().await.unwrap(), Some(5_000));
    let due: Vec<i64> = store
        .due_deliveries(t, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.seq)
        .collect();
    assert_eq!(due, vec![1], "the head survived the reopen");
    assert_eq!(
        store.delivery_counts("sub").await.unwrap(),
        DeliveryCounts {
            pending: 3,
            delivered: 0,
            dead: 0
        }
    );
}

/// The delivery heads always equal what `deliveries` implies, after a random mix of writes (some failing,
/// committed in batches, so replays happen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_heads_match_the_deliveries() {
    use store::{DeliveryUpdate, NewEvent};

    let dir = TempDir::new("heads");
    let store =
        std::sync::Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    // A small deterministic pseudo-random sequence (xorshift).
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut events = Vec::new();
    for round in 0..20 {
        let mut handles = Vec::new();
        for j in 0..16 {
            let subject = format!("Slot/{}", next(4));
            let sub = format!("sub-{}", next(3));
            let op = next(7);
            let target = if events.is_empty() {
                0
            } else {
                events[usize::try_from(next(events.len() as u64)).unwrap()]
            };
            let fail = next(5) == 0;
            let retry_at = i64::try_from(next(3)).unwrap() * 1_000;
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                store
                    .write(move |tx| {
                        let e = tx.append_event(NewEvent {
                            subject,
                            kind: "slot.updated".into(),
                            rtype: ResourceType::Slot,
                            id: format!("{round}-{j}"),
                            version: 1,
                            data: serde_json::Value::Null,
                        })?;
                        for s in ["sub-0", "sub-1", "sub-2"] {
                            tx.enqueue_delivery(s, &e)?;
                        }
                        let update = match op {
                            0 => Some(DeliveryUpdate::Delivered {
                                attempts: 1,
                                status: 200,
                            }),
                            1 => Some(DeliveryUpdate::Dead {
                                attempts: 1,
                                status: None,
                                error: "x".into(),
                            }),
                            2 => Some(DeliveryUpdate::Retry {
                                attempts: 1,
                                next_attempt_ms: retry_at,
                                status: None,
                                error: "x".into(),
                            }),
                            3 => Some(DeliveryUpdate::Requeue),
                            4 => {
                                tx.requeue_dead(&sub)?;
                                None
                            }
                            _ => None,
                        };
                        if let Some(update) = update
                            && target > 0
                        {
                            tx.update_delivery(&sub, target, update)?;
                        }
                        if fail {
                            return Err(StoreError::Conflict("no".into()));
                        }
                        Ok(e.seq)
                    })
                    .await
            }));
        }
        for h in handles {
            if let Ok(seq) = h.await.unwrap() {
                events.push(seq);
            }
        }
    }
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let query = |sql: &str| -> Vec<(String, String, i64, i64)> {
        conn.prepare(sql)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    };
    let heads = query(
        "SELECT subscription, subject, seq, next_attempt_ms FROM delivery_heads ORDER BY 1, 2",
    );
    let expected = query(
        "SELECT d.subscription, d.subject, d.seq, d.next_attempt_ms FROM deliveries d
         WHERE d.state = 0 AND d.seq = (SELECT MIN(seq) FROM deliveries x
             WHERE x.subscription = d.subscription AND x.subject = d.subject AND x.state = 0)
         ORDER BY 1, 2",
    );
    assert!(!expected.is_empty());
    assert_eq!(
        heads, expected,
        "one head per pending subject, at its lowest pending seq"
    );
    let delivered: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM deliveries WHERE state <> 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(delivered > 0, "the mix exercised transitions");
}

/// The audit trail's namespaces live in the log file: appending to them leaves the main file alone, and a
/// value written to the main file by an earlier version is still read back (and deleted) through them.
#[tokio::test]
async fn log_namespaces_live_in_their_own_file() {
    let dir = TempDir::new("log-file");
    {
        // A value from before the log file existed, in the main file's kv table.
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        drop(store);
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute(
            "INSERT INTO kv (namespace, key, value) VALUES ('audit', 'old', 'from before')",
            [],
        )
        .unwrap();
    }
    let store =
        std::sync::Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    store
        .write(|tx| {
            tx.kv_put("audit", "0000000000000001", Some("line\n"))?;
            tx.kv_put("other", "k", Some("v"))
        })
        .await
        .unwrap();
    assert_eq!(
        store
            .kv_get("audit", "0000000000000001")
            .await
            .unwrap()
            .as_deref(),
        Some("line\n")
    );
    assert_eq!(
        store.kv_get("audit", "old").await.unwrap().as_deref(),
        Some("from before")
    );
    assert_eq!(
        store.kv_get("other", "k").await.unwrap().as_deref(),
        Some("v")
    );
    let count = |file: &str, ns: &str| -> i64 {
        let conn = rusqlite::Connection::open(dir.path().join(file)).unwrap();
        conn.query_row("SELECT COUNT(*) FROM kv WHERE namespace = ?1", [ns], |r| {
            r.get(0)
        })
        .unwrap()
    };
    assert_eq!(
        count(crate::LOG_FILE, "audit"),
        1,
        "new audit pages go to the log file"
    );
    assert_eq!(
        count(DB_FILE, "audit"),
        1,
        "only the old value is in the main file"
    );
    assert_eq!(count(crate::LOG_FILE, "other"), 0);
    store
        .write(|tx| tx.kv_put("audit", "old", None))
        .await
        .unwrap();
    assert_eq!(store.kv_get("audit", "old").await.unwrap(), None);
    assert_eq!(count(DB_FILE, "audit"), 0);
}

/// A store in a fresh directory whose sync the test holds: each sync reports whether the log file was to be
/// synced too, then waits for the test's answer.
fn held_store(
    tag: &str,
) -> (
    TempDir,
    std::sync::Arc<SqliteStore>,
    std::sync::mpsc::Receiver<bool>,
    std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    let (called_tx, called) = std::sync::mpsc::channel();
    let (answer, answer_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    let sync: crate::writer::SyncFn = Box::new(move |log| {
        called_tx.send(log).unwrap();
        answer_rx.recv().unwrap()
    });
    let dir = TempDir::new(tag);
    let store = std::sync::Arc::new(
        SqliteStore::open_with(dir.path(), SqliteOptions::default(), Some(sync)).unwrap(),
    );
    (dir, store, called, answer)
}

fn new_event(id: &str) -> store::NewEvent {
    store::NewEvent {
        subject: format!("Patient/{id}"),
        kind: "patient.registered".into(),
        rtype: ResourceType::Patient,
        id: id.into(),
        version: 1,
        data: serde_json::Value::Null,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_answered_and_its_events_shown_only_after_the_sync() {
    let (_dir, store, called, answer) = held_store("held-sync");
    let writing = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(|tx| {
                    let stored = tx.put(patient("p1"))?;
                    tx.append_event(new_event("p1"))?;
                    Ok(stored)
                })
                .await
        })
    };
    // The writer committed and asked for the sync, which the test holds.
    let log = tokio::task::spawn_blocking(move || {
        let log = called.recv().unwrap();
        (log, called)
    });
    let (log, called) = log.await.unwrap();
    assert!(!log, "no log namespace was written");
    // Committed, so a reader sees the resource, but the write is not answered and the event not shown.
    assert!(
        store
            .read(ResourceType::Patient, "p1")
            .await
            .unwrap()
            .is_some()
    );
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!writing.is_finished(), "answered before the sync");
    assert!(store.events_after(0, 10).await.unwrap().is_empty());
    assert_eq!(*store.watch_events().borrow(), 0);

    answer.send(Ok(())).unwrap();
    let stored = writing.await.unwrap().unwrap();
    assert_eq!(stored.version, 1);
    assert_eq!(store.events_after(0, 10).await.unwrap().len(), 1);
    assert_eq!(*store.watch_events().borrow(), 1);

    // A batch that writes a log namespace asks for the log file's sync too.
    let writing = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(|tx| tx.kv_put("audit", "0000000000000001", Some("line\n")))
                .await
        })
    };
    let log = tokio::task::spawn_blocking(move || called.recv().unwrap());
    assert!(log.await.unwrap(), "the log file is synced too");
    answer.send(Ok(())).unwrap();
    writing.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_fails_the_write_and_the_store_takes_no_more() {
    let (_dir, store, called, answer) = held_store("failed-sync");
    answer
        .send(Err(std::io::Error::other("disk went away")))
        .unwrap();
    let err = store
        .write(|tx| {
            tx.append_event(new_event("p1"))?;
            tx.put(patient("p1"))
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("disk went away")),
        "{err:?}"
    );
    assert!(called.try_recv().is_ok());
    assert!(store.events_after(0, 10).await.unwrap().is_empty());
    let err = store.write(|tx| tx.put(patient("p2"))).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("restart")),
        "{err:?}"
    );
    assert!(called.try_recv().is_err(), "no second batch was committed");
    assert!(
        store
            .read(ResourceType::Patient, "p2")
            .await
            .unwrap()
            .is_none()
    );
}

/// A database at schema version 3 (each string value indexed twice: normalised under `param`, as sent under
/// `param:exact`; a Patient's family and given names under `name` too) is migrated to one row per value
/// holding both forms, without the `name` rows that repeat `family` or `given`; searches of either kind
/// still find the resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_4_merges_exact_string_rows() {
    use store::{Predicate, SearchQuery};

    let dir = TempDir::new("migrate4");
    {
        let mut conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        let tx = conn.transaction().unwrap();
        for sql in &crate::schema::MIGRATIONS[..3] {
            tx.execute_batch(sql).unwrap();
        }
        tx.execute_batch(
            r#"INSERT INTO resources (rid, rtype, id, version, last_updated_ms, deleted)
                 VALUES (7, 'Patient', 'p1', 1, 1000, 0);
             INSERT INTO versions (rid, rtype, version, last_updated_ms, deleted, json)
                 VALUES (7, 'Patient', 1, 1000, 0, '{"resourceType":"Patient","id":"p1","name":[{"family":"O''Brien","given":["Zoë"]}]}');
             INSERT INTO idx_string (rtype, param, value, rid) VALUES
                 ('Patient', 'name', 'o''brien', 7), ('Patient', 'name:exact', 'O''Brien', 7),
                 ('Patient', 'name', 'zoe', 7), ('Patient', 'name:exact', 'Zoë', 7),
                 ('Patient', 'name', 'dr', 7), ('Patient', 'name:exact', 'Dr', 7),
                 ('Patient', 'family', 'o''brien', 7), ('Patient', 'family:exact', 'O''Brien', 7),
                 ('Patient', 'given', 'zoe', 7), ('Patient', 'given:exact', 'Zoë', 7);
             INSERT INTO idx_reference (rtype, param, target, rid) VALUES
                 ('Appointment', 'patient', 'Patient/p1', 8), ('Appointment', 'actor', 'Patient/p1', 8);
             PRAGMA user_version = 3;"#,
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    assert_eq!(user_version(dir.path()), SqliteStore::schema_version());
    let rows: Vec<(String, String, String)> = {
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        let mut s = conn
            .prepare(
                "SELECT param, value, exact FROM idx_string WHERE rid = 7 ORDER BY param, value",
            )
            .unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    let references: Vec<String> = {
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        let mut s = conn
            .prepare("SELECT param FROM idx_reference WHERE rid = 8")
            .unwrap();
        s.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    assert_eq!(
        references,
        ["actor"],
        "Appointment patient is answered from actor"
    );
    let row = |p: &str, v: &str, x: &str| (p.to_string(), v.to_string(), x.to_string());
    assert_eq!(
        rows,
        vec![
            row("family", "o'brien", "O'Brien"),
            row("given", "zoe", "Zoë"),
            row("name", "dr", "Dr"),
        ]
    );
    let found = |param: &str, value: &str, exact: Option<&str>| {
        let q = SearchQuery::new(ResourceType::Patient).with(
            param,
            Predicate::String {
                value: value.into(),
                exact: exact.map(str::to_string),
            },
        );
        let store = &store;
        async move { store.search(&q).await.unwrap().resources.len() }
    };
    assert_eq!(found("family", "o'b", None).await, 1);
    assert_eq!(found("given", "zoe", Some("Zoë")).await, 1);
    assert_eq!(found("given", "zoe", Some("Zoe")).await, 0);
    assert_eq!(found("name", "o'brien", Some("O'Brien")).await, 1);
    assert_eq!(found("name", "zo", None).await, 1);
    assert_eq!(found("name", "dr", Some("Dr")).await, 1);
}

/// A database at schema version 4 (before writes listed irregular date parameters) is migrated with its
/// irregular rows listed: a Slot with two starts under `store:multi-valued`, one wider than an instant under
/// `store:wide`, nothing for regular rows; a range search then finds the Slot through its two starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_5_lists_irregular_dates() {
    use store::{Cmp, Predicate, SearchQuery};

    let dir = TempDir::new("migrate5");
    {
        let mut conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        let tx = conn.transaction().unwrap();
        for sql in &crate::schema::MIGRATIONS[..4] {
            tx.execute_batch(sql).unwrap();
        }
        tx.execute_batch(
            r#"INSERT INTO resources (rid, rtype, id, version, last_updated_ms, deleted) VALUES
                 (1, 'Slot', 'one', 1, 1000, 0), (2, 'Slot', 'two', 1, 1000, 0),
                 (3, 'Appointment', 'wide', 1, 1000, 0);
             INSERT INTO versions (rid, rtype, version, last_updated_ms, deleted, json) VALUES
                 (1, 'Slot', 1, 1000, 0, '{"resourceType":"Slot","id":"one"}'),
                 (2, 'Slot', 1, 1000, 0, '{"resourceType":"Slot","id":"two"}'),
                 (3, 'Appointment', 1, 1000, 0, '{"resourceType":"Appointment","id":"wide"}');
             INSERT INTO idx_date (rtype, param, low_ms, high_ms, rid) VALUES
                 ('Slot', 'start', 50000, 50999, 1),
                 ('Slot', 'start', 10000, 10000, 2), ('Slot', 'start', 90000, 90000, 2),
                 ('Appointment', 'date', 0, 86399999, 3);
             PRAGMA user_version = 4;"#,
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    assert_eq!(user_version(dir.path()), SqliteStore::schema_version());
    let listed: Vec<(String, String)> = {
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        let mut s = conn
            .prepare("SELECT namespace, key FROM kv WHERE namespace LIKE 'store:%' ORDER BY 1, 2")
            .unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    let pair = |n: &str, k: &str| (n.to_string(), k.to_string());
    assert_eq!(
        listed,
        vec![
            pair("store:multi-valued", "Slot start"),
            pair("store:wide", "Appointment date"),
        ]
    );
    let day = |cmp: Cmp, ms: i64| Predicate::Date {
        cmp,
        low_ms: ms,
        high_ms: ms,
    };
    let q = SearchQuery::new(ResourceType::Slot)
        .with("start", day(Cmp::Ge, 80000))
        .with("start", day(Cmp::Lt, 20000));
    let found: Vec<String> = store
        .search(&q)
        .await
        .unwrap()
        .resources
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(found, vec!["two".to_string()]);
}

/// The lookup fast path of `search` answers exactly as the single statement does: same matches, same order,
/// same page and total, deleted and other-type resources left out, a resource matched by two alternatives
/// listed once, and past `LOOKUP_LIMIT` index rows the statement answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_searches_answer_as_the_statement_does() {
    use store::{Clause, IndexEntry, IndexValue, Predicate, SearchQuery, Sort, SortField};

    let dir = TempDir::new("lookup");
    let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    let token = |code: &str| IndexEntry {
        param: "identifier",
        value: IndexValue::Token {
            system: Some("urn:s".into()),
            code: code.into(),
        },
    };
    // 400 Patients share the code "many" (past the limit); ids are written out of order, and each also holds a
    // code of its own; some hold a second shared code; one Organization holds "many" too.
    store
        .write(move |tx| {
            for n in 0..400u32 {
                let id = format!("p{}", (n * 7919) % 400);
                let mut index = vec![token("many"), token(&format!("own{n}"))];
                if n % 3 == 0 {
                    index.push(token("third"));
                }
                tx.put(Put {
                    index,
                    ..patient(&id)
                })?;
            }
            tx.put(Put {
                rtype: ResourceType::Organization,
                id: "o1".into(),
                resource: json!({"resourceType": "Organization"}),
                index: vec![token("many"), token("own1")],
                expected_version: None,
                body: None,
            })?;
            for id in ["p5", "p6"] {
                tx.delete(ResourceType::Patient, id, None)?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let conn = crate::schema::open_reader(store.path()).unwrap();
    let one = |codes: &[&str]| Clause {
        param: "identifier".into(),
        any_of: codes
            .iter()
            .map(|c| Predicate::Token {
                system: Some("urn:s".into()),
                code: Some((*c).into()),
            })
            .collect(),
    };
    let mut queries = Vec::new();
    for codes in [
        &["own1"][..],
        &["own5"],
        &["own1", "own2", "own1"],
        &["third"],
        &["third", "own3", "own4"],
        &["many"],
        &["nothing"],
    ] {
        for (count, offset) in [(100, 0), (2, 1), (0, 0), (50, 120)] {
            for want_total in [false, true] {
                let mut q = SearchQuery::new(ResourceType::Patient);
                q.clauses.push(one(codes));
                q.count = count;
                q.offset = offset;
                q.want_total = want_total;
                queries.push(q);
            }
        }
    }
    let mut sorted = SearchQuery::new(ResourceType::Patient);
    sorted.clauses.push(one(&["third"]));
    sorted.sort = vec![Sort {
        field: SortField::Id,
        descending: false,
    }];
    queries.push(sorted);
    let ids = |r: &store::SearchResult| {
        r.resources
            .iter()
            .map(|s| (s.id.clone(), s.version, s.json.clone()))
            .collect::<Vec<_>>()
    };
    let mut fast = 0;
    for q in &queries {
        for with_total in [false, true] {
            let a = crate::sql::search(&conn, q, with_total).unwrap();
            let b = crate::sql::search_statement(&conn, q, with_total).unwrap();
            assert_eq!(ids(&a), ids(&b), "{:?}", q.clauses[0].any_of);
            assert_eq!(a.total, b.total, "{:?}", q.clauses[0].any_of);
            if crate::sql::search_by_lookup(&conn, q, with_total)
                .unwrap()
                .is_some()
            {
                fast += 1;
            }
        }
    }
    // Every query but those on "many" (past the limit) took the fast path.
    assert_eq!(fast, queries.len() * 2 - 16);
    let third = crate::sql::search(&conn, &queries[24], false).unwrap();
    assert_eq!(third.resources.len(), 100);
    assert!(third.resources.windows(2).all(|w| w[0].id < w[1].id));
}

/// Slots of two schedules and a deleted one, and a Practitioner indexed with two `start` values (a parameter
/// not known to be single-valued there): every search of several clauses answers the same whichever clause
/// drives it, and the narrowest is the one chosen.
#[tokio::test]
async fn searches_of_several_clauses_answer_the_same_whichever_clause_drives() {
    use crate::sql::Driver;
    use store::{Clause, Cmp, IndexEntry, IndexValue, Predicate, SearchQuery, Sort, SortField};

    const HOUR: i64 = 3_600_000;
    let dir = TempDir::new("driver");
    let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    let slot = |n: i64, schedule: &str, status: &str, starts: &[i64]| {
        let rtype = if n == 9000 {
            ResourceType::Practitioner
        } else {
            ResourceType::Slot
        };
        let mut index = vec![
            IndexEntry {
                param: "schedule",
                value: IndexValue::Reference(format!("Schedule/{schedule}")),
            },
            IndexEntry {
                param: "status",
                value: IndexValue::Token {
                    system: None,
                    code: status.into(),
                },
            },
        ];
        for s in starts {
            index.push(IndexEntry {
                param: "start",
                value: IndexValue::Date {
                    low_ms: *s,
                    high_ms: *s + 999,
                },
            });
        }
        Put {
            rtype,
            id: format!("s{n:04}"),
            resource: json!({"resourceType": rtype.as_str()}),
            index,
            expected_version: None,
            body: None,
        }
    };
    store
        .write(move |tx| {
            for n in 0..600i64 {
                let schedule = if n % 5 == 0 { "b" } else { "a" };
                let status = if n % 7 == 0 { "busy" } else { "free" };
                tx.put(slot(n, schedule, status, &[n * HOUR]))?;
            }
            // Starts in hour 10 and in hour 500: matches `ge 400h` and `lt 20h` through different values.
            tx.put(slot(9000, "a", "free", &[10 * HOUR, 500 * HOUR]))?;
            tx.put(slot(9001, "a", "free", &[12 * HOUR]))?;
            tx.delete(ResourceType::Slot, "s9001", None)?;
            Ok(())
        })
        .await
        .unwrap();
    let conn = crate::schema::open_reader(store.path()).unwrap();
    let reference = |s: &str| Clause {
        param: "schedule".into(),
        any_of: vec![Predicate::Reference(format!("Schedule/{s}"))],
    };
    let status = |codes: &[&str]| Clause {
        param: "status".into(),
        any_of: codes
            .iter()
            .map(|c| Predicate::Token {
                system: None,
                code: Some((*c).into()),
            })
            .collect(),
    };
    let start = |cmp: Cmp, hour: i64| Clause {
        param: "start".into(),
        any_of: vec![Predicate::Date {
            cmp,
            low_ms: hour * HOUR,
            high_ms: hour * HOUR + HOUR - 1,
        }],
    };
    let with = |clauses: Vec<Clause>| {
        let mut q = SearchQuery::new(ResourceType::Slot);
        q.clauses = clauses;
        q
    };
    let mut two_starts_query = with(vec![
        reference("a"),
        start(Cmp::Ge, 400),
        start(Cmp::Lt, 20),
    ]);
    two_starts_query.rtype = ResourceType::Practitioner;
    let mut queries = vec![
        with(vec![
            reference("a"),
            status(&["free"]),
            start(Cmp::Ge, 100),
            start(Cmp::Lt, 130),
        ]),
        two_starts_query,
        with(vec![reference("b"), status(&["busy"])]),
        with(vec![reference("c"), status(&["free"])]),
        with(vec![
            status(&["busy", "free"]),
            reference("b"),
            start(Cmp::Lt, 300),
        ]),
        with(vec![
            Clause {
                param: "_id".into(),
                any_of: vec![
                    Predicate::Id("s0003".into()),
                    Predicate::Reference("x".into()),
                ],
            },
            reference("a"),
            status(&["free"]),
        ]),
        with(vec![
            reference("a"),
            start(Cmp::Ge, 590),
            start(Cmp::Eq, 595),
        ]),
    ];
    let mut sorted = with(vec![reference("a"), status(&["free"]), start(Cmp::Ge, 550)]);
    sorted.sort = vec![Sort {
        field: SortField::Param("start".into()),
        descending: true,
    }];
    sorted.count = 7;
    sorted.offset = 3;
    sorted.want_total = true;
    queries.push(sorted);
    let ids =
        |r: &store::SearchResult| r.resources.iter().map(|s| s.id.clone()).collect::<Vec<_>>();
    let mut matched = 0;
    for q in &queries {
        let every = crate::sql::search_driven(&conn, q, true, None).unwrap();
        matched += every.resources.len();
        for driver in 0..q.clauses.len() {
            let driven =
                crate::sql::search_driven(&conn, q, true, Some(Driver::Clause(driver))).unwrap();
            assert_eq!(
                ids(&driven),
                ids(&every),
                "{:?} driven by {driver}",
                q.clauses
            );
            assert_eq!(
                driven.total, every.total,
                "{:?} driven by {driver}",
                q.clauses
            );
        }
        let chosen = crate::sql::search(&conn, q, true).unwrap();
        assert_eq!(ids(&chosen), ids(&every), "{:?}", q.clauses);
    }
    // The comparison compared something: the queries match resources, and the two-start slot matches the
    // second query through its two values.
    assert!(matched > 40, "{matched}");
    let two_starts = crate::sql::search(&conn, &queries[1], false).unwrap();
    assert_eq!(ids(&two_starts), vec!["s9000".to_string()]);
    // Narrowest first: 30 hours of starts (`lt 130h` has 131 rows, `ge 100h` 501, the others 480 and 515).
    // Narrowest first: the two `start` ranges of a Slot are one range over one index row (30 rows), narrower
    // than `lt 130h` alone (130), `ge 100h` (500) and the others (480 and 514).
    let chosen = |q: &SearchQuery| match crate::sql::choose_driver(&conn, q).unwrap() {
        None => "none".to_string(),
        Some(Driver::Clause(i)) => format!("clause {i}"),
        Some(Driver::Rows(f)) => format!("rows {}", f.sql),
    };
    assert!(
        chosen(&queries[0]).starts_with("rows SELECT rid FROM idx_date"),
        "{}",
        chosen(&queries[0])
    );
    // A Practitioner's `start` is not known to be single-valued, so its ranges are not merged (the one
    // Practitioner's schedule row drives).
    assert_eq!(chosen(&queries[1]), "clause 0");
    // No schedule "c": its clause ends at once.
    assert_eq!(chosen(&queries[3]), "clause 0");
    // A clause with an `_id` alternative never drives: schedule "a" (480 rows) ends before "free" (514).
    assert_eq!(chosen(&queries[5]), "clause 1");
    // The clauses that do not drive are lookups by rid, not scans.
    let filter = crate::sql::from_where_driven(&queries[0], Some(Driver::Clause(3)));
    let steps = plan(&conn, &format!("SELECT r.rid{}", filter.sql));
    assert!(
        !steps.iter().any(|d| d.starts_with("SCAN")),
        "{}",
        steps.join(" | ")
    );
    // One clause: nothing to choose.
    let alone = with(vec![reference("a")]);
    assert_eq!(chosen(&alone), "none");
    // Slot starts are instants (each row spans at most a second), so the combined range is read from just
    // before its first instant.
    assert!(
        chosen(&queries[0]).contains("low_ms >= ?"),
        "{}",
        chosen(&queries[0])
    );
    drop(conn);
    // A Slot stored with a start row spanning hours (the store takes index rows as given) ends inside the
    // range though it starts before it: from then on the bound is not used.
    let mut wide = slot(9003, "a", "free", &[]);
    wide.index.push(IndexEntry {
        param: "start",
        value: IndexValue::Date {
            low_ms: 95 * HOUR,
            high_ms: 140 * HOUR,
        },
    });
    store
        .write(move |tx| tx.put(wide).map(|_| ()))
        .await
        .unwrap();
    let conn = crate::schema::open_reader(store.path()).unwrap();
    let driver = match crate::sql::choose_driver(&conn, &queries[0]).unwrap() {
        Some(Driver::Rows(f)) => f.sql,
        _ => String::new(),
    };
    assert!(
        driver.starts_with("SELECT rid FROM idx_date") && !driver.contains("low_ms >= ?"),
        "{driver}"
    );
    let found = ids(&crate::sql::search(&conn, &queries[0], false).unwrap());
    assert!(found.contains(&"s9003".to_string()), "{found:?}");
    assert_eq!(
        found,
        ids(&crate::sql::search_driven(&conn, &queries[0], false, None).unwrap())
    );
    drop(conn);
    // A Slot stored with two `start` values (the store takes index rows as given) matches `ge 100h` through
    // one and `lt 130h` through the other: from then on the two ranges are no longer combined.
    let mut twice = slot(9002, "a", "free", &[90 * HOUR, 700 * HOUR]);
    twice.rtype = ResourceType::Slot;
    twice.resource = json!({"resourceType": "Slot"});
    store
        .write(move |tx| tx.put(twice).map(|_| ()))
        .await
        .unwrap();
    let conn = crate::schema::open_reader(store.path()).unwrap();
    let chosen = |q: &SearchQuery| match crate::sql::choose_driver(&conn, q).unwrap() {
        None => "none".to_string(),
        Some(Driver::Clause(i)) => format!("clause {i}"),
        Some(Driver::Rows(f)) => format!("rows {}", f.sql),
    };
    assert_eq!(chosen(&queries[0]), "clause 3");
    let found = ids(&crate::sql::search(&conn, &queries[0], false).unwrap());
    assert!(found.contains(&"s9002".to_string()), "{found:?}");
    assert_eq!(
        found,
        ids(&crate::sql::search_driven(&conn, &queries[0], false, None).unwrap())
    );
}

/// Slots with repeated starts (ties), Slots without a start and a deleted Slot: a search sorted by `start`
/// answers the same walked in start order as through the general statement, in both directions, for pages
/// that are full (answered in order) and pages that reach the Slots without a start (answered by the statement).
#[tokio::test]
async fn searches_sorted_by_start_answer_the_same_walked_in_order() {
    use store::{Clause, Cmp, IndexEntry, IndexValue, Predicate, SearchQuery, Sort, SortField};

    const HOUR: i64 = 3_600_000;
    let dir = TempDir::new("sorted");
    let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    store
        .write(move |tx| {
            for n in 0..300i64 {
                let mut index = vec![
                    IndexEntry {
                        param: "schedule",
                        value: IndexValue::Reference(
                            if n % 3 == 0 {
                                "Schedule/b"
                            } else {
                                "Schedule/a"
                            }
                            .into(),
                        ),
                    },
                    IndexEntry {
                        param: "status",
                        value: IndexValue::Token {
                            system: None,
                            code: if n % 4 == 0 { "busy" } else { "free" }.into(),
                        },
                    },
                ];
                // Every tenth Slot has no start; the others share starts in pairs (ties broken by id).
                if n % 10 != 0 {
                    let hour = (n * 37 % 150) * HOUR;
                    index.push(IndexEntry {
                        param: "start",
                        value: IndexValue::Date {
                            low_ms: hour,
                            high_ms: hour + 999,
                        },
                    });
                }
                tx.put(Put {
                    rtype: ResourceType::Slot,
                    id: format!("s{:03}", (n * 7) % 300),
                    resource: json!({"resourceType": "Slot"}),
                    index,
                    expected_version: None,
                    body: None,
                })?;
            }
            tx.delete(ResourceType::Slot, "s007", None)?;
            Ok(())
        })
        .await
        .unwrap();
    let conn = crate::schema::open_reader(store.path()).unwrap();
    let ids =
        |r: &store::SearchResult| r.resources.iter().map(|s| s.id.clone()).collect::<Vec<_>>();
    let clause = |param: &str, p: Predicate| Clause {
        param: param.into(),
        any_of: vec![p],
    };
    let filters = [
        vec![],
        vec![
            clause("schedule", Predicate::Reference("Schedule/a".into())),
            clause(
                "status",
                Predicate::Token {
                    system: None,
                    code: Some("free".into()),
                },
            ),
        ],
        vec![clause(
            "start",
            Predicate::Date {
                cmp: Cmp::Ge,
                low_ms: 40 * HOUR,
                high_ms: 41 * HOUR - 1,
            },
        )],
    ];
    let (mut in_order, mut general) = (0, 0);
    for clauses in &filters {
        for descending in [false, true] {
            for (count, offset) in [(10, 0), (7, 13), (50, 100), (40, 250), (1, 0), (500, 0)] {
                let mut q = SearchQuery::new(ResourceType::Slot);
                q.clauses = clauses.clone();
                q.sort = vec![Sort {
                    field: SortField::Param("start".into()),
                    descending,
                }];
                q.count = count;
                q.offset = offset;
                q.want_total = true;
                let reference = crate::sql::search_driven(&conn, &q, true, None).unwrap();
                let answered = crate::sql::search(&conn, &q, true).unwrap();
                assert_eq!(
                    ids(&answered),
                    ids(&reference),
                    "{clauses:?} {descending} {count} {offset}"
                );
                assert_eq!(answered.total, reference.total);
                match crate::sql::search_in_sort_order(&conn, &q, true, "start", descending)
                    .unwrap()
                {
                    Some(walked) => {
                        in_order += 1;
                        assert_eq!(
                            ids(&walked),
                            ids(&reference),
                            "{clauses:?} {descending} {count} {offset}"
                        );
                    }
                    None => general += 1,
                }
            }
        }
    }
    // Both paths were taken: full pages in order, short pages (Slots without a start at the end) by the
    // statement.
    assert!(
        in_order >= 10 && general >= 6,
        "{in_order} in order, {general} general"
    );
}

/// The WAL-buffering VFS (walbuf.rs): a connection opened through it, in WAL mode with `synchronous=NORMAL`
/// as the writer runs.
fn walbuf_conn(path: &Path, cache_pages: i64) -> rusqlite::Connection {
    let vfs = crate::walbuf::name().expect("the VFS registers");
    let flags =
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_CREATE;
    let conn = rusqlite::Connection::open_with_flags_and_vfs(path, flags, vfs).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    conn.pragma_update(None, "cache_size", cache_pages).unwrap();
    conn.execute_batch("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT NOT NULL); CREATE INDEX IF NOT EXISTS t_v ON t(v);")
        .unwrap();
    conn
}

/// A copy of `w.db` and its WAL in `dir` (what `kill -9` leaves when taken with the writer open), in a
/// directory of its own: the copy's path.
fn crash_copy(dir: &TempDir, tag: &str) -> (TempDir, PathBuf) {
    let copy = TempDir::new(tag);
    std::fs::copy(dir.path().join("w.db"), copy.path().join("w.db")).unwrap();
    std::fs::copy(dir.path().join("w.db-wal"), copy.path().join("w.db-wal")).unwrap();
    let path = copy.path().join("w.db");
    (copy, path)
}

/// Insert row `k` with value `v` into the walbuf tests' table.
fn insert_row(c: &rusqlite::Connection, k: i64, v: &str) {
    c.execute(
        "INSERT INTO t (k, v) VALUES (?1, ?2)",
        rusqlite::params![k, v],
    )
    .unwrap();
}

/// Open the database at `path` through SQLite's own VFS and require that it passes `integrity_check`.
fn open_checked(path: &Path, what: &str) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    let check: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok", "{what}");
    c
}

fn count_and_sum(conn: &rusqlite::Connection) -> (i64, i64) {
    conn.query_row(
        "SELECT count(*), coalesce(sum(length(v)), 0) FROM t",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

#[test]
fn walbuf_hands_a_commits_frames_to_the_file_in_one_write_and_readers_see_each_commit() {
    let dir = TempDir::new("walbuf-commit");
    let path = dir.path().join("w.db");
    let writer = walbuf_conn(&path, 2000);
    // A reader through SQLite's own VFS, as the store's read pool and checkpointer are.
    let reader = rusqlite::Connection::open(&path).unwrap();
    let (asked0, made0) = crate::walbuf::write_counts();
    let mut rows = 0;
    for commit in 0..40 {
        let tx = writer.unchecked_transaction().unwrap();
        for i in 0..25 {
            let k = commit * 1000 + i;
            insert_row(&tx, k, &format!("{k:0>300}"));
            rows += 1;
        }
        tx.commit().unwrap();
        // Each commit is readable from the file at once: its frames were written before SQLite published them.
        assert_eq!(count_and_sum(&reader).0, rows, "after commit {commit}");
    }
    let (asked, made) = crate::walbuf::write_counts();
    let (asked, made) = (asked - asked0, made - made0);
    // SQLite asked two writes per frame (header, page) and several frames per commit; one write per commit
    // reached the file.
    assert!(asked >= 40 * 4, "SQLite asked {asked} writes");
    assert_eq!(made, 40, "{asked} writes asked, {made} made");
    // A copy of the files taken now, with the writer still open (what `kill -9` leaves), holds every commit.
    let (_copy, copied) = crash_copy(&dir, "walbuf-copy");
    let recovered = open_checked(&copied, "the copy");
    assert_eq!(count_and_sum(&recovered), count_and_sum(&reader));
}

/// SQLite rewrites, after a large transaction's commit frame, the checksums of the frames it wrote again in
/// place, the commit frame's included. Those rewrites must reach the file before the commit returns: a
/// copy taken then (what `kill -9` leaves) must recover every commit, and readers and a checkpoint through
/// SQLite's own VFS must see them. (The buffer once kept the rewritten commit header until the next write:
/// recovery then stopped at the broken checksum chain, and a booking benchmark's readers reported
/// "database disk image is malformed".)
#[test]
fn walbuf_writes_out_rewritten_checksums_before_the_commit_returns() {
    let dir = TempDir::new("walbuf-rewrite");
    let path = dir.path().join("w.db");
    let writer = walbuf_conn(&path, 10);
    let reader = rusqlite::Connection::open(&path).unwrap();
    let mut expected = (0, 0);
    for round in 0..3i64 {
        let tx = writer.unchecked_transaction().unwrap();
        for k in 0..2000 {
            let k = round * 10_000 + k;
            insert_row(&tx, k, &format!("{k:x>150}"));
        }
        // Pages spilled above are changed again: SQLite rewrites their frames and then the checksums.
        tx.execute(
            "UPDATE t SET v = v || 'y' WHERE k % 5 = 0 AND k >= ?1",
            [round * 10_000],
        )
        .unwrap();
        tx.commit().unwrap();
        // The writer does nothing more (even a read of its own would write its buffer out): what the files
        // hold now is what a crash would leave.
        let (_copy, copied) = crash_copy(&dir, "walbuf-rewrite-copy");
        let from_reader = count_and_sum(&reader);
        expected = count_and_sum(&writer);
        assert_eq!(from_reader, expected, "reader after round {round}");
        let c = open_checked(&copied, &format!("copy after round {round}"));
        assert_eq!(count_and_sum(&c), expected, "copy after round {round}");
    }
    reader
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        .unwrap();
    drop(writer);
    let c = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(count_and_sum(&c), expected);
}

#[test]
fn walbuf_keeps_spilled_rewritten_and_rolled_back_frames_in_order() {
    let dir = TempDir::new("walbuf-spill");
    let path = dir.path().join("w.db");
    // A 10-page cache: large transactions spill frames before their commit, and pages changed again after
    // spilling are rewritten in place in the WAL (SQLite's checksum-rewriting path).
    let writer = walbuf_conn(&path, 10);
    let tx = writer.unchecked_transaction().unwrap();
    for k in 0..3000 {
        insert_row(&tx, k, &format!("{k:x>200}"));
    }
    for round in 0..3 {
        tx.execute(
            "UPDATE t SET v = v || ?1 WHERE k % 7 = ?2",
            rusqlite::params!["y", round],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    let expected = count_and_sum(&writer);
    // A spilled transaction that is rolled back leaves frames nobody may use; the next commit overwrites them.
    let tx = writer.unchecked_transaction().unwrap();
    for k in 10_000..13_000 {
        insert_row(&tx, k, &format!("{k:z>400}"));
    }
    tx.rollback().unwrap();
    writer.execute("DELETE FROM t WHERE k < 100", []).unwrap();
    let (n, sum) = expected;
    let deleted: i64 = (0..100)
        .map(|k: i64| {
            let base = format!("{k:x>200}").len() as i64;
            base + (0..3).filter(|round| k % 7 == *round).count() as i64
        })
        .sum();
    let expected = (n - 100, sum - deleted);
    assert_eq!(count_and_sum(&writer), expected);
    // Read back through SQLite's own VFS, from a copy taken with the writer open, and after a checkpoint.
    let (_copy, copied) = crash_copy(&dir, "walbuf-spill-copy");
    for p in [copied, path.clone()] {
        let c = open_checked(&p, "copy and original");
        assert_eq!(count_and_sum(&c), expected);
    }
    writer
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(writer);
    let c = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(count_and_sum(&c), expected);
}

/// The checkpoint thread copies committed writes into the database file without being asked: within about a
/// second of a write (its longest interval), a copy of the database file alone, without its WAL, holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_thread_copies_a_write_into_the_database_file() {
    let dir = TempDir::new("checkpoint-thread");
    let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    store.write(|tx| tx.put(patient("p1"))).await.unwrap();
    let copy = TempDir::new("checkpoint-copy");
    let mut found = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        std::fs::copy(dir.path().join(DB_FILE), copy.path().join(DB_FILE)).unwrap();
        let conn = rusqlite::Connection::open(copy.path().join(DB_FILE)).unwrap();
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM resources WHERE rtype = 'Patient' AND id = 'p1'",
                [],
                |r| r.get(0),
            )
            .unwrap_or(0);
        if n == 1 {
            found = true;
            break;
        }
    }
    assert!(found, "the write never reached the database file");
}

#[test]
fn the_readers_of_the_outbox_tail_read_without_a_memory_map() {
    // The first read after a commit unmaps a mapped reader's file (and the unmap interrupts the other core
    // to flush its TLB); the dispatcher and the delivery sender read the tail after every commit.
    let dir = TempDir::new("tail-unmapped");
    let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    let mmap = |pool: &crate::pool::ReadPool| {
        pool.with(|c| {
            c.pragma_query_value(None, "mmap_size", |r| r.get::<_, i64>(0))
                .map_err(crate::sql::db)
        })
        .unwrap()
    };
    assert_eq!(mmap(&store.tail), 0);
    assert!(mmap(&store.reads) > 0);
}

#[test]
fn the_checkpoint_thread_runs_at_a_lower_priority() {
    // Linux keeps a nice value per thread (field 19 of /proc/self/task/TID/stat).
    fn nice(task: &Path) -> i32 {
        let stat = std::fs::read_to_string(task.join("stat")).unwrap();
        // The name is in parentheses; the fields after it start at field 3.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(19 - 3).unwrap().parse().unwrap()
    }
    // The process's own (the tests may run under `nice`).
    let base = nice(Path::new("/proc/thread-self"));
    let dir = TempDir::new("ckpt-nice");
    let _store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    let lowered = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .map(|t| t.unwrap().path())
            .find(|t| nice(t) != base)
    };
    // The thread lowers its priority once it runs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let checkpoint = loop {
        match lowered() {
            Some(t) => break t,
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            None if base == 19 => return, // already as low as it goes
            None => panic!("no thread of the store lowered its priority"),
        }
    };
    assert_eq!(
        nice(&checkpoint),
        (base + crate::checkpoint::NICENESS).min(19)
    );
    // Thread names are cut to 15 bytes there.
    let name = std::fs::read_to_string(checkpoint.join("comm")).unwrap();
    assert_eq!(name.trim_end(), &"carebridge-sqlite-checkpoint"[..15]);
}
