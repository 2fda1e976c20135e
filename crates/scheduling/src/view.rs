//! [`AppointmentView`]: the few fields of an Appointment that scheduling policy looks at.

use std::fmt;

use serde_json::Value;

use crate::status::AppointmentStatus;
use crate::time::parse_instant_ms;

/// The R4 code system of `Appointment.cancelationReason` codes the hub accepts.
pub const CANCELLATION_REASON_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason";

/// Every code of [`CANCELLATION_REASON_SYSTEM`] (R4 4.0.1), the parents (`pat`, `prov`, `other`) included.
pub const CANCELLATION_REASON_CODES: [&str; 32] = [
    "pat",
    "pat-crs",
    "pat-cpp",
    "pat-dec",
    "pat-fb",
    "pat-lt",
    "pat-mt",
    "pat-mv",
    "pat-preg",
    "pat-swl",
    "pat-ucp",
    "prov",
    "prov-pers",
    "prov-dch",
    "prov-edu",
    "prov-hosp",
    "prov-labs",
    "prov-mri",
    "prov-onc",
    "maint",
    "meds-inc",
    "other",
    "oth-cms",
    "oth-err",
    "oth-fin",
    "oth-iv",
    "oth-int",
    "oth-mu",
    "oth-room",
    "oth-oerr",
    "oth-swie",
    "oth-weath",
];

/// Whether `code` is a code of [`CANCELLATION_REASON_SYSTEM`].
pub fn is_cancellation_reason_code(code: &str) -> bool {
    CANCELLATION_REASON_CODES.contains(&code)
}

/// The R5 cross-version extension naming the appointment a rebooked one replaces (R5
/// `Appointment.previousAppointment`), carried on an R4 Appointment as `valueReference`.
///
/// R4 has no element for it; nhs-standards §2 lists this extension (or a shared identifier) for the
/// cancel-and-rebook pattern. The hub reads only this extension: it is the one with a definition behind it.
pub const PREVIOUS_APPOINTMENT_EXTENSION: &str =
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-Appointment.previousAppointment";

/// A `Coding` reduced to system and code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coding {
    pub system: Option<String>,
    pub code: Option<String>,
}

impl Coding {
    /// A coding in [`CANCELLATION_REASON_SYSTEM`].
    pub fn cancellation_reason(code: &str) -> Self {
        Coding {
            system: Some(CANCELLATION_REASON_SYSTEM.to_owned()),
            code: Some(code.to_owned()),
        }
    }
}

/// What scheduling policy needs of an Appointment, extracted by the caller (usually with
/// [`AppointmentView::from_json`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppointmentView {
    pub status: AppointmentStatus,
    /// `Appointment.start`, ms since the epoch (UTC).
    pub start_ms: Option<i64>,
    /// `Appointment.end`, ms since the epoch (UTC).
    pub end_ms: Option<i64>,
    /// `Appointment.slot[].reference`, as written (e.g. `Slot/abc`). Duplicates count once.
    pub slots: Vec<String>,
    /// The first participant whose actor is a Patient (e.g. `Patient/123`).
    pub patient: Option<String>,
    /// `Appointment.cancelationReason`: its coding in [`CANCELLATION_REASON_SYSTEM`] if it has one, otherwise
    /// its first coding (which [`crate::decide`] then refuses). `None` when absent or text-only.
    pub cancelation_reason: Option<Coding>,
    /// The appointment this one replaces (cancel-and-rebook), from [`PREVIOUS_APPOINTMENT_EXTENSION`].
    pub replaces: Option<String>,
}

impl AppointmentView {
    /// A view with only a status; handy for building test values.
    pub fn new(status: AppointmentStatus) -> Self {
        AppointmentView {
            status,
            start_ms: None,
            end_ms: None,
            slots: Vec::new(),
            patient: None,
            cancelation_reason: None,
            replaces: None,
        }
    }

    /// Extract the view from an R4 Appointment. Reports every problem found (wrong types, unknown status,
    /// malformed instants, slot entries without a reference), each with its FHIRPath location.
    ///
    /// Only the fields above are read; validating the rest of the resource is the `fhir` crate's job.
    pub fn from_json(resource: &Value) -> Result<AppointmentView, Vec<FieldError>> {
        let mut errors = Vec::new();
        let Some(obj) = resource.as_object() else {
            return Err(vec![FieldError::new(
                "Appointment",
                "expected a JSON object",
            )]);
        };
        if let Some(rt) = obj.get("resourceType")
            && rt.as_str() != Some("Appointment")
        {
            errors.push(FieldError::new(
                "Appointment.resourceType",
                "expected \"Appointment\"",
            ));
        }

        let status = match obj.get("status") {
            None => {
                errors.push(FieldError::new("Appointment.status", "required"));
                None
            }
            Some(v) => {
                let parsed = v.as_str().and_then(AppointmentStatus::parse);
                if parsed.is_none() {
                    errors.push(FieldError::new(
                        "Appointment.status",
                        format!("not an appointment status code: {v}"),
                    ));
                }
                parsed
            }
        };

        let mut instant = |name: &str| -> Option<i64> {
            let v = obj.get(name)?;
            let ms = v.as_str().and_then(parse_instant_ms);
            if ms.is_none() {
                errors.push(FieldError::new(
                    format!("Appointment.{name}"),
                    "not a FHIR instant (YYYY-MM-DDThh:mm:ss[.sss](Z|+hh:mm|-hh:mm))",
                ));
            }
            ms
        };
        let start_ms = instant("start");
        let end_ms = instant("end");

        let mut slots: Vec<String> = Vec::new();
        for (i, item) in array(obj.get("slot"), "Appointment.slot", &mut errors)
            .iter()
            .enumerate()
        {
            match reference_of(item) {
                Some(r) => {
                    if !slots.iter().any(|s| s == r) {
                        slots.push(r.to_owned());
                    }
                }
                None => errors.push(FieldError::new(
                    format!("Appointment.slot[{i}].reference"),
                    "a slot must be given as a literal reference",
                )),
            }
        }

        let mut patient = None;
        for (i, p) in array(
            obj.get("participant"),
            "Appointment.participant",
            &mut errors,
        )
        .iter()
        .enumerate()
        {
            let Some(actor) = p.get("actor") else {
                continue;
            };
            let reference = actor.get("reference").and_then(Value::as_str);
            let typed_patient = actor.get("type").and_then(Value::as_str) == Some("Patient");
            match reference {
                Some(r) if patient.is_none() && (r.starts_with("Patient/") || typed_patient) => {
                    patient = Some(r.to_owned());
                }
                Some(_) => {}
                None if actor.get("reference").is_some() => errors.push(FieldError::new(
                    format!("Appointment.participant[{i}].actor.reference"),
                    "expected a string",
                )),
                None => {}
            }
        }

        let mut cancelation_reason = None;
        if let Some(cr) = obj.get("cancelationReason") {
            if !cr.is_object() {
                errors.push(FieldError::new(
                    "Appointment.cancelationReason",
                    "expected a CodeableConcept",
                ));
            }
            let codings = array(
                cr.get("coding"),
                "Appointment.cancelationReason.coding",
                &mut errors,
            );
            let mut parsed = Vec::new();
            for (i, c) in codings.iter().enumerate() {
                let mut field = |name: &str| match c.get(name) {
                    None => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(_) => {
                        errors.push(FieldError::new(
                            format!("Appointment.cancelationReason.coding[{i}].{name}"),
                            "expected a string",
                        ));
                        None
                    }
                };
                let system = field("system");
                let code = field("code");
                parsed.push(Coding { system, code });
            }
            cancelation_reason = parsed
                .iter()
                .position(|c| c.system.as_deref() == Some(CANCELLATION_REASON_SYSTEM))
                .or(if parsed.is_empty() { None } else { Some(0) })
                .and_then(|i| parsed.into_iter().nth(i));
        }

        let mut replaces = None;
        for (i, ext) in array(obj.get("extension"), "Appointment.extension", &mut errors)
            .iter()
            .enumerate()
        {
            if ext.get("url").and_then(Value::as_str) != Some(PREVIOUS_APPOINTMENT_EXTENSION) {
                continue;
            }
            match ext.get("valueReference").and_then(reference_of) {
                Some(r) if replaces.is_none() => replaces = Some(r.to_owned()),
                Some(_) => errors.push(FieldError::new(
                    format!("Appointment.extension[{i}]"),
                    "previousAppointment may appear only once",
                )),
                None => errors.push(FieldError::new(
                    format!("Appointment.extension[{i}].valueReference.reference"),
                    "previousAppointment needs a literal reference",
                )),
            }
        }

        match status {
            Some(status) if errors.is_empty() => Ok(AppointmentView {
                status,
                start_ms,
                end_ms,
                slots,
                patient,
                cancelation_reason,
                replaces,
            }),
            _ => Err(errors),
        }
    }
}

/// `Reference.reference` when it is a non-empty string.
fn reference_of(v: &Value) -> Option<&str> {
    v.get("reference")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The elements of an optional JSON array; a non-array records an error and yields nothing.
fn array<'a>(v: Option<&'a Value>, path: &str, errors: &mut Vec<FieldError>) -> &'a [Value] {
    match v {
        None => &[],
        Some(Value::Array(items)) => items,
        Some(_) => {
            errors.push(FieldError::new(path, "expected an array"));
            &[]
        }
    }
}

/// A problem found while extracting an [`AppointmentView`]: where (FHIRPath) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for FieldError {}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_every_field() {
        let v = AppointmentView::from_json(&json!({
            "resourceType": "Appointment",
            "status": "cancelled",
            "start": "2025-06-02T09:00:00+01:00",
            "end": "2025-06-02T09:15:00+01:00",
            "slot": [{"reference": "Slot/a"}, {"reference": "Slot/b"}, {"reference": "Slot/a"}],
            "participant": [
                {"actor": {"reference": "Practitioner/p1"}, "status": "accepted"},
                {"actor": {"reference": "Patient/123"}, "status": "accepted"},
                {"actor": {"reference": "Patient/456"}, "status": "accepted"}
            ],
            "cancelationReason": {"coding": [
                {"system": "https://example.org/local", "code": "x"},
                {"system": CANCELLATION_REASON_SYSTEM, "code": "pat-cpp"}
            ]},
            "extension": [{"url": PREVIOUS_APPOINTMENT_EXTENSION, "valueReference": {"reference": "Appointment/old"}}]
        }))
        .unwrap();
        assert_eq!(v.status, AppointmentStatus::Cancelled);
        assert_eq!(v.start_ms, parse_instant_ms("2025-06-02T08:00:00Z"));
        assert_eq!(v.end_ms, parse_instant_ms("2025-06-02T08:15:00Z"));
        assert_eq!(v.slots, ["Slot/a", "Slot/b"]);
        assert_eq!(v.patient.as_deref(), Some("Patient/123"));
        assert_eq!(
            v.cancelation_reason,
            Some(Coding::cancellation_reason("pat-cpp"))
        );
        assert_eq!(v.replaces.as_deref(), Some("Appointment/old"));
    }

    #[test]
    fn minimal_and_bundle_patient() {
        let v = AppointmentView::from_json(&json!({
            "status": "proposed",
            "participant": [{"actor": {"reference": "urn:uuid:1d4e", "type": "Patient"}}],
            "cancelationReason": {"coding": [{"system": "https://example.org/local", "code": "x"}]}
        }))
        .unwrap();
        assert_eq!(v.patient.as_deref(), Some("urn:uuid:1d4e"));
        assert_eq!(v.start_ms, None);
        assert!(v.slots.is_empty());
        // No R4-system coding: the first coding is kept so decide() can refuse it.
        assert_eq!(
            v.cancelation_reason.and_then(|c| c.code).as_deref(),
            Some("x")
        );
    }

    #[test]
    fn reports_every_problem() {
        let errors = AppointmentView::from_json(&json!({
            "resourceType": "Patient",
            "status": "no-show",
            "start": "2025-06-02T09:00:00",
            "end": 12,
            "slot": [{"identifier": {"value": "x"}}],
            "participant": [{"actor": {"reference": 7}}],
            "cancelationReason": {"coding": [{"system": 1, "code": "pat"}]},
            "extension": [{"url": PREVIOUS_APPOINTMENT_EXTENSION, "valueString": "old"}]
        }))
        .unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "Appointment.resourceType",
                "Appointment.status",
                "Appointment.start",
                "Appointment.end",
                "Appointment.slot[0].reference",
                "Appointment.participant[0].actor.reference",
                "Appointment.cancelationReason.coding[0].system",
                "Appointment.extension[0].valueReference.reference",
            ]
        );
        assert!(errors[1].to_string().contains("no-show"));
        assert_eq!(
            AppointmentView::from_json(&json!({})).unwrap_err(),
            [FieldError::new("Appointment.status", "required")]
        );
        assert!(AppointmentView::from_json(&json!([])).is_err());
        assert!(AppointmentView::from_json(&json!({"status": "booked", "slot": {}})).is_err());
    }

    #[test]
    fn reason_codes() {
        assert_eq!(CANCELLATION_REASON_CODES.len(), 32);
        assert!(is_cancellation_reason_code("oth-weath"));
        assert!(is_cancellation_reason_code("pat"));
        assert!(!is_cancellation_reason_code("weather"));
        assert!(!is_cancellation_reason_code("PAT"));
    }
}
