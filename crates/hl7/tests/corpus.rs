//! Every public sample message in the shared corpus (`<workspace>/../shared/corpus/hl7v2`, outside the
//! repository; skipped with a note when absent): each parses, keeps its header fields, round-trips, and can be
//! acknowledged. The corpus mixes LF and CR segment ends, byte-order marks and versions 2.3 to 2.8.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};

use hl7::{AckCode, Message, ack};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/hl7v2")
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "hl7") {
            out.push(p);
        }
    }
}

/// The canonical form of a message file: BOM dropped, CR after every non-blank line.
fn canonical(bytes: &[u8]) -> String {
    let text =
        String::from_utf8_lossy(bytes.strip_prefix(&[0xEF, 0xBB, 0xBF][..]).unwrap_or(bytes))
            .into_owned();
    text.split(['\r', '\n'])
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("{l}\r"))
        .collect()
}

#[test]
fn corpus_messages_parse_and_round_trip() {
    let dir = corpus_dir();
    if !dir.is_dir() {
        println!(
            "SKIP corpus_messages_parse_and_round_trip: {} not found (the shared corpus lives beside the repository)",
            dir.display()
        );
        return;
    }
    let mut files = Vec::new();
    collect(&dir, &mut files);
    files.sort();
    assert!(!files.is_empty(), "no .hl7 files under {}", dir.display());
    let mut errors = Vec::new();
    for f in &files {
        let name = f.strip_prefix(&dir).unwrap_or(f).display().to_string();
        let bytes = std::fs::read(f).unwrap();
        let m = match Message::parse(&bytes) {
            Ok(m) => m,
            Err(e) => {
                errors.push(format!("{name}: {e}"));
                continue;
            }
        };
        // Canonical text is reproduced byte for byte, and re-parsing the encoding gives the same message.
        assert_eq!(m.encode(), canonical(&bytes), "{name}");
        assert_eq!(Message::parse_str(&m.encode()).unwrap(), m, "{name}");
        assert_eq!(Message::parse(&m.encode_bytes()).unwrap(), m, "{name}");
        // Header fields every message of the corpus has.
        let (code, trigger, _) = m.message_type();
        assert!(
            matches!(code.as_deref(), Some("ADT" | "SIU")),
            "{name}: {code:?}"
        );
        assert!(trigger.is_some(), "{name}");
        assert!(m.control_id().is_some(), "{name}");
        assert!(m.version().is_some_and(|v| v.starts_with("2.")), "{name}");
        assert!(
            m.segment("PID").is_some_and(|p| p.field_count() >= 3),
            "{name}"
        );
        // Every decoded value can be read without trouble, and the ACK echoes the control id.
        for s in m.segments() {
            for n in 1..=s.field_count() {
                let _ = s.repetitions(n);
            }
        }
        let a = ack(&m, AckCode::AA, "CORPUSACK", "20260101000000", None);
        assert_eq!(Message::parse(&a.encode_bytes()).unwrap(), a, "{name}");
        assert_eq!(a.get("MSA-2"), m.control_id(), "{name}");
        println!(
            "ok {name}: {} segments, {:?}",
            m.segments().len(),
            m.message_type()
        );
    }
    println!(
        "{} corpus messages, {} structural errors",
        files.len(),
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "structural errors:\n{}",
        errors.join("\n")
    );
}
