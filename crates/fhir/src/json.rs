//! Fast path for turning request bytes into a [`Node`] tree or a `serde_json::Value`.
//!
//! Why it exists: the validator reads a tree, and callers that keep a resource need a `serde_json::Value`.
//! `serde_json::from_slice` builds a `Value` slowly: every object grows its `IndexMap` one insert at a time
//! (rehashing and reallocating as it goes) and every number goes through a scratch buffer. This parser
//! builds a [`Node`] (strings without escapes borrowed from the input, each array and object allocated once
//! at its final size), which [`Node::into_value`] turns into the *same* `Value` serde_json builds (same
//! keys in the same order, same strings, same number text).
//!
//! How: a plain recursive-descent parser over the input (checked as UTF-8 once, up front) that only
//! handles well-formed JSON. Anything else (a syntax error, a lone surrogate escape, nesting deeper than
//! [`MAX_DEPTH`], a key repeated in one object, serde_json's private marker keys) makes [`parse_node`]
//! return `None`, and the caller falls back to `serde_json::from_slice`, which then produces exactly the
//! value or the error message it always did. So the fast path can only change speed, never results.
//!
//! Invariants: never panics on any input (no indexing that can fail, no unwrap); recursion depth is bounded
//! by [`MAX_DEPTH`]; returns `Some(v)` only when `serde_json::from_slice` would return `Ok(v)` (checked by a
//! differential test).

use crate::node::{Doc, Kind, Tok};
use serde_json::{Map, Value};

/// Deepest nesting of arrays and objects the fast path handles; deeper input goes to serde_json (whose own
/// limit, 128, then applies unchanged).
const MAX_DEPTH: u32 = 100;

/// Prefix of the marker keys serde_json uses for `arbitrary_precision` numbers and raw values: an object
/// with such a key means something else to serde_json, so it is left to serde_json.
const PRIVATE_KEY: &str = "$serde_json::private::";

/// Parse a JSON text into a `serde_json::Value`: the fast path, else `serde_json::from_str` (so the value or
/// the error is exactly serde_json's). For stored resources, read back on every update.
pub fn parse_json(text: &str) -> serde_json::Result<Value> {
    match parse(text.as_bytes()) {
        Some(v) => Ok(v),
        None => serde_json::from_str(text),
    }
}

/// Parse a complete JSON text into a `Value`; `None` when the fast path cannot (or must not) decide, see
/// the module docs.
pub(crate) fn parse(bytes: &[u8]) -> Option<Value> {
    let sink = ValueSink {
        keys: Vec::with_capacity(32),
        values: Vec::with_capacity(32),
    };
    let mut sink = Parser::run(bytes, sink)?;
    sink.values.pop()
}

/// Parse a complete JSON text into a [`Doc`] borrowing from `bytes`; `None` as for [`parse`].
pub(crate) fn parse_doc(bytes: &[u8]) -> Option<Doc<'_>> {
    let sink = TapeSink {
        doc: Doc {
            // About one token per 8 bytes of a FHIR resource; a large body grows the vector as it goes.
            toks: Vec::with_capacity((bytes.len() / 8 + 4).min(4096)),
            owned: Vec::new(),
        },
        keys: Vec::with_capacity(32),
    };
    Parser::run(bytes, sink).map(|t| t.doc)
}

/// A string as parsed: borrowed from the input, or built when it had escapes.
enum Text<'a> {
    Borrowed(&'a str),
    Owned(String),
}

impl Text<'_> {
    fn into_string(self) -> String {
        match self {
            Text::Borrowed(s) => s.to_owned(),
            Text::Owned(s) => s,
        }
    }

    fn as_str(&self) -> &str {
        match self {
            Text::Borrowed(s) => s,
            Text::Owned(s) => s,
        }
    }
}

/// What the parser builds, told one event at a time in document order. Every method returns `None` to
/// give up (the caller then falls back to serde_json).
trait Sink<'a> {
    /// Where a container's children start (returned by `open`, given back to `close`).
    type Mark: Copy;
    fn null(&mut self);
    fn bool(&mut self, b: bool);
    /// A number's text; `plain` when it is at most 19 digits with no sign, fraction or exponent.
    fn number(&mut self, text: &'a str, plain: bool) -> Option<()>;
    fn string(&mut self, s: Text<'a>) -> Option<()>;
    fn key(&mut self, k: Text<'a>) -> Option<()>;
    fn open(&mut self, object: bool) -> Self::Mark;
    /// The container opened at `mark` ends, with `count` items or members.
    fn close(&mut self, mark: Self::Mark, object: bool, count: usize) -> Option<()>;
}

/// Builds the `serde_json::Value` directly: values wait on a stack until their container ends, then move
/// once into a map or vector allocated at its final size.
struct ValueSink {
    keys: Vec<String>,
    values: Vec<Value>,
}

impl<'a> Sink<'a> for ValueSink {
    type Mark = (usize, usize);
    #[inline(always)]
    fn null(&mut self) {
        self.values.push(Value::Null);
    }
    #[inline(always)]
    fn bool(&mut self, b: bool) {
        self.values.push(Value::Bool(b));
    }
    #[inline(always)]
    fn number(&mut self, text: &'a str, _plain: bool) -> Option<()> {
        self.values.push(Value::Number(crate::node::number(text)?));
        Some(())
    }
    #[inline(always)]
    fn string(&mut self, s: Text<'a>) -> Option<()> {
        self.values.push(Value::String(s.into_string()));
        Some(())
    }
    #[inline(always)]
    fn key(&mut self, k: Text<'a>) -> Option<()> {
        self.keys.push(k.into_string());
        Some(())
    }
    fn open(&mut self, _object: bool) -> (usize, usize) {
        (self.keys.len(), self.values.len())
    }
    fn close(&mut self, (keys, values): (usize, usize), object: bool, count: usize) -> Option<()> {
        let v = if object {
            let mut map = Map::with_capacity(count);
            for (k, v) in self.keys.drain(keys..).zip(self.values.drain(values..)) {
                // As serde_json: a repeated key keeps its first position and takes the last value.
                map.insert(k, v);
            }
            Value::Object(map)
        } else {
            Value::Array(self.values.drain(values..).collect())
        };
        self.values.push(v);
        Some(())
    }
}

/// Builds a [`Doc`]: one token per scalar, key and container.
struct TapeSink<'a> {
    doc: Doc<'a>,
    /// Token indexes of the keys of the objects being parsed, innermost last (for the repeated-key check).
    keys: Vec<u32>,
}

impl<'a> TapeSink<'a> {
    #[inline(always)]
    fn text(&mut self, s: Text<'a>) -> Option<Tok<'a>> {
        Some(match s {
            Text::Borrowed(s) => Tok::leaf(Kind::Str, s),
            Text::Owned(s) => self.doc.owned_token(Kind::OwnedStr, s)?,
        })
    }

    /// Whether some key appears twice among the key tokens `keys` (serde_json keeps the first position and
    /// the last value; the fast path leaves that to serde_json).
    fn repeated_key(&self, keys: &[u32]) -> bool {
        if keys.len() <= 16 {
            let mut seen: &[u32] = &[];
            for (n, k) in keys.iter().enumerate() {
                let k = self.doc.text(*k);
                if seen
                    .iter()
                    .any(|s| crate::schema::bytes_eq(self.doc.text(*s).as_bytes(), k.as_bytes()))
                {
                    return true;
                }
                seen = keys.get(..=n).unwrap_or_default();
            }
            false
        } else {
            let mut all: Vec<&str> = keys.iter().map(|k| self.doc.text(*k)).collect();
            all.sort_unstable();
            all.windows(2).any(|w| w.first() == w.last())
        }
    }
}

impl<'a> Sink<'a> for TapeSink<'a> {
    type Mark = (usize, usize);
    #[inline(always)]
    fn null(&mut self) {
        self.doc.toks.push(Tok::leaf(Kind::Null, ""));
    }
    #[inline(always)]
    fn bool(&mut self, b: bool) {
        let kind = if b { Kind::True } else { Kind::False };
        self.doc.toks.push(Tok::leaf(kind, ""));
    }
    #[inline(always)]
    fn number(&mut self, text: &'a str, plain: bool) -> Option<()> {
        if !plain {
            // A number serde_json would refuse (none is known) is left to serde_json; one whose text it
            // rewrites is kept as serde_json writes it.
            let n = crate::node::number(text)?;
            if n.as_str() != text {
                let t = self
                    .doc
                    .owned_token(Kind::OwnedNumber, n.as_str().to_owned())?;
                self.doc.toks.push(t);
                return Some(());
            }
        }
        self.doc.toks.push(Tok::leaf(Kind::Number, text));
        Some(())
    }
    #[inline(always)]
    fn string(&mut self, s: Text<'a>) -> Option<()> {
        let t = self.text(s)?;
        self.doc.toks.push(t);
        Some(())
    }
    #[inline(always)]
    fn key(&mut self, k: Text<'a>) -> Option<()> {
        let t = self.text(k)?;
        self.keys.push(u32::try_from(self.doc.toks.len()).ok()?);
        self.doc.toks.push(t);
        Some(())
    }
    fn open(&mut self, object: bool) -> (usize, usize) {
        let kind = if object { Kind::Object } else { Kind::Array };
        (self.doc.open(kind, 0), self.keys.len())
    }
    fn close(&mut self, (at, keys): (usize, usize), object: bool, count: usize) -> Option<()> {
        if object {
            if self.repeated_key(self.keys.get(keys..).unwrap_or_default()) {
                return None;
            }
            self.keys.truncate(keys);
        }
        self.doc.close(at);
        if let Some(t) = self.doc.toks.get_mut(at) {
            t.set_count(count);
        }
        Some(())
    }
}

struct Parser<'a, S> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
    depth: u32,
    sink: S,
}

/// Bytes with the high bit of each lane set where `x` has a byte equal to `n` (exact in the lowest such
/// lane, which is all the caller relies on).
#[inline(always)]
fn has_byte(x: u64, n: u8) -> u64 {
    let y = x ^ (0x0101_0101_0101_0101u64 * u64::from(n));
    y.wrapping_sub(0x0101_0101_0101_0101) & !y & 0x8080_8080_8080_8080
}

/// Bytes below 0x20 (same exactness as [`has_byte`]).
#[inline(always)]
fn has_control(x: u64) -> u64 {
    x.wrapping_sub(0x2020_2020_2020_2020) & !x & 0x8080_8080_8080_8080
}

impl<'a, S: Sink<'a>> Parser<'a, S> {
    /// Parse all of `bytes` into `sink`.
    fn run(bytes: &'a [u8], sink: S) -> Option<S> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut p = Parser {
            s: text,
            b: bytes,
            i: 0,
            depth: 0,
            sink,
        };
        p.document()?;
        Some(p.sink)
    }

    #[inline(always)]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline(always)]
    fn ws(&mut self) {
        while let Some(c) = self.peek() {
            if matches!(c, b' ' | b'\n' | b'\t' | b'\r') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    fn document(&mut self) -> Option<()> {
        self.ws();
        self.value()?;
        self.ws();
        (self.i == self.b.len()).then_some(())
    }

    /// Parse one value into the sink.
    fn value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.i += 1;
                let t = self.string()?;
                self.sink.string(t)
            }
            b'{' => self.object(),
            b'[' => self.array(),
            b't' => {
                self.literal(b"true")?;
                self.sink.bool(true);
                Some(())
            }
            b'f' => {
                self.literal(b"false")?;
                self.sink.bool(false);
                Some(())
            }
            b'n' => {
                self.literal(b"null")?;
                self.sink.null();
                Some(())
            }
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        if self.b.get(self.i..end) == Some(word) {
            self.i = end;
            Some(())
        } else {
            None
        }
    }

    /// Position of the first `"`, `\` or control byte at or after `self.i` (the end of input if none).
    #[inline(always)]
    fn scan_plain(&self) -> usize {
        let mut i = self.i;
        while let Some(chunk) = self.b.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let x = u64::from_le_bytes(word);
            let hits = has_byte(x, b'"') | has_byte(x, b'\\') | has_control(x);
            if hits != 0 {
                return i + (hits.trailing_zeros() / 8) as usize;
            }
            i += 8;
        }
        while let Some(&c) = self.b.get(i) {
            if c == b'"' || c == b'\\' || c < 0x20 {
                return i;
            }
            i += 1;
        }
        i
    }

    /// A string body (the opening quote already consumed), up to and including the closing quote.
    #[inline(always)]
    fn string(&mut self) -> Option<Text<'a>> {
        let start = self.i;
        let end = self.scan_plain();
        let text: &'a str = self.s;
        if self.b.get(end) == Some(&b'"') {
            let s = text.get(start..end)?;
            self.i = end + 1;
            return Some(Text::Borrowed(s));
        }
        self.escaped_string(start, end)
    }

    /// The rest of a string with escapes (or an error) from `end`: built piece by piece.
    #[cold]
    #[inline(never)]
    fn escaped_string(&mut self, start: usize, end: usize) -> Option<Text<'a>> {
        let mut out = String::with_capacity(end - start + 16);
        out.push_str(self.s.get(start..end)?);
        self.i = end;
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(Text::Owned(out));
                }
                b'\\' => {
                    self.i += 1;
                    self.escape(&mut out)?;
                }
                _ => return None, // control character
            }
            let from = self.i;
            let to = self.scan_plain();
            out.push_str(self.s.get(from..to)?);
            self.i = to;
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.b.get(self.i..self.i + 4)?;
        let mut n = 0u32;
        for &d in digits {
            n = n * 16 + char::from(d).to_digit(16)?;
        }
        self.i += 4;
        Some(n)
    }

    /// One escape sequence (the backslash already consumed).
    fn escape(&mut self, out: &mut String) -> Option<()> {
        let c = self.peek()?;
        self.i += 1;
        let ch = match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let n = self.hex4()?;
                match n {
                    0xD800..=0xDBFF => {
                        // A high surrogate must be followed by an escaped low surrogate; anything else is
                        // left to serde_json.
                        if self.b.get(self.i..self.i + 2) != Some(b"\\u") {
                            return None;
                        }
                        self.i += 2;
                        let lo = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&lo) {
                            return None;
                        }
                        char::from_u32(0x10000 + ((n - 0xD800) << 10) + (lo - 0xDC00))?
                    }
                    0xDC00..=0xDFFF => return None,
                    _ => char::from_u32(n)?,
                }
            }
            _ => return None,
        };
        out.push(ch);
        Some(())
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Option<()> {
        let start = self.i;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        let mut plain = true;
        if self.peek() == Some(b'.') {
            self.i += 1;
            plain = false;
            if self.digits() == 0 {
                return None;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            plain = false;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        let s: &'a str = self.s;
        let text = s.get(start..self.i)?;
        self.sink
            .number(text, plain && !negative && text.len() < 20)
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        self.i += 1;
        self.ws();
        Some(())
    }

    fn object(&mut self) -> Option<()> {
        self.enter()?;
        let mark = self.sink.open(true);
        let mut count = 0;
        if self.peek() == Some(b'}') {
            self.i += 1;
        } else {
            loop {
                if self.peek() != Some(b'"') {
                    return None;
                }
                self.i += 1;
                let key = self.string()?;
                if key.as_str().starts_with(PRIVATE_KEY) {
                    return None;
                }
                self.sink.key(key)?;
                self.ws();
                if self.peek() != Some(b':') {
                    return None;
                }
                self.i += 1;
                self.ws();
                self.value()?;
                count += 1;
                if !self.more(b'}')? {
                    break;
                }
            }
        }
        self.sink.close(mark, true, count)?;
        self.depth -= 1;
        Some(())
    }

    /// After an item or member: `true` past a `,` (another follows), `false` past `close`; `None` for
    /// anything else.
    #[inline(always)]
    fn more(&mut self, close: u8) -> Option<bool> {
        self.ws();
        let c = self.peek()?;
        self.i += 1;
        if c == b',' {
            self.ws();
            Some(true)
        } else if c == close {
            Some(false)
        } else {
            None
        }
    }

    fn array(&mut self) -> Option<()> {
        self.enter()?;
        let mark = self.sink.open(false);
        let mut count = 0;
        if self.peek() == Some(b']') {
            self.i += 1;
        } else {
            loop {
                self.value()?;
                count += 1;
                if !self.more(b']')? {
                    break;
                }
            }
        }
        self.sink.close(mark, false, count)?;
        self.depth -= 1;
        Some(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    fn same(text: &str) {
        let ours = parse(text.as_bytes());
        let theirs: Result<Value, _> = serde_json::from_str(text);
        match (&ours, &theirs) {
            (Some(a), Ok(b)) => {
                assert_eq!(a, b, "{text}");
                assert_eq!(
                    serde_json::to_string(a).unwrap(),
                    serde_json::to_string(b).unwrap(),
                    "{text}"
                );
            }
            (None, _) => {}
            (Some(a), Err(e)) => panic!("{text}: fast path accepted {a} but serde_json says {e}"),
        }
    }

    #[test]
    fn agrees_with_serde_json() {
        for t in [
            r#"{"a":1,"b":[true,false,null],"c":{"d":"e"}}"#,
            r#"{"a":1,"a":2,"b":3,"a":4}"#,
            r#"  {"x" : [ 1 , 2 ] , "y":{}} "#,
            r#"{"n":[0,-0,1.50,1E5,1e-5,-1.0e+2,18446744073709551616,-9223372036854775809,123]}"#,
            r#"{"s":"a\"b\\c\/d\b\f\n\r\t\u0041\u00e9\ud83d\ude00\u0000"}"#,
            r#""\ud83d""#,
            r#""\ude00""#,
            r#"{"$serde_json::private::Number":"1"}"#,
            "[]",
            "{}",
            "\"Zoë\"",
            "[1,]",
            "{\"a\":1,}",
            "01",
            "1.",
            "-",
            "[1 2]",
            "tru",
            "\"\u{1}\"",
            "{\"a\"}",
            "[1]x",
        ] {
            same(t);
        }
        assert!(parse(r#"{"a":1}"#.as_bytes()).is_some());
        assert!(parse(b"\"\xff\"").is_none());
    }

    mod differential {
        use super::*;
        use proptest::prelude::*;

        /// JSON text built by hand, so it can hold what serializers never write: odd whitespace, escapes of
        /// any character, surrogate pairs (and lone halves), duplicate keys, every number form, and syntax
        /// errors.
        fn text(depth: u32) -> BoxedStrategy<String> {
            let ws = prop_oneof![
                Just(String::new()),
                Just(" ".to_string()),
                Just("\n  ".to_string()),
                Just("\t".to_string()),
                Just("\r\n".to_string()),
                Just("\u{b}".to_string()),
            ];
            let piece = prop_oneof![
                4 => "[a-zA-Z0-9 _#:/.-]{0,8}",
                1 => Just("\\\"".to_string()),
                1 => Just("\\\\".to_string()),
                1 => Just("\\/".to_string()),
                1 => Just("\\b\\f\\n\\r\\t".to_string()),
                1 => any::<char>().prop_map(|c| format!("\\u{:04x}", u32::from(c).min(0xFFFF))),
                1 => Just("\\ud83d\\ude00".to_string()),
                1 => Just("\\uD83D\\uDE00".to_string()),
                1 => Just("\\ud83d".to_string()),
                1 => Just("\\ude00x".to_string()),
                1 => Just("\\ud83d\\u0041".to_string()),
                1 => Just("\\x".to_string()),
                1 => Just("\\u12g4".to_string()),
                1 => Just("\u{1}".to_string()),
                1 => Just("\u{7f}".to_string()),
                1 => Just("é€😀".to_string()),
                1 => Just("$serde_json::private::Number".to_string()),
            ];
            let string =
                proptest::collection::vec(piece, 0..4).prop_map(|p| format!("\"{}\"", p.concat()));
            let number = prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                "-?(0|[1-9][0-9]{0,25})(\\.[0-9]{1,6})?([eE][+-]?[0-9]{1,4})?",
                "-?[0-9.eE+-]{1,6}",
            ];
            let leaf = prop_oneof![
                2 => string.clone(),
                2 => number,
                1 => prop_oneof![Just("true"), Just("false"), Just("null"), Just("nul"), Just("True")]
                    .prop_map(str::to_string),
            ];
            if depth == 0 {
                return leaf.boxed();
            }
            let inner = text(depth - 1);
            let array = (
                proptest::collection::vec((inner.clone(), ws.clone()), 0..5),
                ws.clone(),
                any::<u8>(),
            )
                .prop_map(|(items, w, flaw)| {
                    let body: Vec<String> = items
                        .into_iter()
                        .map(|(v, w2)| format!("{w2}{v}{w2}"))
                        .collect();
                    let sep = if flaw == 0 { " " } else { "," };
                    let trailing = if flaw == 1 { "," } else { "" };
                    format!("[{w}{}{trailing}]", body.join(sep))
                });
            let key = prop_oneof![
                3 => prop_oneof![Just("\"id\""), Just("\"url\""), Just("\"a\""), Just("\"\""), Just("\"resourceType\"")]
                    .prop_map(str::to_string),
                1 => string,
            ];
            let object = (
                proptest::collection::vec((key, inner, ws.clone()), 0..6),
                any::<u8>(),
            )
                .prop_map(|(members, flaw)| {
                    let body: Vec<String> = members
                        .into_iter()
                        .map(|(k, v, w)| {
                            if flaw == 2 {
                                format!("{k}{w}{v}")
                            } else {
                                format!("{w}{k}{w}:{w}{v}{w}")
                            }
                        })
                        .collect();
                    let trailing = if flaw == 1 { "," } else { "" };
                    format!("{{{}{trailing}}}", body.join(","))
                });
            prop_oneof![2 => leaf, 1 => array, 2 => object].boxed()
        }

        fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
            let theirs = serde_json::from_slice::<Value>(bytes);
            if let Some(ours) = parse(bytes) {
                match theirs {
                    Ok(v) => {
                        prop_assert_eq!(&ours, &v);
                        prop_assert_eq!(
                            serde_json::to_string(&ours).ok(),
                            serde_json::to_string(&v).ok()
                        );
                        let order = |v: &Value| -> Vec<String> {
                            v.as_object()
                                .map(|m| m.keys().cloned().collect())
                                .unwrap_or_default()
                        };
                        prop_assert_eq!(order(&ours), order(&v));
                    }
                    Err(e) => {
                        prop_assert!(false, "fast path accepted what serde_json refuses: {}", e)
                    }
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn same_value_as_serde_json(t in text(4), pad in "[ \n]{0,2}") {
                check(format!("{pad}{t}{pad}").as_bytes())?;
            }

            #[test]
            fn same_value_after_byte_edits(t in text(3), edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..4)) {
                let mut b = t.into_bytes();
                for (at, byte, op) in edits {
                    let i = if b.is_empty() { 0 } else { at % b.len() };
                    match op {
                        0 if !b.is_empty() => b[i] = byte,
                        1 => b.insert(i, byte),
                        _ if !b.is_empty() => { b.remove(i); }
                        _ => {}
                    }
                }
                check(&b)?;
            }

            #[test]
            fn serialized_values_take_the_fast_path(
                v in (any::<i64>(), "\\PC{0,12}", proptest::collection::vec(("\\PC{0,8}", any::<bool>()), 0..6))
            ) {
                let mut m = Map::new();
                m.insert("n".into(), Value::from(v.0));
                m.insert("s".into(), Value::from(v.1));
                m.insert("list".into(), Value::Array(v.2.into_iter().map(|(k, b)| {
                    let mut o = Map::new();
                    o.insert(k, Value::Bool(b));
                    Value::Object(o)
                }).collect()));
                let value = Value::Object(m);
                for text in [serde_json::to_vec(&value), serde_json::to_vec_pretty(&value)] {
                    let text = text.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let ours = parse(&text);
                    prop_assert_eq!(ours.as_ref(), Some(&value));
                }
            }
        }
    }

    #[test]
    fn deep_nesting_is_left_to_serde_json() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(parse(deep.as_bytes()).is_none());
        let ok = format!("{}{}", "[".repeat(50), "]".repeat(50));
        same(&ok);
    }
}
