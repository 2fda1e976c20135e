//! `cb-validate-bench`: in-process validation throughput of the `fhir` crate on the benchmark Patient.
//!
//! Validates the same UK Core Patient (the body `cb-loadgen` posts) N times, parsing included, in the two
//! ways the hub does, and prints validations per second of each:
//! - `fhir::check_json`: the verdict and issues only (what `$validate` and `carebridge validate` run);
//! - `fhir::validate_json`: the verdict and, when valid, the resource as the `serde_json::Value` a write
//!   stores and indexes.
//!
//! `--write-sample FILE` saves that Patient so another validator (e.g. Python's fhir.resources) can be timed
//! on identical input. Exit 1 if the sample does not validate.

use std::time::Instant;

/// The `carebridge` binary's allocator, so validation is timed as the hub runs it.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str =
    "usage: cb-validate-bench [--iterations N] [--only check|value] [--write-sample FILE] [--json]";

fn main() {
    let mut iterations: u64 = 20_000;
    let mut sample_out = None;
    let mut json = false;
    // `--only` times one of the two (for profiling); the other then runs once.
    let mut only = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--json" => json = true,
            "--only" => match it.next().as_deref() {
                Some("check") => only = Some(true),
                Some("value") => only = Some(false),
                _ => usage("--only takes check or value"),
            },
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
    let patient = Some(fhir::ResourceType::Patient);
    let runs = |check: bool| match only {
        Some(c) if c != check => 1,
        _ => iterations,
    };
    let (check_s, check_ok) = time(runs(true), || {
        fhir::check_json(std::hint::black_box(bytes), patient).is_ok()
    });
    let (value_s, value_ok) = time(runs(false), || {
        fhir::validate_json(std::hint::black_box(bytes), patient).is_ok()
    });
    for (name, n, secs, ok) in [
        ("fhir::check_json", runs(true), check_s, check_ok),
        ("fhir::validate_json", runs(false), value_s, value_ok),
    ] {
        if n < iterations {
            continue;
        }
        println!(
            "{name}: {:.0} validations/s ({n} of a {}-byte Patient in {secs:.3}s, {:.2} µs each, {ok} valid)",
            n as f64 / secs,
            bytes.len(),
            secs * 1e6 / n as f64
        );
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "validator": "fhir::check_json",
                "iterations": iterations,
                "bytes": bytes.len(),
                "seconds": check_s,
                "per_s": iterations as f64 / check_s,
                "valid": check_ok,
                "with_value_seconds": value_s,
                "with_value_per_s": iterations as f64 / value_s,
                "with_value_valid": value_ok,
            })
        );
    }
}

/// Run `f` `iterations` times: the seconds taken and how many runs returned true.
fn time(iterations: u64, mut f: impl FnMut() -> bool) -> (f64, u64) {
    let start = Instant::now();
    let mut ok = 0u64;
    for _ in 0..iterations {
        if f() {
            ok += 1;
        }
    }
    (start.elapsed().as_secs_f64().max(1e-9), ok)
}

fn usage(msg: &str) -> ! {
    eprintln!("cb-validate-bench: {msg}\n{USAGE}");
    std::process::exit(2);
}
