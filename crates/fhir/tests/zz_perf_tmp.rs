#[test]
fn perf() {
    for f in ["tests/golden/patient-ukcore-valid.json", "../../../shared/corpus/fhir/pds/Patient.json", "tests/golden/appointment-valid.json"] {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        let bytes = std::fs::read(&p).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let rt = fhir::ResourceType::parse(v["resourceType"].as_str().unwrap()).unwrap();
        let n = 50_000;
        let t = std::time::Instant::now();
        let mut errs = 0;
        for _ in 0..n { let mut x = v.clone(); errs += fhir::validate(rt, &mut x).len(); }
        let clone_t = { let t2 = std::time::Instant::now(); for _ in 0..n { let x = v.clone(); std::hint::black_box(x); } t2.elapsed() };
        let el = t.elapsed();
        let t3 = std::time::Instant::now();
        for _ in 0..n/5 { let r = fhir::validate_json(&bytes, None); std::hint::black_box(r.is_ok()); }
        let el3 = t3.elapsed();
        println!("{f}: {} bytes; validate (incl clone) {:.1} us, clone alone {:.1} us => validate {:.0}/s; validate_json {:.1} us; issues {errs}",
            bytes.len(), el.as_secs_f64()*1e6/n as f64, clone_t.as_secs_f64()*1e6/n as f64,
            n as f64/(el - clone_t).as_secs_f64(), el3.as_secs_f64()*1e6/(n/5) as f64);
    }
}
