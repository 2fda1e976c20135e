use std::time::Instant;
fn main() {
    let p = loadgen_like();
    let n = 200_000;
    let t = Instant::now();
    let mut k = 0;
    for _ in 0..n {
        let v = fhir::parse_json(&p).unwrap();
        k += v.as_object().unwrap().len();
    }
    let a = t.elapsed();
    let v = fhir::parse_json(&p).unwrap();
    let t = Instant::now();
    for _ in 0..n {
        let w = v.clone();
        k += w.as_object().unwrap().len();
    }
    let b = t.elapsed();
    let t = Instant::now();
    for _ in 0..n {
        let w = serde_json::to_string(&v).unwrap();
        k += w.len();
    }
    let c = t.elapsed();
    println!(
        "len {} parse {:?} clone {:?} ser {:?} {k}",
        p.len(),
        a / n,
        b / n,
        c / n
    );
}
fn loadgen_like() -> String {
    std::fs::read_to_string(std::env::args().nth(1).unwrap()).unwrap()
}
