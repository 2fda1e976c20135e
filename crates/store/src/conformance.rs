//! Conformance suite every backend must pass.
//!
//! Why it exists: the domain code is written once against [`Store`]/[`Tx`], so every backend must show the
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
    Clause, Cmp, Event, HistoryQuery, IdempotencyRecord, IndexEntry, IndexValue, NewEvent,
    Predicate, Put, ResourceType, SearchQuery, Sort, SortField, Store, StoreError, Stored,
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
    version_conflicts(&store).await;
    delete_and_recreate(&store).await;
    history(&store).await;
    search_predicates(&store).await;
    date_and_last_updated_prefixes(&store).await;
    sorting_and_paging(&store).await;
    savepoint_isolation(&store).await;
    concurrent_creates(&store).await;
    concurrent_conditional_creates(&store).await;
    events(&store).await;
    events_concurrent_gap_free(&store).await;
    idempotency(&store).await;
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
fn string(param: &'static str, value: &str) -> IndexEntry {
    IndexEntry {
        param,
        value: IndexValue::String(value.to_string()),
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
            vec![tag(&scope), string("name", "smi"), string("name", "sm")],
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
        exact: false,
    };
    let exact = |v: &str| Predicate::String {
        value: v.to_string(),
        exact: true,
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
            exact: true,
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
