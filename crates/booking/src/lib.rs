//! The booking engine of Carebridge: every create, update and delete of a FHIR resource, plus the
//! `$merge`, `$generate-slots` and `$transition` operations, as service functions that run **inside** one
//! [`store::Store::write`] closure.
//!
//! Why it exists: the rules that keep appointments, slots and patients consistent must hold whichever entry
//! point changes them (FHIR REST today; BaRS, GP Connect and HL7 v2 later). `scheduling` decides what an
//! appointment change means; this crate applies it to the store: it reads what it needs, checks, writes the
//! new versions, claims and releases slots, and appends the outbox events, all in the caller's transaction.
//!
//! Invariants:
//! - A slot is `busy` exactly when one appointment holds it (status booked, arrived, checked-in, fulfilled or
//!   noshow, listing it), and no slot is held by two appointments. Only bookings make slots busy.
//! - Every accepted change appends its events (subject `Type/id`) in the same transaction.
//! - Refusals are returned as `Ok(Err(BookingError))` and are always decided **before** the first write, so
//!   the closure may return them as `Ok(..)` without leaving a partial change behind. Failures after a write
//!   are `Err(StoreError)`, which rolls the closure back. A stale `If-Match` is checked first of all and
//!   surfaces as `Err(StoreError::VersionConflict)` (HTTP 412).
//! - No IO of its own, no clock (time is [`store::Tx::now_ms`]), no panics.
//!
//! Call pattern (the REST layer):
//! ```ignore
//! let out = store.write(move |tx| booking::write_resource(tx, rtype, id, resource, expected)).await?;
//! match out { Ok(outcome) => /* 201/200 */, Err(refusal) => /* refusal.http_status(), refusal.issues() */ }
//! ```

pub mod ahead;
mod appointment;
mod error;
mod patient;
mod slot;
pub mod subscription;
mod util;

use fhir::ResourceType;
use serde_json::Value;
use store::{Stored, Tx};

pub use error::BookingError;
pub use scheduling;
pub use scheduling::{Coding, SlotTemplate};
pub use util::Incoming;

/// What a service function returns inside the write closure: `Err` = storage failure (or a late conflict
/// that must roll back), `Ok(Err)` = a refusal decided before anything was written.
pub type Refusal<T> = store::Result<Result<T, BookingError>>;

/// The result of [`write_resource`].
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The resource did not exist (or was deleted): HTTP 201.
    Created(Stored),
    /// A new version of a live resource: HTTP 200.
    Updated(Stored),
}

impl Outcome {
    pub fn stored(&self) -> &Stored {
        match self {
            Outcome::Created(s) | Outcome::Updated(s) => s,
        }
    }

    pub fn into_stored(self) -> Stored {
        match self {
            Outcome::Created(s) | Outcome::Updated(s) => s,
        }
    }

    pub fn is_created(&self) -> bool {
        matches!(self, Outcome::Created(_))
    }
}

/// The result of [`merge_patients`].
#[derive(Debug, Clone, PartialEq)]
pub struct MergeResult {
    /// The source's new version: `active: false`, `link` replaced-by the target.
    pub source: Stored,
    /// The target's new version: `link` replaces the source.
    pub target: Stored,
    /// The moved future appointments (new versions).
    pub appointments: Vec<Stored>,
}

/// The result of [`generate_slots`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateResult {
    pub created: usize,
    /// Slots whose id (the `SlotSpec` key) already had a stored version, deleted ones included.
    pub skipped: usize,
    /// The created slots.
    pub slots: Vec<Stored>,
}

/// Kind of the domain event for a plain change of `rtype` (`action` is `created`, `updated` or `deleted`):
/// `patient.registered` for a new Patient, `practitioner-role.*` and `healthcare-service.*` for the two
/// compound names, `<type in lower case>.<action>` otherwise.
pub fn event_kind(rtype: ResourceType, action: &str) -> String {
    let key = match rtype {
        ResourceType::PractitionerRole => "practitioner-role",
        ResourceType::HealthcareService => "healthcare-service",
        ResourceType::Patient if action == "created" => return "patient.registered".to_owned(),
        other => return format!("{}.{action}", other.as_str().to_ascii_lowercase()),
    };
    format!("{key}.{action}")
}

/// Create or update `rtype/id` with `resource` (already validated by `fhir`), the single entry point for
/// create and update of any type. `expected_version` is the `If-Match` version (`Some(0)` = must not exist).
///
/// - Appointment: `scheduling::decide` on (current, proposed, now); a booking or a move additionally needs
///   each slot to exist, be free when newly claimed, lie in an active Schedule, and the slots to be contiguous
///   and span exactly `start..end`; a booking that claims slots needs a live, active Patient participant; a
///   `previousAppointment` extension must name an existing appointment. Then the new version, the
///   `appointment.*` event, `slot.released` and `slot.claimed` (slots become free / busy) are written.
/// - Patient: refused ([`BookingError::Duplicate`], `existing: Some("Patient/{id}")`) when the resource is
///   active and another active Patient holds one of its NHS numbers. Events `patient.registered` /
///   `patient.updated`.
/// - Slot: never made busy here; a slot held by an appointment keeps its status, start, end and schedule.
///   Events `slot.created` / `slot.updated`.
/// - Any other type: a plain put and `<type>.created` / `<type>.updated` ([`event_kind`]).
pub fn write_resource(
    tx: &mut dyn Tx,
    rtype: ResourceType,
    id: String,
    resource: impl Into<Incoming>,
    expected_version: Option<u64>,
) -> Refusal<Outcome> {
    let resource = resource.into();
    if !util::valid_id(&id) {
        return Ok(Err(BookingError::invalid(
            format!("'{id}' is not a valid FHIR id"),
            Some(format!("{rtype}.id")),
        )));
    }
    match rtype {
        ResourceType::Appointment => {
            appointment::write_appointment(tx, &id, resource, expected_version)
        }
        ResourceType::Patient => patient::write_patient(tx, &id, resource, expected_version),
        ResourceType::Slot => slot::write_slot(tx, &id, resource.into_value(), expected_version),
        ResourceType::Subscription => {
            subscription::write_subscription(tx, &id, resource.into_value(), expected_version)
        }
        _ => {
            let current = util::live(tx, rtype, &id)?;
            let live_version = current.as_ref().map_or(0, |c| c.version);
            util::check_expected(rtype, &id, expected_version, live_version)?;
            let stored = util::put(
                tx,
                rtype,
                &id,
                resource,
                Some(expected_version.unwrap_or(live_version)),
            )?;
            let created = current.is_none();
            util::event(
                tx,
                &stored,
                &event_kind(rtype, if created { "created" } else { "updated" }),
                Value::Null,
            )?;
            Ok(Ok(if created {
                Outcome::Created(stored)
            } else {
                Outcome::Updated(stored)
            }))
        }
    }
}

/// Delete `rtype/id` (a tombstone version and a `<type>.deleted` event). `Ok(Ok(None))` when there was
/// nothing live to delete.
///
/// Refused (409): an Appointment in a slot-holding status (booked, arrived, checked-in, fulfilled, noshow:
/// cancel it or mark it entered-in-error instead); a Slot held by an appointment; a Schedule with slots held by
/// appointments. Deleting a cancelled (or otherwise non-holding) appointment releases nothing.
pub fn delete_resource(
    tx: &mut dyn Tx,
    rtype: ResourceType,
    id: &str,
    expected_version: Option<u64>,
) -> Refusal<Option<Stored>> {
    let current = util::live(tx, rtype, id)?;
    util::check_expected(
        rtype,
        id,
        expected_version,
        current.as_ref().map_or(0, |c| c.version),
    )?;
    let Some(current) = current else {
        return Ok(Ok(None));
    };
    let refusal = match rtype {
        ResourceType::Appointment => {
            let json = util::json_of(&current)?;
            let status = util::status_of(&json)
                .and_then(scheduling::AppointmentStatus::parse)
                .filter(|s| s.holds_slots());
            match status {
                Some(s) => Err(BookingError::conflict(
                    format!(
                        "Appointment/{id} is {s}; cancel it (or mark it entered-in-error) instead of deleting it"
                    ),
                    None,
                )),
                None => Ok(()),
            }
        }
        ResourceType::Slot => slot::check_slot_delete(tx, id)?,
        ResourceType::Schedule => slot::check_schedule_delete(tx, id)?,
        _ => Ok(()),
    };
    if let Err(e) = refusal {
        return Ok(Err(e));
    }
    let deleted = tx.delete(rtype, id, Some(current.version))?;
    if rtype == ResourceType::Subscription {
        tx.kv_put(subscription::SECRET_NAMESPACE, id, None)?;
    }
    if let Some(s) = &deleted {
        util::event(tx, s, &event_kind(rtype, "deleted"), Value::Null)?;
    }
    Ok(Ok(deleted))
}

/// Merge duplicate patients: `source` becomes `active: false` with `link` {other: target, type:
/// replaced-by}; `target` gets `link` {other: source, type: replaces}; every appointment of the source that
/// starts after now and names `Patient/{source}` as a participant actor is rewritten to the target (new
/// version each, event `appointment.updated` with `mergedFrom`). Events: `patient.merged` on the source
/// (`{"target": "Patient/t"}`), `patient.updated` on the target (`{"mergedFrom": "Patient/s"}`).
///
/// Refused: source == target (422), unknown or deleted ids (404), an inactive (e.g. already merged) source or
/// target (409).
pub fn merge_patients(tx: &mut dyn Tx, source_id: &str, target_id: &str) -> Refusal<MergeResult> {
    patient::merge(tx, source_id, target_id)
}

/// `$generate-slots`: create the free slots of `template` for `Schedule/{schedule_id}` (id = the
/// `SlotSpec` key, so a repeat over the same range creates nothing), each with event `slot.created`. The
/// Schedule's serviceCategory, serviceType and specialty are copied onto each slot.
///
/// Refused: `template.schedule_id` differs from `schedule_id` or the template is invalid (422), the schedule
/// is unknown or deleted (404), or not active (409).
pub fn generate_slots(
    tx: &mut dyn Tx,
    schedule_id: &str,
    template: &SlotTemplate,
) -> Refusal<GenerateResult> {
    slot::generate(tx, schedule_id, template)
}

/// `$transition`: move `Appointment/{id}` to status `to` (an R4 code), with an optional cancellation reason
/// (only with `cancelled`), applied exactly like an update of the current version (same checks, slots,
/// events). Refused: unknown appointment (404), unknown status or a reason with another status (422), and
/// whatever the state machine refuses (409/422, naming from and to states).
pub fn transition(
    tx: &mut dyn Tx,
    appointment_id: &str,
    to: &str,
    reason: Option<Coding>,
) -> Refusal<Stored> {
    appointment::transition(tx, appointment_id, to, reason)
}
