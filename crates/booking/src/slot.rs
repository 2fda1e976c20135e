//! Slot and Schedule guards, and `$generate-slots`.

use fhir::ResourceType as RT;
use scheduling::{SlotTemplate, parse_instant_ms};
use serde_json::Value;
use store::{Predicate, SearchQuery, Tx};

use crate::error::BookingError;
use crate::util::{
    check_expected, event, holders, is_active, json_of, live, put, reference, refs, search_all,
    status_of,
};
use crate::{GenerateResult, Outcome, Refusal, event_kind};

/// Create or update `Slot/{id}` written directly (not by a booking).
///
/// Keeps "never a busy slot without a booking, never two bookings on a slot": a slot is never made `busy`
/// here (only a booking does that; `busy-unavailable` blocks time), and a slot held by an appointment keeps
/// its status, start, end and schedule (other elements, such as a comment, may change).
pub(crate) fn write_slot(
    tx: &mut dyn Tx,
    id: &str,
    resource: Value,
    expected: Option<u64>,
) -> Refusal<Outcome> {
    let current = live(tx, RT::Slot, id)?;
    let live_version = current.as_ref().map_or(0, |c| c.version);
    check_expected(RT::Slot, id, expected, live_version)?;
    let new_status = status_of(&resource).unwrap_or("");
    match &current {
        None => {
            if new_status == "busy" {
                return Ok(Err(BookingError::conflict(
                    "a Slot cannot be created busy: only a booking makes a slot busy (use busy-unavailable to block time)",
                    Some("Slot.status".into()),
                )));
            }
        }
        Some(c) => {
            let cj = json_of(c)?;
            let held = holders(tx, id)?;
            if !held.is_empty() {
                if let Some(field) = changed_core_field(&cj, &resource) {
                    return Ok(Err(BookingError::conflict(
                        format!(
                            "Slot/{id} is held by {}: its {field} cannot change while booked (cancel or reschedule the appointment first)",
                            refs(&held)
                        ),
                        Some(format!("Slot.{field}")),
                    )));
                }
            } else if new_status == "busy" && status_of(&cj) != Some("busy") {
                return Ok(Err(BookingError::conflict(
                    format!(
                        "Slot/{id} cannot be set busy directly: only a booking makes a slot busy (use busy-unavailable to block time)"
                    ),
                    Some("Slot.status".into()),
                )));
            }
        }
    }
    let stored = put(
        tx,
        RT::Slot,
        id,
        resource,
        Some(expected.unwrap_or(live_version)),
    )?;
    let created = current.is_none();
    event(
        tx,
        &stored,
        &event_kind(RT::Slot, if created { "created" } else { "updated" }),
        Value::Null,
    )?;
    Ok(Ok(if created {
        Outcome::Created(stored)
    } else {
        Outcome::Updated(stored)
    }))
}

/// The first of status, start, end, schedule that differs (instants compared as instants).
fn changed_core_field(old: &Value, new: &Value) -> Option<&'static str> {
    if status_of(old) != status_of(new) {
        return Some("status");
    }
    for name in ["start", "end"] {
        let instant = |v: &Value| {
            let s = v.get(name).and_then(Value::as_str);
            (s.and_then(parse_instant_ms), s.map(str::to_owned))
        };
        let (a, b) = (instant(old), instant(new));
        let differs = match (a.0, b.0) {
            (Some(x), Some(y)) => x != y,
            _ => a.1 != b.1,
        };
        if differs {
            return Some(name);
        }
    }
    let schedule = |v: &Value| v.pointer("/schedule/reference").cloned();
    (schedule(old) != schedule(new)).then_some("schedule")
}

/// Refuse deleting a slot an appointment holds.
pub(crate) fn check_slot_delete(
    tx: &mut dyn Tx,
    id: &str,
) -> store::Result<Result<(), BookingError>> {
    let held = holders(tx, id)?;
    if held.is_empty() {
        return Ok(Ok(()));
    }
    Ok(Err(BookingError::conflict(
        format!(
            "Slot/{id} is held by {}; cancel or reschedule the appointment before deleting the slot",
            refs(&held)
        ),
        None,
    )))
}

/// Refuse deleting a schedule with slots held by appointments.
pub(crate) fn check_schedule_delete(
    tx: &mut dyn Tx,
    id: &str,
) -> store::Result<Result<(), BookingError>> {
    let query = SearchQuery::new(RT::Slot)
        .with(
            "schedule",
            Predicate::Reference(reference(RT::Schedule, id)),
        )
        .with(
            "status",
            Predicate::Token {
                system: None,
                code: Some("busy".into()),
            },
        );
    for slot in search_all(tx, query)? {
        let held = holders(tx, &slot.id)?;
        if !held.is_empty() {
            return Ok(Err(BookingError::conflict(
                format!(
                    "Schedule/{id} has booked slots (Slot/{} is held by {}); cancel or move those appointments first",
                    slot.id,
                    refs(&held)
                ),
                None,
            )));
        }
    }
    Ok(Ok(()))
}

/// Elements copied from the Schedule onto each generated Slot, so slots are searchable by them.
const COPIED_FROM_SCHEDULE: [&str; 3] = ["serviceCategory", "serviceType", "specialty"];

/// `$generate-slots`. See [`crate::generate_slots`].
pub(crate) fn generate(
    tx: &mut dyn Tx,
    schedule_id: &str,
    template: &SlotTemplate,
) -> Refusal<GenerateResult> {
    if template.schedule_id != schedule_id {
        return Ok(Err(BookingError::invalid(
            format!(
                "the template is for schedule '{}', not '{schedule_id}'",
                template.schedule_id
            ),
            None,
        )));
    }
    let Some(schedule) = live(tx, RT::Schedule, schedule_id)? else {
        return Ok(Err(BookingError::not_found(RT::Schedule, schedule_id)));
    };
    let schedule_json = json_of(&schedule)?;
    if !is_active(&schedule_json) {
        return Ok(Err(BookingError::conflict(
            format!(
                "Schedule/{schedule_id} is not active; slots are generated only for active schedules"
            ),
            None,
        )));
    }
    let specs = match scheduling::generate_slots(template) {
        Ok(s) => s,
        Err(e) => return Ok(Err(BookingError::invalid(e.to_string(), None))),
    };
    let schedule_ref = reference(RT::Schedule, schedule_id);
    let mut result = GenerateResult {
        created: 0,
        skipped: 0,
        slots: Vec::new(),
    };
    for spec in specs {
        // Any stored version (a deleted slot included: it was withdrawn on purpose) counts as existing.
        if tx.read(RT::Slot, &spec.key)?.is_some() {
            result.skipped += 1;
            continue;
        }
        let mut json = spec.to_fhir_json(&schedule_ref);
        if let Some(obj) = json.as_object_mut() {
            for name in COPIED_FROM_SCHEDULE {
                if let Some(v) = schedule_json.get(name) {
                    obj.insert(name.to_owned(), v.clone());
                }
            }
        }
        let stored = put(tx, RT::Slot, &spec.key, json, Some(0))?;
        event(tx, &stored, "slot.created", Value::Null)?;
        result.created += 1;
        result.slots.push(stored);
    }
    Ok(Ok(result))
}
