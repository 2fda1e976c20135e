//! Terser-style paths (`PID-3`, `PID-3.1`, `PID-3(2).4.1`, `OBX(2)-5`): how callers name a value to read or
//! set without walking the structure by hand.

use crate::error::PathError;

/// Largest index accepted at any level, so a typo cannot make `set` pad a segment with millions of separators.
pub(crate) const MAX_INDEX: usize = 9999;

/// A parsed path. Indexes are 1-based; `None` means "not given" (reads default to the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Path {
    pub segment: String,
    pub segment_rep: usize,
    pub field: usize,
    pub rep: Option<usize>,
    pub component: Option<usize>,
    pub subcomponent: Option<usize>,
}

impl Path {
    /// Grammar: `SEG[(n)]-F[(r)][.C[.S]]` where SEG is three upper-case letters or digits.
    pub fn parse(path: &str) -> Result<Path, PathError> {
        let err = |why: &str| PathError::new(path, why);
        let (seg_part, rest) = path
            .split_once('-')
            .ok_or_else(|| err("expected SEG-FIELD, e.g. PID-3"))?;
        let (segment, segment_rep) =
            split_index(seg_part).ok_or_else(|| err("bad segment repetition"))?;
        if !is_segment_id(segment) {
            return Err(err("a segment id is three upper-case letters or digits"));
        }
        let mut parts = rest.split('.');
        let field_part = parts.next().unwrap_or("");
        let (field_str, rep) =
            split_index(field_part).ok_or_else(|| err("bad field repetition"))?;
        let field = number(field_str).ok_or_else(|| err("bad field number"))?;
        let component = match parts.next() {
            Some(c) => Some(number(c).ok_or_else(|| err("bad component number"))?),
            None => None,
        };
        let subcomponent = match parts.next() {
            Some(s) => Some(number(s).ok_or_else(|| err("bad subcomponent number"))?),
            None => None,
        };
        if parts.next().is_some() {
            return Err(err("too many levels (SEG-F(r).C.S at most)"));
        }
        Ok(Path {
            segment: segment.to_string(),
            segment_rep: segment_rep.unwrap_or(1),
            field,
            rep,
            component,
            subcomponent,
        })
    }

    /// How deep the path goes below the field: 0 field, 1 repetition, 2 component, 3 subcomponent.
    pub fn depth(&self) -> usize {
        if self.subcomponent.is_some() {
            3
        } else if self.component.is_some() {
            2
        } else if self.rep.is_some() {
            1
        } else {
            0
        }
    }
}

/// Whether `s` is a well-formed segment id (three upper-case ASCII letters or digits).
pub(crate) fn is_segment_id(s: &str) -> bool {
    s.len() == 3
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// `NAME(n)` -> (`NAME`, Some(n)); `NAME` -> (`NAME`, None); malformed -> None.
fn split_index(s: &str) -> Option<(&str, Option<usize>)> {
    match s.split_once('(') {
        None => Some((s, None)),
        Some((name, tail)) => {
            let n = tail.strip_suffix(')')?;
            Some((name, Some(number(n)?)))
        }
    }
}

fn number(s: &str) -> Option<usize> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: usize = s.parse().ok()?;
    (1..=MAX_INDEX).contains(&n).then_some(n)
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
    fn parses_every_level() {
        let p = Path::parse("PID-3(2).4.1").unwrap();
        assert_eq!(
            p,
            Path {
                segment: "PID".into(),
                segment_rep: 1,
                field: 3,
                rep: Some(2),
                component: Some(4),
                subcomponent: Some(1)
            }
        );
        assert_eq!(p.depth(), 3);
        let p = Path::parse("MRG(2)-1").unwrap();
        assert_eq!((p.segment_rep, p.field, p.depth()), (2, 1, 0));
        assert_eq!(Path::parse("PID-3.1").unwrap().depth(), 2);
        assert_eq!(Path::parse("PID-3(1)").unwrap().depth(), 1);
        assert_eq!(Path::parse("ZU1-10").unwrap().segment, "ZU1");
    }

    #[test]
    fn refuses_malformed_paths() {
        for bad in [
            "",
            "PID",
            "PID-",
            "PID-0",
            "PID-x",
            "pid-3",
            "PIDX-3",
            "PID-3.",
            "PID-3.0",
            "PID-3.1.1.1",
            "PID(0)-3",
            "PID(-3",
            "PID-3(2",
            "PID-3()",
            "PID-10000",
            "PID-3.99999999999999999999",
        ] {
            assert!(Path::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
