//! Validation over the shared corpus of real FHIR JSON (HL7 R4 examples, BaRS and PDS samples).
//!
//! Why it exists: hand-written golden cases only test what their author thought of; published examples and
//! real NHS API payloads catch false refusals. Every served resource in the corpus (a file whose
//! `resourceType` is one of the nine, and every such `Bundle.entry.resource`) must either validate or be
//! listed in `tests/corpus-expected.json` with the reason it is refused; a listed one must really be refused
//! and must still exist, so the list cannot go stale. A valid resource must come back unchanged (lossless
//! storage) unless an identifier system was normalised.
//!
//! Keys of the expected list: the path relative to the corpus parent (`fhir/bars/Appointment-PATCH-body.json`),
//! with `#entry[i]` appended for a Bundle entry. Skipped with a message when the corpus is absent.

#![allow(clippy::panic, reason = "tests")]

use fhir::{ResourceType, Severity, check_json, operation_outcome, validate_json};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/fhir")
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in read.filter_map(Result::ok) {
        let p = entry.path();
        if p.is_dir() {
            json_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "json") {
            out.push(p);
        }
    }
}

fn is_served(v: &Value) -> bool {
    v.get("resourceType")
        .and_then(Value::as_str)
        .and_then(ResourceType::parse)
        .is_some()
}

/// (key, bytes) of every served resource in the corpus.
fn served_resources(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    json_files(root, &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let rel = file
            .strip_prefix(root)
            .map(|r| r.to_string_lossy().replace('\\', "/"))
            .unwrap_or_default();
        let key = format!("fhir/{rel}");
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
        let Ok(value) = serde_json::from_slice::<Value>(text) else {
            continue;
        };
        if is_served(&value) {
            out.push((key, bytes));
        } else if value.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
            let entries = value
                .get("entry")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            for (i, e) in entries.iter().enumerate() {
                if let Some(r) = e.get("resource").filter(|r| is_served(r)) {
                    out.push((
                        format!("{key}#entry[{i}]"),
                        serde_json::to_vec(r).unwrap_or_default(),
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn corpus_resources_are_valid_or_listed() {
    let root = corpus_root();
    if !root.is_dir() {
        println!("skipping: shared corpus not found at {}", root.display());
        return;
    }
    let listed_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus-expected.json");
    let listed: Map<String, Value> = std::fs::read(&listed_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| panic!("{} must be a JSON object", listed_path.display()));

    let resources = served_resources(&root);
    assert!(
        !resources.is_empty(),
        "no served resources found under {}",
        root.display()
    );
    let mut failures = Vec::new();
    let (mut valid, mut refused) = (0, 0);
    for (key, bytes) in &resources {
        let result = validate_json(bytes, None);
        let checked = check_json(bytes, None);
        if format!("{:?}", result.as_ref().map(|v| &v.warnings))
            != format!("{:?}", checked.as_ref())
        {
            failures.push(format!("{key}: check_json and validate_json disagree"));
        }
        match (&result, listed.get(key)) {
            (Ok(v), None) => {
                valid += 1;
                let normalised = v
                    .warnings
                    .iter()
                    .any(|w| w.severity == Severity::Information);
                let original: Value =
                    serde_json::from_slice(bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes))
                        .unwrap_or(Value::Null);
                if !normalised && v.resource != original {
                    failures.push(format!("{key}: valid but not returned unchanged"));
                }
                for w in &v.warnings {
                    println!(
                        "{key}: {:?} {} at {:?}",
                        w.severity, w.diagnostics, w.expression
                    );
                }
            }
            (Ok(_), Some(reason)) => failures.push(format!(
                "{key}: listed as refused ({reason}) but it is valid; remove it from the list"
            )),
            (Err(issues), Some(reason)) => {
                refused += 1;
                println!("{key}: refused as expected ({reason}):");
                for i in issues {
                    println!(
                        "    {:?} {} at {:?}",
                        i.severity, i.diagnostics, i.expression
                    );
                }
            }
            (Err(issues), None) => failures.push(format!(
                "{key}: refused but not listed in corpus-expected.json:\n{}",
                serde_json::to_string_pretty(&operation_outcome(issues)).unwrap_or_default()
            )),
        }
    }
    for key in listed.keys() {
        if !resources.iter().any(|(k, _)| k == key) {
            failures.push(format!(
                "{key}: listed in corpus-expected.json but not found in the corpus"
            ));
        }
    }
    println!(
        "{} served resources: {valid} valid, {refused} refused as listed",
        resources.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
