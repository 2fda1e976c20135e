//! Pure mapping of an inbound HL7 v2 message to what it asks the hub to do ([`Intent`]).
//!
//! Nothing here touches the store: [`intent`] reads the message and either names the change (a patient to
//! register or update, a merge, an appointment event) or refuses the message with the HL7 error that the ACK
//! will carry. [`crate::resources`] turns an intent into FHIR resources; [`crate::apply`] writes them.

use fhir::NhsNumber;
use hl7::{ErrorCode, Field, Message, Segment};

use crate::dtm;

/// Identifier system of the appointment ids a placer assigns (SCH-1); values are `namespace:id`.
pub const PLACER_SYSTEM: &str = "urn:carebridge:hl7:placer-appointment-id";
/// Identifier system of the appointment ids a filler assigns (SCH-2); values are `namespace:id`.
pub const FILLER_SYSTEM: &str = "urn:carebridge:hl7:filler-appointment-id";
/// Identifier system prefix of local patient numbers (MRNs): `urn:carebridge:hl7:mrn:<assigning authority>`.
pub const MRN_SYSTEM_PREFIX: &str = "urn:carebridge:hl7:mrn:";
/// Identifier system of practitioners named by a local id (AIP-3 without a known assigning authority).
pub const PRACTITIONER_SYSTEM_PREFIX: &str = "urn:carebridge:hl7:practitioner:";
/// Identifier system of locations named by AIL-3.
pub const LOCATION_SYSTEM: &str = "urn:carebridge:hl7:location";

/// Why a message was refused: the ACK code class and the ERR segment's content.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// `true`: the message is structurally unacceptable (AR / CR); `false`: a business rule refused it (AE / CE).
    pub reject: bool,
    pub code: ErrorCode,
    pub segment: Option<(String, usize)>,
    pub field: Option<usize>,
    pub message: String,
}

impl Refusal {
    pub fn reject(code: ErrorCode, at: Option<(&str, usize)>, message: impl Into<String>) -> Self {
        Refusal::new(true, code, at, message)
    }

    pub fn error(code: ErrorCode, at: Option<(&str, usize)>, message: impl Into<String>) -> Self {
        Refusal::new(false, code, at, message)
    }

    fn new(
        reject: bool,
        code: ErrorCode,
        at: Option<(&str, usize)>,
        message: impl Into<String>,
    ) -> Self {
        Refusal {
            reject,
            code,
            segment: at.map(|(s, _)| (s.to_owned(), 1)),
            field: at.map(|(_, f)| f),
            message: message.into(),
        }
    }

    pub fn to_ack_error(&self) -> hl7::AckError {
        hl7::AckError {
            code: self.code,
            segment: self.segment.clone(),
            field: self.field,
            message: self.message.clone(),
        }
    }
}

/// A FHIR identifier (system and value).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ident {
    pub system: String,
    pub value: String,
}

/// What PID (or MRG) says about a person.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PatientFacts {
    /// NHS number first (when present), then local numbers.
    pub identifiers: Vec<Ident>,
    pub family: Option<String>,
    pub given: Vec<String>,
    pub prefix: Option<String>,
    pub birth_date: Option<String>,
    /// FHIR administrative gender code.
    pub gender: Option<&'static str>,
    pub address: Option<Address>,
    pub phones: Vec<String>,
    /// PD1-3 practice ODS code.
    pub gp_practice: Option<String>,
    /// PID-30 death indicator / PID-29 date.
    pub deceased: Option<String>,
}

impl PatientFacts {
    pub fn nhs_number(&self) -> Option<&str> {
        self.identifiers
            .iter()
            .find(|i| i.system == fhir::NHS_NUMBER_SYSTEM)
            .map(|i| i.value.as_str())
    }
}

/// PID-11 (first repetition).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Address {
    pub lines: Vec<String>,
    pub city: Option<String>,
    pub district: Option<String>,
    pub postal_code: Option<String>,
    pub country: Option<String>,
}

/// A practitioner (AIP-3) or a location (AIL-3) an appointment needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceRef {
    pub identifier: Ident,
    pub display: Option<String>,
    /// Practitioner name parts (family, given).
    pub family: Option<String>,
    pub given: Option<String>,
}

/// A coded value (CWE/CE) mapped to a FHIR coding.
#[derive(Debug, Clone, PartialEq)]
pub struct Code {
    pub system: Option<String>,
    pub code: Option<String>,
    pub display: Option<String>,
}

/// The SIU trigger events the hub applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiuEvent {
    /// S12: new booking.
    Book,
    /// S13: reschedule (new time).
    Reschedule,
    /// S14: modification of details.
    Modify,
    /// S15: cancellation.
    Cancel,
    /// S17: deletion (entered in error).
    Delete,
    /// S26: patient did not attend.
    NoShow,
}

impl SiuEvent {
    pub fn trigger(self) -> &'static str {
        match self {
            SiuEvent::Book => "S12",
            SiuEvent::Reschedule => "S13",
            SiuEvent::Modify => "S14",
            SiuEvent::Cancel => "S15",
            SiuEvent::Delete => "S17",
            SiuEvent::NoShow => "S26",
        }
    }
}

/// What an SIU message says about one appointment.
#[derive(Debug, Clone, PartialEq)]
pub struct AppointmentFacts {
    pub event: SiuEvent,
    /// Placer (SCH-1) and filler (SCH-2) ids as identifiers; at least one is present.
    pub identifiers: Vec<Ident>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub patient: Option<PatientFacts>,
    pub practitioners: Vec<ResourceRef>,
    pub locations: Vec<ResourceRef>,
    /// SCH-6 event reason (the cancellation reason of an S15).
    pub event_reason: Option<Code>,
    /// SCH-7 appointment reason.
    pub reason: Option<Code>,
    /// AIS-3 service.
    pub service: Option<Code>,
    /// The first NTE after SCH.
    pub comment: Option<String>,
}

/// What an inbound message asks for.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "one short-lived value per message, moved a few times: boxing would add an allocation for nothing"
)]
pub enum Intent {
    /// ADT A01/A04/A08/A28/A31: register or update the patient.
    Patient(PatientFacts),
    /// ADT A40: merge the patient named by MRG into the one named by PID.
    Merge {
        survivor: PatientFacts,
        retired: Vec<Ident>,
    },
    /// SIU S12/S13/S14/S15/S17/S26.
    Appointment(AppointmentFacts),
}

/// A mapped message: its intent and the facts the apply step needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub intent: Intent,
    /// `MSH-9` as `ADT^A31` for logs and the message record.
    pub message_type: String,
    /// EVN-2 when present, else MSH-7: the time the sender says the change happened (orders late messages).
    pub message_time_ms: Option<i64>,
}

/// Read the message's intent, or refuse it.
pub fn intent(msg: &Message) -> Result<Mapped, Refusal> {
    let (code, trigger, _) = msg.message_type();
    let code = code.unwrap_or_default();
    let trigger = trigger.unwrap_or_default();
    let message_type = format!("{code}^{trigger}");
    let evn_time = msg.get("EVN-2").and_then(|t| dtm::parse_ms(&t));
    let msh_time = msg.get("MSH-7").and_then(|t| dtm::parse_ms(&t));
    let message_time_ms = evn_time.or(msh_time);
    let intent = match (code.as_str(), trigger.as_str()) {
        ("ADT", "A01" | "A04" | "A08" | "A28" | "A31" | "A05") => {
            Intent::Patient(patient_facts(msg)?)
        }
        ("ADT", "A40") => {
            let survivor = patient_facts(msg)?;
            let retired = merge_ids(msg)?;
            Intent::Merge { survivor, retired }
        }
        ("ADT", other) => {
            return Err(Refusal::reject(
                ErrorCode::UnsupportedEventCode,
                Some(("MSH", 9)),
                format!(
                    "ADT event {other} is not supported (supported: A01, A04, A05, A08, A28, A31, A40)"
                ),
            ));
        }
        ("SIU", t) => {
            let event = match t {
                "S12" => SiuEvent::Book,
                "S13" => SiuEvent::Reschedule,
                "S14" => SiuEvent::Modify,
                "S15" => SiuEvent::Cancel,
                "S17" => SiuEvent::Delete,
                "S26" => SiuEvent::NoShow,
                other => {
                    return Err(Refusal::reject(
                        ErrorCode::UnsupportedEventCode,
                        Some(("MSH", 9)),
                        format!(
                            "SIU event {other} is not supported (supported: S12, S13, S14, S15, S17, S26)"
                        ),
                    ));
                }
            };
            Intent::Appointment(appointment_facts(msg, event)?)
        }
        ("", _) => {
            return Err(Refusal::reject(
                ErrorCode::RequiredFieldMissing,
                Some(("MSH", 9)),
                "MSH-9 (message type) is empty",
            ));
        }
        (other, _) => {
            return Err(Refusal::reject(
                ErrorCode::UnsupportedMessageType,
                Some(("MSH", 9)),
                format!("message type {other} is not supported (supported: ADT, SIU)"),
            ));
        }
    };
    Ok(Mapped {
        intent,
        message_type,
        message_time_ms,
    })
}

fn first_rep(seg: &Segment, n: usize) -> Option<Field> {
    seg.repetitions(n).into_iter().next()
}

fn comp(f: &Option<Field>, n: usize) -> Option<String> {
    f.as_ref()
        .and_then(|f| f.component(n))
        .filter(|s| !s.trim().is_empty())
}

fn coding_system(hl7: &str) -> Option<String> {
    let s = match hl7.trim() {
        "" => return None,
        "SCT" | "SNM" | "SNOMED" | "SNOMEDCT" => "http://snomed.info/sct",
        "LN" | "LOINC" => "http://loinc.org",
        "I10" | "ICD10" => "http://hl7.org/fhir/sid/icd-10",
        other if other.starts_with("HL7") && other.len() == 7 => {
            return Some(format!(
                "http://terminology.hl7.org/CodeSystem/v2-{}",
                &other[3..]
            ));
        }
        other => {
            return Some(format!(
                "urn:carebridge:hl7:code-system:{}",
                sanitize(other)
            ));
        }
    };
    Some(s.to_owned())
}

fn code_of(f: Option<Field>) -> Option<Code> {
    let f = Some(f?);
    let code = comp(&f, 1);
    let display = comp(&f, 2);
    if code.is_none() && display.is_none() {
        return None;
    }
    Some(Code {
        system: comp(&f, 3).and_then(|s| coding_system(&s)),
        code,
        display,
    })
}

/// Characters allowed in the namespace part of our URN systems and in id hashes' inputs.
fn sanitize(s: &str) -> String {
    s.trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// PID-3 repetitions, NHS number first. An NHS number is a CX with assigning authority `NHS` (CX.4) or type
/// `NH`/`HN` (CX.5, `HN` being the variant seen in real feeds); it must pass the modulus 11 check (AE otherwise).
fn patient_ids(seg: &Segment, field: usize, seg_name: &str) -> Result<Vec<Ident>, Refusal> {
    let mut nhs = Vec::new();
    let mut local = Vec::new();
    for rep in seg.repetitions(field) {
        let Some(value) = rep
            .component(1)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
        else {
            continue;
        };
        let authority = rep
            .subcomponent(4, 1)
            .or_else(|| rep.component(4))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let id_type = rep
            .component(5)
            .unwrap_or_default()
            .trim()
            .to_ascii_uppercase();
        let is_nhs = authority.eq_ignore_ascii_case("NHS") || id_type == "NH" || id_type == "HN";
        if is_nhs {
            let compact: String = value.chars().filter(|c| !c.is_whitespace()).collect();
            match NhsNumber::parse(&compact) {
                Ok(n) => nhs.push(Ident {
                    system: fhir::NHS_NUMBER_SYSTEM.to_owned(),
                    value: n.as_str().to_owned(),
                }),
                Err(e) => {
                    return Err(Refusal::error(
                        ErrorCode::DataType,
                        Some((seg_name, field)),
                        format!("{seg_name}-{field}: '{value}' is not a valid NHS number ({e})"),
                    ));
                }
            }
        } else {
            let ns = if authority.is_empty() {
                "local".to_owned()
            } else {
                sanitize(&authority)
            };
            local.push(Ident {
                system: format!("{MRN_SYSTEM_PREFIX}{ns}"),
                value,
            });
        }
    }
    nhs.extend(local);
    Ok(nhs)
}

fn patient_facts(msg: &Message) -> Result<PatientFacts, Refusal> {
    let Some(pid) = msg.segment("PID") else {
        return Err(Refusal::reject(
            ErrorCode::SegmentSequence,
            Some(("PID", 0)),
            "the message has no PID segment",
        ));
    };
    patient_from_pid(msg, pid)
}

fn patient_from_pid(msg: &Message, pid: &Segment) -> Result<PatientFacts, Refusal> {
    let mut identifiers = patient_ids(pid, 3, "PID")?;
    if identifiers.is_empty() {
        // v2.3 feeds sometimes put the NHS number in PID-2 (external id).
        identifiers = patient_ids(pid, 2, "PID")?;
    }
    if identifiers.is_empty() {
        return Err(Refusal::reject(
            ErrorCode::RequiredFieldMissing,
            Some(("PID", 3)),
            "PID-3 (patient identifier list) is empty",
        ));
    }
    let name = first_rep(pid, 5);
    let family = name
        .as_ref()
        .and_then(|n| n.subcomponent(1, 1).or_else(|| n.component(1)))
        .filter(|s| !s.trim().is_empty());
    let mut given = Vec::new();
    if let Some(g) = comp(&name, 2) {
        given.push(g);
    }
    if let Some(m) = comp(&name, 3) {
        given.push(m);
    }
    let gender = pid
        .repetitions(8)
        .into_iter()
        .next()
        .and_then(|f| f.component(1))
        .map(|g| match g.trim().to_ascii_uppercase().as_str() {
            "M" => "male",
            "F" => "female",
            "O" | "A" | "N" => "other",
            _ => "unknown",
        });
    let birth = first_rep(pid, 7);
    let birth_date = match comp(&birth, 1) {
        None => None,
        Some(raw) => Some(dtm::parse_date(&raw).ok_or_else(|| {
            Refusal::reject(
                ErrorCode::DataType,
                Some(("PID", 7)),
                format!("PID-7: '{raw}' is not an HL7 date"),
            )
        })?),
    };
    let addr = first_rep(pid, 11);
    let address = addr.as_ref().map(|a| Address {
        lines: [
            a.subcomponent(1, 1).or_else(|| a.component(1)),
            a.component(2),
        ]
        .into_iter()
        .flatten()
        .filter(|s| !s.trim().is_empty())
        .collect(),
        city: comp(&addr, 3),
        district: comp(&addr, 4),
        postal_code: comp(&addr, 5),
        country: comp(&addr, 6),
    });
    let address = address.filter(|a| {
        !a.lines.is_empty() || a.city.is_some() || a.postal_code.is_some() || a.district.is_some()
    });
    let phones = pid
        .repetitions(13)
        .into_iter()
        .filter_map(|f| f.component(1).or_else(|| f.component(12)))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let deceased = match pid.raw_field(30).map(str::trim) {
        Some("Y") => Some(
            pid.repetitions(29)
                .into_iter()
                .next()
                .and_then(|f| f.component(1))
                .and_then(|t| dtm::parse_ms(&t))
                .map_or_else(|| "true".to_owned(), fhir::format_instant_ms),
        ),
        _ => None,
    };
    let gp_practice = msg
        .segment("PD1")
        .and_then(|pd1| first_rep(pd1, 3))
        .and_then(|f| {
            f.component(3)
                .filter(|s| !s.trim().is_empty())
                .or_else(|| f.component(1))
        })
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    Ok(PatientFacts {
        identifiers,
        family,
        given,
        prefix: comp(&name, 5),
        birth_date,
        gender,
        address,
        phones,
        gp_practice,
        deceased,
    })
}

fn merge_ids(msg: &Message) -> Result<Vec<Ident>, Refusal> {
    let Some(mrg) = msg.segment("MRG") else {
        return Err(Refusal::reject(
            ErrorCode::SegmentSequence,
            Some(("MRG", 0)),
            "an A40 needs an MRG segment naming the retired patient",
        ));
    };
    let ids = patient_ids(mrg, 1, "MRG")?;
    if ids.is_empty() {
        return Err(Refusal::reject(
            ErrorCode::RequiredFieldMissing,
            Some(("MRG", 1)),
            "MRG-1 (prior patient identifier list) is empty",
        ));
    }
    Ok(ids)
}

fn appointment_ident(msg: &Message, f: Option<Field>, system: &str) -> Option<Ident> {
    let f = f?;
    let id = f
        .component(1)
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())?;
    let ns = f
        .component(2)
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| msg.sending_facility())
        .or_else(|| msg.sending_application())
        .unwrap_or_default();
    let value = if ns.is_empty() {
        id
    } else {
        format!("{}:{id}", sanitize(&ns))
    };
    Some(Ident {
        system: system.to_owned(),
        value,
    })
}

fn time_of(raw: Option<String>, seg: &str, field: usize) -> Result<Option<i64>, Refusal> {
    match raw.filter(|s| !s.trim().is_empty()) {
        None => Ok(None),
        Some(t) => dtm::parse_ms(&t).map(Some).ok_or_else(|| {
            Refusal::reject(
                ErrorCode::DataType,
                Some((seg, field)),
                format!("{seg}-{field}: '{t}' is not an HL7 date/time"),
            )
        }),
    }
}

/// Minutes in a duration given with HL7 units (`min`, `h`, `s`...); minutes when the unit is absent.
fn duration_minutes(amount: Option<String>, unit: Option<String>) -> Option<i64> {
    let n: i64 = amount?.trim().parse().ok()?;
    let unit = unit.unwrap_or_default().to_ascii_lowercase();
    let factor = match unit.trim() {
        "" | "m" | "min" | "mins" | "minute" | "minutes" => 1,
        "h" | "hr" | "hour" | "hours" => 60,
        "d" | "day" | "days" => 1440,
        // Seconds: keep whole minutes only.
        "s" | "sec" | "second" | "seconds" => return Some(n / 60),
        _ => return None,
    };
    n.checked_mul(factor)
}

fn appointment_facts(msg: &Message, event: SiuEvent) -> Result<AppointmentFacts, Refusal> {
    let Some(sch) = msg.segment("SCH") else {
        return Err(Refusal::reject(
            ErrorCode::SegmentSequence,
            Some(("SCH", 0)),
            "an SIU message needs an SCH segment",
        ));
    };
    let identifiers: Vec<Ident> = [
        appointment_ident(msg, first_rep(sch, 1), PLACER_SYSTEM),
        appointment_ident(msg, first_rep(sch, 2), FILLER_SYSTEM),
    ]
    .into_iter()
    .flatten()
    .collect();
    if identifiers.is_empty() {
        return Err(Refusal::reject(
            ErrorCode::RequiredFieldMissing,
            Some(("SCH", 1)),
            "SCH-1 (placer appointment id) and SCH-2 (filler appointment id) are both empty",
        ));
    }
    // Start and end: TQ1-7/8 (v2.6+), else SCH-11.4/.5 (TQ), else the first resource's start + duration.
    let tq1 = msg.segment("TQ1");
    let (mut start_ms, mut end_ms) = (None, None);
    if let Some(tq1) = tq1 {
        start_ms = time_of(first_rep(tq1, 7).and_then(|f| f.component(1)), "TQ1", 7)?;
        end_ms = time_of(first_rep(tq1, 8).and_then(|f| f.component(1)), "TQ1", 8)?;
    }
    if start_ms.is_none() {
        let tq = first_rep(sch, 11);
        start_ms = time_of(tq.as_ref().and_then(|f| f.subcomponent(4, 1)), "SCH", 11)?;
        end_ms = end_ms.or(time_of(
            tq.as_ref().and_then(|f| f.subcomponent(5, 1)),
            "SCH",
            11,
        )?);
    }
    let mut resource_duration = None;
    for (name, start_field, dur_field) in
        [("AIS", 4, 7), ("AIP", 6, 9), ("AIL", 6, 9), ("AIG", 8, 11)]
    {
        if start_ms.is_some() && resource_duration.is_some() {
            break;
        }
        if let Some(seg) = msg.segment(name) {
            if start_ms.is_none() {
                start_ms = time_of(
                    first_rep(seg, start_field).and_then(|f| f.component(1)),
                    name,
                    start_field,
                )?;
            }
            if resource_duration.is_none() {
                resource_duration = duration_minutes(
                    first_rep(seg, dur_field).and_then(|f| f.component(1)),
                    first_rep(seg, dur_field + 1).and_then(|f| f.component(1)),
                );
            }
        }
    }
    if end_ms.is_none() {
        let sch_duration = duration_minutes(
            first_rep(sch, 9).and_then(|f| f.component(1)),
            first_rep(sch, 10).and_then(|f| f.component(1)),
        );
        if let (Some(s), Some(minutes)) = (start_ms, sch_duration.or(resource_duration)) {
            end_ms = Some(s + minutes * 60_000);
        }
    }
    if let (Some(s), Some(e)) = (start_ms, end_ms)
        && e <= s
    {
        return Err(Refusal::reject(
            ErrorCode::DataType,
            Some(("TQ1", 8)),
            "the appointment ends before it starts",
        ));
    }
    if matches!(event, SiuEvent::Book | SiuEvent::Reschedule)
        && (start_ms.is_none() || end_ms.is_none())
    {
        return Err(Refusal::reject(
            ErrorCode::RequiredFieldMissing,
            Some(("TQ1", 7)),
            format!(
                "an SIU^{} needs the appointment's start and end (TQ1-7/TQ1-8, SCH-11, or a start and duration)",
                event.trigger()
            ),
        ));
    }
    let patient = match msg.segment("PID") {
        Some(pid) => Some(patient_from_pid(msg, pid)?),
        None => None,
    };
    if event == SiuEvent::Book && patient.is_none() {
        return Err(Refusal::reject(
            ErrorCode::SegmentSequence,
            Some(("PID", 0)),
            "an SIU^S12 needs a PID segment naming the patient",
        ));
    }
    let practitioners = msg
        .segments_named("AIP")
        .filter_map(|aip| {
            let f = first_rep(aip, 3)?;
            let id = f
                .component(1)
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())?;
            let authority = f
                .subcomponent(9, 1)
                .or_else(|| f.component(9))
                .unwrap_or_default();
            let system = match authority.trim().to_ascii_uppercase().as_str() {
                "GMC" => "https://fhir.hl7.org.uk/Id/gmc-number".to_owned(),
                "GMP" => "https://fhir.hl7.org.uk/Id/gmp-number".to_owned(),
                "NMC" => "https://fhir.hl7.org.uk/Id/nmc-number".to_owned(),
                "SDS" => "https://fhir.nhs.uk/Id/sds-user-id".to_owned(),
                "" => format!(
                    "{PRACTITIONER_SYSTEM_PREFIX}{}",
                    sanitize(&msg.sending_facility().unwrap_or_else(|| "local".into()))
                ),
                other => format!("{PRACTITIONER_SYSTEM_PREFIX}{}", sanitize(other)),
            };
            let fo = Some(f);
            let family = comp(&fo, 2);
            let given = comp(&fo, 3);
            let display = match (&given, &family) {
                (Some(g), Some(f)) => Some(format!("{g} {f}")),
                (None, Some(f)) => Some(f.clone()),
                _ => None,
            };
            Some(ResourceRef {
                identifier: Ident { system, value: id },
                display,
                family,
                given,
            })
        })
        .collect();
    let locations = msg
        .segments_named("AIL")
        .filter_map(|ail| {
            let f = first_rep(ail, 3)?;
            let parts: Vec<String> = [1, 2, 3, 4]
                .into_iter()
                .map(|n| f.subcomponent(n, 1).unwrap_or_default().trim().to_owned())
                .collect();
            if parts.iter().all(String::is_empty) {
                return None;
            }
            let value = parts.join("^").trim_end_matches('^').to_owned();
            let description = f.component(9).filter(|s| !s.trim().is_empty());
            let display = description.or_else(|| {
                let named: Vec<&str> = parts
                    .iter()
                    .map(String::as_str)
                    .filter(|s| !s.is_empty())
                    .collect();
                Some(named.join(" "))
            });
            Some(ResourceRef {
                identifier: Ident {
                    system: LOCATION_SYSTEM.to_owned(),
                    value,
                },
                display,
                family: None,
                given: None,
            })
        })
        .collect();
    // The NTE right after SCH (before PID) comments on the appointment.
    let mut comment = None;
    let mut after_sch = false;
    for seg in msg.segments() {
        match seg.name() {
            "SCH" => after_sch = true,
            "TQ1" => {}
            "NTE" if after_sch => {
                comment = seg
                    .repetitions(3)
                    .into_iter()
                    .next()
                    .and_then(|f| f.component(1))
                    .filter(|s| !s.trim().is_empty());
                break;
            }
            _ if after_sch => break,
            _ => {}
        }
    }
    Ok(AppointmentFacts {
        event,
        identifiers,
        start_ms,
        end_ms,
        patient,
        practitioners,
        locations,
        event_reason: code_of(first_rep(sch, 6)),
        reason: code_of(first_rep(sch, 7)),
        service: msg
            .segment("AIS")
            .and_then(|ais| code_of(first_rep(ais, 3))),
        comment,
    })
}
