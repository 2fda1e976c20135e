//! Parse throughput, comparable with `bench/hl7_parse_peers.py` (python-hl7 and hl7apy doing the same work).
//!
//! `cargo run --release -p hl7 --example parse_bench -- DIR_OR_FILES... [--iterations N]`
//!
//! Loads every `.hl7` file given (directories are searched recursively), normalises each to the canonical
//! form both peers need (byte-order mark dropped, CR after every non-blank line), then N times parses every
//! message and reads MSH-9, MSH-10, PID-3 and PID-5 (the whole raw field, and its first component decoded).
//! Prints one JSON line: `{"impl":"carebridge-hl7","messages":..,"bytes":..,"seconds":..,"msgs_per_s":..}`.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hl7::Message;

fn collect(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        let mut children: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        children.sort();
        for c in children {
            if c.is_dir() || c.extension().is_some_and(|x| x == "hl7") {
                collect(&c, out);
            }
        }
    } else if path.is_file() {
        out.push(path.to_path_buf());
    }
}

fn canonical(bytes: &[u8]) -> Vec<u8> {
    let bytes = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF][..]).unwrap_or(bytes);
    let mut out = Vec::with_capacity(bytes.len() + 1);
    for line in bytes.split(|&b| b == b'\r' || b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        out.extend_from_slice(line);
        out.push(b'\r');
    }
    out
}

/// One unit of work: parse, then read the four fields.
fn work(msg: &[u8]) -> usize {
    let Ok(m) = Message::parse(msg) else { return 0 };
    let mut n = 0;
    for (seg, field) in [("MSH", 9), ("MSH", 10), ("PID", 3), ("PID", 5)] {
        if let Some(raw) = m.segment(seg).and_then(|s| s.raw_field(field)) {
            n += black_box(raw.to_string()).len();
        }
        if let Some(v) = m.get(&format!("{seg}-{field}")) {
            n += black_box(v).len();
        }
    }
    n
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut iterations: u64 = 2000;
    let mut paths = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--iterations" {
            iterations = it.next().and_then(|v| v.parse().ok()).unwrap_or(iterations);
        } else {
            paths.push(PathBuf::from(a));
        }
    }
    if paths.is_empty() {
        eprintln!("usage: parse_bench DIR_OR_FILES... [--iterations N]");
        std::process::exit(2);
    }
    let mut files = Vec::new();
    for p in &paths {
        collect(p, &mut files);
    }
    let messages: Vec<Vec<u8>> = files
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .map(|b| canonical(&b))
        .collect();
    let failed: Vec<&PathBuf> = files
        .iter()
        .zip(&messages)
        .filter(|(_, m)| Message::parse(m).is_err())
        .map(|(f, _)| f)
        .collect();
    if messages.is_empty() || !failed.is_empty() {
        eprintln!("no messages to parse, or some do not parse: {failed:?}");
        std::process::exit(1);
    }
    let bytes_per_pass: usize = messages.iter().map(Vec::len).sum();
    // Warm-up pass.
    let mut sink = 0usize;
    for m in &messages {
        sink += work(m);
    }
    let start = Instant::now();
    for _ in 0..iterations {
        for m in &messages {
            sink = sink.wrapping_add(work(black_box(m)));
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    black_box(sink);
    let count = messages.len() as u64 * iterations;
    println!(
        "{{\"impl\":\"carebridge-hl7\",\"messages\":{count},\"bytes\":{},\"seconds\":{seconds:.4},\"msgs_per_s\":{:.0}}}",
        bytes_per_pass as u64 * iterations,
        count as f64 / seconds.max(1e-9)
    );
}
