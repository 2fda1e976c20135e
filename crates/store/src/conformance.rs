//! Conformance suite every backend must pass.
//!
//! Why it exists: the domain code is written once against [`Store`]/[`Tx`](crate::Tx), so every backend must show the
//! same observable behaviour. Each backend's test crate opens a fresh, empty store and calls [`run_all`] (or
//! the individual checks, one test each) inside a multi-thread tokio runtime.
//!
//! The checks build index entries by hand (they do not depend on `fhir::index_entries`) and scope every search
//! with a `_tag` token unique to the check, so they can share one store and run in any order. A failed check
//! panics with a message saying what was expected.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed check panics"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::{
    Clause, Cmp, Delivery, DeliveryCounts, DeliveryQuery, DeliveryState, DeliveryUpdate, Event,
    HistoryQuery, IdempotencyRecord, IndexEntry, IndexValue, NewEvent, Predicate, Put,
    ResourceType, SearchQuery, Sort, SortField, Store, StoreError, Stored,
};

const TAG_SYSTEM: &str = "urn:carebridge:conformance";
const ALL_CMPS: [Cmp; 9] = [
    Cmp::Eq,
    Cmp::Ne,
    Cmp::Gt,
    Cmp::Lt,
    Cmp::Ge,
    Cmp::Le,
    Cmp::Sa,
    Cmp::Eb,
    Cmp::Ap,
];

/// Run every check, one after the other, on `store` (which should start empty, but need not).
pub async fn run_all<S: Store>(store: Arc<S>) {
    create_read_update(&store).await;
    index_follows_updates(&store).await;
    version_conflicts(&store).await;
    delete_and_recreate(&store).await;
    history(&store).await;
    search_predicates(&store).await;
    references_stored_as_another(&store).await;
    date_and_last_updated_prefixes(&store).await;
    sorting_and_paging(&store).await;
    savepoint_isolation(&store).await;
    concurrent_creates(&store).await;
    concurrent_conditional_creates(&store).await;
    searches_told_ahead(&store).await;
    events(&store).await;
    events_concurrent_gap_free(&store).await;
    idempotency(&store).await;
    kv(&store).await;
    delivery_lifecycle(&store).await;
    deliveries_enqueued_together(&store).await;
    delivery_claim_and_put_at(&store).await;
    delivery_listing(&store).await;
    due_per_subscription(&store).await;
    events_watch(&store).await;
    delivery_batch_isolation(&store).await;
    delivery_no_head_of_line_blocking(&store).await;
}

// ---------------------------------------------------------------------------------------------------------
// Helpers

/// A fresh id (valid FHIR id: letters, digits, `-`), unique within the process and across runs.
pub fn unique_id(tag: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("{tag}-{:x}-{n}", t % 0xFFFF_FFFF_FFFF)
}

fn tok(param: &'static str, system: Option<&str>, code: &str) -> IndexEntry {
    IndexEntry {
        param,
        value: IndexValue::Token {
            system: system.map(str::to_string),
            code: code.to_string(),
        },
    }
}
/// A string entry whose form as sent is its normalised value.
fn string(param: &'static str, value: &str) -> IndexEntry {
    string_sent(param, value, value)
}
/// A string entry: normalised `value`, `exact` as sent.
fn string_sent(param: &'static str, value: &str, exact: &str) -> IndexEntry {
    IndexEntry {
        param,
        value: IndexValue::String {
            value: value.to_string(),
            exact: exact.to_string(),
        },
    }
}
fn date(param: &'static str, low_ms: i64, high_ms: i64) -> IndexEntry {
    IndexEntry {
        param,
        value: IndexValue::Date { low_ms, high_ms },
    }
}
fn reference(param: &'static str, target: &str) -> IndexEntry {
    IndexEntry {
        param,
        value: IndexValue::Reference(target.to_string()),
    }
}
fn tag(scope: &str) -> IndexEntry {
    tok("_tag", Some(TAG_SYSTEM), scope)
}

fn put(rtype: ResourceType, id: &str, resource: Value, index: Vec<IndexEntry>) -> Put {
    Put {
        rtype,
        id: id.to_string(),
        resource,
        index,
        expected_version: None,
        body: None,
    }
}

fn patient(id: &str, index: Vec<IndexEntry>) -> Put {
    put(
        ResourceType::Patient,
        id,
        json!({"resourceType": "Patient", "active": true}),
        index,
    )
}

/// A search over `rtype` limited to the resources tagged with `scope`.
fn scoped(rtype: ResourceType, scope: &str) -> SearchQuery {
    let mut q = SearchQuery::new(rtype);
    q.count = 1000;
    q.with(
        "_tag",
        Predicate::Token {
            system: Some(TAG_SYSTEM.to_string()),
            code: Some(scope.to_string()),
        },
    )
}

async fn create<S: Store>(store: &Arc<S>, p: Put) -> Stored {
    let what = format!("{}/{}", p.rtype, p.id);
    store
        .write(move |tx| tx.put(p))
        .await
        .unwrap_or_else(|e| panic!("creating {what} failed: {e}"))
}

async fn search_ids<S: Store>(store: &Arc<S>, q: &SearchQuery) -> Vec<String> {
    let r = store
        .search(q)
        .await
        .unwrap_or_else(|e| panic!("search {q:?} failed: {e}"));
    for s in &r.resources {
        assert!(
            !s.deleted,
            "search returned a tombstone {}/{}",
            s.rtype, s.id
        );
        assert_eq!(
            s.rtype, q.rtype,
            "search returned a resource of another type"
        );
    }
    r.resources.into_iter().map(|s| s.id).collect()
}

/// Ids of a search, as a set (for predicate checks where order is not the point).
async fn search_set<S: Store>(store: &Arc<S>, q: &SearchQuery) -> BTreeSet<String> {
    search_ids(store, q).await.into_iter().collect()
}

fn set(ids: &[&String]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).clone()).collect()
}

fn parse(json: &str) -> Value {
    serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("stored JSON does not parse ({e}): {json}"))
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Spawn `n` writes concurrently (each `f(i)` builds the closure of write `i`); results in order of `i`.
async fn concurrently<S, T, F, C>(store: &Arc<S>, n: usize, make: C) -> Vec<crate::Result<T>>
where
    S: Store,
    T: Send + 'static,
    F: FnOnce(&mut dyn crate::Tx) -> crate::Result<T> + Send + 'static,
    C: Fn(usize) -> F,
{
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let s = store.clone();
            let f = make(i);
            tokio::spawn(async move { s.write(f).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(h.await.expect("a write task panicked"));
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Checks

/// Create, read, update; version numbers; `id` / `meta` stamping; one `now_ms` per write; reads inside a
/// write see its own changes.
/// Each update leaves exactly the new version's index rows: changed values match only their new value,
/// unchanged ones still match, removed ones no longer match, a value listed twice counts once, and a
/// resource updated after a delete and re-create is indexed like a new one.
pub async fn index_follows_updates<S: Store>(store: &Arc<S>) {
    let id = unique_id("idx-upd");
    let scope = unique_id("idx-upd-scope");
    let first = vec![
        tag(&scope),
        tok("status", None, "a"),
        tok("identifier", Some("urn:sys"), "x"),
        string("name", "smith"),
        date("birthdate", 0, 10),
        reference("general-practitioner", "Practitioner/1"),
    ];
    create(store, patient(&id, first)).await;
    let second = vec![
        tag(&scope),
        tok("status", None, "b"),
        tok("status", None, "b"),
        tok("identifier", Some("urn:sys"), "x"),
        string("name", "jones"),
        date("birthdate", 0, 10),
        reference("organization", "Organization/2"),
    ];
    create(store, patient(&id, second)).await;
    let by = |param: &str, p: Predicate| scoped(ResourceType::Patient, &scope).with(param, p);
    let token = |code: &str| Predicate::Token {
        system: None,
        code: Some(code.to_string()),
    };
    let name = |v: &str| Predicate::String {
        value: v.to_string(),
        exact: Some(v.to_string()),
    };
    let one = vec![id.clone()];
    let none: Vec<String> = Vec::new();
    assert_eq!(
        search_ids(store, &by("status", token("a"))).await,
        none,
        "old status"
    );
    assert_eq!(
        search_ids(store, &by("status", token("b"))).await,
        one,
        "new status, listed twice"
    );
    assert_eq!(
        search_ids(store, &by("identifier", token("x"))).await,
        one,
        "unchanged token"
    );
    assert_eq!(
        search_ids(store, &by("name", name("smith"))).await,
        none,
        "old string"
    );
    assert_eq!(
        search_ids(store, &by("name", name("jones"))).await,
        one,
        "new string"
    );
    let day = Predicate::Date {
        cmp: Cmp::Eq,
        low_ms: 0,
        high_ms: 10,
    };
    assert_eq!(
        search_ids(store, &by("birthdate", day)).await,
        one,
        "unchanged date"
    );
    assert_eq!(
        search_ids(
            store,
            &by(
                "general-practitioner",
                Predicate::Reference("Practitioner/1".into())
            )
        )
        .await,
        none,
        "removed reference"
    );
    assert_eq!(
        search_ids(
            store,
            &by(
                "organization",
                Predicate::Reference("Organization/2".into())
            )
        )
        .await,
        one,
        "added reference"
    );

    // Delete, then put again with the first version's values: nothing of the second version is left.
    let id2 = id.clone();
    store
        .write(move |tx| tx.delete(ResourceType::Patient, &id2, None))
        .await
        .unwrap();
    create(
        store,
        patient(
            &id,
            vec![
                tag(&scope),
                tok("status", None, "a"),
                string("name", "smith"),
            ],
        ),
    )
    .await;
    assert_eq!(
        search_ids(store, &by("status", token("a"))).await,
        one,
        "re-created status"
    );
    assert_eq!(
        search_ids(store, &by("status", token("b"))).await,
        none,
        "nothing of before the delete"
    );
    assert_eq!(search_ids(store, &by("name", name("jones"))).await, none);
    assert_eq!(search_ids(store, &by("identifier", token("x"))).await, none);
}

pub async fn create_read_update<S: Store>(store: &Arc<S>) {
    let id = unique_id("cru");
    let scope = unique_id("cru-scope");
    assert_eq!(
        store.read(ResourceType::Patient, &id).await.unwrap(),
        None,
        "read of a never-created id"
    );
    assert_eq!(
        store.vread(ResourceType::Patient, &id, 1).await.unwrap(),
        None,
        "vread of a never-created id"
    );

    let resource = json!({
        "resourceType": "Patient",
        "id": "client-supplied-id-is-replaced",
        "meta": {"profile": ["https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"], "versionId": "99"},
        "birthDate": "1970-01-01",
        "_birthDate": {"extension": [{"url": "http://example.org/x", "valueString": "kept"}]},
        "multipleBirthInteger": 2,
    });
    let created = create(
        store,
        put(ResourceType::Patient, &id, resource, vec![tag(&scope)]),
    )
    .await;
    assert_eq!(created.version, 1, "first version is 1");
    assert_eq!(created.id, id);
    assert_eq!(created.rtype, ResourceType::Patient);
    assert!(!created.deleted);
    let v = parse(&created.json);
    assert_eq!(v["id"], json!(id), "id is set in the JSON");
    assert_eq!(v["resourceType"], json!("Patient"));
    assert_eq!(
        v["meta"]["versionId"],
        json!("1"),
        "meta.versionId is the decimal version"
    );
    assert_eq!(
        v["meta"]["lastUpdated"],
        json!(created.last_updated()),
        "meta.lastUpdated is the stored instant"
    );
    assert_eq!(
        v["meta"]["profile"],
        json!(["https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"]),
        "other meta fields are kept"
    );
    assert_eq!(
        v["_birthDate"]["extension"][0]["valueString"],
        json!("kept"),
        "primitive extensions are kept"
    );
    assert_eq!(v["multipleBirthInteger"], json!(2));

    let read = store
        .read(ResourceType::Patient, &id)
        .await
        .unwrap()
        .expect("read after create");
    assert_eq!(read, created, "read returns exactly what put returned");
    assert_eq!(
        store
            .vread(ResourceType::Patient, &id, 1)
            .await
            .unwrap()
            .as_ref(),
        Some(&created)
    );

    sleep_ms(2).await;
    let id2 = id.clone();
    let scope2 = scope.clone();
    let (updated, in_tx_read, in_tx_search, now) = store
        .write(move |tx| {
            let updated = tx.put(put(
                ResourceType::Patient,
                &id2,
                json!({"resourceType": "Patient", "active": false}),
                vec![tag(&scope2)],
            ))?;
            let in_tx_read = tx.read(ResourceType::Patient, &id2)?;
            let in_tx_search = tx.search(&scoped(ResourceType::Patient, &scope2))?;
            Ok((updated, in_tx_read, in_tx_search, tx.now_ms()))
        })
        .await
        .unwrap();
    assert_eq!(updated.version, 2, "update increments the version");
    assert_eq!(
        updated.last_updated_ms, now,
        "a version's instant is the transaction's now_ms"
    );
    assert!(
        updated.last_updated_ms > created.last_updated_ms,
        "lastUpdated moves forward"
    );
    assert_eq!(parse(&updated.json)["meta"]["versionId"], json!("2"));
    assert_eq!(parse(&updated.json)["active"], json!(false));
    assert_eq!(
        in_tx_read.as_ref(),
        Some(&updated),
        "Tx::read sees the transaction's own write"
    );
    assert_eq!(
        in_tx_search,
        vec![updated.clone()],
        "Tx::search sees the transaction's own write"
    );
    assert_eq!(
        store
            .read(ResourceType::Patient, &id)
            .await
            .unwrap()
            .as_ref(),
        Some(&updated)
    );
    assert_eq!(
        store
            .vread(ResourceType::Patient, &id, 1)
            .await
            .unwrap()
            .as_ref(),
        Some(&created)
    );
    assert_eq!(
        store.vread(ResourceType::Patient, &id, 3).await.unwrap(),
        None,
        "vread of a future version"
    );

    // Several puts in one write share the transaction's instant; the same id in another type is distinct.
    let a = unique_id("cru-a");
    let (pa, pb, now) = store
        .write({
            let a = a.clone();
            move |tx| {
                let pa = tx.put(patient(&a, vec![]))?;
                let pb = tx.put(put(
                    ResourceType::Practitioner,
                    &a,
                    json!({"resourceType": "Practitioner"}),
                    vec![],
                ))?;
                Ok((pa, pb, tx.now_ms()))
            }
        })
        .await
        .unwrap();
    assert_eq!(
        (pa.last_updated_ms, pb.last_updated_ms),
        (now, now),
        "one instant per transaction"
    );
    assert_eq!(
        (pa.version, pb.version),
        (1, 1),
        "ids are per resource type"
    );
    assert_eq!(
        store
            .read(ResourceType::Practitioner, &a)
            .await
            .unwrap()
            .map(|s| s.rtype),
        Some(ResourceType::Practitioner)
    );
}

/// `expected_version`: `Some(0)` = must not exist (or be deleted); `Some(v)` = current must be `v`.
pub async fn version_conflicts<S: Store>(store: &Arc<S>) {
    let id = unique_id("vc");
    let with = |expected: Option<u64>| {
        let mut p = patient(&id, vec![]);
        p.expected_version = expected;
        p
    };
    let p = with(Some(3));
    let r = store.write(move |tx| tx.put(p)).await;
    assert!(
        matches!(
            &r,
            Err(StoreError::VersionConflict {
                expected: 3,
                actual: 0,
                ..
            })
        ),
        "update of an absent resource with expected 3 must conflict (actual 0), got {r:?}"
    );
    assert_eq!(
        store.read(ResourceType::Patient, &id).await.unwrap(),
        None,
        "a refused put stores nothing"
    );

    let p = with(Some(0));
    let v1 = store
        .write(move |tx| tx.put(p))
        .await
        .expect("create with expected Some(0)");
    assert_eq!(v1.version, 1);
    let p = with(Some(0));
    let r = store.write(move |tx| tx.put(p)).await;
    match &r {
        Err(StoreError::VersionConflict {
            rtype,
            id: cid,
            expected: 0,
            actual: 1,
        }) => {
            assert_eq!(
                (*rtype, cid.as_str()),
                (ResourceType::Patient, id.as_str()),
                "conflict names the resource"
            );
        }
        other => panic!(
            "second create with expected Some(0) must conflict (expected 0, actual 1), got {other:?}"
        ),
    }
    let p = with(Some(5));
    let r = store.write(move |tx| tx.put(p)).await;
    assert!(
        matches!(
            &r,
            Err(StoreError::VersionConflict {
                expected: 5,
                actual: 1,
                ..
            })
        ),
        "update with a wrong expected version must conflict, got {r:?}"
    );
    let p = with(Some(1));
    let v2 = store
        .write(move |tx| tx.put(p))
        .await
        .expect("update with the right expected version");
    assert_eq!(v2.version, 2);
    let p = with(None);
    let v3 = store
        .write(move |tx| tx.put(p))
        .await
        .expect("unconditional update");
    assert_eq!(v3.version, 3);
    assert_eq!(
        store
            .read(ResourceType::Patient, &id)
            .await
            .unwrap()
            .map(|s| s.version),
        Some(3)
    );
}

/// Delete writes a tombstone version; reads show it; re-creating continues the numbering.
pub async fn delete_and_recreate<S: Store>(store: &Arc<S>) {
    let id = unique_id("del");
    let scope = unique_id("del-scope");
    let ident = unique_id("del-ident");
    let index = vec![tag(&scope), tok("identifier", Some("urn:x"), &ident)];
    let v1 = create(store, patient(&id, index.clone())).await;
    let v2 = create(store, patient(&id, index.clone())).await;
    assert_eq!(v2.version, 2);

    let (rid, eid) = (id.clone(), id.clone());
    let r = store
        .write(move |tx| tx.delete(ResourceType::Patient, &rid, Some(1)))
        .await;
    assert!(
        matches!(
            &r,
            Err(StoreError::VersionConflict {
                expected: 1,
                actual: 2,
                ..
            })
        ),
        "delete with a stale expected version must conflict, got {r:?}"
    );
    let r = store
        .write(move |tx| tx.delete(ResourceType::Patient, &eid, Some(0)))
        .await;
    assert!(
        matches!(
            &r,
            Err(StoreError::VersionConflict {
                expected: 0,
                actual: 2,
                ..
            })
        ),
        "delete with expected Some(0) of a live resource must conflict, got {r:?}"
    );

    sleep_ms(2).await;
    let did = id.clone();
    let tomb = store
        .write(move |tx| tx.delete(ResourceType::Patient, &did, Some(2)))
        .await
        .unwrap()
        .expect("delete of a live resource returns the tombstone");
    assert!(tomb.deleted, "tombstone is marked deleted");
    assert_eq!(tomb.version, 3, "the tombstone is a new version");
    assert!(tomb.json.is_empty(), "a tombstone has no JSON");
    assert!(tomb.last_updated_ms > v2.last_updated_ms);
    assert_eq!(
        store
            .read(ResourceType::Patient, &id)
            .await
            .unwrap()
            .as_ref(),
        Some(&tomb),
        "read shows the tombstone"
    );

    let did = id.clone();
    assert_eq!(
        store
            .write(move |tx| tx.delete(ResourceType::Patient, &did, None))
            .await
            .unwrap(),
        None,
        "deleting a deleted resource returns None"
    );
    let absent = unique_id("del-absent");
    assert_eq!(
        store
            .write(move |tx| tx.delete(ResourceType::Patient, &absent, None))
            .await
            .unwrap(),
        None,
        "deleting a never-created resource returns None"
    );
    assert_eq!(
        store
            .read(ResourceType::Patient, &id)
            .await
            .unwrap()
            .map(|s| s.version),
        Some(3),
        "no new version"
    );

    // Tombstones never match a search.
    assert!(
        search_ids(store, &scoped(ResourceType::Patient, &scope))
            .await
            .is_empty(),
        "tag search after delete"
    );
    let by_id = SearchQuery::new(ResourceType::Patient).with("_id", Predicate::Id(id.clone()));
    assert!(
        search_ids(store, &by_id).await.is_empty(),
        "_id search after delete"
    );
    let by_ident = SearchQuery::new(ResourceType::Patient).with(
        "identifier",
        Predicate::Token {
            system: None,
            code: Some(ident.clone()),
        },
    );
    assert!(
        search_ids(store, &by_ident).await.is_empty(),
        "identifier search after delete"
    );

    // Re-create (expected Some(0) allowed on a deleted resource): numbering continues.
    let mut p = patient(&id, index);
    p.expected_version = Some(0);
    let v4 = store
        .write(move |tx| tx.put(p))
        .await
        .expect("re-create a deleted resource with expected Some(0)");
    assert_eq!(v4.version, 4, "re-create continues after the tombstone");
    assert_eq!(parse(&v4.json)["meta"]["versionId"], json!("4"));
    assert_eq!(
        search_ids(store, &by_id).await,
        vec![id.clone()],
        "re-created resource is searchable"
    );
    assert_eq!(search_ids(store, &by_ident).await, vec![id.clone()]);

    for (version, expected) in [
        (1, Some(&v1)),
        (2, Some(&v2)),
        (3, Some(&tomb)),
        (4, Some(&v4)),
        (5, None),
    ] {
        let got = store
            .vread(ResourceType::Patient, &id, version)
            .await
            .unwrap();
        assert_eq!(got.as_ref(), expected, "vread of version {version}");
        if let Some(g) = got.filter(|g| !g.deleted) {
            assert_eq!(
                parse(&g.json)["meta"]["versionId"],
                json!(version.to_string())
            );
        }
    }
}

/// History of one resource and of a type: newest first, `since_ms`, paging, total.
pub async fn history<S: Store>(store: &Arc<S>) {
    let rtype = ResourceType::HealthcareService;
    let id = unique_id("hist");
    let other = unique_id("hist-other");
    let mut versions = Vec::new();
    for i in 0..3 {
        versions.push(
            create(
                store,
                put(rtype, &id, json!({"name": format!("v{i}")}), vec![]),
            )
            .await,
        );
        sleep_ms(2).await;
        create(store, put(rtype, &other, json!({}), vec![])).await;
        sleep_ms(2).await;
    }
    let did = id.clone();
    versions.push(
        store
            .write(move |tx| tx.delete(rtype, &did, None))
            .await
            .unwrap()
            .unwrap(),
    );
    sleep_ms(2).await;
    versions.push(create(store, put(rtype, &id, json!({"name": "back"}), vec![])).await);
    let newest_first: Vec<Stored> = versions.iter().rev().cloned().collect();

    let q = HistoryQuery {
        rtype,
        id: Some(id.clone()),
        since_ms: None,
        count: 100,
        offset: 0,
    };
    let h = store.history(&q).await.unwrap();
    assert_eq!(
        h.resources, newest_first,
        "history of one resource: every version, tombstone included, newest first"
    );
    assert_eq!(h.total, Some(5), "history total");

    let h = store
        .history(&HistoryQuery {
            count: 2,
            offset: 1,
            ..q.clone()
        })
        .await
        .unwrap();
    assert_eq!(
        h.resources,
        newest_first[1..3].to_vec(),
        "history page count=2 offset=1"
    );
    assert_eq!(h.total, Some(5), "history total ignores paging");
    let h = store
        .history(&HistoryQuery {
            count: 0,
            ..q.clone()
        })
        .await
        .unwrap();
    assert!(h.resources.is_empty(), "count=0 returns no versions");
    assert_eq!(h.total, Some(5));
    let h = store
        .history(&HistoryQuery {
            offset: 10,
            ..q.clone()
        })
        .await
        .unwrap();
    assert!(h.resources.is_empty(), "offset past the end");

    let since = versions[2].last_updated_ms;
    let h = store
        .history(&HistoryQuery {
            since_ms: Some(since),
            ..q.clone()
        })
        .await
        .unwrap();
    assert_eq!(
        h.resources,
        newest_first[..3].to_vec(),
        "since_ms keeps versions updated at or after it"
    );
    assert_eq!(h.total, Some(3));

    let missing = HistoryQuery {
        id: Some(unique_id("hist-missing")),
        ..q.clone()
    };
    let h = store.history(&missing).await.unwrap();
    assert!(
        h.resources.is_empty(),
        "history of a never-created resource is empty"
    );

    // Whole type: newest first; ours interleaved with `other`.
    let tq = HistoryQuery {
        rtype,
        id: None,
        since_ms: Some(versions[0].last_updated_ms),
        count: 1000,
        offset: 0,
    };
    let h = store.history(&tq).await.unwrap();
    let total = h.total.expect("type history has a total");
    assert!(
        total >= 8,
        "type history total counts every version of the type since since_ms (got {total})"
    );
    assert!(
        h.resources.iter().all(|s| s.rtype == rtype),
        "type history only has that type"
    );
    assert!(
        h.resources
            .windows(2)
            .all(|w| w[0].last_updated_ms >= w[1].last_updated_ms),
        "type history is newest first"
    );
    let ours: Vec<Stored> = h.resources.iter().filter(|s| s.id == id).cloned().collect();
    assert_eq!(
        ours, newest_first,
        "type history contains every version of the resource, newest first"
    );
    assert_eq!(
        h.resources.iter().filter(|s| s.id == other).count(),
        3,
        "type history has the other resource's versions"
    );
    let page = store
        .history(&HistoryQuery {
            count: 3,
            offset: 2,
            ..tq.clone()
        })
        .await
        .unwrap();
    assert_eq!(
        page.resources,
        h.resources[2..5].to_vec(),
        "type history paging"
    );
}

/// Every predicate kind except dates (see [`date_and_last_updated_prefixes`]); AND of clauses, OR of
/// alternatives; index rows replaced on update and removed on delete.
pub async fn search_predicates<S: Store>(store: &Arc<S>) {
    let scope = unique_id("sp");
    let (a, b, gsys) = (
        "urn:sys:a",
        "urn:sys:b",
        "http://hl7.org/fhir/administrative-gender",
    );
    let p1 = unique_id("sp-1");
    let p2 = unique_id("sp-2");
    let p3 = unique_id("sp-3");
    let p4 = unique_id("sp-4");
    create(
        store,
        patient(
            &p1,
            vec![
                tag(&scope),
                tok("identifier", Some(a), "111"),
                tok("gender", Some(gsys), "female"),
                string("name", "smith"),
                string("name", "anna"),
                reference("general-practitioner", "Practitioner/1"),
            ],
        ),
    )
    .await;
    create(
        store,
        patient(
            &p2,
            vec![
                tag(&scope),
                tok("identifier", Some(b), "111"),
                tok("identifier", None, "222"),
                tok("gender", Some(gsys), "male"),
                string("name", "smithe"),
                reference("general-practitioner", "Practitioner/2"),
                reference("general-practitioner", "Practitioner/1"),
            ],
        ),
    )
    .await;
    create(
        store,
        patient(
            &p3,
            vec![
                tag(&scope),
                tok("identifier", None, "333"),
                string("name", "zo\u{eb}"),
                string("name", "smiti"),
                reference("organization", "Organization/1"),
            ],
        ),
    )
    .await;
    create(
        store,
        patient(
            &p4,
            vec![
                tag(&scope),
                string("name", "smi"),
                string("name", "sm"),
                string_sent("name", "o'brien", "O'Brien"),
            ],
        ),
    )
    .await;
    // Same values on another type must never leak into Patient searches.
    let prac = unique_id("sp-prac");
    create(
        store,
        put(
            ResourceType::Practitioner,
            &prac,
            json!({}),
            vec![tag(&scope), tok("identifier", Some(a), "111")],
        ),
    )
    .await;

    let q = |param: &str, p: Predicate| scoped(ResourceType::Patient, &scope).with(param, p);
    let token = |system: Option<&str>, code: Option<&str>| Predicate::Token {
        system: system.map(str::to_string),
        code: code.map(str::to_string),
    };
    let s = |v: &str| Predicate::String {
        value: v.to_string(),
        exact: None,
    };
    let exact = |v: &str| Predicate::String {
        value: v.to_string(),
        exact: Some(v.to_string()),
    };

    let cases: Vec<(&str, SearchQuery, BTreeSet<String>)> = vec![
        (
            "only the tag",
            scoped(ResourceType::Patient, &scope),
            set(&[&p1, &p2, &p3, &p4]),
        ),
        (
            "token code, any system",
            q("identifier", token(None, Some("111"))),
            set(&[&p1, &p2]),
        ),
        (
            "token system|code",
            q("identifier", token(Some(a), Some("111"))),
            set(&[&p1]),
        ),
        (
            "token system|code other system",
            q("identifier", token(Some(b), Some("111"))),
            set(&[&p2]),
        ),
        (
            "token |code (no system)",
            q("identifier", token(Some(""), Some("222"))),
            set(&[&p2]),
        ),
        (
            "token |code does not match a value with a system",
            q("identifier", token(Some(""), Some("111"))),
            set(&[]),
        ),
        (
            "token system| (any code)",
            q("identifier", token(Some(b), None)),
            set(&[&p2]),
        ),
        (
            "token | (no system, any code)",
            q("identifier", token(Some(""), None)),
            set(&[&p2, &p3]),
        ),
        (
            "token any system any code",
            q("identifier", token(None, None)),
            set(&[&p1, &p2, &p3]),
        ),
        (
            "token unknown code",
            q("identifier", token(None, Some("999"))),
            set(&[]),
        ),
        (
            "token other param",
            q("gender", token(None, Some("female"))),
            set(&[&p1]),
        ),
        (
            "token code of another param",
            q("gender", token(None, Some("111"))),
            set(&[]),
        ),
        ("string prefix", q("name", s("smith")), set(&[&p1, &p2])),
        (
            "string shorter prefix",
            q("name", s("smi")),
            set(&[&p1, &p2, &p3, &p4]),
        ),
        (
            "string prefix stops before the next code point",
            q("name", s("smiti")),
            set(&[&p3]),
        ),
        ("string exact", q("name", exact("smith")), set(&[&p1])),
        (
            "string exact matches the form as sent",
            q(
                "name",
                Predicate::String {
                    value: "o'brien".into(),
                    exact: Some("O'Brien".into()),
                },
            ),
            set(&[&p4]),
        ),
        (
            "string exact is not the normalised value",
            q("name", exact("o'brien")),
            set(&[]),
        ),
        (
            "string prefix matches the normalised value",
            q("name", s("o'b")),
            set(&[&p4]),
        ),
        ("string exact no match", q("name", exact("smit")), set(&[])),
        ("string non-ASCII prefix", q("name", s("zo")), set(&[&p3])),
        (
            "string non-ASCII exact",
            q("name", exact("zo\u{eb}")),
            set(&[&p3]),
        ),
        (
            "string non-ASCII is not ASCII",
            q("name", s("zoe")),
            set(&[]),
        ),
        ("string second value", q("name", s("ann")), set(&[&p1])),
        (
            "string empty prefix matches any value",
            q("name", s("")),
            set(&[&p1, &p2, &p3, &p4]),
        ),
        (
            "reference",
            q(
                "general-practitioner",
                Predicate::Reference("Practitioner/1".into()),
            ),
            set(&[&p1, &p2]),
        ),
        (
            "reference other",
            q(
                "general-practitioner",
                Predicate::Reference("Practitioner/2".into()),
            ),
            set(&[&p2]),
        ),
        (
            "reference is exact",
            q(
                "general-practitioner",
                Predicate::Reference("Practitioner/".into()),
            ),
            set(&[]),
        ),
        (
            "reference of another param",
            q(
                "organization",
                Predicate::Reference("Organization/1".into()),
            ),
            set(&[&p3]),
        ),
        ("_id", q("_id", Predicate::Id(p2.clone())), set(&[&p2])),
        (
            "_id of another type",
            q("_id", Predicate::Id(prac.clone())),
            set(&[]),
        ),
        (
            "AND of clauses",
            q("identifier", token(None, Some("111"))).with("name", s("smithe")),
            set(&[&p2]),
        ),
        (
            "AND of clauses, empty",
            q("identifier", token(None, Some("111"))).with(
                "organization",
                Predicate::Reference("Organization/1".into()),
            ),
            set(&[]),
        ),
        (
            "same parameter twice (AND)",
            q("name", s("smi")).with("name", s("zo")),
            set(&[&p3]),
        ),
    ];
    for (what, query, expected) in &cases {
        assert_eq!(&search_set(store, query).await, expected, "search: {what}");
    }

    // OR of alternatives within a clause, mixing kinds.
    let mut or = scoped(ResourceType::Patient, &scope);
    or.clauses.push(Clause {
        param: "identifier".into(),
        any_of: vec![
            token(Some(a), Some("111")),
            token(None, Some("333")),
            token(None, Some("nope")),
        ],
    });
    assert_eq!(
        search_set(store, &or).await,
        set(&[&p1, &p3]),
        "search: OR of token alternatives"
    );
    let mut or_ids = scoped(ResourceType::Patient, &scope);
    or_ids.clauses.push(Clause {
        param: "_id".into(),
        any_of: vec![Predicate::Id(p1.clone()), Predicate::Id(p4.clone())],
    });
    assert_eq!(
        search_set(store, &or_ids).await,
        set(&[&p1, &p4]),
        "search: OR of _id alternatives"
    );
    let mut or_strings = scoped(ResourceType::Patient, &scope);
    or_strings.clauses.push(Clause {
        param: "name".into(),
        any_of: vec![exact("anna"), s("zo"), exact("sm")],
    });
    assert_eq!(
        search_set(store, &or_strings).await,
        set(&[&p1, &p3, &p4]),
        "search: OR of string alternatives"
    );

    // Another type's search with the same tag sees only its own type.
    assert_eq!(
        search_set(
            store,
            &scoped(ResourceType::Practitioner, &scope)
                .with("identifier", token(Some(a), Some("111")))
        )
        .await,
        set(&[&prac]),
        "search is per resource type"
    );

    // Update replaces index rows; delete removes them.
    create(
        store,
        patient(
            &p1,
            vec![
                tag(&scope),
                tok("identifier", Some(a), "444"),
                string("name", "jones"),
            ],
        ),
    )
    .await;
    assert_eq!(
        search_set(store, &q("identifier", token(Some(a), Some("111")))).await,
        set(&[]),
        "old token after update"
    );
    assert_eq!(
        search_set(store, &q("identifier", token(Some(a), Some("444")))).await,
        set(&[&p1]),
        "new token after update"
    );
    assert_eq!(
        search_set(store, &q("name", s("smith"))).await,
        set(&[&p2]),
        "old string after update"
    );
    assert_eq!(
        search_set(store, &q("name", s("jo"))).await,
        set(&[&p1]),
        "new string after update"
    );
    assert_eq!(
        search_set(
            store,
            &q(
                "general-practitioner",
                Predicate::Reference("Practitioner/1".into())
            )
        )
        .await,
        set(&[&p2]),
        "old reference after update"
    );
    let did = p2.clone();
    store
        .write(move |tx| tx.delete(ResourceType::Patient, &did, None))
        .await
        .unwrap();
    assert_eq!(
        search_set(store, &q("identifier", token(None, Some("222")))).await,
        set(&[]),
        "token after delete"
    );
    assert_eq!(
        search_set(store, &q("name", s("smi"))).await,
        set(&[&p3, &p4]),
        "string after delete"
    );
    assert_eq!(
        search_set(store, &scoped(ResourceType::Patient, &scope)).await,
        set(&[&p1, &p3, &p4]),
        "tag after delete"
    );
}

/// FHIR's rule for an indexed range `[low, high]` against a query range `[qlo, qhi]` (what the backends
/// must implement; `_lastUpdated` uses it with `low == high`).
pub fn date_matches(cmp: Cmp, low: i64, high: i64, qlo: i64, qhi: i64) -> bool {
    let eq = low >= qlo && high <= qhi;
    match cmp {
        Cmp::Eq => eq,
        Cmp::Ne => !eq,
        Cmp::Gt => high > qhi,
        Cmp::Lt => low < qlo,
        Cmp::Ge => high >= qlo,
        Cmp::Le => low <= qhi,
        Cmp::Sa => low > qhi,
        Cmp::Eb => high < qlo,
        Cmp::Ap => low <= qhi && high >= qlo,
    }
}

/// Every comparison prefix on a date parameter (resources with one or several ranges) and on `_lastUpdated`.
/// Appointment `patient` and `practitioner` are answered from the `actor` rows (`fhir::stored_as`), after
/// an update too, and only for targets of their own type.
pub async fn references_stored_as_another<S: Store>(store: &Arc<S>) {
    let scope = unique_id("stored-as");
    let a = unique_id("sa-appt");
    let (pat, prac) = (unique_id("sa-pat"), unique_id("sa-prac"));
    let entries = |patient: &str| {
        vec![
            tag(&scope),
            reference("patient", &format!("Patient/{patient}")),
            reference("practitioner", &format!("Practitioner/{prac}")),
            reference("actor", &format!("Patient/{patient}")),
            reference("actor", &format!("Practitioner/{prac}")),
        ]
    };
    create(
        store,
        put(ResourceType::Appointment, &a, json!({}), entries(&pat)),
    )
    .await;
    let q = |param: &str, target: String| {
        scoped(ResourceType::Appointment, &scope).with(param, Predicate::Reference(target))
    };
    let one = vec![a.clone()];
    let none: Vec<String> = Vec::new();
    assert_eq!(
        search_ids(store, &q("patient", format!("Patient/{pat}"))).await,
        one
    );
    assert_eq!(
        search_ids(store, &q("practitioner", format!("Practitioner/{prac}"))).await,
        one
    );
    assert_eq!(
        search_ids(store, &q("actor", format!("Practitioner/{prac}"))).await,
        one
    );
    assert_eq!(
        search_ids(store, &q("patient", format!("Practitioner/{prac}"))).await,
        none,
        "patient never finds a practitioner actor"
    );
    assert_eq!(
        search_ids(store, &q("location", format!("Practitioner/{prac}"))).await,
        none
    );
    // The patient changes: the old one no longer finds it, the new one does.
    let other = unique_id("sa-pat2");
    store
        .write({
            let p = put(ResourceType::Appointment, &a, json!({}), entries(&other));
            move |tx| tx.put(p)
        })
        .await
        .unwrap_or_else(|e| panic!("update: {e}"));
    assert_eq!(
        search_ids(store, &q("patient", format!("Patient/{pat}"))).await,
        none
    );
    assert_eq!(
        search_ids(store, &q("patient", format!("Patient/{other}"))).await,
        one
    );
}

pub async fn date_and_last_updated_prefixes<S: Store>(store: &Arc<S>) {
    let scope = unique_id("dt");
    let ranges: Vec<Vec<(i64, i64)>> = vec![
        vec![(100, 199)],
        vec![(150, 150)],
        vec![(200, 299)],
        vec![(0, 1000)],
        vec![(250, 260)],
        vec![(100, 110), (500, 510)],
        vec![(-500, -400)],
        vec![],
    ];
    let mut ids = Vec::new();
    let mut stored = Vec::new();
    for (i, rs) in ranges.iter().enumerate() {
        let id = unique_id(&format!("dt-{i}"));
        let mut index = vec![tag(&scope)];
        index.extend(rs.iter().map(|&(lo, hi)| date("start", lo, hi)));
        // A second date parameter must not interfere.
        index.push(date("end", 5000, 5000));
        stored.push(
            create(
                store,
                put(
                    ResourceType::Slot,
                    &id,
                    json!({"resourceType": "Slot"}),
                    index,
                ),
            )
            .await,
        );
        ids.push(id);
        sleep_ms(2).await;
    }
    let queries = [
        (100, 199),
        (150, 250),
        (200, 200),
        (300, 400),
        (0, 50),
        (150, 150),
        (-450, -450),
        (-1000, 2000),
    ];
    for cmp in ALL_CMPS {
        for &(qlo, qhi) in &queries {
            let expected: BTreeSet<String> = ranges
                .iter()
                .zip(&ids)
                .filter(|(rs, _)| {
                    rs.iter()
                        .any(|&(lo, hi)| date_matches(cmp, lo, hi, qlo, qhi))
                })
                .map(|(_, id)| id.clone())
                .collect();
            let q = scoped(ResourceType::Slot, &scope).with(
                "start",
                Predicate::Date {
                    cmp,
                    low_ms: qlo,
                    high_ms: qhi,
                },
            );
            assert_eq!(
                search_set(store, &q).await,
                expected,
                "date search {cmp:?} [{qlo}, {qhi}]"
            );
        }
    }
    // Two date clauses ANDed (a range search) and two alternatives ORed.
    let q = scoped(ResourceType::Slot, &scope)
        .with(
            "start",
            Predicate::Date {
                cmp: Cmp::Ge,
                low_ms: 120,
                high_ms: 120,
            },
        )
        .with(
            "start",
            Predicate::Date {
                cmp: Cmp::Lt,
                low_ms: 255,
                high_ms: 255,
            },
        );
    let expected: BTreeSet<String> = ranges
        .iter()
        .zip(&ids)
        .filter(|(rs, _)| {
            rs.iter()
                .any(|&(lo, hi)| date_matches(Cmp::Ge, lo, hi, 120, 120))
                && rs
                    .iter()
                    .any(|&(lo, hi)| date_matches(Cmp::Lt, lo, hi, 255, 255))
        })
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(
        search_set(store, &q).await,
        expected,
        "date range: ge AND lt"
    );
    let mut q = scoped(ResourceType::Slot, &scope);
    q.clauses.push(Clause {
        param: "start".into(),
        any_of: vec![
            Predicate::Date {
                cmp: Cmp::Eq,
                low_ms: 150,
                high_ms: 150,
            },
            Predicate::Date {
                cmp: Cmp::Sa,
                low_ms: 400,
                high_ms: 400,
            },
        ],
    });
    assert_eq!(
        search_set(store, &q).await,
        set(&[&ids[1], &ids[5]]),
        "date alternatives ORed"
    );

    // _lastUpdated: each resource's instant is a point.
    let points: Vec<i64> = stored.iter().map(|s| s.last_updated_ms).collect();
    let (first, mid, last) = (points[0], points[3], points[points.len() - 1]);
    let lu_queries = [
        (mid, mid),
        (first, mid),
        (mid, last),
        (first - 10, first - 1),
        (last + 1, last + 10),
    ];
    for cmp in ALL_CMPS {
        for &(qlo, qhi) in &lu_queries {
            let expected: BTreeSet<String> = points
                .iter()
                .zip(&ids)
                .filter(|(p, _)| date_matches(cmp, **p, **p, qlo, qhi))
                .map(|(_, id)| id.clone())
                .collect();
            let q = scoped(ResourceType::Slot, &scope).with(
                "_lastUpdated",
                Predicate::LastUpdated {
                    cmp,
                    low_ms: qlo,
                    high_ms: qhi,
                },
            );
            assert_eq!(
                search_set(store, &q).await,
                expected,
                "_lastUpdated {cmp:?} [{qlo}, {qhi}]"
            );
        }
    }
}

/// Sorting by id, lastUpdated and a parameter (smallest value, missing last), ties by id; stable paging;
/// totals.
pub async fn sorting_and_paging<S: Store>(store: &Arc<S>) {
    let scope = unique_id("sort");
    // (names, birth date low) per resource; ids are created in an order unrelated to the values.
    let data: Vec<(Vec<&str>, Option<i64>)> = vec![
        (vec!["miller"], Some(300)),
        (vec!["zed", "adams"], Some(100)),
        (vec![], Some(200)),
        (vec!["brown"], None),
        (vec!["miller"], Some(100)),
        (vec![], None),
        (vec!["clark"], Some(250)),
        (vec!["adams"], Some(300)),
        (vec!["miller"], Some(50)),
        (vec!["young"], None),
        (vec!["brown", "young"], Some(200)),
    ];
    /// (id, smallest name, birth date low, last updated)
    type Row = (String, Option<String>, Option<i64>, i64);
    let mut rows: Vec<Row> = Vec::new();
    for (i, (names, birth)) in data.iter().enumerate() {
        let id = unique_id(&format!("sort-{}", (i * 7) % 11));
        let mut index = vec![tag(&scope)];
        index.extend(names.iter().map(|n| string("name", n)));
        index.extend(birth.iter().map(|&b| date("birthdate", b, b + 10)));
        let s = create(store, patient(&id, index)).await;
        rows.push((
            id,
            names.iter().min().map(|s| s.to_string()),
            *birth,
            s.last_updated_ms,
        ));
        sleep_ms(1).await;
    }
    let n = rows.len();
    let ids_by = |mut v: Vec<&Row>, key: &dyn Fn(&Row, &Row) -> std::cmp::Ordering| {
        v.sort_by(|a, b| key(a, b).then_with(|| a.0.cmp(&b.0)));
        v.into_iter().map(|r| r.0.clone()).collect::<Vec<String>>()
    };
    fn nulls_last<T: Ord>(a: &Option<T>, b: &Option<T>, desc: bool) -> std::cmp::Ordering {
        match (a, b) {
            (Some(x), Some(y)) => {
                if desc {
                    y.cmp(x)
                } else {
                    x.cmp(y)
                }
            }
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        }
    }
    let sorted = |field: SortField, descending: bool| {
        let mut q = scoped(ResourceType::Patient, &scope);
        q.sort = vec![Sort { field, descending }];
        q
    };
    let all: Vec<_> = rows.iter().collect();
    let cases: Vec<(&str, SearchQuery, Vec<String>)> = vec![
        (
            "default order (id)",
            scoped(ResourceType::Patient, &scope),
            ids_by(all.clone(), &|_, _| std::cmp::Ordering::Equal),
        ),
        (
            "_id",
            sorted(SortField::Id, false),
            ids_by(all.clone(), &|_, _| std::cmp::Ordering::Equal),
        ),
        (
            "-_id",
            sorted(SortField::Id, true),
            ids_by(all.clone(), &|a, b| b.0.cmp(&a.0)),
        ),
        (
            "_lastUpdated",
            sorted(SortField::LastUpdated, false),
            ids_by(all.clone(), &|a, b| a.3.cmp(&b.3)),
        ),
        (
            "-_lastUpdated",
            sorted(SortField::LastUpdated, true),
            ids_by(all.clone(), &|a, b| b.3.cmp(&a.3)),
        ),
        (
            "name",
            sorted(SortField::Param("name".into()), false),
            ids_by(all.clone(), &|a, b| nulls_last(&a.1, &b.1, false)),
        ),
        (
            "-name",
            sorted(SortField::Param("name".into()), true),
            ids_by(all.clone(), &|a, b| nulls_last(&a.1, &b.1, true)),
        ),
        (
            "birthdate",
            sorted(SortField::Param("birthdate".into()), false),
            ids_by(all.clone(), &|a, b| nulls_last(&a.2, &b.2, false)),
        ),
        (
            "-birthdate",
            sorted(SortField::Param("birthdate".into()), true),
            ids_by(all.clone(), &|a, b| nulls_last(&a.2, &b.2, true)),
        ),
        (
            "name,-birthdate",
            {
                let mut q = sorted(SortField::Param("name".into()), false);
                q.sort.push(Sort {
                    field: SortField::Param("birthdate".into()),
                    descending: true,
                });
                q
            },
            ids_by(all.clone(), &|a, b| {
                nulls_last(&a.1, &b.1, false).then_with(|| nulls_last(&a.2, &b.2, true))
            }),
        ),
    ];
    for (what, q, expected) in &cases {
        assert_eq!(expected.len(), n);
        assert_eq!(&search_ids(store, q).await, expected, "sort {what}");
        // Paging: pages of 3 put together give the same order; totals ignore paging.
        let mut paged = Vec::new();
        for offset in (0..n + 3).step_by(3) {
            let page = SearchQuery {
                count: 3,
                offset,
                want_total: true,
                ..q.clone()
            };
            let r = store.search(&page).await.unwrap();
            assert_eq!(
                r.total,
                Some(n as u64),
                "total with sort {what}, offset {offset}"
            );
            assert!(r.resources.len() <= 3, "page larger than count");
            paged.extend(r.resources.into_iter().map(|s| s.id));
        }
        assert_eq!(&paged, expected, "pages of 3 with sort {what}");
    }

    let filtered = scoped(ResourceType::Patient, &scope).with(
        "name",
        Predicate::String {
            value: "miller".into(),
            exact: Some("miller".into()),
        },
    );
    let r = store
        .search(&SearchQuery {
            count: 0,
            want_total: true,
            ..filtered.clone()
        })
        .await
        .unwrap();
    assert!(r.resources.is_empty(), "count=0 returns no resources");
    assert_eq!(r.total, Some(3), "count=0 with want_total still counts");
    let r = store
        .search(&SearchQuery {
            count: 2,
            want_total: false,
            ..filtered.clone()
        })
        .await
        .unwrap();
    assert_eq!(r.resources.len(), 2);
    assert_eq!(r.total, None, "no total unless asked");
    let r = store
        .search(&SearchQuery {
            offset: 50,
            want_total: true,
            ..filtered
        })
        .await
        .unwrap();
    assert!(r.resources.is_empty(), "offset past the end");
    assert_eq!(r.total, Some(3));
}

/// Writes that fail roll back only their own changes, even when committed in the same batch as others.
pub async fn savepoint_isolation<S: Store>(store: &Arc<S>) {
    let scope = unique_id("iso");
    let subject = format!("Patient/{}", unique_id("iso-subject"));
    let ids: Vec<String> = (0..50).map(|i| unique_id(&format!("iso-{i}"))).collect();
    let results = concurrently(store, 50, |i| {
        let (id, scope, subject) = (ids[i].clone(), scope.clone(), subject.clone());
        move |tx: &mut dyn crate::Tx| {
            let s = tx.put(patient(&id, vec![tag(&scope)]))?;
            tx.append_event(NewEvent {
                subject,
                kind: "patient.registered".into(),
                rtype: ResourceType::Patient,
                id: id.clone(),
                version: s.version,
                data: Value::Null,
            })?;
            tx.idempotency_put(IdempotencyRecord {
                key: format!("iso-{id}"),
                request_hash: "h".into(),
                status: 201,
                headers: vec![],
                body: String::new(),
                created_ms: tx.now_ms(),
            })?;
            if i % 5 == 4 {
                return Err(StoreError::Conflict(format!("write {i} refuses")));
            }
            Ok(s)
        }
    })
    .await;
    for (i, r) in results.iter().enumerate() {
        if i % 5 == 4 {
            assert!(
                matches!(r, Err(StoreError::Conflict(m)) if m == &format!("write {i} refuses")),
                "write {i}: {r:?}"
            );
            assert_eq!(
                store.read(ResourceType::Patient, &ids[i]).await.unwrap(),
                None,
                "failed write {i} left its resource"
            );
        } else {
            let s = r
                .as_ref()
                .unwrap_or_else(|e| panic!("write {i} failed: {e}"));
            assert_eq!(
                store
                    .read(ResourceType::Patient, &ids[i])
                    .await
                    .unwrap()
                    .as_ref(),
                Some(s),
                "write {i} persisted"
            );
        }
    }
    let found = search_set(store, &scoped(ResourceType::Patient, &scope)).await;
    let expected: BTreeSet<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 5 != 4)
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(found, expected, "exactly the successful writes persisted");
    let events = events_of(store, &subject).await;
    assert_eq!(events.len(), 40, "one event per successful write");
    assert_eq!(
        events.iter().map(|e| e.subject_seq).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>(),
        "gap-free subject_seq"
    );
    let event_ids: BTreeSet<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(event_ids, expected, "events of failed writes vanished");
    for (i, id) in ids.iter().enumerate() {
        let key = format!("iso-{id}");
        let id_clone = key.clone();
        let rec = store
            .write(move |tx| tx.idempotency_get(&id_clone))
            .await
            .unwrap();
        assert_eq!(rec.is_some(), i % 5 != 4, "idempotency record of write {i}");
    }

    // Concurrent updates of one resource, some failing: versions stay contiguous.
    let shared = unique_id("iso-shared");
    create(store, patient(&shared, vec![])).await;
    let results = concurrently(store, 20, |i| {
        let shared = shared.clone();
        move |tx: &mut dyn crate::Tx| {
            let s = tx.put(patient(&shared, vec![]))?;
            if i % 3 == 0 {
                return Err(StoreError::Conflict("no".into()));
            }
            Ok(s.version)
        }
    })
    .await;
    let mut versions: Vec<u64> = results.into_iter().filter_map(Result::ok).collect();
    versions.sort_unstable();
    let ok = versions.len() as u64;
    assert_eq!(
        versions,
        (2..=ok + 1).collect::<Vec<_>>(),
        "successful updates got contiguous versions"
    );
    assert_eq!(
        store
            .read(ResourceType::Patient, &shared)
            .await
            .unwrap()
            .map(|s| s.version),
        Some(ok + 1)
    );
    for v in 1..=ok + 1 {
        assert!(
            store
                .vread(ResourceType::Patient, &shared, v)
                .await
                .unwrap()
                .is_some(),
            "vread {v} of the shared resource"
        );
    }
    assert!(
        store
            .vread(ResourceType::Patient, &shared, ok + 2)
            .await
            .unwrap()
            .is_none(),
        "no version from failed writes"
    );
}

/// 200 concurrent creates all persist.
pub async fn concurrent_creates<S: Store>(store: &Arc<S>) {
    let scope = unique_id("cc");
    let ids: Vec<String> = (0..200).map(|i| unique_id(&format!("cc-{i}"))).collect();
    let results = concurrently(store, 200, |i| {
        let (id, scope) = (ids[i].clone(), scope.clone());
        move |tx: &mut dyn crate::Tx| {
            tx.put(patient(
                &id,
                vec![tag(&scope), tok("identifier", Some("urn:cc"), &id)],
            ))
        }
    })
    .await;
    for (i, r) in results.into_iter().enumerate() {
        let s = r.unwrap_or_else(|e| panic!("concurrent create {i} failed: {e}"));
        assert_eq!((s.id.as_str(), s.version), (ids[i].as_str(), 1));
    }
    let q = SearchQuery {
        count: 0,
        want_total: true,
        ..scoped(ResourceType::Patient, &scope)
    };
    assert_eq!(
        store.search(&q).await.unwrap().total,
        Some(200),
        "all 200 concurrent creates are searchable"
    );
    for id in &ids {
        let q = SearchQuery::new(ResourceType::Patient).with(
            "identifier",
            Predicate::Token {
                system: Some("urn:cc".into()),
                code: Some(id.clone()),
            },
        );
        assert_eq!(
            search_ids(store, &q).await,
            vec![id.clone()],
            "identifier search for {id}"
        );
    }
}

/// Conditional create (search, then create only if nothing matched) from 20 concurrent tasks creates exactly one.
pub async fn concurrent_conditional_creates<S: Store>(store: &Arc<S>) {
    let ident = unique_id("cond");
    let results = concurrently(store, 20, |i| {
        let ident = ident.clone();
        move |tx: &mut dyn crate::Tx| {
            let q = SearchQuery::new(ResourceType::Patient).with(
                "identifier",
                Predicate::Token {
                    system: Some("urn:cond".into()),
                    code: Some(ident.clone()),
                },
            );
            if tx.search(&q)?.is_empty() {
                let id = format!("{ident}-{i}");
                tx.put(patient(
                    &id,
                    vec![tok("identifier", Some("urn:cond"), &ident)],
                ))?;
                Ok(Some(id))
            } else {
                Ok(None)
            }
        }
    })
    .await;
    let created: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.expect("conditional create"))
        .collect();
    assert_eq!(
        created.len(),
        1,
        "exactly one conditional create wins, got {created:?}"
    );
    let q = SearchQuery::new(ResourceType::Patient).with(
        "identifier",
        Predicate::Token {
            system: Some("urn:cond".into()),
            code: Some(ident.clone()),
        },
    );
    assert_eq!(
        search_ids(store, &q).await,
        created,
        "exactly one resource with the identifier"
    );
}

/// A search a write told ahead ([`crate::ReadAhead::searches`]) answers exactly as one not told: it sees
/// what the writes before it (in its group commit or earlier) did. Conditional creates from 20 concurrent
/// tasks, each telling its search ahead, create exactly one. Then, 30 times without telling and 30 times
/// telling, a write that changes what the search finds (moves the one match to another identifier, deletes
/// it, or creates a second match) runs beside a write that searches; the searching write must see the
/// other's change if, and only if, the other ran before it (both closures run on the store's writer, one
/// after the other).
pub async fn searches_told_ahead<S: Store>(store: &Arc<S>) {
    use std::sync::atomic::AtomicBool;
    let query = |code: &str| {
        let mut q = SearchQuery::new(ResourceType::Patient).with(
            "identifier",
            Predicate::Token {
                system: Some("urn:ahead".into()),
                code: Some(code.to_string()),
            },
        );
        q.count = 100;
        q
    };
    let told = |q: &SearchQuery| crate::ReadAhead {
        searches: vec![q.clone()],
        ..crate::ReadAhead::default()
    };

    let ident = unique_id("ahead");
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let (s, q, ident) = (store.clone(), query(&ident), ident.clone());
            tokio::spawn(async move {
                s.write_reading(told(&q), move |tx| {
                    if tx.search(&q)?.is_empty() {
                        let id = format!("{ident}-{i}");
                        tx.put(patient(
                            &id,
                            vec![tok("identifier", Some("urn:ahead"), &ident)],
                        ))?;
                        Ok(Some(id))
                    } else {
                        Ok(None)
                    }
                })
                .await
            })
        })
        .collect();
    let mut created = Vec::new();
    for h in handles {
        if let Some(id) = h
            .await
            .expect("a write task panicked")
            .expect("conditional create")
        {
            created.push(id);
        }
    }
    assert_eq!(
        created.len(),
        1,
        "exactly one conditional create told ahead wins: {created:?}"
    );
    assert_eq!(search_ids(store, &query(&ident)).await, created);

    // A search told ahead that the backend refuses (a NUL in a value) fails its own write at most: the
    // writes beside it, in the same group commit or not, succeed.
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let s = store.clone();
            let q = query(&if i == 5 {
                "bad\0code".to_string()
            } else {
                unique_id("ahead-ok")
            });
            tokio::spawn(async move {
                s.write_reading(told(&q), move |tx| {
                    let found = tx.search(&q)?;
                    tx.put(patient(&unique_id("ahead-nul"), Vec::new()))?;
                    Ok(found.len())
                })
                .await
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.await.expect("a write task panicked");
        if i != 5 {
            assert_eq!(r.expect("a write beside a refused search"), 0);
        }
    }

    for (told_ahead, round) in [false, true]
        .into_iter()
        .flat_map(|t| (0..30).map(move |r| (t, r)))
    {
        let code = unique_id("ahead-r");
        let x = format!("{code}-x");
        create(
            store,
            patient(&x, vec![tok("identifier", Some("urn:ahead"), &code)]),
        )
        .await;
        let changed = Arc::new(AtomicBool::new(false));
        let change = {
            let (s, changed, code, x) = (store.clone(), changed.clone(), code.clone(), x.clone());
            tokio::spawn(async move {
                s.write(move |tx| {
                    match round % 3 {
                        0 => {
                            tx.put(patient(
                                &x,
                                vec![tok("identifier", Some("urn:ahead"), "elsewhere")],
                            ))?;
                        }
                        1 => {
                            tx.delete(ResourceType::Patient, &x, None)?;
                        }
                        _ => {
                            let y = format!("{code}-y");
                            tx.put(patient(
                                &y,
                                vec![tok("identifier", Some("urn:ahead"), &code)],
                            ))?;
                        }
                    }
                    changed.store(true, Ordering::SeqCst);
                    Ok(())
                })
                .await
            })
        };
        let search = {
            let (s, changed, q) = (store.clone(), changed.clone(), query(&code));
            let ahead = if told_ahead {
                told(&q)
            } else {
                crate::ReadAhead::default()
            };
            tokio::spawn(async move {
                s.write_reading(ahead, move |tx| {
                    let after = changed.load(Ordering::SeqCst);
                    let mut ids: Vec<String> = tx.search(&q)?.into_iter().map(|r| r.id).collect();
                    ids.sort();
                    Ok((after, ids))
                })
                .await
            })
        };
        change.await.expect("task").expect("the change");
        let (after, ids) = search.await.expect("task").expect("the search");
        let expected: Vec<String> = match (after, round % 3) {
            (false, _) => vec![x.clone()],
            (true, 2) => vec![x.clone(), format!("{code}-y")],
            (true, _) => Vec::new(),
        };
        assert_eq!(
            ids,
            expected,
            "round {round} (told ahead: {told_ahead}): the search ran {} the change",
            if after { "after" } else { "before" }
        );
    }
}

async fn all_events<S: Store>(store: &Arc<S>) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    loop {
        let after = out.last().map_or(0, |e| e.seq);
        let page = store.events_after(after, 500).await.unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

async fn events_of<S: Store>(store: &Arc<S>, subject: &str) -> Vec<Event> {
    all_events(store)
        .await
        .into_iter()
        .filter(|e| e.subject == subject)
        .collect()
}

/// Events: stored as appended, atomic with their write, gap-free per subject; `events_after` paging.
pub async fn events<S: Store>(store: &Arc<S>) {
    let subject = format!("Appointment/{}", unique_id("ev"));
    let id = unique_id("ev-appt");
    // Decimal text and key order must survive.
    let data: Value =
        serde_json::from_str(r#"{"reason":"moved","z":1,"a":1.50,"nested":{"b":[true,null]}}"#)
            .unwrap();

    let (s, id2, data2, subj) = (subject.clone(), id.clone(), data.clone(), subject.clone());
    let (appended, second) = store
        .write(move |tx| {
            let st = tx.put(put(
                ResourceType::Appointment,
                &id2,
                json!({"status": "booked"}),
                vec![],
            ))?;
            let e = tx.append_event(NewEvent {
                subject: s.clone(),
                kind: "appointment.booked".into(),
                rtype: ResourceType::Appointment,
                id: id2.clone(),
                version: st.version,
                data: data2,
            })?;
            assert_eq!(
                e.time_ms,
                tx.now_ms(),
                "an event's time is the transaction's now_ms"
            );
            let e2 = tx.append_event(NewEvent {
                subject: s,
                kind: "appointment.noted".into(),
                rtype: ResourceType::Appointment,
                id: id2,
                version: st.version,
                data: Value::Null,
            })?;
            Ok((e, e2))
        })
        .await
        .unwrap();
    assert_eq!(appended.subject, subj);
    assert_eq!(
        (appended.subject_seq, second.subject_seq),
        (1, 2),
        "subject_seq starts at 1, no gaps"
    );
    assert!(second.seq > appended.seq, "seq increases");
    assert_eq!(appended.data, data);
    assert_eq!(appended.kind, "appointment.booked");
    assert_eq!(
        (appended.rtype, appended.id.as_str(), appended.version),
        (ResourceType::Appointment, id.as_str(), 1)
    );

    let stored = events_of(store, &subject).await;
    assert_eq!(
        stored,
        vec![appended.clone(), second.clone()],
        "events_after returns events exactly as appended"
    );
    assert_eq!(
        serde_json::to_string(&stored[0].data).unwrap(),
        r#"{"reason":"moved","z":1,"a":1.50,"nested":{"b":[true,null]}}"#,
        "event data is kept losslessly"
    );

    // A failed write's event vanishes, and does not consume a subject_seq.
    let (s, id2) = (subject.clone(), id.clone());
    let r: crate::Result<()> = store
        .write(move |tx| {
            tx.append_event(NewEvent {
                subject: s,
                kind: "appointment.cancelled".into(),
                rtype: ResourceType::Appointment,
                id: id2,
                version: 1,
                data: Value::Null,
            })?;
            Err(StoreError::Conflict("refused".into()))
        })
        .await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    assert_eq!(
        events_of(store, &subject).await.len(),
        2,
        "the failed write's event vanished"
    );
    let (s, id2) = (subject.clone(), id.clone());
    let third = store
        .write(move |tx| {
            tx.append_event(NewEvent {
                subject: s,
                kind: "appointment.cancelled".into(),
                rtype: ResourceType::Appointment,
                id: id2,
                version: 1,
                data: Value::Null,
            })
        })
        .await
        .unwrap();
    assert_eq!(third.subject_seq, 3, "a rolled-back event leaves no gap");
    assert!(third.seq > second.seq);

    // Paging through the whole outbox in small pages gives the same, strictly increasing sequence.
    let everything = store.events_after(0, 1_000_000).await.unwrap();
    assert!(
        everything.windows(2).all(|w| w[0].seq < w[1].seq),
        "events_after is ordered by seq"
    );
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let page = store.events_after(after, 7).await.unwrap();
        assert!(page.len() <= 7, "events_after honours limit");
        let Some(last) = page.last() else { break };
        after = last.seq;
        paged.extend(page);
    }
    assert_eq!(paged, everything, "paging with events_after");
    let from_second = store.events_after(appended.seq, 2).await.unwrap();
    assert_eq!(
        from_second.first(),
        Some(&second),
        "events_after is exclusive of `after`"
    );
    assert!(
        store
            .events_after(third.seq.max(everything.last().map_or(0, |e| e.seq)), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store.events_after(0, 0).await.unwrap().is_empty(),
        "limit 0"
    );
}

/// subject_seq is gap-free 1..n per subject when many writes append concurrently (some failing).
pub async fn events_concurrent_gap_free<S: Store>(store: &Arc<S>) {
    let subjects: Vec<String> = (0..3)
        .map(|i| format!("Slot/{}", unique_id(&format!("gap-{i}"))))
        .collect();
    let results = concurrently(store, 90, |i| {
        let subject = subjects[i % 3].clone();
        move |tx: &mut dyn crate::Tx| {
            let e = tx.append_event(NewEvent {
                subject,
                kind: "slot.updated".into(),
                rtype: ResourceType::Slot,
                id: format!("s{i}"),
                version: 1,
                data: json!({"i": i}),
            })?;
            if i % 7 == 0 {
                return Err(StoreError::Conflict("refused".into()));
            }
            Ok(e)
        }
    })
    .await;
    let mut acked: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for r in results.into_iter().flatten() {
        acked.entry(r.subject.clone()).or_default().push(r);
    }
    for subject in &subjects {
        let stored = events_of(store, subject).await;
        let n = (0..90)
            .filter(|i| subjects[i % 3] == *subject && i % 7 != 0)
            .count() as i64;
        assert_eq!(
            stored.iter().map(|e| e.subject_seq).collect::<Vec<_>>(),
            (1..=n).collect::<Vec<_>>(),
            "subject_seq of {subject} is 1..{n} in seq order"
        );
        let mut mine = acked.remove(subject).unwrap_or_default();
        mine.sort_by_key(|e| e.seq);
        assert_eq!(
            stored, mine,
            "stored events of {subject} are exactly the acknowledged ones"
        );
    }
}

/// Idempotency records: get/put inside writes, atomic with the write.
pub async fn idempotency<S: Store>(store: &Arc<S>) {
    let key = unique_id("idem");
    let k = key.clone();
    assert_eq!(
        store.write(move |tx| tx.idempotency_get(&k)).await.unwrap(),
        None,
        "unknown key"
    );
    let record = IdempotencyRecord {
        key: key.clone(),
        request_hash: "sha256:abc".into(),
        status: 201,
        headers: vec![
            ("Location".into(), "/fhir/Patient/1/_history/1".into()),
            ("ETag".into(), "W/\"1\"".into()),
            (
                "Content-Type".into(),
                "application/fhir+json; charset=utf-8".into(),
            ),
        ],
        body: r#"{"resourceType":"Patient","id":"1","x":1.50}"#.into(),
        created_ms: 1_700_000_000_123,
    };
    let r = record.clone();
    store.write(move |tx| tx.idempotency_put(r)).await.unwrap();
    let k = key.clone();
    assert_eq!(
        store.write(move |tx| tx.idempotency_get(&k)).await.unwrap(),
        Some(record),
        "stored record read back"
    );

    let failed = IdempotencyRecord {
        key: unique_id("idem-failed"),
        request_hash: "h".into(),
        status: 200,
        headers: vec![],
        body: String::new(),
        created_ms: 0,
    };
    let (r, k) = (failed.clone(), failed.key.clone());
    let res: crate::Result<()> = store
        .write(move |tx| {
            tx.idempotency_put(r)?;
            Err(StoreError::Conflict("no".into()))
        })
        .await;
    assert!(res.is_err());
    assert_eq!(
        store.write(move |tx| tx.idempotency_get(&k)).await.unwrap(),
        None,
        "a failed write's record vanished"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Named values

/// Named values: set, overwrite, remove; namespaces are separate; atomic with the write; visible inside it.
pub async fn kv<S: Store>(store: &Arc<S>) {
    let ns = unique_id("kv");
    let other = unique_id("kv-other");
    assert_eq!(
        store.kv_get(&ns, "cursor").await.unwrap(),
        None,
        "unknown key"
    );
    let n = ns.clone();
    let inside = store
        .write(move |tx| {
            let before = tx.kv_get(&n, "cursor")?;
            tx.kv_put(&n, "cursor", Some("41"))?;
            tx.kv_put(&n, "cursor", Some("42"))?;
            tx.kv_put(&n, "secret", Some("s\u{e9}cr\u{e8}t \"quoted\"\n"))?;
            Ok((before, tx.kv_get(&n, "cursor")?))
        })
        .await
        .unwrap();
    assert_eq!(
        inside,
        (None, Some("42".to_string())),
        "a write sees its own named values"
    );
    assert_eq!(
        store.kv_get(&ns, "cursor").await.unwrap().as_deref(),
        Some("42")
    );
    assert_eq!(
        store.kv_get(&ns, "secret").await.unwrap().as_deref(),
        Some("s\u{e9}cr\u{e8}t \"quoted\"\n"),
        "values are kept exactly"
    );
    assert_eq!(
        store.kv_get(&other, "cursor").await.unwrap(),
        None,
        "namespaces are separate"
    );
    let o = other.clone();
    store
        .write(move |tx| tx.kv_put(&o, "cursor", Some("")))
        .await
        .unwrap();
    assert_eq!(
        store.kv_get(&other, "cursor").await.unwrap().as_deref(),
        Some(""),
        "an empty value is a value"
    );
    assert_eq!(
        store.kv_get(&ns, "cursor").await.unwrap().as_deref(),
        Some("42")
    );

    // A failed write changes nothing, removals included.
    let n = ns.clone();
    let r: crate::Result<()> = store
        .write(move |tx| {
            tx.kv_put(&n, "cursor", Some("99"))?;
            tx.kv_put(&n, "secret", None)?;
            tx.kv_put(&n, "new", Some("x"))?;
            Err(StoreError::Conflict("refused".into()))
        })
        .await;
    assert!(matches!(r, Err(StoreError::Conflict(_))), "{r:?}");
    assert_eq!(
        store.kv_get(&ns, "cursor").await.unwrap().as_deref(),
        Some("42"),
        "a failed write's value vanished"
    );
    assert!(
        store.kv_get(&ns, "secret").await.unwrap().is_some(),
        "a failed write's removal vanished"
    );
    assert_eq!(store.kv_get(&ns, "new").await.unwrap(), None);

    // Removal, also of an absent key.
    let n = ns.clone();
    store
        .write(move |tx| {
            tx.kv_put(&n, "cursor", None)?;
            tx.kv_put(&n, "never-set", None)?;
            assert_eq!(tx.kv_get(&n, "cursor")?, None, "removed inside the write");
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(store.kv_get(&ns, "cursor").await.unwrap(), None, "removed");
    assert!(store.kv_get(&ns, "secret").await.unwrap().is_some());
}

// ---------------------------------------------------------------------------------------------------------
// Deliveries

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn delivery_event(subject: &str) -> NewEvent {
    NewEvent {
        subject: subject.to_string(),
        kind: "test.delivery".into(),
        rtype: ResourceType::Patient,
        id: unique_id("dlv"),
        version: 1,
        data: Value::Null,
    }
}

/// Append one event per subject, in order, in one write.
async fn append_events<S: Store>(store: &Arc<S>, subjects: &[&str]) -> Vec<Event> {
    let events: Vec<NewEvent> = subjects.iter().map(|s| delivery_event(s)).collect();
    store
        .write(move |tx| {
            events
                .into_iter()
                .map(|e| tx.append_event(e))
                .collect::<crate::Result<Vec<_>>>()
        })
        .await
        .unwrap()
}

/// Enqueue `events` to `subscription` in one write: (enqueued?, the write's now_ms).
async fn enqueue_all<S: Store>(
    store: &Arc<S>,
    subscription: &str,
    events: &[Event],
) -> (Vec<bool>, i64) {
    let (sub, events) = (subscription.to_string(), events.to_vec());
    store
        .write(move |tx| {
            let done = events
                .iter()
                .map(|e| tx.enqueue_delivery(&sub, e))
                .collect::<crate::Result<Vec<_>>>()?;
            Ok((done, tx.now_ms()))
        })
        .await
        .unwrap()
}

/// Apply `update` in its own write; returns the write's now_ms.
async fn set_delivery<S: Store>(
    store: &Arc<S>,
    subscription: &str,
    seq: i64,
    update: DeliveryUpdate,
) -> i64 {
    let sub = subscription.to_string();
    let what = format!("{update:?} of {subscription}/{seq}");
    store
        .write(move |tx| {
            tx.update_delivery(&sub, seq, update)?;
            Ok(tx.now_ms())
        })
        .await
        .unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

/// The due deliveries of `subscriptions` (others are left out), as (subscription, seq), in the order given.
async fn due_of<S: Store>(
    store: &Arc<S>,
    now_ms: i64,
    subscriptions: &[&str],
) -> Vec<(String, i64)> {
    let due = store.due_deliveries(now_ms, 10_000).await.unwrap();
    assert!(
        due.iter()
            .all(|d| d.state == DeliveryState::Pending && d.next_attempt_ms <= now_ms),
        "due deliveries are pending and due: {due:?}"
    );
    assert!(
        due.windows(2)
            .all(|w| (w[0].next_attempt_ms, w[0].seq) <= (w[1].next_attempt_ms, w[1].seq)),
        "due deliveries come by (next_attempt_ms, seq): {due:?}"
    );
    due.into_iter()
        .filter(|d| subscriptions.contains(&d.subscription.as_str()))
        .map(|d| (d.subscription, d.seq))
        .collect()
}

/// One delivery, as listed.
async fn delivery_of<S: Store>(store: &Arc<S>, subscription: &str, seq: i64) -> Delivery {
    let found = store
        .deliveries(&DeliveryQuery {
            subscription: Some(subscription.to_string()),
            state: None,
            after_seq: seq - 1,
            limit: 1,
        })
        .await
        .unwrap();
    match found.into_iter().next() {
        Some(d) if d.seq == seq => d,
        other => panic!("delivery {subscription}/{seq} not found (got {other:?})"),
    }
}

fn pairs(items: &[(&str, &Event)]) -> Vec<(String, i64)> {
    items.iter().map(|(s, e)| (s.to_string(), e.seq)).collect()
}

fn as_set(items: Vec<(String, i64)>) -> BTreeSet<(String, i64)> {
    items.into_iter().collect()
}

/// `enqueue_deliveries` in one write: per event whether it was new (an existing delivery and a repeat within
/// the call are not), each subject's head its lowest pending seq, and the next one once that is delivered.
pub async fn deliveries_enqueued_together<S: Store>(store: &Arc<S>) {
    let sub = unique_id("dq-many");
    let s1 = format!("Appointment/{}", unique_id("dq-m1"));
    let s2 = format!("Appointment/{}", unique_id("dq-m2"));
    let ev = append_events(store, &[&s1, &s1, &s2, &s1]).await;
    let (single, _) = enqueue_all(store, &sub, &ev[1..2]).await;
    assert_eq!(single, vec![true]);
    let batch = vec![
        ev[3].clone(),
        ev[0].clone(),
        ev[1].clone(),
        ev[2].clone(),
        ev[0].clone(),
    ];
    let (sub2, events) = (sub.clone(), batch);
    let (enqueued, now_ms) = store
        .write(move |tx| Ok((tx.enqueue_deliveries(&sub2, &events)?, tx.now_ms())))
        .await
        .unwrap();
    assert_eq!(
        enqueued,
        vec![true, true, false, true, false],
        "new, new, existing, new, repeated"
    );
    assert_eq!(
        as_set(due_of(store, now_ms, &[&sub]).await),
        as_set(vec![(sub.clone(), ev[0].seq), (sub.clone(), ev[2].seq)]),
        "each subject's head is its lowest seq"
    );
    for seq in [ev[0].seq, ev[1].seq, ev[3].seq, ev[2].seq] {
        assert_eq!(
            delivery_of(store, &sub, seq).await.state,
            DeliveryState::Pending
        );
    }
    let later = set_delivery(
        store,
        &sub,
        ev[0].seq,
        DeliveryUpdate::Delivered {
            attempts: 1,
            status: 200,
        },
    )
    .await;
    assert_eq!(
        as_set(due_of(store, later, &[&sub]).await),
        as_set(vec![(sub.clone(), ev[1].seq), (sub.clone(), ev[2].seq)]),
        "after the head is delivered, the subject's next seq is due"
    );
}

/// Enqueue, due heads, per-subject order, no head-of-line blocking, every transition, counts, requeues.
pub async fn delivery_lifecycle<S: Store>(store: &Arc<S>) {
    let a = unique_id("dq-a");
    let b = unique_id("dq-b");
    let (a, b) = (a.as_str(), b.as_str());
    let s1 = format!("Appointment/{}", unique_id("dq-s1"));
    let s2 = format!("Appointment/{}", unique_id("dq-s2"));
    let ev = append_events(store, &[&s1, &s1, &s2, &s1]).await;
    let (e0, e1, e2, e3) = (&ev[0], &ev[1], &ev[2], &ev[3]);

    let (done, t_a) = enqueue_all(store, a, &ev).await;
    assert_eq!(done, vec![true; 4], "first enqueues");
    let (done, _) = enqueue_all(store, b, &ev[..2]).await;
    assert_eq!(done, vec![true; 2]);
    let (done, _) = enqueue_all(store, a, &[e0.clone(), e2.clone()]).await;
    assert_eq!(done, vec![false, false], "enqueue is idempotent");

    let d0 = delivery_of(store, a, e0.seq).await;
    assert_eq!(
        d0,
        Delivery {
            subscription: a.to_string(),
            seq: e0.seq,
            subject: s1.clone(),
            state: DeliveryState::Pending,
            attempts: 0,
            next_attempt_ms: t_a,
            created_ms: t_a,
            updated_ms: t_a,
            last_status: None,
            last_error: None,
        },
        "a fresh delivery: pending, due at the enqueueing write's now_ms"
    );
    let far = t_a + 86_400_000;
    assert_eq!(
        as_set(due_of(store, far, &[a, b]).await),
        as_set(pairs(&[(a, e0), (a, e2), (b, e0)])),
        "only the head of each (subscription, subject) is due"
    );
    assert_eq!(
        due_of(store, t_a - 1, &[a, b]).await,
        vec![],
        "nothing is due before its next attempt"
    );
    let next = store.next_due_ms().await.unwrap();
    assert!(
        next.is_some_and(|n| n <= t_a),
        "next_due_ms {next:?} at or before {t_a}"
    );

    // A retry keeps its subject blocked, not the other subject nor the other subscription.
    let t1 = t_a + 60_000;
    let t_retry = set_delivery(
        store,
        a,
        e0.seq,
        DeliveryUpdate::Retry {
            attempts: 1,
            next_attempt_ms: t1,
            status: Some(503),
            error: "unavailable".into(),
        },
    )
    .await;
    assert_eq!(
        delivery_of(store, a, e0.seq).await,
        Delivery {
            attempts: 1,
            next_attempt_ms: t1,
            updated_ms: t_retry,
            last_status: Some(503),
            last_error: Some("unavailable".into()),
            ..d0.clone()
        },
        "after a retry"
    );
    let (done, _) = enqueue_all(store, a, std::slice::from_ref(e0)).await;
    assert_eq!(done, vec![false]);
    assert_eq!(
        delivery_of(store, a, e0.seq).await.attempts,
        1,
        "enqueueing again leaves the delivery unchanged"
    );
    assert_eq!(
        as_set(due_of(store, t1 - 1, &[a, b]).await),
        as_set(pairs(&[(a, e2), (b, e0)])),
        "a's second event of s1 waits for the first; s2 and subscription b are not blocked"
    );
    assert_eq!(
        as_set(due_of(store, t1, &[a, b]).await),
        as_set(pairs(&[(a, e0), (a, e2), (b, e0)])),
        "the retry is due at its next attempt"
    );
    set_delivery(
        store,
        a,
        e2.seq,
        DeliveryUpdate::Retry {
            attempts: 1,
            next_attempt_ms: t1 - 10,
            status: None,
            error: "connection refused".into(),
        },
    )
    .await;
    let t_b = delivery_of(store, b, e0.seq).await.next_attempt_ms;
    assert!(t_b < t1 - 10);
    assert_eq!(
        due_of(store, t1, &[a, b]).await,
        pairs(&[(b, e0), (a, e2), (a, e0)]),
        "earliest next attempt first"
    );
    assert_eq!(
        due_of(store, t1 - 10, &[a]).await,
        pairs(&[(a, e2)]),
        "a retry's next attempt is respected"
    );

    // Delivered: the subject's next event becomes its head.
    let t_ok = set_delivery(
        store,
        a,
        e0.seq,
        DeliveryUpdate::Delivered {
            attempts: 2,
            status: 200,
        },
    )
    .await;
    let delivered = delivery_of(store, a, e0.seq).await;
    assert_eq!(
        (
            delivered.state,
            delivered.attempts,
            delivered.updated_ms,
            delivered.last_status,
            delivered.last_error.clone()
        ),
        (DeliveryState::Delivered, 2, t_ok, Some(200), None),
        "after delivery: {delivered:?}"
    );
    assert_eq!(
        due_of(store, t1, &[a]).await,
        pairs(&[(a, e1), (a, e2)]),
        "the next event of s1 is due once the first is delivered"
    );

    // Dead: the next one after it becomes the head.
    let t_dead = set_delivery(
        store,
        a,
        e1.seq,
        DeliveryUpdate::Dead {
            attempts: 5,
            status: None,
            error: "timeout".into(),
        },
    )
    .await;
    let dead = delivery_of(store, a, e1.seq).await;
    assert_eq!(
        (
            dead.state,
            dead.attempts,
            dead.updated_ms,
            dead.last_status,
            dead.last_error.as_deref()
        ),
        (DeliveryState::Dead, 5, t_dead, None, Some("timeout")),
        "a dead letter: {dead:?}"
    );
    assert_eq!(
        due_of(store, t1, &[a]).await,
        pairs(&[(a, e3), (a, e2)]),
        "a dead letter no longer blocks its subject"
    );
    assert_eq!(
        store.delivery_counts(a).await.unwrap(),
        DeliveryCounts {
            pending: 2,
            delivered: 1,
            dead: 1
        }
    );
    assert_eq!(
        store.delivery_counts(b).await.unwrap(),
        DeliveryCounts {
            pending: 2,
            delivered: 0,
            dead: 0
        }
    );
    assert_eq!(
        store.delivery_counts(&unique_id("dq-none")).await.unwrap(),
        DeliveryCounts::default()
    );

    // Requeue (replay) of a dead letter: pending, no attempts, due now, and its subject's head again.
    let t_req = set_delivery(store, a, e1.seq, DeliveryUpdate::Requeue).await;
    let requeued = delivery_of(store, a, e1.seq).await;
    assert_eq!(
        (
            requeued.state,
            requeued.attempts,
            requeued.next_attempt_ms,
            requeued.updated_ms
        ),
        (DeliveryState::Pending, 0, t_req, t_req),
        "requeued: {requeued:?}"
    );
    assert_eq!(
        due_of(store, t1, &[a]).await,
        pairs(&[(a, e1), (a, e2)]),
        "the requeued dead letter goes before the later pending event of its subject"
    );
    assert_eq!(
        due_of(store, t_req - 1, &[a]).await,
        vec![],
        "and is due at the requeueing write's now_ms"
    );

    // requeue_dead: every dead letter of one subscription, and only those.
    for e in [e1, e3] {
        set_delivery(
            store,
            a,
            e.seq,
            DeliveryUpdate::Dead {
                attempts: 3,
                status: Some(410),
                error: "gone".into(),
            },
        )
        .await;
    }
    set_delivery(
        store,
        b,
        e0.seq,
        DeliveryUpdate::Dead {
            attempts: 3,
            status: Some(410),
            error: "gone".into(),
        },
    )
    .await;
    assert_eq!(
        due_of(store, t1, &[a, b]).await,
        pairs(&[(b, e1), (a, e2)]),
        "s1 of a has nothing pending"
    );
    let a2 = a.to_string();
    let (n, t_rd) = store
        .write(move |tx| Ok((tx.requeue_dead(&a2)?, tx.now_ms())))
        .await
        .unwrap();
    assert_eq!(n, 2, "requeue_dead counts what it requeued");
    let a2 = a.to_string();
    assert_eq!(
        store.write(move |tx| tx.requeue_dead(&a2)).await.unwrap(),
        0,
        "nothing left to requeue"
    );
    for e in [e1, e3] {
        let d = delivery_of(store, a, e.seq).await;
        assert_eq!(
            (d.state, d.attempts, d.next_attempt_ms),
            (DeliveryState::Pending, 0, t_rd),
            "requeued by requeue_dead: {d:?}"
        );
    }
    assert_eq!(
        delivery_of(store, b, e0.seq).await.state,
        DeliveryState::Dead,
        "another subscription's dead letters stay dead"
    );
    assert_eq!(
        due_of(store, t1, &[a, b]).await,
        pairs(&[(b, e1), (a, e1), (a, e2)]),
        "after requeue_dead, s1's lowest seq is its head"
    );
    assert_eq!(
        store.delivery_counts(a).await.unwrap(),
        DeliveryCounts {
            pending: 3,
            delivered: 1,
            dead: 0
        }
    );

    // Updating an unknown delivery is refused.
    for (sub, seq) in [
        (a.to_string(), ev[3].seq + 1_000_000),
        (unique_id("dq-x"), e0.seq),
    ] {
        let r = store
            .write(move |tx| tx.update_delivery(&sub, seq, DeliveryUpdate::Requeue))
            .await;
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    }

    // Deliver everything, subject by subject in order: nothing stays due.
    for (sub, e) in [(a, e1), (a, e3), (a, e2), (b, e1)] {
        set_delivery(
            store,
            sub,
            e.seq,
            DeliveryUpdate::Delivered {
                attempts: 1,
                status: 204,
            },
        )
        .await;
    }
    assert_eq!(
        due_of(store, i64::MAX, &[a, b]).await,
        vec![],
        "all delivered or dead"
    );
    assert_eq!(
        store.delivery_counts(a).await.unwrap(),
        DeliveryCounts {
            pending: 0,
            delivered: 4,
            dead: 0
        }
    );
    assert_eq!(
        store.delivery_counts(b).await.unwrap(),
        DeliveryCounts {
            pending: 0,
            delivered: 1,
            dead: 1
        }
    );
}

/// `deliveries` filters by subscription, state and seq, orders by (seq, subscription) and honours `limit`.
/// `due_deliveries_for` returns the due heads of one subscription only, whatever the others hold.
pub async fn due_per_subscription<S: Store>(store: &Arc<S>) {
    let base = unique_id("dps");
    let (a, b) = (format!("{base}-a"), format!("{base}-b"));
    let s1 = format!("Slot/{}", unique_id("dps-1"));
    let s2 = format!("Slot/{}", unique_id("dps-2"));
    let ev = append_events(store, &[&s1, &s2, &s1]).await;
    enqueue_all(store, &a, &ev).await;
    enqueue_all(store, &b, &ev[..1]).await;
    let now = i64::MAX / 2;
    let due_a = store.due_deliveries_for(&a, now, 100).await.expect("due a");
    let seqs: Vec<i64> = due_a.iter().map(|d| d.seq).collect();
    assert_eq!(
        seqs,
        [ev[0].seq, ev[1].seq],
        "heads of a: one per subject, lowest seq first"
    );
    assert!(due_a.iter().all(|d| d.subscription == a));
    let due_b = store.due_deliveries_for(&b, now, 100).await.expect("due b");
    assert_eq!(due_b.iter().map(|d| d.seq).collect::<Vec<_>>(), [ev[0].seq]);
    assert_eq!(
        store
            .due_deliveries_for(&a, now, 1)
            .await
            .expect("limit")
            .len(),
        1,
        "limit is honoured"
    );
    assert!(
        store
            .due_deliveries_for(&a, 0, 100)
            .await
            .expect("not yet due")
            .is_empty()
    );
}

pub async fn delivery_listing<S: Store>(store: &Arc<S>) {
    let base = unique_id("dl");
    let (c, d) = (format!("{base}-c"), format!("{base}-d"));
    let subject = format!("Slot/{}", unique_id("dl-s"));
    let other = format!("Slot/{}", unique_id("dl-o"));
    let ev = append_events(store, &[&subject, &other, &subject, &other, &subject]).await;
    enqueue_all(store, &c, &ev).await;
    enqueue_all(store, &d, &ev[..3]).await;
    set_delivery(
        store,
        &c,
        ev[0].seq,
        DeliveryUpdate::Delivered {
            attempts: 1,
            status: 200,
        },
    )
    .await;
    set_delivery(
        store,
        &c,
        ev[1].seq,
        DeliveryUpdate::Dead {
            attempts: 1,
            status: Some(400),
            error: "bad request".into(),
        },
    )
    .await;
    let list = |subscription: Option<&str>, state: Option<DeliveryState>, after: i64, limit| {
        let q = DeliveryQuery {
            subscription: subscription.map(str::to_string),
            state,
            after_seq: after,
            limit,
        };
        let store = store.clone();
        async move {
            let found = store.deliveries(&q).await.unwrap();
            assert!(found.len() <= q.limit, "limit honoured");
            for x in &found {
                assert!(x.seq > q.after_seq, "after_seq is exclusive");
                if let Some(s) = &q.subscription {
                    assert_eq!(&x.subscription, s);
                }
                if let Some(st) = q.state {
                    assert_eq!(x.state, st);
                }
            }
            found
                .into_iter()
                .map(|x| (x.subscription, x.seq))
                .collect::<Vec<_>>()
        }
    };
    let seqs = |sub: &str, idx: &[usize]| -> Vec<(String, i64)> {
        idx.iter().map(|&i| (sub.to_string(), ev[i].seq)).collect()
    };
    let start = ev[0].seq - 1;
    assert_eq!(
        list(Some(&c), None, 0, 100).await,
        seqs(&c, &[0, 1, 2, 3, 4])
    );
    assert_eq!(list(Some(&c), None, start, 2).await, seqs(&c, &[0, 1]));
    assert_eq!(
        list(Some(&c), None, ev[2].seq, 100).await,
        seqs(&c, &[3, 4])
    );
    assert_eq!(list(Some(&c), None, 0, 0).await, vec![], "limit 0");
    assert_eq!(
        list(Some(&c), Some(DeliveryState::Dead), 0, 100).await,
        seqs(&c, &[1])
    );
    assert_eq!(
        list(Some(&c), Some(DeliveryState::Delivered), 0, 100).await,
        seqs(&c, &[0])
    );
    assert_eq!(
        list(Some(&c), Some(DeliveryState::Pending), 0, 100).await,
        seqs(&c, &[2, 3, 4])
    );
    assert_eq!(
        list(Some(&c), Some(DeliveryState::Pending), ev[3].seq, 100).await,
        seqs(&c, &[4])
    );
    assert_eq!(list(Some(&d), None, 0, 100).await, seqs(&d, &[0, 1, 2]));
    assert_eq!(
        list(Some(&unique_id("dl-none")), None, 0, 100).await,
        vec![]
    );
    // Across subscriptions: by seq, then subscription (only this check's events have seq > start).
    let mut both = Vec::new();
    for i in 0..5 {
        both.extend(seqs(&c, &[i]));
        if i < 3 {
            both.extend(seqs(&d, &[i]));
        }
    }
    assert_eq!(list(None, None, start, 100).await, both);
    assert_eq!(list(None, None, start, 3).await, both[..3].to_vec());
    let pending: Vec<(String, i64)> = [
        seqs(&d, &[0, 1]),
        seqs(&c, &[2]),
        seqs(&d, &[2]),
        seqs(&c, &[3, 4]),
    ]
    .concat();
    assert_eq!(
        list(None, Some(DeliveryState::Pending), start, 100).await,
        pending
    );
    // Tidy up: nothing of this check stays due.
    for (sub, i) in [(&c, 2), (&c, 3), (&c, 4), (&d, 0), (&d, 1), (&d, 2)] {
        set_delivery(
            store,
            sub,
            ev[i].seq,
            DeliveryUpdate::Delivered {
                attempts: 1,
                status: 200,
            },
        )
        .await;
    }
}

/// 20,000 deliveries queued behind one subject whose head waits for a retry far in the future do not hide
/// the due work of another subscription.
pub async fn delivery_no_head_of_line_blocking<S: Store>(store: &Arc<S>) {
    const BACKLOG: usize = 20_000;
    const PER_WRITE: usize = 1_000;
    let a = unique_id("hol-a");
    let b = unique_id("hol-b");
    let subject = format!("Appointment/{}", unique_id("hol-s"));
    let mut first: Option<Event> = None;
    for _ in 0..BACKLOG / PER_WRITE {
        let (a2, subject) = (a.clone(), subject.clone());
        let e = store
            .write(move |tx| {
                let mut first = None;
                for _ in 0..PER_WRITE {
                    let e = tx.append_event(delivery_event(&subject))?;
                    assert!(tx.enqueue_delivery(&a2, &e)?);
                    first.get_or_insert(e);
                }
                Ok(first)
            })
            .await
            .unwrap();
        first = first.or(e);
    }
    let first = first.unwrap();
    let far = wall_ms() + 10 * 86_400_000;
    set_delivery(
        store,
        &a,
        first.seq,
        DeliveryUpdate::Retry {
            attempts: 7,
            next_attempt_ms: far,
            status: Some(500),
            error: "down".into(),
        },
    )
    .await;
    let eb = append_events(store, &[&format!("Patient/{}", unique_id("hol-p"))]).await;
    let (_, t_b) = enqueue_all(store, &b, &eb).await;

    // Correctness only: how fast this stays with the backlog is measured by the delivery benchmark (one dead
    // subscriber of ten), never timed in a test.
    let now = t_b + 1_000;
    for _ in 0..3 {
        let due = store.due_deliveries(now, 100).await.unwrap();
        let mine: Vec<(String, i64)> = due
            .into_iter()
            .filter(|d| d.subscription == a || d.subscription == b)
            .map(|d| (d.subscription, d.seq))
            .collect();
        assert_eq!(
            mine,
            vec![(b.clone(), eb[0].seq)],
            "only b's delivery is due"
        );
    }
    let next = store.next_due_ms().await.unwrap();
    assert!(next.is_some_and(|n| n <= t_b), "next_due_ms {next:?}");
    assert_eq!(
        due_of(store, far, &[&a]).await,
        vec![(a.clone(), first.seq)],
        "the backlog shows only its head"
    );
    assert_eq!(
        store.delivery_counts(&a).await.unwrap().pending,
        BACKLOG as u64
    );
    set_delivery(
        store,
        &b,
        eb[0].seq,
        DeliveryUpdate::Delivered {
            attempts: 1,
            status: 200,
        },
    )
    .await;
}

/// `watch_events` moves after a commit that appended events (to its highest seq), not after other commits.
pub async fn events_watch<S: Store>(store: &Arc<S>) {
    let mut rx = store.watch_events();
    let start = *rx.borrow_and_update();
    assert!(
        store.events_after(start, 1).await.unwrap().is_empty(),
        "the watch starts at the last committed event"
    );
    if start > 0 {
        assert_eq!(
            store
                .events_after(start - 1, 1)
                .await
                .unwrap()
                .first()
                .map(|e| e.seq),
            Some(start),
            "the watch names an existing event"
        );
    }
    let ns = unique_id("watch");
    let n = ns.clone();
    store
        .write(move |tx| tx.kv_put(&n, "k", Some("v")))
        .await
        .unwrap();
    let subject = format!("Patient/{}", unique_id("watch"));
    let s = subject.clone();
    let r: crate::Result<()> = store
        .write(move |tx| {
            tx.append_event(delivery_event(&s))?;
            Err(StoreError::Conflict("refused".into()))
        })
        .await;
    assert!(r.is_err());
    assert!(
        !rx.has_changed().unwrap(),
        "no change after commits without events"
    );

    let mut waiting = store.watch_events();
    waiting.borrow_and_update();
    let waiter = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(10), waiting.changed())
            .await
            .expect("the watch wakes its waiters")
            .unwrap();
        *waiting.borrow()
    });
    sleep_ms(20).await;
    let ev = append_events(store, &[&subject, &subject]).await;
    assert!(
        rx.has_changed().unwrap(),
        "changed after a commit with events"
    );
    assert_eq!(
        *rx.borrow_and_update(),
        ev[1].seq,
        "the watch holds the highest committed seq once the write is acknowledged"
    );
    assert_eq!(waiter.await.unwrap(), ev[1].seq);
    let later = store.watch_events();
    assert_eq!(
        *later.borrow(),
        ev[1].seq,
        "a new receiver starts at the current value"
    );
}

/// Poll a future once (a backend with a writer queue has then queued the write); its answer if it is ready.
async fn poll_once<T>(
    f: &mut std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>,
) -> Option<T> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match f.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// Writes committed together (group commit) where some fail: the others' deliveries, requeues and named
/// values are kept exactly as answered, the failed ones' vanish.
pub async fn delivery_batch_isolation<S: Store>(store: &Arc<S>) {
    type Answer = crate::Result<Vec<i64>>;
    type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>>;
    type Closure = Box<dyn FnOnce(&mut dyn crate::Tx) -> Answer + Send>;

    let sub = unique_id("bi");
    let ns = unique_id("bi-kv");
    let s1 = format!("Appointment/{}", unique_id("bi-s1"));
    let s2 = format!("Appointment/{}", unique_id("bi-s2"));
    let ev = append_events(store, &[&s1, &s1, &s2]).await;
    let (e0, e1, e2) = (ev[0].clone(), ev[1].clone(), ev[2].clone());
    enqueue_all(store, &sub, &[e0.clone(), e2.clone()]).await;
    set_delivery(
        store,
        &sub,
        e2.seq,
        DeliveryUpdate::Dead {
            attempts: 1,
            status: None,
            error: "x".into(),
        },
    )
    .await;
    let mut rx = store.watch_events();
    rx.borrow_and_update();

    // Keep the backend busy so that the writes below queue up and commit together.
    let s = store.clone();
    let mut blocker: std::pin::Pin<
        Box<dyn std::future::Future<Output = crate::Result<()>> + Send>,
    > = Box::pin(async move {
        s.write(|_| {
            std::thread::sleep(Duration::from_millis(150));
            Ok(())
        })
        .await
    });
    let blocker_done = poll_once(&mut blocker).await;
    sleep_ms(30).await;

    let far = wall_ms() + 86_400_000;
    let mut jobs: Vec<(&str, Pending)> = Vec::new();
    let mut add = |name: &'static str, f: Closure| {
        let s = store.clone();
        jobs.push((name, Box::pin(async move { s.write(f).await })));
    };
    let (q, n, e) = (sub.clone(), ns.clone(), e1.clone());
    add(
        "a",
        Box::new(move |tx| {
            let added = tx.enqueue_delivery(&q, &e)?;
            tx.kv_put(&n, "k1", Some("a"))?;
            tx.kv_put(&n, "k2", Some("a"))?;
            Ok(vec![i64::from(added)])
        }),
    );
    let (q, n, s) = (sub.clone(), ns.clone(), s1.clone());
    add(
        "b",
        Box::new(move |tx| {
            tx.update_delivery(
                &q,
                e0.seq,
                DeliveryUpdate::Dead {
                    attempts: 2,
                    status: Some(500),
                    error: "b".into(),
                },
            )?;
            let requeued = tx.requeue_dead(&q)?;
            let e3 = tx.append_event(delivery_event(&s))?;
            let added = tx.enqueue_delivery(&q, &e3)?;
            tx.kv_put(&n, "k2", None)?;
            Ok(vec![
                i64::try_from(requeued).unwrap(),
                e3.seq,
                i64::from(added),
            ])
        }),
    );
    let (q, n, s) = (sub.clone(), ns.clone(), s2.clone());
    add(
        "c (fails)",
        Box::new(move |tx| {
            tx.update_delivery(
                &q,
                e1.seq,
                DeliveryUpdate::Delivered {
                    attempts: 1,
                    status: 200,
                },
            )?;
            tx.kv_put(&n, "k1", Some("c"))?;
            tx.kv_put(&n, "k3", Some("c"))?;
            let e4 = tx.append_event(delivery_event(&s))?;
            tx.enqueue_delivery(&q, &e4)?;
            tx.requeue_dead(&q)?;
            Err(StoreError::Conflict("c".into()))
        }),
    );
    let (q, n) = (sub.clone(), ns.clone());
    add(
        "d",
        Box::new(move |tx| {
            tx.update_delivery(
                &q,
                e0.seq,
                DeliveryUpdate::Delivered {
                    attempts: 1,
                    status: 200,
                },
            )?;
            tx.kv_put(&n, "k3", Some("d"))?;
            Ok(vec![])
        }),
    );
    let (q, n) = (sub.clone(), ns.clone());
    add(
        "e (fails)",
        Box::new(move |tx| {
            tx.kv_put(&n, "k1", Some("e"))?;
            tx.update_delivery(&q, -1, DeliveryUpdate::Requeue)?;
            Ok(vec![])
        }),
    );
    let (q, n) = (sub.clone(), ns.clone());
    add(
        "f",
        Box::new(move |tx| {
            tx.update_delivery(
                &q,
                e1.seq,
                DeliveryUpdate::Retry {
                    attempts: 1,
                    next_attempt_ms: far,
                    status: Some(429),
                    error: "slow down".into(),
                },
            )?;
            tx.kv_put(&n, "k4", Some("f"))?;
            Ok(vec![tx.now_ms()])
        }),
    );
    let mut answers: BTreeMap<&str, Answer> = BTreeMap::new();
    let mut queued = Vec::new();
    for (name, mut f) in jobs {
        match poll_once(&mut f).await {
            Some(answer) => {
                answers.insert(name, answer);
            }
            None => queued.push((name, f)),
        }
    }
    match blocker_done {
        Some(r) => r.unwrap(),
        None => blocker.await.unwrap(),
    }
    for (name, f) in queued {
        answers.insert(name, f.await);
    }

    let ok = |name: &str| {
        answers[name]
            .as_ref()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .clone()
    };
    assert!(
        matches!(answers["c (fails)"], Err(StoreError::Conflict(_))),
        "{:?}",
        answers["c (fails)"]
    );
    assert!(
        matches!(answers["e (fails)"], Err(StoreError::Invalid(_))),
        "{:?}",
        answers["e (fails)"]
    );
    assert_eq!(ok("a"), vec![1]);
    let b_answer = ok("b");
    assert_eq!(
        (b_answer[0], b_answer[2]),
        (2, 1),
        "b requeued e0 and e2, enqueued e3"
    );
    let e3_seq = b_answer[1];
    ok("d");
    ok("f");

    let kv = |k: &'static str| {
        let (store, ns) = (store.clone(), ns.clone());
        async move { store.kv_get(&ns, k).await.unwrap() }
    };
    assert_eq!(
        kv("k1").await.as_deref(),
        Some("a"),
        "failed writes' values vanished"
    );
    assert_eq!(kv("k2").await, None, "b's removal kept");
    assert_eq!(kv("k3").await.as_deref(), Some("d"));
    assert_eq!(kv("k4").await.as_deref(), Some("f"));

    let listed: Vec<(i64, DeliveryState, u32)> = store
        .deliveries(&DeliveryQuery {
            subscription: Some(sub.clone()),
            limit: 100,
            ..DeliveryQuery::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.seq, d.state, d.attempts))
        .collect();
    assert_eq!(
        listed,
        vec![
            (ev[0].seq, DeliveryState::Delivered, 1),
            (ev[1].seq, DeliveryState::Pending, 1),
            (ev[2].seq, DeliveryState::Pending, 0),
            (e3_seq, DeliveryState::Pending, 0),
        ],
        "deliveries exactly as answered"
    );
    assert_eq!(
        delivery_of(store, &sub, ev[1].seq).await.next_attempt_ms,
        far
    );
    assert_eq!(
        due_of(store, far - 1, &[&sub]).await,
        vec![(sub.clone(), ev[2].seq)],
        "s1 waits for e1's retry (e3 behind it); s2's requeued dead letter is due"
    );
    assert_eq!(
        due_of(store, far, &[&sub]).await,
        vec![(sub.clone(), ev[2].seq), (sub.clone(), ev[1].seq)]
    );
    assert_eq!(
        *rx.borrow_and_update(),
        e3_seq,
        "the watch holds the highest kept event, not a failed write's"
    );
    let stored: Vec<Event> = store.events_after(ev[2].seq, 100).await.unwrap();
    assert_eq!(
        stored.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![e3_seq],
        "the failed write's event vanished"
    );
    for e in [ev[2].seq, ev[1].seq, e3_seq] {
        set_delivery(
            store,
            &sub,
            e,
            DeliveryUpdate::Delivered {
                attempts: 2,
                status: 200,
            },
        )
        .await;
    }
}

/// `Tx::delivery` sees a delivery as the transaction does (a claim pattern: check it is due, push its next
/// attempt out, all in one write; a second claim of the same attempt fails), and `Tx::put_at` stores the given
/// `lastUpdated` (imports keep history as it was).
pub async fn delivery_claim_and_put_at<S: Store>(store: &Arc<S>) {
    let sub = unique_id("claim");
    let subject = format!("Appointment/{}", unique_id("claim-s"));
    let ev = append_events(store, &[&subject]).await;
    let (done, t0) = enqueue_all(store, &sub, &ev).await;
    assert_eq!(done, vec![true]);
    let seq = ev[0].seq;
    let claim = |until: i64| {
        let sub = sub.clone();
        move |tx: &mut dyn crate::Tx| -> crate::Result<bool> {
            let now = tx.now_ms();
            match tx.delivery(&sub, seq)? {
                Some(d)
                    if d.state == DeliveryState::Pending
                        && d.attempts == 0
                        && d.next_attempt_ms <= now =>
                {
                    tx.update_delivery(
                        &sub,
                        seq,
                        DeliveryUpdate::Retry {
                            attempts: 0,
                            next_attempt_ms: until,
                            status: None,
                            error: "claimed".into(),
                        },
                    )?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        }
    };
    let far = t0 + 3_600_000;
    assert!(
        store.write(claim(far)).await.unwrap(),
        "a due delivery can be claimed"
    );
    assert!(
        !store.write(claim(far)).await.unwrap(),
        "a claimed delivery cannot be claimed again"
    );
    let missing = {
        let sub = sub.clone();
        store
            .write(move |tx| tx.delivery(&sub, seq + 1_000_000))
            .await
            .unwrap()
    };
    assert_eq!(missing, None, "an unknown delivery is None");
    let d = delivery_of(store, &sub, seq).await;
    assert_eq!(
        (d.state, d.attempts, d.next_attempt_ms),
        (DeliveryState::Pending, 0, far)
    );

    let id = unique_id("put-at");
    let (i1, i2) = (id.clone(), id.clone());
    let old = 1_000_000_000_000i64;
    let first = store
        .write(move |tx| tx.put_at(patient(&i1, vec![]), old))
        .await
        .unwrap();
    assert_eq!(
        (first.version, first.last_updated_ms),
        (1, old),
        "put_at keeps the given instant"
    );
    assert!(
        first.json.contains(&fhir::format_instant_ms(old)),
        "meta.lastUpdated is the given instant"
    );
    let second = store
        .write(move |tx| tx.put_at(patient(&i2, vec![]), old + 1_000))
        .await
        .unwrap();
    assert_eq!((second.version, second.last_updated_ms), (2, old + 1_000));
    let read = store
        .read(ResourceType::Patient, &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.last_updated_ms, old + 1_000);
}
