//! Read-only JSON for the validator: a flat document parsed from bytes, or a view of a `serde_json::Value`.
//!
//! Why it exists: validation only reads. Building a `serde_json::Value` costs an allocation for every key,
//! every string and every container, and a hashed insert for every member: most of the time of a
//! validation. A [`Doc`] is one vector of tokens in document order (a "tape"): strings without escapes
//! borrow from the request bytes, a container's token says where its last descendant ends, and nothing
//! else is allocated. `$validate` and `carebridge validate` check such a tape; a write, which keeps the
//! resource, validates the `Value` it builds anyway, through the same [`Node`] view.
//!
//! How: the walk reads [`Node`]s, small `Copy` views that mirror `serde_json::Value`'s variants. `Array`
//! and `Object` are handles ([`Arr`], [`Obj`]) into either a tape or a `Value`, iterated without
//! allocating.
//!
//! Invariants: an object's keys are unique (the parser leaves repeated keys to serde_json, and a
//! `serde_json::Map` has none); never panics (every token access is checked; a malformed tape reads as
//! `null`).

use serde_json::{Map, Number, Value};

type ValueIter<'t> = serde_json::map::Iter<'t>;

/// What a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Kind {
    Null,
    True,
    False,
    /// `s` is the number's text.
    Number,
    /// A number whose text serde_json rewrites (`1E5` is `1e+5`): `aux` indexes [`Doc::owned`], which
    /// holds serde_json's text, so a tape reads exactly as the `Value` would.
    OwnedNumber,
    /// `s` is the string (a key or a value).
    Str,
    /// A string that had escapes: `aux` indexes [`Doc::owned`].
    OwnedStr,
    /// `aux` is the index after the array's last descendant; `len` its item count.
    Array,
    /// `aux` is the index after the object's last descendant; `len` its member count. Each member is a
    /// key token (`Str` or `OwnedStr`) followed by the value's tokens.
    Object,
}

/// One token of the tape. Every field is 32 bits or more: a token with padding is copied in pieces of odd
/// sizes, which stalls the processor when it is read back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tok<'a> {
    pub(crate) s: &'a str,
    pub(crate) aux: u32,
    /// A container's item or member count (saturated at `u32::MAX`).
    pub(crate) count: u32,
    pub(crate) kind: Kind,
}

impl<'a> Tok<'a> {
    #[inline(always)]
    pub(crate) fn leaf(kind: Kind, s: &'a str) -> Self {
        Tok {
            s,
            aux: 0,
            count: 0,
            kind,
        }
    }

    pub(crate) fn set_count(&mut self, n: usize) {
        self.count = u32::try_from(n).unwrap_or(u32::MAX);
    }
}

/// A parsed JSON document: the tape and the strings that had escapes.
#[derive(Debug, Default)]
pub(crate) struct Doc<'a> {
    pub(crate) toks: Vec<Tok<'a>>,
    pub(crate) owned: Vec<String>,
}

/// A JSON value of a [`Doc`], as `serde_json::Value` but borrowed and `Copy`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Node<'t> {
    Null,
    #[allow(
        dead_code,
        reason = "mirrors serde_json::Value; the walk needs only the kind"
    )]
    Bool(bool),
    /// The number's text.
    Number(&'t str),
    String(&'t str),
    Array(Arr<'t>),
    Object(Obj<'t>),
}

/// An array: of a [`Doc`], or of a `Value`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arr<'t> {
    Tape { doc: &'t Doc<'t>, at: u32 },
    Value(&'t [Value]),
}

/// An object: of a [`Doc`], or of a `Value`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Obj<'t> {
    Tape { doc: &'t Doc<'t>, at: u32 },
    Value(&'t Map<String, Value>),
}

impl<'a> Doc<'a> {
    /// The document's value (`null` for an empty tape).
    pub(crate) fn root(&self) -> Node<'_> {
        self.node(0)
    }

    #[inline(always)]
    fn tok(&self, i: u32) -> Option<&Tok<'a>> {
        self.toks.get(i as usize)
    }

    /// The text of the string token `i` (a key or a value).
    #[inline(always)]
    pub(crate) fn text(&self, i: u32) -> &str {
        match self.tok(i) {
            Some(t) if t.kind == Kind::OwnedStr => {
                self.owned.get(t.aux as usize).map_or("", String::as_str)
            }
            Some(t) => t.s,
            None => "",
        }
    }

    /// The item or member count of the container token `at` (counted when it did not fit the token).
    fn count(&self, at: u32) -> usize {
        match self.tok(at) {
            Some(t) if t.count < u32::MAX => t.count as usize,
            Some(t) if t.kind == Kind::Array => Items::Tape {
                doc: self,
                i: at + 1,
                end: t.aux,
            }
            .count(),
            Some(t) => Members::Tape {
                doc: self,
                i: at + 1,
                end: t.aux,
            }
            .count(),
            None => 0,
        }
    }

    /// The index after the container token `at`'s last descendant.
    #[inline(always)]
    fn end(&self, at: u32) -> u32 {
        self.tok(at).map_or(0, |t| t.aux)
    }

    /// The index after token `i` and its descendants.
    #[inline(always)]
    fn skip(&self, i: u32) -> u32 {
        match self.tok(i) {
            Some(t) if matches!(t.kind, Kind::Array | Kind::Object) => t.aux,
            _ => i + 1,
        }
    }

    #[inline(always)]
    fn node(&self, i: u32) -> Node<'_> {
        let Some(t) = self.tok(i) else {
            return Node::Null;
        };
        match t.kind {
            Kind::Null => Node::Null,
            Kind::True => Node::Bool(true),
            Kind::False => Node::Bool(false),
            Kind::Number => Node::Number(t.s),
            Kind::OwnedNumber => {
                Node::Number(self.owned.get(t.aux as usize).map_or("0", String::as_str))
            }
            Kind::Str => Node::String(t.s),
            Kind::OwnedStr => Node::String(self.text(i)),
            Kind::Array => Node::Array(Arr::Tape { doc: self, at: i }),
            Kind::Object => Node::Object(Obj::Tape { doc: self, at: i }),
        }
    }

    /// A token of `kind` whose text `s` (unescaped, or rewritten as serde_json writes it) is kept in
    /// [`Doc::owned`].
    pub(crate) fn owned_token(&mut self, kind: Kind, s: String) -> Option<Tok<'a>> {
        let mut t = Tok::leaf(kind, "");
        t.aux = u32::try_from(self.owned.len()).ok()?;
        self.owned.push(s);
        Some(t)
    }

    /// Push a container's token (its end is set by [`Doc::close`]); its index.
    pub(crate) fn open(&mut self, kind: Kind, len: usize) -> usize {
        let at = self.toks.len();
        let mut t = Tok::leaf(kind, "");
        t.set_count(len);
        self.toks.push(t);
        at
    }

    /// Close the container opened at `at`: its descendants end here.
    pub(crate) fn close(&mut self, at: usize) {
        let end = u32::try_from(self.toks.len()).unwrap_or(u32::MAX);
        if let Some(t) = self.toks.get_mut(at) {
            t.aux = end;
        }
    }
}

/// The `serde_json::Number` of a JSON number's text, as serde_json makes it (`1E5` becomes `1e+5`, `-0`
/// stays `-0`).
pub(crate) fn number(text: &str) -> Option<Number> {
    if !text.is_empty()
        && text.len() < 20
        && text.bytes().all(|c| c.is_ascii_digit())
        && let Ok(u) = text.parse::<u64>()
    {
        return Some(Number::from(u));
    }
    text.parse::<Number>().ok()
}

impl<'t> Node<'t> {
    /// The view of a `serde_json::Value`.
    #[inline]
    pub(crate) fn of(v: &'t Value) -> Node<'t> {
        match v {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(*b),
            Value::Number(n) => Node::Number(n.as_str()),
            Value::String(s) => Node::String(s),
            Value::Array(a) => Node::Array(Arr::Value(a)),
            Value::Object(o) => Node::Object(Obj::Value(o)),
        }
    }

    #[inline]
    pub(crate) fn as_str(self) -> Option<&'t str> {
        match self {
            Node::String(s) => Some(s),
            _ => None,
        }
    }

    #[inline]
    pub(crate) fn as_object(self) -> Option<Obj<'t>> {
        match self {
            Node::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The text of a number.
    #[inline]
    pub(crate) fn as_number(self) -> Option<&'t str> {
        match self {
            Node::Number(n) => Some(n),
            _ => None,
        }
    }

    #[inline]
    pub(crate) fn is_null(self) -> bool {
        matches!(self, Node::Null)
    }

    /// A member of an object.
    #[inline]
    pub(crate) fn get(self, name: &str) -> Option<Node<'t>> {
        self.as_object().and_then(|o| o.get(name))
    }
}

impl<'t> Obj<'t> {
    #[inline]
    pub(crate) fn len(&self) -> usize {
        match *self {
            Obj::Tape { doc, at } => doc.count(at),
            Obj::Value(m) => m.len(),
        }
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub(crate) fn iter(&self) -> Members<'t> {
        match *self {
            Obj::Tape { doc, at } => Members::Tape {
                doc,
                i: at + 1,
                end: doc.end(at),
            },
            Obj::Value(m) => Members::Value(m.iter()),
        }
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &'t str> + use<'t> {
        self.iter().map(|(k, _)| k)
    }

    /// The member called `name`: a scan (FHIR objects are small), or the map's index for a large `Value`.
    #[inline]
    pub(crate) fn get(&self, name: &str) -> Option<Node<'t>> {
        match *self {
            Obj::Value(m) if m.len() > 16 => m.get(name).map(Node::of),
            _ => self
                .iter()
                .find(|(k, _)| crate::schema::bytes_eq(k.as_bytes(), name.as_bytes()))
                .map(|(_, v)| v),
        }
    }
}

impl<'t> IntoIterator for Obj<'t> {
    type Item = (&'t str, Node<'t>);
    type IntoIter = Members<'t>;
    fn into_iter(self) -> Members<'t> {
        self.iter()
    }
}

/// The members of an [`Obj`], in order.
pub(crate) enum Members<'t> {
    Tape { doc: &'t Doc<'t>, i: u32, end: u32 },
    Value(ValueIter<'t>),
}

impl<'t> Iterator for Members<'t> {
    type Item = (&'t str, Node<'t>);
    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Members::Tape { doc, i, end } => {
                if *i >= *end {
                    return None;
                }
                let key = doc.text(*i);
                let value = doc.node(*i + 1);
                *i = doc.skip(*i + 1);
                Some((key, value))
            }
            Members::Value(it) => it.next().map(|(k, v)| (k.as_str(), Node::of(v))),
        }
    }
}

impl<'t> Arr<'t> {
    #[inline]
    pub(crate) fn len(&self) -> usize {
        match *self {
            Arr::Tape { doc, at } => doc.count(at),
            Arr::Value(a) => a.len(),
        }
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[inline]
    pub(crate) fn iter(&self) -> Items<'t> {
        match *self {
            Arr::Tape { doc, at } => Items::Tape {
                doc,
                i: at + 1,
                end: doc.end(at),
            },
            Arr::Value(a) => Items::Value(a.iter()),
        }
    }
}

impl<'t> IntoIterator for Arr<'t> {
    type Item = Node<'t>;
    type IntoIter = Items<'t>;
    fn into_iter(self) -> Items<'t> {
        self.iter()
    }
}

/// The items of an [`Arr`], in order.
pub(crate) enum Items<'t> {
    Tape { doc: &'t Doc<'t>, i: u32, end: u32 },
    Value(std::slice::Iter<'t, Value>),
}

impl<'t> Iterator for Items<'t> {
    type Item = Node<'t>;
    #[inline(always)]
    fn next(&mut self) -> Option<Node<'t>> {
        match self {
            Items::Tape { doc, i, end } => {
                if *i >= *end {
                    return None;
                }
                let item = doc.node(*i);
                *i = doc.skip(*i);
                Some(item)
            }
            Items::Value(it) => it.next().map(Node::of),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    /// Everything a view can tell, as text (the same for a tape and for a `Value` of one JSON text).
    fn describe(n: Node<'_>) -> String {
        match n {
            Node::Null => "null".into(),
            Node::Bool(b) => b.to_string(),
            Node::Number(t) => format!("#{t}"),
            Node::String(s) => format!("{s:?}"),
            Node::Array(a) => {
                let items: Vec<String> = a.iter().map(describe).collect();
                format!("[{}|{}]", a.len(), items.join(","))
            }
            Node::Object(o) => {
                let members: Vec<String> = o
                    .iter()
                    .map(|(k, v)| format!("{k:?}:{}", describe(v)))
                    .collect();
                let probe = o.get("b").map(describe).unwrap_or_default();
                format!("{{{}|{}|{probe}}}", o.len(), members.join(","))
            }
        }
    }

    #[test]
    fn a_tape_and_a_value_read_the_same() {
        for text in [
            r#"{"a": [1, "x", null, true, {"b": 1.50}], "c": {}, "d": -0.0, "e": [[], [false]]}"#,
            r#"{"k\u00e9y": "v\"w", "b": [{"b": {"b": 2e5}}], "z": "é"}"#,
            r#"[1, [2, [3, []]], {}, ""]"#,
            r#""solo""#,
            "0",
        ] {
            let doc = crate::json::parse_doc(text.as_bytes()).unwrap();
            let value: Value = serde_json::from_str(text).unwrap();
            assert_eq!(describe(doc.root()), describe(Node::of(&value)), "{text}");
        }
    }

    #[test]
    fn views_find_members_and_items() {
        let text = r#"{"a": [1, "x", null, true, {"b": 1.50}], "c": {}, "e": [[], [false]]}"#;
        let doc = crate::json::parse_doc(text.as_bytes()).unwrap();
        let root = doc.root();
        let Some(Node::Array(a)) = root.get("a") else {
            panic!("a is an array")
        };
        assert_eq!(a.len(), 5);
        assert_eq!(a.iter().nth(1).and_then(Node::as_str), Some("x"));
        assert_eq!(
            a.iter()
                .nth(4)
                .and_then(|o| o.get("b"))
                .and_then(Node::as_number),
            Some("1.50")
        );
        assert_eq!(
            root.get("c").and_then(Node::as_object).map(|o| o.len()),
            Some(0)
        );
        assert_eq!(
            root.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["a", "c", "e"]
        );
        assert!(root.get("zz").is_none());
        assert!(root.get("a").is_some_and(|a| a.get("b").is_none()));
    }

    #[test]
    fn a_large_value_object_is_searched_by_its_index() {
        let mut m = Map::new();
        for i in 0..40 {
            m.insert(format!("k{i}"), Value::from(i));
        }
        let v = Value::Object(m);
        let n = Node::of(&v);
        assert_eq!(n.get("k33").and_then(Node::as_number), Some("33"));
        assert!(n.get("k40").is_none());
    }
}
