//! MLLP framing (`0x0B <message> 0x1C 0x0D`), the envelope HL7 v2 travels in over TCP. The decoder is
//! incremental and bounded: it takes whatever a socket read returned (part of a frame, several frames, noise
//! between frames) and never holds more than `max_size` bytes of an unfinished frame.
//!
//! ```
//! use hl7::mllp::{Decoder, frame};
//! let mut wire = frame(b"MSH|^~\\&|A\r");
//! wire.extend(frame(b"MSH|^~\\&|B\r"));
//! let mut dec = Decoder::new(1024 * 1024);
//! dec.feed(&wire[..5]);
//! assert!(dec.next_frame().is_none());
//! dec.feed(&wire[5..]);
//! assert_eq!(dec.next_frame(), Some(Ok(b"MSH|^~\\&|A\r".to_vec())));
//! assert_eq!(dec.next_frame(), Some(Ok(b"MSH|^~\\&|B\r".to_vec())));
//! assert_eq!(dec.next_frame(), None);
//! ```

use std::collections::VecDeque;
use std::fmt;

/// Start of a frame (VT).
pub const START_BLOCK: u8 = 0x0B;
/// End of a frame's content (FS).
pub const END_BLOCK: u8 = 0x1C;
/// Trailer after [`END_BLOCK`] (CR).
pub const CARRIAGE_RETURN: u8 = 0x0D;

/// Wraps a message in an MLLP frame.
pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 3);
    out.push(START_BLOCK);
    out.extend_from_slice(msg);
    out.push(END_BLOCK);
    out.push(CARRIAGE_RETURN);
    out
}

/// Why a frame was dropped. The decoder carries on with the next frame either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The frame's content grew past `max_size`; it was discarded up to its end byte (or the next start byte).
    TooLarge {
        /// The limit that was exceeded.
        max_size: usize,
    },
    /// A start byte arrived inside a frame (the sender restarted it): the unfinished frame was dropped.
    Unterminated {
        /// Bytes of the dropped frame.
        discarded: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { max_size } => {
                write!(f, "MLLP frame larger than {max_size} bytes")
            }
            FrameError::Unterminated { discarded } => {
                write!(
                    f,
                    "MLLP frame of {discarded} bytes interrupted by a new start block"
                )
            }
        }
    }
}

impl std::error::Error for FrameError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Outside a frame: skipping until a start byte.
    Seeking,
    /// Just after an end byte: a CR here is the trailer.
    AfterEnd,
    /// Inside a frame: collecting content.
    InFrame,
    /// Inside a frame that is too large: dropping until its end byte or the next start byte.
    Discarding,
}

/// Incremental MLLP decoder: [`Decoder::feed`] what the socket gave, then call [`Decoder::next_frame`] until
/// it returns `None`. Bytes outside frames are skipped and counted. A frame longer than `max_size` is reported
/// as [`FrameError::TooLarge`] and dropped up to its end byte; the decoder resynchronises at the next start
/// byte. An end byte not followed
/// by CR still ends the frame (liberal on input). Fed one read at a time and drained between reads, it never
/// holds more than `max_size` plus one read's bytes.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_size: usize,
    state: State,
    current: Vec<u8>,
    ready: VecDeque<Result<Vec<u8>, FrameError>>,
    skipped: u64,
    discarded: u64,
}

impl Decoder {
    /// A decoder accepting frames of at most `max_size` content bytes.
    pub fn new(max_size: usize) -> Decoder {
        Decoder {
            max_size,
            state: State::Seeking,
            current: Vec::new(),
            ready: VecDeque::new(),
            skipped: 0,
            discarded: 0,
        }
    }

    /// Takes the next bytes read from the connection.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            match self.state {
                State::AfterEnd => {
                    self.state = State::Seeking;
                    if rest.first() == Some(&CARRIAGE_RETURN) {
                        rest = rest.get(1..).unwrap_or_default();
                    }
                }
                State::Seeking => match rest.iter().position(|&b| b == START_BLOCK) {
                    Some(p) => {
                        self.skipped += p as u64;
                        self.start_frame();
                        rest = rest.get(p + 1..).unwrap_or_default();
                    }
                    None => {
                        self.skipped += rest.len() as u64;
                        rest = &[];
                    }
                },
                State::Discarding => match rest
                    .iter()
                    .position(|&b| b == START_BLOCK || b == END_BLOCK)
                {
                    Some(p) => {
                        self.discarded += p as u64;
                        if rest.get(p) == Some(&START_BLOCK) {
                            self.start_frame();
                        } else {
                            self.state = State::AfterEnd;
                        }
                        rest = rest.get(p + 1..).unwrap_or_default();
                    }
                    None => {
                        self.discarded += rest.len() as u64;
                        rest = &[];
                    }
                },
                State::InFrame => {
                    let stop = rest
                        .iter()
                        .position(|&b| b == START_BLOCK || b == END_BLOCK);
                    let content = stop.map_or(rest, |p| rest.get(..p).unwrap_or_default());
                    if !self.append(content) {
                        self.discarded += (self.current.len() + content.len()) as u64;
                        self.current = Vec::new();
                        self.ready.push_back(Err(FrameError::TooLarge {
                            max_size: self.max_size,
                        }));
                        self.state = State::Discarding;
                        // The delimiter (if any) is looked at again in the discarding state.
                        rest = rest.get(content.len()..).unwrap_or_default();
                        continue;
                    }
                    match stop.and_then(|p| rest.get(p).map(|&b| (p, b))) {
                        Some((p, END_BLOCK)) => {
                            self.ready.push_back(Ok(std::mem::take(&mut self.current)));
                            self.state = State::AfterEnd;
                            rest = rest.get(p + 1..).unwrap_or_default();
                        }
                        Some((p, _)) => {
                            let discarded = self.current.len();
                            self.discarded += discarded as u64;
                            self.ready
                                .push_back(Err(FrameError::Unterminated { discarded }));
                            self.start_frame();
                            rest = rest.get(p + 1..).unwrap_or_default();
                        }
                        None => rest = &[],
                    }
                }
            }
        }
    }

    /// The next complete frame's content (without the framing bytes), or the reason one was dropped; `None`
    /// when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        self.ready.pop_front()
    }

    /// Bytes seen outside any frame (before a start byte, or after an end byte) so far.
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped
    }

    /// Bytes of frames that were dropped (too large or interrupted) so far.
    pub fn discarded_bytes(&self) -> u64 {
        self.discarded
    }

    /// Bytes held right now: the unfinished frame plus frames not yet taken by [`Decoder::next_frame`].
    pub fn buffered(&self) -> usize {
        self.current.len()
            + self
                .ready
                .iter()
                .map(|r| r.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }

    /// Capacity of the unfinished frame's buffer; never above `max_size`.
    pub fn frame_capacity(&self) -> usize {
        self.current.capacity()
    }

    /// Whether a frame has started and not ended (at end of stream, its bytes are lost).
    pub fn in_frame(&self) -> bool {
        matches!(self.state, State::InFrame | State::Discarding)
    }

    /// The largest frame accepted.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    fn start_frame(&mut self) {
        self.current.clear();
        self.state = State::InFrame;
    }

    /// Appends frame content, growing the buffer but never past `max_size`; false when it would not fit.
    fn append(&mut self, content: &[u8]) -> bool {
        let needed = self.current.len().saturating_add(content.len());
        if needed > self.max_size {
            return false;
        }
        if self.current.capacity() < needed {
            let target = self
                .current
                .capacity()
                .saturating_mul(2)
                .max(needed)
                .max(256)
                .min(self.max_size);
            self.current.reserve_exact(target - self.current.len());
        }
        self.current.extend_from_slice(content);
        true
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use super::*;

    fn drain(d: &mut Decoder) -> Vec<Result<Vec<u8>, FrameError>> {
        std::iter::from_fn(|| d.next_frame()).collect()
    }

    #[test]
    fn frames_split_across_reads_and_many_in_one_read() {
        let mut wire = Vec::new();
        for i in 0..5 {
            wire.extend(frame(format!("MSH|^~\\&|{i}\r").as_bytes()));
        }
        for chunk in [1, 2, 3, 7, 64, wire.len()] {
            let mut d = Decoder::new(100);
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.feed(piece);
                got.extend(drain(&mut d));
            }
            assert_eq!(got.len(), 5, "chunk {chunk}");
            for (i, f) in got.iter().enumerate() {
                assert_eq!(f.as_ref().unwrap(), format!("MSH|^~\\&|{i}\r").as_bytes());
            }
            assert_eq!(d.skipped_bytes(), 0);
            assert!(!d.in_frame());
        }
    }

    #[test]
    fn noise_before_and_between_frames_is_skipped_and_counted() {
        let mut d = Decoder::new(100);
        d.feed(b"hello");
        d.feed(&frame(b"A"));
        d.feed(b"\n\n");
        d.feed(&frame(b"B"));
        assert_eq!(drain(&mut d), vec![Ok(b"A".to_vec()), Ok(b"B".to_vec())]);
        assert_eq!(d.skipped_bytes(), 7);
    }

    #[test]
    fn too_large_frame_is_reported_and_the_decoder_resynchronises() {
        let mut d = Decoder::new(10);
        let mut wire = frame(&[b'x'; 25]);
        wire.extend(frame(b"ok"));
        for piece in wire.chunks(4) {
            d.feed(piece);
            assert!(d.frame_capacity() <= 10);
            assert!(d.buffered() <= 10 + 4);
        }
        assert_eq!(
            drain(&mut d),
            vec![
                Err(FrameError::TooLarge { max_size: 10 }),
                Ok(b"ok".to_vec())
            ]
        );
        assert_eq!(d.discarded_bytes(), 25);
        // Exactly max_size fits.
        d.feed(&frame(&[b'y'; 10]));
        assert_eq!(drain(&mut d), vec![Ok(vec![b'y'; 10])]);
    }

    #[test]
    fn start_inside_a_frame_drops_the_unfinished_one() {
        let mut d = Decoder::new(100);
        d.feed(b"\x0bMSH|partial\x0bMSH|whole\x1c\r");
        assert_eq!(
            drain(&mut d),
            vec![
                Err(FrameError::Unterminated { discarded: 11 }),
                Ok(b"MSH|whole".to_vec())
            ]
        );
    }

    #[test]
    fn end_without_cr_still_ends_the_frame() {
        let mut d = Decoder::new(100);
        d.feed(b"\x0bA\x1c\x0bB\x1c");
        assert_eq!(drain(&mut d), vec![Ok(b"A".to_vec()), Ok(b"B".to_vec())]);
        d.feed(b"\rX");
        assert_eq!(d.skipped_bytes(), 1);
        assert!(d.next_frame().is_none());
    }

    #[test]
    fn unfinished_frame_is_pending_and_empty_frames_are_frames() {
        let mut d = Decoder::new(0);
        d.feed(b"\x0b\x1c\r\x0bz");
        // The oversized frame is reported as soon as it passes the limit, before its end arrives.
        assert_eq!(
            drain(&mut d),
            vec![Ok(Vec::new()), Err(FrameError::TooLarge { max_size: 0 })]
        );
        assert!(d.in_frame());
        d.feed(b"\x1c\r");
        assert!(d.next_frame().is_none());
        assert!(!d.in_frame());
        assert_eq!(d.skipped_bytes(), 0);
        let mut d = Decoder::new(10);
        d.feed(b"\x0bMSH");
        assert!(d.in_frame());
        assert_eq!(d.buffered(), 3);
        assert_eq!(d.max_size(), 10);
    }
}
