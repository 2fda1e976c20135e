//! HL7 v2 for Carebridge: parsing, encoding, escapes, acknowledgements and MLLP framing.
//!
//! Why it exists: trust PAS and scheduling systems send ADT (A01/A04/A08/A28/A31/A40) and SIU
//! (S12/S13/S14/S15/S17/S26) messages over MLLP, and expect an ACK for each; the hub also sends A28/A31 and SIU
//! messages out. This crate is the pure part of that: bytes to a [`Message`] and back, terser-style reads
//! ([`Message::get`]) and writes ([`Message::set`], [`MessageBuilder`]), escape sequences ([`escape`],
//! [`unescape`]), ACKs ([`ack`], [`reject_unparseable`]) and an incremental, bounded MLLP decoder
//! ([`mllp::Decoder`]). The listener, the mapping to FHIR and the CLI live in other crates.
//!
//! The model keeps every segment's raw (escaped) text, so `encode(parse(m)) == m` byte for byte for a message
//! in canonical form (CR after every segment, UTF-8), and `parse(encode(parse(m)))` equals `parse(m)` for every
//! message that parses. Values are split and unescaped only when read.
//!
//! Accepted input: HL7 v2.3 to v2.8; any delimiters declared in MSH-1/MSH-2 (printable ASCII punctuation, the
//! v2.7 truncation character tolerated); segments ended by CR, LF or CRLF, mixed; blank lines and a leading
//! UTF-8 byte-order mark skipped; MSH-18 empty (UTF-8), `ASCII`, `8859/1`, `UNICODE UTF-8` (and the ITK
//! spelling `UNICODE`). Batches (FHS/BHS, or a second MSH) are refused.
//!
//! Invariants: no IO, no async, no clock (timestamps and control ids are passed in), no dependencies, and
//! never panics on any input: outside bytes only ever produce a [`ParseError`] or a [`mllp::FrameError`].

mod ack;
mod builder;
mod delimiters;
mod error;
mod escape;
mod message;
pub mod mllp;
mod path;

pub use ack::{AckCode, AckError, AckMode, ack, ack_mode, reject_unparseable};
pub use builder::{Header, MessageBuilder};
pub use delimiters::{Charset, Delimiters};
pub use error::{ErrorCode, ParseError, PathError};
pub use escape::{escape, unescape, unescape_with};
pub use message::{Field, Message, Segment};
