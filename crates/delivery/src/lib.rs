//! Event delivery of Carebridge: the pure parts.
//!
//! Why it exists: consumers get the outbox's domain events through webhooks (CloudEvents or FHIR notification
//! Bundles, signed per Standard Webhooks), a polling feed, HL7 v2 and MESH. Everything here is deterministic
//! and does no IO: the retry policy maps (attempt, error, now) to "retry at" or "dead"; envelopes and signatures
//! are built from plain values; randomness (jitter) and time are passed in. The async runner that claims work
//! and makes the HTTP calls lives in the binary, so this crate stays testable without sockets.
//!
//! Invariants: no IO, no clock or randomness of its own, never panics on any input.

mod envelope;
mod policy;
mod signing;

pub use envelope::{EnvelopeInput, cloud_event, event_id, event_type, notification_bundle};
pub use policy::{Outcome, RetryPolicy};
pub use signing::{SECRET_PREFIX, SigningError, check_secret, sign, verify};
