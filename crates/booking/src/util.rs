//! Small helpers over [`Tx`] shared by the service functions.

use fhir::ResourceType;
use scheduling::{AppointmentStatus, AppointmentView};
use serde_json::Value;
use store::{
    Clause, NewEvent, Predicate, Put, SearchQuery, Sort, SortField, StoreError, Stored, Tx,
};

/// A resource to write, possibly with what the store derives from it (its search index rows and its
/// serialised body) computed ahead, outside the write transaction: see [`Incoming::prepare`].
#[derive(Debug, Clone)]
pub struct Incoming {
    value: Value,
    prepared: Option<Prepared>,
}

#[derive(Debug, Clone)]
struct Prepared {
    rtype: ResourceType,
    id: String,
    index: Vec<store::IndexEntry>,
    body: store::Body,
}

impl Incoming {
    /// `value`, to be written as `rtype/id`, with its index rows and stored body computed now. Call it before
    /// [`store::Store::write`]: the single writer then skips that work for every write that stores the
    /// resource as given (creates and updates of Patient, Appointment and the types without rules of their
    /// own). A write that changes the resource, or stores it under another id, computes them again.
    pub fn prepare(rtype: ResourceType, id: &str, value: Value) -> Incoming {
        let prepared = store::Body::new(rtype, id, &value)
            .ok()
            .map(|body| Prepared {
                rtype,
                id: id.to_owned(),
                index: fhir::index_entries(rtype, &value),
                body,
            });
        Incoming { value, prepared }
    }

    /// The resource.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The resource, dropping anything prepared.
    pub fn into_value(self) -> Value {
        self.value
    }
}

impl From<Value> for Incoming {
    fn from(value: Value) -> Incoming {
        Incoming {
            value,
            prepared: None,
        }
    }
}

/// Page size used when a service function needs every match of a search.
const PAGE: usize = 500;

/// The current live version (`None` when absent or deleted).
pub(crate) fn live(
    tx: &mut dyn Tx,
    rtype: ResourceType,
    id: &str,
) -> store::Result<Option<Stored>> {
    Ok(tx.read(rtype, id)?.filter(|s| !s.deleted))
}

/// The JSON of a stored version.
pub(crate) fn json_of(s: &Stored) -> store::Result<Value> {
    fhir::parse_json(&s.json).map_err(|e| {
        StoreError::Backend(format!(
            "stored JSON of {}/{} is unreadable: {e}",
            s.rtype, s.id
        ))
    })
}

/// Stored versions kept parsed for [`shared_json_of`], per thread (the embedded store runs every write on
/// its one writer thread).
const PARSED_KEPT: usize = 512;

/// A parsed stored version: its type, text and value.
type Parsed = (ResourceType, String, std::sync::Arc<Value>);

thread_local! {
    static PARSED: std::cell::RefCell<std::collections::HashMap<Box<str>, Parsed>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The JSON of a stored version that is only to be read (a booking's Patient and Schedule). The same text
/// parsed before on this thread is not parsed again: a busy clinic's bookings read the same Schedule and
/// Patients over and over. Keyed by id, and checked against the type and the whole text, so whatever wrote the
/// version (another process, a rolled-back batch), a stale entry is never used.
pub(crate) fn shared_json_of(s: &Stored) -> store::Result<std::sync::Arc<Value>> {
    PARSED.with_borrow_mut(|parsed| {
        if let Some((rtype, json, value)) = parsed.get(s.id.as_str())
            && *rtype == s.rtype
            && *json == s.json
        {
            return Ok(value.clone());
        }
        let value = std::sync::Arc::new(json_of(s)?);
        if parsed.len() >= PARSED_KEPT {
            parsed.clear();
        }
        parsed.insert(
            s.id.as_str().into(),
            (s.rtype, s.json.clone(), value.clone()),
        );
        Ok(value)
    })
}

/// The precondition (`If-Match`) check, done before any business rule so that a stale ETag is reported as
/// such (412) rather than as whatever the stale view would have violated. Same semantics as [`Put`]:
/// `Some(0)` means "must not exist (or be deleted)".
pub(crate) fn check_expected(
    rtype: ResourceType,
    id: &str,
    expected: Option<u64>,
    live_version: u64,
) -> store::Result<()> {
    match expected {
        Some(expected) if expected != live_version => Err(StoreError::VersionConflict {
            rtype,
            id: id.to_owned(),
            expected,
            actual: live_version,
        }),
        _ => Ok(()),
    }
}

/// Store a new version with its index rows.
pub(crate) fn put(
    tx: &mut dyn Tx,
    rtype: ResourceType,
    id: &str,
    resource: impl Into<Incoming>,
    expected_version: Option<u64>,
) -> store::Result<Stored> {
    let Incoming {
        value: mut resource,
        prepared,
    } = resource.into();
    let (index, body) = match prepared {
        // Prepared for this very write: the index and body were computed before the transaction.
        Some(p) if p.rtype == rtype && p.id == id => (p.index, Some(p.body)),
        _ => {
            if let Some(obj) = resource.as_object_mut() {
                obj.insert("id".into(), Value::String(id.to_owned()));
            }
            (fhir::index_entries(rtype, &resource), None)
        }
    };
    tx.put(Put {
        rtype,
        id: id.to_owned(),
        resource,
        index,
        expected_version,
        body,
    })
}

/// Append an event about `s` (subject `Type/id`).
pub(crate) fn event(tx: &mut dyn Tx, s: &Stored, kind: &str, data: Value) -> store::Result<()> {
    tx.append_event(NewEvent {
        subject: reference(s.rtype, &s.id),
        kind: kind.to_owned(),
        rtype: s.rtype,
        id: s.id.clone(),
        version: s.version,
        data,
    })?;
    Ok(())
}

pub(crate) fn reference(rtype: ResourceType, id: &str) -> String {
    format!("{rtype}/{id}")
}

/// The first page of `query` as [`search_all`] asks for it (what a write tells the store it will search for,
/// [`store::ReadAhead::searches`]).
pub(crate) fn first_page(mut query: SearchQuery) -> SearchQuery {
    query.sort = vec![Sort {
        field: SortField::Id,
        descending: false,
    }];
    query.count = PAGE;
    query.offset = 0;
    query.want_total = false;
    query
}

/// Every match of `query` (paged by id inside the transaction).
pub(crate) fn search_all(tx: &mut dyn Tx, query: SearchQuery) -> store::Result<Vec<Stored>> {
    let mut query = first_page(query);
    let mut out = Vec::new();
    loop {
        let page = tx.search(&query)?;
        let n = page.len();
        out.extend(page);
        if n < PAGE {
            return Ok(out);
        }
        query.offset += PAGE;
    }
}

/// FHIR `active`: absent means active.
pub(crate) fn is_active(resource: &Value) -> bool {
    resource.get("active").and_then(Value::as_bool) != Some(false)
}

/// A FHIR id: 1-64 of `A-Za-z0-9-.`.
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The id of a relative literal reference `Type/id` (a `/_history/n` suffix is not accepted).
pub(crate) fn local_id(reference: &str, rtype: ResourceType) -> Option<&str> {
    let id = reference.strip_prefix(rtype.as_str())?.strip_prefix('/')?;
    valid_id(id).then_some(id)
}

/// `status` of a resource as a string.
pub(crate) fn status_of(resource: &Value) -> Option<&str> {
    resource.get("status").and_then(Value::as_str)
}

/// The appointments currently holding `Slot/{slot_id}` (status booked, arrived, checked-in, fulfilled or
/// noshow, listing the slot). The invariant says there is at most one.
pub(crate) fn holders(tx: &mut dyn Tx, slot_id: &str) -> store::Result<Vec<Stored>> {
    let slot_ref = reference(ResourceType::Slot, slot_id);
    let holding: Vec<Predicate> = AppointmentStatus::ALL
        .into_iter()
        .filter(|s| s.holds_slots())
        .map(|s| Predicate::Token {
            system: None,
            code: Some(s.as_str().to_owned()),
        })
        .collect();
    let mut query = SearchQuery::new(ResourceType::Appointment)
        .with("slot", Predicate::Reference(slot_ref.clone()));
    query.clauses.push(Clause {
        param: "status".into(),
        any_of: holding,
    });
    let found = search_all(tx, query)?;
    let mut out = Vec::with_capacity(found.len());
    for s in found {
        // Double-check against the JSON itself (the index is derived from it, but be exact).
        let holds = AppointmentView::from_json(&json_of(&s)?)
            .is_ok_and(|v| v.status.holds_slots() && v.slots.contains(&slot_ref));
        if holds {
            out.push(s);
        }
    }
    Ok(out)
}

/// The references of a list of stored resources, for messages.
pub(crate) fn refs(list: &[Stored]) -> String {
    list.iter()
        .map(|s| reference(s.rtype, &s.id))
        .collect::<Vec<_>>()
        .join(", ")
}
