//! Profiling loop for `fhir::validate_json` on one resource file (e.g. the Patient that
//! `cb-validate-bench --write-sample FILE` writes). Prints wall-clock µs per call.
//!
//! Usage: `cargo run --release -p fhir --example validate_profile -- FILE [ITERATIONS] [MODE]`, MODE one of
//! `all` (default: each of the below), `json` (`validate_json`: parse + validate + drop, what a write
//! costs), `validate` (`validate` on an already parsed Value), `serde` (`serde_json::from_slice::<Value>` +
//! drop), `clone` (`Value::clone` + drop: the cost of allocating and freeing that Value, a floor for any
//! parser that must return one). Run a single mode under `perf record -g` to profile it.

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
    let path = args
        .first()
        .expect("usage: validate_profile FILE [ITERATIONS] [MODE]");
    let n: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let mode = args.get(2).map(String::as_str).unwrap_or("all");
    let bytes = std::fs::read(path).expect("read");
    let parsed: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    let rtype = parsed
        .get("resourceType")
        .and_then(serde_json::Value::as_str)
        .and_then(fhir::ResourceType::parse)
        .expect("a served resource type");
    let run = |m: &str| mode == "all" || mode == m;
    if run("serde") {
        time("serde_json::from_slice::<Value>", n, || {
            let v: serde_json::Value = serde_json::from_slice(black_box(&bytes)).unwrap();
            black_box(v);
        });
    }
    if run("clone") {
        time("Value::clone + drop", n, || {
            black_box(black_box(&parsed).clone());
        });
    }
    if run("validate") {
        let mut v = parsed.clone();
        time("validate(rtype, &mut Value)", n, || {
            black_box(fhir::validate(rtype, black_box(&mut v)));
        });
    }
    if run("json") {
        time("validate_json (parse + validate)", n, || {
            black_box(fhir::validate_json(black_box(&bytes), Some(rtype)).is_ok());
        });
    }
}
