//! Golden tests: HL7 v2 -> FHIR for the repo's fixtures (`tests/python/hl7/*.hl7`, shared with the MLLP tests)
//! and FHIR -> HL7 v2 for outbound SIU/ADT. `UPDATE_GOLDEN=1` rewrites the expected files.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use hl7_adapter::{map, outbound, resources};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn check(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "{name} differs from its golden file (UPDATE_GOLDEN=1 rewrites it)"
    );
}

#[test]
fn v2_to_fhir() {
    let dir = root().join("tests/python/hl7");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "hl7"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "fixtures missing in {}", dir.display());
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let msg = hl7::Message::parse(&bytes).unwrap();
        let out = match map::intent(&msg) {
            Ok(mapped) => json!({"resources": resources::preview(&mapped)}),
            Err(r) => json!({"refusal": {
                "ack": if r.reject { "AR" } else { "AE" },
                "code": r.code.code(),
                "segment": r.segment.as_ref().map(|s| s.0.clone()),
                "field": r.field,
                "message": r.message,
            }}),
        };
        let name = f
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace(".hl7", ".json");
        check(&name, &(serde_json::to_string_pretty(&out).unwrap() + "\n"));
    }
}

fn appointment() -> Value {
    json!({
        "resourceType": "Appointment",
        "id": "appt-1",
        "identifier": [{"system": map::PLACER_SYSTEM, "value": "PAS:PL42"}],
        "status": "cancelled",
        "cancelationReason": {"coding": [{"system": scheduling::CANCELLATION_REASON_SYSTEM, "code": "pat-cpp"}], "text": "Patient asked to move it"},
        "start": "2031-03-15T10:40:00Z",
        "end": "2031-03-15T11:00:00Z",
        "participant": [
            {"actor": {"reference": "Patient/p1"}, "status": "accepted"},
            {"actor": {"reference": "Practitioner/d1"}, "status": "accepted"},
            {"actor": {"reference": "Location/l1"}, "status": "accepted"}
        ]
    })
}

fn patient() -> Value {
    json!({
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [
            {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9449306613"},
            {"system": "urn:carebridge:hl7:mrn:RFX01", "value": "RFX123456"}
        ],
        "name": [{"family": "O'Brien", "given": ["Siobhan", "Mary"]}],
        "gender": "female",
        "birthDate": "1975-03-14",
        "address": [{"line": ["12 Harbour Road"], "city": "Whitby", "postalCode": "YO21 1AA"}]
    })
}

#[test]
fn fhir_to_v2() {
    let env = outbound::Envelope {
        receiving_application: "PAS".into(),
        receiving_facility: "RFX01".into(),
        ..Default::default()
    };
    let actors = vec![
        (
            "Practitioner/d1".to_owned(),
            json!({"identifier": [{"value": "C4444444"}], "name": [{"family": "Okafor", "given": ["Grace"]}]}),
        ),
        (
            "Location/l1".to_owned(),
            json!({"identifier": [{"value": "EYE^ROOM4"}], "name": "Eye clinic | room 4"}),
        ),
    ];
    let time = fhir::parse_instant_ms("2031-03-01T09:00:00Z").unwrap();
    let s15 = outbound::siu(
        &env,
        "S15",
        "CB42",
        time,
        &appointment(),
        Some(&patient()),
        &actors,
    );
    check("siu-s15-out.hl7", &s15.replace('\r', "\n"));
    let a28 = outbound::adt(&env, "A28", "CB43", time, &patient());
    check("adt-a28-out.hl7", &a28.replace('\r', "\n"));

    // What the hub sends, the hub (or any receiver using the same conventions) reads back.
    let back = map::intent(&hl7::Message::parse(s15.as_bytes()).unwrap()).unwrap();
    let map::Intent::Appointment(a) = back.intent else {
        panic!("not an appointment")
    };
    assert_eq!(a.event, map::SiuEvent::Cancel);
    assert_eq!(a.start_ms, fhir::parse_instant_ms("2031-03-15T10:40:00Z"));
    assert_eq!(a.end_ms, fhir::parse_instant_ms("2031-03-15T11:00:00Z"));
    assert_eq!(a.identifiers[0].value, "PAS:PL42");
    assert_eq!(
        a.event_reason.as_ref().and_then(|r| r.code.as_deref()),
        Some("pat-cpp")
    );
    let p = a.patient.unwrap();
    assert_eq!(p.nhs_number(), Some("9449306613"));
    assert_eq!(p.family.as_deref(), Some("O'Brien"));
    assert_eq!(
        a.locations[0].display.as_deref(),
        Some("Eye clinic | room 4"),
        "delimiters in values are escaped"
    );
    let back = map::intent(&hl7::Message::parse(a28.as_bytes()).unwrap()).unwrap();
    let map::Intent::Patient(p) = back.intent else {
        panic!("not a patient")
    };
    assert_eq!(p.birth_date.as_deref(), Some("1975-03-14"));
    assert_eq!(p.identifiers.len(), 2);
}
