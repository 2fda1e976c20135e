//! The decision function: is a proposed appointment version allowed, and what does it do to slots and events.

use std::fmt;

use serde_json::{Map, Value, json};

use crate::status::AppointmentStatus::{
    self, Arrived, Booked, Cancelled, CheckedIn, EnteredInError, Fulfilled, Noshow,
};
use crate::time::format_instant_utc;
use crate::view::{
    AppointmentView, CANCELLATION_REASON_SYSTEM, Coding, is_cancellation_reason_code,
};

/// The kind of an outbox event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Booked,
    Rescheduled,
    Cancelled,
    NoShow,
    Arrived,
    CheckedIn,
    Fulfilled,
    EnteredInError,
    /// Any other accepted change: a booked appointment modified without moving it, an arrived/checked-in
    /// one edited, a proposed/pending/waitlist appointment created or edited, proposed -> pending. Not in the
    /// issue's list; added so that every applied change emits exactly one `appointment.*` event.
    Updated,
    /// A slot went back to `free` (cancel, entered-in-error, or the old slots of a reschedule).
    SlotReleased,
}

impl EventKind {
    /// The event type as written to the outbox.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Booked => "appointment.booked",
            EventKind::Rescheduled => "appointment.rescheduled",
            EventKind::Cancelled => "appointment.cancelled",
            EventKind::NoShow => "appointment.noshow",
            EventKind::Arrived => "appointment.arrived",
            EventKind::CheckedIn => "appointment.checked-in",
            EventKind::Fulfilled => "appointment.fulfilled",
            EventKind::EnteredInError => "appointment.entered-in-error",
            EventKind::Updated => "appointment.updated",
            EventKind::SlotReleased => "slot.released",
        }
    }

    /// Whether this is an `appointment.*` event (one per accepted change).
    pub fn is_appointment_event(self) -> bool {
        self != EventKind::SlotReleased
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event to write to the outbox in the same transaction as the change. The caller adds the subject
/// (appointment id / slot id), the event id and the time.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    /// Kind-specific JSON. Every `appointment.*` event carries `status`, `previousStatus` (null on create),
    /// `patient`, `start` and `end` (UTC `…Z` strings or null) and `replaces` when set; `booked` adds `slots`;
    /// `rescheduled` adds `slots` and `previous: {start, end, slots}`; `cancelled` adds
    /// `reason: {system, code}` or null. `slot.released` is `{"slot": reference}`.
    pub data: Value,
}

/// What an accepted change does. The service layer applies all of it in one transaction: store the new
/// version, mark `claim` slots busy (failing with SlotTaken if any is not free: that is what makes booking
/// atomic), mark `release` slots free, and write `events` to the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// `None` when the appointment is being created.
    pub from: Option<AppointmentStatus>,
    pub to: AppointmentStatus,
    /// Slot references to claim (free -> busy), in the order the appointment lists them.
    pub claim: Vec<String>,
    /// Slot references to release (busy -> free), in the order the old version listed them.
    pub release: Vec<String>,
    /// Exactly one `appointment.*` event, then one `slot.released` per released slot.
    pub events: Vec<Event>,
    /// Whether the patient should be told: true for booked, rescheduled and cancelled; false otherwise, and in
    /// particular false for entered-in-error (a data correction, never notified).
    pub notify_patient: bool,
}

/// Why a change was refused, with the states it was between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionError {
    /// `None` when the appointment was being created.
    pub from: Option<AppointmentStatus>,
    pub to: AppointmentStatus,
    pub kind: DecisionErrorKind,
}

/// The reasons [`decide`] refuses a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionErrorKind {
    /// `from -> to` is not in the transition policy (e.g. a late `booked` arriving after `cancelled`).
    IllegalTransition,
    /// An edit that keeps a terminal status (fulfilled, cancelled, noshow, entered-in-error). An exact replay
    /// is refused too: BaRS senders treat 409 on a duplicate as success.
    ChangeToTerminal,
    /// A new appointment in a status other than proposed, pending, booked or waitlist.
    InvalidInitialStatus,
    /// Slots, start or end changed in a change other than booked -> booked (or an edit of a
    /// proposed/pending/waitlist appointment, which holds nothing).
    RescheduleNotAllowed,
    /// A cancellation reason that is not a code of the R4 code system.
    CancelReasonInvalid {
        system: Option<String>,
        code: Option<String>,
    },
    /// app-2: start and end must both be present or both absent.
    StartEndMismatch,
    /// app-3: start and end are missing but the status needs them.
    TimesRequired,
    /// end is before start.
    EndBeforeStart { start_ms: i64, end_ms: i64 },
    /// Booking or rescheduling into a period that has already ended.
    EndsInPast { end_ms: i64, now_ms: i64 },
    /// A no-show recorded before the appointment started.
    NoShowBeforeStart { start_ms: i64, now_ms: i64 },
}

impl DecisionError {
    /// The HTTP status the API should answer with: 409 when the change conflicts with the appointment's
    /// current state (or the clock), 422 when the proposed content itself is unacceptable.
    pub fn http_status(&self) -> u16 {
        match self.kind {
            DecisionErrorKind::IllegalTransition
            | DecisionErrorKind::ChangeToTerminal
            | DecisionErrorKind::RescheduleNotAllowed
            | DecisionErrorKind::NoShowBeforeStart { .. } => 409,
            DecisionErrorKind::InvalidInitialStatus
            | DecisionErrorKind::CancelReasonInvalid { .. }
            | DecisionErrorKind::StartEndMismatch
            | DecisionErrorKind::TimesRequired
            | DecisionErrorKind::EndBeforeStart { .. }
            | DecisionErrorKind::EndsInPast { .. } => 422,
        }
    }
}

impl fmt::Display for DecisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use DecisionErrorKind as K;
        let from = self.from.map_or("(new)", AppointmentStatus::as_str);
        match &self.kind {
            K::IllegalTransition => write!(f, "appointment status transition not allowed"),
            K::ChangeToTerminal if self.from == Some(EnteredInError) => {
                write!(f, "an entered-in-error appointment cannot be changed")
            }
            K::ChangeToTerminal => {
                write!(
                    f,
                    "a {from} appointment is final; the only change allowed is to entered-in-error"
                )
            }
            K::InvalidInitialStatus => {
                write!(
                    f,
                    "an appointment can only be created as proposed, pending, booked or waitlist"
                )
            }
            K::RescheduleNotAllowed => write!(
                f,
                "slot, start or end may only change while the appointment stays booked (or is not yet booked)"
            ),
            K::CancelReasonInvalid { system, code } => write!(
                f,
                "cancelationReason must be a code of {CANCELLATION_REASON_SYSTEM}, got {}|{}",
                system.as_deref().unwrap_or("(no system)"),
                code.as_deref().unwrap_or("(no code)")
            ),
            K::StartEndMismatch => write!(
                f,
                "start and end must both be present or both absent (app-2)"
            ),
            K::TimesRequired => {
                write!(
                    f,
                    "start and end are required unless the status is proposed, cancelled or waitlist (app-3)"
                )
            }
            K::EndBeforeStart { start_ms, end_ms } => write!(
                f,
                "end {} is before start {}",
                format_instant_utc(*end_ms),
                format_instant_utc(*start_ms)
            ),
            K::EndsInPast { end_ms, now_ms } => write!(
                f,
                "cannot book or move an appointment into the past: it would end at {}, now is {}",
                format_instant_utc(*end_ms),
                format_instant_utc(*now_ms)
            ),
            K::NoShowBeforeStart { start_ms, now_ms } => write!(
                f,
                "cannot record a no-show before the appointment starts at {} (now {})",
                format_instant_utc(*start_ms),
                format_instant_utc(*now_ms)
            ),
        }?;
        write!(f, " ({from} -> {})", self.to)
    }
}

impl std::error::Error for DecisionError {}

/// Decide whether `proposed` may replace `current` (`None` = create) at `now_ms`, and what it does.
///
/// Checks, in order (the first failure is returned):
/// 1. Status policy: creation only as proposed/pending/booked/waitlist; `from -> to` must be in
///    [`AppointmentStatus::allowed_targets`]; a terminal status cannot be edited in place. A late or
///    out-of-order message therefore never revives a terminal appointment.
/// 2. Period: app-2 and app-3 on `proposed`, and end not before start.
/// 3. Cancellation: a reason is optional, but when given it must be a code of the R4 code system.
/// 4. Movement: slots (as a set), start or end may change only booked -> booked (a reschedule) or while the
///    appointment holds nothing (proposed/pending/waitlist, cancel, entered-in-error); booking and
///    rescheduling need `end > now`; a no-show needs `start <= now`.
///
/// Slots: the old version holds its slots if its status [holds slots](AppointmentStatus::holds_slots), the new
/// one likewise; `claim` = new - old, `release` = old - new. A booked appointment without slots (walk-in, or
/// booked in an external system) is allowed and claims nothing.
pub fn decide(
    current: Option<&AppointmentView>,
    proposed: &AppointmentView,
    now_ms: i64,
) -> Result<Decision, DecisionError> {
    let from = current.map(|c| c.status);
    let to = proposed.status;
    let refuse = |kind| DecisionError { from, to, kind };

    match from {
        None if !to.is_initial() => return Err(refuse(DecisionErrorKind::InvalidInitialStatus)),
        Some(f) if f == to && f.is_terminal() => {
            return Err(refuse(DecisionErrorKind::ChangeToTerminal));
        }
        Some(f) if !f.can_transition_to(to) => {
            return Err(refuse(DecisionErrorKind::IllegalTransition));
        }
        _ => {}
    }

    match (proposed.start_ms, proposed.end_ms) {
        (Some(start_ms), Some(end_ms)) if end_ms < start_ms => {
            return Err(refuse(DecisionErrorKind::EndBeforeStart {
                start_ms,
                end_ms,
            }));
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(refuse(DecisionErrorKind::StartEndMismatch));
        }
        (None, None) if to.requires_times() => {
            return Err(refuse(DecisionErrorKind::TimesRequired));
        }
        _ => {}
    }

    if to == Cancelled
        && let Some(reason) = &proposed.cancelation_reason
        && !is_valid_reason(reason)
    {
        return Err(refuse(DecisionErrorKind::CancelReasonInvalid {
            system: reason.system.clone(),
            code: reason.code.clone(),
        }));
    }

    let old_held = current
        .filter(|c| c.status.holds_slots())
        .map(|c| unique(&c.slots))
        .unwrap_or_default();
    let new_held = if to.holds_slots() {
        unique(&proposed.slots)
    } else {
        Vec::new()
    };
    let claim: Vec<String> = new_held
        .iter()
        .filter(|s| !old_held.contains(s))
        .map(|s| (*s).to_owned())
        .collect();
    let release: Vec<String> = old_held
        .iter()
        .filter(|s| !new_held.contains(s))
        .map(|s| (*s).to_owned())
        .collect();
    let moved = current.is_some_and(|c| {
        c.start_ms != proposed.start_ms
            || c.end_ms != proposed.end_ms
            || !same_set(&c.slots, &proposed.slots)
    });
    let ends_in_past = || match proposed.end_ms {
        Some(end_ms) if end_ms <= now_ms => {
            Err(refuse(DecisionErrorKind::EndsInPast { end_ms, now_ms }))
        }
        _ => Ok(()),
    };

    let from_holds = from.is_some_and(AppointmentStatus::holds_slots);
    let kind = match (from, to) {
        (_, Booked) if !from_holds => {
            ends_in_past()?;
            EventKind::Booked
        }
        (Some(Booked), Booked) if moved => {
            ends_in_past()?;
            EventKind::Rescheduled
        }
        (Some(_), _) if from_holds && to.holds_slots() && moved => {
            return Err(refuse(DecisionErrorKind::RescheduleNotAllowed));
        }
        (Some(f), _) if f == to => EventKind::Updated,
        (_, Noshow) => match proposed.start_ms {
            Some(start_ms) if start_ms > now_ms => {
                return Err(refuse(DecisionErrorKind::NoShowBeforeStart {
                    start_ms,
                    now_ms,
                }));
            }
            _ => EventKind::NoShow,
        },
        (_, Arrived) => EventKind::Arrived,
        (_, CheckedIn) => EventKind::CheckedIn,
        (_, Fulfilled) => EventKind::Fulfilled,
        (_, Cancelled) => EventKind::Cancelled,
        (_, EnteredInError) => EventKind::EnteredInError,
        // Creating or editing a proposed/pending/waitlist appointment, proposed/waitlist -> pending.
        _ => EventKind::Updated,
    };

    let mut data = Map::new();
    data.insert("status".into(), json!(to.as_str()));
    data.insert(
        "previousStatus".into(),
        json!(from.map(AppointmentStatus::as_str)),
    );
    data.insert("patient".into(), json!(proposed.patient));
    data.insert(
        "start".into(),
        json!(proposed.start_ms.map(format_instant_utc)),
    );
    data.insert("end".into(), json!(proposed.end_ms.map(format_instant_utc)));
    if let Some(r) = &proposed.replaces {
        data.insert("replaces".into(), json!(r));
    }
    match kind {
        EventKind::Booked => {
            data.insert("slots".into(), json!(new_held));
        }
        EventKind::Rescheduled => {
            data.insert("slots".into(), json!(new_held));
            if let Some(c) = current {
                data.insert(
                    "previous".into(),
                    json!({
                        "start": c.start_ms.map(format_instant_utc),
                        "end": c.end_ms.map(format_instant_utc),
                        "slots": unique(&c.slots),
                    }),
                );
            }
        }
        EventKind::Cancelled => {
            let reason = proposed
                .cancelation_reason
                .as_ref()
                .map(|r| json!({"system": r.system, "code": r.code}));
            data.insert("reason".into(), json!(reason));
        }
        _ => {}
    }

    let mut events = vec![Event {
        kind,
        data: Value::Object(data),
    }];
    events.extend(release.iter().map(|s| Event {
        kind: EventKind::SlotReleased,
        data: json!({ "slot": s }),
    }));
    let notify_patient = matches!(
        kind,
        EventKind::Booked | EventKind::Rescheduled | EventKind::Cancelled
    );
    Ok(Decision {
        from,
        to,
        claim,
        release,
        events,
        notify_patient,
    })
}

fn is_valid_reason(reason: &Coding) -> bool {
    reason.system.as_deref() == Some(CANCELLATION_REASON_SYSTEM)
        && reason
            .code
            .as_deref()
            .is_some_and(is_cancellation_reason_code)
}

/// The distinct references, first occurrence order.
fn unique(refs: &[String]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::with_capacity(refs.len());
    for r in refs {
        if !out.contains(&r.as_str()) {
            out.push(r);
        }
    }
    out
}

fn same_set(a: &[String], b: &[String]) -> bool {
    a.iter().all(|x| b.contains(x)) && b.iter().all(|x| a.contains(x))
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod tests {
    use super::*;
    use crate::status::AppointmentStatus::{Pending, Proposed, Waitlist};
    use crate::view::Coding;
    use DecisionErrorKind as K;

    const MIN: i64 = 60_000;
    /// 2025-06-02T09:00:00Z
    const T0: i64 = 1_748_854_800_000;

    fn view(
        status: AppointmentStatus,
        slots: &[&str],
        start: i64,
        minutes: i64,
    ) -> AppointmentView {
        AppointmentView {
            status,
            start_ms: Some(start),
            end_ms: Some(start + minutes * MIN),
            slots: slots.iter().map(|s| (*s).to_owned()).collect(),
            patient: Some("Patient/p1".into()),
            cancelation_reason: None,
            replaces: None,
        }
    }

    fn with(status: AppointmentStatus, v: &AppointmentView) -> AppointmentView {
        AppointmentView {
            status,
            ..v.clone()
        }
    }

    fn kinds(d: &Decision) -> Vec<&'static str> {
        d.events.iter().map(|e| e.kind.as_str()).collect()
    }

    /// Every (from, to) pair, with an otherwise unchanged appointment and `now` inside the appointment (so that
    /// booking and no-show are both possible): accepted exactly when the policy allows it; refused ones name
    /// both states.
    #[test]
    fn every_transition_against_the_policy() {
        let now = T0 + 5 * MIN;
        for from in AppointmentStatus::ALL {
            for to in AppointmentStatus::ALL {
                let cur = view(from, &["Slot/a"], T0, 15);
                let result = decide(Some(&cur), &with(to, &cur), now);
                let allowed = from.can_transition_to(to);
                match (&result, allowed) {
                    (Ok(d), true) => {
                        assert_eq!((d.from, d.to), (Some(from), to));
                        assert_eq!(
                            d.events
                                .iter()
                                .filter(|e| e.kind.is_appointment_event())
                                .count(),
                            1
                        );
                        // Slot bookkeeping follows holds_slots exactly.
                        let expect_claim = !from.holds_slots() && to.holds_slots();
                        let expect_release = from.holds_slots() && !to.holds_slots();
                        assert_eq!(d.claim.len(), usize::from(expect_claim), "{from} -> {to}");
                        assert_eq!(
                            d.release.len(),
                            usize::from(expect_release),
                            "{from} -> {to}"
                        );
                    }
                    (Err(e), false) => {
                        let expected = if from == to {
                            K::ChangeToTerminal
                        } else {
                            K::IllegalTransition
                        };
                        assert_eq!(e.kind, expected, "{from} -> {to}");
                        assert_eq!(e.http_status(), 409);
                        let msg = e.to_string();
                        assert!(msg.ends_with(&format!("({from} -> {to})")), "{msg}");
                    }
                    _ => panic!("{from} -> {to}: allowed={allowed}, got {result:?}"),
                }
            }
        }
    }

    #[test]
    fn creation_statuses() {
        let now = T0 - 60 * MIN;
        for to in AppointmentStatus::ALL {
            let mut v = view(to, &["Slot/a"], T0, 15);
            if to == Cancelled {
                v.cancelation_reason = Some(Coding::cancellation_reason("pat"));
            }
            let r = decide(None, &v, now);
            if to.is_initial() {
                let d = r.unwrap();
                assert_eq!(d.from, None);
                let expected = if to == Booked {
                    ["appointment.booked"]
                } else {
                    ["appointment.updated"]
                };
                assert_eq!(kinds(&d), expected);
                assert_eq!(
                    d.claim,
                    if to == Booked {
                        vec!["Slot/a".to_owned()]
                    } else {
                        vec![]
                    }
                );
            } else {
                let e = r.unwrap_err();
                assert_eq!(e.kind, K::InvalidInitialStatus);
                assert_eq!(e.http_status(), 422);
                assert!(e.to_string().ends_with(&format!("((new) -> {to})")), "{e}");
            }
        }
    }

    #[test]
    fn book_claims_slots_and_notifies() {
        let mut v = view(Booked, &["Slot/a", "Slot/b", "Slot/a"], T0, 30);
        v.replaces = Some("Appointment/old".into());
        let d = decide(None, &v, T0 - MIN).unwrap();
        assert_eq!(d.claim, ["Slot/a", "Slot/b"]);
        assert!(d.release.is_empty());
        assert!(d.notify_patient);
        assert_eq!(
            d.events[0].data,
            json!({
                "status": "booked", "previousStatus": null, "patient": "Patient/p1",
                "start": "2025-06-02T09:00:00Z", "end": "2025-06-02T09:30:00Z",
                "replaces": "Appointment/old", "slots": ["Slot/a", "Slot/b"]
            })
        );
        // pending -> booked claims what the booked version lists.
        let pending = view(Pending, &["Slot/a"], T0, 15);
        let d = decide(Some(&pending), &view(Booked, &["Slot/c"], T0, 15), T0 - MIN).unwrap();
        assert_eq!(
            (d.claim.as_slice(), d.release.len()),
            (&["Slot/c".to_owned()][..], 0)
        );
        assert_eq!(kinds(&d), ["appointment.booked"]);
    }

    #[test]
    fn walk_in_without_slot_is_allowed() {
        let d = decide(None, &view(Booked, &[], T0, 10), T0).unwrap();
        assert!(d.claim.is_empty());
        assert_eq!(kinds(&d), ["appointment.booked"]);
    }

    #[test]
    fn cannot_book_or_move_into_the_past() {
        let v = view(Booked, &["Slot/a"], T0, 15);
        let e = decide(None, &v, T0 + 15 * MIN).unwrap_err();
        assert_eq!(
            e.kind,
            K::EndsInPast {
                end_ms: T0 + 15 * MIN,
                now_ms: T0 + 15 * MIN
            }
        );
        assert_eq!(e.http_status(), 422);
        // Booking an appointment that has started but not ended is fine (walk-in, late booking).
        assert!(decide(None, &v, T0 + 14 * MIN).is_ok());
        let moved = view(Booked, &["Slot/b"], T0 - 60 * MIN, 15);
        assert!(matches!(
            decide(Some(&v), &moved, T0).unwrap_err().kind,
            K::EndsInPast { .. }
        ));
    }

    #[test]
    fn reschedule_swaps_slots() {
        let old = view(Booked, &["Slot/a", "Slot/b"], T0, 30);
        let new = view(Booked, &["Slot/b", "Slot/c"], T0 + 15 * MIN, 30);
        let d = decide(Some(&old), &new, T0 - 60 * MIN).unwrap();
        assert_eq!(d.claim, ["Slot/c"]);
        assert_eq!(d.release, ["Slot/a"]);
        assert!(d.notify_patient);
        assert_eq!(kinds(&d), ["appointment.rescheduled", "slot.released"]);
        assert_eq!(
            d.events[0].data,
            json!({
                "status": "booked", "previousStatus": "booked", "patient": "Patient/p1",
                "start": "2025-06-02T09:15:00Z", "end": "2025-06-02T09:45:00Z",
                "slots": ["Slot/b", "Slot/c"],
                "previous": {"start": "2025-06-02T09:00:00Z", "end": "2025-06-02T09:30:00Z", "slots": ["Slot/a", "Slot/b"]}
            })
        );
        assert_eq!(d.events[1].data, json!({"slot": "Slot/a"}));
        // Same slots, new times only: still a reschedule, nothing claimed or released.
        let d = decide(
            Some(&old),
            &view(Booked, &["Slot/b", "Slot/a"], T0 + 5 * MIN, 30),
            T0,
        )
        .unwrap();
        assert_eq!((d.claim.len(), d.release.len()), (0, 0));
        assert_eq!(kinds(&d), ["appointment.rescheduled"]);
    }

    #[test]
    fn modify_without_moving_is_an_update() {
        let old = view(Booked, &["Slot/a", "Slot/b"], T0, 30);
        let mut new = view(Booked, &["Slot/b", "Slot/a"], T0, 30);
        new.patient = Some("Patient/p1".into());
        // Even after the appointment has ended (a late comment edit) this is allowed.
        let d = decide(Some(&old), &new, T0 + 600 * MIN).unwrap();
        assert_eq!(kinds(&d), ["appointment.updated"]);
        assert!(!d.notify_patient);
        assert!(d.claim.is_empty() && d.release.is_empty());
    }

    #[test]
    fn cancel_releases_with_reason() {
        let old = view(Booked, &["Slot/a", "Slot/b"], T0, 30);
        let mut new = with(Cancelled, &old);
        new.slots.clear(); // some senders drop the slot on cancel: the held ones are released regardless
        new.cancelation_reason = Some(Coding::cancellation_reason("pat-cpp"));
        let d = decide(Some(&old), &new, T0 - 60 * MIN).unwrap();
        assert_eq!(d.release, ["Slot/a", "Slot/b"]);
        assert!(d.claim.is_empty());
        assert!(d.notify_patient);
        assert_eq!(
            kinds(&d),
            ["appointment.cancelled", "slot.released", "slot.released"]
        );
        assert_eq!(
            d.events[0].data["reason"],
            json!({"system": CANCELLATION_REASON_SYSTEM, "code": "pat-cpp"})
        );
        // Without a reason: allowed, reason null.
        let d = decide(Some(&old), &with(Cancelled, &old), T0).unwrap();
        assert_eq!(d.events[0].data["reason"], Value::Null);
        // Cancelling after the time passed is still a cancel (e.g. clinic cancelled late).
        assert!(decide(Some(&old), &with(Cancelled, &old), T0 + 600 * MIN).is_ok());
    }

    #[test]
    fn cancel_reason_must_come_from_the_r4_code_system() {
        let old = view(Booked, &["Slot/a"], T0, 30);
        for (system, code) in [
            (Some(CANCELLATION_REASON_SYSTEM), Some("weather")),
            (Some(CANCELLATION_REASON_SYSTEM), None),
            (Some("https://example.org/local"), Some("pat")),
            (None, Some("pat")),
        ] {
            let mut new = with(Cancelled, &old);
            new.cancelation_reason = Some(Coding {
                system: system.map(str::to_owned),
                code: code.map(str::to_owned),
            });
            let e = decide(Some(&old), &new, T0).unwrap_err();
            assert!(matches!(e.kind, K::CancelReasonInvalid { .. }), "{e}");
            assert_eq!(e.http_status(), 422);
            assert!(e.to_string().ends_with("(booked -> cancelled)"), "{e}");
        }
        for code in crate::view::CANCELLATION_REASON_CODES {
            let mut new = with(Cancelled, &old);
            new.cancelation_reason = Some(Coding::cancellation_reason(code));
            assert!(decide(Some(&old), &new, T0).is_ok(), "{code}");
        }
    }

    #[test]
    fn noshow_keeps_the_slot() {
        let old = view(Booked, &["Slot/a"], T0, 30);
        let d = decide(Some(&old), &with(Noshow, &old), T0 + 31 * MIN).unwrap();
        assert!(d.release.is_empty() && d.claim.is_empty());
        assert_eq!(kinds(&d), ["appointment.noshow"]);
        assert!(!d.notify_patient);
        // Not before the start.
        let e = decide(Some(&old), &with(Noshow, &old), T0 - MIN).unwrap_err();
        assert_eq!(
            e.kind,
            K::NoShowBeforeStart {
                start_ms: T0,
                now_ms: T0 - MIN
            }
        );
        assert_eq!(e.http_status(), 409);
        // noshow is never folded into cancelled, and cannot become it.
        let ns = with(Noshow, &old);
        assert_eq!(
            decide(Some(&ns), &with(Cancelled, &old), T0)
                .unwrap_err()
                .kind,
            K::IllegalTransition
        );
    }

    #[test]
    fn entered_in_error_releases_silently() {
        for from in [Booked, Noshow, Fulfilled, Arrived, CheckedIn] {
            let old = view(from, &["Slot/a"], T0, 30);
            let d = decide(Some(&old), &with(EnteredInError, &old), T0 + 600 * MIN).unwrap();
            assert_eq!(d.release, ["Slot/a"], "{from}");
            assert!(!d.notify_patient);
            assert_eq!(kinds(&d), ["appointment.entered-in-error", "slot.released"]);
            assert_eq!(d.events[0].data["previousStatus"], json!(from.as_str()));
        }
        for from in [Proposed, Pending, Waitlist, Cancelled] {
            let old = view(from, &["Slot/a"], T0, 30);
            let d = decide(Some(&old), &with(EnteredInError, &old), T0).unwrap();
            assert!(d.release.is_empty(), "{from}");
            assert!(!d.notify_patient);
        }
    }

    #[test]
    fn arrival_check_in_fulfilment() {
        let booked = view(Booked, &["Slot/a"], T0, 30);
        let arrived = with(Arrived, &booked);
        let checked_in = with(CheckedIn, &booked);
        let fulfilled = with(Fulfilled, &booked);
        for (cur, next, kind) in [
            (&booked, &arrived, "appointment.arrived"),
            (&booked, &checked_in, "appointment.checked-in"),
            (&booked, &fulfilled, "appointment.fulfilled"),
            (&arrived, &checked_in, "appointment.checked-in"),
            (&arrived, &fulfilled, "appointment.fulfilled"),
            (&checked_in, &fulfilled, "appointment.fulfilled"),
            (&arrived, &arrived, "appointment.updated"),
        ] {
            let d = decide(Some(cur), next, T0 - 10 * MIN).unwrap();
            assert_eq!(kinds(&d), [kind]);
            assert!(d.claim.is_empty() && d.release.is_empty());
            assert!(!d.notify_patient);
        }
        // Moving an arrived appointment, or moving while changing status, is refused.
        let moved = view(Arrived, &["Slot/b"], T0, 30);
        let e = decide(Some(&arrived), &moved, T0).unwrap_err();
        assert_eq!(
            (e.kind.clone(), e.http_status()),
            (K::RescheduleNotAllowed, 409)
        );
        let e = decide(Some(&booked), &view(Fulfilled, &["Slot/a"], T0, 45), T0).unwrap_err();
        assert_eq!(e.kind, K::RescheduleNotAllowed);
        assert!(e.to_string().ends_with("(booked -> fulfilled)"), "{e}");
    }

    #[test]
    fn terminal_appointments_cannot_be_edited_or_revived() {
        let fulfilled = view(Fulfilled, &["Slot/a"], T0, 30);
        let e = decide(Some(&fulfilled), &fulfilled, T0 + 60 * MIN).unwrap_err();
        assert_eq!(e.kind, K::ChangeToTerminal);
        assert_eq!(
            e.to_string(),
            format!(
                "a fulfilled appointment is final; the only change allowed is to entered-in-error (fulfilled -> fulfilled)"
            )
        );
        let eie = with(EnteredInError, &fulfilled);
        let e = decide(Some(&eie), &eie, T0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "an entered-in-error appointment cannot be changed (entered-in-error -> entered-in-error)"
        );
    }

    /// A late, out-of-order `booked` (sent before the cancel, delivered after it) must not revive the
    /// appointment or reclaim its slot.
    #[test]
    fn late_booked_after_cancel_is_refused() {
        let booked = view(Booked, &["Slot/a"], T0, 30);
        let mut cancelled = with(Cancelled, &booked);
        cancelled.cancelation_reason = Some(Coding::cancellation_reason("prov"));
        let d = decide(Some(&booked), &cancelled, T0 - 120 * MIN).unwrap();
        assert_eq!(d.release, ["Slot/a"]);
        let e = decide(Some(&cancelled), &booked, T0 - 119 * MIN).unwrap_err();
        assert_eq!(e.kind, K::IllegalTransition);
        assert_eq!((e.from, e.to), (Some(Cancelled), Booked));
        assert_eq!(e.http_status(), 409);
        assert_eq!(
            e.to_string(),
            "appointment status transition not allowed (cancelled -> booked)"
        );
    }

    #[test]
    fn period_invariants() {
        let mut v = view(Booked, &[], T0, 30);
        v.end_ms = None;
        assert_eq!(decide(None, &v, 0).unwrap_err().kind, K::StartEndMismatch);
        v.start_ms = None;
        assert_eq!(decide(None, &v, 0).unwrap_err().kind, K::TimesRequired);
        v.status = Proposed;
        assert!(decide(None, &v, 0).is_ok());
        v.status = Waitlist;
        assert!(decide(None, &v, 0).is_ok());
        let mut v = view(Booked, &[], T0, 30);
        v.end_ms = Some(T0 - 1);
        let e = decide(None, &v, 0).unwrap_err();
        assert_eq!(
            e.kind,
            K::EndBeforeStart {
                start_ms: T0,
                end_ms: T0 - 1
            }
        );
        assert!(
            e.to_string()
                .starts_with("end 2025-06-02T08:59:59Z is before start 2025-06-02T09:00:00Z"),
            "{e}"
        );
        // Cancelled may drop its times (app-3).
        let booked = view(Booked, &["Slot/a"], T0, 30);
        let mut c = AppointmentView::new(Cancelled);
        c.slots = booked.slots.clone();
        assert_eq!(decide(Some(&booked), &c, T0).unwrap().release, ["Slot/a"]);
    }

    #[test]
    fn proposals_negotiate_freely() {
        let p = view(Proposed, &["Slot/a"], T0, 30);
        let d = decide(
            Some(&p),
            &view(Proposed, &["Slot/b"], T0 + 60 * MIN, 30),
            T0,
        )
        .unwrap();
        assert_eq!(kinds(&d), ["appointment.updated"]);
        assert!(d.claim.is_empty() && d.release.is_empty());
        let d = decide(Some(&p), &view(Pending, &["Slot/c"], T0 + 60 * MIN, 30), T0).unwrap();
        assert_eq!(kinds(&d), ["appointment.updated"]);
        assert_eq!(d.events[0].data["previousStatus"], json!("proposed"));
    }
}
