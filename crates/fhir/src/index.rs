//! Search parameters the hub supports and extraction of their index values from a resource.
//!
//! The parameter tables follow the FHIR R4 search parameter registry (names, types, expressions and, for
//! reference parameters, the target types the hub serves), plus the UK Core `delivery-channel` parameter on
//! Slot and Appointment. Extraction runs on every write, so it walks only the paths each parameter needs,
//! straight over the JSON (no FHIRPath engine), and never panics on odd input: values of the wrong JSON
//! type, unparsable dates, empty codes and unresolvable references are skipped.

use crate::text::normalize_string;
use crate::{ResourceType, parse_date_range};
use serde_json::Value;
use std::collections::HashSet;
use std::hash::BuildHasher;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Token,
    String,
    Date,
    Reference,
}

/// A supported search parameter of one resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchParamDef {
    pub name: &'static str,
    pub kind: ParamKind,
    /// For reference parameters: the resource types it may point to (first is the default for bare ids).
    pub targets: &'static [ResourceType],
    /// FHIRPath-like description for the CapabilityStatement, e.g. `Patient.identifier`.
    pub expression: &'static str,
}

/// One value indexed for one search parameter of one resource version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IndexEntry {
    pub param: &'static str,
    pub value: IndexValue,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IndexValue {
    /// `system` is `None` when the coding/identifier has no system.
    Token {
        system: Option<String>,
        code: String,
    },
    /// `value`: normalised with `normalize_string` (what a plain string search matches by prefix); `exact`:
    /// the string as sent (what the `:exact` modifier matches). One row holds both, so a string costs the
    /// store one index row, not one per form.
    String { value: String, exact: String },
    /// Inclusive UTC range in ms since the epoch. An open end of a Period is `i64::MIN` / `i64::MAX`.
    Date { low_ms: i64, high_ms: i64 },
    /// `Type/id`: a relative reference as given (a `/_history/n` suffix dropped), or the `Type/id` tail of an
    /// absolute URL. Contained (`#x`), `urn:` and identifier-only references are not indexed.
    Reference(String),
}

/// URL of the UK Core extension that carries the delivery channel of a Slot or Appointment.
pub const DELIVERY_CHANNEL_EXTENSION_URL: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-DeliveryChannel";
/// Code system of the UK Core delivery channels (`In-person`, `Telephone`, `Video`).
pub const DELIVERY_CHANNEL_SYSTEM: &str =
    "https://fhir.hl7.org.uk/CodeSystem/UKCore-DeliveryChannel";

const ADMINISTRATIVE_GENDER: &str = "http://hl7.org/fhir/administrative-gender";
const LOCATION_STATUS: &str = "http://hl7.org/fhir/location-status";
const SLOT_STATUS: &str = "http://hl7.org/fhir/slotstatus";
const APPOINTMENT_STATUS: &str = "http://hl7.org/fhir/appointmentstatus";
const PARTICIPATION_STATUS: &str = "http://hl7.org/fhir/participationstatus";

use ParamKind::{Date, Reference, String as Str, Token};
use ResourceType as RT;

const fn p(name: &'static str, kind: ParamKind, expression: &'static str) -> SearchParamDef {
    SearchParamDef {
        name,
        kind,
        targets: &[],
        expression,
    }
}

const fn r(
    name: &'static str,
    targets: &'static [ResourceType],
    expression: &'static str,
) -> SearchParamDef {
    SearchParamDef {
        name,
        kind: Reference,
        targets,
        expression,
    }
}

/// Served types an Appointment participant or a Schedule may name (R4 order; Device and RelatedPerson are
/// not served by the hub).
const ACTOR_TARGETS: &[ResourceType] = &[
    RT::Practitioner,
    RT::Patient,
    RT::HealthcareService,
    RT::PractitionerRole,
    RT::Location,
];

static PATIENT: &[SearchParamDef] = &[
    p("identifier", Token, "Patient.identifier"),
    p("name", Str, "Patient.name"),
    p("family", Str, "Patient.name.family"),
    p("given", Str, "Patient.name.given"),
    p("birthdate", Date, "Patient.birthDate"),
    p("gender", Token, "Patient.gender"),
    p("address-postalcode", Str, "Patient.address.postalCode"),
    p("active", Token, "Patient.active"),
    r(
        "general-practitioner",
        &[RT::Practitioner, RT::Organization, RT::PractitionerRole],
        "Patient.generalPractitioner",
    ),
    r(
        "organization",
        &[RT::Organization],
        "Patient.managingOrganization",
    ),
    p("telecom", Token, "Patient.telecom"),
    p("phone", Token, "Patient.telecom.where(system='phone')"),
    p("email", Token, "Patient.telecom.where(system='email')"),
];

static PRACTITIONER: &[SearchParamDef] = &[
    p("identifier", Token, "Practitioner.identifier"),
    p("name", Str, "Practitioner.name"),
    p("family", Str, "Practitioner.name.family"),
    p("given", Str, "Practitioner.name.given"),
    p("active", Token, "Practitioner.active"),
];

static PRACTITIONER_ROLE: &[SearchParamDef] = &[
    p("identifier", Token, "PractitionerRole.identifier"),
    r(
        "practitioner",
        &[RT::Practitioner],
        "PractitionerRole.practitioner",
    ),
    r(
        "organization",
        &[RT::Organization],
        "PractitionerRole.organization",
    ),
    r("location", &[RT::Location], "PractitionerRole.location"),
    r(
        "service",
        &[RT::HealthcareService],
        "PractitionerRole.healthcareService",
    ),
    p("specialty", Token, "PractitionerRole.specialty"),
    p("role", Token, "PractitionerRole.code"),
    p("active", Token, "PractitionerRole.active"),
];

static ORGANIZATION: &[SearchParamDef] = &[
    p("identifier", Token, "Organization.identifier"),
    p("name", Str, "Organization.name | Organization.alias"),
    p("active", Token, "Organization.active"),
    r("partof", &[RT::Organization], "Organization.partOf"),
    p("type", Token, "Organization.type"),
    p("address-postalcode", Str, "Organization.address.postalCode"),
];

static LOCATION: &[SearchParamDef] = &[
    p("identifier", Token, "Location.identifier"),
    p("name", Str, "Location.name | Location.alias"),
    p("status", Token, "Location.status"),
    r(
        "organization",
        &[RT::Organization],
        "Location.managingOrganization",
    ),
    p("address-postalcode", Str, "Location.address.postalCode"),
    p("type", Token, "Location.type"),
];

static HEALTHCARE_SERVICE: &[SearchParamDef] = &[
    p("identifier", Token, "HealthcareService.identifier"),
    p("name", Str, "HealthcareService.name"),
    r(
        "organization",
        &[RT::Organization],
        "HealthcareService.providedBy",
    ),
    p("service-type", Token, "HealthcareService.type"),
    p("specialty", Token, "HealthcareService.specialty"),
    r("location", &[RT::Location], "HealthcareService.location"),
    p("active", Token, "HealthcareService.active"),
    p("service-category", Token, "HealthcareService.category"),
];

static SCHEDULE: &[SearchParamDef] = &[
    p("identifier", Token, "Schedule.identifier"),
    r("actor", ACTOR_TARGETS, "Schedule.actor"),
    p("active", Token, "Schedule.active"),
    p("date", Date, "Schedule.planningHorizon"),
    p("service-type", Token, "Schedule.serviceType"),
    p("specialty", Token, "Schedule.specialty"),
];

static SLOT: &[SearchParamDef] = &[
    p("identifier", Token, "Slot.identifier"),
    r("schedule", &[RT::Schedule], "Slot.schedule"),
    p("status", Token, "Slot.status"),
    p("start", Date, "Slot.start"),
    p("service-type", Token, "Slot.serviceType"),
    p("specialty", Token, "Slot.specialty"),
    p("appointment-type", Token, "Slot.appointmentType"),
    p("service-category", Token, "Slot.serviceCategory"),
    p(
        "delivery-channel",
        Token,
        "Slot.extension('https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-DeliveryChannel').value",
    ),
];

static APPOINTMENT: &[SearchParamDef] = &[
    p("identifier", Token, "Appointment.identifier"),
    p("status", Token, "Appointment.status"),
    // Indexed as the period start..end (or the start alone), so `date=ge...` style queries see the whole visit.
    p("date", Date, "Appointment.start"),
    r(
        "patient",
        &[RT::Patient],
        "Appointment.participant.actor.where(resolve() is Patient)",
    ),
    r(
        "practitioner",
        &[RT::Practitioner],
        "Appointment.participant.actor.where(resolve() is Practitioner)",
    ),
    r(
        "location",
        &[RT::Location],
        "Appointment.participant.actor.where(resolve() is Location)",
    ),
    r("actor", ACTOR_TARGETS, "Appointment.participant.actor"),
    r("slot", &[RT::Slot], "Appointment.slot"),
    p("service-type", Token, "Appointment.serviceType"),
    p("specialty", Token, "Appointment.specialty"),
    p("appointment-type", Token, "Appointment.appointmentType"),
    // Targets ServiceRequest, which the hub does not serve: indexed, but bare ids cannot be qualified.
    r("based-on", &[], "Appointment.basedOn"),
    p("part-status", Token, "Appointment.participant.status"),
    p(
        "delivery-channel",
        Token,
        "Appointment.extension('https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-DeliveryChannel').value",
    ),
];

static SUBSCRIPTION: &[SearchParamDef] = &[
    p("status", Token, "Subscription.status"),
    p("type", Token, "Subscription.channel.type"),
    p("url", Token, "Subscription.channel.endpoint"),
    p("criteria", Token, "Subscription.criteria"),
    p("payload", Token, "Subscription.channel.payload"),
];

/// The parameter whose index rows hold `param`'s values, when `param` is a reference parameter whose values
/// are exactly another one's restricted to its target types: Appointment `patient`, `practitioner` and
/// `location` are `actor` restricted to Patient, Practitioner and Location (an indexed reference is
/// `Type/id`, so the restriction is in the value itself). [`index_entries`] still lists them (`_include` and
/// subscription matching see every parameter); the stores keep only the `actor` rows and answer a search on
/// these parameters from them.
pub fn stored_as(rtype: ResourceType, param: &str) -> Option<&'static str> {
    match (rtype, param) {
        (RT::Appointment, "patient" | "practitioner" | "location") => Some("actor"),
        _ => None,
    }
}

/// Other parameters whose index rows a search on `param` also reads. Patient and Practitioner `name` covers
/// every part of a HumanName, and `family` and `given` index two of those parts already, so the name's
/// family and given parts are indexed once, under `family` and `given`, and `name` itself holds only the
/// prefix, suffix and text: a search, sort or subscription match on `name` reads all three.
pub fn also_indexed_under(rtype: ResourceType, param: &str) -> &'static [&'static str] {
    match (rtype, param) {
        (RT::Patient | RT::Practitioner, "name") => &["family", "given"],
        _ => &[],
    }
}

/// All search parameters of a type (besides `_id` and `_lastUpdated`, which every type has).
pub fn search_params(rtype: ResourceType) -> &'static [SearchParamDef] {
    match rtype {
        RT::Patient => PATIENT,
        RT::Practitioner => PRACTITIONER,
        RT::PractitionerRole => PRACTITIONER_ROLE,
        RT::Organization => ORGANIZATION,
        RT::Location => LOCATION,
        RT::HealthcareService => HEALTHCARE_SERVICE,
        RT::Schedule => SCHEDULE,
        RT::Slot => SLOT,
        RT::Appointment => APPOINTMENT,
        RT::Subscription => SUBSCRIPTION,
    }
}

pub fn search_param(rtype: ResourceType, name: &str) -> Option<&'static SearchParamDef> {
    search_params(rtype).iter().find(|p| p.name == name)
}

/// True when a resource of `rtype` can hold at most one value of parameter `name`: a date parameter whose
/// expression is one element of the resource (`Slot.start`) that the R4 definition allows only once. A search
/// may then treat two range clauses on it (`start=ge..&start=lt..`) as one range over a single index row.
pub fn single_valued(rtype: ResourceType, name: &str) -> bool {
    let Some(def) = search_param(rtype, name) else {
        return false;
    };
    if def.kind != ParamKind::Date {
        return false;
    }
    let Some(element) = def
        .expression
        .strip_prefix(rtype.as_str())
        .and_then(|rest| rest.strip_prefix('.'))
        .filter(|e| !e.contains('.'))
    else {
        return false;
    };
    crate::schema::resource_def(rtype)
        .lookup(element)
        .is_some_and(|(_, elem, _)| !elem.many)
}

/// Widest index range, in ms, of a value of an [`instant_param`]: an instant is indexed as the range of its
/// precision, at most one second (`2026-12-09T10:00:00Z` is `[10:00:00.000, 10:00:00.999]`).
pub const INSTANT_WIDTH_MS: i64 = 999;

/// True when parameter `name` of `rtype` is [`single_valued`] and indexed as one FHIR `instant` (`Slot.start`),
/// so each of its index rows spans at most [`INSTANT_WIDTH_MS`]. (Appointment `date` is not: its row spans
/// the appointment from start to end.)
pub fn instant_param(rtype: ResourceType, name: &str) -> bool {
    matches!((rtype, name), (RT::Slot, "start")) && single_valued(rtype, name)
}

/// True when `_sort` may use this parameter: string and date parameters (besides `_id` / `_lastUpdated`, which
/// the caller handles itself).
pub fn sortable(rtype: ResourceType, name: &str) -> bool {
    search_param(rtype, name).is_some_and(|p| matches!(p.kind, ParamKind::String | ParamKind::Date))
}

/// Index values of a (valid) resource for every supported search parameter of its type. Each
/// (parameter, value) pair appears once, in document order of first occurrence.
pub fn index_entries(rtype: ResourceType, resource: &Value) -> Vec<IndexEntry> {
    let mut out = Out::default();
    if !resource.is_object() {
        return out.entries;
    }
    let res = resource;
    match rtype {
        RT::Patient => {
            out.identifiers("identifier", res.get("identifier"));
            out.human_names(res.get("name"));
            out.date("birthdate", res.get("birthDate"));
            out.code("gender", ADMINISTRATIVE_GENDER, res.get("gender"));
            for address in each(res.get("address")) {
                out.string("address-postalcode", address.get("postalCode"));
            }
            out.boolean("active", res.get("active"));
            out.references("general-practitioner", res.get("generalPractitioner"));
            out.references("organization", res.get("managingOrganization"));
            for contact in each(res.get("telecom")) {
                let Some(value) = contact.get("value").and_then(Value::as_str) else {
                    continue;
                };
                out.token("telecom", None, value);
                match contact.get("system").and_then(Value::as_str) {
                    Some("phone") => out.token("phone", None, value),
                    Some("email") => out.token("email", None, value),
                    _ => {}
                }
            }
        }
        RT::Practitioner => {
            out.identifiers("identifier", res.get("identifier"));
            out.human_names(res.get("name"));
            out.boolean("active", res.get("active"));
        }
        RT::PractitionerRole => {
            out.identifiers("identifier", res.get("identifier"));
            out.references("practitioner", res.get("practitioner"));
            out.references("organization", res.get("organization"));
            out.references("location", res.get("location"));
            out.references("service", res.get("healthcareService"));
            out.codeable_concepts("specialty", res.get("specialty"));
            out.codeable_concepts("role", res.get("code"));
            out.boolean("active", res.get("active"));
        }
        RT::Organization => {
            out.identifiers("identifier", res.get("identifier"));
            out.string("name", res.get("name"));
            for alias in each(res.get("alias")) {
                out.string("name", Some(alias));
            }
            out.boolean("active", res.get("active"));
            out.references("partof", res.get("partOf"));
            out.codeable_concepts("type", res.get("type"));
            for address in each(res.get("address")) {
                out.string("address-postalcode", address.get("postalCode"));
            }
        }
        RT::Location => {
            out.identifiers("identifier", res.get("identifier"));
            out.string("name", res.get("name"));
            for alias in each(res.get("alias")) {
                out.string("name", Some(alias));
            }
            out.code("status", LOCATION_STATUS, res.get("status"));
            out.references("organization", res.get("managingOrganization"));
            // Location.address is 0..1; `each` accepts the object (and, leniently, an array).
            for address in each(res.get("address")) {
                out.string("address-postalcode", address.get("postalCode"));
            }
            out.codeable_concepts("type", res.get("type"));
        }
        RT::HealthcareService => {
            out.identifiers("identifier", res.get("identifier"));
            out.string("name", res.get("name"));
            out.references("organization", res.get("providedBy"));
            out.codeable_concepts("service-type", res.get("type"));
            out.codeable_concepts("specialty", res.get("specialty"));
            out.references("location", res.get("location"));
            out.boolean("active", res.get("active"));
            out.codeable_concepts("service-category", res.get("category"));
        }
        RT::Schedule => {
            out.identifiers("identifier", res.get("identifier"));
            out.references("actor", res.get("actor"));
            out.boolean("active", res.get("active"));
            out.period("date", res.get("planningHorizon"));
            out.codeable_concepts("service-type", res.get("serviceType"));
            out.codeable_concepts("specialty", res.get("specialty"));
        }
        RT::Slot => {
            out.identifiers("identifier", res.get("identifier"));
            out.references("schedule", res.get("schedule"));
            out.code("status", SLOT_STATUS, res.get("status"));
            out.date("start", res.get("start"));
            out.codeable_concepts("service-type", res.get("serviceType"));
            out.codeable_concepts("specialty", res.get("specialty"));
            out.codeable_concepts("appointment-type", res.get("appointmentType"));
            out.codeable_concepts("service-category", res.get("serviceCategory"));
            out.delivery_channel(res.get("extension"));
        }
        RT::Subscription => {
            out.code(
                "status",
                "http://hl7.org/fhir/subscription-status",
                res.get("status"),
            );
            if let Some(criteria) = res.get("criteria").and_then(Value::as_str) {
                out.token("criteria", None, criteria);
            }
            let channel = res.get("channel");
            out.code(
                "type",
                "http://hl7.org/fhir/subscription-channel-type",
                channel.and_then(|c| c.get("type")),
            );
            if let Some(url) = channel
                .and_then(|c| c.get("endpoint"))
                .and_then(Value::as_str)
            {
                out.token("url", None, url);
            }
            if let Some(payload) = channel
                .and_then(|c| c.get("payload"))
                .and_then(Value::as_str)
            {
                out.token("payload", None, payload);
            }
        }
        RT::Appointment => {
            out.identifiers("identifier", res.get("identifier"));
            out.code("status", APPOINTMENT_STATUS, res.get("status"));
            out.start_end("date", res.get("start"), res.get("end"));
            for participant in each(res.get("participant")) {
                if let Some(key) = participant.get("actor").and_then(reference_key) {
                    let param = match key.split_once('/').map(|(t, _)| t) {
                        Some("Patient") => Some("patient"),
                        Some("Practitioner") => Some("practitioner"),
                        Some("Location") => Some("location"),
                        _ => None,
                    };
                    if let Some(param) = param {
                        out.push(param, IndexValue::Reference(key.clone()));
                    }
                    out.push("actor", IndexValue::Reference(key));
                }
                out.code(
                    "part-status",
                    PARTICIPATION_STATUS,
                    participant.get("status"),
                );
            }
            out.references("slot", res.get("slot"));
            out.codeable_concepts("service-type", res.get("serviceType"));
            out.codeable_concepts("specialty", res.get("specialty"));
            out.codeable_concepts("appointment-type", res.get("appointmentType"));
            out.references("based-on", res.get("basedOn"));
            out.delivery_channel(res.get("extension"));
        }
    }
    out.entries
}

/// The elements of a repeating element; a lone value is treated as a one-element list (lenient), and
/// absent/null as empty.
fn each(v: Option<&Value>) -> impl Iterator<Item = &Value> {
    let (many, one): (&[Value], Option<&Value>) = match v {
        Some(Value::Array(items)) => (items.as_slice(), None),
        None | Some(Value::Null) => (&[], None),
        Some(single) => (&[], Some(single)),
    };
    many.iter().chain(one)
}

fn non_empty_str(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// The `Type/id` key a Reference value is indexed under, if any (see [`IndexValue::Reference`]).
fn reference_key(reference: &Value) -> Option<String> {
    reference_string_key(non_empty_str(reference.get("reference"))?)
}

fn reference_string_key(s: &str) -> Option<String> {
    if s.starts_with('#') {
        return None;
    }
    let (path, relative) = match s.find("://") {
        Some(i) => {
            // Absolute URL: drop scheme and authority, then any query or fragment.
            let after = s.get(i + 3..)?;
            let path = after.get(after.find('/')?..)?;
            let end = path.find(['?', '#']).unwrap_or(path.len());
            (path.get(..end)?, false)
        }
        None => {
            // Relative: `Type/id` or `Type/id/_history/vid`; `urn:`, conditional (`Type?x=y`) and other
            // forms do not name a resource by id.
            if s.contains([':', '?', '#']) {
                return None;
            }
            (s, true)
        }
    };
    let mut segs = path.rsplit('/');
    let last = segs.next()?;
    let before = segs.next()?;
    let (rtype, id) = if before == "_history" {
        let id = segs.next()?;
        (segs.next()?, id)
    } else {
        (before, last)
    };
    if relative && segs.next().is_some() {
        return None;
    }
    (is_type_name(rtype) && is_fhir_id(id)).then(|| [rtype, "/", id].concat())
}

/// A plausible FHIR resource type name: an ASCII upper-case letter then ASCII letters/digits.
fn is_type_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase()) && chars.all(|c| c.is_ascii_alphanumeric())
}

/// FHIR `id`: 1 to 64 of `[A-Za-z0-9\-\.]`.
fn is_fhir_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Accumulates entries, dropping repeated (param, value) pairs.
#[derive(Default)]
struct Out {
    entries: Vec<IndexEntry>,
    /// Hashes of the entries so far. foldhash (randomly seeded per process, so crafted values cannot force
    /// collisions): std's SipHash took about a fifth of the time spent indexing (callgrind).
    seen: HashSet<u64, foldhash::fast::RandomState>,
    hasher: foldhash::fast::RandomState,
}

impl Out {
    fn push(&mut self, param: &'static str, value: IndexValue) {
        let entry = IndexEntry { param, value };
        // A repeated hash is almost always a real duplicate; confirm before dropping (collisions are kept).
        if !self.seen.insert(self.hasher.hash_one(&entry)) && self.entries.contains(&entry) {
            return;
        }
        self.entries.push(entry);
    }

    fn token(&mut self, param: &'static str, system: Option<&str>, code: &str) {
        if code.is_empty() {
            return;
        }
        let system = system.filter(|s| !s.is_empty()).map(str::to_string);
        self.push(
            param,
            IndexValue::Token {
                system,
                code: code.to_string(),
            },
        );
    }

    /// Identifier (0..* or 0..1) → (system, value).
    fn identifiers(&mut self, param: &'static str, v: Option<&Value>) {
        for identifier in each(v) {
            if let Some(value) = non_empty_str(identifier.get("value")) {
                self.token(
                    param,
                    identifier.get("system").and_then(Value::as_str),
                    value,
                );
            }
        }
    }

    /// Coding → (system, code).
    fn coding(&mut self, param: &'static str, coding: &Value) {
        if let Some(code) = non_empty_str(coding.get("code")) {
            self.token(param, coding.get("system").and_then(Value::as_str), code);
        }
    }

    /// CodeableConcept (0..* or 0..1) → every coding.
    fn codeable_concepts(&mut self, param: &'static str, v: Option<&Value>) {
        for concept in each(v) {
            for coding in each(concept.get("coding")) {
                self.coding(param, coding);
            }
        }
    }

    /// A `code` primitive with a required binding to one code system.
    fn code(&mut self, param: &'static str, system: &str, v: Option<&Value>) {
        if let Some(code) = non_empty_str(v) {
            self.token(param, Some(system), code);
        }
    }

    fn boolean(&mut self, param: &'static str, v: Option<&Value>) {
        if let Some(b) = v.and_then(Value::as_bool) {
            self.token(param, None, if b { "true" } else { "false" });
        }
    }

    fn string(&mut self, param: &'static str, v: Option<&Value>) {
        // The normalised form for plain searches beside the form as sent for `:exact` (which matches case
        // and accents).
        if let Some(s) = v.and_then(Value::as_str)
            && !s.is_empty()
        {
            self.push(
                param,
                IndexValue::String {
                    value: normalize_string(s),
                    exact: s.to_string(),
                },
            );
        }
    }

    /// HumanName (0..*) → `family`, `given`, and `name` for the other parts (prefix, suffix, text): a search
    /// on `name` also reads `family` and `given` (see [`also_indexed_under`]).
    fn human_names(&mut self, v: Option<&Value>) {
        for name in each(v) {
            if let Some(family) = name.get("family") {
                self.string("family", Some(family));
            }
            for given in each(name.get("given")) {
                self.string("given", Some(given));
            }
            for prefix in each(name.get("prefix")) {
                self.string("name", Some(prefix));
            }
            for suffix in each(name.get("suffix")) {
                self.string("name", Some(suffix));
            }
            self.string("name", name.get("text"));
        }
    }

    fn date(&mut self, param: &'static str, v: Option<&Value>) {
        if let Some((low_ms, high_ms)) = v.and_then(Value::as_str).and_then(parse_date_range) {
            self.push(param, IndexValue::Date { low_ms, high_ms });
        }
    }

    /// Period: from the start's first ms (or `i64::MIN`) to the end's last ms (or `i64::MAX`); nothing when
    /// neither end is usable.
    fn period(&mut self, param: &'static str, v: Option<&Value>) {
        let Some(period) = v else { return };
        let start = period
            .get("start")
            .and_then(Value::as_str)
            .and_then(parse_date_range);
        let end = period
            .get("end")
            .and_then(Value::as_str)
            .and_then(parse_date_range);
        if start.is_none() && end.is_none() {
            return;
        }
        let (low_ms, high_ms) = match (start, end) {
            // End before start (invalid data): cover both rather than index an empty range.
            (Some(s), Some(e)) if s.0 > e.1 => (s.0.min(e.0), s.1.max(e.1)),
            _ => (
                start.map_or(i64::MIN, |s| s.0),
                end.map_or(i64::MAX, |e| e.1),
            ),
        };
        self.push(param, IndexValue::Date { low_ms, high_ms });
    }

    /// Appointment-style start/end: from start to end, or the start alone. Nothing without a usable start.
    fn start_end(&mut self, param: &'static str, start: Option<&Value>, end: Option<&Value>) {
        let Some((low_ms, start_high)) = start.and_then(Value::as_str).and_then(parse_date_range)
        else {
            return;
        };
        let end = end.and_then(Value::as_str).and_then(parse_date_range);
        let high_ms = end.map_or(start_high, |e| e.1.max(start_high));
        self.push(param, IndexValue::Date { low_ms, high_ms });
    }

    /// Reference (0..* or 0..1).
    fn references(&mut self, param: &'static str, v: Option<&Value>) {
        for reference in each(v) {
            if let Some(key) = reference_key(reference) {
                self.push(param, IndexValue::Reference(key));
            }
        }
    }

    /// UK Core DeliveryChannel extension: `valueCodeableConcept` (what the 2.x StructureDefinition says),
    /// `valueCode` (what BaRS examples send; system implied) and, leniently, `valueCoding`.
    fn delivery_channel(&mut self, extensions: Option<&Value>) {
        const PARAM: &str = "delivery-channel";
        for ext in each(extensions) {
            if ext.get("url").and_then(Value::as_str) != Some(DELIVERY_CHANNEL_EXTENSION_URL) {
                continue;
            }
            self.code(PARAM, DELIVERY_CHANNEL_SYSTEM, ext.get("valueCode"));
            self.codeable_concepts(PARAM, ext.get("valueCodeableConcept"));
            if let Some(coding) = ext.get("valueCoding") {
                self.coding(PARAM, coding);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tok(system: Option<&str>, code: &str) -> IndexValue {
        IndexValue::Token {
            system: system.map(str::to_string),
            code: code.to_string(),
        }
    }

    /// A string entry's normalised form (what `values` shows of string entries).
    fn s(v: &str) -> IndexValue {
        IndexValue::String {
            value: v.to_string(),
            exact: String::new(),
        }
    }

    /// The forms as sent of a string parameter's entries.
    fn exacts<'a>(entries: &'a [IndexEntry], param: &str) -> Vec<&'a str> {
        entries
            .iter()
            .filter(|e| e.param == param)
            .filter_map(|e| match &e.value {
                IndexValue::String { exact, .. } => Some(exact.as_str()),
                _ => None,
            })
            .collect()
    }

    fn rf(v: &str) -> IndexValue {
        IndexValue::Reference(v.to_string())
    }

    fn range(v: &str) -> (i64, i64) {
        parse_date_range(v).unwrap_or_else(|| unreachable!("{v}"))
    }

    /// An entry's value as `values` shows it: string entries by their normalised form alone (see `exacts`).
    #[derive(Debug)]
    struct Shown(IndexValue);

    impl PartialEq<&IndexValue> for Shown {
        fn eq(&self, other: &&IndexValue) -> bool {
            self.0 == **other
        }
    }

    /// The values of one parameter.
    fn values(entries: &[IndexEntry], param: &str) -> Vec<Shown> {
        entries
            .iter()
            .filter(|e| e.param == param)
            .map(|e| match &e.value {
                IndexValue::String { value, .. } => Shown(s(value)),
                other => Shown(other.clone()),
            })
            .collect()
    }

    /// Every entry's parameter is declared for the type, and no (param, value) pair repeats.
    fn check_consistency(rtype: ResourceType, entries: &[IndexEntry]) {
        for (i, e) in entries.iter().enumerate() {
            let Some(def) = search_param(rtype, e.param) else {
                unreachable!("{rtype}: undeclared {}", e.param)
            };
            let kind_ok = matches!(
                (def.kind, &e.value),
                (ParamKind::Token, IndexValue::Token { .. })
                    | (ParamKind::String, IndexValue::String { .. })
                    | (ParamKind::Date, IndexValue::Date { .. })
                    | (ParamKind::Reference, IndexValue::Reference(_))
            );
            assert!(kind_ok, "{rtype}.{}: {:?}", e.param, e.value);
            assert!(!entries[..i].contains(e), "duplicate {e:?}");
            if let IndexValue::Date { low_ms, high_ms } = e.value {
                assert!(low_ms <= high_ms, "{e:?}");
            }
        }
    }

    #[test]
    fn tables_are_well_formed() {
        for rtype in ResourceType::ALL {
            let params = search_params(rtype);
            assert!(!params.is_empty(), "{rtype}");
            // R4 Subscription has no identifier element.
            if rtype != ResourceType::Subscription {
                assert!(search_param(rtype, "identifier").is_some(), "{rtype}");
            }
            for (i, p) in params.iter().enumerate() {
                assert!(
                    params[..i].iter().all(|q| q.name != p.name),
                    "{rtype}.{} twice",
                    p.name
                );
                assert!(
                    p.expression.starts_with(rtype.as_str()),
                    "{rtype}.{}",
                    p.name
                );
                assert!(!p.name.starts_with('_'));
                if p.kind != ParamKind::Reference {
                    assert!(p.targets.is_empty(), "{rtype}.{}", p.name);
                }
                assert_eq!(
                    sortable(rtype, p.name),
                    matches!(p.kind, ParamKind::String | ParamKind::Date)
                );
            }
        }
        assert!(sortable(RT::Patient, "birthdate"));
        assert!(sortable(RT::Patient, "family"));
        assert!(!sortable(RT::Patient, "gender"));
        assert!(!sortable(RT::Patient, "nope"));
        assert!(sortable(RT::Slot, "start"));
        for (rtype, name) in [
            (RT::Slot, "start"),
            (RT::Appointment, "date"),
            (RT::Patient, "birthdate"),
            (RT::Schedule, "date"),
        ] {
            assert!(single_valued(rtype, name), "{rtype}.{name}");
        }
        assert!(instant_param(RT::Slot, "start"));
        assert!(!instant_param(RT::Appointment, "date"));
        let slot = index_entries(
            RT::Slot,
            &json!({"start": "2026-12-09T10:00:00Z", "end": "2026-12-09T10:15:00Z"}),
        );
        let starts: Vec<(i64, i64)> = slot
            .iter()
            .filter(|e| e.param == "start")
            .filter_map(|e| match e.value {
                IndexValue::Date { low_ms, high_ms } => Some((low_ms, high_ms)),
                _ => None,
            })
            .collect();
        assert_eq!(starts.len(), 1, "{slot:?}");
        assert!(
            starts.iter().all(|(lo, hi)| hi - lo <= INSTANT_WIDTH_MS),
            "{starts:?}"
        );
        // Not dates, or not one element: never treated as single-valued.
        assert!(!single_valued(RT::Slot, "status"));
        assert!(!single_valued(RT::Patient, "family"));
        assert!(!single_valued(RT::Patient, "nothing"));
        assert_eq!(
            search_param(RT::Appointment, "patient").map(|p| p.targets),
            Some(&[RT::Patient][..])
        );
        assert_eq!(
            search_param(RT::Patient, "general-practitioner").map(|p| p.targets.first()),
            Some(Some(&RT::Practitioner))
        );
    }

    #[test]
    fn patient() {
        let patient = json!({
            "resourceType": "Patient",
            "id": "p1",
            "identifier": [
                {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9000000009"},
                {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9000000009"},
                {"value": "local-1"},
                {"system": "urn:x"}
            ],
            "active": true,
            "name": [
                {"use": "official", "family": "Smith", "given": ["Jane", "Zoë"], "prefix": ["Mrs"], "suffix": ["OBE"],
                 "text": "Mrs Jane  Zoë SMITH"},
                {"use": "maiden", "family": "Brontë", "given": ["Jane"]}
            ],
            "telecom": [
                {"system": "phone", "value": "01632 960587"},
                {"system": "email", "value": "jane@example.org"},
                {"system": "url", "value": "https://example.org"},
                {"system": "phone"}
            ],
            "gender": "female",
            "birthDate": "1980-02-29",
            "address": [{"postalCode": "LS1  4AP"}, {"line": ["x"]}],
            "generalPractitioner": [{"reference": "Organization/Y12345"}, {"identifier": {"value": "G123"}}],
            "managingOrganization": {"reference": "https://example.org/fhir/Organization/org-1"}
        });
        let e = index_entries(RT::Patient, &patient);
        check_consistency(RT::Patient, &e);
        assert_eq!(
            values(&e, "identifier"),
            [
                &tok(Some("https://fhir.nhs.uk/Id/nhs-number"), "9000000009"),
                &tok(None, "local-1")
            ]
        );
        assert_eq!(
            values(&e, "name"),
            [&s("mrs"), &s("obe"), &s("mrs jane zoe smith")],
            "family and given parts are read from their own parameters"
        );
        assert_eq!(also_indexed_under(RT::Patient, "name"), ["family", "given"]);
        assert_eq!(values(&e, "family"), [&s("smith"), &s("bronte")]);
        assert_eq!(values(&e, "given"), [&s("jane"), &s("zoe")]);
        let (low_ms, high_ms) = range("1980-02-29");
        assert_eq!(
            values(&e, "birthdate"),
            [&IndexValue::Date { low_ms, high_ms }]
        );
        assert_eq!(
            values(&e, "gender"),
            [&tok(Some(ADMINISTRATIVE_GENDER), "female")]
        );
        assert_eq!(values(&e, "address-postalcode"), [&s("ls1 4ap")]);
        assert_eq!(values(&e, "active"), [&tok(None, "true")]);
        assert_eq!(
            values(&e, "general-practitioner"),
            [&rf("Organization/Y12345")]
        );
        assert_eq!(values(&e, "organization"), [&rf("Organization/org-1")]);
        assert_eq!(
            values(&e, "telecom"),
            [
                &tok(None, "01632 960587"),
                &tok(None, "jane@example.org"),
                &tok(None, "https://example.org")
            ]
        );
        assert_eq!(values(&e, "phone"), [&tok(None, "01632 960587")]);
        assert_eq!(values(&e, "email"), [&tok(None, "jane@example.org")]);
    }

    #[test]
    fn patient_inactive_and_unparsable_birthdate() {
        let e = index_entries(
            RT::Patient,
            &json!({"active": false, "birthDate": "1980-02-30", "gender": ""}),
        );
        assert_eq!(values(&e, "active"), [&tok(None, "false")]);
        assert!(values(&e, "birthdate").is_empty());
        assert!(values(&e, "gender").is_empty());
    }

    #[test]
    fn practitioner() {
        let e = index_entries(
            RT::Practitioner,
            &json!({
                "resourceType": "Practitioner",
                "identifier": [{"system": "https://fhir.hl7.org.uk/Id/gmc-number", "value": "1234567"}],
                "active": true,
                "name": [{"family": "Gose", "given": ["Sandra"], "prefix": ["Dr"]}],
                "gender": "female"
            }),
        );
        check_consistency(RT::Practitioner, &e);
        assert_eq!(
            values(&e, "identifier"),
            [&tok(
                Some("https://fhir.hl7.org.uk/Id/gmc-number"),
                "1234567"
            )]
        );
        assert_eq!(values(&e, "name"), [&s("dr")]);
        assert_eq!(
            also_indexed_under(RT::Practitioner, "name"),
            ["family", "given"]
        );
        assert!(also_indexed_under(RT::Organization, "name").is_empty());
        assert_eq!(stored_as(RT::Appointment, "patient"), Some("actor"));
        assert_eq!(stored_as(RT::Appointment, "slot"), None);
        assert_eq!(stored_as(RT::Schedule, "actor"), None);
        assert_eq!(values(&e, "family"), [&s("gose")]);
        assert_eq!(values(&e, "given"), [&s("sandra")]);
        assert_eq!(values(&e, "active"), [&tok(None, "true")]);
        assert!(
            values(&e, "gender").is_empty(),
            "Practitioner has no gender parameter here"
        );
    }

    #[test]
    fn practitioner_role() {
        let e = index_entries(
            RT::PractitionerRole,
            &json!({
                "resourceType": "PractitionerRole",
                "identifier": [{"system": "https://fhir.nhs.uk/Id/sds-role-profile-id", "value": "555"}],
                "active": true,
                "practitioner": {"reference": "Practitioner/pr1"},
                "organization": {"reference": "Organization/o1"},
                "location": [{"reference": "Location/l1"}, {"reference": "Location/l2"}],
                "healthcareService": [{"reference": "HealthcareService/hs1"}],
                "code": [{"coding": [{"system": "urn:roles", "code": "doctor"}]}],
                "specialty": [{"coding": [
                    {"system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-PracticeSettingCode", "code": "110"},
                    {"system": "http://snomed.info/sct", "code": "394801008"}
                ]}]
            }),
        );
        check_consistency(RT::PractitionerRole, &e);
        assert_eq!(values(&e, "practitioner"), [&rf("Practitioner/pr1")]);
        assert_eq!(values(&e, "organization"), [&rf("Organization/o1")]);
        assert_eq!(
            values(&e, "location"),
            [&rf("Location/l1"), &rf("Location/l2")]
        );
        assert_eq!(values(&e, "service"), [&rf("HealthcareService/hs1")]);
        assert_eq!(values(&e, "role"), [&tok(Some("urn:roles"), "doctor")]);
        assert_eq!(
            values(&e, "specialty"),
            [
                &tok(
                    Some("https://fhir.hl7.org.uk/CodeSystem/UKCore-PracticeSettingCode"),
                    "110"
                ),
                &tok(Some("http://snomed.info/sct"), "394801008")
            ]
        );
        assert_eq!(values(&e, "active"), [&tok(None, "true")]);
        assert_eq!(values(&e, "identifier").len(), 1);
    }

    #[test]
    fn organization() {
        let e = index_entries(
            RT::Organization,
            &json!({
                "resourceType": "Organization",
                "identifier": [{"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "RR8"}],
                "active": true,
                "type": [{"coding": [{"system": "urn:types", "code": "prov"}]}],
                "name": "Leeds Teaching Hospitals NHS Trust",
                "alias": ["LTHT", "Leeds  Teaching Hospitals NHS Trust"],
                "address": [{"postalCode": "LS9 7TF"}],
                "partOf": {"reference": "Organization/parent"}
            }),
        );
        check_consistency(RT::Organization, &e);
        assert_eq!(
            values(&e, "identifier"),
            [&tok(
                Some("https://fhir.nhs.uk/Id/ods-organization-code"),
                "RR8"
            )]
        );
        // The alias differing only in spacing is one more form as sent of the same normalised value.
        assert_eq!(
            values(&e, "name"),
            [
                &s("leeds teaching hospitals nhs trust"),
                &s("ltht"),
                &s("leeds teaching hospitals nhs trust")
            ]
        );
        assert_eq!(
            exacts(&e, "name"),
            [
                "Leeds Teaching Hospitals NHS Trust",
                "LTHT",
                "Leeds  Teaching Hospitals NHS Trust"
            ]
        );
        assert_eq!(values(&e, "type"), [&tok(Some("urn:types"), "prov")]);
        assert_eq!(values(&e, "address-postalcode"), [&s("ls9 7tf")]);
        assert_eq!(values(&e, "partof"), [&rf("Organization/parent")]);
        assert_eq!(values(&e, "active"), [&tok(None, "true")]);
    }

    #[test]
    fn location() {
        let e = index_entries(
            RT::Location,
            &json!({
                "resourceType": "Location",
                "identifier": [{"system": "https://fhir.nhs.uk/Id/ods-site-code", "value": "RR813"}],
                "status": "active",
                "name": "St James's University Hospital",
                "alias": ["Jimmy's"],
                "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "HOSP"}]}],
                "address": {"postalCode": "LS9 7TF"},
                "managingOrganization": {"reference": "Organization/RR8"}
            }),
        );
        check_consistency(RT::Location, &e);
        assert_eq!(
            values(&e, "name"),
            [&s("st james's university hospital"), &s("jimmy's")]
        );
        assert_eq!(
            values(&e, "status"),
            [&tok(Some(LOCATION_STATUS), "active")]
        );
        assert_eq!(values(&e, "organization"), [&rf("Organization/RR8")]);
        assert_eq!(values(&e, "address-postalcode"), [&s("ls9 7tf")]);
        assert_eq!(
            values(&e, "type"),
            [&tok(
                Some("http://terminology.hl7.org/CodeSystem/v3-RoleCode"),
                "HOSP"
            )]
        );
        assert_eq!(values(&e, "identifier").len(), 1);
    }

    #[test]
    fn healthcare_service() {
        let e = index_entries(
            RT::HealthcareService,
            &json!({
                "resourceType": "HealthcareService",
                "identifier": [{"system": "urn:dos", "value": "111"}],
                "active": false,
                "providedBy": {"reference": "Organization/RR8"},
                "category": [{"coding": [{"system": "urn:cat", "code": "8"}]}],
                "type": [{"coding": [{"system": "urn:type", "code": "394"}]}, {"text": "no coding"}],
                "specialty": [{"coding": [{"system": "urn:spec", "code": "110"}]}],
                "location": [{"reference": "Location/RR813"}, {"reference": "#contained"}],
                "name": "Orthopaedic Service"
            }),
        );
        check_consistency(RT::HealthcareService, &e);
        assert_eq!(values(&e, "name"), [&s("orthopaedic service")]);
        assert_eq!(values(&e, "organization"), [&rf("Organization/RR8")]);
        assert_eq!(values(&e, "service-type"), [&tok(Some("urn:type"), "394")]);
        assert_eq!(values(&e, "service-category"), [&tok(Some("urn:cat"), "8")]);
        assert_eq!(values(&e, "specialty"), [&tok(Some("urn:spec"), "110")]);
        assert_eq!(values(&e, "location"), [&rf("Location/RR813")]);
        assert_eq!(values(&e, "active"), [&tok(None, "false")]);
    }

    #[test]
    fn schedule() {
        let e = index_entries(
            RT::Schedule,
            &json!({
                "resourceType": "Schedule",
                "identifier": [{"system": "http://example.org/scheduleid", "value": "45"}],
                "active": true,
                "serviceType": [{"coding": [{"code": "57"}]}],
                "specialty": [{"coding": [{"code": "408480009"}]}],
                "actor": [{"reference": "Location/1"}, {"reference": "HealthcareService/hs1"}],
                "planningHorizon": {"start": "2013-12-25T09:15:00Z", "end": "2013-12-25T09:30:00Z"}
            }),
        );
        check_consistency(RT::Schedule, &e);
        assert_eq!(
            values(&e, "identifier"),
            [&tok(Some("http://example.org/scheduleid"), "45")]
        );
        assert_eq!(
            values(&e, "actor"),
            [&rf("Location/1"), &rf("HealthcareService/hs1")]
        );
        assert_eq!(values(&e, "active"), [&tok(None, "true")]);
        assert_eq!(values(&e, "service-type"), [&tok(None, "57")]);
        assert_eq!(values(&e, "specialty"), [&tok(None, "408480009")]);
        let low_ms = range("2013-12-25T09:15:00Z").0;
        let high_ms = range("2013-12-25T09:30:00Z").1;
        assert_eq!(values(&e, "date"), [&IndexValue::Date { low_ms, high_ms }]);
    }

    #[test]
    fn schedule_open_planning_horizon() {
        let open_end = index_entries(
            RT::Schedule,
            &json!({"planningHorizon": {"start": "2024-01"}}),
        );
        let low_ms = range("2024-01").0;
        assert_eq!(
            values(&open_end, "date"),
            [&IndexValue::Date {
                low_ms,
                high_ms: i64::MAX
            }]
        );
        let open_start = index_entries(RT::Schedule, &json!({"planningHorizon": {"end": "2024"}}));
        let high_ms = range("2024").1;
        assert_eq!(
            values(&open_start, "date"),
            [&IndexValue::Date {
                low_ms: i64::MIN,
                high_ms
            }]
        );
        let neither = index_entries(
            RT::Schedule,
            &json!({"planningHorizon": {"start": "garbage"}}),
        );
        assert!(values(&neither, "date").is_empty());
        let reversed = index_entries(
            RT::Schedule,
            &json!({"planningHorizon": {"start": "2024-02-01", "end": "2024-01-01"}}),
        );
        check_consistency(RT::Schedule, &reversed);
        assert_eq!(values(&reversed, "date").len(), 1);
    }

    #[test]
    fn slot() {
        let e = index_entries(
            RT::Slot,
            &json!({
                "resourceType": "Slot",
                "extension": [
                    {"url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-DeliveryChannel", "valueCode": "Telephone"},
                    {"url": "http://example.org/other", "valueCode": "x"}
                ],
                "identifier": [{"system": "https://tools.ietf.org/html/rfc4122", "value": "e7c54d06"}],
                "serviceCategory": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/service-category", "code": "17"}]}],
                "serviceType": [{"coding": [{"code": "57"}]}],
                "specialty": [{"coding": [{"code": "394"}]}],
                "appointmentType": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0276", "code": "WALKIN"}]},
                "schedule": {"reference": "Schedule/example"},
                "status": "free",
                "start": "2024-05-17T09:00:00+01:00",
                "end": "2024-05-17T09:15:00+01:00"
            }),
        );
        check_consistency(RT::Slot, &e);
        assert_eq!(
            values(&e, "delivery-channel"),
            [&tok(Some(DELIVERY_CHANNEL_SYSTEM), "Telephone")]
        );
        assert_eq!(values(&e, "schedule"), [&rf("Schedule/example")]);
        assert_eq!(values(&e, "status"), [&tok(Some(SLOT_STATUS), "free")]);
        let (low_ms, high_ms) = range("2024-05-17T08:00:00Z");
        assert_eq!(values(&e, "start"), [&IndexValue::Date { low_ms, high_ms }]);
        assert_eq!(
            values(&e, "appointment-type"),
            [&tok(
                Some("http://terminology.hl7.org/CodeSystem/v2-0276"),
                "WALKIN"
            )]
        );
        assert_eq!(
            values(&e, "service-category"),
            [&tok(
                Some("http://terminology.hl7.org/CodeSystem/service-category"),
                "17"
            )]
        );
        assert_eq!(values(&e, "service-type"), [&tok(None, "57")]);
        assert_eq!(values(&e, "specialty"), [&tok(None, "394")]);
        assert_eq!(values(&e, "identifier").len(), 1);
    }

    #[test]
    fn delivery_channel_codeable_concept() {
        let e = index_entries(
            RT::Slot,
            &json!({"extension": [{
                "url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-DeliveryChannel",
                "valueCodeableConcept": {"coding": [
                    {"system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-DeliveryChannel", "code": "In-person"}
                ]}
            }]}),
        );
        assert_eq!(
            values(&e, "delivery-channel"),
            [&tok(Some(DELIVERY_CHANNEL_SYSTEM), "In-person")]
        );
    }

    #[test]
    fn appointment() {
        let e = index_entries(
            RT::Appointment,
            &json!({
                "resourceType": "Appointment",
                "extension": [{
                    "url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-DeliveryChannel",
                    "valueCodeableConcept": {"coding": [{"system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-DeliveryChannel", "code": "Video"}]}
                }],
                "identifier": [{"system": "https://tools.ietf.org/html/rfc4122", "value": "a1"}],
                "status": "booked",
                "serviceType": [{"coding": [{"code": "52"}]}],
                "specialty": [{"coding": [{"system": "urn:spec", "code": "110"}]}],
                "appointmentType": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0276", "code": "FOLLOWUP"}]},
                "start": "2013-12-10T09:00:00Z",
                "end": "2013-12-10T11:00:00Z",
                "slot": [{"reference": "Slot/s1"}],
                "basedOn": [{"reference": "ServiceRequest/myringotomy"}],
                "participant": [
                    {"actor": {"reference": "Patient/example"}, "status": "accepted"},
                    {"actor": {"reference": "https://hub.example/fhir/Practitioner/example/_history/3"}, "status": "accepted"},
                    {"actor": {"reference": "Location/1"}, "status": "needs-action"},
                    {"actor": {"reference": "HealthcareService/hs"}, "status": "tentative"},
                    {"actor": {"display": "Someone"}, "status": "declined"},
                    {"actor": {"reference": "#c1"}, "status": "declined"}
                ]
            }),
        );
        check_consistency(RT::Appointment, &e);
        assert_eq!(
            values(&e, "identifier"),
            [&tok(Some("https://tools.ietf.org/html/rfc4122"), "a1")]
        );
        assert_eq!(
            values(&e, "status"),
            [&tok(Some(APPOINTMENT_STATUS), "booked")]
        );
        let low_ms = range("2013-12-10T09:00:00Z").0;
        let high_ms = range("2013-12-10T11:00:00Z").1;
        assert_eq!(values(&e, "date"), [&IndexValue::Date { low_ms, high_ms }]);
        assert_eq!(values(&e, "patient"), [&rf("Patient/example")]);
        assert_eq!(values(&e, "practitioner"), [&rf("Practitioner/example")]);
        assert_eq!(values(&e, "location"), [&rf("Location/1")]);
        assert_eq!(
            values(&e, "actor"),
            [
                &rf("Patient/example"),
                &rf("Practitioner/example"),
                &rf("Location/1"),
                &rf("HealthcareService/hs")
            ]
        );
        assert_eq!(values(&e, "slot"), [&rf("Slot/s1")]);
        assert_eq!(values(&e, "based-on"), [&rf("ServiceRequest/myringotomy")]);
        assert_eq!(
            values(&e, "part-status"),
            [
                &tok(Some(PARTICIPATION_STATUS), "accepted"),
                &tok(Some(PARTICIPATION_STATUS), "needs-action"),
                &tok(Some(PARTICIPATION_STATUS), "tentative"),
                &tok(Some(PARTICIPATION_STATUS), "declined")
            ]
        );
        assert_eq!(values(&e, "service-type"), [&tok(None, "52")]);
        assert_eq!(values(&e, "specialty"), [&tok(Some("urn:spec"), "110")]);
        assert_eq!(
            values(&e, "appointment-type"),
            [&tok(
                Some("http://terminology.hl7.org/CodeSystem/v2-0276"),
                "FOLLOWUP"
            )]
        );
        assert_eq!(
            values(&e, "delivery-channel"),
            [&tok(Some(DELIVERY_CHANNEL_SYSTEM), "Video")]
        );
    }

    #[test]
    fn appointment_dates() {
        let start_only = index_entries(RT::Appointment, &json!({"start": "2024-05-17T09:00:00Z"}));
        let (low_ms, high_ms) = range("2024-05-17T09:00:00Z");
        assert_eq!(
            values(&start_only, "date"),
            [&IndexValue::Date { low_ms, high_ms }]
        );
        let end_only = index_entries(RT::Appointment, &json!({"end": "2024-05-17T09:00:00Z"}));
        assert!(values(&end_only, "date").is_empty());
        let proposed = index_entries(RT::Appointment, &json!({"status": "proposed"}));
        assert!(values(&proposed, "date").is_empty());
        let reversed = index_entries(
            RT::Appointment,
            &json!({"start": "2024-05-17T10:00:00Z", "end": "2024-05-17T09:00:00Z"}),
        );
        check_consistency(RT::Appointment, &reversed);
    }

    #[test]
    fn reference_forms() {
        let cases: &[(&str, Option<&str>)] = &[
            ("Patient/123", Some("Patient/123")),
            ("Patient/a.b-C", Some("Patient/a.b-C")),
            ("Patient/123/_history/4", Some("Patient/123")),
            ("https://x/fhir/Patient/1", Some("Patient/1")),
            ("http://x/Patient/1", Some("Patient/1")),
            ("https://x/fhir/Patient/1/_history/2", Some("Patient/1")),
            ("https://x/fhir/Patient/1?_format=json", Some("Patient/1")),
            ("https://x/fhir/Patient/1#frag", Some("Patient/1")),
            ("#contained", None),
            ("#", None),
            ("", None),
            ("123", None),
            ("Patient", None),
            ("Patient/", None),
            ("/Patient/1", None),
            ("a/Patient/1", None),
            ("patient/1", None),
            ("Patient/1 2", None),
            ("Patient?identifier=x|1", None),
            ("urn:uuid:2c001608-5f09-4840-9611-bea43e666a30", None),
            ("urn:oid:1.2.3", None),
            ("https://x", None),
            ("https://x/", None),
            ("https://x/fhir/metadata", None),
            ("Patient/_history/2", None),
        ];
        for (input, expected) in cases {
            assert_eq!(
                reference_string_key(input).as_deref(),
                *expected,
                "{input:?}"
            );
        }
        let long_id = "a".repeat(65);
        assert_eq!(reference_string_key(&format!("Patient/{long_id}")), None);
        // Identifier-only and display-only references are not indexed.
        let e = index_entries(
            RT::Slot,
            &json!({"schedule": {"identifier": {"system": "urn:x", "value": "1"}, "display": "A schedule"}}),
        );
        assert!(values(&e, "schedule").is_empty());
    }

    #[test]
    fn deduplicates_per_param_and_value() {
        let e = index_entries(
            RT::Patient,
            &json!({
                "name": [{"family": "Smith", "given": ["Smith", "SMITH"], "text": "smith"}],
                "identifier": [{"system": "a", "value": "1"}, {"system": "a", "value": "1"}, {"system": "b", "value": "1"}]
            }),
        );
        // One entry per distinct form as sent: `Smith` twice is one, `SMITH` is another.
        assert_eq!(exacts(&e, "name"), ["smith"]);
        assert_eq!(values(&e, "given"), [&s("smith"), &s("smith")]);
        assert_eq!(exacts(&e, "family"), ["Smith"]);
        assert_eq!(exacts(&e, "given"), ["Smith", "SMITH"]);
        assert_eq!(values(&e, "identifier").len(), 2);
    }

    #[test]
    fn odd_shapes_do_not_panic() {
        let weird = [
            json!(null),
            json!(true),
            json!(1),
            json!("Patient"),
            json!([]),
            json!({}),
            json!([{"a": 1}, null, "x"]),
            json!({"coding": "x", "reference": 5, "value": [], "system": {}}),
        ];
        let keys = [
            "identifier",
            "name",
            "telecom",
            "gender",
            "birthDate",
            "address",
            "active",
            "generalPractitioner",
            "managingOrganization",
            "alias",
            "partOf",
            "type",
            "status",
            "providedBy",
            "category",
            "specialty",
            "location",
            "actor",
            "planningHorizon",
            "serviceType",
            "schedule",
            "start",
            "end",
            "appointmentType",
            "serviceCategory",
            "extension",
            "participant",
            "slot",
            "basedOn",
            "code",
            "practitioner",
            "organization",
            "healthcareService",
        ];
        for rtype in ResourceType::ALL {
            for w in &weird {
                let _ = index_entries(rtype, w);
                for key in keys {
                    let mut obj = serde_json::Map::new();
                    obj.insert(key.to_string(), w.clone());
                    let e = index_entries(rtype, &Value::Object(obj.clone()));
                    check_consistency(rtype, &e);
                    // Nested one level down too (inside arrays of objects).
                    let nested = json!({ key: [Value::Object(obj.clone()), {"coding": [Value::Object(obj.clone())]}] });
                    let _ = index_entries(rtype, &nested);
                }
            }
        }
    }
}
