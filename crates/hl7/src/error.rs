//! Errors: the parse error reported to callers and to the sender (through an ACK's ERR segment), its HL7 error
//! code (table 0357), and the error of a bad terser path when building a message.

use std::fmt;

/// HL7 table 0357 (message error condition codes), the subset a receiving hub reports. The number is what goes
/// into ERR-3 of a negative acknowledgement, so the sender's engine can classify the failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 100: segments out of order, an unexpected or malformed segment.
    SegmentSequence,
    /// 101: a required field is missing.
    RequiredFieldMissing,
    /// 102: a value does not match its data type (also used for undecodable bytes).
    DataType,
    /// 103: a coded value is not in its table (also an unknown character set in MSH-18).
    TableValueNotFound,
    /// 200: the message type (MSH-9.1) is not handled.
    UnsupportedMessageType,
    /// 201: the trigger event (MSH-9.2) is not handled.
    UnsupportedEventCode,
    /// 202: the processing id (MSH-11) is not accepted.
    UnsupportedProcessingId,
    /// 203: the version (MSH-12) is not supported.
    UnsupportedVersionId,
    /// 204: a referenced key (patient, appointment) is unknown.
    UnknownKeyIdentifier,
    /// 205: a key that must be unique already exists.
    DuplicateKeyIdentifier,
    /// 207: the receiver failed for a reason of its own.
    ApplicationInternalError,
}

impl ErrorCode {
    /// Every code, in table order.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::SegmentSequence,
        ErrorCode::RequiredFieldMissing,
        ErrorCode::DataType,
        ErrorCode::TableValueNotFound,
        ErrorCode::UnsupportedMessageType,
        ErrorCode::UnsupportedEventCode,
        ErrorCode::UnsupportedProcessingId,
        ErrorCode::UnsupportedVersionId,
        ErrorCode::UnknownKeyIdentifier,
        ErrorCode::DuplicateKeyIdentifier,
        ErrorCode::ApplicationInternalError,
    ];

    /// The numeric code of table 0357.
    pub fn code(&self) -> u16 {
        match self {
            ErrorCode::SegmentSequence => 100,
            ErrorCode::RequiredFieldMissing => 101,
            ErrorCode::DataType => 102,
            ErrorCode::TableValueNotFound => 103,
            ErrorCode::UnsupportedMessageType => 200,
            ErrorCode::UnsupportedEventCode => 201,
            ErrorCode::UnsupportedProcessingId => 202,
            ErrorCode::UnsupportedVersionId => 203,
            ErrorCode::UnknownKeyIdentifier => 204,
            ErrorCode::DuplicateKeyIdentifier => 205,
            ErrorCode::ApplicationInternalError => 207,
        }
    }

    /// The display text of table 0357.
    pub fn text(&self) -> &'static str {
        match self {
            ErrorCode::SegmentSequence => "Segment sequence error",
            ErrorCode::RequiredFieldMissing => "Required field missing",
            ErrorCode::DataType => "Data type error",
            ErrorCode::TableValueNotFound => "Table value not found",
            ErrorCode::UnsupportedMessageType => "Unsupported message type",
            ErrorCode::UnsupportedEventCode => "Unsupported event code",
            ErrorCode::UnsupportedProcessingId => "Unsupported processing id",
            ErrorCode::UnsupportedVersionId => "Unsupported version id",
            ErrorCode::UnknownKeyIdentifier => "Unknown key identifier",
            ErrorCode::DuplicateKeyIdentifier => "Duplicate key identifier",
            ErrorCode::ApplicationInternalError => "Application internal error",
        }
    }

    /// The code with this number, if it is one of the subset.
    pub fn from_code(code: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.code() == code)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.text())
    }
}

/// Why a message could not be parsed (structural problems only: no MSH first, bad delimiters, an unknown or
/// violated character set, a malformed segment id). Carries what an ACK's ERR segment needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The table 0357 code.
    pub code: ErrorCode,
    /// Segment id and its sequence (1-based occurrence of that id in the message), when known.
    pub segment: Option<(String, usize)>,
    /// Field position (standard numbering), when known.
    pub field: Option<usize>,
    /// Human-readable diagnostic.
    pub message: String,
}

impl ParseError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> ParseError {
        ParseError {
            code,
            segment: None,
            field: None,
            message: message.into(),
        }
    }

    pub(crate) fn at(mut self, segment: &str, sequence: usize, field: Option<usize>) -> ParseError {
        self.segment = Some((segment.to_string(), sequence));
        self.field = field;
        self
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HL7 {}", self.code)?;
        if let Some((seg, seq)) = &self.segment {
            write!(f, " at {seg}({seq})")?;
            if let Some(field) = self.field {
                write!(f, "-{field}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ParseError {}

/// A terser path that is malformed, or that cannot be set (MSH-1/MSH-2, a raw value that would break the
/// message's structure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError {
    /// The path as given.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

impl PathError {
    pub(crate) fn new(path: &str, reason: impl Into<String>) -> PathError {
        PathError {
            path: path.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HL7 path {:?}: {}", self.path, self.reason)
    }
}

impl std::error::Error for PathError {}

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
    fn codes_and_texts_follow_table_0357() {
        let pairs: Vec<(u16, &str)> = ErrorCode::ALL
            .iter()
            .map(|c| (c.code(), c.text()))
            .collect();
        assert_eq!(pairs[0], (100, "Segment sequence error"));
        assert_eq!(pairs[3], (103, "Table value not found"));
        assert_eq!(pairs[10], (207, "Application internal error"));
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(c.code()), Some(c));
        }
        assert_eq!(ErrorCode::from_code(206), None);
        assert_eq!(ErrorCode::from_code(0), None);
    }

    #[test]
    fn display_names_location() {
        let e = ParseError::new(ErrorCode::RequiredFieldMissing, "PID-3 is empty").at(
            "PID",
            1,
            Some(3),
        );
        assert_eq!(
            e.to_string(),
            "HL7 101 Required field missing at PID(1)-3: PID-3 is empty"
        );
    }
}
