//! Appointment writes: booking, rescheduling, status changes, with slot claims and releases.

use fhir::ResourceType as RT;
use scheduling::{
    AppointmentStatus, AppointmentView, Coding, Decision, EventKind, FieldError, decide,
    format_instant_utc, parse_instant_ms,
};
use serde_json::{Value, json};
use store::{StoreError, Stored, Tx};

use crate::error::BookingError;
use crate::util::{
    Incoming, check_expected, event, holders, is_active, json_of, live, local_id, put, reference,
    refs, shared_json_of, status_of,
};
use crate::{Outcome, Refusal};

/// Create or update `Appointment/{id}` through the state machine. See [`crate::write_resource`].
pub(crate) fn write_appointment(
    tx: &mut dyn Tx,
    id: &str,
    resource: impl Into<Incoming>,
    expected: Option<u64>,
) -> Refusal<Outcome> {
    write_appointment_known(tx, id, resource.into(), expected, None)
}

/// [`write_appointment`], given the current live version and its view when the caller has just read them in
/// this transaction (nothing can have changed them since), so they are neither read nor parsed again.
fn write_appointment_known(
    tx: &mut dyn Tx,
    id: &str,
    resource: Incoming,
    expected: Option<u64>,
    known: Option<(Stored, AppointmentView)>,
) -> Refusal<Outcome> {
    let (current, known_view) = match known {
        Some((stored, view)) => (Some(stored), Some(view)),
        None => (live(tx, RT::Appointment, id)?, None),
    };
    let live_version = current.as_ref().map_or(0, |c| c.version);
    check_expected(RT::Appointment, id, expected, live_version)?;

    let proposed = match AppointmentView::from_json(resource.value()) {
        Ok(v) => v,
        Err(errors) => return Ok(Err(field_errors(&errors))),
    };
    let current_view = match (&current, known_view) {
        (_, Some(view)) => Some(view),
        (None, None) => None,
        (Some(c), None) => match AppointmentView::from_json(&json_of(c)?) {
            Ok(v) => Some(v),
            Err(errors) => {
                return Ok(Err(BookingError::conflict(
                    format!(
                        "the stored version of Appointment/{id} cannot be interpreted ({}); correct it as entered-in-error and rebook",
                        join(&errors)
                    ),
                    None,
                )));
            }
        },
    };
    let decision = match decide(current_view.as_ref(), &proposed, tx.now_ms()) {
        Ok(d) => d,
        Err(e) => return Ok(Err(BookingError::Decision(e))),
    };
    let Some(main) = decision
        .events
        .iter()
        .find(|e| e.kind.is_appointment_event())
    else {
        return Err(StoreError::Backend(
            "scheduling::decide returned no appointment event".into(),
        ));
    };
    let kind = main.kind;
    let data = main.data.clone();

    // The slots to claim as `check` read them (claimed below in the same job, so still as read).
    let mut checked_slots = Vec::new();
    if let Err(e) = check(
        tx,
        id,
        resource.value(),
        current_view.as_ref(),
        &proposed,
        &decision,
        kind,
        &mut checked_slots,
    )? {
        return Ok(Err(e));
    }

    // Every check passed: from here on, a failure is an Err (rolling the closure back), never Ok(Err).
    let stored = put(
        tx,
        RT::Appointment,
        id,
        resource,
        Some(expected.unwrap_or(live_version)),
    )?;
    event(tx, &stored, kind.as_str(), data)?;
    let appointment = reference(RT::Appointment, id);
    for slot in &decision.release {
        release(tx, slot, &appointment)?;
    }
    for slot in &decision.claim {
        let known = checked_slots
            .iter()
            .position(|(r, _, _)| r == slot)
            .map(|i| checked_slots.swap_remove(i))
            .map(|(_, stored, json)| (stored, json));
        claim(tx, slot, &appointment, known)?;
    }
    Ok(Ok(if current.is_some() {
        Outcome::Updated(stored)
    } else {
        Outcome::Created(stored)
    }))
}

/// Business checks beyond the state machine, all read-only.
#[allow(
    clippy::too_many_arguments,
    reason = "the inputs of one decision, each used once"
)]
fn check(
    tx: &mut dyn Tx,
    id: &str,
    resource: &Value,
    current: Option<&AppointmentView>,
    proposed: &AppointmentView,
    decision: &Decision,
    kind: EventKind,
    checked_slots: &mut Vec<(String, Stored, Value)>,
) -> store::Result<Result<(), BookingError>> {
    // The appointment a rebooking replaces must exist (checked when the link is new).
    if let Some(replaces) = &proposed.replaces
        && current.and_then(|c| c.replaces.as_ref()) != Some(replaces)
    {
        let expression = Some("Appointment.extension".to_owned());
        let Some(old_id) = local_id(replaces, RT::Appointment) else {
            return Ok(Err(BookingError::invalid(
                format!("previousAppointment must reference Appointment/{{id}}, got '{replaces}'"),
                expression,
            )));
        };
        if old_id == id {
            return Ok(Err(BookingError::invalid(
                "an appointment cannot replace itself",
                expression,
            )));
        }
        if live(tx, RT::Appointment, old_id)?.is_none() {
            return Ok(Err(BookingError::invalid(
                format!("previousAppointment {replaces} does not exist"),
                expression,
            )));
        }
    }

    if !proposed.status.holds_slots() || !matches!(kind, EventKind::Booked | EventKind::Rescheduled)
    {
        return Ok(Ok(()));
    }

    // A booking (or a move) of slots: the patient must be a live, active Patient.
    if !proposed.slots.is_empty() {
        let Some(patient) = &proposed.patient else {
            return Ok(Err(BookingError::invalid(
                "a booking that claims slots needs a participant whose actor is a Patient",
                Some("Appointment.participant".into()),
            )));
        };
        if kind == EventKind::Booked
            && let Some(patient_id) = local_id(patient, RT::Patient)
        {
            match live(tx, RT::Patient, patient_id)? {
                None => {
                    return Ok(Err(BookingError::invalid(
                        format!("{patient} does not exist"),
                        Some("Appointment.participant".into()),
                    )));
                }
                Some(p) => {
                    let pj = shared_json_of(&p)?;
                    if !is_active(&pj) {
                        let hint = replaced_by(&pj)
                            .map(|r| format!("; it was merged into {r}, book for that patient"))
                            .unwrap_or_default();
                        return Ok(Err(BookingError::conflict(
                            format!("{patient} is not active{hint}"),
                            Some("Appointment.participant".into()),
                        )));
                    }
                }
            }
        }
    }

    // Every slot: exists, claimable when newly claimed, in an active schedule; together they cover exactly
    // start..end without gaps.
    let mut periods: Vec<(i64, i64, String)> = Vec::with_capacity(proposed.slots.len());
    for slot_ref in &proposed.slots {
        let expression = Some(slot_expression(resource, slot_ref));
        let Some(slot_id) = local_id(slot_ref, RT::Slot) else {
            return Ok(Err(BookingError::invalid(
                format!("a booked slot must be referenced as Slot/{{id}}, got '{slot_ref}'"),
                expression,
            )));
        };
        let Some(slot) = live(tx, RT::Slot, slot_id)? else {
            return Ok(Err(BookingError::invalid(
                format!("{slot_ref} does not exist"),
                expression,
            )));
        };
        let sj = json_of(&slot)?;
        if decision.claim.contains(slot_ref) {
            let status = status_of(&sj).unwrap_or("(none)");
            if status != "free" {
                let by = holders(tx, slot_id)?;
                let held = if by.is_empty() {
                    String::new()
                } else {
                    format!(", held by {}", refs(&by))
                };
                return Ok(Err(BookingError::conflict(
                    format!("{slot_ref} is not free (status {status}{held})"),
                    expression,
                )));
            }
        }
        let schedule_ref = sj
            .pointer("/schedule/reference")
            .and_then(Value::as_str)
            .unwrap_or("");
        let schedule = match local_id(schedule_ref, RT::Schedule) {
            Some(sid) => live(tx, RT::Schedule, sid)?,
            None => None,
        };
        match schedule {
            None => {
                return Ok(Err(BookingError::invalid(
                    format!(
                        "{slot_ref} does not lie in a known Schedule (schedule '{schedule_ref}')"
                    ),
                    expression,
                )));
            }
            Some(s) if !is_active(shared_json_of(&s)?.as_ref()) => {
                return Ok(Err(BookingError::conflict(
                    format!("{slot_ref} belongs to {schedule_ref}, which is not active"),
                    expression,
                )));
            }
            Some(_) => {}
        }
        let instant = |name: &str| {
            sj.get(name)
                .and_then(Value::as_str)
                .and_then(parse_instant_ms)
        };
        let (Some(start), Some(end)) = (instant("start"), instant("end")) else {
            return Ok(Err(BookingError::invalid(
                format!("{slot_ref} has no usable start and end"),
                expression,
            )));
        };
        periods.push((start, end, slot_ref.clone()));
        if decision.claim.contains(slot_ref) {
            checked_slots.push((slot_ref.clone(), slot, sj));
        }
    }
    if periods.is_empty() {
        return Ok(Ok(()));
    }
    periods.sort();
    for pair in periods.windows(2) {
        if let [a, b] = pair
            && a.1 != b.0
        {
            return Ok(Err(BookingError::invalid(
                format!(
                    "the slots of an appointment must be contiguous: {} ends at {} but {} starts at {}",
                    a.2,
                    format_instant_utc(a.1),
                    b.2,
                    format_instant_utc(b.0)
                ),
                Some("Appointment.slot".into()),
            )));
        }
    }
    let first_start = periods.first().map(|p| p.0);
    let last_end = periods.last().map(|p| p.1);
    if proposed.start_ms != first_start {
        return Ok(Err(BookingError::invalid(
            format!(
                "Appointment.start must equal the start of its first slot ({})",
                first_start.map(format_instant_utc).unwrap_or_default()
            ),
            Some("Appointment.start".into()),
        )));
    }
    if proposed.end_ms != last_end {
        return Ok(Err(BookingError::invalid(
            format!(
                "Appointment.end must equal the end of its last slot ({})",
                last_end.map(format_instant_utc).unwrap_or_default()
            ),
            Some("Appointment.end".into()),
        )));
    }
    Ok(Ok(()))
}

/// Mark a checked-free slot busy, with `expected_version` so a concurrent claim on another backend fails.
/// `known`: the slot and its JSON as read earlier in this job, when they were.
fn claim(
    tx: &mut dyn Tx,
    slot_ref: &str,
    appointment: &str,
    known: Option<(Stored, Value)>,
) -> store::Result<()> {
    let taken = || StoreError::Conflict(format!("{slot_ref} was taken by a concurrent booking"));
    let slot_id = local_id(slot_ref, RT::Slot).ok_or_else(taken)?;
    let (slot, mut sj) = match known {
        Some(pair) => pair,
        None => {
            let slot = live(tx, RT::Slot, slot_id)?.ok_or_else(taken)?;
            let sj = json_of(&slot)?;
            (slot, sj)
        }
    };
    if status_of(&sj) != Some("free") {
        return Err(taken());
    }
    if let Some(obj) = sj.as_object_mut() {
        obj.insert("status".into(), json!("busy"));
    }
    let stored = match put(tx, RT::Slot, slot_id, sj, Some(slot.version)) {
        Ok(s) => s,
        Err(StoreError::VersionConflict { .. }) => return Err(taken()),
        Err(e) => return Err(e),
    };
    event(
        tx,
        &stored,
        "slot.claimed",
        json!({"slot": slot_ref, "appointment": appointment}),
    )
}

/// Mark a held slot free again (nothing to do when it is gone or not busy).
fn release(tx: &mut dyn Tx, slot_ref: &str, appointment: &str) -> store::Result<()> {
    let Some(slot_id) = local_id(slot_ref, RT::Slot) else {
        return Ok(());
    };
    let Some(slot) = live(tx, RT::Slot, slot_id)? else {
        return Ok(());
    };
    let mut sj = json_of(&slot)?;
    if status_of(&sj) != Some("busy") {
        return Ok(());
    }
    if let Some(obj) = sj.as_object_mut() {
        obj.insert("status".into(), json!("free"));
    }
    let stored = put(tx, RT::Slot, slot_id, sj, Some(slot.version))?;
    event(
        tx,
        &stored,
        "slot.released",
        json!({"slot": slot_ref, "appointment": appointment}),
    )
}

/// `$transition`: the current appointment with a new status (and cancellation reason), applied as an update.
pub(crate) fn transition(
    tx: &mut dyn Tx,
    id: &str,
    to: &str,
    reason: Option<Coding>,
) -> Refusal<Stored> {
    let Some(current) = live(tx, RT::Appointment, id)? else {
        return Ok(Err(BookingError::not_found(RT::Appointment, id)));
    };
    let Some(status) = AppointmentStatus::parse(to) else {
        return Ok(Err(BookingError::invalid(
            format!("'{to}' is not an appointment status code"),
            Some("status".into()),
        )));
    };
    if reason.is_some() && status != AppointmentStatus::Cancelled {
        return Ok(Err(BookingError::invalid(
            format!("a cancellation reason goes only with status cancelled, not {status} (app-4)"),
            Some("reason".into()),
        )));
    }
    let mut resource = json_of(&current)?;
    // The current version's view, for write_appointment (which would otherwise read and parse it again).
    let view = AppointmentView::from_json(&resource).ok();
    if let Some(obj) = resource.as_object_mut() {
        obj.insert("status".into(), json!(status.as_str()));
        if let Some(r) = reason {
            let mut coding = serde_json::Map::new();
            if let Some(system) = r.system {
                coding.insert("system".into(), json!(system));
            }
            if let Some(code) = r.code {
                coding.insert("code".into(), json!(code));
            }
            obj.insert(
                "cancelationReason".into(),
                json!({"coding": [Value::Object(coding)]}),
            );
        }
    }
    let version = current.version;
    let known = view.map(|v| (current, v));
    Ok(
        write_appointment_known(tx, id, resource.into(), Some(version), known)?
            .map(Outcome::into_stored),
    )
}

/// The FHIRPath of the first `slot` entry referencing `slot_ref`.
fn slot_expression(resource: &Value, slot_ref: &str) -> String {
    resource
        .get("slot")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .position(|s| s.get("reference").and_then(Value::as_str) == Some(slot_ref))
        })
        .map_or_else(
            || "Appointment.slot".to_owned(),
            |i| format!("Appointment.slot[{i}]"),
        )
}

/// `link` with type replaced-by, if any.
pub(crate) fn replaced_by(patient: &Value) -> Option<String> {
    patient
        .get("link")
        .and_then(Value::as_array)?
        .iter()
        .find(|l| l.get("type").and_then(Value::as_str) == Some("replaced-by"))
        .and_then(|l| l.pointer("/other/reference"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn field_errors(errors: &[FieldError]) -> BookingError {
    BookingError::invalid(join(errors), errors.first().map(|e| e.path.clone()))
}
