//! Property tests: generated messages (random delimiters, values full of delimiter and escape characters,
//! repetitions, components, subcomponents) survive encode and parse with the same structure and the same
//! decoded values; escaping is reversible.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use hl7::{Delimiters, Message, escape, unescape};
use proptest::prelude::*;

const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

fn delimiters() -> impl Strategy<Value = Delimiters> {
    let pool: Vec<char> = PUNCTUATION.chars().collect();
    proptest::sample::subsequence(pool, 5)
        .prop_shuffle()
        .prop_map(|c| Delimiters {
            field: c[0],
            component: c[1],
            repetition: c[2],
            escape: c[3],
            subcomponent: c[4],
        })
}

/// Text that often holds delimiters, escape characters, escape-like sequences, newlines and non-ASCII.
fn value() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        4 => proptest::sample::select(PUNCTUATION.chars().collect::<Vec<_>>()).prop_map(String::from),
        4 => "[a-zA-Z0-9 ]{1,4}",
        1 => Just("\n".to_string()),
        1 => proptest::sample::select(vec!["é", "ß", "€", "😀", "’", "Ł", "\t"]).prop_map(String::from),
        1 => proptest::sample::select(vec!["\\H\\", "\\X41\\", "\\.br\\", "\\E\\", "\\Zx\\", "#"]).prop_map(String::from),
    ];
    proptest::collection::vec(pieces, 0..5).prop_map(|v| v.concat())
}

type Field = Vec<Vec<Vec<String>>>;

fn field() -> impl Strategy<Value = Field> {
    proptest::collection::vec(
        proptest::collection::vec(proptest::collection::vec(value(), 1..3), 1..4),
        1..3,
    )
}

fn segment() -> impl Strategy<Value = (String, Vec<Field>)> {
    (
        "[A-Z][A-Z0-9]{2}".prop_filter("not MSH", |n| n != "MSH"),
        proptest::collection::vec(field(), 0..5),
    )
}

/// Delimiters, MSH-3.. values, and the other segments.
type Generated = (Delimiters, Vec<String>, Vec<(String, Vec<Field>)>);

fn message() -> impl Strategy<Value = Generated> {
    (
        delimiters(),
        proptest::collection::vec(value(), 0..10),
        proptest::collection::vec(segment(), 0..6),
    )
}

/// Every leaf of a generated segment with its terser path and the value a reader must see.
fn leaves(name: &str, seq: usize, fields: &[Field]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for (f, reps) in fields.iter().enumerate() {
        for (r, comps) in reps.iter().enumerate() {
            for (c, subs) in comps.iter().enumerate() {
                for (s, v) in subs.iter().enumerate() {
                    let path = format!("{name}({seq})-{}({}).{}.{}", f + 1, r + 1, c + 1, s + 1);
                    out.push((path, (!v.is_empty()).then(|| v.clone())));
                }
            }
        }
    }
    out
}

fn counter(counts: &mut Vec<(String, usize)>, name: &str) -> usize {
    match counts.iter_mut().find(|(n, _)| n == name) {
        Some((_, c)) => {
            *c += 1;
            *c
        }
        None => {
            counts.push((name.to_string(), 1));
            1
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Built with the API (values escaped by `set`), encoded, parsed back: same message, same decoded values.
    #[test]
    fn built_messages_round_trip((d, msh_values, segments) in message()) {
        let mut m = Message::with_delimiters(d).unwrap();
        let mut expected = Vec::new();
        for (i, v) in msh_values.iter().enumerate() {
            let path = format!("MSH-{}", i + 3);
            m.set(&path, v).unwrap();
            expected.push((format!("{path}(1).1.1"), (!v.is_empty()).then(|| v.clone())));
        }
        for (name, fields) in &segments {
            let seq = m.push_segment(name).unwrap();
            for (path, v) in leaves(name, seq, fields) {
                m.set(&path, v.as_deref().unwrap_or_default()).unwrap();
                expected.push((path, v));
            }
        }
        let text = m.encode();
        let back = Message::parse_str(&text).unwrap();
        prop_assert_eq!(&back, &m);
        prop_assert_eq!(Message::parse(&m.encode_bytes()).unwrap(), m.clone());
        prop_assert_eq!(back.encode(), text);
        prop_assert_eq!(back.segments().len(), 1 + segments.len());
        for (s, (name, _)) in back.segments().iter().skip(1).zip(&segments) {
            prop_assert_eq!(s.name(), name.as_str());
        }
        for (path, v) in &expected {
            prop_assert_eq!(&back.get(path), v, "{}", path);
        }
        prop_assert_eq!(back.delimiters(), &d);
    }

    /// Written by hand (the test's own encoder, any line endings), parsed: every decoded value comes back
    /// through `get` and `repetitions`, and the encoding is the canonical text.
    #[test]
    fn hand_written_messages_parse((d, msh_values, segments) in message(), endings in proptest::collection::vec(0..3usize, 8)) {
        let join = |items: Vec<String>, sep: char| items.join(&sep.to_string());
        let enc_field = |f: &Field| {
            join(
                f.iter()
                    .map(|rep| join(rep.iter().map(|comp| join(comp.iter().map(|v| escape(v, &d)).collect(), d.subcomponent)).collect(), d.component))
                    .collect(),
                d.repetition,
            )
        };
        let mut lines = vec![format!(
            "MSH{}{}{}",
            d.field,
            d.encoding_characters(),
            msh_values.iter().map(|v| format!("{}{}", d.field, escape(v, &d))).collect::<String>()
        )];
        for (name, fields) in &segments {
            lines.push(format!("{name}{}", fields.iter().map(|f| format!("{}{}", d.field, enc_field(f))).collect::<String>()));
        }
        let canonical: String = lines.iter().map(|l| format!("{l}\r")).collect();
        let mut wire = String::new();
        for (i, l) in lines.iter().enumerate() {
            wire.push_str(l);
            wire.push_str(["\r", "\n", "\r\n"][endings.get(i % endings.len()).copied().unwrap_or(0)]);
        }
        let m = Message::parse(wire.as_bytes()).unwrap();
        prop_assert_eq!(m.encode(), canonical);
        let mut counts = Vec::new();
        for (i, (name, fields)) in segments.iter().enumerate() {
            let seq = counter(&mut counts, name);
            let seg = &m.segments()[i + 1];
            prop_assert_eq!(seg.field_count(), fields.len());
            for (path, v) in leaves(name, seq, fields) {
                prop_assert_eq!(&m.get(&path), &v, "{}", path);
            }
            for (f, reps) in fields.iter().enumerate() {
                let decoded = seg.repetitions(f + 1);
                for (r, comps) in reps.iter().enumerate() {
                    for (c, subs) in comps.iter().enumerate() {
                        for (s, v) in subs.iter().enumerate() {
                            let got = decoded.get(r).and_then(|x| x.subcomponent(c + 1, s + 1));
                            prop_assert_eq!(got, (!v.is_empty()).then(|| v.clone()));
                        }
                    }
                }
            }
        }
        prop_assert_eq!(Message::parse_str(&m.encode()).unwrap(), m);
    }

    /// Escaping is reversible for text without CR, and escaped text never holds a delimiter or line break.
    #[test]
    fn escape_is_reversible(d in delimiters(), text in value()) {
        let raw = escape(&text, &d);
        prop_assert!(!raw.contains([d.field, d.component, d.repetition, d.subcomponent, '\r', '\n']));
        prop_assert_eq!(unescape(&raw, &d), text);
    }
}
