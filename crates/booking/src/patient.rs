//! Patient writes: one active Patient per NHS number, and merging duplicates.

use fhir::{NHS_NUMBER_SYSTEM, NhsNumber, ResourceType as RT};
use scheduling::parse_instant_ms;
use serde_json::{Value, json};
use store::{Clause, Predicate, SearchQuery, Stored, Tx};

use crate::appointment::replaced_by;
use crate::error::BookingError;
use crate::util::{
    Incoming, check_expected, event, first_page, is_active, json_of, live, put, reference,
    search_all,
};
use crate::{MergeResult, Outcome, Refusal, event_kind};

/// Create or update `Patient/{id}`, refusing an NHS number held by another active Patient.
pub(crate) fn write_patient(
    tx: &mut dyn Tx,
    id: &str,
    resource: Incoming,
    expected: Option<u64>,
) -> Refusal<Outcome> {
    let current = live(tx, RT::Patient, id)?;
    let live_version = current.as_ref().map_or(0, |c| c.version);
    check_expected(RT::Patient, id, expected, live_version)?;
    if is_active(resource.value()) {
        for number in nhs_numbers(resource.value()) {
            if let Some(other) = active_holder(tx, &number, id)? {
                let existing = reference(RT::Patient, &other.id);
                return Ok(Err(BookingError::Duplicate {
                    message: format!(
                        "NHS number {number} already belongs to active patient {existing}; update that record (or merge the two) instead"
                    ),
                    existing: Some(existing),
                    expression: Some("Patient.identifier".into()),
                }));
            }
        }
    }
    let stored = put(
        tx,
        RT::Patient,
        id,
        resource,
        Some(expected.unwrap_or(live_version)),
    )?;
    let created = current.is_none();
    event(
        tx,
        &stored,
        &event_kind(RT::Patient, if created { "created" } else { "updated" }),
        Value::Null,
    )?;
    Ok(Ok(if created {
        Outcome::Created(stored)
    } else {
        Outcome::Updated(stored)
    }))
}

/// The NHS numbers of a Patient in canonical 10-digit form (the value as given when it does not parse).
fn nhs_numbers(resource: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let Some(ids) = resource.get("identifier").and_then(Value::as_array) else {
        return out;
    };
    for identifier in ids {
        if identifier.get("system").and_then(Value::as_str) != Some(NHS_NUMBER_SYSTEM) {
            continue;
        }
        let Some(value) = identifier.get("value").and_then(Value::as_str) else {
            continue;
        };
        let canonical =
            NhsNumber::parse(value).map_or_else(|_| value.to_owned(), |n| n.as_str().to_owned());
        if !out.contains(&canonical) {
            out.push(canonical);
        }
    }
    out
}

/// The searches [`write_patient`] runs for `resource` (the first page of each), to be told ahead.
pub(crate) fn holder_searches(resource: &Value) -> Vec<SearchQuery> {
    if !is_active(resource) {
        return Vec::new();
    }
    nhs_numbers(resource)
        .iter()
        .map(|n| first_page(holder_query(n)))
        .collect()
}

/// Another active Patient (id != `except`) holding `number`.
fn active_holder(tx: &mut dyn Tx, number: &str, except: &str) -> store::Result<Option<Stored>> {
    for candidate in search_all(tx, holder_query(number))? {
        if candidate.id == except {
            continue;
        }
        let json = json_of(&candidate)?;
        if is_active(&json) && nhs_numbers(&json).iter().any(|n| n == number) {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

/// Patients with `number` as an NHS number. The index keeps identifier values as written, so the usual
/// spellings (`9434765919`, `943 476 5919`, `943-476-5919`) are all looked up.
fn holder_query(number: &str) -> SearchQuery {
    let mut spellings = vec![number.to_owned()];
    if let (Some(a), Some(b), Some(c)) = (number.get(..3), number.get(3..6), number.get(6..))
        && number.len() == 10
    {
        spellings.push(format!("{a} {b} {c}"));
        spellings.push(format!("{a}-{b}-{c}"));
    }
    SearchQuery {
        clauses: vec![Clause {
            param: "identifier".into(),
            any_of: spellings
                .into_iter()
                .map(|code| Predicate::Token {
                    system: Some(NHS_NUMBER_SYSTEM.to_owned()),
                    code: Some(code),
                })
                .collect(),
        }],
        ..SearchQuery::new(RT::Patient)
    }
}

/// Merge `source` into `target`. See [`crate::merge_patients`].
pub(crate) fn merge(tx: &mut dyn Tx, source_id: &str, target_id: &str) -> Refusal<MergeResult> {
    if source_id == target_id {
        return Ok(Err(BookingError::invalid(
            format!("cannot merge Patient/{source_id} into itself"),
            None,
        )));
    }
    let Some(source) = live(tx, RT::Patient, source_id)? else {
        return Ok(Err(BookingError::not_found(RT::Patient, source_id)));
    };
    let Some(target) = live(tx, RT::Patient, target_id)? else {
        return Ok(Err(BookingError::not_found(RT::Patient, target_id)));
    };
    let source_ref = reference(RT::Patient, source_id);
    let target_ref = reference(RT::Patient, target_id);
    let mut source_json = json_of(&source)?;
    let mut target_json = json_of(&target)?;
    if !is_active(&target_json) {
        let hint = replaced_by(&target_json)
            .map(|r| format!(" (it was merged into {r})"))
            .unwrap_or_default();
        return Ok(Err(BookingError::conflict(
            format!("cannot merge into {target_ref}: it is not active{hint}"),
            None,
        )));
    }
    if !is_active(&source_json) {
        let hint = replaced_by(&source_json)
            .map(|r| format!(" (already merged into {r})"))
            .unwrap_or_default();
        return Ok(Err(BookingError::conflict(
            format!("cannot merge {source_ref}: it is not active{hint}"),
            None,
        )));
    }

    // The source's future appointments, rewritten to the target (computed before any write).
    let now = tx.now_ms();
    let query =
        SearchQuery::new(RT::Appointment).with("patient", Predicate::Reference(source_ref.clone()));
    let mut moves: Vec<(Stored, Value)> = Vec::new();
    for appointment in search_all(tx, query)? {
        let mut json = json_of(&appointment)?;
        let start = json
            .get("start")
            .and_then(Value::as_str)
            .and_then(parse_instant_ms);
        if start.is_none_or(|s| s <= now) {
            continue;
        }
        let mut changed = false;
        if let Some(participants) = json.get_mut("participant").and_then(Value::as_array_mut) {
            for p in participants {
                if let Some(r) = p.pointer_mut("/actor/reference")
                    && r.as_str() == Some(source_ref.as_str())
                {
                    *r = json!(target_ref);
                    changed = true;
                }
            }
        }
        if changed {
            moves.push((appointment, json));
        }
    }

    if let Some(obj) = source_json.as_object_mut() {
        obj.insert("active".into(), json!(false));
    }
    push_link(&mut source_json, &target_ref, "replaced-by");
    push_link(&mut target_json, &source_ref, "replaces");

    let source = put(
        tx,
        RT::Patient,
        source_id,
        source_json,
        Some(source.version),
    )?;
    event(tx, &source, "patient.merged", json!({"target": target_ref}))?;
    let target = put(
        tx,
        RT::Patient,
        target_id,
        target_json,
        Some(target.version),
    )?;
    event(
        tx,
        &target,
        "patient.updated",
        json!({"mergedFrom": source_ref}),
    )?;
    let mut appointments = Vec::with_capacity(moves.len());
    for (old, json) in moves {
        let data = json!({
            "mergedFrom": source_ref,
            "patient": target_ref,
            "status": json.get("status"),
            "start": json.get("start"),
            "end": json.get("end"),
        });
        let stored = put(tx, RT::Appointment, &old.id, json, Some(old.version))?;
        event(tx, &stored, "appointment.updated", data)?;
        appointments.push(stored);
    }
    Ok(Ok(MergeResult {
        source,
        target,
        appointments,
    }))
}

fn push_link(patient: &mut Value, other: &str, link_type: &str) {
    let Some(obj) = patient.as_object_mut() else {
        return;
    };
    let link = json!({"other": {"reference": other}, "type": link_type});
    match obj.get_mut("link").and_then(Value::as_array_mut) {
        Some(links) => {
            if !links.contains(&link) {
                links.push(link);
            }
        }
        None => {
            obj.insert("link".into(), json!([link]));
        }
    }
}
