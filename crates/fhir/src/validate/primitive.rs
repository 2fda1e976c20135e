//! Lexical rules of the FHIR R4 primitive types as they appear in JSON.
//!
//! Why it exists: FHIR JSON carries every primitive as a JSON boolean, number or string, and the R4 spec
//! gives each type a regular expression (dates, codes, ids, OIDs...). This module checks a JSON value
//! against those rules by hand (no regex engine, no allocation unless a value fails), including real
//! calendar dates (no 2023-02-30) and the 32-bit ranges of integer, positiveInt and unsignedInt.
//!
//! Invariants: never panics on any input; reports the first lexical problem of a single value as a
//! [`Fail`] whose message names the value, the type and the expected form.

use crate::IssueType;
use crate::node::Node;
use crate::schema::Prim;

/// Why a primitive value was refused.
pub(crate) struct Fail {
    pub code: IssueType,
    pub msg: String,
}

/// R4: "strings SHALL NOT exceed 1MB (1024*1024 characters)".
const MAX_STRING_CHARS: usize = 1024 * 1024;

/// Name of a JSON value's kind, for diagnostics.
pub(crate) fn json_kind(v: Node<'_>) -> &'static str {
    match v {
        Node::Null => "null",
        Node::Bool(_) => "a boolean",
        Node::Number(_) => "a number",
        Node::String(_) => "a string",
        Node::Array(_) => "an array",
        Node::Object(_) => "an object",
    }
}

/// A value as shown in a diagnostic (long values shortened).
pub(crate) fn shown(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}...")
    }
}

fn fail(code: IssueType, msg: String) -> Result<(), Fail> {
    Err(Fail { code, msg })
}

fn lexical(p: Prim, s: &str, rule: &str) -> Result<(), Fail> {
    fail(
        IssueType::Value,
        format!("'{}' is not a valid {}: {rule}", shown(s), p.name()),
    )
}

/// Check one (non-null) JSON value against primitive type `p`.
pub(crate) fn check(p: Prim, v: Node<'_>) -> Result<(), Fail> {
    match p {
        Prim::Boolean => match v {
            Node::Bool(_) => Ok(()),
            other => wrong_json(p, "boolean", other),
        },
        Prim::Integer | Prim::PositiveInt | Prim::UnsignedInt => match v {
            Node::Number(n) => check_integer(p, n),
            other => wrong_json(p, "number", other),
        },
        // A JSON number is exactly the R4 decimal grammar; its text (kept by arbitrary_precision) is stored
        // as sent, so `1.50` keeps its precision.
        Prim::Decimal => match v {
            Node::Number(_) => Ok(()),
            other => wrong_json(p, "number", other),
        },
        _ => match v {
            Node::String(s) => check_string(p, s),
            other => wrong_json(p, "string", other),
        },
    }
}

fn wrong_json(p: Prim, expected: &str, found: Node<'_>) -> Result<(), Fail> {
    fail(
        IssueType::Structure,
        format!(
            "a FHIR {} must be a JSON {expected}, found {}",
            p.name(),
            json_kind(found)
        ),
    )
}

fn check_integer(p: Prim, text: &str) -> Result<(), Fail> {
    let (neg, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text),
    };
    let (lo, hi, rule): (i64, i64, &str) = match p {
        Prim::PositiveInt => (
            1,
            2_147_483_647,
            "expected a whole number from 1 to 2147483647",
        ),
        Prim::UnsignedInt => (
            0,
            2_147_483_647,
            "expected a whole number from 0 to 2147483647",
        ),
        _ => (
            -2_147_483_648,
            2_147_483_647,
            "expected a whole number from -2147483648 to 2147483647 (no fraction or exponent)",
        ),
    };
    let lexical_ok = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && !(neg && p != Prim::Integer);
    if !lexical_ok || digits.len() > 10 {
        return lexical(p, text, rule);
    }
    let mut n: i64 = 0;
    for b in digits.bytes() {
        n = n * 10 + i64::from(b - b'0');
    }
    if neg {
        n = -n;
    }
    if n < lo || n > hi {
        return lexical(p, text, rule);
    }
    Ok(())
}

fn check_string(p: Prim, s: &str) -> Result<(), Fail> {
    if s.is_empty() {
        return fail(
            IssueType::Value,
            format!(
                "empty string is not a valid {}: a value must have content or be left out",
                p.name()
            ),
        );
    }
    match p {
        Prim::String | Prim::Markdown => {
            if s.len() > MAX_STRING_CHARS && s.chars().count() > MAX_STRING_CHARS {
                return fail(
                    IssueType::Value,
                    format!("a {} SHALL NOT exceed 1 MB (1048576 characters)", p.name()),
                );
            }
            Ok(())
        }
        Prim::Uri | Prim::Url | Prim::Canonical => {
            if has_whitespace(s) {
                return lexical(p, s, "must not contain whitespace");
            }
            Ok(())
        }
        Prim::Code => {
            if !is_code(s) {
                return lexical(
                    p,
                    s,
                    "a code must not have leading, trailing or repeated whitespace",
                );
            }
            Ok(())
        }
        Prim::Id => {
            if s.len() > 64
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return lexical(
                    p,
                    s,
                    "expected 1 to 64 characters from A-Z, a-z, 0-9, '-' and '.'",
                );
            }
            Ok(())
        }
        Prim::Date => {
            if !is_date(s) {
                return lexical(
                    p,
                    s,
                    "expected YYYY, YYYY-MM or YYYY-MM-DD (a real calendar date)",
                );
            }
            Ok(())
        }
        Prim::DateTime => {
            if !is_date_time(s) {
                return lexical(
                    p,
                    s,
                    "expected YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss[.fff] with a time zone (Z or +hh:mm/-hh:mm)",
                );
            }
            Ok(())
        }
        Prim::Instant => {
            if !is_instant(s) {
                return lexical(
                    p,
                    s,
                    "expected YYYY-MM-DDThh:mm:ss[.fff] with a time zone (Z or +hh:mm/-hh:mm)",
                );
            }
            Ok(())
        }
        Prim::Time => {
            if !is_time(s) {
                return lexical(
                    p,
                    s,
                    "expected hh:mm:ss[.fff] (24-hour clock, no time zone)",
                );
            }
            Ok(())
        }
        Prim::Base64Binary => {
            if !is_base64(s) {
                return lexical(
                    p,
                    s,
                    "expected base64 (A-Z, a-z, 0-9, '+', '/', with '=' padding; length a multiple of 4)",
                );
            }
            Ok(())
        }
        Prim::Oid => {
            if !is_oid(s) {
                return lexical(
                    p,
                    s,
                    "expected urn:oid: followed by a dotted OID such as urn:oid:1.2.3",
                );
            }
            Ok(())
        }
        Prim::Uuid => {
            if !is_uuid(s) {
                return lexical(p, s, "expected urn:uuid: followed by a lower-case UUID");
            }
            Ok(())
        }
        Prim::Xhtml => check_xhtml(s),
        // Not strings; handled in `check`.
        Prim::Boolean | Prim::Integer | Prim::PositiveInt | Prim::UnsignedInt | Prim::Decimal => {
            Ok(())
        }
    }
}

/// Whether `s` has a character that is `char::is_whitespace` (ASCII text checked byte by byte).
fn has_whitespace(s: &str) -> bool {
    if s.is_ascii() {
        s.bytes().any(|b| matches!(b, b'\t'..=b'\r' | b' '))
    } else {
        s.chars().any(char::is_whitespace)
    }
}

/// R4 code: `[^\s]+(\s[^\s]+)*`.
fn is_code(s: &str) -> bool {
    if s.is_ascii() {
        let mut prev_ws = true;
        for b in s.bytes() {
            let ws = matches!(b, b'\t'..=b'\r' | b' ');
            if ws && prev_ws {
                return false;
            }
            prev_ws = ws;
        }
        return !prev_ws;
    }
    let mut prev_ws = true; // start counts as whitespace: a leading space fails
    for c in s.chars() {
        let ws = c.is_whitespace();
        if ws && prev_ws {
            return false;
        }
        prev_ws = ws;
    }
    !prev_ws
}

fn two_digits(b: &[u8], i: usize) -> Option<u32> {
    match (b.get(i), b.get(i + 1)) {
        (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
            Some(u32::from(x - b'0') * 10 + u32::from(y - b'0'))
        }
        _ => None,
    }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        _ => 0,
    }
}

/// Parse the date part at the start of `b`: returns (bytes consumed, precision 1=year 2=month 3=day).
fn date_prefix(b: &[u8]) -> Option<(usize, u8)> {
    let year = match (two_digits(b, 0), two_digits(b, 2)) {
        (Some(h), Some(l)) => h * 100 + l,
        _ => return None,
    };
    if year == 0 {
        return None; // R4 regex excludes 0000
    }
    if b.get(4) != Some(&b'-') {
        return Some((4, 1));
    }
    let month = two_digits(b, 5)?;
    if !(1..=12).contains(&month) {
        return None;
    }
    if b.get(7) != Some(&b'-') {
        return Some((7, 2));
    }
    let day = two_digits(b, 8)?;
    if day < 1 || day > days_in_month(year, month) {
        return None;
    }
    Some((10, 3))
}

/// `hh:mm:ss(.f+)?`; returns bytes consumed.
fn time_prefix(b: &[u8]) -> Option<usize> {
    let hh = two_digits(b, 0)?;
    let mm = two_digits(b, 3)?;
    let ss = two_digits(b, 6)?;
    if b.get(2) != Some(&b':') || b.get(5) != Some(&b':') || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let mut i = 8;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    Some(i)
}

/// `Z` or `(+|-)(0[0-9]|1[0-3]):[0-5][0-9]` or `(+|-)14:00`, and nothing after it.
fn is_zone(b: &[u8]) -> bool {
    match b.first() {
        Some(b'Z') => b.len() == 1,
        Some(b'+') | Some(b'-') => {
            if b.len() != 6 || b.get(3) != Some(&b':') {
                return false;
            }
            match (two_digits(b, 1), two_digits(b, 4)) {
                (Some(h), Some(m)) => (h <= 13 && m <= 59) || (h == 14 && m == 0),
                _ => false,
            }
        }
        _ => false,
    }
}

pub(crate) fn is_date(s: &str) -> bool {
    matches!(date_prefix(s.as_bytes()), Some((n, _)) if n == s.len())
}

/// Date plus optional `Thh:mm:ss[.f]zone` (the zone is mandatory when a time is given).
fn date_time_parts(s: &str, need_time: bool) -> bool {
    let b = s.as_bytes();
    let Some((n, precision)) = date_prefix(b) else {
        return false;
    };
    if n == b.len() {
        return !need_time;
    }
    if precision != 3 || b.get(n) != Some(&b'T') {
        return false;
    }
    let rest = b.get(n + 1..).unwrap_or(&[]);
    match time_prefix(rest) {
        Some(t) => is_zone(rest.get(t..).unwrap_or(&[])),
        None => false,
    }
}

pub(crate) fn is_date_time(s: &str) -> bool {
    date_time_parts(s, false)
}

pub(crate) fn is_instant(s: &str) -> bool {
    date_time_parts(s, true)
}

pub(crate) fn is_time(s: &str) -> bool {
    time_prefix(s.as_bytes()) == Some(s.len())
}

fn is_base64(s: &str) -> bool {
    let mut count = 0usize;
    let mut pad = 0usize;
    for b in s.bytes() {
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => continue,
            b'=' => pad += 1,
            _ if pad > 0 => return false, // data after padding
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' => {}
            _ => return false,
        }
        count += 1;
    }
    count > 0 && count.is_multiple_of(4) && pad <= 2
}

/// `urn:oid:[0-2](\.(0|[1-9][0-9]*))+`
fn is_oid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("urn:oid:") else {
        return false;
    };
    let mut arcs = rest.split('.');
    match arcs.next() {
        Some("0") | Some("1") | Some("2") => {}
        _ => return false,
    }
    let mut n = 0;
    for arc in arcs {
        if arc.is_empty()
            || !arc.bytes().all(|b| b.is_ascii_digit())
            || (arc.len() > 1 && arc.starts_with('0'))
        {
            return false;
        }
        n += 1;
    }
    n > 0
}

/// `urn:uuid:` + 8-4-4-4-12 lower-case hex.
fn is_uuid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("urn:uuid:") else {
        return false;
    };
    let b = rest.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
}

fn contains_ignore_case(hay: &str, needle: &str) -> bool {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// Narrative.div: an XHTML `<div>` in the XHTML namespace, with some text (txt-2) and no active content
/// (the part of txt-1 that matters for safety).
fn check_xhtml(s: &str) -> Result<(), Fail> {
    let t = s.trim_start();
    if !t.starts_with("<div") {
        return fail(
            IssueType::Value,
            "Narrative.div must be an XHTML <div> element".to_string(),
        );
    }
    if !s.contains("xmlns=\"http://www.w3.org/1999/xhtml\"")
        && !s.contains("xmlns='http://www.w3.org/1999/xhtml'")
    {
        return fail(
            IssueType::Value,
            "Narrative.div must declare the XHTML namespace (xmlns=\"http://www.w3.org/1999/xhtml\")".to_string(),
        );
    }
    for bad in [
        "<script",
        "<form",
        "<iframe",
        "<object",
        "<embed",
        "<applet",
        "javascript:",
    ] {
        if contains_ignore_case(s, bad) {
            return fail(
                IssueType::Value,
                format!(
                    "txt-1: the narrative SHALL contain only basic HTML formatting; '{bad}' is not allowed"
                ),
            );
        }
    }
    let mut in_tag = false;
    let mut has_text = false;
    for c in s.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag && !c.is_whitespace() => {
                has_text = true;
                break;
            }
            _ => {}
        }
    }
    if !has_text && !contains_ignore_case(s, "<img") {
        return fail(
            IssueType::Value,
            "txt-2: the narrative SHALL have some non-whitespace content".to_string(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn ok(p: Prim, v: Value) -> bool {
        check(p, Node::of(&v)).is_ok()
    }

    #[test]
    fn dates() {
        for s in [
            "2024",
            "2024-02",
            "2024-02-29",
            "2000-02-29",
            "0001",
            "1974-12-25",
        ] {
            assert!(is_date(s), "{s}");
        }
        for s in [
            "0000",
            "2023-02-29",
            "1900-02-29",
            "2024-13",
            "2024-00",
            "2024-01-32",
            "24",
            "2024-1-01",
            "2024-01-01T00:00:00Z",
            "2024-",
        ] {
            assert!(!is_date(s), "{s}");
        }
    }

    #[test]
    fn date_times_and_instants() {
        for s in [
            "2024",
            "2024-05",
            "2024-05-01",
            "2024-05-01T10:00:00Z",
            "2024-05-01T10:00:00.123+01:00",
            "2015-02-07T13:28:17-05:00",
            "2016-12-31T23:59:60Z",
            "2024-05-01T10:00:00+14:00",
        ] {
            assert!(is_date_time(s), "{s}");
        }
        for s in [
            "2024-05-01T10:00Z",
            "2024-05-01T10:00:00",
            "2024-05-01T24:00:00Z",
            "2024-05-01T10:00:00+14:30",
            "2024-05-01T10:00:00.Z",
            "2024-05T10:00:00Z",
            "2024-05-01 10:00:00Z",
            "2024-05-01T10:00:00+0100",
        ] {
            assert!(!is_date_time(s), "{s}");
        }
        assert!(is_instant("2021-10-12T12:30:30+00:00"));
        assert!(!is_instant("2021-10-12"));
        assert!(is_time("08:30:00") && is_time("23:59:59.999"));
        assert!(!is_time("8:30:00") && !is_time("08:30") && !is_time("24:00:00"));
    }

    #[test]
    fn integers() {
        assert!(ok(Prim::Integer, json!(-5)));
        assert!(ok(Prim::Integer, json!(2147483647)));
        assert!(!ok(Prim::Integer, json!(2147483648u64)));
        assert!(ok(Prim::Integer, json!(-2147483648i64)));
        assert!(!ok(
            Prim::Integer,
            serde_json::from_str("1.0").unwrap_or(Value::Null)
        ));
        assert!(!ok(
            Prim::Integer,
            serde_json::from_str("1e2").unwrap_or(Value::Null)
        ));
        assert!(!ok(Prim::PositiveInt, json!(0)));
        assert!(ok(Prim::UnsignedInt, json!(0)));
        assert!(!ok(Prim::UnsignedInt, json!(-1)));
        assert!(!ok(Prim::Integer, json!("5")));
        assert!(ok(
            Prim::Decimal,
            serde_json::from_str("1.50").unwrap_or(Value::Null)
        ));
        assert!(!ok(Prim::Decimal, json!("1.50")));
    }

    #[test]
    fn ascii_fast_paths_agree_with_char_rules() {
        let mut samples: Vec<String> = vec![String::new()];
        let parts = [
            "a", " ", "\t", "\u{b}", "\u{c}", "\r", "\n", "\u{85}", "\u{a0}", "\u{2003}", "é", "b",
            "\u{1c}",
        ];
        for x in parts {
            for y in parts {
                for z in parts {
                    samples.push(format!("{x}{y}{z}"));
                }
            }
        }
        for s in &samples {
            assert_eq!(
                has_whitespace(s),
                s.chars().any(char::is_whitespace),
                "{s:?}"
            );
            let mut prev_ws = true;
            let mut ok = true;
            for c in s.chars() {
                let ws = c.is_whitespace();
                if ws && prev_ws {
                    ok = false;
                    break;
                }
                prev_ws = ws;
            }
            assert_eq!(is_code(s), ok && !prev_ws, "{s:?}");
        }
    }

    #[test]
    fn strings() {
        assert!(ok(Prim::Code, json!("entered-in-error")));
        assert!(ok(Prim::Code, json!("a b")));
        assert!(!ok(Prim::Code, json!(" a")) && !ok(Prim::Code, json!("a ")));
        assert!(!ok(Prim::Code, json!("a  b")));
        assert!(!ok(Prim::Code, json!("")));
        assert!(ok(Prim::Id, json!("91607239-b002-470a-8709-6b25bd50fdd1")));
        assert!(!ok(Prim::Id, json!("a_b")));
        assert!(!ok(Prim::Id, json!("x".repeat(65))));
        assert!(ok(
            Prim::Uri,
            json!("urn:uuid:deb4c4b3-870b-4599-84df-5e54cef7afda")
        ));
        assert!(!ok(Prim::Uri, json!("http://a b")));
        assert!(ok(Prim::Oid, json!("urn:oid:2.16.840.1.113883")));
        assert!(
            !ok(Prim::Oid, json!("urn:oid:3.1"))
                && !ok(Prim::Oid, json!("urn:oid:1"))
                && !ok(Prim::Oid, json!("urn:oid:1.02"))
        );
        assert!(ok(
            Prim::Uuid,
            json!("urn:uuid:deb4c4b3-870b-4599-84df-5e54cef7afda")
        ));
        assert!(!ok(
            Prim::Uuid,
            json!("urn:uuid:DEB4C4B3-870b-4599-84df-5e54cef7afda")
        ));
        assert!(
            ok(Prim::Base64Binary, json!("R0lGODlh"))
                && ok(Prim::Base64Binary, json!("YQ=="))
                && ok(Prim::Base64Binary, json!("a/b+"))
        );
        assert!(
            !ok(Prim::Base64Binary, json!("YQ="))
                && !ok(Prim::Base64Binary, json!("Y=Q="))
                && !ok(Prim::Base64Binary, json!("Y==="))
        );
        assert!(ok(Prim::String, json!("   ")));
        assert!(!ok(Prim::String, json!(1)));
        assert!(ok(
            Prim::Xhtml,
            json!("<div xmlns=\"http://www.w3.org/1999/xhtml\">Hi</div>")
        ));
        assert!(!ok(Prim::Xhtml, json!("<div>Hi</div>")));
        assert!(!ok(
            Prim::Xhtml,
            json!("<div xmlns=\"http://www.w3.org/1999/xhtml\"> </div>")
        ));
        assert!(!ok(
            Prim::Xhtml,
            json!("<div xmlns=\"http://www.w3.org/1999/xhtml\">x<SCRIPT>1</script></div>")
        ));
        assert!(!ok(Prim::Boolean, json!("true")));
    }
}
