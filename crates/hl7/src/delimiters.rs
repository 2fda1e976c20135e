//! The five delimiters of a message (MSH-1 and MSH-2) and the character set of MSH-18: both are read from the
//! header before anything else, because every later byte is interpreted through them.

/// The delimiters a message declares in MSH-1 (field) and MSH-2 (component, repetition, escape, subcomponent,
/// in that order). Any distinct printable ASCII punctuation is allowed; the defaults are `|^~\&`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Delimiters {
    /// Field separator (MSH-1), usually `|`.
    pub field: char,
    /// Component separator, usually `^`.
    pub component: char,
    /// Repetition separator, usually `~`.
    pub repetition: char,
    /// Escape character, usually `\`.
    pub escape: char,
    /// Subcomponent separator, usually `&`.
    pub subcomponent: char,
}

impl Default for Delimiters {
    fn default() -> Self {
        Delimiters {
            field: '|',
            component: '^',
            repetition: '~',
            escape: '\\',
            subcomponent: '&',
        }
    }
}

impl Delimiters {
    /// MSH-2 as written for these delimiters: component, repetition, escape, subcomponent.
    pub fn encoding_characters(&self) -> String {
        [
            self.component,
            self.repetition,
            self.escape,
            self.subcomponent,
        ]
        .iter()
        .collect()
    }

    /// Checks that the five characters are distinct printable ASCII punctuation (letters, digits, space and
    /// control characters would make values ambiguous).
    pub fn validate(&self) -> Result<(), String> {
        let all = [
            self.field,
            self.component,
            self.repetition,
            self.escape,
            self.subcomponent,
        ];
        for (i, c) in all.iter().enumerate() {
            if !is_delimiter_char(*c) {
                return Err(format!(
                    "{c:?} cannot be a delimiter (printable ASCII punctuation only)"
                ));
            }
            if all.iter().skip(i + 1).any(|o| o == c) {
                return Err(format!("{c:?} is used for two delimiters"));
            }
        }
        Ok(())
    }

    /// Whether `c` is one of the five delimiters.
    pub(crate) fn is_special(&self, c: char) -> bool {
        c == self.field
            || c == self.component
            || c == self.repetition
            || c == self.escape
            || c == self.subcomponent
    }
}

/// Printable ASCII that is neither a letter, a digit nor a space.
pub(crate) fn is_delimiter_char(c: char) -> bool {
    c.is_ascii_graphic() && !c.is_ascii_alphanumeric()
}

/// The character set of a message, from MSH-18 (first repetition). It decides how the bytes are decoded and how
/// `\Xhh..\` escapes are turned into text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Charset {
    /// `ASCII`. Read as UTF-8 (a superset), since senders that declare ASCII often send UTF-8.
    Ascii,
    /// Empty MSH-18 (the hub's default), `UNICODE UTF-8`, and the aliases `UNICODE` (as NHS ITK senders use
    /// it), `UTF-8` and `UTF8`.
    #[default]
    Utf8,
    /// `8859/1` (also `ISO-8859-1`, `ISO8859-1`, `LATIN1`): one byte per character.
    Latin1,
}

impl Charset {
    /// The charset named by an MSH-18 value, or `None` when it is not supported.
    pub fn from_msh18(value: &str) -> Option<Charset> {
        let v = value.trim();
        if v.is_empty() {
            return Some(Charset::Utf8);
        }
        let upper = v.to_ascii_uppercase();
        match upper.as_str() {
            "ASCII" => Some(Charset::Ascii),
            "UNICODE UTF-8" | "UNICODE" | "UTF-8" | "UTF8" => Some(Charset::Utf8),
            "8859/1" | "ISO-8859-1" | "ISO8859-1" | "ISO_8859-1" | "LATIN1" | "LATIN-1" => {
                Some(Charset::Latin1)
            }
            _ => None,
        }
    }

    /// Turns decoded bytes (of a hex escape) into text, or `None` when they are not valid in this charset.
    pub(crate) fn decode_bytes(&self, bytes: &[u8]) -> Option<String> {
        match self {
            Charset::Utf8 | Charset::Ascii => String::from_utf8(bytes.to_vec()).ok(),
            Charset::Latin1 => Some(bytes.iter().map(|&b| char::from(b)).collect()),
        }
    }

    /// Encodes text for the wire in this charset. Latin-1 cannot carry characters above U+00FF: they become `?`.
    pub fn encode_text(&self, text: &str) -> Vec<u8> {
        match self {
            Charset::Utf8 | Charset::Ascii => text.as_bytes().to_vec(),
            Charset::Latin1 => text
                .chars()
                .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
                .collect(),
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
    fn default_delimiters_are_the_standard_ones() {
        let d = Delimiters::default();
        assert_eq!(d.encoding_characters(), "^~\\&");
        assert!(d.validate().is_ok());
    }

    #[test]
    fn validate_refuses_duplicates_and_letters() {
        let dup = Delimiters {
            component: '~',
            ..Delimiters::default()
        };
        assert!(dup.validate().unwrap_err().contains("two delimiters"));
        let letter = Delimiters {
            escape: 'E',
            ..Delimiters::default()
        };
        assert!(letter.validate().is_err());
        let space = Delimiters {
            field: ' ',
            ..Delimiters::default()
        };
        assert!(space.validate().is_err());
        let odd = Delimiters {
            field: '#',
            component: '*',
            repetition: '!',
            escape: '$',
            subcomponent: '%',
        };
        assert!(odd.validate().is_ok());
    }

    #[test]
    fn msh18_names() {
        assert_eq!(Charset::from_msh18(""), Some(Charset::Utf8));
        assert_eq!(Charset::from_msh18("UNICODE UTF-8"), Some(Charset::Utf8));
        assert_eq!(Charset::from_msh18("UNICODE"), Some(Charset::Utf8));
        assert_eq!(Charset::from_msh18("ASCII"), Some(Charset::Ascii));
        assert_eq!(Charset::from_msh18("8859/1"), Some(Charset::Latin1));
        assert_eq!(Charset::from_msh18(" 8859/1 "), Some(Charset::Latin1));
        assert_eq!(Charset::from_msh18("8859/7"), None);
        assert_eq!(Charset::from_msh18("UNICODE UTF-16"), None);
    }

    #[test]
    fn latin1_round_trip_and_replacement() {
        assert_eq!(
            Charset::Latin1.decode_bytes(&[0x4A, 0xE9]).as_deref(),
            Some("Jé")
        );
        assert_eq!(Charset::Latin1.encode_text("Jé€"), vec![0x4A, 0xE9, b'?']);
        assert_eq!(Charset::Utf8.decode_bytes(&[0xE9]), None);
        assert_eq!(
            Charset::Utf8.decode_bytes(&[0xC3, 0xA9]).as_deref(),
            Some("é")
        );
    }
}
