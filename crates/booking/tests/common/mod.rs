//! Test helpers: a fresh SQLite store, resource builders, thin async wrappers over the service functions, and
//! the invariant checker shared by the flow tests and the property test.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use booking::scheduling::{AppointmentStatus, AppointmentView, format_instant_utc};
use booking::{BookingError, Coding, Outcome, SlotTemplate};
use fhir::{NhsNumber, ResourceType as RT};
use serde_json::{Value, json};
use store::{Event, HistoryQuery, SearchQuery, Store, StoreError, Stored};
use store_sqlite::{Durability, SqliteOptions, SqliteStore};

pub const MIN: i64 = 60_000;

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("booking-{tag}-{}-{nanos}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Env {
    pub store: Arc<SqliteStore>,
    // Dropped after the store (fields drop in declaration order).
    _dir: TempDir,
}

pub fn env(tag: &str) -> Env {
    let dir = TempDir::new(tag);
    let options = SqliteOptions {
        durability: Durability::OsCrash,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(dir.path(), options).unwrap();
    Env {
        store: Arc::new(store),
        _dir: dir,
    }
}

pub fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A minute-aligned instant `minutes` from now.
pub fn at(minutes: i64) -> i64 {
    (now_ms() / MIN + minutes) * MIN
}

pub fn ts(ms: i64) -> String {
    format_instant_utc(ms)
}

/// The n-th valid synthetic NHS number (9xx test range).
pub fn nhs(n: u32) -> String {
    let mut k = 0;
    let mut i = 0u32;
    loop {
        let first = format!("{:09}", 900_000_000 + i);
        if let Some(c) = NhsNumber::check_digit(&first) {
            let candidate = format!("{first}{c}");
            if NhsNumber::parse(&candidate).is_ok() {
                if k == n {
                    return candidate;
                }
                k += 1;
            }
        }
        i += 1;
    }
}

pub fn schedule_json(active: bool) -> Value {
    json!({"resourceType": "Schedule", "active": active, "actor": [{"reference": "Practitioner/dr"}]})
}

pub fn slot_json(schedule: &str, start: i64, end: i64, status: &str) -> Value {
    json!({
        "resourceType": "Slot",
        "schedule": {"reference": format!("Schedule/{schedule}")},
        "status": status,
        "start": ts(start),
        "end": ts(end),
    })
}

pub fn patient_json(nhs_number: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs_number}],
        "active": true,
        "name": [{"family": "Test"}],
    })
}

pub fn appointment_json(
    status: &str,
    patient: Option<&str>,
    slots: &[&str],
    start: Option<i64>,
    end: Option<i64>,
) -> Value {
    let mut v = json!({"resourceType": "Appointment", "status": status});
    let obj = v.as_object_mut().unwrap();
    if let Some(s) = start {
        obj.insert("start".into(), json!(ts(s)));
    }
    if let Some(e) = end {
        obj.insert("end".into(), json!(ts(e)));
    }
    if !slots.is_empty() {
        obj.insert(
            "slot".into(),
            Value::Array(
                slots
                    .iter()
                    .map(|s| json!({"reference": format!("Slot/{s}")}))
                    .collect(),
            ),
        );
    }
    let mut participants =
        vec![json!({"actor": {"reference": "Practitioner/dr"}, "status": "accepted"})];
    if let Some(p) = patient {
        participants
            .push(json!({"actor": {"reference": format!("Patient/{p}")}, "status": "accepted"}));
    }
    obj.insert("participant".into(), Value::Array(participants));
    v
}

// ---- thin async wrappers -------------------------------------------------------------------------------

pub async fn write(
    store: &Arc<SqliteStore>,
    rtype: RT,
    id: &str,
    resource: Value,
) -> Result<Outcome, BookingError> {
    try_write(store, rtype, id, resource, None).await.unwrap()
}

pub async fn try_write(
    store: &Arc<SqliteStore>,
    rtype: RT,
    id: &str,
    resource: Value,
    expected: Option<u64>,
) -> Result<Result<Outcome, BookingError>, StoreError> {
    let id = id.to_owned();
    store
        .write(move |tx| booking::write_resource(tx, rtype, id, resource, expected))
        .await
}

pub async fn delete(
    store: &Arc<SqliteStore>,
    rtype: RT,
    id: &str,
) -> Result<Option<Stored>, BookingError> {
    let id = id.to_owned();
    store
        .write(move |tx| booking::delete_resource(tx, rtype, &id, None))
        .await
        .unwrap()
}

pub async fn transition(
    store: &Arc<SqliteStore>,
    id: &str,
    to: &str,
    reason: Option<&str>,
) -> Result<Stored, BookingError> {
    let id = id.to_owned();
    let to = to.to_owned();
    let reason = reason.map(Coding::cancellation_reason);
    store
        .write(move |tx| booking::transition(tx, &id, &to, reason))
        .await
        .unwrap()
}

pub async fn merge(
    store: &Arc<SqliteStore>,
    source: &str,
    target: &str,
) -> Result<booking::MergeResult, BookingError> {
    let (s, t) = (source.to_owned(), target.to_owned());
    store
        .write(move |tx| booking::merge_patients(tx, &s, &t))
        .await
        .unwrap()
}

pub async fn generate(
    store: &Arc<SqliteStore>,
    schedule: &str,
    template: SlotTemplate,
) -> Result<booking::GenerateResult, BookingError> {
    let s = schedule.to_owned();
    store
        .write(move |tx| booking::generate_slots(tx, &s, &template))
        .await
        .unwrap()
}

pub async fn read_json(store: &Arc<SqliteStore>, rtype: RT, id: &str) -> Value {
    let s = store.read(rtype, id).await.unwrap().unwrap();
    assert!(!s.deleted, "{rtype}/{id} is deleted");
    serde_json::from_str(&s.json).unwrap()
}

pub async fn slot_status(store: &Arc<SqliteStore>, id: &str) -> String {
    read_json(store, RT::Slot, id).await["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

pub async fn events(store: &Arc<SqliteStore>) -> Vec<Event> {
    store.events_after(0, 1_000_000).await.unwrap()
}

/// `(kind, subject_seq)` of the events of one subject, oldest first.
pub async fn events_of(store: &Arc<SqliteStore>, subject: &str) -> Vec<(String, i64)> {
    events(store)
        .await
        .into_iter()
        .filter(|e| e.subject == subject)
        .map(|e| (e.kind, e.subject_seq))
        .collect()
}

pub async fn last_event(store: &Arc<SqliteStore>, subject: &str) -> Event {
    events(store)
        .await
        .into_iter()
        .rfind(|e| e.subject == subject)
        .unwrap()
}

async fn all_live(store: &Arc<SqliteStore>, rtype: RT) -> Vec<Stored> {
    let mut q = SearchQuery::new(rtype);
    q.count = 100_000;
    store.search(&q).await.unwrap().resources
}

/// Check the booking invariants over the whole store; returns a description of the first violation.
pub async fn check_invariants(store: &Arc<SqliteStore>) -> Result<(), String> {
    let slots = all_live(store, RT::Slot).await;
    let appointments = all_live(store, RT::Appointment).await;
    let mut holders: HashMap<String, Vec<String>> = HashMap::new();
    for a in &appointments {
        let v = AppointmentView::from_json(&serde_json::from_str(&a.json).unwrap())
            .map_err(|e| format!("Appointment/{} unreadable: {e:?}", a.id))?;
        if v.status.holds_slots() {
            for s in &v.slots {
                holders.entry(s.clone()).or_default().push(a.id.clone());
            }
        }
    }
    let mut slot_status: HashMap<String, String> = HashMap::new();
    for s in &slots {
        let j: Value = serde_json::from_str(&s.json).unwrap();
        slot_status.insert(
            format!("Slot/{}", s.id),
            j["status"].as_str().unwrap_or("").to_owned(),
        );
    }
    for (slot, by) in &holders {
        if by.len() > 1 {
            return Err(format!("{slot} held by several appointments: {by:?}"));
        }
        match slot_status.get(slot).map(String::as_str) {
            Some("busy") => {}
            other => {
                return Err(format!("{slot} held by {by:?} but its status is {other:?}"));
            }
        }
    }
    for (slot, status) in &slot_status {
        if status == "busy" && !holders.contains_key(slot) {
            return Err(format!("{slot} is busy without a holding appointment"));
        }
    }
    // Every recorded status change of every appointment is allowed by the policy.
    for a in &appointments {
        let q = HistoryQuery {
            rtype: RT::Appointment,
            id: Some(a.id.clone()),
            since_ms: None,
            count: 10_000,
            offset: 0,
        };
        let mut versions = store.history(&q).await.unwrap().resources;
        versions.reverse();
        let mut previous: Option<AppointmentStatus> = None;
        for v in &versions {
            if v.deleted {
                previous = None;
                continue;
            }
            let j: Value = serde_json::from_str(&v.json).unwrap();
            let status = AppointmentStatus::parse(j["status"].as_str().unwrap()).unwrap();
            match previous {
                None if !status.is_initial() => {
                    return Err(format!("Appointment/{} created as {status}", a.id));
                }
                Some(p) if p != status && !p.can_transition_to(status) => {
                    return Err(format!(
                        "Appointment/{} went {p} -> {status} (version {})",
                        a.id, v.version
                    ));
                }
                _ => {}
            }
            previous = Some(status);
        }
    }
    // Gap-free per-subject sequence, and one resource version per event.
    let mut seqs: BTreeMap<String, i64> = BTreeMap::new();
    for e in events(store).await {
        let last = seqs.entry(e.subject.clone()).or_insert(0);
        if e.subject_seq != *last + 1 {
            return Err(format!(
                "{}: subject_seq {} after {}",
                e.subject, e.subject_seq, last
            ));
        }
        *last = e.subject_seq;
    }
    Ok(())
}
