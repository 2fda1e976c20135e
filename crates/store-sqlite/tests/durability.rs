//! Crash durability: a child process (this test binary, re-executed) writes resources and prints each
//! acknowledged id; the parent `kill -9`s it mid-stream, reopens the store and checks that every acknowledged
//! write is there, with exactly one outbox event each, and that no write is half there.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::TempDir;
use serde_json::json;
use store::{IndexEntry, IndexValue, NewEvent, Predicate, Put, ResourceType, SearchQuery, Store};
use store_sqlite::{SqliteOptions, SqliteStore};

const CHILD_ENV: &str = "STORE_SQLITE_DURABILITY_CHILD";
const WRITERS: usize = 8;
const KILL_AFTER: usize = 1500;

/// Runs only as the child (when `CHILD_ENV` names the data directory): writes until killed.
#[test]
fn durability_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = Arc::new(SqliteStore::open(Path::new(&dir), SqliteOptions::default()).unwrap());
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0.. {
                        let id = format!("w{w}-{i}");
                        let put = Put {
                            rtype: ResourceType::Patient,
                            id: id.clone(),
                            resource: json!({"resourceType": "Patient", "name": [{"family": format!("Family{i}")}]}),
                            index: vec![IndexEntry {
                                param: "identifier",
                                value: IndexValue::Token { system: Some("urn:kill9".into()), code: id.clone() },
                            }],
                            expected_version: Some(0),
                            body: None,
                        };
                        let event_id = id.clone();
                        store
                            .write(move |tx| {
                                let s = tx.put(put)?;
                                tx.append_event(NewEvent {
                                    subject: format!("Patient/{event_id}"),
                                    kind: "patient.registered".into(),
                                    rtype: ResourceType::Patient,
                                    id: event_id,
                                    version: s.version,
                                    data: serde_json::Value::Null,
                                })
                            })
                            .await
                            .unwrap();
                        // Written straight to the stdout handle (not captured by the test harness).
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ACK {id}").unwrap();
                        out.flush().unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = TempDir::new("kill9");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "durability_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked: Vec<String> = Vec::new();
    for line in lines.by_ref() {
        if let Some(id) = line.unwrap().strip_prefix("ACK ") {
            acked.push(id.to_string());
            if acked.len() >= KILL_AFTER {
                break;
            }
        }
    }
    assert_eq!(
        acked.len(),
        KILL_AFTER,
        "the child stopped before {KILL_AFTER} acknowledgements"
    );
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child was killed");
    // Acknowledgements already in the pipe when the child died count too.
    for line in lines {
        if let Some(id) = line.unwrap().strip_prefix("ACK ") {
            acked.push(id.to_string());
        }
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        for id in &acked {
            let s = store.read(ResourceType::Patient, id).await.unwrap();
            assert!(
                s.is_some_and(|s| s.version == 1 && !s.deleted),
                "acknowledged Patient/{id} lost after kill -9"
            );
        }
        let events = store.events_after(0, usize::MAX >> 1).await.unwrap();
        let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &events {
            *per_id.entry(e.id.as_str()).or_default() += 1;
            assert_eq!(e.subject_seq, 1, "one event per subject");
        }
        for id in &acked {
            assert_eq!(
                per_id.get(id.as_str()),
                Some(&1),
                "acknowledged write {id} has exactly one event"
            );
        }
        // Writes committed but not yet acknowledged may exist; they must be whole (resource + event).
        let q = SearchQuery {
            count: 0,
            want_total: true,
            ..SearchQuery::new(ResourceType::Patient)
        };
        let total = store.search(&q).await.unwrap().total.unwrap();
        assert_eq!(
            total as usize,
            events.len(),
            "every committed resource has its event and vice versa"
        );
        let event_ids: BTreeSet<&str> = per_id.keys().copied().collect();
        for id in &event_ids {
            let q = SearchQuery::new(ResourceType::Patient).with(
                "identifier",
                Predicate::Token {
                    system: Some("urn:kill9".into()),
                    code: Some(id.to_string()),
                },
            );
            assert_eq!(
                store.search(&q).await.unwrap().resources.len(),
                1,
                "event {id} has its indexed resource"
            );
        }
        eprintln!(
            "kill -9 test: {} acknowledged, {} committed (the difference was in flight)",
            acked.len(),
            events.len()
        );
    });
}
