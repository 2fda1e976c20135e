//! Invariants of the R4 datatypes and served resources, and the UK Core rules the hub enforces.
//!
//! Why it exists: structure alone does not make a resource usable: an Appointment with a start but no end,
//! an NHS number failing its check digit, or an NHS number verification status in an unknown code system
//! would be stored and then break downstream systems. These rules run after the structural walk of an
//! object (datatype hooks) or of a whole resource, reading the JSON directly; they skip anything the walk
//! already reported as malformed, so one mistake gives one issue.
//!
//! Rules: per-1, cpt-2, att-1, qty-3, rng-2, ext-1, ref-1, dom-2 (in the walk), dom-3, dom-4, dom-5,
//! pat-1, app-1, app-2, app-3, app-4 (with a warning for `noshow`, see [`Ctx::appointment_rules`]),
//! org-1, org-2, org-3, end not before start (Appointment, Slot); UK Core: NHS number check digit, at most
//! one NHS number per Patient, the NHS number verification status encodings, ODS system normalisation.

use super::{Ctx, Fix, Seg};
use crate::node::{Node, Obj};
use crate::schema::{self, Hook};
use crate::validate::primitive::shown;
use crate::{
    IssueType, NHS_NUMBER_SYSTEM, NhsNumber, ResourceType, Severity, parse_date_range,
    parse_instant_ms,
};

/// UK Core extension carrying the NHS number verification status (on `Patient.identifier`).
pub(crate) const VERIFICATION_STATUS_URL: &str =
    "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-NHSNumberVerificationStatus";
const VS_ENGLAND: &str =
    "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland";
const VS_WALES: &str = "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusWales";
/// The UK Core 1.0.0 system, still used by PDS (numeric codes) and BaRS (CareConnect text codes).
const VS_OLD: &str = "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatus";
const NULL_FLAVOR: &str = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor";
const VS_NUMERIC: [&str; 8] = ["01", "02", "03", "04", "05", "06", "07", "08"];
const VS_TEXT: [&str; 8] = [
    "number-present-and-verified",
    "number-present-but-not-traced",
    "trace-required",
    "trace-attempted",
    "trace-needs-to-be-resolved",
    "trace-in-progress",
    "number-not-present-and-trace-not-required",
    "trace-postponed",
];

/// Canonical ODS identifier systems (UK Core StructureDefinitions: "z" spelling, `/Id/`).
pub(crate) const ODS_ORGANIZATION_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
pub(crate) const ODS_SITE_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-site-code";

/// The canonical ODS system a variant stands for (any ASCII case; `organisation` or `organization`).
pub(crate) fn ods_canonical(system: &str) -> Option<&'static str> {
    if system.eq_ignore_ascii_case(ODS_ORGANIZATION_SYSTEM)
        || system.eq_ignore_ascii_case("https://fhir.nhs.uk/Id/ods-organisation-code")
    {
        Some(ODS_ORGANIZATION_SYSTEM)
    } else if system.eq_ignore_ascii_case(ODS_SITE_SYSTEM) {
        Some(ODS_SITE_SYSTEM)
    } else {
        None
    }
}

/// Whether element `name` is present (as a value or as a `_name` primitive extension).
fn has(obj: Obj<'_>, name: &str) -> bool {
    obj.iter()
        .any(|(k, v)| (k == name || k.strip_prefix('_') == Some(name)) && !v.is_null())
}

fn str_of<'v>(obj: Obj<'v>, name: &str) -> Option<&'v str> {
    obj.get(name).and_then(Node::as_str)
}

/// Whether (system, code) is an accepted NHS number verification status; `None` for an unknown system.
fn verification_code_ok(system: &str, code: Option<&str>) -> Option<bool> {
    let code = code.unwrap_or("");
    match system {
        VS_ENGLAND | VS_WALES => Some(VS_NUMERIC.contains(&code)),
        VS_OLD => Some(VS_NUMERIC.contains(&code) || VS_TEXT.contains(&code)),
        NULL_FLAVOR => Some(code == "NI"),
        _ => None,
    }
}

const VERIFICATION_ENCODINGS: &str = "expected a coding with system \
     https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland (or ...Wales) and code 01-08, \
     or system https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatus with code 01-08 or a \
     CareConnect code (number-present-and-verified, number-present-but-not-traced, trace-required, \
     trace-attempted, trace-needs-to-be-resolved, trace-in-progress, number-not-present-and-trace-not-required, \
     trace-postponed), or system http://terminology.hl7.org/CodeSystem/v3-NullFlavor with code NI";

const VALUE_CC: Seg<'static> = Seg::Choice("valueCodeableConcept", "value", "CodeableConcept");

impl<'a> Ctx<'a> {
    /// Rules of a datatype, run after its object was walked (the path points at the object).
    pub(super) fn hook(&mut self, hook: Hook, obj: Obj<'a>) {
        match hook {
            Hook::None => {}
            Hook::Identifier => self.identifier_rules(obj),
            Hook::Period => {
                if let (Some(s), Some(e)) = (str_of(obj, "start"), str_of(obj, "end"))
                    && let (Some((s_low, _)), Some((_, e_high))) =
                        (parse_date_range(s), parse_date_range(e))
                    && s_low > e_high
                {
                    self.error(
                                IssueType::Invariant,
                                format!("per-1: If present, start SHALL have a lower value than end (start {s} is after end {e})"),
                            );
                }
            }
            Hook::ContactPoint => {
                if has(obj, "value") && !has(obj, "system") {
                    self.error(
                        IssueType::Invariant,
                        "cpt-2: A system is required if a value is provided",
                    );
                }
            }
            Hook::Attachment => {
                if has(obj, "data") && !has(obj, "contentType") {
                    self.error(
                        IssueType::Invariant,
                        "att-1: If the Attachment has data, it SHALL have a contentType",
                    );
                }
            }
            Hook::Quantity | Hook::SimpleQuantity => {
                if has(obj, "code") && !has(obj, "system") {
                    self.error(
                        IssueType::Invariant,
                        "qty-3: If a code for the unit is present, the system SHALL also be present",
                    );
                }
            }
            Hook::Range => {
                let value_of = |side: &str| -> Option<(f64, Option<&str>)> {
                    let q = obj.get(side)?;
                    let n = q.get("value").and_then(Node::as_number)?;
                    let v: f64 = n.parse().ok()?;
                    Some((v, q.get("code").and_then(Node::as_str)))
                };
                if let (Some((lo, lo_code)), Some((hi, hi_code))) =
                    (value_of("low"), value_of("high"))
                    && lo_code == hi_code
                    && lo > hi
                {
                    self.error(
                        IssueType::Invariant,
                        "rng-2: If present, low SHALL have a lower value than high",
                    );
                }
            }
            Hook::Extension => {
                let has_value = obj.keys().any(|k| {
                    let n = k.strip_prefix('_').unwrap_or(k);
                    n.starts_with("value") && schema::EXTENSION.lookup(n).is_some()
                });
                let has_children = obj.get("extension").is_some_and(|v| !v.is_null());
                if has_value && has_children {
                    self.error(
                        IssueType::Invariant,
                        "ext-1: Must have either extensions or value[x], not both",
                    );
                } else if !has_value && !has_children {
                    self.error(
                        IssueType::Invariant,
                        "ext-1: Must have either extensions or value[x] (it has neither)",
                    );
                }
            }
            Hook::Reference => {
                if let Some(r) = str_of(obj, "reference")
                    && let Some(id) = r.strip_prefix('#')
                {
                    self.note_local_ref(r);
                    if !id.is_empty() && !self.contained_ids.contains(&id) {
                        self.error_at(
                                IssueType::Invariant,
                                format!(
                                    "ref-1: the local reference '{}' does not match the id of any contained resource",
                                    shown(r)
                                ),
                                &[Seg::Name("reference")],
                            );
                    }
                }
            }
        }
    }

    /// UK Core rules of any Identifier: ODS normalisation, NHS number, its verification status.
    fn identifier_rules(&mut self, obj: Obj<'a>) {
        let system = str_of(obj, "system");
        if let Some(s) = system {
            if let Some(canonical) = ods_canonical(s) {
                if s != canonical {
                    self.fixes.push(Fix {
                        path: self.fix_path(),
                        system: canonical,
                    });
                    self.report(
                        Severity::Information,
                        IssueType::Informational,
                        format!(
                            "ODS identifier system '{}' was normalised to '{canonical}'",
                            shown(s)
                        ),
                        &[Seg::Name("system")],
                    );
                }
            } else if s != NHS_NUMBER_SYSTEM && s.eq_ignore_ascii_case(NHS_NUMBER_SYSTEM) {
                self.report(
                    Severity::Warning,
                    IssueType::Value,
                    format!(
                        "identifier system '{}' differs from the NHS number system only in case; use {NHS_NUMBER_SYSTEM} (the number was not checked)",
                        shown(s)
                    ),
                    &[Seg::Name("system")],
                );
            }
        }
        if system == Some(NHS_NUMBER_SYSTEM) {
            match obj.get("value") {
                Some(Node::String(v)) => {
                    if let Err(e) = NhsNumber::check(v) {
                        self.error_at(
                            IssueType::Value,
                            format!("'{}' is not a valid NHS number: {e}", shown(v)),
                            &[Seg::Name("value")],
                        );
                    }
                }
                Some(_) => {} // wrong JSON type: already reported by the walk
                None => {
                    if !has(obj, "value") {
                        self.error_at(
                            IssueType::Required,
                            format!("an identifier with system {NHS_NUMBER_SYSTEM} must have a value (the NHS number)"),
                            &[Seg::Name("value")],
                        );
                    }
                }
            }
        }
        let Some(Node::Array(exts)) = obj.get("extension") else {
            return;
        };
        let mut seen = 0;
        for (j, ext) in exts.iter().enumerate() {
            let Some(eo) = ext.as_object() else { continue };
            if str_of(eo, "url") != Some(VERIFICATION_STATUS_URL) {
                continue;
            }
            seen += 1;
            if seen == 2 {
                self.error_at(
                    IssueType::Structure,
                    "the NHS number verification status extension may appear at most once on an identifier",
                    &[Seg::Name("extension"), Seg::Index(j)],
                );
            }
            self.verification_status(eo, j);
        }
    }

    fn verification_status(&mut self, ext: Obj<'a>, j: usize) {
        let Some(Node::Object(cc)) = ext.get("valueCodeableConcept") else {
            if ext.get("valueCodeableConcept").is_none() {
                self.error_at(
                    IssueType::CodeInvalid,
                    format!(
                        "the NHS number verification status extension must carry valueCodeableConcept; {VERIFICATION_ENCODINGS}"
                    ),
                    &[Seg::Name("extension"), Seg::Index(j)],
                );
            }
            return;
        };
        let codings = match cc.get("coding") {
            Some(Node::Array(c)) => Some(c),
            _ => None,
        };
        let mut accepted = false;
        let mut reported = false;
        for (k, c) in codings.into_iter().flatten().enumerate() {
            let Some(system) = c.get("system").and_then(Node::as_str) else {
                continue;
            };
            let code = c.get("code").and_then(Node::as_str);
            match verification_code_ok(system, code) {
                Some(true) => accepted = true,
                Some(false) => {
                    reported = true;
                    self.error_at(
                        IssueType::CodeInvalid,
                        format!(
                            "'{}' is not an NHS number verification status code of {system}; {VERIFICATION_ENCODINGS}",
                            shown(code.unwrap_or(""))
                        ),
                        &[
                            Seg::Name("extension"),
                            Seg::Index(j),
                            VALUE_CC,
                            Seg::Name("coding"),
                            Seg::Index(k),
                            Seg::Name("code"),
                        ],
                    );
                }
                None => {}
            }
        }
        if !accepted && !reported {
            self.error_at(
                IssueType::CodeInvalid,
                format!("the NHS number verification status has no coding in an accepted encoding; {VERIFICATION_ENCODINGS}"),
                &[Seg::Name("extension"), Seg::Index(j), VALUE_CC],
            );
        }
    }

    /// Rules of a whole resource (the path points at the resource).
    pub(super) fn resource_rules(&mut self, rtype: ResourceType, obj: Obj<'a>) {
        match rtype {
            ResourceType::Patient => self.patient_rules(obj),
            ResourceType::Appointment => self.appointment_rules(obj),
            ResourceType::Slot => self.end_not_before_start(obj),
            ResourceType::Organization => self.organization_rules(obj),
            ResourceType::Practitioner
            | ResourceType::PractitionerRole
            | ResourceType::Location
            | ResourceType::HealthcareService
            | ResourceType::Schedule
            | ResourceType::Subscription => {}
        }
    }

    fn patient_rules(&mut self, obj: Obj<'a>) {
        if let Some(Node::Array(contacts)) = obj.get("contact") {
            for (i, c) in contacts.iter().enumerate() {
                let Some(co) = c.as_object() else { continue };
                if !co.is_empty()
                    && !["name", "telecom", "address", "organization"]
                        .iter()
                        .any(|n| has(co, n))
                {
                    self.error_at(
                        IssueType::Invariant,
                        "pat-1: SHALL at least contain a contact's details or a reference to an organization (name, telecom, address or organization)",
                        &[Seg::Name("contact"), Seg::Index(i)],
                    );
                }
            }
        }
        if let Some(Node::Array(ids)) = obj.get("identifier") {
            let mut first: Option<usize> = None;
            for (k, id) in ids.iter().enumerate() {
                if id.get("system").and_then(Node::as_str) != Some(NHS_NUMBER_SYSTEM) {
                    continue;
                }
                match first {
                    None => first = Some(k),
                    Some(f) => self.error_at(
                        IssueType::BusinessRule,
                        format!(
                            "UK Core allows at most one NHS number identifier on a Patient (slice identifier:nhsNumber is 0..1); the first is identifier[{f}]"
                        ),
                        &[Seg::Name("identifier"), Seg::Index(k)],
                    ),
                }
            }
        }
    }

    /// app-1..app-4 and end not before start.
    ///
    /// app-4 note: R4 4.0.1 writes app-4 as `cancelationReason.exists() implies (status='no-show' or
    /// status='cancelled')`, but the status code is `noshow`, so a strict R4 validator refuses any noshow
    /// appointment with a cancelationReason. The hub accepts it (that is the intent of the rule) and warns.
    fn appointment_rules(&mut self, obj: Obj<'a>) {
        if let Some(Node::Array(ps)) = obj.get("participant") {
            for (i, p) in ps.iter().enumerate() {
                let Some(po) = p.as_object() else { continue };
                if !po.is_empty() && !has(po, "type") && !has(po, "actor") {
                    self.error_at(
                        IssueType::Invariant,
                        "app-1: Either the type or actor on the participant SHALL be specified",
                        &[Seg::Name("participant"), Seg::Index(i)],
                    );
                }
            }
        }
        let (has_start, has_end) = (has(obj, "start"), has(obj, "end"));
        if has_start != has_end {
            let only = if has_start { "start" } else { "end" };
            self.error(
                IssueType::Invariant,
                format!(
                    "app-2: Either start and end are specified, or neither (only {only} is present)"
                ),
            );
        }
        let status = str_of(obj, "status").filter(|s| schema::APPOINTMENT_STATUS.codes.contains(s));
        if let Some(st) = status {
            let times_optional = matches!(st, "proposed" | "cancelled" | "waitlist");
            if !(times_optional || has_start && has_end) {
                self.error(
                    IssueType::Invariant,
                    format!(
                        "app-3: Only proposed, cancelled or waitlist appointments can be missing start/end dates (status is '{st}')"
                    ),
                );
            }
            if has(obj, "cancelationReason") {
                match st {
                    "cancelled" => {}
                    "noshow" => self.report(
                        Severity::Warning,
                        IssueType::Invariant,
                        "app-4: cancelationReason on a noshow appointment is accepted, but the R4 4.0.1 app-4 expression tests status='no-show' (the code is 'noshow'), so strict R4 validators will reject this resource; DNA (did not attend) reasons are better carried elsewhere, e.g. in an extension or comment",
                        &[Seg::Name("cancelationReason")],
                    ),
                    _ => self.error_at(
                        IssueType::Invariant,
                        format!(
                            "app-4: cancelationReason is only used for appointments that have been cancelled, or noshow (status is '{st}')"
                        ),
                        &[Seg::Name("cancelationReason")],
                    ),
                }
            }
        }
        self.end_not_before_start(obj);
    }

    fn end_not_before_start(&mut self, obj: Obj<'a>) {
        if let (Some(s), Some(e)) = (str_of(obj, "start"), str_of(obj, "end"))
            && let (Some(a), Some(b)) = (parse_instant_ms(s), parse_instant_ms(e))
            && b < a
        {
            self.error_at(
                IssueType::BusinessRule,
                format!("end ({e}) is before start ({s})"),
                &[Seg::Name("end")],
            );
        }
    }

    fn organization_rules(&mut self, obj: Obj<'a>) {
        if !has(obj, "identifier") && !has(obj, "name") {
            self.error(
                IssueType::Invariant,
                "org-1: The organization SHALL at least have a name or an identifier",
            );
        }
        for (list, rule) in [
            (
                "address",
                "org-2: An address of an organization can never be of use 'home'",
            ),
            (
                "telecom",
                "org-3: The telecom of an organization can never be of use 'home'",
            ),
        ] {
            if let Some(Node::Array(items)) = obj.get(list) {
                for (i, item) in items.iter().enumerate() {
                    if item.get("use").and_then(Node::as_str) == Some("home") {
                        self.error_at(
                            IssueType::Invariant,
                            rule,
                            &[Seg::Name(list), Seg::Index(i), Seg::Name("use")],
                        );
                    }
                }
            }
        }
    }

    /// dom-4 and dom-5 on a contained resource (the path points at it).
    pub(super) fn contained_meta_rules(&mut self, obj: Obj<'a>) {
        let Some(Node::Object(meta)) = obj.get("meta") else {
            return;
        };
        if has(meta, "versionId") || has(meta, "lastUpdated") {
            self.error_at(
                IssueType::Invariant,
                "dom-4: If a resource is contained in another resource, it SHALL NOT have a meta.versionId or a meta.lastUpdated",
                &[Seg::Name("meta")],
            );
        }
        if has(meta, "security") {
            self.error_at(
                IssueType::Invariant,
                "dom-5: If a resource is contained in another resource, it SHALL NOT have a security label",
                &[Seg::Name("meta"), Seg::Name("security")],
            );
        }
    }

    /// dom-3: every contained resource is referenced (`#id`) from elsewhere or refers to its container (`#`).
    pub(super) fn dom3(&mut self, obj: Obj<'a>) {
        let Some(Node::Array(items)) = obj.get("contained") else {
            return;
        };
        for (i, c) in items.iter().enumerate() {
            let Some(co) = c.as_object() else { continue };
            if co
                .get("resourceType")
                .and_then(Node::as_str)
                .and_then(ResourceType::parse)
                .is_none()
            {
                continue; // already refused
            }
            let id = str_of(co, "id");
            let referenced = id.is_some_and(|id| {
                self.local_refs
                    .iter()
                    .any(|r| r.strip_prefix('#') == Some(id))
            }) || self.container_refs.contains(&i);
            if !referenced {
                let which = id.map(|id| format!(" '{}'", shown(id))).unwrap_or_default();
                self.error_at(
                    IssueType::Invariant,
                    format!(
                        "dom-3: the contained resource{which} SHALL be referred to from elsewhere in the resource (as #id) or SHALL refer to the containing resource (as #)"
                    ),
                    &[Seg::Name("contained"), Seg::Index(i)],
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ods_variants() {
        for v in [
            "https://fhir.nhs.uk/Id/ods-organization-code",
            "https://fhir.nhs.uk/Id/ods-organisation-code",
            "https://fhir.nhs.uk/id/ods-organization-code",
            "https://fhir.nhs.uk/ID/ods-organisation-code",
        ] {
            assert_eq!(ods_canonical(v), Some(ODS_ORGANIZATION_SYSTEM), "{v}");
        }
        assert_eq!(
            ods_canonical("https://fhir.nhs.uk/id/ods-site-code"),
            Some(ODS_SITE_SYSTEM)
        );
        assert_eq!(ods_canonical("https://fhir.nhs.uk/Id/nhs-number"), None);
        assert_eq!(
            ods_canonical("https://fhir.nhs.uk/Id/ods-organization-codes"),
            None
        );
    }

    #[test]
    fn verification_codes() {
        assert_eq!(verification_code_ok(VS_ENGLAND, Some("01")), Some(true));
        assert_eq!(verification_code_ok(VS_WALES, Some("08")), Some(true));
        assert_eq!(verification_code_ok(VS_ENGLAND, Some("09")), Some(false));
        assert_eq!(
            verification_code_ok(VS_ENGLAND, Some("number-present-and-verified")),
            Some(false)
        );
        assert_eq!(
            verification_code_ok(VS_OLD, Some("number-present-and-verified")),
            Some(true)
        );
        assert_eq!(verification_code_ok(VS_OLD, Some("03")), Some(true));
        assert_eq!(verification_code_ok(NULL_FLAVOR, Some("NI")), Some(true));
        assert_eq!(verification_code_ok(NULL_FLAVOR, Some("UNK")), Some(false));
        assert_eq!(verification_code_ok("http://example.org", Some("01")), None);
    }
}
