//! FHIR resources built from mapped HL7 facts, with stable ids so that the same facts always name the same
//! resource (a resent or replayed message finds what it created the first time).

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::map::{AppointmentFacts, Code, Ident, PatientFacts, ResourceRef};

/// A FHIR id derived from `kind` and `parts`: `<kind>-<24 hex digits of SHA-256>`.
pub fn stable_id(kind: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    for p in parts {
        h.update([0u8]);
        h.update(p.as_bytes());
    }
    let digest = hex::encode(h.finalize());
    format!("{kind}-{}", &digest[..24])
}

/// The id a patient created from these facts gets (from its first identifier: the NHS number when present).
pub fn patient_id(facts: &PatientFacts) -> String {
    match facts.identifiers.first() {
        Some(i) => stable_id("hl7pat", &[&i.system, &i.value]),
        None => stable_id("hl7pat", &[]),
    }
}

pub fn appointment_id(identifiers: &[Ident]) -> String {
    match identifiers.first() {
        Some(i) => stable_id("hl7appt", &[&i.system, &i.value]),
        None => stable_id("hl7appt", &[]),
    }
}

pub fn practitioner_id(r: &ResourceRef) -> String {
    stable_id("hl7prac", &[&r.identifier.system, &r.identifier.value])
}

pub fn location_id(r: &ResourceRef) -> String {
    stable_id("hl7loc", &[&r.identifier.system, &r.identifier.value])
}

/// One schedule per combination of practitioners and locations (sorted references).
pub fn schedule_id(actors: &[String]) -> String {
    let parts: Vec<&str> = actors.iter().map(String::as_str).collect();
    stable_id("hl7sch", &parts)
}

pub fn slot_id(schedule_id: &str, start: &str, end: &str) -> String {
    stable_id("hl7slot", &[schedule_id, start, end])
}

fn identifier(i: &Ident) -> Value {
    json!({"system": i.system, "value": i.value})
}

fn coding(c: &Code) -> Value {
    let mut m = Map::new();
    if let Some(s) = &c.system {
        m.insert("system".into(), json!(s));
    }
    if let Some(code) = &c.code {
        m.insert("code".into(), json!(code));
    }
    if let Some(d) = &c.display {
        m.insert("display".into(), json!(d));
    }
    Value::Object(m)
}

fn concept(c: &Code) -> Value {
    let mut m = Map::new();
    if c.code.is_some() {
        m.insert("coding".into(), json!([coding(c)]));
    }
    if let Some(d) = &c.display {
        m.insert("text".into(), json!(d));
    }
    Value::Object(m)
}

/// A new Patient from PID facts.
pub fn new_patient(facts: &PatientFacts) -> Value {
    let mut p = json!({"resourceType": "Patient", "active": true});
    apply_patient_facts(&mut p, facts);
    p
}

/// Overlay PID facts on an existing Patient: identifiers are added (never removed); name, gender, birth
/// date, address, phones, GP practice and death replace the old values when the message carries them.
pub fn apply_patient_facts(p: &mut Value, facts: &PatientFacts) {
    let Some(obj) = p.as_object_mut() else { return };
    let mut ids: Vec<Value> = obj
        .get("identifier")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for i in &facts.identifiers {
        let present = ids.iter().any(|v| {
            v.get("system").and_then(Value::as_str) == Some(i.system.as_str())
                && v.get("value").and_then(Value::as_str) == Some(i.value.as_str())
        });
        if !present {
            ids.push(identifier(i));
        }
    }
    obj.insert("identifier".into(), Value::Array(ids));
    if facts.family.is_some() || !facts.given.is_empty() {
        let mut name = Map::new();
        name.insert("use".into(), json!("official"));
        if let Some(f) = &facts.family {
            name.insert("family".into(), json!(f));
        }
        if !facts.given.is_empty() {
            name.insert("given".into(), json!(facts.given));
        }
        if let Some(pfx) = &facts.prefix {
            name.insert("prefix".into(), json!([pfx]));
        }
        obj.insert("name".into(), json!([Value::Object(name)]));
    }
    if let Some(g) = facts.gender {
        obj.insert("gender".into(), json!(g));
    }
    if let Some(b) = &facts.birth_date {
        obj.insert("birthDate".into(), json!(b));
    }
    if let Some(a) = &facts.address {
        let mut m = Map::new();
        if !a.lines.is_empty() {
            m.insert("line".into(), json!(a.lines));
        }
        for (k, v) in [
            ("city", &a.city),
            ("district", &a.district),
            ("postalCode", &a.postal_code),
            ("country", &a.country),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), json!(v));
            }
        }
        obj.insert("address".into(), json!([Value::Object(m)]));
    }
    if !facts.phones.is_empty() {
        let telecom: Vec<Value> = facts
            .phones
            .iter()
            .map(|n| json!({"system": "phone", "value": n}))
            .collect();
        obj.insert("telecom".into(), Value::Array(telecom));
    }
    if let Some(ods) = &facts.gp_practice {
        obj.insert(
            "generalPractitioner".into(),
            json!([{"identifier": {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": ods}}]),
        );
    }
    if let Some(d) = &facts.deceased {
        if d == "true" {
            obj.insert("deceasedBoolean".into(), json!(true));
        } else {
            obj.insert("deceasedDateTime".into(), json!(d));
        }
    }
}

pub fn new_practitioner(r: &ResourceRef) -> Value {
    let mut p = json!({
        "resourceType": "Practitioner",
        "identifier": [identifier(&r.identifier)],
        "active": true,
    });
    if r.family.is_some() || r.given.is_some() {
        let mut name = Map::new();
        if let Some(f) = &r.family {
            name.insert("family".into(), json!(f));
        }
        if let Some(g) = &r.given {
            name.insert("given".into(), json!([g]));
        }
        p["name"] = json!([Value::Object(name)]);
    }
    p
}

pub fn new_location(r: &ResourceRef) -> Value {
    let mut l = json!({
        "resourceType": "Location",
        "identifier": [identifier(&r.identifier)],
        "status": "active",
    });
    if let Some(d) = &r.display {
        l["name"] = json!(d);
    }
    l
}

pub fn new_schedule(actors: &[String]) -> Value {
    let actor: Vec<Value> = actors.iter().map(|a| json!({"reference": a})).collect();
    json!({"resourceType": "Schedule", "active": true, "actor": actor})
}

pub fn new_slot(schedule_id: &str, start: &str, end: &str) -> Value {
    json!({
        "resourceType": "Slot",
        "schedule": {"reference": format!("Schedule/{schedule_id}")},
        "status": "free",
        "start": start,
        "end": end,
    })
}

/// The Appointment an SIU message describes, with `status`, the given participants and slots.
pub fn appointment(
    facts: &AppointmentFacts,
    status: &str,
    patient: Option<&str>,
    actors: &[String],
    slots: &[String],
) -> Value {
    let mut a = Map::new();
    a.insert("resourceType".into(), json!("Appointment"));
    a.insert(
        "identifier".into(),
        Value::Array(facts.identifiers.iter().map(identifier).collect()),
    );
    a.insert("status".into(), json!(status));
    if let Some(s) = &facts.service {
        a.insert("serviceType".into(), json!([concept(s)]));
    }
    if let Some(r) = &facts.reason {
        a.insert("reasonCode".into(), json!([concept(r)]));
    }
    if let Some(s) = facts.start_ms {
        a.insert("start".into(), json!(fhir::format_instant_ms(s)));
    }
    if let Some(e) = facts.end_ms {
        a.insert("end".into(), json!(fhir::format_instant_ms(e)));
    }
    if let (Some(s), Some(e)) = (facts.start_ms, facts.end_ms)
        && e - s >= 60_000
    {
        a.insert("minutesDuration".into(), json!((e - s) / 60_000));
    }
    if !slots.is_empty() {
        a.insert(
            "slot".into(),
            Value::Array(
                slots
                    .iter()
                    .map(|s| json!({"reference": format!("Slot/{s}")}))
                    .collect(),
            ),
        );
    }
    if let Some(c) = &facts.comment {
        a.insert("comment".into(), json!(c));
    }
    let mut participants = Vec::new();
    if let Some(p) = patient {
        participants
            .push(json!({"actor": {"reference": format!("Patient/{p}")}, "status": "accepted"}));
    }
    for actor in actors {
        participants.push(json!({"actor": {"reference": actor}, "status": "accepted"}));
    }
    a.insert("participant".into(), Value::Array(participants));
    Value::Object(a)
}

/// The resources a message maps to, without a store (for `carebridge hl7 convert`): what a first
/// application of the message to an empty store would create, ids included.
pub fn preview(mapped: &crate::map::Mapped) -> Vec<Value> {
    use crate::map::{Intent, SiuEvent};
    let with_id = |mut v: Value, id: String| {
        v["id"] = json!(id);
        v
    };
    match &mapped.intent {
        Intent::Patient(p) => vec![with_id(new_patient(p), patient_id(p))],
        Intent::Merge { survivor, retired } => {
            let mut target = with_id(new_patient(survivor), patient_id(survivor));
            let source_id = match retired.first() {
                Some(i) => stable_id("hl7pat", &[&i.system, &i.value]),
                None => String::new(),
            };
            target["link"] = json!([{"other": {"reference": format!("Patient/{source_id}")}, "type": "replaces"}]);
            vec![target]
        }
        Intent::Appointment(a) => {
            let mut out = Vec::new();
            let patient = a.patient.as_ref().map(patient_id);
            if let Some(p) = &a.patient {
                out.push(with_id(new_patient(p), patient_id(p)));
            }
            let mut actors = Vec::new();
            for r in &a.practitioners {
                actors.push(format!("Practitioner/{}", practitioner_id(r)));
                out.push(with_id(new_practitioner(r), practitioner_id(r)));
            }
            for r in &a.locations {
                actors.push(format!("Location/{}", location_id(r)));
                out.push(with_id(new_location(r), location_id(r)));
            }
            let status = match a.event {
                SiuEvent::Book | SiuEvent::Reschedule | SiuEvent::Modify => "booked",
                SiuEvent::Cancel => "cancelled",
                SiuEvent::Delete => "entered-in-error",
                SiuEvent::NoShow => "noshow",
            };
            let mut slots = Vec::new();
            if let (false, Some(s), Some(e)) = (actors.is_empty(), a.start_ms, a.end_ms) {
                let mut sorted = actors.clone();
                sorted.sort();
                let sch = schedule_id(&sorted);
                let (s, e) = (fhir::format_instant_ms(s), fhir::format_instant_ms(e));
                let slot = slot_id(&sch, &s, &e);
                out.push(with_id(new_schedule(&sorted), sch.clone()));
                let mut sl = with_id(new_slot(&sch, &s, &e), slot.clone());
                if status == "booked" {
                    sl["status"] = json!("busy");
                }
                out.push(sl);
                if status == "booked" {
                    slots.push(slot);
                }
            }
            let mut appt = with_id(
                appointment(a, status, patient.as_deref(), &actors, &slots),
                appointment_id(&a.identifiers),
            );
            if let (SiuEvent::Cancel, Some(r)) = (a.event, &a.event_reason) {
                appt["cancelationReason"] = cancellation_reason(r);
            }
            out.push(appt);
            out
        }
    }
}

/// SCH-6 as an R4 `cancelationReason`: the code itself when it is one of the R4 cancellation-reason codes,
/// else `other` with the sender's code and text kept.
pub fn cancellation_reason(r: &Code) -> Value {
    let known = r
        .code
        .as_deref()
        .map(str::to_ascii_lowercase)
        .filter(|c| scheduling::CANCELLATION_REASON_CODES.contains(&c.as_str()));
    let mut codings = vec![json!({
        "system": scheduling::CANCELLATION_REASON_SYSTEM,
        "code": known.clone().unwrap_or_else(|| "other".to_owned()),
    })];
    if known.is_none() && r.code.is_some() {
        codings.push(coding(r));
    }
    let mut v = json!({"coding": codings});
    if let Some(d) = &r.display {
        v["text"] = json!(d);
    }
    v
}

/// The cancellation reason as the booking engine's coding (for `$transition`).
pub fn cancellation_coding(r: Option<&Code>) -> scheduling::Coding {
    let code = r
        .and_then(|r| r.code.as_deref())
        .map(str::to_ascii_lowercase)
        .filter(|c| scheduling::CANCELLATION_REASON_CODES.contains(&c.as_str()))
        .unwrap_or_else(|| "other".to_owned());
    scheduling::Coding::cancellation_reason(&code)
}
