//! Escape sequences: values that contain a delimiter travel as `\F\ \S\ \T\ \R\ \E\`, line breaks as `\.br\`
//! and arbitrary bytes as `\Xhh..\`. The message keeps the escaped (raw) text; these functions convert at the
//! edges, when a value is read or written.

use crate::delimiters::{Charset, Delimiters};

/// Escapes `text` so it can be placed in a field, component or subcomponent: each delimiter becomes its escape
/// sequence and every line break (CRLF, LF or a lone CR) becomes `\.br\` (`\X0A\` when `.` is a delimiter), so a
/// value can never split a segment.
pub fn escape(text: &str, d: &Delimiters) -> String {
    if !text
        .chars()
        .any(|c| d.is_special(c) || c == '\r' || c == '\n')
    {
        return text.to_string();
    }
    // `\.br\` would hold a delimiter when `.` is one; the hex form of LF is the same line break.
    let line_break = if d.is_special('.') { "X0A" } else { ".br" };
    let mut out = String::with_capacity(text.len() + 8);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let code = if c == d.escape {
            "E"
        } else if c == d.field {
            "F"
        } else if c == d.component {
            "S"
        } else if c == d.subcomponent {
            "T"
        } else if c == d.repetition {
            "R"
        } else if c == '\n' {
            line_break
        } else if c == '\r' {
            if chars.peek() == Some(&'\n') {
                chars.next();
            }
            line_break
        } else {
            out.push(c);
            continue;
        };
        out.push(d.escape);
        out.push_str(code);
        out.push(d.escape);
    }
    out
}

/// Decodes the escape sequences of a raw value, taking `\Xhh..\` bytes as UTF-8. See [`unescape_with`].
pub fn unescape(raw: &str, d: &Delimiters) -> String {
    unescape_with(raw, d, Charset::Utf8)
}

/// Decodes the escape sequences of a raw value: `\F\ \S\ \T\ \R\ \E\` give the delimiter back, `\.br\` a
/// newline, `\Xhh..\` the bytes read in `charset`. Highlighting (`\H\ \N\`), local (`\Z..\`), other
/// formatting and character-set switches, and anything malformed (odd or non-hex digits, bytes that are not
/// valid in the charset, an unterminated sequence) are kept literally, so nothing is ever lost.
pub fn unescape_with(raw: &str, d: &Delimiters, charset: Charset) -> String {
    let mut out = String::with_capacity(raw.len());
    unescape_into(raw, d, charset, &mut out);
    out
}

pub(crate) fn unescape_into(raw: &str, d: &Delimiters, charset: Charset, out: &mut String) {
    let esc = d.escape;
    let mut rest = raw;
    while let Some(start) = rest.find(esc) {
        out.push_str(&rest[..start]);
        let after = &rest[start + esc.len_utf8()..];
        let Some(end) = after.find(esc) else {
            // Unterminated: keep the escape character and the rest as they are.
            out.push_str(&rest[start..]);
            return;
        };
        let seq = &after[..end];
        match seq {
            "F" => out.push(d.field),
            "S" => out.push(d.component),
            "T" => out.push(d.subcomponent),
            "R" => out.push(d.repetition),
            "E" => out.push(esc),
            _ if seq.eq_ignore_ascii_case(".br") => out.push('\n'),
            _ => match seq
                .strip_prefix('X')
                .and_then(|hex| decode_hex(hex, charset))
            {
                Some(text) => out.push_str(&text),
                None => {
                    out.push(esc);
                    out.push_str(seq);
                    out.push(esc);
                }
            },
        }
        rest = &after[end + esc.len_utf8()..];
    }
    out.push_str(rest);
}

fn decode_hex(hex: &str, charset: Charset) -> Option<String> {
    let digits = hex.as_bytes();
    if digits.is_empty() || !digits.len().is_multiple_of(2) {
        return None;
    }
    let mut bytes = Vec::with_capacity(digits.len() / 2);
    for pair in digits.chunks_exact(2) {
        let hi = hex_value(*pair.first()?)?;
        let lo = hex_value(*pair.get(1)?)?;
        bytes.push(hi << 4 | lo);
    }
    charset.decode_bytes(&bytes)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
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

    fn d() -> Delimiters {
        Delimiters::default()
    }

    #[test]
    fn delimiters_are_escaped_and_decoded() {
        let text = "Fish | Chips ^ Peas ~ Gravy \\ Salt & Vinegar";
        let raw = escape(text, &d());
        assert_eq!(
            raw,
            "Fish \\F\\ Chips \\S\\ Peas \\R\\ Gravy \\E\\ Salt \\T\\ Vinegar"
        );
        assert_eq!(unescape(&raw, &d()), text);
    }

    #[test]
    fn line_breaks_become_br_and_come_back_as_newlines() {
        assert_eq!(escape("a\nb\r\nc\rd", &d()), "a\\.br\\b\\.br\\c\\.br\\d");
        assert_eq!(unescape("a\\.br\\b", &d()), "a\nb");
        assert_eq!(unescape("a\\.BR\\b", &d()), "a\nb");
    }

    #[test]
    fn hex_follows_the_charset() {
        assert_eq!(unescape("\\X4142\\", &d()), "AB");
        assert_eq!(unescape("caf\\XC3A9\\", &d()), "café");
        assert_eq!(unescape_with("caf\\XE9\\", &d(), Charset::Latin1), "café");
        // Not UTF-8: kept as written.
        assert_eq!(unescape("caf\\XE9\\", &d()), "caf\\XE9\\");
        // Malformed hex: kept.
        assert_eq!(unescape("\\X4\\", &d()), "\\X4\\");
        assert_eq!(unescape("\\XZZ\\", &d()), "\\XZZ\\");
        assert_eq!(unescape("\\X\\", &d()), "\\X\\");
        assert_eq!(unescape("line\\X0D0A\\next", &d()), "line\r\nnext");
    }

    #[test]
    fn highlighting_local_and_unknown_sequences_stay_literal() {
        assert_eq!(unescape("\\H\\bold\\N\\", &d()), "\\H\\bold\\N\\");
        assert_eq!(unescape("\\Zlocal1\\", &d()), "\\Zlocal1\\");
        assert_eq!(unescape("\\.sp2\\", &d()), "\\.sp2\\");
        assert_eq!(unescape("a\\\\b", &d()), "a\\\\b");
        assert_eq!(unescape("tail\\F", &d()), "tail\\F");
        assert_eq!(unescape("\\", &d()), "\\");
    }

    #[test]
    fn other_delimiters_are_honoured() {
        let odd = Delimiters {
            field: '#',
            component: '*',
            repetition: '!',
            escape: '$',
            subcomponent: '%',
        };
        let text = "a#b*c!d$e%f|g^h";
        let raw = escape(text, &odd);
        assert_eq!(raw, "a$F$b$S$c$R$d$E$e$T$f|g^h");
        assert_eq!(unescape(&raw, &odd), text);
        let dot = Delimiters {
            component: '.',
            ..Delimiters::default()
        };
        assert_eq!(escape("a\nb", &dot), "a\\X0A\\b");
        assert_eq!(unescape(&escape("a\nb.c", &dot), &dot), "a\nb.c");
    }

    #[test]
    fn non_ascii_around_escapes() {
        let text = "Zoë ~ Łukasz 😀 | Ørsted";
        assert_eq!(unescape(&escape(text, &d()), &d()), text);
        assert_eq!(unescape("é\\XC3\\é", &d()), "é\\XC3\\é");
    }
}
