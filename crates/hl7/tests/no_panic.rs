//! Outside bytes never panic: the parser (and everything a parsed message offers) and the MLLP decoder take
//! arbitrary input, and the decoder's output and memory do not depend on how the input was split into reads.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use hl7::mllp::{Decoder, FrameError, frame};
use hl7::{AckCode, AckError, Message, ack, reject_unparseable};
use proptest::prelude::*;

/// Bytes biased towards what matters to the parser: delimiters, escapes, line ends, framing bytes, high bytes.
fn hl7ish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        3 => proptest::sample::select(b"|^~\\&#\r\nXF.brHN0123456789ABCDEFaMSHPIDZ".to_vec()),
        1 => proptest::sample::select(vec![0x0B, 0x1C, 0x00, 0xC3, 0xA9, 0xFF, 0xEF, 0xBB, 0xBF]),
        1 => any::<u8>(),
    ];
    proptest::collection::vec(byte, 0..400)
}

fn headers() -> impl Strategy<Value = Vec<u8>> {
    proptest::sample::select(vec![
        b"MSH|^~\\&|".to_vec(),
        b"MSH|^~\\&#|".to_vec(),
        b"\xEF\xBB\xBFMSH|^~\\&|".to_vec(),
        b"MSH#*!$%#".to_vec(),
        b"MSH|^~\\&|A|B|C|D|E||ADT^A01|1|P|2.4||||||8859/1\r".to_vec(),
        b"MSH|^~\\&|A|B|C|D|E||ADT^A01|1|P|2.4||||||ASCII\r".to_vec(),
        b"MSH|^~.&|A|".to_vec(),
        Vec::new(),
    ])
}

/// Everything a caller may do with a parsed message; also checks the round-trip property on it.
fn exercise(bytes: &[u8]) {
    match Message::parse(bytes) {
        Ok(m) => {
            let text = m.encode();
            let again = Message::parse_str(&text).expect("an encoded message parses");
            assert_eq!(again, m, "parse(encode(parse(m))) != parse(m)");
            assert_eq!(
                Message::parse(&m.encode_bytes()).expect("encoded bytes parse"),
                m
            );
            for path in [
                "MSH-1",
                "MSH-2",
                "MSH-9.2",
                "MSH-10",
                "PID-3(2).4.1",
                "PID-5",
                "ZZZ(3)-1",
                "PID-9999",
            ] {
                let _ = m.get(path);
            }
            let _ = (
                m.control_id(),
                m.message_type(),
                m.version(),
                m.sending_application(),
                m.sending_facility(),
            );
            for s in m.segments() {
                for n in 0..=s.field_count() + 1 {
                    let _ = s.raw_field(n);
                    for f in s.repetitions(n) {
                        let _ = (
                            f.components(),
                            f.component(1),
                            f.subcomponent(2, 2),
                            f.subcomponents(1),
                        );
                    }
                }
            }
            let e = AckError::new(hl7::ErrorCode::DataType, "x");
            let a = ack(&m, AckCode::AE, "C", "T", Some(&e));
            assert_eq!(Message::parse(&a.encode_bytes()).expect("an ACK parses"), a);
            let _ = hl7::ack_mode(&m);
        }
        Err(e) => {
            let text = reject_unparseable(bytes, "C", "T", &e);
            let a = Message::parse_str(&text).expect("a reject parses");
            assert_eq!(a.get("MSA-1").as_deref(), Some("AR"));
        }
    }
}

/// Feeds `wire` in pieces of the given sizes (cycled), draining after each, and checks the memory bound.
fn decode_in_pieces(
    wire: &[u8],
    max: usize,
    sizes: &[usize],
) -> (Vec<Result<Vec<u8>, FrameError>>, u64, u64) {
    let mut d = Decoder::new(max);
    let mut out = Vec::new();
    let mut rest = wire;
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
            "capacity {} > max {max}",
            d.frame_capacity()
        );
        assert!(
            d.buffered() <= max + n,
            "buffered {} > {max} + {n}",
            d.buffered()
        );
        out.extend(std::iter::from_fn(|| d.next_frame()));
        rest = tail;
        i += 1;
    }
    (out, d.skipped_bytes(), d.discarded_bytes())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        exercise(&bytes);
    }

    #[test]
    fn parse_never_panics_on_hl7ish_bytes(head in headers(), tail in hl7ish_bytes()) {
        exercise(&[head, tail].concat());
    }

    #[test]
    fn mllp_never_panics_and_is_split_invariant(
        wire in hl7ish_bytes(),
        max in 0usize..64,
        sizes in proptest::collection::vec(1usize..40, 1..6),
    ) {
        let whole = decode_in_pieces(&wire, max, &[wire.len().max(1)]);
        let split = decode_in_pieces(&wire, max, &sizes);
        let bytewise = decode_in_pieces(&wire, max, &[1]);
        prop_assert_eq!(&split, &whole);
        prop_assert_eq!(&bytewise, &whole);
        for f in whole.0.iter().flatten() {
            prop_assert!(f.len() <= max);
            prop_assert!(!f.contains(&0x0B) && !f.contains(&0x1C));
        }
    }

    #[test]
    fn framed_messages_come_back_exactly(
        msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>().prop_filter("no framing bytes", |b| *b != 0x0B && *b != 0x1C), 0..100), 0..6),
        noise in proptest::collection::vec(proptest::sample::select(b"\r\n x".to_vec()), 0..4),
        sizes in proptest::collection::vec(1usize..50, 1..4),
    ) {
        let mut wire = noise.clone();
        for m in &msgs {
            wire.extend(frame(m));
            wire.extend(&noise);
        }
        let (frames, _, discarded) = decode_in_pieces(&wire, 100, &sizes);
        let got: Vec<Vec<u8>> = frames.into_iter().map(|f| f.unwrap()).collect();
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(discarded, 0);
    }
}
