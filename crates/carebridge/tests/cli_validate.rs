//! `carebridge validate FILE...`: exit codes and both output forms, on files written by the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::process::Command;

fn write(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write fixture");
    p
}

#[test]
fn exit_codes_text_and_json() {
    let dir = std::env::temp_dir().join(format!("cb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let good = write(
        &dir,
        "good.json",
        r#"{"resourceType":"Patient","identifier":[{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9000000009"}],"gender":"female"}"#,
    );
    let bad = write(
        &dir,
        "bad.json",
        r#"{"resourceType":"Patient","identifier":[{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"1111111111"}],"gender":"f","colour":"blue"}"#,
    );
    let bin = env!("CARGO_BIN_EXE_carebridge");

    let ok = Command::new(bin)
        .arg("validate")
        .arg(&good)
        .output()
        .expect("run");
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("valid"));

    let out = Command::new(bin)
        .arg("validate")
        .arg(&good)
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("INVALID"), "{text}");
    assert!(text.contains("Patient.identifier[0].value"), "{text}");
    assert!(text.contains("Patient.gender"), "{text}");
    assert!(text.contains("Patient.colour"), "{text}");

    let json = Command::new(bin)
        .args(["validate", "--json"])
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(json.status.code(), Some(1));
    let oo: serde_json::Value = serde_json::from_slice(&json.stdout).expect("one OperationOutcome");
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert!(
        oo["issue"].as_array().map(Vec::len).unwrap_or(0) >= 3,
        "{oo}"
    );

    let missing = Command::new(bin)
        .arg("validate")
        .arg(dir.join("nope.json"))
        .output()
        .expect("run");
    assert_eq!(missing.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}
