//! Index extraction over the shared sample corpus (HL7 R4 examples, BaRS and PDS samples). Skipped with a
//! message when the corpus is not on this machine.

use fhir::{IndexEntry, IndexValue, ResourceType, index_entries, search_param};
use serde_json::Value;
use std::path::Path;

/// The shared corpus beside the repository (`<repo>/../shared/corpus/fhir`).
fn corpus() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/fhir")
}

/// The resources of one file: the resource itself, or the entries of a Bundle (recursively).
fn resources(v: &Value, out: &mut Vec<Value>) {
    if v.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
        for entry in v
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(r) = entry.get("resource") {
                resources(r, out);
            }
        }
    } else {
        out.push(v.clone());
    }
}

fn load(dir: &str) -> Option<Vec<(String, ResourceType, Value)>> {
    let path = corpus().join(dir);
    let Ok(read) = std::fs::read_dir(&path) else {
        println!("skipping: corpus directory {} is absent", path.display());
        return None;
    };
    let mut files: Vec<_> = read.filter_map(Result::ok).map(|e| e.path()).collect();
    files.sort();
    let mut out = Vec::new();
    for file in files
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "json"))
    {
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let Ok(json) = serde_json::from_slice::<Value>(&bytes) else {
            println!("not JSON, skipped: {}", file.display());
            continue;
        };
        let mut found = Vec::new();
        resources(&json, &mut found);
        for r in found {
            let Some(rtype) = r
                .get("resourceType")
                .and_then(Value::as_str)
                .and_then(ResourceType::parse)
            else {
                continue;
            };
            let name = format!(
                "{}#{}",
                file.display(),
                r.get("id").and_then(Value::as_str).unwrap_or("?")
            );
            out.push((name, rtype, r));
        }
    }
    Some(out)
}

fn has_identifier_value(r: &Value) -> bool {
    r.get("identifier")
        .and_then(Value::as_array)
        .is_some_and(|ids| {
            ids.iter().any(|i| {
                i.get("value")
                    .and_then(Value::as_str)
                    .is_some_and(|v| !v.is_empty())
            })
        })
}

fn check(name: &str, rtype: ResourceType, r: &Value) -> Vec<IndexEntry> {
    let entries = index_entries(rtype, r);
    for (i, e) in entries.iter().enumerate() {
        assert!(
            search_param(rtype, e.param).is_some(),
            "{name}: undeclared parameter {}",
            e.param
        );
        assert!(!entries[..i].contains(e), "{name}: duplicate {e:?}");
        if let IndexValue::Date { low_ms, high_ms } = e.value {
            assert!(low_ms <= high_ms, "{name}: {e:?}");
        }
    }
    if has_identifier_value(r) {
        assert!(
            entries.iter().any(|e| e.param == "identifier"),
            "{name}: identifier not indexed"
        );
    }
    entries
}

fn has(entries: &[IndexEntry], param: &str, value: &IndexValue) -> bool {
    entries
        .iter()
        .any(|e| e.param == param && &e.value == value)
}

#[test]
fn r4_core_examples_index_without_panicking() {
    let Some(all) = load("r4-core") else { return };
    assert!(!all.is_empty());
    let mut with_identifier = 0;
    for (name, rtype, r) in &all {
        let entries = check(name, *rtype, r);
        if has_identifier_value(r) {
            with_identifier += 1;
        }
        if name.ends_with("Appointment-example.json#example") {
            assert!(
                has(
                    &entries,
                    "patient",
                    &IndexValue::Reference("Patient/example".into())
                ),
                "{entries:?}"
            );
            assert!(has(
                &entries,
                "based-on",
                &IndexValue::Reference("ServiceRequest/myringotomy".into())
            ));
            assert!(entries.iter().any(|e| e.param == "date"));
        }
        if name.ends_with("Schedule-example.json#example") {
            assert!(has(
                &entries,
                "actor",
                &IndexValue::Reference("Location/1".into())
            ));
            assert!(has(
                &entries,
                "active",
                &IndexValue::Token {
                    system: None,
                    code: "true".into()
                }
            ));
        }
        if name.ends_with("Slot-example.json#example") {
            assert!(entries.iter().any(|e| e.param == "start"));
            assert!(entries.iter().any(|e| e.param == "status"));
            assert!(has(
                &entries,
                "schedule",
                &IndexValue::Reference("Schedule/example".into())
            ));
        }
    }
    assert!(
        with_identifier > 5,
        "expected many examples with identifiers, saw {with_identifier}"
    );
    println!(
        "indexed {} resources ({with_identifier} with identifiers)",
        all.len()
    );
}

#[test]
fn bars_and_pds_samples_index_without_panicking() {
    for dir in ["bars", "pds"] {
        let Some(all) = load(dir) else { continue };
        for (name, rtype, r) in &all {
            let entries = check(name, *rtype, r);
            if *rtype == ResourceType::Patient && dir == "pds" {
                assert!(
                    entries.iter().any(
                        |e| matches!(&e.value, IndexValue::Token { system: Some(s), .. }
                        if e.param == "identifier" && s == fhir::NHS_NUMBER_SYSTEM)
                    ),
                    "{name}: NHS number not indexed"
                );
            }
        }
        // BaRS slots carry the UK Core delivery channel as valueCode.
        if dir == "bars" {
            let slots: Vec<_> = all
                .iter()
                .filter(|(_, t, _)| *t == ResourceType::Slot)
                .collect();
            assert!(slots.iter().any(|(_, t, r)| {
                index_entries(*t, r)
                    .iter()
                    .any(|e| e.param == "delivery-channel")
            }));
        }
    }
}
