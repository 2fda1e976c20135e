//! Profiling loop for `fhir::validate_json` on a Patient file (e.g. the one `cb-validate-bench --write-sample`
//! writes). Prints µs per call for: serde_json parse alone, `validate` on a parsed Value, `validate_json`.
//!
//! Usage: `cargo run --release -p fhir --example validate_profile -- PATIENT.json [ITERATIONS] [only-json]`

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "profiling tool")]

use std::hint::black_box;
use std::time::Instant;

fn time(label: &str, n: u64, mut f: impl FnMut()) {
    for _ in 0..n / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{label:<40} {:8.3} µs", secs * 1e6 / n as f64);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().expect("PATIENT.json");
    let n: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let mode = args.get(2).map(String::as_str).unwrap_or("all");
    let only_json = mode == "only-json";
    let bytes = std::fs::read(path).expect("read");
    let expected = Some(fhir::ResourceType::Patient);
    assert!(fhir::validate_json(&bytes, expected).is_ok());
    if mode == "only-validate" {
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        time("validate(&mut Value)", n, || {
            black_box(fhir::validate(
                fhir::ResourceType::Patient,
                black_box(&mut v),
            ));
        });
        return;
    }
    if mode == "only-parse" {
        time("fhir::parse_json_value (fast parser)", n, || {
            black_box(fhir::__bench_parse(black_box(&bytes)));
        });
        return;
    }
    if !only_json {
        time("serde_json::from_slice::<Value>", n, || {
            let v: serde_json::Value = serde_json::from_slice(black_box(&bytes)).unwrap();
            black_box(v);
        });
        time("fhir::parse_json_value (fast parser)", n, || {
            black_box(fhir::__bench_parse(black_box(&bytes)));
        });
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        time("Value::clone + drop", n, || {
            black_box(black_box(&v).clone());
        });
        time("validate(&mut Value)", n, || {
            black_box(fhir::validate(
                fhir::ResourceType::Patient,
                black_box(&mut v),
            ));
        });
    }
    time("validate_json", n, || {
        black_box(fhir::validate_json(black_box(&bytes), expected).is_ok());
    });
}
