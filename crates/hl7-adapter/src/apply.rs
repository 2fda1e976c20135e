//! Applying an inbound message inside one store transaction, exactly once.
//!
//! Each message is keyed by (MSH-3, MSH-4, MSH-10). [`process`] runs inside a [`store::Store::write`]
//! closure: it returns the stored ACK of a message seen before (nothing changes), or applies the message's
//! intent and records, in the same transaction, the message, its outcome, the resources it touched and the
//! ACK. The caller sends the ACK only after the write returned, i.e. after the commit is durable.
//!
//! Late and out-of-order messages (policy, also in ARCHITECTURE.md):
//! - Every appointment and patient remembers the time (EVN-2, else MSH-7) of the newest message applied to
//!   it. A message older than that is acknowledged (AA, "stale") and changes nothing, so an old S14 never
//!   overwrites newer data and an old S13 never moves a cancelled appointment.
//! - A terminal appointment (cancelled, noshow, fulfilled, entered-in-error) is never revived: the booking
//!   engine's state machine refuses it and the message gets AE.
//! - An S13/S14/S15/S17/S26 for an appointment the hub does not know yet is **parked**: stored durably and
//!   acknowledged AA ("held"), then applied, oldest first, as soon as the appointment appears (its S12, or a
//!   FHIR create with the same identifier). A parked message still unapplied after the park timeout becomes a
//!   dead letter: its record's outcome turns to AE, a resend of it gets that AE, and operators see it.

use std::sync::{Arc, Mutex};

use fhir::ResourceType as RT;
use hl7::{AckCode, AckMode, Message};
use serde_json::{Value, json};
use store::{Predicate, SearchQuery, StoreError, Stored, Tx};

use crate::map::{self, AppointmentFacts, Ident, Intent, Mapped, PatientFacts, Refusal, SiuEvent};
use crate::resources;

/// kv namespace of inbound message records (key: [`dedupe_key`]).
pub const NS_INBOUND: &str = "hl7-inbound";
/// kv namespace of parked messages (key: an appointment identifier `system|value`).
pub const NS_PARKED: &str = "hl7-parked";
/// kv namespace/key of the parked-message index (identifier key -> deadline).
pub const NS_PARKED_INDEX: &str = "hl7-parked-index";
const PARKED_INDEX_KEY: &str = "all";
/// kv namespace of the newest applied message time per resource (`Type/id` -> ms).
pub const NS_CLOCK: &str = "hl7-clock";

/// How a message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Acknowledged AA but not applied: older than the state it would change.
    Stale,
    /// Acknowledged AA and held until its appointment appears.
    Parked,
    /// AE: a business rule refused it.
    Error,
    /// AR: structurally unacceptable.
    Rejected,
    /// AE after parking: the appointment never appeared in time.
    DeadLetter,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Stale => "stale",
            Outcome::Parked => "parked",
            Outcome::Error => "error",
            Outcome::Rejected => "rejected",
            Outcome::DeadLetter => "dead-letter",
        }
    }
}

/// The result of [`process`].
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    /// The encoded ACK to send (CR segment ends, not framed).
    pub ack: String,
    pub outcome: Outcome,
    /// `true` when the message was seen before and `ack` is the original one.
    pub duplicate: bool,
    /// `Type/id/_history/n` of every version the message wrote.
    pub touched: Vec<String>,
    /// Appointment identifier keys whose parked messages may now be applied (after an S12 or a create).
    pub unpark: Vec<String>,
}

/// Options the listener passes in.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long a parked message waits for its appointment.
    pub park_timeout_ms: i64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            park_timeout_ms: 10 * 60 * 1000,
        }
    }
}

/// `MSH-3|MSH-4|MSH-10`: what makes a message "the same message" when it is resent.
pub fn dedupe_key(msg: &Message) -> Option<String> {
    let id = msg.control_id().filter(|s| !s.trim().is_empty())?;
    Some(format!(
        "{}|{}|{}",
        msg.sending_application().unwrap_or_default(),
        msg.sending_facility().unwrap_or_default(),
        id
    ))
}

/// A shared place where [`process`] leaves a refusal decided after writes, so that the closure can return
/// `Err` (rolling its writes back) and the caller can then record the refusal with [`record_refusal`].
pub type RefusalSlot = Arc<Mutex<Option<Refusal>>>;

fn ack_for(
    msg: &Message,
    outcome: Outcome,
    refusal: Option<&Refusal>,
    note: Option<&str>,
    now_ms: i64,
) -> String {
    let enhanced = hl7::ack_mode(msg) == AckMode::Enhanced;
    let code = match (outcome, enhanced) {
        (Outcome::Rejected, false) => AckCode::AR,
        (Outcome::Rejected, true) => AckCode::CR,
        (Outcome::Error | Outcome::DeadLetter, false) => AckCode::AE,
        (Outcome::Error | Outcome::DeadLetter, true) => AckCode::CE,
        (_, false) => AckCode::AA,
        (_, true) => AckCode::CA,
    };
    let control = format!("ACK{}", msg.control_id().unwrap_or_default());
    let control: String = control.chars().take(199).collect();
    let err = refusal.map(Refusal::to_ack_error).or_else(|| {
        note.map(|n| hl7::AckError {
            code: hl7::ErrorCode::ApplicationInternalError,
            segment: None,
            field: None,
            message: n.to_owned(),
        })
    });
    // Informational notes (stale, parked) travel in MSA-3 only; an ERR segment is for errors.
    let mut ack = hl7::ack(
        msg,
        code,
        &control,
        &crate::dtm::format_ms(now_ms),
        err.as_ref().filter(|_| refusal.is_some()),
    );
    if let (Some(n), None) = (note, refusal) {
        let _ = ack.set("MSA-3", n);
    }
    ack.encode()
}

#[allow(
    clippy::too_many_arguments,
    reason = "the columns of one inbound-message record"
)]
fn record(
    tx: &mut dyn Tx,
    key: &str,
    msg_type: &str,
    raw: &str,
    outcome: Outcome,
    detail: Option<&str>,
    touched: &[String],
    ack: &str,
) -> store::Result<()> {
    let rec = InboundRecord {
        received_ms: tx.now_ms(),
        msg_type,
        outcome: outcome.as_str(),
        detail,
        touched,
        ack,
        message: raw,
    };
    let text = serde_json::to_string(&rec).map_err(|e| StoreError::Backend(e.to_string()))?;
    tx.kv_put(NS_INBOUND, key, Some(&text))
}

/// What is kept of each inbound message (serialised straight to text: no map of its members is built).
#[derive(serde::Serialize)]
struct InboundRecord<'a> {
    #[serde(rename = "receivedMs")]
    received_ms: i64,
    #[serde(rename = "type")]
    msg_type: &'a str,
    outcome: &'a str,
    detail: Option<&'a str>,
    touched: &'a [String],
    ack: &'a str,
    message: &'a str,
}

/// The stored record of a message, if it was seen: (outcome, ACK).
pub fn seen(tx: &mut dyn Tx, key: &str) -> store::Result<Option<(String, String)>> {
    let Some(text) = tx.kv_get(NS_INBOUND, key)? else {
        return Ok(None);
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| StoreError::Backend(e.to_string()))?;
    Ok(Some((
        v["outcome"].as_str().unwrap_or_default().to_owned(),
        v["ack"].as_str().unwrap_or_default().to_owned(),
    )))
}

/// Process one parsed message inside a write closure (see the module docs).
///
/// Returns `Err(StoreError::Conflict)` after leaving the refusal in `slot` when a business rule refused the
/// message after something was written: the caller's write then rolls back and it calls [`record_refusal`].
pub fn process(
    tx: &mut dyn Tx,
    msg: &Message,
    raw: &str,
    mapped: &Result<Mapped, Refusal>,
    prepared: Prepared,
    opts: &Options,
    slot: &RefusalSlot,
) -> store::Result<Processed> {
    let now = tx.now_ms();
    let msg_type = match mapped {
        Ok(m) => m.message_type.clone(),
        Err(_) => {
            let (c, t, _) = msg.message_type();
            format!("{}^{}", c.unwrap_or_default(), t.unwrap_or_default())
        }
    };
    let Some(key) = dedupe_key(msg) else {
        let refusal = Refusal::reject(
            hl7::ErrorCode::RequiredFieldMissing,
            Some(("MSH", 10)),
            "MSH-10 (message control id) is empty",
        );
        let ack = ack_for(msg, Outcome::Rejected, Some(&refusal), None, now);
        return Ok(Processed {
            ack,
            outcome: Outcome::Rejected,
            duplicate: false,
            touched: Vec::new(),
            unpark: Vec::new(),
        });
    };
    if let Some((outcome, ack)) = seen(tx, &key)? {
        let outcome = match outcome.as_str() {
            "applied" => Outcome::Applied,
            "stale" => Outcome::Stale,
            "parked" => Outcome::Parked,
            "error" => Outcome::Error,
            "dead-letter" => Outcome::DeadLetter,
            _ => Outcome::Rejected,
        };
        return Ok(Processed {
            ack,
            outcome,
            duplicate: true,
            touched: Vec::new(),
            unpark: Vec::new(),
        });
    }
    let mapped = match mapped {
        Ok(m) => m,
        Err(refusal) => {
            let outcome = if refusal.reject {
                Outcome::Rejected
            } else {
                Outcome::Error
            };
            let ack = ack_for(msg, outcome, Some(refusal), None, now);
            record(
                tx,
                &key,
                &msg_type,
                raw,
                outcome,
                Some(&refusal.message),
                &[],
                &ack,
            )?;
            return Ok(Processed {
                ack,
                outcome,
                duplicate: false,
                touched: Vec::new(),
                unpark: Vec::new(),
            });
        }
    };
    let mut effect = Effect {
        new_patient: prepared.new_patient,
        ..Effect::default()
    };
    match apply_intent(tx, mapped, &mut effect) {
        Ok(()) => {}
        Err(Fail::Store(e)) => return Err(e),
        Err(Fail::Refused(r)) => {
            if let Ok(mut s) = slot.lock() {
                *s = Some(r);
            }
            return Err(StoreError::Conflict("hl7 message refused".into()));
        }
    }
    let outcome = match effect.kind {
        EffectKind::Applied => Outcome::Applied,
        EffectKind::Stale => Outcome::Stale,
        EffectKind::Park(ref keys) => {
            park(
                tx,
                &key,
                raw,
                mapped.message_time_ms.unwrap_or(now),
                keys,
                now + opts.park_timeout_ms,
            )?;
            Outcome::Parked
        }
    };
    let ack = ack_for(msg, outcome, None, effect.note.as_deref(), now);
    record(
        tx,
        &key,
        &msg_type,
        raw,
        outcome,
        effect.note.as_deref(),
        &effect.touched,
        &ack,
    )?;
    Ok(Processed {
        ack,
        outcome,
        duplicate: false,
        touched: effect.touched,
        unpark: effect.unpark,
    })
}

/// Record a refusal decided by [`process`] (after its write was rolled back) and return its ACK. A message
/// recorded meanwhile (a concurrent resend) keeps its first record.
pub fn record_refusal(
    tx: &mut dyn Tx,
    msg: &Message,
    raw: &str,
    refusal: &Refusal,
) -> store::Result<Processed> {
    let now = tx.now_ms();
    let (c, t, _) = msg.message_type();
    let msg_type = format!("{}^{}", c.unwrap_or_default(), t.unwrap_or_default());
    let key = dedupe_key(msg).unwrap_or_default();
    if let Some((_, ack)) = seen(tx, &key)? {
        return Ok(Processed {
            ack,
            outcome: Outcome::Error,
            duplicate: true,
            touched: Vec::new(),
            unpark: Vec::new(),
        });
    }
    let outcome = if refusal.reject {
        Outcome::Rejected
    } else {
        Outcome::Error
    };
    let ack = ack_for(msg, outcome, Some(refusal), None, now);
    record(
        tx,
        &key,
        &msg_type,
        raw,
        outcome,
        Some(&refusal.message),
        &[],
        &ack,
    )?;
    Ok(Processed {
        ack,
        outcome,
        duplicate: false,
        touched: Vec::new(),
        unpark: Vec::new(),
    })
}

enum Fail {
    Store(StoreError),
    Refused(Refusal),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

#[derive(Default)]
enum EffectKind {
    #[default]
    Applied,
    Stale,
    /// Park under these appointment identifier keys.
    Park(Vec<String>),
}

#[derive(Default)]
struct Effect {
    kind: EffectKind,
    note: Option<String>,
    touched: Vec<String>,
    unpark: Vec<String>,
    /// See [`Prepared`]; taken by the write that uses it.
    new_patient: Option<NewPatient>,
}

/// Work on a message done before its write transaction, so that the single writer does not do it: for an
/// ADT message that registers a patient (A01, A04, A05, A28), the Patient it creates when no live Patient holds its
/// identifiers (the id and resource depend only on the message), validated, with its index rows and stored
/// body ([`booking::Incoming::prepare`]). Unused when the patient exists.
#[derive(Default)]
pub struct Prepared {
    new_patient: Option<NewPatient>,
    /// What the transaction will read and search for ([`store::ReadAhead`]).
    ahead: store::ReadAhead,
}

/// The Patient a message would create: its id, and the validated resource or what is wrong with it.
type NewPatient = (String, Result<booking::Incoming, Vec<fhir::Issue>>);

impl Prepared {
    /// What the transaction will read and search for, told to the store ahead (taken: asked once).
    pub fn take_ahead(&mut self) -> store::ReadAhead {
        std::mem::take(&mut self.ahead)
    }

    /// What can be done for `mapped` before the transaction; with `ahead`, what it will read too (for a
    /// store that reads ahead, [`store::Store::reads_ahead`]).
    pub fn of(mapped: &Result<Mapped, Refusal>, ahead: bool) -> Prepared {
        let Ok(Mapped {
            intent: Intent::Patient(facts),
            message_type,
            ..
        }) = mapped
        else {
            return Prepared::default();
        };
        // Told ahead: the patient is looked up by each of its identifiers.
        let mut told = store::ReadAhead::default();
        if ahead {
            told.searches = (facts.identifiers.iter())
                .map(|i| identifier_query(RT::Patient, i))
                .collect();
        }
        // A08/A31 update a patient the receiver already holds: a Patient built for them would go unused.
        if message_type.ends_with("^A08") || message_type.ends_with("^A31") {
            return Prepared {
                new_patient: None,
                ahead: told,
            };
        }
        let id = resources::patient_id(facts);
        let mut resource = resources::new_patient(facts);
        let issues = fhir::validate(RT::Patient, &mut resource);
        // Creating it reads its id and looks for another active holder of its NHS number.
        if ahead {
            let write = booking::ahead::for_write(RT::Patient, &id, &resource);
            told.keys = write.keys;
            told.follow = write.follow;
            told.searches.extend(write.searches);
        }
        let checked = if issues.iter().any(|i| i.severity == fhir::Severity::Error) {
            Err(issues)
        } else {
            Ok(booking::Incoming::prepare(RT::Patient, &id, resource))
        };
        Prepared {
            new_patient: Some((id, checked)),
            ahead: told,
        }
    }
}

impl Effect {
    fn touch(&mut self, s: &Stored) {
        self.touched
            .push(format!("{}/{}/_history/{}", s.rtype, s.id, s.version));
    }
}

fn refused_by_booking(e: booking::BookingError) -> Fail {
    let code = match e.http_status() {
        404 => hl7::ErrorCode::UnknownKeyIdentifier,
        _ => hl7::ErrorCode::ApplicationInternalError,
    };
    Fail::Refused(Refusal::error(code, None, e.to_string()))
}

fn invalid_resource(rtype: RT, issues: &[fhir::Issue]) -> Fail {
    let text: Vec<String> = issues
        .iter()
        .filter(|i| i.severity == fhir::Severity::Error)
        .map(|i| match i.expression.first() {
            Some(e) => format!("{e}: {}", i.diagnostics),
            None => i.diagnostics.clone(),
        })
        .collect();
    Fail::Refused(Refusal::error(
        hl7::ErrorCode::DataType,
        None,
        format!(
            "the {rtype} this message maps to is invalid: {}",
            text.join("; ")
        ),
    ))
}

/// Validate and write through the booking engine (the same path as the FHIR API).
fn write(
    tx: &mut dyn Tx,
    rtype: RT,
    id: &str,
    mut resource: Value,
    expected: Option<u64>,
    effect: &mut Effect,
) -> Result<Stored, Fail> {
    let issues = fhir::validate(rtype, &mut resource);
    if issues.iter().any(|i| i.severity == fhir::Severity::Error) {
        return Err(invalid_resource(rtype, &issues));
    }
    write_valid(tx, rtype, id, resource, expected, effect)
}

/// [`write`] of a resource already validated.
fn write_valid(
    tx: &mut dyn Tx,
    rtype: RT,
    id: &str,
    resource: impl Into<booking::Incoming>,
    expected: Option<u64>,
    effect: &mut Effect,
) -> Result<Stored, Fail> {
    match booking::write_resource(tx, rtype, id.to_owned(), resource, expected)? {
        Ok(out) => {
            let s = out.into_stored();
            effect.touch(&s);
            Ok(s)
        }
        Err(e) => Err(refused_by_booking(e)),
    }
}

fn json_of(s: &Stored) -> Result<Value, Fail> {
    fhir::parse_json(&s.json).map_err(|e| Fail::Store(StoreError::Backend(e.to_string())))
}

/// The search for `rtype` resources holding identifier `i`.
fn identifier_query(rtype: RT, i: &Ident) -> SearchQuery {
    SearchQuery::new(rtype).with(
        "identifier",
        Predicate::Token {
            system: Some(i.system.clone()),
            code: Some(i.value.clone()),
        },
    )
}

fn find_by_identifier(tx: &mut dyn Tx, rtype: RT, ids: &[Ident]) -> Result<Option<Stored>, Fail> {
    for i in ids {
        let q = identifier_query(rtype, i);
        let found = tx.search(&q)?;
        // Prefer an active one (a merged-away patient is inactive).
        if let Some(s) = found
            .iter()
            .find(|s| !s.json.contains("\"active\":false"))
            .or_else(|| found.first())
        {
            return Ok(Some(s.clone()));
        }
    }
    Ok(None)
}

/// `true` when a message from `time` is older than the newest one applied to `reference`.
fn is_stale(tx: &mut dyn Tx, reference: &str, time: Option<i64>) -> Result<bool, Fail> {
    let (Some(t), Some(last)) = (time, tx.kv_get(NS_CLOCK, reference)?) else {
        return Ok(false);
    };
    Ok(last.parse::<i64>().is_ok_and(|last| t < last))
}

fn advance_clock(tx: &mut dyn Tx, reference: &str, time: Option<i64>) -> Result<(), Fail> {
    if let Some(t) = time {
        let newer = match tx.kv_get(NS_CLOCK, reference)? {
            Some(last) => last.parse::<i64>().map_or(true, |last| t > last),
            None => true,
        };
        if newer {
            tx.kv_put(NS_CLOCK, reference, Some(&t.to_string()))?;
        }
    }
    Ok(())
}

fn apply_intent(tx: &mut dyn Tx, mapped: &Mapped, effect: &mut Effect) -> Result<(), Fail> {
    match &mapped.intent {
        Intent::Patient(p) => {
            upsert_patient(tx, p, mapped.message_time_ms, true, effect)?;
            Ok(())
        }
        Intent::Merge { survivor, retired } => {
            let Some(source) = find_by_identifier(tx, RT::Patient, retired)? else {
                return Err(Fail::Refused(Refusal::error(
                    hl7::ErrorCode::UnknownKeyIdentifier,
                    Some(("MRG", 1)),
                    format!("MRG-1: no patient has identifier {}", describe(retired)),
                )));
            };
            let target = upsert_patient(tx, survivor, mapped.message_time_ms, false, effect)?;
            if target.id == source.id {
                return Err(Fail::Refused(Refusal::error(
                    hl7::ErrorCode::DuplicateKeyIdentifier,
                    Some(("MRG", 1)),
                    "MRG-1 and PID-3 name the same patient",
                )));
            }
            match booking::merge_patients(tx, &source.id, &target.id)? {
                Ok(m) => {
                    effect.touch(&m.source);
                    effect.touch(&m.target);
                    for a in &m.appointments {
                        effect.touch(a);
                    }
                    Ok(())
                }
                Err(e) => Err(refused_by_booking(e)),
            }
        }
        Intent::Appointment(a) => apply_appointment(tx, a, mapped.message_time_ms, effect),
    }
}

fn describe(ids: &[Ident]) -> String {
    ids.iter()
        .map(|i| format!("{}|{}", i.system, i.value))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Find the patient by its identifiers; create it when unknown; when `update` is set, overlay the facts
/// (unless the message is older than the newest one applied to that patient).
fn upsert_patient(
    tx: &mut dyn Tx,
    facts: &PatientFacts,
    time: Option<i64>,
    update: bool,
    effect: &mut Effect,
) -> Result<Stored, Fail> {
    match find_by_identifier(tx, RT::Patient, &facts.identifiers)? {
        Some(existing) => {
            let reference = format!("Patient/{}", existing.id);
            if !update {
                return Ok(existing);
            }
            if is_stale(tx, &reference, time)? {
                effect.kind = EffectKind::Stale;
                effect.note = Some(format!(
                    "stale: a newer message already updated {reference}; nothing changed"
                ));
                return Ok(existing);
            }
            let before = json_of(&existing)?;
            let mut after = before.clone();
            resources::apply_patient_facts(&mut after, facts);
            advance_clock(tx, &reference, time)?;
            if after == before {
                return Ok(existing);
            }
            write(
                tx,
                RT::Patient,
                &existing.id,
                after,
                Some(existing.version),
                effect,
            )
        }
        None => {
            let id = resources::patient_id(facts);
            let prepared = effect.new_patient.take().filter(|(pid, _)| *pid == id);
            let s = match prepared {
                Some((_, Ok(incoming))) => {
                    write_valid(tx, RT::Patient, &id, incoming, None, effect)?
                }
                Some((_, Err(issues))) => return Err(invalid_resource(RT::Patient, &issues)),
                None => write(
                    tx,
                    RT::Patient,
                    &id,
                    resources::new_patient(facts),
                    None,
                    effect,
                )?,
            };
            advance_clock(tx, &format!("Patient/{id}"), time)?;
            Ok(s)
        }
    }
}

fn ensure(
    tx: &mut dyn Tx,
    rtype: RT,
    id: &str,
    build: impl FnOnce() -> Value,
    effect: &mut Effect,
) -> Result<(), Fail> {
    match tx.read(rtype, id)? {
        Some(s) if !s.deleted => Ok(()),
        _ => write(tx, rtype, id, build(), None, effect).map(|_| ()),
    }
}

/// Practitioners and locations the message names (created when unknown), as references.
fn ensure_actors(
    tx: &mut dyn Tx,
    a: &AppointmentFacts,
    effect: &mut Effect,
) -> Result<Vec<String>, Fail> {
    let mut actors = Vec::new();
    for r in &a.practitioners {
        let id =
            match find_by_identifier(tx, RT::Practitioner, std::slice::from_ref(&r.identifier))? {
                Some(s) => s.id,
                None => {
                    let id = resources::practitioner_id(r);
                    ensure(
                        tx,
                        RT::Practitioner,
                        &id,
                        || resources::new_practitioner(r),
                        effect,
                    )?;
                    id
                }
            };
        actors.push(format!("Practitioner/{id}"));
    }
    for r in &a.locations {
        let id = match find_by_identifier(tx, RT::Location, std::slice::from_ref(&r.identifier))? {
            Some(s) => s.id,
            None => {
                let id = resources::location_id(r);
                ensure(tx, RT::Location, &id, || resources::new_location(r), effect)?;
                id
            }
        };
        actors.push(format!("Location/{id}"));
    }
    Ok(actors)
}

/// The slot for the message's time in the schedule of its actors (both created when unknown). No slot when
/// the message names no practitioner or location.
fn ensure_slot(
    tx: &mut dyn Tx,
    a: &AppointmentFacts,
    actors: &[String],
    effect: &mut Effect,
) -> Result<Vec<String>, Fail> {
    let (Some(start), Some(end)) = (a.start_ms, a.end_ms) else {
        return Ok(Vec::new());
    };
    if actors.is_empty() {
        return Ok(Vec::new());
    }
    let mut sorted = actors.to_vec();
    sorted.sort();
    let schedule = resources::schedule_id(&sorted);
    ensure(
        tx,
        RT::Schedule,
        &schedule,
        || resources::new_schedule(&sorted),
        effect,
    )?;
    let (s, e) = (fhir::format_instant_ms(start), fhir::format_instant_ms(end));
    let slot = resources::slot_id(&schedule, &s, &e);
    ensure(
        tx,
        RT::Slot,
        &slot,
        || resources::new_slot(&schedule, &s, &e),
        effect,
    )?;
    Ok(vec![slot])
}

fn ident_key(i: &Ident) -> String {
    format!("{}|{}", i.system, i.value)
}

fn apply_appointment(
    tx: &mut dyn Tx,
    a: &AppointmentFacts,
    time: Option<i64>,
    effect: &mut Effect,
) -> Result<(), Fail> {
    let existing = find_by_identifier(tx, RT::Appointment, &a.identifiers)?;
    let Some(existing) = existing else {
        if a.event != SiuEvent::Book {
            effect.kind = EffectKind::Park(a.identifiers.iter().map(ident_key).collect());
            effect.note = Some(format!(
                "held: appointment {} is not known yet; this {} is applied when it arrives",
                describe(&a.identifiers),
                a.event.trigger()
            ));
            return Ok(());
        }
        // S12 for a new appointment: patient, actors, schedule and slot, then the booking.
        let patient = match &a.patient {
            Some(p) => Some(upsert_patient(tx, p, time, false, effect)?.id),
            None => None,
        };
        let actors = ensure_actors(tx, a, effect)?;
        let slots = ensure_slot(tx, a, &actors, effect)?;
        let id = resources::appointment_id(&a.identifiers);
        let appt = resources::appointment(a, "booked", patient.as_deref(), &actors, &slots);
        write(tx, RT::Appointment, &id, appt, None, effect)?;
        advance_clock(tx, &format!("Appointment/{id}"), time)?;
        effect.unpark = a.identifiers.iter().map(ident_key).collect();
        return Ok(());
    };
    let reference = format!("Appointment/{}", existing.id);
    if is_stale(tx, &reference, time)? {
        effect.kind = EffectKind::Stale;
        effect.note = Some(format!(
            "stale: a newer message already changed {reference}; this {} changed nothing",
            a.event.trigger()
        ));
        return Ok(());
    }
    let current = json_of(&existing)?;
    let status = current["status"].as_str().unwrap_or_default().to_owned();
    match a.event {
        SiuEvent::Cancel | SiuEvent::Delete | SiuEvent::NoShow => {
            let to = match a.event {
                SiuEvent::Cancel => "cancelled",
                SiuEvent::Delete => "entered-in-error",
                _ => "noshow",
            };
            if status == to {
                effect.note = Some(format!("{reference} is already {to}"));
            } else {
                let reason = (to == "cancelled")
                    .then(|| resources::cancellation_coding(a.event_reason.as_ref()));
                match booking::transition(tx, &existing.id, to, reason)? {
                    Ok(s) => effect.touch(&s),
                    Err(e) => return Err(refused_by_booking(e)),
                }
            }
        }
        SiuEvent::Book | SiuEvent::Reschedule | SiuEvent::Modify => {
            let same_time = current["start"].as_str().and_then(fhir::parse_instant_ms)
                == a.start_ms
                && current["end"].as_str().and_then(fhir::parse_instant_ms) == a.end_ms;
            let new_status = if a.event == SiuEvent::Modify {
                status.clone()
            } else {
                "booked".to_owned()
            };
            if a.event == SiuEvent::Book && same_time && status == "booked" {
                effect.note = Some(format!("{reference} is already booked at that time"));
            } else {
                let actors = ensure_actors(tx, a, effect)?;
                let slots =
                    if new_status == "booked" && (!same_time || current.get("slot").is_none()) {
                        ensure_slot(tx, a, &actors, effect)?
                    } else {
                        current["slot"]
                            .as_array()
                            .map(|v| {
                                v.iter()
                                    .filter_map(|s| s["reference"].as_str())
                                    .filter_map(|r| r.strip_prefix("Slot/"))
                                    .map(str::to_owned)
                                    .collect()
                            })
                            .unwrap_or_default()
                    };
                let patient = current["participant"].as_array().and_then(|ps| {
                    ps.iter()
                        .filter_map(|p| p["actor"]["reference"].as_str())
                        .find_map(|r| r.strip_prefix("Patient/").map(str::to_owned))
                });
                let mut facts = a.clone();
                if facts.start_ms.is_none() {
                    facts.start_ms = current["start"].as_str().and_then(fhir::parse_instant_ms);
                    facts.end_ms = current["end"].as_str().and_then(fhir::parse_instant_ms);
                }
                let actors = if actors.is_empty() {
                    current["participant"]
                        .as_array()
                        .map(|ps| {
                            ps.iter()
                                .filter_map(|p| p["actor"]["reference"].as_str())
                                .filter(|r| !r.starts_with("Patient/"))
                                .map(str::to_owned)
                                .collect()
                        })
                        .unwrap_or_default()
                } else {
                    actors
                };
                let mut next = resources::appointment(
                    &facts,
                    &new_status,
                    patient.as_deref(),
                    &actors,
                    &slots,
                );
                // Keep what HL7 does not carry (ids from other systems, extensions, cancellation reason).
                if let (Some(next_obj), Some(cur)) = (next.as_object_mut(), current.as_object()) {
                    for (k, v) in cur {
                        if k == "id" || k == "meta" {
                            continue;
                        }
                        if !next_obj.contains_key(k) {
                            next_obj.insert(k.clone(), v.clone());
                        }
                    }
                    let mut ids: Vec<Value> = cur
                        .get("identifier")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    for i in next_obj
                        .get("identifier")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                    {
                        if !ids.contains(&i) {
                            ids.push(i);
                        }
                    }
                    next_obj.insert("identifier".into(), Value::Array(ids));
                    if new_status != "booked" && new_status != "noshow" {
                        // Slots are only held by holding statuses; keep the list as it was.
                    }
                }
                write(
                    tx,
                    RT::Appointment,
                    &existing.id,
                    next,
                    Some(existing.version),
                    effect,
                )?;
            }
        }
    }
    advance_clock(tx, &reference, time)?;
    Ok(())
}

/// One parked message.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Parked {
    pub key: String,
    pub raw: String,
    pub time_ms: i64,
    pub deadline_ms: i64,
}

fn read_parked(tx: &mut dyn Tx, ident: &str) -> store::Result<Vec<Parked>> {
    Ok(tx
        .kv_get(NS_PARKED, ident)?
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default())
}

fn write_parked(tx: &mut dyn Tx, ident: &str, list: &[Parked]) -> store::Result<()> {
    let mut index: serde_json::Map<String, Value> = tx
        .kv_get(NS_PARKED_INDEX, PARKED_INDEX_KEY)?
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if list.is_empty() {
        tx.kv_put(NS_PARKED, ident, None)?;
        index.remove(ident);
    } else {
        let text = serde_json::to_string(list).map_err(|e| StoreError::Backend(e.to_string()))?;
        tx.kv_put(NS_PARKED, ident, Some(&text))?;
        let earliest = list.iter().map(|p| p.deadline_ms).min().unwrap_or(0);
        index.insert(ident.to_owned(), json!(earliest));
    }
    tx.kv_put(
        NS_PARKED_INDEX,
        PARKED_INDEX_KEY,
        Some(&Value::Object(index).to_string()),
    )
}

fn park(
    tx: &mut dyn Tx,
    key: &str,
    raw: &str,
    time_ms: i64,
    idents: &[String],
    deadline_ms: i64,
) -> store::Result<()> {
    // Parked under its first identifier; the others point to it so that an S12 with either id finds it.
    for ident in idents {
        let mut list = read_parked(tx, ident)?;
        if !list.iter().any(|p| p.key == key) {
            list.push(Parked {
                key: key.to_owned(),
                raw: raw.to_owned(),
                time_ms,
                deadline_ms,
            });
        }
        write_parked(tx, ident, &list)?;
    }
    Ok(())
}

/// Identifier keys with parked messages and their earliest deadline.
pub fn parked_index(tx: &mut dyn Tx) -> store::Result<Vec<(String, i64)>> {
    let index: serde_json::Map<String, Value> = tx
        .kv_get(NS_PARKED_INDEX, PARKED_INDEX_KEY)?
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    Ok(index
        .into_iter()
        .map(|(k, v)| (k, v.as_i64().unwrap_or(0)))
        .collect())
}

/// What one step of unparking did.
#[derive(Debug, Clone, PartialEq)]
pub enum UnparkStep {
    /// Nothing (left) to do under that identifier.
    Done,
    /// Applied (or found stale / already recorded) one message; call again.
    Applied { key: String, outcome: Outcome },
    /// Its appointment is still unknown and the deadline has not passed.
    Waiting,
}

fn remove_everywhere(tx: &mut dyn Tx, entry_key: &str, idents: &[String]) -> store::Result<()> {
    for ident in idents {
        let mut list = read_parked(tx, ident)?;
        let before = list.len();
        list.retain(|p| p.key != entry_key);
        if list.len() != before {
            write_parked(tx, ident, &list)?;
        }
    }
    Ok(())
}

/// Inside a write: apply the oldest parked message under `ident` if its appointment now exists, or
/// dead-letter it when its deadline has passed. One message per call, so each is its own transaction.
pub fn unpark_one(tx: &mut dyn Tx, ident: &str, slot: &RefusalSlot) -> store::Result<UnparkStep> {
    let now = tx.now_ms();
    let mut list = read_parked(tx, ident)?;
    list.sort_by_key(|p| p.time_ms);
    let Some(entry) = list.first().cloned() else {
        write_parked(tx, ident, &[])?;
        return Ok(UnparkStep::Done);
    };
    let Ok(msg) = Message::parse(entry.raw.as_bytes()) else {
        remove_everywhere(tx, &entry.key, &[ident.to_owned()])?;
        return Ok(UnparkStep::Applied {
            key: entry.key,
            outcome: Outcome::Rejected,
        });
    };
    let Ok(mapped) = map::intent(&msg) else {
        remove_everywhere(tx, &entry.key, &[ident.to_owned()])?;
        return Ok(UnparkStep::Applied {
            key: entry.key,
            outcome: Outcome::Rejected,
        });
    };
    let idents: Vec<String> = match &mapped.intent {
        Intent::Appointment(a) => a.identifiers.iter().map(ident_key).collect(),
        _ => vec![ident.to_owned()],
    };
    let mut effect = Effect::default();
    let result = apply_intent(tx, &mapped, &mut effect);
    let outcome = match result {
        Err(Fail::Store(e)) => return Err(e),
        Err(Fail::Refused(r)) => {
            if let Ok(mut s) = slot.lock() {
                *s = Some(r);
            }
            return Err(StoreError::Conflict("parked hl7 message refused".into()));
        }
        Ok(()) => match effect.kind {
            EffectKind::Park(_) => {
                if now < entry.deadline_ms {
                    return Ok(UnparkStep::Waiting);
                }
                let refusal = Refusal::error(
                    hl7::ErrorCode::UnknownKeyIdentifier,
                    Some(("SCH", 1)),
                    "the appointment this message refers to never arrived (park timeout)",
                );
                let ack = ack_for(&msg, Outcome::DeadLetter, Some(&refusal), None, now);
                record(
                    tx,
                    &entry.key,
                    &mapped.message_type,
                    &entry.raw,
                    Outcome::DeadLetter,
                    Some(&refusal.message),
                    &[],
                    &ack,
                )?;
                remove_everywhere(tx, &entry.key, &idents)?;
                return Ok(UnparkStep::Applied {
                    key: entry.key,
                    outcome: Outcome::DeadLetter,
                });
            }
            EffectKind::Stale => Outcome::Stale,
            EffectKind::Applied => Outcome::Applied,
        },
    };
    let ack = ack_for(&msg, outcome, None, effect.note.as_deref(), now);
    let detail = format!(
        "applied after parking{}",
        effect.note.map(|n| format!("; {n}")).unwrap_or_default()
    );
    record(
        tx,
        &entry.key,
        &mapped.message_type,
        &entry.raw,
        outcome,
        Some(&detail),
        &effect.touched,
        &ack,
    )?;
    remove_everywhere(tx, &entry.key, &idents)?;
    Ok(UnparkStep::Applied {
        key: entry.key,
        outcome,
    })
}

/// Inside a write: a parked message that a business rule refused once its appointment appeared becomes a
/// dead letter (AE recorded, removed from the park).
pub fn dead_letter_parked(tx: &mut dyn Tx, ident: &str, refusal: &Refusal) -> store::Result<()> {
    let now = tx.now_ms();
    let mut list = read_parked(tx, ident)?;
    list.sort_by_key(|p| p.time_ms);
    let Some(entry) = list.first().cloned() else {
        return Ok(());
    };
    let idents = match Message::parse(entry.raw.as_bytes()) {
        Ok(msg) => {
            let ack = ack_for(&msg, Outcome::DeadLetter, Some(refusal), None, now);
            let (c, t, _) = msg.message_type();
            let ty = format!("{}^{}", c.unwrap_or_default(), t.unwrap_or_default());
            record(
                tx,
                &entry.key,
                &ty,
                &entry.raw,
                Outcome::DeadLetter,
                Some(&refusal.message),
                &[],
                &ack,
            )?;
            match map::intent(&msg) {
                Ok(Mapped {
                    intent: Intent::Appointment(a),
                    ..
                }) => a.identifiers.iter().map(ident_key).collect(),
                _ => vec![ident.to_owned()],
            }
        }
        Err(_) => vec![ident.to_owned()],
    };
    remove_everywhere(tx, &entry.key, &idents)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    /// The inbound record is written member for member as the JSON object it replaced (records written before
    /// and after read the same way).
    #[test]
    fn the_inbound_record_keeps_its_text() {
        let touched = vec!["Patient/1".to_owned(), "Patient/\"2\"".to_owned()];
        for detail in [None, Some("stale: older than Patient/1")] {
            let rec = InboundRecord {
                received_ms: 1_767_225_600_123,
                msg_type: "ADT^A28",
                outcome: Outcome::Applied.as_str(),
                detail,
                touched: &touched,
                ack: "MSH|^~\\&|B|A\rMSA|AA|1\r",
                message: "MSH|^~\\&|A|B\rPID|1||9449305552^^^NHS^NH\r",
            };
            let expected = json!({
                "receivedMs": rec.received_ms,
                "type": rec.msg_type,
                "outcome": rec.outcome,
                "detail": rec.detail,
                "touched": rec.touched,
                "ack": rec.ack,
                "message": rec.message,
            });
            assert_eq!(serde_json::to_string(&rec).unwrap(), expected.to_string());
        }
    }
}
