//! Behaviour specific to the PostgreSQL store: migrations (idempotent, safe when run concurrently, refused
//! when the schema is newer), the schema check at connect, and several stores on one database standing for
//! several hub processes (writes serialised across them, events and the events watch shared).
//! Skipped (with a printed reason) when `CAREBRIDGE_TEST_DATABASE_URL` is not set.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use store::{
    IndexEntry, IndexValue, NewEvent, Predicate, Put, ResourceType, SearchQuery, Store, StoreError,
};
use store_postgres::{PgOptions, PgStore};

fn patient(id: &str, identifier: &str) -> Put {
    Put {
        rtype: ResourceType::Patient,
        id: id.to_string(),
        resource: json!({"resourceType": "Patient", "active": true}),
        index: vec![IndexEntry {
            param: "identifier",
            value: IndexValue::Token {
                system: Some("urn:test".into()),
                code: identifier.to_string(),
            },
        }],
        expected_version: None,
        body: None,
    }
}

fn event(subject: &str) -> NewEvent {
    NewEvent {
        subject: subject.to_string(),
        kind: "test.event".into(),
        rtype: ResourceType::Patient,
        id: "x".into(),
        version: 1,
        data: Value::Null,
    }
}

fn by_identifier(identifier: &str) -> SearchQuery {
    SearchQuery::new(ResourceType::Patient).with(
        "identifier",
        Predicate::Token {
            system: Some("urn:test".into()),
            code: Some(identifier.to_string()),
        },
    )
}

/// Two stores on one database, as two processes would have.
fn two_stores(
    tag: &str,
    b_options: PgOptions,
) -> Option<(Arc<PgStore>, Arc<PgStore>, common::Fixture)> {
    let f = common::fresh(tag, PgOptions::default())?;
    let b = Arc::new(PgStore::connect(f.db.url(), b_options).unwrap());
    Some((f.store.clone(), b, f))
}

#[test]
fn migrate_is_idempotent_and_safe_concurrently() {
    let Some(db) = common::database("migrate") else {
        return;
    };
    let before = store_postgres::schema_status(db.url()).unwrap();
    assert_eq!(before.current, 0, "an empty database has no schema");
    assert!(!before.is_current());
    let latest = PgStore::schema_version();
    let url = db.url().to_string();
    let reports: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || store_postgres::migrate(&url))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let applied: Vec<usize> = reports.iter().map(|r| r.applied).collect();
    assert_eq!(
        applied.iter().sum::<usize>(),
        usize::try_from(latest).unwrap(),
        "every migration applied exactly once across concurrent runs: {reports:?}"
    );
    assert!(reports.iter().all(|r| r.to == latest));
    assert_eq!(
        reports.iter().filter(|r| r.from == 0).count(),
        1,
        "exactly one run found the empty database: {reports:?}"
    );
    let again = store_postgres::migrate(db.url()).unwrap();
    assert_eq!((again.from, again.to, again.applied), (latest, latest, 0));
    let status = store_postgres::schema_status(db.url()).unwrap();
    assert!(status.is_current(), "{status:?}");
    assert!(status.check().is_ok());
}

#[test]
fn connect_refuses_an_unmigrated_database() {
    let Some(db) = common::database("unmigrated") else {
        return;
    };
    match PgStore::connect(db.url(), PgOptions::default()) {
        Err(StoreError::Unavailable(m)) => {
            assert!(
                m.contains("carebridge migrate"),
                "message names the fix: {m}"
            )
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("an unmigrated database was opened"),
    }
    // Nothing was created by the refused connect.
    assert_eq!(store_postgres::schema_status(db.url()).unwrap().current, 0);
}

#[test]
fn connect_and_migrate_refuse_a_newer_schema() {
    let Some(db) = common::database("newer") else {
        return;
    };
    store_postgres::migrate(db.url()).unwrap();
    let newer = PgStore::schema_version() + 1;
    common::exec(
        db.url(),
        &format!("INSERT INTO schema_migrations (version, applied_ms) VALUES ({newer}, 0)"),
    );
    match PgStore::connect(db.url(), PgOptions::default()) {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("newer"), "{m}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a database with a newer schema was opened"),
    }
    match store_postgres::migrate(db.url()) {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("newer"), "{m}"),
        other => panic!("migrate on a newer schema: {other:?}"),
    }
    assert_eq!(
        store_postgres::schema_status(db.url()).unwrap().current,
        newer
    );
}

#[test]
fn connect_reports_a_bad_connection_string_or_server() {
    match PgStore::connect("postgres://u@h:notaport/db", PgOptions::default()) {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("bad URL: {:?}", other.err()),
    }
    // Nothing listens on port 1.
    match PgStore::connect(
        "host=127.0.0.1 port=1 user=x dbname=y connect_timeout=5",
        PgOptions::default(),
    ) {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("connect"), "{m}"),
        other => panic!("no server: {:?}", other.err()),
    }
}

/// 64 conditional creates spread over two stores (processes): exactly one creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_creates_across_processes_have_one_winner() {
    let Some((a, b, _f)) = two_stores("cond2", PgOptions::default()) else {
        return;
    };
    let ident = "shared-identifier";
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                store
                    .write(move |tx| {
                        if tx.search(&by_identifier(ident))?.is_empty() {
                            tx.put(patient(&format!("p{i}"), ident))?;
                            Ok(true)
                        } else {
                            Ok(false)
                        }
                    })
                    .await
            })
        })
        .collect();
    let mut created = 0;
    for h in handles {
        if h.await.unwrap().unwrap() {
            created += 1;
        }
    }
    assert_eq!(created, 1, "exactly one conditional create wins");
    for store in [&a, &b] {
        assert_eq!(
            store
                .search(&by_identifier(ident))
                .await
                .unwrap()
                .resources
                .len(),
            1
        );
    }
}

/// 64 updates all expecting version 1, spread over two stores: exactly one succeeds, the others conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn version_conflicts_across_processes_have_one_winner() {
    let Some((a, b, _f)) = two_stores("vc2", PgOptions::default()) else {
        return;
    };
    a.write(|tx| tx.put(patient("shared", "s"))).await.unwrap();
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                store
                    .write(move |tx| {
                        let mut p = patient("shared", &format!("s{i}"));
                        p.expected_version = Some(1);
                        tx.put(p)
                    })
                    .await
            })
        })
        .collect();
    let (mut ok, mut conflicts) = (0, 0);
    for h in handles {
        match h.await.unwrap() {
            Ok(s) => {
                assert_eq!(s.version, 2);
                ok += 1;
            }
            Err(StoreError::VersionConflict {
                expected: 1,
                actual: 2,
                ..
            }) => conflicts += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((ok, conflicts), (1, 63));
    let current = b
        .read(ResourceType::Patient, "shared")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(current.version, 2);
}

/// Holds the write lock of the database at `url` from a connection of its own until
/// [`LockHolder::release`]; [`LockHolder::wait_for_waiters`] waits until `n` sessions wait for it.
struct LockHolder {
    client: tokio_postgres::Client,
}

impl LockHolder {
    async fn take(url: &str) -> LockHolder {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock({})",
                store_postgres::testing::WRITE_LOCK
            ))
            .await
            .unwrap();
        LockHolder { client }
    }

    async fn wait_for_waiters(&self, n: i64) {
        for _ in 0..1000 {
            let waiting: i64 = self
                .client
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} writers never waited for the write lock");
    }

    async fn release(self) {
        self.client.batch_execute("COMMIT").await.unwrap();
    }
}

/// `first` through `b`, then `second` through `a`, each told to read Patient/shared ahead, lined up on the
/// write lock: the test holds it until both wait for it, `b` first. Their results, in that order.
async fn lined_up<T1, T2, F1, F2>(
    a: &Arc<PgStore>,
    b: &Arc<PgStore>,
    url: &str,
    first: F1,
    second: F2,
) -> (store::Result<T1>, store::Result<T2>)
where
    F1: FnOnce(&mut dyn store::Tx) -> store::Result<T1> + Send + 'static,
    F2: FnOnce(&mut dyn store::Tx) -> store::Result<T2> + Send + 'static,
    T1: Send + 'static,
    T2: Send + 'static,
{
    let holder = LockHolder::take(url).await;
    let b_write = {
        let b = b.clone();
        tokio::spawn(async move { b.write_reading(ahead_of("shared"), first).await })
    };
    holder.wait_for_waiters(1).await;
    let a_write = {
        let a = a.clone();
        tokio::spawn(async move { a.write_reading(ahead_of("shared"), second).await })
    };
    holder.wait_for_waiters(2).await;
    holder.release().await;
    (b_write.await.unwrap(), a_write.await.unwrap())
}

fn ahead_of(id: &str) -> store::ReadAhead {
    store::ReadAhead {
        keys: vec![(ResourceType::Patient, id.to_string())],
        follow: None,
        searches: Vec::new(),
    }
}

/// Two processes' writes of one resource lined up on the write lock, each told to read it ahead: the second
/// builds on the version the first committed while it waited, not on the one that was current when it
/// asked (reading ahead before taking the lock without checking again would write version 2 twice, and
/// its COMMIT would fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_waiting_for_the_lock_builds_on_the_version_committed_meanwhile() {
    let Some((a, b, f)) = two_stores("ahead-ver", PgOptions::default()) else {
        return;
    };
    a.write(|tx| tx.put(patient("shared", "s0"))).await.unwrap();
    // b waits for the lock first, a behind it; both asked to read the patient (version 1 now).
    let (first, second) = lined_up(
        &a,
        &b,
        f.db.url(),
        |tx| tx.put(patient("shared", "s-b")),
        |tx| {
            let read = tx.read(ResourceType::Patient, "shared")?.map(|s| s.version);
            let stored = tx.put(patient("shared", "s-a"))?;
            Ok((read, stored.version))
        },
    )
    .await;
    assert_eq!(first.unwrap().version, 2);
    assert_eq!(second.unwrap(), (Some(2), 3));
    let history = a
        .history(&store::HistoryQuery {
            rtype: ResourceType::Patient,
            id: Some("shared".into()),
            since_ms: None,
            count: 10,
            offset: 0,
        })
        .await
        .unwrap();
    let versions: Vec<u64> = history.resources.iter().map(|s| s.version).collect();
    assert_eq!(versions.len(), 3, "{versions:?}");
}

/// The same for a subject: the events the first process appended while the second waited are counted, so
/// the second's event gets the next subject seq (not a second seq 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_waiting_for_the_lock_counts_the_events_appended_meanwhile() {
    let Some((a, b, f)) = two_stores("ahead-subj", PgOptions::default()) else {
        return;
    };
    a.write(|tx| {
        tx.put(patient("shared", "s0"))?;
        tx.append_event(event("Patient/shared"))
    })
    .await
    .unwrap();
    let (first, second) = lined_up(
        &a,
        &b,
        f.db.url(),
        |tx| tx.append_event(event("Patient/shared")),
        |tx| {
            tx.put(patient("shared", "s-a"))?;
            tx.append_event(event("Patient/shared"))
        },
    )
    .await;
    assert_eq!(first.unwrap().subject_seq, 2);
    let a_event = second.unwrap();
    assert_eq!(a_event.subject_seq, 3);
    assert_eq!(a_event.seq, 3);
}

/// Events appended through both stores: one outbox, seqs 1..=n without gaps or duplicates, per-subject
/// sequence gap-free, and each store reads the other's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_are_shared_and_gap_free_across_processes() {
    let Some((a, b, _f)) = two_stores("ev2", PgOptions::default()) else {
        return;
    };
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                store
                    .write(|tx| tx.append_event(event("Patient/shared")))
                    .await
            })
        })
        .collect();
    let mut answered = BTreeSet::new();
    for h in handles {
        answered.insert(h.await.unwrap().unwrap().seq);
    }
    let from_a = a.events_after(0, 100).await.unwrap();
    let from_b = b.events_after(0, 100).await.unwrap();
    assert_eq!(from_a, from_b, "both stores read the same outbox");
    assert_eq!(
        from_b.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>(),
        "global seq gap-free in commit order"
    );
    assert_eq!(answered, (1..=40).collect::<BTreeSet<_>>());
    assert_eq!(
        from_b.iter().map(|e| e.subject_seq).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>(),
        "subject_seq follows seq"
    );
}

/// Store B's watch hears of store A's commits through LISTEN/NOTIFY (B's poll is effectively off).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_hears_other_processes_commits() {
    let b_options = PgOptions {
        poll_interval: Duration::from_secs(3600),
        ..PgOptions::default()
    };
    let Some((a, b, _f)) = two_stores("watch2", b_options) else {
        return;
    };
    let mut rx = b.watch_events();
    assert_eq!(*rx.borrow_and_update(), 0);
    // Give B's LISTEN connection time to subscribe (it starts in the background).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = a
        .write(|tx| tx.append_event(event("Patient/w")))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|seq| *seq >= e.seq))
        .await
        .expect("B's watch changes after A's commit")
        .unwrap();
    assert_eq!(*rx.borrow(), e.seq);
}

/// The poll catches commits that sent no notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_poll_catches_silent_commits() {
    let options = PgOptions {
        poll_interval: Duration::from_millis(100),
        ..PgOptions::default()
    };
    let Some(f) = common::fresh("poll", options) else {
        return;
    };
    let mut rx = f.store.watch_events();
    rx.borrow_and_update();
    common::exec(
        f.db.url(),
        "INSERT INTO outbox (seq, subject, subject_seq, kind, rtype, id, version, time_ms, data)
         VALUES (7, 'Patient/p', 1, 'test.silent', 'Patient', 'p', 1, 0, 'null')",
    );
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|seq| *seq == 7))
        .await
        .expect("the poll publishes a commit without NOTIFY")
        .unwrap();
}

/// A write's clock never goes behind the newest instant another process handed out, even when that
/// process's clock is ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clock_never_goes_behind_other_processes() {
    let Some((a, b, f)) = two_stores("clock2", PgOptions::default()) else {
        return;
    };
    let first = a.write(|tx| Ok(tx.now_ms())).await.unwrap();
    // Another process whose clock runs an hour ahead wrote last.
    let ahead = first + 3_600_000;
    common::exec(
        f.db.url(),
        &format!("UPDATE store_clock SET last_ms = {ahead}"),
    );
    let s = b.write(|tx| tx.put(patient("c1", "c1"))).await.unwrap();
    assert!(
        s.last_updated_ms >= ahead,
        "B caught up with the shared clock"
    );
    let s2 = a.write(|tx| tx.put(patient("c1", "c1"))).await.unwrap();
    assert!(
        s2.last_updated_ms >= s.last_updated_ms,
        "A's next version is not older than B's"
    );
}

/// A store survives the server dropping its connections: the next reads and writes reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnects_after_the_server_drops_connections() {
    let Some(f) = common::fresh("reconnect", PgOptions::default()) else {
        return;
    };
    let store = f.store.clone();
    store.write(|tx| tx.put(patient("r1", "r1"))).await.unwrap();
    assert!(
        store
            .read(ResourceType::Patient, "r1")
            .await
            .unwrap()
            .is_some()
    );
    let db = f.db.name().to_string();
    common::exec(
        f.db.url(),
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = '{db}' AND pid <> pg_backend_pid()"
        ),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = store.write(|tx| tx.put(patient("r2", "r2"))).await.unwrap();
    assert_eq!(s.version, 1);
    for id in ["r1", "r2"] {
        for _ in 0..8 {
            // Every pooled connection was dropped; each is replaced when next used.
            assert!(
                store
                    .read(ResourceType::Patient, id)
                    .await
                    .unwrap()
                    .is_some()
            );
        }
    }
}

/// Writes that search inside their transaction (which writes the batch's held-back rows early) and then
/// fail: only their own changes vanish, in either isolation mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_after_a_search_inside_a_batch_roll_back_only_their_writes() {
    for savepoint_per_write in [false, true] {
        let options = PgOptions {
            savepoint_per_write,
            ..PgOptions::default()
        };
        let Some(f) = common::fresh("flushfail", options) else {
            return;
        };
        let store = f.store.clone();
        let handles: Vec<_> = (0..40)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .write(move |tx| {
                            let id = format!("f{i}");
                            tx.put(patient(&id, &format!("ident-{i}")))?;
                            tx.append_event(event("Patient/flush"))?;
                            // The search sees this write's own row (so it was written to the database).
                            let found = tx.search(&by_identifier(&format!("ident-{i}")))?;
                            assert_eq!(found.len(), 1, "a write's search sees its own put");
                            if i % 4 == 3 {
                                return Err(StoreError::Conflict(format!("{i} refuses")));
                            }
                            Ok(())
                        })
                        .await
                })
            })
            .collect();
        let mut results = Vec::new();
        for h in handles {
            results.push(h.await.unwrap());
        }
        for (i, r) in results.iter().enumerate() {
            let stored = store
                .read(ResourceType::Patient, &format!("f{i}"))
                .await
                .unwrap();
            let hits = store
                .search(&by_identifier(&format!("ident-{i}")))
                .await
                .unwrap()
                .resources
                .len();
            if i % 4 == 3 {
                assert!(
                    matches!(r, Err(StoreError::Conflict(_))),
                    "write {i}: {r:?}"
                );
                assert!(stored.is_none(), "failed write {i} left its resource");
                assert_eq!(hits, 0, "failed write {i} left index rows");
            } else {
                assert!(r.is_ok(), "write {i}: {r:?}");
                assert_eq!(stored.map(|s| s.version), Some(1), "write {i} kept");
                assert_eq!(hits, 1, "write {i} searchable");
            }
        }
        let events = store.events_after(0, 100).await.unwrap();
        assert_eq!(
            events
                .iter()
                .map(|e| (e.seq, e.subject_seq))
                .collect::<Vec<_>>(),
            (1..=30).map(|n| (n, n)).collect::<Vec<_>>(),
            "one event per kept write, seqs gap-free (savepoint per write: {savepoint_per_write})"
        );
    }
}

/// Writes of one batch that all update the same resource, re-index it, search (which writes the held-back
/// rows early) and sometimes fail: each sees the version the kept writes before it left (not one a failed
/// write left behind), old index rows go, and the subject's events stay gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn updates_of_one_resource_inside_a_batch_see_only_kept_writes() {
    for savepoint_per_write in [false, true] {
        let options = PgOptions {
            savepoint_per_write,
            ..PgOptions::default()
        };
        let Some(f) = common::fresh("sameres", options) else {
            return;
        };
        let store = f.store.clone();
        store
            .write(|tx| {
                tx.put(patient("shared", "v-start"))?;
                tx.append_event(event("Patient/shared"))?;
                Ok(())
            })
            .await
            .unwrap();
        let handles: Vec<_> = (0..40)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .write(move |tx| {
                            let before = tx.read(ResourceType::Patient, "shared")?.unwrap();
                            let ident = format!("v{i}");
                            let mut put = patient("shared", &ident);
                            put.expected_version = Some(before.version);
                            let stored = tx.put(put)?;
                            assert_eq!(stored.version, before.version + 1);
                            let appended = tx.append_event(event("Patient/shared"))?;
                            assert_eq!(
                                u64::try_from(appended.subject_seq).unwrap(),
                                stored.version
                            );
                            assert_eq!(tx.search(&by_identifier(&ident))?.len(), 1);
                            if i % 4 == 3 {
                                return Err(StoreError::Conflict(format!("{i} refuses")));
                            }
                            Ok(ident)
                        })
                        .await
                })
            })
            .collect();
        let mut kept = Vec::new();
        for (i, h) in handles.into_iter().enumerate() {
            match h.await.unwrap() {
                Ok(ident) => kept.push(ident),
                Err(e) => {
                    assert_eq!(i % 4, 3, "write {i}: {e:?}");
                }
            }
        }
        assert_eq!(kept.len(), 30);
        let current = store
            .read(ResourceType::Patient, "shared")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            current.version, 31,
            "savepoint per write: {savepoint_per_write}"
        );
        let mut hits = 0;
        for ident in std::iter::once("v-start".to_string()).chain((0..40).map(|i| format!("v{i}")))
        {
            hits += store
                .search(&by_identifier(&ident))
                .await
                .unwrap()
                .resources
                .len();
        }
        assert_eq!(hits, 1, "only the current version is indexed");
        let events = store.events_after(0, 100).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.subject_seq).collect::<Vec<_>>(),
            (1..=31).collect::<Vec<_>>(),
            "gap-free subject seq (savepoint per write: {savepoint_per_write})"
        );
    }
}

/// A search of another type than the held-back rows' leaves them held back; a later search of their type
/// still sees them, and a failure after it still removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn searches_of_other_types_keep_rows_held_back_and_visible() {
    let Some(f) = common::fresh("othertype", PgOptions::default()) else {
        return;
    };
    let store = f.store.clone();
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(move |tx| {
                        let ident = format!("o{i}");
                        tx.put(patient(&format!("p{i}"), &ident))?;
                        let slots = tx.search(&SearchQuery::new(ResourceType::Slot))?;
                        assert!(slots.is_empty());
                        assert_eq!(tx.search(&by_identifier(&ident))?.len(), 1);
                        if i % 5 == 4 {
                            return Err(StoreError::Conflict(format!("{i} refuses")));
                        }
                        Ok(())
                    })
                    .await
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.await.unwrap();
        assert_eq!(r.is_ok(), i % 5 != 4, "write {i}: {r:?}");
        let hits = store
            .search(&by_identifier(&format!("o{i}")))
            .await
            .unwrap()
            .resources
            .len();
        assert_eq!(hits, usize::from(i % 5 != 4), "write {i}");
    }
}

/// A store that grows from empty by thousands of rows in seconds gets fresh planner statistics at once
/// (autovacuum would wait for its next round): searches over it are planned for its real size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_growth_refreshes_the_planner_statistics() {
    let Some(f) = common::fresh("analyze", PgOptions::default()) else {
        return;
    };
    // `last_analyze` is set by an explicit ANALYZE only (autovacuum sets `last_autoanalyze`).
    let analyzed = || {
        common::query_i64(
            f.db.url(),
            "SELECT COUNT(*) FROM pg_stat_user_tables WHERE relname = 'versions' AND last_analyze IS NOT NULL",
        )
    };
    let write = |from: usize, to: usize| {
        let handles: Vec<_> = (from..to)
            .map(|i| {
                let store = f.store.clone();
                tokio::spawn(async move {
                    store
                        .write(move |tx| tx.put(patient(&format!("g{i}"), &format!("id-{i}"))))
                        .await
                })
            })
            .collect();
        async move {
            for h in handles {
                h.await.unwrap().unwrap();
            }
        }
    };
    write(0, 500).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(analyzed(), 0, "500 versions are below the threshold");
    write(500, 2_500).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while analyzed() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no ANALYZE within 30 s of writing 2,500 versions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let estimate = common::query_i64(
        f.db.url(),
        "SELECT reltuples::bigint FROM pg_class WHERE relname = 'versions'",
    );
    assert!(
        estimate >= 2_000,
        "the planner now knows the table's size: {estimate}"
    );
}

/// A database at schema version 1 (each string value indexed twice: normalised under `param`, as sent under
/// `param:exact`; a Patient's family and given names under `name` too) is migrated to one row per value
/// holding both forms, without the `name` rows that repeat `family` or `given`; searches of either kind
/// still find the resource.
#[test]
fn migration_2_merges_exact_string_rows() {
    let Some(db) = common::database("migrate2") else {
        return;
    };
    let v1 = store_postgres::testing::migration_sql(1).unwrap();
    common::exec(
        db.url(),
        &format!(
            "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL);
             {v1};
             INSERT INTO schema_migrations (version, applied_ms) VALUES (1, 0);
             INSERT INTO resources (rid, rtype, id, version, last_updated_ms, deleted)
                 VALUES (7, 'Patient', 'p1', 1, 1000, false);
             INSERT INTO versions (rid, rtype, version, last_updated_ms, deleted, json)
                 VALUES (7, 'Patient', 1, 1000, false, '{{\"resourceType\":\"Patient\",\"id\":\"p1\"}}');
             INSERT INTO idx_string (rtype, param, value, rid) VALUES
                 ('Patient', 'name', 'o''brien', 7), ('Patient', 'name:exact', 'O''Brien', 7),
                 ('Patient', 'name', 'zoe', 7), ('Patient', 'name:exact', 'Zoë', 7),
                 ('Patient', 'name', 'dr', 7), ('Patient', 'name:exact', 'Dr', 7),
                 ('Patient', 'family', 'o''brien', 7), ('Patient', 'family:exact', 'O''Brien', 7),
                 ('Patient', 'given', 'zoe', 7), ('Patient', 'given:exact', 'Zoë', 7);"
        ),
    );
    let report = store_postgres::migrate(db.url()).unwrap();
    assert_eq!((report.from, report.to), (1, PgStore::schema_version()));
    assert_eq!(
        common::query_i64(db.url(), "SELECT count(*) FROM idx_string"),
        3,
        "one row per value, none under name that repeats family or given"
    );
    assert_eq!(
        common::query_i64(
            db.url(),
            "SELECT count(*) FROM idx_string WHERE param = 'given' AND value = 'zoe' AND exact = 'Zoë'"
        ),
        1
    );
    let store = PgStore::connect(db.url(), PgOptions::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let found = |param: &str, value: &str, exact: Option<&str>| {
        let q = SearchQuery::new(ResourceType::Patient).with(
            param,
            Predicate::String {
                value: value.into(),
                exact: exact.map(str::to_string),
            },
        );
        rt.block_on(store.search(&q)).unwrap().resources.len()
    };
    assert_eq!(found("family", "o'b", None), 1);
    assert_eq!(found("given", "zoe", Some("Zoë")), 1);
    assert_eq!(found("given", "zoe", Some("Zoe")), 0);
    assert_eq!(found("name", "o'brien", Some("O'Brien")), 1);
    assert_eq!(found("name", "zo", None), 1);
    assert_eq!(found("name", "dr", Some("Dr")), 1);
}

/// What a counter resource leads to (for [`store::ReadAhead::follow`]): the Patient named in its `next`.
fn counter_leads(found: &store::Stored) -> Vec<(ResourceType, String)> {
    serde_json::from_str::<Value>(&found.json)
        .ok()
        .and_then(|v| v.get("next").and_then(Value::as_str).map(str::to_string))
        .map(|id| vec![(ResourceType::Patient, id)])
        .unwrap_or_default()
}

/// Writes that tell their reads ahead (fetched for the whole group commit at the batch's start) still see
/// what earlier writes of the same batch, and of the other process, changed: 64 increments of one counter
/// through two stores, each read-modify-write with its expected version, all succeed in turn; resources
/// read ahead that do not exist yet are created with the rid handed out ahead; the follow-up round does
/// not change what is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_told_ahead_see_earlier_writes_of_the_batch() {
    let Some((a, b, _f)) = two_stores("ahead", PgOptions::default()) else {
        return;
    };
    let counter = |n: i64| Put {
        rtype: ResourceType::Patient,
        id: "counter".into(),
        resource: json!({"resourceType": "Patient", "n": n, "next": format!("p{}", n + 1)}),
        index: Vec::new(),
        expected_version: None,
        body: None,
    };
    a.write(move |tx| tx.put(counter(0))).await.unwrap();
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let ahead = store::ReadAhead {
                keys: vec![
                    (ResourceType::Patient, "counter".to_string()),
                    (ResourceType::Patient, format!("new{i}")),
                    (ResourceType::Patient, "never".to_string()),
                ],
                follow: Some(counter_leads),
                searches: Vec::new(),
            };
            tokio::spawn(async move {
                store
                    .write_reading(ahead, move |tx| {
                        let current = tx.read(ResourceType::Patient, "counter")?.unwrap();
                        let n = serde_json::from_str::<Value>(&current.json).unwrap()["n"]
                            .as_i64()
                            .unwrap();
                        // What the follow-up round fetched reads the same as an unforeseen read.
                        let next = format!("p{}", n + 1);
                        let led_to = tx.read(ResourceType::Patient, &next)?;
                        let mut put = counter(n + 1);
                        put.expected_version = Some(current.version);
                        let stored = tx.put(put)?;
                        assert!(tx.read(ResourceType::Patient, "never")?.is_none());
                        tx.put(patient(&format!("new{i}"), &format!("n{i}")))?;
                        tx.put(patient(&next, &next))?;
                        Ok((stored.version, led_to.map(|s| s.version)))
                    })
                    .await
            })
        })
        .collect();
    let mut versions = BTreeSet::new();
    for h in handles {
        let (version, led_to) = h.await.unwrap().unwrap();
        assert_eq!(
            led_to, None,
            "p{{n+1}} is created only by the write that reads n"
        );
        versions.insert(version);
    }
    assert_eq!(versions, (2..=65).collect::<BTreeSet<u64>>());
    let current = b
        .read(ResourceType::Patient, "counter")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(current.version, 65);
    let n = serde_json::from_str::<Value>(&current.json).unwrap()["n"].clone();
    assert_eq!(n, json!(64));
    for i in 0..64 {
        let found = a.search(&by_identifier(&format!("n{i}"))).await.unwrap();
        assert_eq!(found.resources.len(), 1, "new{i} was created once");
        assert_eq!(found.resources[0].id, format!("new{i}"));
    }
    assert!(
        a.read(ResourceType::Patient, "never")
            .await
            .unwrap()
            .is_none()
    );
}

/// The ids of the page `q` finds, in order.
async fn ids_found(store: &PgStore, q: &SearchQuery) -> Vec<String> {
    let page = store.search(q).await.unwrap().resources;
    page.into_iter().map(|s| s.id).collect()
}

/// Range clauses on `Slot.start` (single-valued, an instant) are read as one bounded range over a single
/// index row while every Slot has one start no wider than an instant, and as separate clauses once one has
/// several or a wider one (listed in kv by the put that stored it, in its transaction). Every search
/// answers what `store::matches` says of each Slot, before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_searches_answer_row_by_row_before_and_after_irregular_dates() {
    use store::{Clause, Cmp};
    const HOUR: i64 = 3_600_000;
    let Some(f) = common::fresh("ranges", PgOptions::default()) else {
        return;
    };
    let slot = |id: String, schedule: &str, starts: &[(i64, i64)]| {
        let mut index = vec![IndexEntry {
            param: "schedule",
            value: IndexValue::Reference(format!("Schedule/{schedule}")),
        }];
        index.extend(starts.iter().map(|&(low_ms, high_ms)| IndexEntry {
            param: "start",
            value: IndexValue::Date { low_ms, high_ms },
        }));
        Put {
            rtype: ResourceType::Slot,
            id,
            resource: json!({"resourceType": "Slot"}),
            index,
            expected_version: None,
            body: None,
        }
    };
    let mut all: Vec<(String, Vec<IndexEntry>)> = Vec::new();
    let mut puts = Vec::new();
    for n in 0..240i64 {
        // Starts on the hour (ids out of start order, some hours twice), some a millisecond wide and some a
        // second wide (`10:00:00` in seconds); every 40th Slot has no start.
        let low = (n * 7 % 240) / 2 * HOUR;
        let starts = [(low, low + (n % 2) * 999)];
        let p = slot(
            format!("s{n}"),
            if n % 3 == 0 { "b" } else { "a" },
            if n % 40 == 39 { &[] } else { &starts },
        );
        all.push((p.id.clone(), p.index.clone()));
        puts.push(p);
    }
    f.store
        .write(move |tx| puts.into_iter().try_for_each(|p| tx.put(p).map(|_| ())))
        .await
        .unwrap();
    let listed = |namespace: &str| {
        common::query_i64(
            f.db.url(),
            &format!(
                "SELECT COUNT(*) FROM kv WHERE namespace = '{namespace}' AND key = 'Slot start'"
            ),
        )
    };
    let start = |cmp: Cmp, low: i64, high: i64| Clause {
        param: "start".into(),
        any_of: vec![Predicate::Date {
            cmp,
            low_ms: low,
            high_ms: high,
        }],
    };
    let queries: Vec<Vec<Clause>> = vec![
        vec![
            start(Cmp::Ge, 100 * HOUR, 100 * HOUR),
            start(Cmp::Lt, 124 * HOUR, 124 * HOUR),
        ],
        // A query instant inside a second-wide row: the row ends after it, so `ge` must keep it.
        vec![
            start(Cmp::Ge, 101 * HOUR + 500, 101 * HOUR + 500),
            start(Cmp::Le, 110 * HOUR, 110 * HOUR),
        ],
        vec![
            start(Cmp::Gt, 50 * HOUR, 50 * HOUR + 999),
            start(Cmp::Lt, 60 * HOUR, 60 * HOUR),
        ],
        vec![
            start(Cmp::Ap, 70 * HOUR, 72 * HOUR),
            start(Cmp::Ge, 71 * HOUR, 71 * HOUR),
        ],
        vec![
            start(Cmp::Ge, 400 * HOUR, 400 * HOUR),
            start(Cmp::Lt, 20 * HOUR, 20 * HOUR),
        ],
        vec![
            start(Cmp::Ge, 0, 0),
            start(Cmp::Lt, 1_000 * HOUR, 1_000 * HOUR),
        ],
    ];
    let check = |all: Vec<(String, Vec<IndexEntry>)>, when: &'static str| {
        let store = f.store.clone();
        let queries = queries.clone();
        async move {
            for clauses in queries {
                for schedule in [None, Some("a")] {
                    let mut q = SearchQuery::new(ResourceType::Slot);
                    q.count = 1_000;
                    q.clauses = clauses.clone();
                    if let Some(s) = schedule {
                        q = q.with("schedule", Predicate::Reference(format!("Schedule/{s}")));
                    }
                    let expected: BTreeSet<String> = all
                        .iter()
                        .filter(|(id, index)| store::matches(&q, id, 0, index))
                        .map(|(id, _)| id.clone())
                        .collect();
                    let found: BTreeSet<String> = ids_found(&store, &q).await.into_iter().collect();
                    assert_eq!(found, expected, "{when}: {:?}", q.clauses);
                }
            }
        }
    };
    check(all.clone(), "regular").await;
    // Sorted by start (each page read in start order through the joined index row when it is full, by the
    // general statement when short): ascending and descending, no start last, ties by id.
    let key = |index: &[IndexEntry]| {
        index
            .iter()
            .filter_map(|e| match (e.param, &e.value) {
                ("start", IndexValue::Date { low_ms, .. }) => Some(*low_ms),
                _ => None,
            })
            .min()
    };
    for descending in [false, true] {
        for clauses in [
            vec![],
            vec![start(Cmp::Ge, 30 * HOUR, 30 * HOUR)],
            // Inside a second-wide row that starts before the query instant.
            vec![start(Cmp::Ge, 101 * HOUR + 500, 101 * HOUR + 500)],
            queries[0].clone(),
        ] {
            for (count, offset) in [(7, 0), (7, 7), (40, 130), (50, 100)] {
                let mut q = SearchQuery::new(ResourceType::Slot)
                    .with("schedule", Predicate::Reference("Schedule/a".into()));
                q.clauses.extend(clauses.clone());
                q.sort = vec![store::Sort {
                    field: store::SortField::Param("start".into()),
                    descending,
                }];
                q.count = count;
                q.offset = offset;
                let mut expected: Vec<(Option<i64>, String)> = all
                    .iter()
                    .filter(|(id, index)| store::matches(&q, id, 0, index))
                    .map(|(id, index)| (key(index), id.clone()))
                    .collect();
                expected.sort_by(|a, b| match (a.0, b.0) {
                    (Some(x), Some(y)) if x != y => {
                        if descending {
                            y.cmp(&x)
                        } else {
                            x.cmp(&y)
                        }
                    }
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    _ => a.1.cmp(&b.1),
                });
                let expected: Vec<String> = expected
                    .into_iter()
                    .skip(offset)
                    .take(count)
                    .map(|(_, id)| id)
                    .collect();
                let found = ids_found(&f.store, &q).await;
                assert_eq!(
                    found, expected,
                    "sorted, desc {descending}, {count}@{offset}: {clauses:?}"
                );
            }
        }
    }
    assert_eq!((listed("store:multi-valued"), listed("store:wide")), (0, 0));

    // Two starts, one matching `ge 400h` and the other `lt 20h`: only separate clauses find it.
    let two = slot(
        "two".into(),
        "a",
        &[(10 * HOUR, 10 * HOUR), (500 * HOUR, 500 * HOUR)],
    );
    all.push((two.id.clone(), two.index.clone()));
    f.store
        .write(move |tx| tx.put(two).map(|_| ()))
        .await
        .unwrap();
    assert_eq!((listed("store:multi-valued"), listed("store:wide")), (1, 0));
    check(all.clone(), "after a Slot with two starts").await;

    // On a fresh database, a start wider than an instant turns off the lower bound only.
    let Some(g) = common::fresh("ranges-wide", PgOptions::default()) else {
        return;
    };
    let wide = slot("wide".into(), "a", &[(10 * HOUR, 30 * HOUR)]);
    let wide_index = wide.index.clone();
    g.store
        .write(move |tx| tx.put(wide).map(|_| ()))
        .await
        .unwrap();
    let mut q = SearchQuery::new(ResourceType::Slot);
    q.clauses = vec![
        start(Cmp::Ge, 20 * HOUR, 20 * HOUR),
        start(Cmp::Lt, 24 * HOUR, 24 * HOUR),
    ];
    assert!(store::matches(&q, "wide", 0, &wide_index));
    let found = g.store.search(&q).await.unwrap().resources;
    assert_eq!(
        found.len(),
        1,
        "a Slot whose start row spans 10h-30h is found by 20h <= start < 24h"
    );
    assert_eq!(
        common::query_i64(
            g.db.url(),
            "SELECT COUNT(*) FROM kv WHERE namespace = 'store:wide'"
        ),
        1
    );
}

/// Migration 3 lists the irregular date rows stored before writes listed them: a Slot with two starts under
/// `store:multi-valued`, a wider-than-an-instant row under `store:wide`, nothing for regular rows. (The
/// database is taken back to version 2 by hand: rows written directly, migration 3 unrecorded.)
#[test]
fn migration_3_lists_irregular_dates() {
    let Some(db) = common::database("migrate3") else {
        return;
    };
    store_postgres::migrate(db.url()).unwrap();
    common::exec(
        db.url(),
        "DELETE FROM schema_migrations WHERE version >= 3;
         INSERT INTO idx_date (rtype, param, low_ms, high_ms, rid) VALUES
             ('Slot', 'start', 50000, 50999, 1),
             ('Slot', 'start', 10000, 10000, 2), ('Slot', 'start', 90000, 90000, 2),
             ('Appointment', 'date', 0, 86399999, 3);",
    );
    let report = store_postgres::migrate(db.url()).unwrap();
    assert_eq!((report.from, report.applied), (2, 1));
    let count = |filter: &str| {
        common::query_i64(
            db.url(),
            &format!("SELECT COUNT(*) FROM kv WHERE namespace LIKE 'store:%' {filter}"),
        )
    };
    assert_eq!(count(""), 2);
    assert_eq!(
        count("AND namespace = 'store:multi-valued' AND key = 'Slot start'"),
        1
    );
    assert_eq!(
        count("AND namespace = 'store:wide' AND key = 'Appointment date'"),
        1
    );
}

/// A Patient put with these index rows: identifiers, one family name, a birth date and a GP reference.
fn indexed_patient(identifiers: &[&str], birth_ms: i64, gps: &[&str]) -> Put {
    let mut index: Vec<IndexEntry> = identifiers
        .iter()
        .map(|code| IndexEntry {
            param: "identifier",
            value: IndexValue::Token {
                system: Some("urn:test".into()),
                code: (*code).to_string(),
            },
        })
        .collect();
    index.push(IndexEntry {
        param: "family",
        value: IndexValue::String {
            value: "smith".into(),
            exact: "Smith".into(),
        },
    });
    index.push(IndexEntry {
        param: "birthdate",
        value: IndexValue::Date {
            low_ms: birth_ms,
            high_ms: birth_ms + 86_399_999,
        },
    });
    index.extend(gps.iter().map(|gp| IndexEntry {
        param: "general-practitioner",
        value: IndexValue::Reference((*gp).to_string()),
    }));
    Put {
        index,
        ..patient("indexed", "unused")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_rewrites_only_the_index_rows_that_changed() {
    let Some(f) = common::fresh("index_diff", PgOptions::default()) else {
        return;
    };
    let url = f.db.url().to_string();
    f.store
        .write(|tx| tx.put(indexed_patient(&["a", "b"], 0, &["Practitioner/1"])))
        .await
        .unwrap();
    let q = |sql: &str| common::query_i64(&url, sql);
    // The transaction that wrote a row last (`xmin`), and how many rows a table holds.
    let xmin = |table: &str, cond: &str| {
        q(&format!(
            "SELECT xmin::text::bigint FROM {table} WHERE {cond}"
        ))
    };
    let kept_token = xmin("idx_token", "code = 'b'");
    let kept_string = xmin("idx_string", "value = 'smith'");
    let kept_reference = xmin("idx_reference", "target = 'Practitioner/1'");

    // Identifier a goes and c comes, the name stays, the birth date changes, a second GP is added.
    f.store
        .write(|tx| {
            tx.put(Put {
                expected_version: Some(1),
                ..indexed_patient(
                    &["b", "c"],
                    86_400_000,
                    &["Practitioner/1", "Practitioner/2"],
                )
            })
        })
        .await
        .unwrap();

    assert_eq!(
        q("SELECT count(*) FROM idx_token WHERE param = 'identifier'"),
        2
    );
    assert_eq!(
        q("SELECT count(*) FROM idx_token WHERE code IN ('b', 'c')"),
        2
    );
    assert_eq!(q("SELECT count(*) FROM idx_string"), 1);
    assert_eq!(q("SELECT count(*) FROM idx_date"), 1);
    assert_eq!(
        q("SELECT count(*) FROM idx_date WHERE low_ms = 86400000"),
        1
    );
    assert_eq!(q("SELECT count(*) FROM idx_reference"), 2);
    // The rows that stayed were not written again.
    assert_eq!(xmin("idx_token", "code = 'b'"), kept_token);
    assert_eq!(xmin("idx_string", "value = 'smith'"), kept_string);
    assert_eq!(
        xmin("idx_reference", "target = 'Practitioner/1'"),
        kept_reference
    );
    assert_ne!(
        xmin("idx_token", "code = 'c'"),
        kept_token,
        "the new row comes from the update"
    );
    // Searches agree.
    let ids = |code: &'static str| {
        let store = f.store.clone();
        async move { ids_found(&store, &by_identifier(code)).await }
    };
    assert!(ids("a").await.is_empty());
    assert_eq!(ids("b").await, vec!["indexed".to_string()]);
    assert_eq!(ids("c").await, vec!["indexed".to_string()]);

    // A delete removes every row; a put after it brings back exactly its own.
    f.store
        .write(|tx| tx.delete(ResourceType::Patient, "indexed", None))
        .await
        .unwrap();
    assert_eq!(
        q(
            "SELECT (SELECT count(*) FROM idx_token) + (SELECT count(*) FROM idx_string)
                + (SELECT count(*) FROM idx_date) + (SELECT count(*) FROM idx_reference)"
        ),
        0
    );
    f.store
        .write(|tx| tx.put(indexed_patient(&["b"], 0, &[])))
        .await
        .unwrap();
    assert_eq!(
        q(
            "SELECT (SELECT count(*) FROM idx_token) + (SELECT count(*) FROM idx_string)
                + (SELECT count(*) FROM idx_date) + (SELECT count(*) FROM idx_reference)"
        ),
        3
    );
}
