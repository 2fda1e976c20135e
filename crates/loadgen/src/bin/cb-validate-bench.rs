//! `cb-validate-bench`: in-process validation throughput of the `fhir` crate on the benchmark Patient.
//!
//! Validates the same UK Core Patient (the body `cb-loadgen` posts) N times with `fhir::validate_json`, parsing
//! included, and prints validations per second; `--write-sample FILE` saves that Patient so another validator
//! (e.g. Python's fhir.resources) can be timed on identical input. Exit 1 if the sample does not validate.

use std::time::Instant;

/// The `carebridge` binary's allocator, so validation is timed as the hub runs it.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: cb-validate-bench [--iterations N] [--write-sample FILE] [--json]";

fn main() {
    let mut iterations: u64 = 20_000;
    let mut sample_out = None;
    let mut json = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--json" => json = true,
            "--iterations" => match it.next().and_then(|v| v.parse().ok()) {
                Some(n) if n > 0 => iterations = n,
                _ => usage("--iterations needs a positive whole number"),
            },
            "--write-sample" => {
                sample_out = Some(
                    it.next()
                        .unwrap_or_else(|| usage("--write-sample needs a file")),
                )
            }
            _ => usage(&format!("unknown option {flag}")),
        }
    }
    let body = loadgen::patient::patient_json(1, "9990000018");
    if let Some(path) = sample_out
        && let Err(e) = std::fs::write(&path, &body)
    {
        eprintln!("cb-validate-bench: writing {path}: {e}");
        std::process::exit(2);
    }
    let bytes = body.as_bytes();
    if let Err(issues) = fhir::validate_json(bytes, Some(fhir::ResourceType::Patient)) {
        eprintln!(
            "cb-validate-bench: the sample Patient does not validate ({} issues): {issues:?}",
            issues.len()
        );
        std::process::exit(1);
    }
    let start = Instant::now();
    let mut ok = 0u64;
    for _ in 0..iterations {
        if fhir::validate_json(
            std::hint::black_box(bytes),
            Some(fhir::ResourceType::Patient),
        )
        .is_ok()
        {
            ok += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    let per_s = iterations as f64 / secs;
    println!(
        "fhir::validate_json: {per_s:.0} validations/s ({iterations} of a {}-byte Patient in {secs:.3}s, {:.1} µs each, {ok} valid)",
        bytes.len(),
        secs * 1e6 / iterations as f64
    );
    if json {
        println!(
            "{}",
            serde_json::json!({"validator": "fhir::validate_json", "iterations": iterations, "bytes": bytes.len(), "seconds": secs, "per_s": per_s, "valid": ok})
        );
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("cb-validate-bench: {msg}\n{USAGE}");
    std::process::exit(2);
}
