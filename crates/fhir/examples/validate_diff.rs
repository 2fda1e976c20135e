//! Differential harness: validates many mutated resources (seeded from the golden inputs, the shared corpus and
//! any extra files given) and prints one line per case with a hash of everything observable (issues in order,
//! the returned/normalised resource as text). Run it before and after a change to the validator or the parser
//! and `diff` the outputs: any difference is a behaviour change.
//!
//! Usage: `cargo run --release -p fhir --example validate_diff -- CASES [EXTRA.json...] > out.txt`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::collapsible_if,
    clippy::collapsible_match,
    reason = "test tool"
)]

use fhir::{ResourceType, operation_outcome, validate, validate_json};
use serde_json::{Value, json};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in read.filter_map(Result::ok) {
        let p = entry.path();
        if p.is_dir() {
            json_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "json")
            && !p.to_string_lossy().ends_with(".outcome.json")
        {
            out.push(p);
        }
    }
}

const KEYS: &[&str] = &[
    "resourceType",
    "id",
    "meta",
    "versionId",
    "lastUpdated",
    "security",
    "profile",
    "text",
    "status",
    "div",
    "contained",
    "extension",
    "modifierExtension",
    "url",
    "valueString",
    "valueDecimal",
    "valueCodeableConcept",
    "valueIdentifier",
    "valueReference",
    "valuePeriod",
    "valueQuantity",
    "valueBoolean",
    "valueInteger",
    "valueCode",
    "valueDateTime",
    "valueFoo",
    "coding",
    "system",
    "code",
    "display",
    "value",
    "identifier",
    "name",
    "given",
    "_given",
    "family",
    "_family",
    "birthDate",
    "_birthDate",
    "gender",
    "deceasedBoolean",
    "deceasedDateTime",
    "telecom",
    "address",
    "contact",
    "link",
    "other",
    "type",
    "reference",
    "start",
    "end",
    "period",
    "participant",
    "actor",
    "cancelationReason",
    "schedule",
    "use",
    "rank",
    "line",
    "city",
    "postalCode",
    "country",
    "active",
    "_active",
    "generalPractitioner",
    "managingOrganization",
    "communication",
    "language",
    "preferred",
    "multipleBirthInteger",
    "photo",
    "data",
    "contentType",
    "low",
    "high",
    "_system",
    "assigner",
    "_id",
    "a",
    "",
    "$serde_json::private::Number",
];

fn leaf(rng: &mut Rng) -> Value {
    let pool: Vec<Value> = vec![
        json!(""),
        json!(" "),
        json!("x"),
        json!("a  b"),
        json!(" a"),
        json!("2024-02-30"),
        json!("2024-02-29"),
        json!("1931-02-02"),
        json!("2024"),
        json!("2024-05-01T10:00:00Z"),
        json!("2024-05-01T10:00:00"),
        json!("2021-10-12T12:30:30+00:00"),
        json!("#a"),
        json!("#"),
        json!("#o1"),
        json!("https://fhir.nhs.uk/id/ods-site-code"),
        json!("https://fhir.nhs.uk/Id/ods-organisation-code"),
        json!("https://fhir.nhs.uk/Id/nhs-number"),
        json!("HTTPS://FHIR.NHS.UK/ID/NHS-NUMBER"),
        json!("9990000018"),
        json!("9990000019"),
        json!("9000000009"),
        json!("home"),
        json!("official"),
        json!("phone"),
        json!("male"),
        json!("booked"),
        json!("noshow"),
        json!("cancelled"),
        json!("free"),
        json!("urn:oid:1.2.3"),
        json!("urn:uuid:deb4c4b3-870b-4599-84df-5e54cef7afda"),
        json!("http://a b"),
        json!("<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"),
        json!("<div>x</div>"),
        json!(
            "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-NHSNumberVerificationStatus"
        ),
        json!("https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland"),
        json!("01"),
        json!("09"),
        json!("NI"),
        json!("Zoë"),
        json!("\u{1F600}"),
        json!("a\"b\\c\n"),
        json!(1),
        json!(-1),
        json!(0),
        json!(2147483648u64),
        json!(true),
        json!(false),
        Value::Null,
        json!([]),
        json!({}),
        json!([null]),
        json!({"url": "x"}),
        json!({"extension": []}),
        serde_json::from_str("1.50").unwrap(),
        serde_json::from_str("1e3").unwrap(),
        serde_json::from_str("-0").unwrap(),
        serde_json::from_str("123456789012345678901234567890").unwrap(),
        json!({"reference": "#a"}),
        json!({"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}),
        json!({"start": "2024-01-02", "end": "2024-01-01"}),
        json!({"resourceType": "Patient", "id": "a"}),
        json!({"resourceType": "Organization", "id": "o1", "name": "X"}),
        json!({"resourceType": "Observation"}),
    ];
    pool[rng.below(pool.len())].clone()
}

/// A random node reachable from `v` (as a path of keys/indexes).
fn random_path(rng: &mut Rng, v: &Value) -> Vec<Result<String, usize>> {
    let mut path = Vec::new();
    let mut cur = v;
    loop {
        if rng.chance(30) {
            return path;
        }
        match cur {
            Value::Object(m) if !m.is_empty() => {
                let i = rng.below(m.len());
                let (k, next) = m.iter().nth(i).unwrap();
                path.push(Ok(k.clone()));
                cur = next;
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len());
                path.push(Err(i));
                cur = &a[i];
            }
            _ => return path,
        }
    }
}

fn at_mut<'v>(v: &'v mut Value, path: &[Result<String, usize>]) -> &'v mut Value {
    let mut cur = v;
    for seg in path {
        cur = match seg {
            Ok(k) => cur.get_mut(k.as_str()).unwrap(),
            Err(i) => cur.get_mut(*i).unwrap(),
        };
    }
    cur
}

fn mutate(rng: &mut Rng, v: &mut Value) {
    let donor_path = random_path(rng, v);
    let donor = at_mut(v, &donor_path).clone();
    let path = random_path(rng, v);
    let node = at_mut(v, &path);
    match rng.below(9) {
        0 | 1 => *node = leaf(rng),
        2 => match node {
            Value::Object(m) if !m.is_empty() => {
                let i = rng.below(m.len());
                let k = m.keys().nth(i).unwrap().clone();
                m.shift_remove(&k);
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len());
                a.remove(i);
            }
            _ => *node = leaf(rng),
        },
        3 => {
            if let Value::Object(m) = node {
                if !m.is_empty() {
                    let i = rng.below(m.len());
                    let k = m.keys().nth(i).unwrap().clone();
                    let val = m.shift_remove(&k).unwrap();
                    let nk = if rng.chance(50) {
                        format!("_{k}")
                    } else {
                        KEYS[rng.below(KEYS.len())].to_string()
                    };
                    m.insert(nk, val);
                }
            }
        }
        4 => *node = json!([node.take()]),
        5 => {
            if let Value::Array(a) = node {
                if let Some(first) = a.first().cloned() {
                    *node = first;
                }
            }
        }
        6 => {
            if let Value::Array(a) = node {
                if let Some(x) = a.first().cloned() {
                    a.push(x);
                }
            } else if let Value::Object(m) = node {
                m.insert(KEYS[rng.below(KEYS.len())].to_string(), leaf(rng));
            }
        }
        7 => *node = donor,
        _ => {
            if let Value::Object(m) = node {
                m.insert(KEYS[rng.below(KEYS.len())].to_string(), donor);
            }
        }
    }
}

fn text_mutate(rng: &mut Rng, text: &mut Vec<u8>) {
    match rng.below(10) {
        0 => {
            // random byte edit
            if !text.is_empty() {
                let i = rng.below(text.len());
                let b = [
                    b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b' ', b'0', b'e', b'-', 0xC3,
                    0x80, 0, b'u',
                ][rng.below(16)];
                match rng.below(3) {
                    0 => text[i] = b,
                    1 => text.insert(i, b),
                    _ => {
                        text.remove(i);
                    }
                }
            }
        }
        1 | 2 => {
            // escape some letters as \u00XX (valid inside strings)
            let mut out = Vec::with_capacity(text.len() + 16);
            for &b in text.iter() {
                if b.is_ascii_lowercase() && rng.chance(3) {
                    out.extend_from_slice(format!("\\u{:04x}", b).as_bytes());
                } else if b == b'/' && rng.chance(20) {
                    out.extend_from_slice(b"\\/");
                } else {
                    out.push(b);
                }
            }
            *text = out;
        }
        3 => {
            // duplicate key at the start of an object
            let starts: Vec<usize> = text
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'{')
                .map(|(i, _)| i)
                .collect();
            if !starts.is_empty() {
                let i = starts[rng.below(starts.len())];
                let dup: &[u8] = [
                    &b"\"id\":\"x\","[..],
                    b"\"resourceType\":\"Patient\",",
                    b"\"url\":1,",
                    b"\"a\":[],",
                ][rng.below(4)];
                for (j, b) in dup.iter().enumerate() {
                    text.insert(i + 1 + j, *b);
                }
            }
        }
        4 => {
            // whitespace everywhere
            let mut out = Vec::with_capacity(text.len() * 2);
            for &b in text.iter() {
                out.push(b);
                if matches!(b, b',' | b':' | b'{' | b'[') {
                    out.extend_from_slice([&b" "[..], b"\n  ", b"\t", b"\r\n"][rng.below(4)]);
                }
            }
            *text = out;
        }
        5 => {
            let extra: &[u8] = [&b"\xEF\xBB\xBF"[..], b" ", b"\n"][rng.below(3)];
            let mut out = extra.to_vec();
            out.extend_from_slice(text);
            *text = out;
        }
        6 => {
            // surrogate pairs and odd escapes
            let pos = text.iter().position(|b| *b == b'"').map(|p| p + 1);
            if let Some(p) = pos {
                let ins: &[u8] = [
                    &b"\\ud83d\\ude00"[..],
                    b"\\ud83d",
                    b"\\ude00",
                    b"\\u0000",
                    b"\\b\\f\\n\\r\\t",
                    b"\\x",
                    b"\\u12",
                    b"\\uD83D\\uDE00",
                    b"\xF0\x9F\x98\x80",
                    b"\xFF",
                    b"\x1F",
                ][rng.below(11)];
                for (j, b) in ins.iter().enumerate() {
                    text.insert(p + j, *b);
                }
            }
        }
        _ => {}
    }
}

fn observe(h: &mut DefaultHasher, bytes: &[u8], out: &mut String) {
    let r = validate_json(bytes, None);
    match &r {
        Ok(v) => {
            out.push_str("ok ");
            out.push_str(v.rtype.as_str());
            serde_json::to_string(&operation_outcome(&v.warnings))
                .unwrap()
                .hash(h);
            serde_json::to_string(&v.resource).unwrap().hash(h);
        }
        Err(issues) => {
            out.push_str("err ");
            out.push_str(&issues.len().to_string());
            serde_json::to_string(&operation_outcome(issues))
                .unwrap()
                .hash(h);
        }
    }
    for t in [ResourceType::Patient, ResourceType::Appointment] {
        match validate_json(bytes, Some(t)) {
            Ok(v) => serde_json::to_string(&operation_outcome(&v.warnings))
                .unwrap()
                .hash(h),
            Err(issues) => serde_json::to_string(&operation_outcome(&issues))
                .unwrap()
                .hash(h),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cases: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let mut files = Vec::new();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    json_files(&dir.join("tests/golden"), &mut files);
    json_files(&dir.join("../../../shared/corpus/fhir"), &mut files);
    files.sort();
    for extra in args.iter().skip(1) {
        files.push(PathBuf::from(extra));
    }
    let seeds: Vec<Value> = files
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .filter_map(|b| serde_json::from_slice(b.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&b)).ok())
        .collect();
    eprintln!("{} seed documents", seeds.len());
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for case in 0..cases {
        let mut v = seeds[case % seeds.len()].clone();
        let n = if case < seeds.len() {
            0
        } else {
            1 + rng.below(4)
        };
        for _ in 0..n {
            mutate(&mut rng, &mut v);
        }
        let mut h = DefaultHasher::new();
        let mut line = format!("{case} ");
        // Direct validate on the Value, for every type (normalised value included).
        for t in [
            ResourceType::Patient,
            ResourceType::Organization,
            ResourceType::Appointment,
        ] {
            let mut w = v.clone();
            let issues = validate(t, &mut w);
            serde_json::to_string(&operation_outcome(&issues))
                .unwrap()
                .hash(&mut h);
            serde_json::to_string(&w).unwrap().hash(&mut h);
        }
        let mut text = if rng.chance(50) {
            serde_json::to_vec(&v).unwrap()
        } else {
            serde_json::to_vec_pretty(&v).unwrap()
        };
        if case >= seeds.len() && rng.chance(40) {
            text_mutate(&mut rng, &mut text);
        }
        observe(&mut h, &text, &mut line);
        line.push_str(&format!(" {:016x}", h.finish()));
        println!("{line}");
    }
}
