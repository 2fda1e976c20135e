//! The message model and the parser: a message is its segments, each kept as its raw (escaped) text with the
//! byte ranges of its fields, so encoding gives back exactly what was parsed and a value is only split and
//! unescaped when someone reads it.

use std::borrow::Cow;

use crate::delimiters::{Charset, Delimiters, is_delimiter_char};
use crate::error::{ErrorCode, ParseError};
use crate::escape::{unescape_into, unescape_with};
use crate::path::{Path, is_segment_id};

/// One HL7 v2 message: its segments in order, the delimiters and the character set declared in its MSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub(crate) segments: Vec<Segment>,
    pub(crate) delimiters: Delimiters,
    pub(crate) charset: Charset,
}

/// One segment: its id and its fields, kept as raw (escaped) text. Fields use the standard numbering, also in
/// MSH (MSH-1 is the field separator, MSH-2 the encoding characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The segment's text without its terminator, e.g. `PID|1||9449305552^^^NHS^NH`.
    raw: String,
    /// Byte ranges in `raw` of fields 1..=n.
    fields: Vec<(usize, usize)>,
    delimiters: Delimiters,
    charset: Charset,
}

/// One repetition of a field, decoded: its components, each a list of subcomponents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Field {
    components: Vec<Vec<String>>,
}

impl Field {
    /// Component `n` (1-based), read like a terser path `X-f.n`: its first subcomponent, decoded. `None` when
    /// absent or empty.
    pub fn component(&self, n: usize) -> Option<String> {
        self.subcomponent(n, 1)
    }

    /// Subcomponent `s` of component `n` (both 1-based), decoded. `None` when absent or empty.
    pub fn subcomponent(&self, n: usize, s: usize) -> Option<String> {
        let comp = self.components.get(n.checked_sub(1)?)?;
        let sub = comp.get(s.checked_sub(1)?)?;
        (!sub.is_empty()).then(|| sub.clone())
    }

    /// Every component's first subcomponent, decoded (empty strings for empty components), in order.
    pub fn components(&self) -> Vec<String> {
        self.components
            .iter()
            .map(|c| c.first().cloned().unwrap_or_default())
            .collect()
    }

    /// Every subcomponent of component `n` (1-based), decoded; empty when the component is absent.
    pub fn subcomponents(&self, n: usize) -> Vec<String> {
        n.checked_sub(1)
            .and_then(|i| self.components.get(i))
            .cloned()
            .unwrap_or_default()
    }

    /// Whether every component is empty.
    pub fn is_empty(&self) -> bool {
        self.components
            .iter()
            .all(|c| c.iter().all(String::is_empty))
    }
}

impl Segment {
    /// Builds a segment from one line (no terminator). The caller has checked the id.
    pub(crate) fn from_line(line: &str, d: Delimiters, charset: Charset) -> Segment {
        let sep = d.field;
        let is_msh = line.starts_with("MSH") && line[3..].starts_with(sep);
        let mut fields = Vec::with_capacity(32);
        let first = if is_msh {
            // MSH-1 is the separator itself; MSH-2 starts right after it.
            fields.push((3, 4));
            4
        } else {
            match line.find(sep) {
                Some(p) => p + 1,
                None => {
                    return Segment {
                        raw: line.to_string(),
                        fields,
                        delimiters: d,
                        charset,
                    };
                }
            }
        };
        let mut start = first;
        for (pos, _) in line[first..].match_indices(sep) {
            fields.push((start, first + pos));
            start = first + pos + 1;
        }
        fields.push((start, line.len()));
        Segment {
            raw: line.to_string(),
            fields,
            delimiters: d,
            charset,
        }
    }

    /// The segment id, e.g. `PID`.
    pub fn name(&self) -> &str {
        let end = self
            .raw
            .find(self.delimiters.field)
            .unwrap_or(self.raw.len());
        &self.raw[..end]
    }

    /// The number of fields present (trailing empty fields count when their separators are there).
    pub fn field_count(&self) -> usize {
        self.fields.len()
    }

    /// The raw (escaped) text of field `n`, standard numbering (MSH-1 is the field separator). `None` when the
    /// field is absent (an empty field is `Some("")`).
    pub fn raw_field(&self, n: usize) -> Option<&str> {
        let &(start, end) = self.fields.get(n.checked_sub(1)?)?;
        self.raw.get(start..end)
    }

    /// The segment's whole raw text, without its terminator.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// Field `n` split into its repetitions, components and subcomponents, each decoded. An empty or absent
    /// field has no repetitions. MSH-1 and MSH-2 are returned whole, as one component.
    pub fn repetitions(&self, n: usize) -> Vec<Field> {
        let Some(raw) = self.raw_field(n) else {
            return Vec::new();
        };
        if raw.is_empty() {
            return Vec::new();
        }
        if self.is_msh() && n <= 2 {
            return vec![Field {
                components: vec![vec![raw.to_string()]],
            }];
        }
        let d = &self.delimiters;
        raw.split(d.repetition)
            .map(|rep| Field {
                components: rep
                    .split(d.component)
                    .map(|comp| {
                        comp.split(d.subcomponent)
                            .map(|s| unescape_with(s, d, self.charset))
                            .collect()
                    })
                    .collect(),
            })
            .collect()
    }

    pub(crate) fn is_msh(&self) -> bool {
        self.name() == "MSH"
    }

    pub(crate) fn delimiters(&self) -> &Delimiters {
        &self.delimiters
    }
}

/// The `n`th (1-based) piece of `s` split on `sep`, without allocating.
pub(crate) fn nth_piece(s: &str, sep: char, n: usize) -> Option<&str> {
    s.split(sep).nth(n.checked_sub(1)?)
}

impl Message {
    /// Parses a message from the wire. Delimiters come from MSH-1/MSH-2 and the character set from MSH-18
    /// (UTF-8 when empty); segments may end in CR, LF or CRLF; a leading UTF-8 byte-order mark and blank lines
    /// are skipped. Only structural problems are errors: no MSH first, bad delimiters, an unknown or violated
    /// character set, a malformed segment id, a second MSH.
    pub fn parse(bytes: &[u8]) -> Result<Message, ParseError> {
        let bytes = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF][..]).unwrap_or(bytes);
        let start = bytes
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(bytes.len());
        let bytes = bytes.get(start..).unwrap_or_default();
        let (delimiters, charset) = read_header(bytes)?;
        let text: Cow<'_, str> = match charset {
            Charset::Latin1 => Cow::Owned(bytes.iter().map(|&b| char::from(b)).collect()),
            Charset::Utf8 | Charset::Ascii => match std::str::from_utf8(bytes) {
                Ok(s) => Cow::Borrowed(s),
                Err(e) => return Err(invalid_utf8(bytes, e.valid_up_to(), &delimiters)),
            },
        };
        parse_lines(&text, delimiters, charset)
    }

    /// Parses a message that is already text (the character set of MSH-18 still decides how `\Xhh..\`
    /// escapes decode, and must be a known one).
    pub fn parse_str(s: &str) -> Result<Message, ParseError> {
        let s = s.strip_prefix('\u{FEFF}').unwrap_or(s);
        let s = s.trim_start_matches(['\r', '\n']);
        let (delimiters, charset) = read_header(s.as_bytes())?;
        parse_lines(s, delimiters, charset)
    }

    /// The message as text, each segment (the last too) ended by CR.
    pub fn encode(&self) -> String {
        let len = self.segments.iter().map(|s| s.raw.len() + 1).sum();
        let mut out = String::with_capacity(len);
        for s in &self.segments {
            out.push_str(&s.raw);
            out.push('\r');
        }
        out
    }

    /// The message as bytes in the character set it declares (MSH-18): what goes on the wire.
    pub fn encode_bytes(&self) -> Vec<u8> {
        self.charset.encode_text(&self.encode())
    }

    /// The delimiters declared in MSH-1/MSH-2.
    pub fn delimiters(&self) -> &Delimiters {
        &self.delimiters
    }

    /// The character set declared in MSH-18.
    pub fn charset(&self) -> Charset {
        self.charset
    }

    /// All segments, in order (MSH first).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The first segment with this id.
    pub fn segment(&self, name: &str) -> Option<&Segment> {
        self.segments.iter().find(|s| s.name() == name)
    }

    /// Every segment with this id, in order.
    pub fn segments_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Segment> + 'a {
        self.segments.iter().filter(move |s| s.name() == name)
    }

    /// Terser-style access to a decoded (unescaped) value: `PID-3`, `PID-3.1`, `PID-3(2).4.1`, `OBX(2)-5`
    /// (segment and field repetitions 1-based in parentheses, then component, then subcomponent). A level that
    /// is not given is the first one, as in HAPI's Terser: `PID-3` reads PID-3(1).1.1. MSH-1 is the field
    /// separator and MSH-2 the encoding characters. `None` when absent or empty; use
    /// [`Segment::raw_field`] for a whole field's raw text.
    pub fn get(&self, path: &str) -> Option<String> {
        let p = Path::parse(path).ok()?;
        let seg = self.segments_named(&p.segment).nth(p.segment_rep - 1)?;
        let raw = seg.raw_field(p.field)?;
        if seg.is_msh() && p.field <= 2 {
            let first = p.rep.unwrap_or(1) == 1
                && p.component.unwrap_or(1) == 1
                && p.subcomponent.unwrap_or(1) == 1;
            return (first && !raw.is_empty()).then(|| raw.to_string());
        }
        let d = &self.delimiters;
        let rep = nth_piece(raw, d.repetition, p.rep.unwrap_or(1))?;
        let comp = nth_piece(rep, d.component, p.component.unwrap_or(1))?;
        let sub = nth_piece(comp, d.subcomponent, p.subcomponent.unwrap_or(1))?;
        if sub.is_empty() {
            return None;
        }
        let mut out = String::with_capacity(sub.len());
        unescape_into(sub, d, self.charset, &mut out);
        Some(out)
    }

    /// MSH-10, the message control id.
    pub fn control_id(&self) -> Option<String> {
        self.get("MSH-10")
    }

    /// MSH-9.1 (message code), MSH-9.2 (trigger event), MSH-9.3 (message structure).
    pub fn message_type(&self) -> (Option<String>, Option<String>, Option<String>) {
        (
            self.get("MSH-9.1"),
            self.get("MSH-9.2"),
            self.get("MSH-9.3"),
        )
    }

    /// MSH-12.1, the version id (e.g. `2.4`).
    pub fn version(&self) -> Option<String> {
        self.get("MSH-12")
    }

    /// MSH-3.1, the sending application's namespace id.
    pub fn sending_application(&self) -> Option<String> {
        self.get("MSH-3")
    }

    /// MSH-4.1, the sending facility's namespace id (an ODS code in NHS feeds).
    pub fn sending_facility(&self) -> Option<String> {
        self.get("MSH-4")
    }
}

/// Reads MSH-1, MSH-2 and MSH-18 from the start of a message (bytes, before any decoding: the delimiters are
/// ASCII by rule, and charset names are ASCII).
fn read_header(bytes: &[u8]) -> Result<(Delimiters, Charset), ParseError> {
    if bytes.is_empty() {
        return Err(ParseError::new(ErrorCode::SegmentSequence, "empty message"));
    }
    if !bytes.starts_with(b"MSH") {
        let head: String = String::from_utf8_lossy(bytes.get(..3).unwrap_or(bytes)).into_owned();
        return Err(ParseError::new(
            ErrorCode::SegmentSequence,
            format!("a message must start with an MSH segment (found {head:?})"),
        ));
    }
    let field = match bytes.get(3) {
        Some(&b) if is_delimiter_char(char::from(b)) => char::from(b),
        Some(&b) => {
            return Err(ParseError::new(
                ErrorCode::DataType,
                format!(
                    "MSH-1 field separator {:?} is not printable ASCII punctuation",
                    char::from(b)
                ),
            )
            .at("MSH", 1, Some(1)));
        }
        None => {
            return Err(ParseError::new(
                ErrorCode::RequiredFieldMissing,
                "MSH-1 (field separator) is missing",
            )
            .at("MSH", 1, Some(1)));
        }
    };
    let fsep = field as u8;
    let line_end = bytes
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(bytes.len());
    let line = bytes.get(..line_end).unwrap_or(bytes);
    let enc: &[u8] = line
        .get(4..)
        .unwrap_or_default()
        .split(|&b| b == fsep)
        .next()
        .unwrap_or_default();
    let msh2_err = |why: String| ParseError::new(ErrorCode::DataType, why).at("MSH", 1, Some(2));
    if enc.len() < 4 || enc.len() > 5 {
        return Err(msh2_err(format!(
            "MSH-2 must hold 4 encoding characters (5 with the truncation character), found {:?}",
            String::from_utf8_lossy(enc)
        )));
    }
    let [component, repetition, escape, subcomponent] =
        [0, 1, 2, 3].map(|i| char::from(enc.get(i).copied().unwrap_or(0)));
    let d = Delimiters {
        field,
        component,
        repetition,
        escape,
        subcomponent,
    };
    d.validate()
        .map_err(|e| msh2_err(format!("bad delimiters in MSH-1/MSH-2: {e}")))?;
    if let Some(&t) = enc.get(4) {
        let t = char::from(t);
        if !is_delimiter_char(t) || d.is_special(t) {
            return Err(msh2_err(format!("bad truncation character {t:?} in MSH-2")));
        }
    }
    // MSH-18: the 18th field is the 17th piece after "MSH" when splitting the header line on the separator.
    let msh18 = line.split(|&b| b == fsep).nth(17).unwrap_or_default();
    let first_rep = msh18
        .split(|&b| b == repetition as u8)
        .next()
        .unwrap_or_default();
    let first_comp = first_rep
        .split(|&b| b == component as u8)
        .next()
        .unwrap_or_default();
    let name = String::from_utf8_lossy(first_comp);
    let charset = Charset::from_msh18(&name).ok_or_else(|| {
        ParseError::new(
            ErrorCode::TableValueNotFound,
            format!("unsupported character set {:?} in MSH-18", name.trim()),
        )
        .at("MSH", 1, Some(18))
    })?;
    Ok((d, charset))
}

fn invalid_utf8(bytes: &[u8], at: usize, d: &Delimiters) -> ParseError {
    let before = bytes.get(..at).unwrap_or(bytes);
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\r' || b == b'\n')
        .map_or(0, |p| p + 1);
    let line = bytes.get(line_start..).unwrap_or_default();
    let name_end = line
        .iter()
        .position(|&b| b == d.field as u8 || b == b'\r' || b == b'\n')
        .unwrap_or(line.len());
    let name = String::from_utf8_lossy(line.get(..name_end).unwrap_or_default()).into_owned();
    // Occurrence of this segment id among the lines before it.
    let seq = before
        .get(..line_start)
        .unwrap_or_default()
        .split(|&b| b == b'\r' || b == b'\n')
        .filter(|l| {
            l.starts_with(name.as_bytes()) && l.get(name.len()).is_none_or(|&b| b == d.field as u8)
        })
        .count()
        + 1;
    let err = ParseError::new(
        ErrorCode::DataType,
        format!("invalid UTF-8 at byte {at} (MSH-18 declares UTF-8, ASCII or nothing)"),
    );
    if is_segment_id(&name) {
        err.at(&name, seq, None)
    } else {
        err
    }
}

fn parse_lines(text: &str, d: Delimiters, charset: Charset) -> Result<Message, ParseError> {
    let mut segments: Vec<Segment> = Vec::with_capacity(16);
    for (index, line) in text.split(['\r', '\n']).enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let name = line.split(d.field).next().unwrap_or_default();
        if !is_segment_id(name) {
            let shown: String = name.chars().take(20).collect();
            return Err(ParseError::new(
                ErrorCode::SegmentSequence,
                format!(
                    "line {}: {shown:?} is not a segment id (three upper-case letters or digits)",
                    index + 1
                ),
            ));
        }
        if name == "MSH" && !segments.is_empty() {
            return Err(ParseError::new(
                ErrorCode::SegmentSequence,
                format!("line {}: a second MSH segment (one message at a time; batches are not supported)", index + 1),
            )
            .at("MSH", 2, None));
        }
        segments.push(Segment::from_line(line, d, charset));
    }
    Ok(Message {
        segments,
        delimiters: d,
        charset,
    })
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

    const A28: &str = "MSH|^~\\&|PAS|RXX01|HUB|RXX|20260301093000||ADT^A28^ADT_A05|MSG0001|P|2.4|||AL|NE|GBR|UNICODE UTF-8\r\
EVN|A28|20260301093000\r\
PID|1||9449305552^^^NHS^NH~RXX123456^^^RXX^MR||PATEL^Anika^Priya^^Ms||19850214|F|||12 Mill Lane^^Leeds^^LS1 4AB^GBR\r";

    #[test]
    fn parses_structure_and_fields() {
        let m = Message::parse(A28.as_bytes()).unwrap();
        assert_eq!(m.segments().len(), 3);
        assert_eq!(m.control_id().as_deref(), Some("MSG0001"));
        assert_eq!(
            m.message_type(),
            (
                Some("ADT".into()),
                Some("A28".into()),
                Some("ADT_A05".into())
            )
        );
        assert_eq!(m.version().as_deref(), Some("2.4"));
        assert_eq!(m.sending_application().as_deref(), Some("PAS"));
        assert_eq!(m.sending_facility().as_deref(), Some("RXX01"));
        assert_eq!(m.get("PID-3").as_deref(), Some("9449305552"));
        assert_eq!(m.get("PID-3.4").as_deref(), Some("NHS"));
        assert_eq!(m.get("PID-3(2).1").as_deref(), Some("RXX123456"));
        assert_eq!(m.get("PID-3(2).5").as_deref(), Some("MR"));
        assert_eq!(m.get("PID-3(3).1"), None);
        assert_eq!(m.get("PID-2"), None);
        assert_eq!(m.get("PID-99"), None);
        assert_eq!(m.get("PV1-1"), None);
        assert_eq!(m.get("MSH-1").as_deref(), Some("|"));
        assert_eq!(m.get("MSH-2").as_deref(), Some("^~\\&"));
        assert_eq!(m.get("MSH-2.2"), None);
        assert_eq!(m.get("not a path"), None);
        let pid = m.segment("PID").unwrap();
        assert_eq!(pid.name(), "PID");
        assert_eq!(pid.field_count(), 11);
        assert_eq!(
            pid.raw_field(3),
            Some("9449305552^^^NHS^NH~RXX123456^^^RXX^MR")
        );
        assert_eq!(pid.raw_field(0), None);
        let msh = m.segment("MSH").unwrap();
        assert_eq!(msh.raw_field(1), Some("|"));
        assert_eq!(msh.raw_field(2), Some("^~\\&"));
        assert_eq!(msh.raw_field(18), Some("UNICODE UTF-8"));
        assert_eq!(msh.field_count(), 18);
        let reps = pid.repetitions(3);
        assert_eq!(reps.len(), 2);
        assert_eq!(
            reps[0].components(),
            vec!["9449305552", "", "", "NHS", "NH"]
        );
        assert_eq!(reps[1].component(4).as_deref(), Some("RXX"));
        assert!(pid.repetitions(2).is_empty());
    }

    #[test]
    fn canonical_input_round_trips_byte_for_byte() {
        let m = Message::parse(A28.as_bytes()).unwrap();
        assert_eq!(m.encode(), A28);
        assert_eq!(Message::parse_str(&m.encode()).unwrap(), m);
    }

    #[test]
    fn segment_with_only_an_id_and_trailing_separators() {
        let m = Message::parse_str("MSH|^~\\&|A\rPD1\rZXY|a||\r").unwrap();
        let pd1 = m.segment("PD1").unwrap();
        assert_eq!(pd1.field_count(), 0);
        assert_eq!(pd1.raw_field(1), None);
        let z = m.segment("ZXY").unwrap();
        assert_eq!(z.field_count(), 3);
        assert_eq!(z.raw_field(3), Some(""));
        assert_eq!(m.encode(), "MSH|^~\\&|A\rPD1\rZXY|a||\r");
    }

    #[test]
    fn subcomponents() {
        let m = Message::parse_str(
            "MSH|^~\\&|A\rPID|1||123^^^RXX&2.16.840.1.113883.2.1.3.2.4.18.24&ISO^MR\r",
        )
        .unwrap();
        assert_eq!(m.get("PID-3.4").as_deref(), Some("RXX"));
        assert_eq!(
            m.get("PID-3.4.2").as_deref(),
            Some("2.16.840.1.113883.2.1.3.2.4.18.24")
        );
        assert_eq!(m.get("PID-3.4.3").as_deref(), Some("ISO"));
        assert_eq!(m.get("PID-3.4.4"), None);
        let f = &m.segment("PID").unwrap().repetitions(3)[0];
        assert_eq!(
            f.subcomponents(4),
            vec!["RXX", "2.16.840.1.113883.2.1.3.2.4.18.24", "ISO"]
        );
        assert_eq!(f.subcomponent(4, 3).as_deref(), Some("ISO"));
        assert_eq!(f.subcomponent(0, 1), None);
        assert!(f.subcomponents(9).is_empty());
    }

    #[test]
    fn line_endings_bom_and_blank_lines_are_normalised() {
        let canonical = Message::parse(A28.as_bytes()).unwrap();
        let lf = A28.replace('\r', "\n");
        let crlf = A28.replace('\r', "\r\n");
        let mixed = A28.replacen('\r', "\n", 1).replacen('\r', "\r\n", 1);
        let bom = format!("\u{FEFF}{lf}\n\n\r\n");
        let leading = format!("\r\n\n{A28}");
        let no_final = A28.trim_end_matches('\r').to_string();
        for variant in [lf, crlf, mixed, bom, leading, no_final] {
            let m = Message::parse(variant.as_bytes()).unwrap();
            assert_eq!(m, canonical, "{variant:?}");
            assert_eq!(m.encode(), A28);
            assert_eq!(Message::parse_str(&variant).unwrap(), canonical);
        }
    }

    #[test]
    fn other_delimiters_and_the_truncation_character() {
        let m = Message::parse_str("MSH#*!$%#PAS#RXX#HUB#RXX#20260301##ADT*A28#1#P#2.4\rPID#1##9449305552***NHS*NH!RXX1***RXX*MR##A$F$B$S$C\r")
            .unwrap();
        assert_eq!(m.delimiters().field, '#');
        assert_eq!(m.delimiters().escape, '$');
        assert_eq!(m.get("PID-3(2).5").as_deref(), Some("MR"));
        assert_eq!(m.get("PID-5").as_deref(), Some("A#B*C"));
        assert_eq!(m.get("MSH-1").as_deref(), Some("#"));
        assert_eq!(m.message_type().1.as_deref(), Some("A28"));
        let t = Message::parse_str(
            "MSH|^~\\&#|PAS|RXX|||20260301||ADT^A31^ADT_A05|2|P|2.8\rPID|1||X#\r",
        )
        .unwrap();
        assert_eq!(t.get("MSH-2").as_deref(), Some("^~\\&#"));
        assert_eq!(t.get("PID-3").as_deref(), Some("X#"));
        assert_eq!(t.version().as_deref(), Some("2.8"));
        assert_eq!(
            t.encode(),
            "MSH|^~\\&#|PAS|RXX|||20260301||ADT^A31^ADT_A05|2|P|2.8\rPID|1||X#\r"
        );
    }

    #[test]
    fn structural_errors() {
        let err = |s: &[u8]| Message::parse(s).unwrap_err();
        assert_eq!(err(b"").code, ErrorCode::SegmentSequence);
        assert_eq!(err(b"\r\n").code, ErrorCode::SegmentSequence);
        let e = err(b"PID|1\rMSH|^~\\&\r");
        assert!(e.message.contains("start with an MSH"), "{e}");
        let e = err(b"MSH");
        assert_eq!(
            (e.code, e.field),
            (ErrorCode::RequiredFieldMissing, Some(1))
        );
        let e = err(b"MSHA^~\\&");
        assert_eq!((e.code, e.field), (ErrorCode::DataType, Some(1)));
        let e = err(b"MSH|^~\\");
        assert_eq!(e.field, Some(2));
        assert!(e.message.contains("4 encoding characters"), "{e}");
        let e = err(b"MSH|^~\\&#!|A");
        assert_eq!(e.field, Some(2));
        let e = err(b"MSH|^^\\&|A");
        assert!(e.message.contains("two delimiters"), "{e}");
        let e = err(b"MSH|^~\\|");
        assert_eq!(e.field, Some(2));
        let e = err(b"MSH|^~|&|A");
        assert_eq!(e.field, Some(2));
        let e = err(b"MSH|^~\\&a|A");
        assert!(e.message.contains("truncation"), "{e}");
        let e = err(b"MSH|^~\\&|A\rPID|1\rMSH|^~\\&|B\r");
        assert_eq!(
            (e.code, e.segment.clone()),
            (ErrorCode::SegmentSequence, Some(("MSH".to_string(), 2)))
        );
        let e = err(b"MSH|^~\\&|A\rpid|1\r");
        assert!(
            e.message.contains("line 2") && e.message.contains("\"pid\""),
            "{e}"
        );
        let e = err(b"MSH|^~\\&|A\rfree text that wrapped\r");
        assert_eq!(e.code, ErrorCode::SegmentSequence);
        let e = err(b"FHS|^~\\&\rBHS|^~\\&\r");
        assert_eq!(e.code, ErrorCode::SegmentSequence);
    }

    #[test]
    fn charsets() {
        // Latin-1 bytes decoded, and \X..\ read as Latin-1.
        let mut raw =
            b"MSH|^~\\&|PAS|RXX|||20260301||ADT^A31|3|P|2.4||||||8859/1\rPID|1||||M".to_vec();
        raw.push(0xDC);
        raw.extend_from_slice(b"LLER^Ren\\XE9\\e\r");
        let m = Message::parse(&raw).unwrap();
        assert_eq!(m.charset(), Charset::Latin1);
        assert_eq!(m.get("PID-5.1").as_deref(), Some("MÜLLER"));
        assert_eq!(m.get("PID-5.2").as_deref(), Some("Renée"));
        assert_eq!(m.encode_bytes(), raw);
        assert_eq!(Message::parse(&m.encode_bytes()).unwrap(), m);
        assert_eq!(Message::parse_str(&m.encode()).unwrap(), m);
        // UTF-8 (default and declared), with \X..\ read as UTF-8.
        let u = "MSH|^~\\&|PAS|RXX|||20260301||ADT^A31|3|P|2.4||||||UNICODE UTF-8\rPID|1||||O’Brien^Zo\\XC3AB\\\r";
        let m = Message::parse(u.as_bytes()).unwrap();
        assert_eq!(m.charset(), Charset::Utf8);
        assert_eq!(m.get("PID-5").as_deref(), Some("O’Brien"));
        assert_eq!(m.get("PID-5.2").as_deref(), Some("Zoë"));
        let m = Message::parse("MSH|^~\\&|A|||||||||||||||ASCII~8859/1\rPID|1||||Zoë\r".as_bytes())
            .unwrap();
        assert_eq!(m.charset(), Charset::Ascii);
        assert_eq!(m.get("PID-5").as_deref(), Some("Zoë"));
        // Invalid UTF-8 is an error naming where, not a panic.
        let mut bad = b"MSH|^~\\&|A\rEVN|A01\rPID|1||||M".to_vec();
        bad.push(0xFC);
        bad.extend_from_slice(b"LLER\r");
        let e = Message::parse(&bad).unwrap_err();
        assert_eq!(e.code, ErrorCode::DataType);
        assert_eq!(e.segment, Some(("PID".to_string(), 1)));
        assert!(e.message.contains("invalid UTF-8 at byte 29"), "{e}");
        // Unknown MSH-18 names the value.
        let e = Message::parse(b"MSH|^~\\&|A|||||||||||||||8859/15\r").unwrap_err();
        assert_eq!((e.code, e.field), (ErrorCode::TableValueNotFound, Some(18)));
        assert!(e.message.contains("\"8859/15\""), "{e}");
        assert!(Message::parse_str("MSH|^~\\&|A|||||||||||||||ISO IR87\r").is_err());
    }

    #[test]
    fn escapes_are_decoded_on_read_only() {
        let src = "MSH|^~\\&|A\rNTE|1||Take \\T\\ shake\\.br\\Line 2 \\H\\bold\\N\\ \\F\\\\S\\\\R\\\\E\\ \\X4142\\\r";
        let m = Message::parse_str(src).unwrap();
        assert_eq!(
            m.get("NTE-3").as_deref(),
            Some("Take & shake\nLine 2 \\H\\bold\\N\\ |^~\\ AB")
        );
        assert_eq!(
            m.segment("NTE").unwrap().raw_field(3),
            Some("Take \\T\\ shake\\.br\\Line 2 \\H\\bold\\N\\ \\F\\\\S\\\\R\\\\E\\ \\X4142\\")
        );
        assert_eq!(m.encode(), src);
        let reps = m.segment("NTE").unwrap().repetitions(3);
        assert_eq!(reps.len(), 1);
        assert_eq!(reps[0].components().len(), 1);
    }

    #[test]
    fn segment_sequences() {
        let m =
            Message::parse_str("MSH|^~\\&|A\rPID|1||A1\rMRG|OLD1\rPID|2||A2\rMRG|OLD2\r").unwrap();
        assert_eq!(m.segments_named("PID").count(), 2);
        assert_eq!(m.get("PID(2)-3").as_deref(), Some("A2"));
        assert_eq!(m.get("MRG(2)-1").as_deref(), Some("OLD2"));
        assert_eq!(m.get("MRG(3)-1"), None);
        assert_eq!(m.segment("MRG").unwrap().raw_field(1), Some("OLD1"));
    }
}
