//! Organisation separation: which organisation (ODS code) a resource belongs to, read from the resource alone.
//! The HTTP layer (`api::org`) follows the references these functions name (a Slot's Schedule, an
//! Appointment's Slots, an Organization's ODS identifiers) and caches what it found for one request.
//!
//! Rules (a client without the `cross-org` scope):
//! - **Shared** types (Organization, Location, Practitioner, PractitionerRole, HealthcareService) are reference
//!   data, visible to every client with the scope for them.
//! - A **Schedule** belongs to the organisation(s) of its `actor` Organizations (an ODS identifier, or a
//!   reference to an Organization whose identifier is the ODS code) and of a UK Core BookingOrganization
//!   extension.
//! - A **Slot** belongs to the organisation(s) of its Schedule.
//! - An **Appointment** belongs to the organisation(s) of its Slots' Schedules and of its BookingOrganization
//!   extension.
//! - A **Patient** is visible when its `managingOrganization` is the client's organisation, or when an
//!   Appointment of the client's organisation names it.
//! - **Subscriptions** need `cross-org` (they carry every organisation's changes).

use serde_json::Value;

/// Identifier system of ODS organisation codes (the form validation normalises every variant to).
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

/// The UK Core extension naming the organisation that booked an appointment (or runs a schedule).
pub const BOOKING_ORGANIZATION_URL: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-BookingOrganization";

/// How a resource type is separated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Reference data, visible to all.
    Shared,
    /// Owned through its actor organisations and BookingOrganization extension.
    Schedule,
    /// Owned through its schedule.
    Slot,
    /// Owned through its slots' schedules and its BookingOrganization extension.
    Appointment,
    /// Visible through its managing organisation or an appointment of the organisation.
    Patient,
    /// Only for `cross-org` clients (Subscription, and any type not named above).
    CrossOrgOnly,
}

/// The separation rule of a resource type (by its name).
pub fn kind(rtype: &str) -> Kind {
    match rtype {
        "Organization" | "Location" | "Practitioner" | "PractitionerRole" | "HealthcareService" => {
            Kind::Shared
        }
        "Schedule" => Kind::Schedule,
        "Slot" => Kind::Slot,
        "Appointment" => Kind::Appointment,
        "Patient" => Kind::Patient,
        _ => Kind::CrossOrgOnly,
    }
}

/// A pointer to an organisation found in a resource.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OrgRef {
    /// An ODS code given directly (a logical reference by identifier), upper case.
    Ods(String),
    /// A reference to an Organization resource (its id); its ODS identifiers decide.
    Organization(String),
}

/// The id of a literal reference to `rtype` (`Slot/1`, `http://host/fhir/Slot/1`, `Slot/1/_history/2`).
pub fn reference_id<'a>(reference: &'a str, rtype: &str) -> Option<&'a str> {
    let path = reference.split(['?', '#']).next().unwrap_or("");
    let path = match path.find("/_history/") {
        Some(i) => &path[..i],
        None => path,
    };
    let mut it = path.rsplit('/');
    let id = it.next()?;
    let t = it.next()?;
    (t == rtype && !id.is_empty()).then_some(id)
}

/// The organisations a Reference element names: a reference to an Organization, and/or an ODS identifier.
pub fn org_refs_of_reference(r: &Value) -> Vec<OrgRef> {
    let mut out = Vec::new();
    if let Some(id) = r
        .get("reference")
        .and_then(Value::as_str)
        .and_then(|s| reference_id(s, "Organization"))
    {
        out.push(OrgRef::Organization(id.to_string()));
    }
    if let Some(ident) = r.get("identifier")
        && ident.get("system").and_then(Value::as_str) == Some(ODS_SYSTEM)
        && let Some(code) = ident.get("value").and_then(Value::as_str)
        && !code.trim().is_empty()
    {
        out.push(OrgRef::Ods(code.trim().to_ascii_uppercase()));
    }
    out
}

/// The organisations of the BookingOrganization extensions of a resource.
pub fn booking_organizations(resource: &Value) -> Vec<OrgRef> {
    resource
        .get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e.get("url").and_then(Value::as_str) == Some(BOOKING_ORGANIZATION_URL))
        .filter_map(|e| e.get("valueReference"))
        .flat_map(org_refs_of_reference)
        .collect()
}

/// The organisations a Schedule belongs to: its actor Organizations and BookingOrganization extensions.
pub fn schedule_organizations(schedule: &Value) -> Vec<OrgRef> {
    let mut out: Vec<OrgRef> = schedule
        .get("actor")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(org_refs_of_reference)
        .collect();
    out.extend(booking_organizations(schedule));
    out
}

/// The Schedule id of a Slot.
pub fn slot_schedule(slot: &Value) -> Option<String> {
    slot.get("schedule")
        .and_then(|s| s.get("reference"))
        .and_then(Value::as_str)
        .and_then(|s| reference_id(s, "Schedule"))
        .map(str::to_string)
}

/// The ids of `rtype` referenced by the items of array `list` of `v` (each item a Reference, or holding one
/// under `inner`).
fn referenced_ids(v: &Value, list: &str, inner: Option<&str>, rtype: &str) -> Vec<String> {
    v.get(list)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|item| match inner {
            Some(field) => item.get(field),
            None => Some(item),
        })
        .filter_map(|r| r.get("reference").and_then(Value::as_str))
        .filter_map(|s| reference_id(s, rtype))
        .map(str::to_string)
        .collect()
}

/// The Slot ids of an Appointment.
pub fn appointment_slots(appointment: &Value) -> Vec<String> {
    referenced_ids(appointment, "slot", None, "Slot")
}

/// The Patient ids among an Appointment's participants.
pub fn appointment_patients(appointment: &Value) -> Vec<String> {
    referenced_ids(appointment, "participant", Some("actor"), "Patient")
}

/// The organisations of a Patient's `managingOrganization`.
pub fn managing_organization(patient: &Value) -> Vec<OrgRef> {
    patient
        .get("managingOrganization")
        .map(org_refs_of_reference)
        .unwrap_or_default()
}

/// The ODS codes of an Organization (its identifiers with the ODS system), upper case.
pub fn ods_codes(organization: &Value) -> Vec<String> {
    organization
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|i| i.get("system").and_then(Value::as_str) == Some(ODS_SYSTEM))
        .filter_map(|i| i.get("value").and_then(Value::as_str))
        .map(|v| v.trim().to_ascii_uppercase())
        .filter(|v| !v.is_empty())
        .collect()
}

/// True when two ODS codes name the same organisation (codes are compared case-insensitively).
pub fn same_org(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}
