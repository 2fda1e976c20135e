//! Building outbound messages (ADT A28/A31, SIU S12..S26, ACKs): start from an MSH, then set values by terser
//! path. Values given to `set` are escaped, so no text can break the structure.
//!
//! A path replaces exactly the level it names: `PID-3` the whole field (every repetition), `PID-3(2)` one
//! repetition, `PID-3(2).1` one component, `PID-3(2).4.2` one subcomponent. Levels left out above the named
//! one are the first (`PID-3.1` is `PID-3(1).1`). Missing segments, fields, repetitions and components are
//! created empty on the way; trailing empty fields, repetitions, components and subcomponents are dropped
//! (HL7 lets them be left out), so setting an empty value never leaves dangling separators.
//!
//! ```
//! use hl7::{Header, MessageBuilder};
//! let msg = MessageBuilder::with_header(&Header {
//!     sending_application: "CAREBRIDGE".into(),
//!     sending_facility: "RXX".into(),
//!     receiving_application: "PAS".into(),
//!     receiving_facility: "RXX01".into(),
//!     timestamp: "20260301093000".into(),
//!     message_type: "ADT".into(),
//!     trigger_event: "A28".into(),
//!     message_structure: "ADT_A05".into(),
//!     control_id: "CB000001".into(),
//!     ..Header::default()
//! })
//! .set("EVN-1", "A28")
//! .set("PID-3(1).1", "9449305552")
//! .set("PID-3(1).4", "NHS")
//! .set("PID-3(1).5", "NH")
//! .set("PID-5.1", "O'Brien & Sons")
//! .build()
//! .unwrap();
//! assert_eq!(msg.get("PID-5.1").as_deref(), Some("O'Brien & Sons"));
//! assert!(msg.encode().contains("PID|||9449305552^^^NHS^NH||O'Brien \\T\\ Sons\r"));
//! ```

use crate::delimiters::{Charset, Delimiters};
use crate::error::{ErrorCode, ParseError, PathError};
use crate::escape::escape;
use crate::message::{Message, Segment};
use crate::path::{Path, is_segment_id};

impl Message {
    /// A message holding only `MSH|^~\&` (standard delimiters, UTF-8), to be filled with [`Message::set`].
    pub fn new() -> Message {
        Message::header_only(Delimiters::default(), None)
    }

    /// A message holding only an MSH with these delimiters, or an error when they are not usable.
    pub fn with_delimiters(d: Delimiters) -> Result<Message, ParseError> {
        d.validate()
            .map_err(|e| ParseError::new(ErrorCode::DataType, e).at("MSH", 1, Some(2)))?;
        Ok(Message::header_only(d, None))
    }

    /// MSH with these (already valid) delimiters and MSH-2 written as given (e.g. with a truncation character).
    pub(crate) fn header_only(d: Delimiters, msh2: Option<&str>) -> Message {
        let enc = msh2.map_or_else(|| d.encoding_characters(), str::to_string);
        let line = format!("MSH{}{}", d.field, enc);
        Message {
            segments: vec![Segment::from_line(&line, d, Charset::Utf8)],
            delimiters: d,
            charset: Charset::Utf8,
        }
    }

    /// A message of one MSH segment whose fields from MSH-3 on are `fields` (raw text), written as the path
    /// setters would leave them: trailing empty fields dropped. `msh2`: the encoding characters (else those of
    /// `d`).
    pub(crate) fn with_msh_fields(d: Delimiters, msh2: Option<&str>, fields: &[&str]) -> Message {
        let enc = msh2.map_or_else(|| d.encoding_characters(), str::to_string);
        let used = fields
            .iter()
            .rposition(|f| !f.is_empty())
            .map_or(0, |i| i + 1);
        let mut line =
            String::with_capacity(64 + fields.iter().map(|f| f.len() + 1).sum::<usize>());
        line.push_str("MSH");
        line.push(d.field);
        line.push_str(&enc);
        for f in &fields[..used] {
            line.push(d.field);
            line.push_str(f);
        }
        Message {
            segments: vec![Segment::from_line(&line, d, Charset::Utf8)],
            delimiters: d,
            charset: Charset::Utf8,
        }
    }

    /// Sets the value at `path` (see the module docs for which level is replaced), escaping it. Setting MSH-18
    /// changes the message's character set, and must name a supported one.
    pub fn set(&mut self, path: &str, value: &str) -> Result<(), PathError> {
        let raw = escape(value, &self.delimiters);
        self.set_raw(path, &raw)
    }

    /// Sets already-escaped text at `path`. It may hold the separators below the level it replaces (`^` in a
    /// field, `&` in a component) but never CR, LF, the field separator, or a separator of its own level or
    /// above.
    pub fn set_raw(&mut self, path: &str, raw: &str) -> Result<(), PathError> {
        let p = Path::parse(path)?;
        let d = self.delimiters;
        let forbidden = [d.field, d.repetition, d.component, d.subcomponent];
        let depth = p.depth();
        if raw.contains(['\r', '\n'])
            || raw
                .chars()
                .any(|c| forbidden.iter().take(depth + 1).any(|f| *f == c))
        {
            return Err(PathError::new(
                path,
                "the raw value holds a line break or a separator of its level or above",
            ));
        }
        if p.segment == "MSH" && (p.field <= 2 || p.segment_rep > 1) {
            return Err(PathError::new(
                path,
                "MSH-1, MSH-2 and a second MSH cannot be set (delimiters are fixed)",
            ));
        }
        let index = self.segment_index(&p.segment, p.segment_rep);
        let Some(segment) = self.segments.get(index) else {
            return Err(PathError::new(path, "segment could not be created"));
        };
        let current = segment.raw_field(p.field).unwrap_or_default().to_string();
        let seps = [d.repetition, d.component, d.subcomponent];
        let idx = [
            p.rep.unwrap_or(1),
            p.component.unwrap_or(1),
            p.subcomponent.unwrap_or(1),
        ];
        let new_field = replace_at(&current, &seps[..depth], &idx[..depth], raw);
        let before = segment.clone();
        self.replace_field(index, p.field, &new_field);
        if p.segment == "MSH" && p.field == 18 {
            let name = self.get("MSH-18").unwrap_or_default();
            match Charset::from_msh18(&name) {
                Some(cs) => self.set_charset(cs),
                None => {
                    if let Some(slot) = self.segments.get_mut(index) {
                        *slot = before;
                    }
                    return Err(PathError::new(
                        path,
                        format!("unsupported character set {name:?}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Appends an empty segment with this id and returns its sequence (1-based occurrence among segments with
    /// that id), to address it as `NAME(n)-f`.
    pub fn push_segment(&mut self, name: &str) -> Result<usize, PathError> {
        if !is_segment_id(name) || name == "MSH" {
            return Err(PathError::new(
                name,
                "a segment id is three upper-case letters or digits, not MSH",
            ));
        }
        self.segments
            .push(Segment::from_line(name, self.delimiters, self.charset));
        Ok(self.segments_named(name).count())
    }

    /// Index in `segments` of occurrence `rep` of `name`, appending empty segments until it exists.
    fn segment_index(&mut self, name: &str, rep: usize) -> usize {
        let mut seen = 0;
        for (i, s) in self.segments.iter().enumerate() {
            if s.name() == name {
                seen += 1;
                if seen == rep {
                    return i;
                }
            }
        }
        while seen < rep {
            self.segments
                .push(Segment::from_line(name, self.delimiters, self.charset));
            seen += 1;
        }
        self.segments.len() - 1
    }

    /// Replaces field `n` of segment `index` by `raw`, padding with empty fields when needed and dropping
    /// trailing empty fields.
    fn replace_field(&mut self, index: usize, n: usize, raw: &str) {
        let Some(segment) = self.segments.get(index) else {
            return;
        };
        let d = *segment.delimiters();
        let first = if segment.is_msh() { 3 } else { 1 };
        let count = segment.field_count().max(n);
        let mut fields: Vec<&str> = (first..=count)
            .map(|i| {
                if i == n {
                    raw
                } else {
                    segment.raw_field(i).unwrap_or_default()
                }
            })
            .collect();
        while fields.last().is_some_and(|f| f.is_empty()) {
            fields.pop();
        }
        let mut line = String::with_capacity(segment.raw().len() + raw.len() + n);
        line.push_str(segment.name());
        if segment.is_msh() {
            line.push(d.field);
            line.push_str(segment.raw_field(2).unwrap_or_default());
        }
        for f in fields {
            line.push(d.field);
            line.push_str(f);
        }
        let charset = self.charset;
        if let Some(slot) = self.segments.get_mut(index) {
            *slot = Segment::from_line(&line, d, charset);
        }
    }

    pub(crate) fn set_charset(&mut self, cs: Charset) {
        self.charset = cs;
        for s in &mut self.segments {
            *s = Segment::from_line(s.raw(), self.delimiters, cs);
        }
    }
}

impl Default for Message {
    fn default() -> Self {
        Message::new()
    }
}

/// Splits `current` on `seps[0]`, replaces piece `idx[0]` (padding with empty pieces) recursively, drops
/// trailing empty pieces (HL7 lets them be left out) and joins back.
fn replace_at(current: &str, seps: &[char], idx: &[usize], value: &str) -> String {
    let (Some(&sep), Some(&i)) = (seps.first(), idx.first()) else {
        return value.to_string();
    };
    let mut pieces: Vec<String> = current.split(sep).map(str::to_string).collect();
    if pieces.len() < i {
        pieces.resize(i, String::new());
    }
    if let Some(slot) = pieces.get_mut(i - 1) {
        *slot = replace_at(
            slot,
            seps.get(1..).unwrap_or_default(),
            idx.get(1..).unwrap_or_default(),
            value,
        );
    }
    while pieces.len() > 1 && pieces.last().is_some_and(String::is_empty) {
        pieces.pop();
    }
    pieces.join(&sep.to_string())
}

/// The MSH values of an outbound message, for [`MessageBuilder::with_header`]. Empty strings are left unset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// MSH-3.1.
    pub sending_application: String,
    /// MSH-4.1 (an ODS code in NHS feeds).
    pub sending_facility: String,
    /// MSH-5.1.
    pub receiving_application: String,
    /// MSH-6.1.
    pub receiving_facility: String,
    /// MSH-7, e.g. `20260301093000+0000`.
    pub timestamp: String,
    /// MSH-9.1, e.g. `ADT`, `SIU`.
    pub message_type: String,
    /// MSH-9.2, e.g. `A28`, `S12`.
    pub trigger_event: String,
    /// MSH-9.3, e.g. `ADT_A05`, `SIU_S12`.
    pub message_structure: String,
    /// MSH-10.
    pub control_id: String,
    /// MSH-11.1 (`P`, `T` or `D`).
    pub processing_id: String,
    /// MSH-12.1.
    pub version: String,
    /// MSH-15 accept acknowledgement type (`AL`, `NE`, `ER`, `SU`), empty for original mode.
    pub accept_ack_type: String,
    /// MSH-16 application acknowledgement type, empty for original mode.
    pub application_ack_type: String,
    /// MSH-17, e.g. `GBR`.
    pub country: String,
    /// MSH-18, e.g. `UNICODE UTF-8`; must be a supported one.
    pub charset: String,
}

impl Default for Header {
    fn default() -> Self {
        Header {
            sending_application: String::new(),
            sending_facility: String::new(),
            receiving_application: String::new(),
            receiving_facility: String::new(),
            timestamp: String::new(),
            message_type: String::new(),
            trigger_event: String::new(),
            message_structure: String::new(),
            control_id: String::new(),
            processing_id: "P".into(),
            version: "2.4".into(),
            accept_ack_type: String::new(),
            application_ack_type: String::new(),
            country: String::new(),
            charset: String::new(),
        }
    }
}

/// Chained building of a message: each step records the first error, [`MessageBuilder::build`] returns it.
#[derive(Debug, Clone)]
pub struct MessageBuilder {
    message: Message,
    error: Option<PathError>,
}

impl Default for MessageBuilder {
    fn default() -> Self {
        MessageBuilder::new()
    }
}

impl MessageBuilder {
    /// Starts from `MSH|^~\&`.
    pub fn new() -> MessageBuilder {
        MessageBuilder {
            message: Message::new(),
            error: None,
        }
    }

    /// Starts from an MSH with other delimiters.
    pub fn with_delimiters(d: Delimiters) -> Result<MessageBuilder, ParseError> {
        Ok(MessageBuilder {
            message: Message::with_delimiters(d)?,
            error: None,
        })
    }

    /// Starts from an MSH filled from `h` (standard delimiters).
    pub fn with_header(h: &Header) -> MessageBuilder {
        let pairs = [
            ("MSH-3.1", &h.sending_application),
            ("MSH-4.1", &h.sending_facility),
            ("MSH-5.1", &h.receiving_application),
            ("MSH-6.1", &h.receiving_facility),
            ("MSH-7", &h.timestamp),
            ("MSH-9.1", &h.message_type),
            ("MSH-9.2", &h.trigger_event),
            ("MSH-9.3", &h.message_structure),
            ("MSH-10", &h.control_id),
            ("MSH-11.1", &h.processing_id),
            ("MSH-12.1", &h.version),
            ("MSH-15", &h.accept_ack_type),
            ("MSH-16", &h.application_ack_type),
            ("MSH-17", &h.country),
            ("MSH-18", &h.charset),
        ];
        pairs
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .fold(MessageBuilder::new(), |b, (p, v)| b.set(p, v))
    }

    /// Sets an escaped value (see [`Message::set`]).
    pub fn set(mut self, path: &str, value: &str) -> MessageBuilder {
        if self.error.is_none() {
            self.error = self.message.set(path, value).err();
        }
        self
    }

    /// Sets a raw value (see [`Message::set_raw`]).
    pub fn set_raw(mut self, path: &str, raw: &str) -> MessageBuilder {
        if self.error.is_none() {
            self.error = self.message.set_raw(path, raw).err();
        }
        self
    }

    /// Appends an empty segment (see [`Message::push_segment`]).
    pub fn segment(mut self, name: &str) -> MessageBuilder {
        if self.error.is_none() {
            self.error = self.message.push_segment(name).err();
        }
        self
    }

    /// The message, or the first error met.
    pub fn build(self) -> Result<Message, PathError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.message),
        }
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

    #[test]
    fn set_replaces_exactly_the_named_level() {
        let mut m = Message::new();
        m.set("PID-3(2).4.2", "2.16.840.1.113883.2.1.3.2.4.18.24")
            .unwrap();
        assert_eq!(
            m.segment("PID").unwrap().raw(),
            "PID|||~^^^&2.16.840.1.113883.2.1.3.2.4.18.24"
        );
        m.set("PID-3(1).1", "9449305552").unwrap();
        m.set("PID-3.4", "NHS").unwrap();
        m.set("PID-3(2).4.1", "RXX").unwrap();
        assert_eq!(
            m.segment("PID").unwrap().raw_field(3),
            Some("9449305552^^^NHS~^^^RXX&2.16.840.1.113883.2.1.3.2.4.18.24")
        );
        m.set("PID-3(2)", "X^Y").unwrap();
        assert_eq!(
            m.segment("PID").unwrap().raw_field(3),
            Some("9449305552^^^NHS~X\\S\\Y")
        );
        assert_eq!(m.get("PID-3(2)").as_deref(), Some("X^Y"));
        m.set("PID-3", "whole").unwrap();
        assert_eq!(m.segment("PID").unwrap().raw_field(3), Some("whole"));
        m.set("PID-1", "").unwrap();
        assert_eq!(m.encode(), "MSH|^~\\&\rPID|||whole\r");
    }

    #[test]
    fn msh_fields_keep_their_numbering() {
        let mut m = Message::new();
        m.set("MSH-3", "CAREBRIDGE").unwrap();
        m.set("MSH-9.1", "SIU").unwrap();
        m.set("MSH-9.2", "S12").unwrap();
        m.set("MSH-10", "1").unwrap();
        assert_eq!(m.encode(), "MSH|^~\\&|CAREBRIDGE||||||SIU^S12|1\r");
        assert!(m.set("MSH-1", "#").is_err());
        assert!(m.set("MSH-2", "x").is_err());
        assert!(m.set("MSH(2)-3", "x").is_err());
        assert_eq!(Message::parse_str(&m.encode()).unwrap(), m);
    }

    #[test]
    fn msh18_changes_the_charset_or_is_refused() {
        let mut m = Message::new();
        m.set("MSH-18", "8859/1").unwrap();
        assert_eq!(m.charset(), Charset::Latin1);
        m.set("PID-5.1", "Zoë").unwrap();
        assert_eq!(m.encode_bytes().iter().filter(|&&b| b == 0xEB).count(), 1);
        let err = m.set("MSH-18", "KLINGON").unwrap_err();
        assert!(err.reason.contains("KLINGON"));
        assert_eq!(m.charset(), Charset::Latin1);
        assert_eq!(m.get("MSH-18").as_deref(), Some("8859/1"));
        let back = Message::parse(&m.encode_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.get("PID-5.1").as_deref(), Some("Zoë"));
    }

    #[test]
    fn set_raw_refuses_what_would_break_the_structure() {
        let mut m = Message::new();
        assert!(m.set_raw("PID-5", "A^B&C~D").is_ok());
        assert!(m.set_raw("PID-5", "A|B").is_err());
        assert!(m.set_raw("PID-5", "A\rB").is_err());
        assert!(m.set_raw("PID-5(1)", "A~B").is_err());
        assert!(m.set_raw("PID-5.1", "A^B").is_err());
        assert!(m.set_raw("PID-5.1", "A&B").is_ok());
        assert!(m.set_raw("PID-5.1.1", "A&B").is_err());
        assert!(m.set("PID-5.1.1", "A&B|C\rD~E^F").is_ok());
        assert_eq!(m.get("PID-5.1.1").as_deref(), Some("A&B|C\nD~E^F"));
    }

    #[test]
    fn segments_are_created_and_pushed() {
        let mut m = Message::new();
        m.set("OBX(2)-5", "second").unwrap();
        assert_eq!(m.segments_named("OBX").count(), 2);
        assert_eq!(m.push_segment("OBX").unwrap(), 3);
        m.set("OBX(3)-5", "third").unwrap();
        assert_eq!(m.get("OBX(3)-5").as_deref(), Some("third"));
        assert_eq!(m.get("OBX(1)-5"), None);
        assert!(m.push_segment("MSH").is_err());
        assert!(m.push_segment("obx").is_err());
        assert_eq!(
            m.encode(),
            "MSH|^~\\&\rOBX\rOBX|||||second\rOBX|||||third\r"
        );
    }

    #[test]
    fn builder_records_the_first_error() {
        let err = MessageBuilder::new()
            .set("PID-3", "a")
            .set("bad", "b")
            .set("also bad", "c")
            .build()
            .unwrap_err();
        assert_eq!(err.path, "bad");
        let odd = Delimiters {
            field: '#',
            component: '*',
            repetition: '!',
            escape: '$',
            subcomponent: '%',
        };
        let m = MessageBuilder::with_delimiters(odd)
            .unwrap()
            .set("PID-5.1", "a#b")
            .segment("ZZZ")
            .build()
            .unwrap();
        assert_eq!(m.encode(), "MSH#*!$%\rPID#####a$F$b\rZZZ\r");
        assert_eq!(Message::parse_str(&m.encode()).unwrap(), m);
        let bad = Delimiters {
            component: '|',
            ..Delimiters::default()
        };
        assert!(MessageBuilder::with_delimiters(bad).is_err());
    }
}
