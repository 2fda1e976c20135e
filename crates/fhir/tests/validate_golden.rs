//! Golden tests of the validator: each `tests/golden/<name>.json` is validated with `validate_json` and the
//! resulting OperationOutcome (pretty-printed) must equal `tests/golden/<name>.outcome.json`.
//!
//! Why it exists: the OperationOutcome is what clients see, so its exact issues (severity, code, diagnostics,
//! FHIRPath expression) are pinned, for valid and invalid inputs alike. Run with `UPDATE_GOLDEN=1` to rewrite
//! the expected files after a deliberate change, then review the diff by hand.
//!
//! Also here: checks of what a golden file cannot show (the normalised resource, lossless round trip).

#![allow(clippy::panic, reason = "tests")]

use fhir::{
    IssueType, ResourceType, Severity, check_json, operation_outcome, validate, validate_json,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// The issues of `validate_json`, after checking that `check_json` (which reads the bytes without building
/// a `Value`) reports exactly the same.
fn issues_of(bytes: &[u8], expected: Option<ResourceType>) -> Vec<fhir::Issue> {
    let full = validate_json(bytes, expected).map(|v| v.warnings);
    let checked = check_json(bytes, expected);
    assert_eq!(
        format!("{full:?}"),
        format!("{checked:?}"),
        "check_json and validate_json disagree on {}",
        String::from_utf8_lossy(bytes)
    );
    match full {
        Ok(warnings) => warnings,
        Err(issues) => issues,
    }
}

fn outcome_text(bytes: &[u8]) -> String {
    let issues = issues_of(bytes, None);
    let mut text = serde_json::to_string_pretty(&operation_outcome(&issues)).unwrap_or_default();
    text.push('\n');
    text
}

#[test]
fn golden_outcomes() {
    let dir = golden_dir();
    let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|r| r.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    inputs.retain(|p| {
        p.extension().is_some_and(|e| e == "json")
            && !p.to_string_lossy().ends_with(".outcome.json")
    });
    inputs.sort();
    assert!(
        inputs.len() >= 25,
        "expected at least 25 golden inputs in {}",
        dir.display()
    );

    let mut failures = Vec::new();
    for input in &inputs {
        let name = input
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let expected_path = dir.join(format!("{name}.outcome.json"));
        let bytes = std::fs::read(input).unwrap_or_default();
        let actual = outcome_text(&bytes);
        if update {
            if std::fs::read_to_string(&expected_path).ok().as_deref() != Some(actual.as_str()) {
                println!("updated {}", expected_path.display());
                let _ = std::fs::write(&expected_path, &actual);
            }
            continue;
        }
        match std::fs::read_to_string(&expected_path) {
            Ok(expected) if expected == actual => {}
            Ok(expected) => failures.push(format!(
                "{name}: outcome differs\n--- expected\n{expected}--- actual\n{actual}"
            )),
            Err(_) => failures.push(format!(
                "{name}: {} is missing; actual:\n{actual}",
                expected_path.display()
            )),
        }
    }
    // Every expected file has its input.
    if let Ok(read) = std::fs::read_dir(&dir) {
        for p in read.filter_map(Result::ok).map(|e| e.path()) {
            let s = p.to_string_lossy().into_owned();
            if let Some(stem) = s.strip_suffix(".outcome.json")
                && !Path::new(&format!("{stem}.json")).exists()
            {
                failures.push(format!("{s} has no input file"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden failure(s) (UPDATE_GOLDEN=1 rewrites):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn ods_systems_are_normalised_in_place_everywhere() {
    let bytes =
        std::fs::read(golden_dir().join("organization-ods-variants.json")).unwrap_or_default();
    let validated = match validate_json(&bytes, Some(ResourceType::Organization)) {
        Ok(v) => v,
        Err(issues) => panic!("unexpected refusal: {issues:?}"),
    };
    let r = &validated.resource;
    assert_eq!(
        r["identifier"][0]["system"],
        "https://fhir.nhs.uk/Id/ods-organization-code"
    );
    assert_eq!(r["identifier"][0]["value"], "RR8");
    assert_eq!(
        r["identifier"][1]["system"],
        "https://fhir.nhs.uk/Id/ods-site-code"
    );
    assert_eq!(
        r["identifier"][2]["system"],
        "https://fhir.nhs.uk/Id/ods-organization-code"
    );
    assert_eq!(r["identifier"][3]["system"], "http://example.org/local");
    assert_eq!(
        r["partOf"]["identifier"]["system"],
        "https://fhir.nhs.uk/Id/ods-organization-code"
    );
    assert_eq!(
        r["extension"][0]["valueIdentifier"]["system"], "https://fhir.nhs.uk/Id/ods-site-code",
        "identifiers inside extensions are normalised too"
    );
    let infos = validated
        .warnings
        .iter()
        .filter(|w| w.severity == Severity::Information)
        .count();
    assert_eq!(infos, 5);
    // Key order is kept: system is still the first key of the identifier.
    let first_key = r["identifier"][0]
        .as_object()
        .and_then(|o| o.keys().next().cloned());
    assert_eq!(first_key.as_deref(), Some("system"));
}

#[test]
fn ods_normalisation_in_contained_and_reference_identifiers() {
    let mut v = json!({
        "resourceType": "Appointment",
        "status": "proposed",
        "contained": [{"resourceType": "Organization", "id": "o1",
                       "identifier": [{"system": "https://fhir.nhs.uk/id/ods-organisation-code", "value": "X26"}]}],
        "participant": [{"status": "accepted", "actor": {"reference": "#o1",
            "identifier": {"system": "https://fhir.nhs.uk/ID/ODS-ORGANIZATION-CODE", "value": "X26"}}}]
    });
    let issues = validate(ResourceType::Appointment, &mut v);
    assert!(issues.iter().all(|i| !i.is_error()), "{issues:?}");
    assert_eq!(
        v["contained"][0]["identifier"][0]["system"],
        "https://fhir.nhs.uk/Id/ods-organization-code"
    );
    assert_eq!(
        v["participant"][0]["actor"]["identifier"]["system"],
        "https://fhir.nhs.uk/Id/ods-organization-code"
    );
    assert_eq!(
        issues[0].expression,
        vec!["Appointment.contained[0].identifier[0].system".to_string()]
    );
    assert_eq!(
        issues[1].expression,
        vec!["Appointment.participant[0].actor.identifier.system".to_string()]
    );
}

#[test]
fn valid_resources_are_returned_losslessly() {
    let bytes =
        std::fs::read(golden_dir().join("patient-extension-decimal.json")).unwrap_or_default();
    let validated = match validate_json(&bytes, Some(ResourceType::Patient)) {
        Ok(v) => v,
        Err(issues) => panic!("unexpected refusal: {issues:?}"),
    };
    let text = serde_json::to_string(&validated.resource).unwrap_or_default();
    assert!(text.contains("\"valueDecimal\":1.50"), "{text}");
    assert!(text.contains("\"value\":0.500"), "{text}");
    assert!(text.contains("+00:00"), "{text}");
    let original: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    assert_eq!(validated.resource, original);
}

#[test]
fn expected_type_is_enforced() {
    let bytes = std::fs::read(golden_dir().join("slot-valid.json")).unwrap_or_default();
    assert!(validate_json(&bytes, Some(ResourceType::Slot)).is_ok());
    let Err(issues) = validate_json(&bytes, Some(ResourceType::Appointment)) else {
        panic!("a Slot must be refused where an Appointment is expected")
    };
    assert_eq!(issues.len(), 1);
    assert_eq!(issues[0].code, IssueType::Invalid);
    assert_eq!(issues[0].expression, vec!["resourceType".to_string()]);
}

#[test]
fn noshow_with_cancelation_reason_is_accepted_with_a_warning() {
    let bytes =
        std::fs::read(golden_dir().join("appointment-noshow-reason.json")).unwrap_or_default();
    let validated = match validate_json(&bytes, Some(ResourceType::Appointment)) {
        Ok(v) => v,
        Err(issues) => panic!("unexpected refusal: {issues:?}"),
    };
    assert_eq!(validated.warnings.len(), 1);
    assert_eq!(validated.warnings[0].severity, Severity::Warning);
    assert!(validated.warnings[0].diagnostics.contains("no-show"));
}

mod no_panic {
    use super::*;
    use proptest::prelude::*;

    /// Keys the validator knows, so generated objects reach deep into the tables.
    const KEYS: &[&str] = &[
        "resourceType",
        "id",
        "meta",
        "text",
        "status",
        "div",
        "contained",
        "extension",
        "modifierExtension",
        "url",
        "valueString",
        "valueDecimal",
        "valueCodeableConcept",
        "valueIdentifier",
        "valueReference",
        "valuePeriod",
        "valueQuantity",
        "valueTiming",
        "coding",
        "system",
        "code",
        "value",
        "identifier",
        "name",
        "given",
        "_given",
        "family",
        "birthDate",
        "_birthDate",
        "gender",
        "deceasedBoolean",
        "deceasedDateTime",
        "telecom",
        "address",
        "contact",
        "link",
        "other",
        "type",
        "reference",
        "start",
        "end",
        "period",
        "participant",
        "actor",
        "cancelationReason",
        "schedule",
        "position",
        "latitude",
        "hoursOfOperation",
        "daysOfWeek",
        "repeat",
        "boundsPeriod",
        "low",
        "high",
        "Patient",
        "Appointment",
        "Organization",
        "Slot",
        "#a",
        "a",
        "",
    ];

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => proptest::sample::select(KEYS).prop_map(str::to_string),
            1 => "[_a-zA-Z#]{0,6}",
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            proptest::sample::select(KEYS).prop_map(|s| Value::String(s.to_string())),
            "[ -~]{0,12}".prop_map(Value::String),
            Just(json!("9000000009")),
            Just(json!("https://fhir.nhs.uk/id/ods-site-code")),
            Just(json!("https://fhir.nhs.uk/Id/nhs-number")),
            Just(json!("2024-02-29T10:00:00Z")),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec((key(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn resource() -> impl Strategy<Value = (ResourceType, Value)> {
        (
            proptest::sample::select(ResourceType::ALL.to_vec()),
            json_value(),
        )
            .prop_map(|(t, v)| {
                let v = match v {
                    Value::Object(mut m) => {
                        m.insert("resourceType".into(), json!(t.as_str()));
                        Value::Object(m)
                    }
                    other => other,
                };
                (t, v)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_json_never_panics((rtype, mut v) in resource()) {
            let text = serde_json::to_vec(&v).unwrap_or_default();
            let _ = validate(rtype, &mut v);
            let _ = issues_of(&text, None);
            let _ = issues_of(&text, Some(rtype));
            let pretty = serde_json::to_vec_pretty(&v).unwrap_or_default();
            let _ = issues_of(&pretty, Some(rtype));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = issues_of(&bytes, None);
        }
    }
}
