//! Appointment and Slot lifecycle of Carebridge: the booking engine's pure core.
//!
//! Why it exists: the hub accepts appointment changes from several directions (FHIR REST, BaRS
//! `$process-message`, GP Connect through an STU3 adapter, HL7 v2 SIU feeds), often late or out of order.
//! Whether a change is allowed, which slots it claims or releases and which events it emits must be decided in
//! exactly one place, the same way for every entry point. This crate is that place:
//!
//! - [`AppointmentStatus`] / [`SlotStatus`]: the R4 codes, and the hub's transition policy
//!   ([`AppointmentStatus::can_transition_to`], [`AppointmentStatus::holds_slots`]).
//! - [`decide`]: `(current, proposed, now) -> Decision | DecisionError` over a small [`AppointmentView`]
//!   extracted from FHIR JSON by [`AppointmentView::from_json`]. The service layer writes the new version, the
//!   slot claims/releases and the outbox events of a [`Decision`] in one transaction; a refused change maps to
//!   409 (state conflict) or 422 (content), see [`DecisionError::http_status`].
//! - [`generate_slots`]: the `$generate-slots` expansion of a weekly [`SlotTemplate`] in Europe/London wall
//!   time into UTC [`SlotSpec`]s with deterministic keys, so running it twice over the same range is idempotent.
//! - [`parse_instant_ms`], [`format_instant_utc`], [`local_offset_minutes`]: the little time arithmetic the
//!   above needs, written by hand (GMT/BST rules only).
//!
//! Invariants: no IO, no clock, no randomness and no async runtime: `now` is always passed in, so every
//! function is deterministic. No panics on any input. Appointment status policy is defined here and nowhere
//! else: other crates ask [`decide`] rather than comparing statuses themselves.
#![warn(clippy::indexing_slicing)]

mod decide;
mod slots;
mod status;
mod time;
mod view;

pub use decide::{Decision, DecisionError, DecisionErrorKind, Event, EventKind, decide};
pub use slots::{
    LocalDate, MAX_SLOTS, OpeningPeriod, OpeningRule, SlotSpec, SlotTemplate, TemplateError,
    WallTime, Weekday, generate_slots,
};
pub use status::{AppointmentStatus, SlotStatus};
pub use time::{
    format_instant_utc, local_offset_minutes, london_local_to_utc_ms, parse_instant_ms,
};
pub use view::{
    AppointmentView, CANCELLATION_REASON_CODES, CANCELLATION_REASON_SYSTEM, Coding, FieldError,
    PREVIOUS_APPOINTMENT_EXTENSION, is_cancellation_reason_code,
};
