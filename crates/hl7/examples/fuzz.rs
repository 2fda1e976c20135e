//! A mutation fuzzer on stable Rust for the two entry points that take outside bytes: `Message::parse` and the
//! MLLP decoder.
//!
//! `cargo run --release -p hl7 --example fuzz -- --target parse|mllp --seconds N [--seed S]`
//!
//! Seeds are the crate's fixtures and, when present, the shared corpus beside the repository. Each execution
//! mutates a seed or an earlier interesting input (bit flips, byte changes, inserts of delimiter, escape, CR,
//! 0x0B and 0x1C bytes and tokens, deletions, duplications, splices between inputs, truncation) and runs the
//! target under `catch_unwind`. Beyond panics, the targets check the crate's promises: for `parse`, that
//! `parse(encode(parse(m)))` equals `parse(m)` and that ACKs and rejects parse; for `mllp`, that the buffered
//! bytes stay under `max_size` plus one read and that the frames do not depend on how the input was split.
//! Failing inputs are written to `target/fuzz-crashes/`. At the end it prints executions per second and the
//! number of distinct outcomes seen.

#![allow(
    clippy::panic,
    clippy::expect_used,
    reason = "the fuzz targets fail by panicking, which is caught"
)]

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hl7::mllp::{Decoder, FrameError, frame};
use hl7::{AckCode, AckError, ErrorCode, Message, ack, reject_unparseable};

static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

/// splitmix64: small, fast, good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when n is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        items.get(self.below(items.len()))
    }
}

const BYTES: &[u8] = b"|^~\\&#\r\n\x0b\x1c.XZHN0123456789ABCDEF \x00\xff\xc3\xa9";
const TOKENS: &[&[u8]] = &[
    b"\\X41\\",
    b"\\XC3A9\\",
    b"\\XE9\\",
    b"\\.br\\",
    b"\\E\\",
    b"\\F\\",
    b"\\H\\",
    b"\\Zabc\\",
    b"\\X4\\",
    b"MSH|^~\\&|",
    b"MSH#*!$%#",
    b"\rPID|1||9449305552^^^NHS^NH",
    b"||||||||8859/1",
    b"||||||||UNICODE UTF-8",
    b"^^^&&&~~~",
    b"\r\n",
    b"\x1c\r\x0b",
    b"\xef\xbb\xbf",
];

fn mutate(rng: &mut Rng, input: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                if let Some(b) = data.get_mut(i) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 if len > 0 => {
                let i = rng.below(len);
                let v = rng.next() as u8;
                if let Some(b) = data.get_mut(i) {
                    *b = v;
                }
            }
            2 => {
                let b = rng.pick(BYTES).copied().unwrap_or(b'|');
                data.insert(rng.below(len + 1), b);
            }
            3 => {
                let tok = rng.pick(TOKENS).copied().unwrap_or(b"|");
                let at = rng.below(len + 1);
                data.splice(at..at, tok.iter().copied());
            }
            4 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(16)).min(len);
                data.drain(a..b);
            }
            5 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                let chunk: Vec<u8> = data.get(a..b).unwrap_or_default().to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            6 => {
                if let Some(other) = rng.pick(pool) {
                    let cut = rng.below(len + 1);
                    let from = rng.below(other.len() + 1);
                    data.truncate(cut);
                    data.extend_from_slice(other.get(from..).unwrap_or_default());
                }
            }
            7 if len > 0 => data.truncate(rng.below(len)),
            8 if len > 0 => {
                // Swap one delimiter-like byte for another everywhere (changes the structure wholesale).
                let from = rng.pick(b"|^~\\&").copied().unwrap_or(b'|');
                let to = rng.pick(BYTES).copied().unwrap_or(b'#');
                for b in data.iter_mut() {
                    if *b == from {
                        *b = to;
                    }
                }
            }
            _ => {
                let b = rng.pick(BYTES).copied().unwrap_or(b'\r');
                let i = rng.below(len + 1);
                if i < len {
                    if let Some(x) = data.get_mut(i) {
                        *x = b;
                    }
                } else {
                    data.push(b);
                }
            }
        }
    }
    data.truncate(64 * 1024);
    data
}

/// The text before the first quote and after the last one (quoted parts hold the offending value), digits
/// replaced by `#`: outcomes that differ only by a value, a position or a count group together.
fn shape(s: &str) -> String {
    let pieces: Vec<&str> = s.split(['"', '\'']).collect();
    let kept = match (pieces.first(), pieces.last()) {
        (Some(first), Some(last)) if pieces.len() > 1 => format!("{first}..{last}"),
        _ => s.to_string(),
    };
    kept.chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .take(80)
        .collect()
}

fn target_parse(data: &[u8]) -> String {
    match Message::parse(data) {
        Ok(m) => {
            let again = Message::parse_str(&m.encode()).expect("encode(parse(m)) parses");
            assert_eq!(again, m, "parse(encode(parse(m))) != parse(m)");
            assert_eq!(
                Message::parse(&m.encode_bytes()).expect("encode_bytes parses"),
                m
            );
            for path in ["MSH-9.2", "MSH-10", "PID-3(2).4.2", "PID-5", "NTE-3"] {
                let _ = m.get(path);
            }
            let mut leaves = 0usize;
            for s in m.segments() {
                for n in 1..=s.field_count() {
                    for f in s.repetitions(n) {
                        leaves += f.components().len();
                    }
                }
            }
            let e = AckError::new(ErrorCode::DataType, "fuzz");
            let a = ack(&m, AckCode::AE, "F1", "20260101", Some(&e));
            assert_eq!(Message::parse(&a.encode_bytes()).expect("ACK parses"), a);
            format!(
                "ok segs={} leaves>{} charset={:?}",
                m.segments().len().min(8),
                leaves.min(50) / 10 * 10,
                m.charset()
            )
        }
        Err(e) => {
            let r = reject_unparseable(data, "F2", "20260101", &e);
            let a = Message::parse_str(&r).expect("reject parses");
            assert_eq!(a.get("MSA-1").as_deref(), Some("AR"));
            format!("err {} {}", e.code.code(), shape(&e.message))
        }
    }
}

type Decoded = (Vec<Result<Vec<u8>, FrameError>>, u64, u64);

fn decode(data: &[u8], max: usize, sizes: &[usize]) -> Decoded {
    let mut d = Decoder::new(max);
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes
            .get(i % sizes.len().max(1))
            .copied()
            .unwrap_or(1)
            .clamp(1, rest.len());
        let (piece, tail) = rest.split_at(n);
        d.feed(piece);
        assert!(
            d.frame_capacity() <= max,
            "frame capacity {} above max {max}",
            d.frame_capacity()
        );
        assert!(
            d.buffered() <= max + n,
            "buffered {} above max {max} + read {n}",
            d.buffered()
        );
        out.extend(std::iter::from_fn(|| d.next_frame()));
        rest = tail;
        i += 1;
    }
    (out, d.skipped_bytes(), d.discarded_bytes())
}

fn target_mllp(data: &[u8]) -> String {
    // The first two bytes choose the limit and the read sizes; the rest is the stream.
    let max = usize::from(data.first().copied().unwrap_or(0)) * 8;
    let step = usize::from(data.get(1).copied().unwrap_or(1)).max(1);
    let stream = data.get(2..).unwrap_or_default();
    let sizes = [step, 1 + step / 3, 2 * step + 1, 1];
    let whole = decode(stream, max, &[stream.len().max(1)]);
    let split = decode(stream, max, &sizes);
    assert_eq!(split, whole, "frames depend on how the input was split");
    let ok = whole.0.iter().filter(|r| r.is_ok()).count();
    let large = whole
        .0
        .iter()
        .filter(|r| matches!(r, Err(FrameError::TooLarge { .. })))
        .count();
    let cut = whole
        .0
        .iter()
        .filter(|r| matches!(r, Err(FrameError::Unterminated { .. })))
        .count();
    let parsed = whole
        .0
        .iter()
        .flatten()
        .filter(|f| Message::parse(f).is_ok())
        .count();
    format!(
        "ok={} large={} cut={} parsed={} skipped={} discarded={}",
        ok.min(4),
        large.min(3),
        cut.min(3),
        parsed.min(3),
        whole.1 > 0,
        whole.2 > 0
    )
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

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    collect(&root.join("tests/fixtures"), &mut files);
    collect(&root.join("../../../shared/corpus/hl7v2"), &mut files);
    files.sort();
    let messages: Vec<Vec<u8>> = files.iter().filter_map(|f| std::fs::read(f).ok()).collect();
    if target == "parse" {
        return messages;
    }
    // MLLP seeds: a limit byte, a read-size byte, then framed messages with some noise between them.
    let mut out = Vec::new();
    for (i, chunk) in messages.chunks(3).enumerate() {
        let mut s = vec![(64 + i * 37 % 192) as u8, (1 + i * 13 % 200) as u8];
        for m in chunk {
            s.extend(b"\r\n");
            s.extend(frame(m));
        }
        out.push(s);
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let target = arg("--target").unwrap_or_else(|| "parse".into());
    let seconds: u64 = arg("--seconds").and_then(|s| s.parse().ok()).unwrap_or(10);
    let seed: u64 = arg("--seed")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00C0_FFEE);
    let run: fn(&[u8]) -> String = match target.as_str() {
        "parse" => target_parse,
        "mllp" => target_mllp,
        other => {
            eprintln!("unknown --target {other:?} (parse or mllp)");
            std::process::exit(2);
        }
    };
    let crash_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-crashes");
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = info.to_string();
        }
    }));

    let mut pool = seeds(&target);
    let seed_count = pool.len();
    if pool.is_empty() {
        pool.push(
            b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.4\rPID|1||9449305552^^^NHS^NH\r".to_vec(),
        );
    }
    let mut rng = Rng(seed);
    let mut outcomes: HashSet<String> = HashSet::new();
    let mut crashes = 0u64;
    let mut execs = 0u64;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        for _ in 0..64 {
            let base = rng.pick(&pool).cloned().unwrap_or_default();
            let input = mutate(&mut rng, &base, &pool);
            execs += 1;
            match catch_unwind(AssertUnwindSafe(|| run(&input))) {
                Ok(outcome) => {
                    if outcomes.insert(outcome) && pool.len() < 4096 {
                        pool.push(input);
                    }
                }
                Err(_) => {
                    crashes += 1;
                    let msg = LAST_PANIC.lock().map(|m| m.clone()).unwrap_or_default();
                    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                    });
                    let path = crash_dir.join(format!("{target}-{hash:016x}.bin"));
                    let _ = std::fs::create_dir_all(&crash_dir);
                    let _ = std::fs::write(&path, &input);
                    eprintln!(
                        "CRASH {} -> {}",
                        msg.lines().next().unwrap_or_default(),
                        path.display()
                    );
                    outcomes.insert(format!("panic {}", shape(&msg)));
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{{\"target\":\"{target}\",\"seconds\":{elapsed:.1},\"executions\":{execs},\"execs_per_s\":{:.0},\"unique_outcomes\":{},\"seeds\":{seed_count},\"pool\":{},\"crashes\":{crashes}}}",
        execs as f64 / elapsed.max(1e-9),
        outcomes.len(),
        pool.len()
    );
    if crashes > 0 {
        std::process::exit(1);
    }
}
