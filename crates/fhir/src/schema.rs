//! Element tables of the FHIR R4 (4.0.1) resources the hub serves and of every datatype reachable from them.
//!
//! Why it exists: the validator (`validate.rs`) walks a resource's JSON against these tables instead of
//! against generated structs, so unknown elements, wrong JSON shapes and missing required elements are found
//! without deserialising (and without losing what the client sent).
//!
//! What is here: one [`TypeDef`] per resource, per complex datatype and per BackboneElement (for example
//! `Patient.contact`). Each [`Elem`] has its name, allowed type(s) (a choice element such as `deceased[x]`
//! lists its types explicitly; the JSON key is the name plus the type's [`Ty::suffix`]), min (0 or 1), max
//! (1 or `*`) and, for elements with a *required* binding the hub enforces, the list of allowed codes.
//! The inherited elements (`Resource`/`DomainResource`, `Element`, `BackboneElement`) are the shared lists
//! [`RESOURCE_BASE`], [`ELEMENT_BASE`] and [`BACKBONE_BASE`], selected by [`Kind`].
//!
//! Invariants: the tables are hand-written from the R4 element definitions; element names within one type
//! (including the inherited ones) are unique, and no type has more than 64 elements in total (the
//! validator tracks presence in a `u64`); both are checked by unit tests. [`TypeDef::lookup`] resolves a JSON
//! key through a small hash index of the type ([`Lut`], built on first use), which a unit test checks
//! against a plain scan of the element list.

use crate::ResourceType;
use std::sync::OnceLock;

/// The FHIR primitive types (JSON representation: boolean, number or string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prim {
    Boolean,
    Integer,
    PositiveInt,
    UnsignedInt,
    Decimal,
    String,
    Uri,
    Url,
    Canonical,
    Code,
    Id,
    Markdown,
    Date,
    DateTime,
    Instant,
    Time,
    Base64Binary,
    Oid,
    Uuid,
    /// `Narrative.div` only (no primitive extension, no `[x]` use).
    Xhtml,
}

impl Prim {
    /// The FHIR type name, e.g. `dateTime`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Prim::Boolean => "boolean",
            Prim::Integer => "integer",
            Prim::PositiveInt => "positiveInt",
            Prim::UnsignedInt => "unsignedInt",
            Prim::Decimal => "decimal",
            Prim::String => "string",
            Prim::Uri => "uri",
            Prim::Url => "url",
            Prim::Canonical => "canonical",
            Prim::Code => "code",
            Prim::Id => "id",
            Prim::Markdown => "markdown",
            Prim::Date => "date",
            Prim::DateTime => "dateTime",
            Prim::Instant => "instant",
            Prim::Time => "time",
            Prim::Base64Binary => "base64Binary",
            Prim::Oid => "oid",
            Prim::Uuid => "uuid",
            Prim::Xhtml => "xhtml",
        }
    }

    /// The suffix of a choice element's JSON key, e.g. `DateTime` in `deceasedDateTime`.
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Prim::Boolean => "Boolean",
            Prim::Integer => "Integer",
            Prim::PositiveInt => "PositiveInt",
            Prim::UnsignedInt => "UnsignedInt",
            Prim::Decimal => "Decimal",
            Prim::String => "String",
            Prim::Uri => "Uri",
            Prim::Url => "Url",
            Prim::Canonical => "Canonical",
            Prim::Code => "Code",
            Prim::Id => "Id",
            Prim::Markdown => "Markdown",
            Prim::Date => "Date",
            Prim::DateTime => "DateTime",
            Prim::Instant => "Instant",
            Prim::Time => "Time",
            Prim::Base64Binary => "Base64Binary",
            Prim::Oid => "Oid",
            Prim::Uuid => "Uuid",
            Prim::Xhtml => "Xhtml",
        }
    }
}

/// The type of an element: a primitive, a complex type (datatype or BackboneElement), or a whole resource
/// (`contained`).
#[derive(Clone, Copy)]
pub(crate) enum Ty {
    P(Prim),
    C(&'static TypeDef),
    Resource,
}

impl Ty {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Ty::P(p) => p.name(),
            Ty::C(d) => d.name,
            Ty::Resource => "Resource",
        }
    }

    /// Suffix used in a choice element's key: `valueCodeableConcept`, `valueString`.
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Ty::P(p) => p.suffix(),
            Ty::C(d) => d.name,
            Ty::Resource => "Resource",
        }
    }

    pub(crate) fn is_primitive(self) -> bool {
        matches!(self, Ty::P(p) if p != Prim::Xhtml)
    }
}

/// Which inherited elements a type has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// DomainResource: id, meta, implicitRules, language, text, contained, extension, modifierExtension.
    Resource,
    /// Element: id, extension.
    Element,
    /// BackboneElement (and BackboneElement-based datatypes such as Timing, Dosage): id, extension,
    /// modifierExtension.
    Backbone,
}

/// Type-specific rules the validator runs after walking an object of that type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hook {
    None,
    /// UK Core: NHS number, its verification status, ODS system normalisation.
    Identifier,
    /// per-1.
    Period,
    /// cpt-2.
    ContactPoint,
    /// att-1.
    Attachment,
    /// qty-3 (Quantity and its profiles).
    Quantity,
    /// sqty-1 is structural (no comparator element); qty-3 as for Quantity.
    SimpleQuantity,
    /// rng-2.
    Range,
    /// ext-1.
    Extension,
    /// ref-1, and local references for dom-3.
    Reference,
}

/// A required binding: the value set and its codes.
pub(crate) struct Binding {
    pub value_set: &'static str,
    pub codes: &'static [&'static str],
}

/// One element of a type.
pub(crate) struct Elem {
    /// Element name; for a choice element the name without `[x]`.
    pub name: &'static str,
    /// Allowed types; more than one only for choice elements.
    pub types: &'static [Ty],
    pub choice: bool,
    pub min: u8,
    /// max = `*` (a JSON array) when true, else max = 1.
    pub many: bool,
    pub binding: Option<&'static Binding>,
}

/// A resource, complex datatype or BackboneElement.
pub(crate) struct TypeDef {
    /// Type name (`HumanName`) or, for a BackboneElement, its path (`Patient.contact`).
    pub name: &'static str,
    pub kind: Kind,
    pub elems: &'static [Elem],
    pub hook: Hook,
    /// Key index, built on first use (see [`Lut`]).
    pub lut: Lut,
}

impl TypeDef {
    /// The inherited elements of this type.
    pub(crate) fn base(&self) -> &'static [Elem] {
        match self.kind {
            Kind::Resource => RESOURCE_BASE,
            Kind::Element => ELEMENT_BASE,
            Kind::Backbone => BACKBONE_BASE,
        }
    }

    /// Total number of elements (inherited first, then own); indexes in `0..len()` are stable.
    pub(crate) fn len(&self) -> usize {
        self.base().len() + self.elems.len()
    }

    pub(crate) fn elem(&self, i: usize) -> Option<&'static Elem> {
        let base = self.base();
        if i < base.len() {
            base.get(i)
        } else {
            self.elems.get(i - base.len())
        }
    }

    /// Resolve a JSON key (without a leading `_`) to (element index, element, type): the first element, in
    /// table order (inherited first), whose name is the key or, for a choice element, whose name plus one of
    /// its types' suffixes is the key.
    #[inline]
    pub(crate) fn lookup(&self, key: &str) -> Option<(usize, &'static Elem, Ty)> {
        let e = self.table().find(key)?;
        e.ty.map(|t| (e.index, e.elem, t))
    }

    /// Bit `i` set when element `i` (for `i < 64`) has min cardinality 1.
    #[inline]
    pub(crate) fn required_mask(&self) -> u64 {
        self.table().required
    }

    #[inline]
    fn table(&self) -> &LutTable {
        self.lut.0.get_or_init(|| LutTable::build(self))
    }

    /// The unindexed form of [`TypeDef::lookup`] (reference for tests).
    #[cfg(test)]
    pub(crate) fn lookup_scan(&self, key: &str) -> Option<(usize, &'static Elem, Ty)> {
        let base = self.base();
        let all = base.iter().chain(self.elems.iter());
        for (i, e) in all.enumerate() {
            if !e.choice {
                if e.name == key {
                    return e.types.first().map(|t| (i, e, *t));
                }
            } else if let Some(suffix) = key.strip_prefix(e.name)
                && let Some(t) = e.types.iter().find(|t| t.suffix() == suffix)
            {
                return Some((i, e, *t));
            }
        }
        None
    }
}

/// Per-type index from JSON key to element, so the validator resolves a key with one hash and one compare
/// instead of scanning the element list (every choice expansion such as `valueCodeableConcept` is a key of
/// its own). Built lazily, once per type, from the static tables.
pub(crate) struct Lut(OnceLock<LutTable>);

impl Lut {
    pub(crate) const fn new() -> Self {
        Lut(OnceLock::new())
    }
}

struct LutEntry {
    key: Box<str>,
    hash: u32,
    index: usize,
    elem: &'static Elem,
    /// `None` only for a (malformed) plain element without a type: the key then resolves to nothing.
    ty: Option<Ty>,
}

struct LutTable {
    /// Open addressing: 0 = empty, otherwise 1 + index into `entries`.
    slots: Box<[u16]>,
    mask: usize,
    entries: Vec<LutEntry>,
    required: u64,
}

/// The first 8 bytes of `b` as a number (shorter input: its first and last 4 bytes, or a few bytes).
#[inline(always)]
fn load_u64(b: &[u8]) -> u64 {
    if let Some(c) = b.first_chunk::<8>() {
        return u64::from_le_bytes(*c);
    }
    if let (Some(lo), Some(hi)) = (b.first_chunk::<4>(), b.last_chunk::<4>()) {
        return u64::from(u32::from_le_bytes(*lo)) | (u64::from(u32::from_le_bytes(*hi)) << 32);
    }
    match b {
        [] => 0,
        [x] => u64::from(*x),
        [x, y] => u64::from(*x) | (u64::from(*y) << 8),
        [x, y, z, ..] => u64::from(*x) | (u64::from(*y) << 8) | (u64::from(*z) << 16),
    }
}

/// `a == b` for the short strings of JSON keys and codes, inline (no call to `memcmp`).
#[inline(always)]
pub(crate) fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if a.len() < 8 {
        return load_u64(a) == load_u64(b);
    }
    let (mut x, mut y) = (a, b);
    while let (Some((cx, rx)), Some((cy, ry))) =
        (x.split_first_chunk::<8>(), y.split_first_chunk::<8>())
    {
        if cx != cy {
            return false;
        }
        x = rx;
        y = ry;
    }
    // The last 8 bytes (overlapping what was compared) cover the remainder.
    a.last_chunk::<8>() == b.last_chunk::<8>()
}

/// Cheap hash of a key: its length and its first and last 8 bytes.
#[inline(always)]
fn key_hash(k: &[u8]) -> u32 {
    let n = k.len();
    let head = load_u64(k);
    let tail = match k.last_chunk::<8>() {
        Some(c) => u64::from_le_bytes(*c),
        None => head,
    };
    let x = (head ^ tail.rotate_left(23) ^ (n as u64).wrapping_mul(0x9E37_79B9))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 32) as u32
}

impl LutTable {
    fn build(def: &TypeDef) -> LutTable {
        let mut entries: Vec<LutEntry> = Vec::new();
        let mut required = 0u64;
        let mut add = |key: String, index: usize, elem: &'static Elem, ty: Option<Ty>| {
            // First match wins, as in a scan of the element list.
            if !entries.iter().any(|e| *e.key == *key) {
                entries.push(LutEntry {
                    hash: key_hash(key.as_bytes()),
                    key: key.into_boxed_str(),
                    index,
                    elem,
                    ty,
                });
            }
        };
        for (i, e) in def.base().iter().chain(def.elems.iter()).enumerate() {
            if i < 64 && e.min > 0 {
                required |= 1 << i;
            }
            if e.choice {
                for t in e.types {
                    add(format!("{}{}", e.name, t.suffix()), i, e, Some(*t));
                }
            } else {
                add(e.name.to_string(), i, e, e.types.first().copied());
            }
        }
        let size = (entries.len() * 2).next_power_of_two().max(8);
        let mask = size - 1;
        let mut slots = vec![0u16; size].into_boxed_slice();
        for (n, e) in entries.iter().enumerate() {
            let mut pos = e.hash as usize & mask;
            while slots.get(pos).is_some_and(|s| *s != 0) {
                pos = (pos + 1) & mask;
            }
            if let Some(s) = slots.get_mut(pos) {
                *s = u16::try_from(n + 1).unwrap_or(0);
            }
        }
        LutTable {
            slots,
            mask,
            entries,
            required,
        }
    }

    /// The entry of `key` (returned by reference: one register, not a tuple through memory).
    #[inline]
    fn find(&self, key: &str) -> Option<&LutEntry> {
        let k = key.as_bytes();
        let h = key_hash(k);
        let mut pos = h as usize & self.mask;
        loop {
            let slot = *self.slots.get(pos)?;
            let e = self.entries.get(usize::from(slot).checked_sub(1)?)?;
            if e.hash == h && bytes_eq(e.key.as_bytes(), k) {
                return Some(e);
            }
            pos = (pos + 1) & self.mask;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Table-writing helpers. `el!(name, min, 1|*, types...)` builds an element; `el!(...; BINDING)` adds a
// required binding; `choice!(name, min, types...)` builds a `[x]` element.

macro_rules! el {
    ($name:literal, $min:literal, 1, $t:expr; $b:expr) => {
        Elem {
            name: $name,
            types: &[$t],
            choice: false,
            min: $min,
            many: false,
            binding: Some(&$b),
        }
    };
    ($name:literal, $min:literal, *, $t:expr; $b:expr) => {
        Elem {
            name: $name,
            types: &[$t],
            choice: false,
            min: $min,
            many: true,
            binding: Some(&$b),
        }
    };
    ($name:literal, $min:literal, 1, $t:expr) => {
        Elem {
            name: $name,
            types: &[$t],
            choice: false,
            min: $min,
            many: false,
            binding: None,
        }
    };
    ($name:literal, $min:literal, *, $t:expr) => {
        Elem {
            name: $name,
            types: &[$t],
            choice: false,
            min: $min,
            many: true,
            binding: None,
        }
    };
}

macro_rules! choice {
    ($name:literal, $min:literal, $($t:expr),+) => {
        Elem { name: $name, types: &[$($t),+], choice: true, min: $min, many: false, binding: None }
    };
}

macro_rules! c {
    ($d:ident) => {
        Ty::C(&$d)
    };
}

const BOOLEAN: Ty = Ty::P(Prim::Boolean);
const INTEGER: Ty = Ty::P(Prim::Integer);
const POSITIVE_INT: Ty = Ty::P(Prim::PositiveInt);
const UNSIGNED_INT: Ty = Ty::P(Prim::UnsignedInt);
const DECIMAL: Ty = Ty::P(Prim::Decimal);
const STRING: Ty = Ty::P(Prim::String);
const URI: Ty = Ty::P(Prim::Uri);
const URL: Ty = Ty::P(Prim::Url);
const CANONICAL: Ty = Ty::P(Prim::Canonical);
const CODE: Ty = Ty::P(Prim::Code);
const ID: Ty = Ty::P(Prim::Id);
const MARKDOWN: Ty = Ty::P(Prim::Markdown);
const DATE: Ty = Ty::P(Prim::Date);
const DATE_TIME: Ty = Ty::P(Prim::DateTime);
const INSTANT: Ty = Ty::P(Prim::Instant);
const TIME: Ty = Ty::P(Prim::Time);
const BASE64: Ty = Ty::P(Prim::Base64Binary);
const OID: Ty = Ty::P(Prim::Oid);
const UUID: Ty = Ty::P(Prim::Uuid);
const XHTML: Ty = Ty::P(Prim::Xhtml);

// ---------------------------------------------------------------------------------------------------------
// Required bindings.

pub(crate) static ADMINISTRATIVE_GENDER: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/administrative-gender",
    codes: &["male", "female", "other", "unknown"],
};
static LINK_TYPE: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/link-type",
    codes: &["replaced-by", "replaces", "refer", "seealso"],
};
pub(crate) static APPOINTMENT_STATUS: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/appointmentstatus",
    codes: &[
        "proposed",
        "pending",
        "booked",
        "arrived",
        "fulfilled",
        "cancelled",
        "noshow",
        "entered-in-error",
        "checked-in",
        "waitlist",
    ],
};
static PARTICIPATION_STATUS: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/participationstatus",
    codes: &["accepted", "declined", "tentative", "needs-action"],
};
static PARTICIPANT_REQUIRED: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/participantrequired",
    codes: &["required", "optional", "information-only"],
};
static SLOT_STATUS: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/slotstatus",
    codes: &[
        "busy",
        "free",
        "busy-unavailable",
        "busy-tentative",
        "entered-in-error",
    ],
};
static IDENTIFIER_USE: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/identifier-use",
    codes: &["usual", "official", "temp", "secondary", "old"],
};
static NAME_USE: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/name-use",
    codes: &[
        "usual",
        "official",
        "temp",
        "nickname",
        "anonymous",
        "old",
        "maiden",
    ],
};
static CONTACT_POINT_SYSTEM: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/contact-point-system",
    codes: &["phone", "fax", "email", "pager", "url", "sms", "other"],
};
static CONTACT_POINT_USE: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/contact-point-use",
    codes: &["home", "work", "temp", "old", "mobile"],
};
static ADDRESS_USE: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/address-use",
    codes: &["home", "work", "temp", "old", "billing"],
};
static ADDRESS_TYPE: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/address-type",
    codes: &["postal", "physical", "both"],
};
static NARRATIVE_STATUS: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/narrative-status",
    codes: &["generated", "extensions", "additional", "empty"],
};
static LOCATION_STATUS: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/location-status",
    codes: &["active", "suspended", "inactive"],
};
static LOCATION_MODE: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/location-mode",
    codes: &["instance", "kind"],
};
static DAYS_OF_WEEK: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/days-of-week",
    codes: &["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
};
static QUANTITY_COMPARATOR: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/quantity-comparator",
    codes: &["<", "<=", ">=", ">"],
};
static UNITS_OF_TIME: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/units-of-time",
    codes: &["s", "min", "h", "d", "wk", "mo", "a"],
};
static EVENT_TIMING: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/event-timing",
    codes: &[
        "MORN",
        "MORN.early",
        "MORN.late",
        "NOON",
        "AFT",
        "AFT.early",
        "AFT.late",
        "EVE",
        "EVE.early",
        "EVE.late",
        "NIGHT",
        "PHS",
        "HS",
        "WAKE",
        "C",
        "CM",
        "CD",
        "CV",
        "AC",
        "ACM",
        "ACD",
        "ACV",
        "PC",
        "PCM",
        "PCD",
        "PCV",
    ],
};
static CONTRIBUTOR_TYPE: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/contributor-type",
    codes: &["author", "editor", "reviewer", "endorser"],
};
static RELATED_ARTIFACT_TYPE: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/related-artifact-type",
    codes: &[
        "documentation",
        "justification",
        "citation",
        "predecessor",
        "successor",
        "derived-from",
        "depends-on",
        "composed-of",
    ],
};
static OPERATION_PARAMETER_USE: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/operation-parameter-use",
    codes: &["in", "out"],
};
static SORT_DIRECTION: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/sort-direction",
    codes: &["ascending", "descending"],
};
static TRIGGER_TYPE: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/trigger-type",
    codes: &[
        "named-event",
        "periodic",
        "data-changed",
        "data-added",
        "data-modified",
        "data-removed",
        "data-accessed",
        "data-access-ended",
    ],
};

// ---------------------------------------------------------------------------------------------------------
// Inherited elements.

pub(crate) static RESOURCE_BASE: &[Elem] = &[
    el!("id", 0, 1, ID),
    el!("meta", 0, 1, c!(META)),
    el!("implicitRules", 0, 1, URI),
    el!("language", 0, 1, CODE),
    el!("text", 0, 1, c!(NARRATIVE)),
    el!("contained", 0, *, Ty::Resource),
    el!("extension", 0, *, c!(EXTENSION)),
    el!("modifierExtension", 0, *, c!(EXTENSION)),
];

pub(crate) static ELEMENT_BASE: &[Elem] = &[
    el!("id", 0, 1, STRING),
    el!("extension", 0, *, c!(EXTENSION)),
];

pub(crate) static BACKBONE_BASE: &[Elem] = &[
    el!("id", 0, 1, STRING),
    el!("extension", 0, *, c!(EXTENSION)),
    el!("modifierExtension", 0, *, c!(EXTENSION)),
];

/// The `_x` object of a primitive: an Element (id and extensions only).
pub(crate) static ELEMENT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Element",
    kind: Kind::Element,
    elems: &[],
    hook: Hook::None,
};

// ---------------------------------------------------------------------------------------------------------
// General-purpose datatypes.

/// R4 Extension; `value[x]` lists the 50 types of the R4 open type list.
#[rustfmt::skip]
pub(crate) static EXTENSION: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Extension",
    kind: Kind::Element,
    hook: Hook::Extension,
    elems: &[
        el!("url", 1, 1, URI),
        choice!("value", 0,
            BASE64, BOOLEAN, CANONICAL, CODE, DATE, DATE_TIME, DECIMAL, ID, INSTANT, INTEGER, MARKDOWN, OID,
            POSITIVE_INT, STRING, TIME, UNSIGNED_INT, URI, URL, UUID,
            c!(ADDRESS), c!(AGE), c!(ANNOTATION), c!(ATTACHMENT), c!(CODEABLE_CONCEPT), c!(CODING),
            c!(CONTACT_POINT), c!(COUNT), c!(DISTANCE), c!(DURATION), c!(HUMAN_NAME), c!(IDENTIFIER), c!(MONEY),
            c!(PERIOD), c!(QUANTITY), c!(RANGE), c!(RATIO), c!(REFERENCE), c!(SAMPLED_DATA), c!(SIGNATURE),
            c!(TIMING), c!(CONTACT_DETAIL), c!(CONTRIBUTOR), c!(DATA_REQUIREMENT), c!(EXPRESSION),
            c!(PARAMETER_DEFINITION), c!(RELATED_ARTIFACT), c!(TRIGGER_DEFINITION), c!(USAGE_CONTEXT),
            c!(DOSAGE), c!(META)
        ),
    ],
};

pub(crate) static IDENTIFIER: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Identifier",
    kind: Kind::Element,
    hook: Hook::Identifier,
    elems: &[
        el!("use", 0, 1, CODE; IDENTIFIER_USE),
        el!("type", 0, 1, c!(CODEABLE_CONCEPT)),
        el!("system", 0, 1, URI),
        el!("value", 0, 1, STRING),
        el!("period", 0, 1, c!(PERIOD)),
        el!("assigner", 0, 1, c!(REFERENCE)),
    ],
};

pub(crate) static HUMAN_NAME: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "HumanName",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("use", 0, 1, CODE; NAME_USE),
        el!("text", 0, 1, STRING),
        el!("family", 0, 1, STRING),
        el!("given", 0, *, STRING),
        el!("prefix", 0, *, STRING),
        el!("suffix", 0, *, STRING),
        el!("period", 0, 1, c!(PERIOD)),
    ],
};

pub(crate) static CONTACT_POINT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "ContactPoint",
    kind: Kind::Element,
    hook: Hook::ContactPoint,
    elems: &[
        el!("system", 0, 1, CODE; CONTACT_POINT_SYSTEM),
        el!("value", 0, 1, STRING),
        el!("use", 0, 1, CODE; CONTACT_POINT_USE),
        el!("rank", 0, 1, POSITIVE_INT),
        el!("period", 0, 1, c!(PERIOD)),
    ],
};

pub(crate) static ADDRESS: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Address",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("use", 0, 1, CODE; ADDRESS_USE),
        el!("type", 0, 1, CODE; ADDRESS_TYPE),
        el!("text", 0, 1, STRING),
        el!("line", 0, *, STRING),
        el!("city", 0, 1, STRING),
        el!("district", 0, 1, STRING),
        el!("state", 0, 1, STRING),
        el!("postalCode", 0, 1, STRING),
        el!("country", 0, 1, STRING),
        el!("period", 0, 1, c!(PERIOD)),
    ],
};

pub(crate) static CODEABLE_CONCEPT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "CodeableConcept",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[el!("coding", 0, *, c!(CODING)), el!("text", 0, 1, STRING)],
};

pub(crate) static CODING: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Coding",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("system", 0, 1, URI),
        el!("version", 0, 1, STRING),
        el!("code", 0, 1, CODE),
        el!("display", 0, 1, STRING),
        el!("userSelected", 0, 1, BOOLEAN),
    ],
};

pub(crate) static REFERENCE: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Reference",
    kind: Kind::Element,
    hook: Hook::Reference,
    elems: &[
        el!("reference", 0, 1, STRING),
        el!("type", 0, 1, URI),
        el!("identifier", 0, 1, c!(IDENTIFIER)),
        el!("display", 0, 1, STRING),
    ],
};

pub(crate) static PERIOD: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Period",
    kind: Kind::Element,
    hook: Hook::Period,
    elems: &[el!("start", 0, 1, DATE_TIME), el!("end", 0, 1, DATE_TIME)],
};

pub(crate) static META: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Meta",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("versionId", 0, 1, ID),
        el!("lastUpdated", 0, 1, INSTANT),
        el!("source", 0, 1, URI),
        el!("profile", 0, *, CANONICAL),
        el!("security", 0, *, c!(CODING)),
        el!("tag", 0, *, c!(CODING)),
    ],
};

pub(crate) static NARRATIVE: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Narrative",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("status", 1, 1, CODE; NARRATIVE_STATUS),
        el!("div", 1, 1, XHTML),
    ],
};

pub(crate) static ATTACHMENT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Attachment",
    kind: Kind::Element,
    hook: Hook::Attachment,
    elems: &[
        el!("contentType", 0, 1, CODE),
        el!("language", 0, 1, CODE),
        el!("data", 0, 1, BASE64),
        el!("url", 0, 1, URL),
        el!("size", 0, 1, UNSIGNED_INT),
        el!("hash", 0, 1, BASE64),
        el!("title", 0, 1, STRING),
        el!("creation", 0, 1, DATE_TIME),
    ],
};

static QUANTITY_ELEMS: &[Elem] = &[
    el!("value", 0, 1, DECIMAL),
    el!("comparator", 0, 1, CODE; QUANTITY_COMPARATOR),
    el!("unit", 0, 1, STRING),
    el!("system", 0, 1, URI),
    el!("code", 0, 1, CODE),
];

pub(crate) static QUANTITY: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Quantity",
    kind: Kind::Element,
    hook: Hook::Quantity,
    elems: QUANTITY_ELEMS,
};
pub(crate) static AGE: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Age",
    kind: Kind::Element,
    hook: Hook::Quantity,
    elems: QUANTITY_ELEMS,
};
pub(crate) static COUNT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Count",
    kind: Kind::Element,
    hook: Hook::Quantity,
    elems: QUANTITY_ELEMS,
};
pub(crate) static DISTANCE: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Distance",
    kind: Kind::Element,
    hook: Hook::Quantity,
    elems: QUANTITY_ELEMS,
};
pub(crate) static DURATION: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Duration",
    kind: Kind::Element,
    hook: Hook::Quantity,
    elems: QUANTITY_ELEMS,
};

/// SimpleQuantity: a Quantity without `comparator` (sqty-1).
pub(crate) static SIMPLE_QUANTITY: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "SimpleQuantity",
    kind: Kind::Element,
    hook: Hook::SimpleQuantity,
    elems: &[
        el!("value", 0, 1, DECIMAL),
        el!("unit", 0, 1, STRING),
        el!("system", 0, 1, URI),
        el!("code", 0, 1, CODE),
    ],
};

pub(crate) static MONEY: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Money",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[el!("value", 0, 1, DECIMAL), el!("currency", 0, 1, CODE)],
};

pub(crate) static RANGE: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Range",
    kind: Kind::Element,
    hook: Hook::Range,
    elems: &[
        el!("low", 0, 1, c!(SIMPLE_QUANTITY)),
        el!("high", 0, 1, c!(SIMPLE_QUANTITY)),
    ],
};

pub(crate) static RATIO: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Ratio",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("numerator", 0, 1, c!(QUANTITY)),
        el!("denominator", 0, 1, c!(QUANTITY)),
    ],
};

pub(crate) static SAMPLED_DATA: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "SampledData",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("origin", 1, 1, c!(SIMPLE_QUANTITY)),
        el!("period", 1, 1, DECIMAL),
        el!("factor", 0, 1, DECIMAL),
        el!("lowerLimit", 0, 1, DECIMAL),
        el!("upperLimit", 0, 1, DECIMAL),
        el!("dimensions", 1, 1, POSITIVE_INT),
        el!("data", 0, 1, STRING),
    ],
};

pub(crate) static ANNOTATION: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Annotation",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        choice!("author", 0, c!(REFERENCE), STRING),
        el!("time", 0, 1, DATE_TIME),
        el!("text", 1, 1, MARKDOWN),
    ],
};

pub(crate) static SIGNATURE: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Signature",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("type", 1, *, c!(CODING)),
        el!("when", 1, 1, INSTANT),
        el!("who", 1, 1, c!(REFERENCE)),
        el!("onBehalfOf", 0, 1, c!(REFERENCE)),
        el!("targetFormat", 0, 1, CODE),
        el!("sigFormat", 0, 1, CODE),
        el!("data", 0, 1, BASE64),
    ],
};

pub(crate) static TIMING: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Timing",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: &[
        el!("event", 0, *, DATE_TIME),
        el!("repeat", 0, 1, c!(TIMING_REPEAT)),
        el!("code", 0, 1, c!(CODEABLE_CONCEPT)),
    ],
};

static TIMING_REPEAT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Timing.repeat",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        choice!("bounds", 0, c!(DURATION), c!(RANGE), c!(PERIOD)),
        el!("count", 0, 1, POSITIVE_INT),
        el!("countMax", 0, 1, POSITIVE_INT),
        el!("duration", 0, 1, DECIMAL),
        el!("durationMax", 0, 1, DECIMAL),
        el!("durationUnit", 0, 1, CODE; UNITS_OF_TIME),
        el!("frequency", 0, 1, POSITIVE_INT),
        el!("frequencyMax", 0, 1, POSITIVE_INT),
        el!("period", 0, 1, DECIMAL),
        el!("periodMax", 0, 1, DECIMAL),
        el!("periodUnit", 0, 1, CODE; UNITS_OF_TIME),
        el!("dayOfWeek", 0, *, CODE; DAYS_OF_WEEK),
        el!("timeOfDay", 0, *, TIME),
        el!("when", 0, *, CODE; EVENT_TIMING),
        el!("offset", 0, 1, UNSIGNED_INT),
    ],
};

pub(crate) static CONTACT_DETAIL: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "ContactDetail",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("name", 0, 1, STRING),
        el!("telecom", 0, *, c!(CONTACT_POINT)),
    ],
};

pub(crate) static CONTRIBUTOR: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Contributor",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("type", 1, 1, CODE; CONTRIBUTOR_TYPE),
        el!("name", 1, 1, STRING),
        el!("contact", 0, *, c!(CONTACT_DETAIL)),
    ],
};

pub(crate) static DATA_REQUIREMENT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "DataRequirement",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("type", 1, 1, CODE),
        el!("profile", 0, *, CANONICAL),
        choice!("subject", 0, c!(CODEABLE_CONCEPT), c!(REFERENCE)),
        el!("mustSupport", 0, *, STRING),
        el!("codeFilter", 0, *, c!(DATA_REQUIREMENT_CODE_FILTER)),
        el!("dateFilter", 0, *, c!(DATA_REQUIREMENT_DATE_FILTER)),
        el!("limit", 0, 1, POSITIVE_INT),
        el!("sort", 0, *, c!(DATA_REQUIREMENT_SORT)),
    ],
};

static DATA_REQUIREMENT_CODE_FILTER: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "DataRequirement.codeFilter",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("path", 0, 1, STRING),
        el!("searchParam", 0, 1, STRING),
        el!("valueSet", 0, 1, CANONICAL),
        el!("code", 0, *, c!(CODING)),
    ],
};

static DATA_REQUIREMENT_DATE_FILTER: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "DataRequirement.dateFilter",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("path", 0, 1, STRING),
        el!("searchParam", 0, 1, STRING),
        choice!("value", 0, DATE_TIME, c!(PERIOD), c!(DURATION)),
    ],
};

static DATA_REQUIREMENT_SORT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "DataRequirement.sort",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("path", 1, 1, STRING),
        el!("direction", 1, 1, CODE; SORT_DIRECTION),
    ],
};

pub(crate) static EXPRESSION: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Expression",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("description", 0, 1, STRING),
        el!("name", 0, 1, ID),
        el!("language", 1, 1, CODE),
        el!("expression", 0, 1, STRING),
        el!("reference", 0, 1, URI),
    ],
};

pub(crate) static PARAMETER_DEFINITION: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "ParameterDefinition",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("name", 0, 1, CODE),
        el!("use", 1, 1, CODE; OPERATION_PARAMETER_USE),
        el!("min", 0, 1, INTEGER),
        el!("max", 0, 1, STRING),
        el!("documentation", 0, 1, STRING),
        el!("type", 1, 1, CODE),
        el!("profile", 0, 1, CANONICAL),
    ],
};

pub(crate) static RELATED_ARTIFACT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "RelatedArtifact",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("type", 1, 1, CODE; RELATED_ARTIFACT_TYPE),
        el!("label", 0, 1, STRING),
        el!("display", 0, 1, STRING),
        el!("citation", 0, 1, MARKDOWN),
        el!("url", 0, 1, URL),
        el!("document", 0, 1, c!(ATTACHMENT)),
        el!("resource", 0, 1, CANONICAL),
    ],
};

pub(crate) static TRIGGER_DEFINITION: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "TriggerDefinition",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("type", 1, 1, CODE; TRIGGER_TYPE),
        el!("name", 0, 1, STRING),
        choice!("timing", 0, c!(TIMING), c!(REFERENCE), DATE, DATE_TIME),
        el!("data", 0, *, c!(DATA_REQUIREMENT)),
        el!("condition", 0, 1, c!(EXPRESSION)),
    ],
};

pub(crate) static USAGE_CONTEXT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "UsageContext",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("code", 1, 1, c!(CODING)),
        choice!(
            "value",
            1,
            c!(CODEABLE_CONCEPT),
            c!(QUANTITY),
            c!(RANGE),
            c!(REFERENCE)
        ),
    ],
};

pub(crate) static DOSAGE: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Dosage",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: &[
        el!("sequence", 0, 1, INTEGER),
        el!("text", 0, 1, STRING),
        el!("additionalInstruction", 0, *, c!(CODEABLE_CONCEPT)),
        el!("patientInstruction", 0, 1, STRING),
        el!("timing", 0, 1, c!(TIMING)),
        choice!("asNeeded", 0, BOOLEAN, c!(CODEABLE_CONCEPT)),
        el!("site", 0, 1, c!(CODEABLE_CONCEPT)),
        el!("route", 0, 1, c!(CODEABLE_CONCEPT)),
        el!("method", 0, 1, c!(CODEABLE_CONCEPT)),
        el!("doseAndRate", 0, *, c!(DOSAGE_DOSE_AND_RATE)),
        el!("maxDosePerPeriod", 0, 1, c!(RATIO)),
        el!("maxDosePerAdministration", 0, 1, c!(SIMPLE_QUANTITY)),
        el!("maxDosePerLifetime", 0, 1, c!(SIMPLE_QUANTITY)),
    ],
};

static DOSAGE_DOSE_AND_RATE: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Dosage.doseAndRate",
    kind: Kind::Element,
    hook: Hook::None,
    elems: &[
        el!("type", 0, 1, c!(CODEABLE_CONCEPT)),
        choice!("dose", 0, c!(RANGE), c!(SIMPLE_QUANTITY)),
        choice!("rate", 0, c!(RATIO), c!(RANGE), c!(SIMPLE_QUANTITY)),
    ],
};

// ---------------------------------------------------------------------------------------------------------
// Resources.

pub(crate) static PATIENT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Patient",
    kind: Kind::Resource,
    hook: Hook::None,
    elems: &[
        el!("identifier", 0, *, c!(IDENTIFIER)),
        el!("active", 0, 1, BOOLEAN),
        el!("name", 0, *, c!(HUMAN_NAME)),
        el!("telecom", 0, *, c!(CONTACT_POINT)),
        el!("gender", 0, 1, CODE; ADMINISTRATIVE_GENDER),
        el!("birthDate", 0, 1, DATE),
        choice!("deceased", 0, BOOLEAN, DATE_TIME),
        el!("address", 0, *, c!(ADDRESS)),
        el!("maritalStatus", 0, 1, c!(CODEABLE_CONCEPT)),
        choice!("multipleBirth", 0, BOOLEAN, INTEGER),
        el!("photo", 0, *, c!(ATTACHMENT)),
        el!("contact", 0, *, c!(PATIENT_CONTACT)),
        el!("communication", 0, *, c!(PATIENT_COMMUNICATION)),
        el!("generalPractitioner", 0, *, c!(REFERENCE)),
        el!("managingOrganization", 0, 1, c!(REFERENCE)),
        el!("link", 0, *, c!(PATIENT_LINK)),
    ],
};

static PATIENT_CONTACT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Patient.contact",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: &[
        el!("relationship", 0, *, c!(CODEABLE_CONCEPT)),
        el!("name", 0, 1, c!(HUMAN_NAME)),
        el!("telecom", 0, *, c!(CONTACT_POINT)),
        el!("address", 0, 1, c!(ADDRESS)),
        el!("gender", 0, 1, CODE; ADMINISTRATIVE_GENDER),
        el!("organization", 0, 1, c!(REFERENCE)),
        el!("period", 0, 1, c!(PERIOD)),
    ],
};

static PATIENT_COMMUNICATION: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Patient.communication",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: &[
        el!("language", 1, 1, c!(CODEABLE_CONCEPT)),
        el!("preferred", 0, 1, BOOLEAN),
    ],
};

static PATIENT_LINK: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Patient.link",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: &[
        el!("other", 1, 1, c!(REFERENCE)),
        el!("type", 1, 1, CODE; LINK_TYPE),
    ],
};

pub(crate) static PRACTITIONER: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Practitioner",
    kind: Kind::Resource,
    hook: Hook::None,
    elems: &[
        el!("identifier", 0, *, c!(IDENTIFIER)),
        el!("active", 0, 1, BOOLEAN),
        el!("name", 0, *, c!(HUMAN_NAME)),
        el!("telecom", 0, *, c!(CONTACT_POINT)),
        el!("address", 0, *, c!(ADDRESS)),
        el!("gender", 0, 1, CODE; ADMINISTRATIVE_GENDER),
        el!("birthDate", 0, 1, DATE),
        el!("photo", 0, *, c!(ATTACHMENT)),
        el!("qualification", 0, *, c!(PRACTITIONER_QUALIFICATION)),
        el!("communication", 0, *, c!(CODEABLE_CONCEPT)),
    ],
};

static PRACTITIONER_QUALIFICATION: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Practitioner.qualification",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: &[
        el!("identifier", 0, *, c!(IDENTIFIER)),
        el!("code", 1, 1, c!(CODEABLE_CONCEPT)),
        el!("period", 0, 1, c!(PERIOD)),
        el!("issuer", 0, 1, c!(REFERENCE)),
    ],
};

/// `availableTime` of PractitionerRole and HealthcareService (same shape).
static AVAILABLE_TIME_ELEMS: &[Elem] = &[
    el!("daysOfWeek", 0, *, CODE; DAYS_OF_WEEK),
    el!("allDay", 0, 1, BOOLEAN),
    el!("availableStartTime", 0, 1, TIME),
    el!("availableEndTime", 0, 1, TIME),
];

/// `notAvailable` of PractitionerRole and HealthcareService (same shape).
static NOT_AVAILABLE_ELEMS: &[Elem] = &[
    el!("description", 1, 1, STRING),
    el!("during", 0, 1, c!(PERIOD)),
];

pub(crate) static PRACTITIONER_ROLE: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "PractitionerRole",
    kind: Kind::Resource,
    hook: Hook::None,
    elems: &[
        el!("identifier", 0, *, c!(IDENTIFIER)),
        el!("active", 0, 1, BOOLEAN),
        el!("period", 0, 1, c!(PERIOD)),
        el!("practitioner", 0, 1, c!(REFERENCE)),
        el!("organization", 0, 1, c!(REFERENCE)),
        el!("code", 0, *, c!(CODEABLE_CONCEPT)),
        el!("specialty", 0, *, c!(CODEABLE_CONCEPT)),
        el!("location", 0, *, c!(REFERENCE)),
        el!("healthcareService", 0, *, c!(REFERENCE)),
        el!("telecom", 0, *, c!(CONTACT_POINT)),
        el!("availableTime", 0, *, c!(PRACTITIONER_ROLE_AVAILABLE_TIME)),
        el!("notAvailable", 0, *, c!(PRACTITIONER_ROLE_NOT_AVAILABLE)),
        el!("availabilityExceptions", 0, 1, STRING),
        el!("endpoint", 0, *, c!(REFERENCE)),
    ],
};

static PRACTITIONER_ROLE_AVAILABLE_TIME: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "PractitionerRole.availableTime",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: AVAILABLE_TIME_ELEMS,
};

static PRACTITIONER_ROLE_NOT_AVAILABLE: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "PractitionerRole.notAvailable",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: NOT_AVAILABLE_ELEMS,
};

pub(crate) static ORGANIZATION: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Organization",
    kind: Kind::Resource,
    hook: Hook::None,
    elems: &[
        el!("identifier", 0, *, c!(IDENTIFIER)),
        el!("active", 0, 1, BOOLEAN),
        el!("type", 0, *, c!(CODEABLE_CONCEPT)),
        el!("name", 0, 1, STRING),
        el!("alias", 0, *, STRING),
        el!("telecom", 0, *, c!(CONTACT_POINT)),
        el!("address", 0, *, c!(ADDRESS)),
        el!("partOf", 0, 1, c!(REFERENCE)),
        el!("contact", 0, *, c!(ORGANIZATION_CONTACT)),
        el!("endpoint", 0, *, c!(REFERENCE)),
    ],
};

static ORGANIZATION_CONTACT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Organization.contact",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: &[
        el!("purpose", 0, 1, c!(CODEABLE_CONCEPT)),
        el!("name", 0, 1, c!(HUMAN_NAME)),
        el!("telecom", 0, *, c!(CONTACT_POINT)),
        el!("address", 0, 1, c!(ADDRESS)),
    ],
};

pub(crate) static LOCATION: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Location",
    kind: Kind::Resource,
    hook: Hook::None,
    elems: &[
        el!("identifier", 0, *, c!(IDENTIFIER)),
        el!("status", 0, 1, CODE; LOCATION_STATUS),
        el!("operationalStatus", 0, 1, c!(CODING)),
        el!("name", 0, 1, STRING),
        el!("alias", 0, *, STRING),
        el!("description", 0, 1, STRING),
        el!("mode", 0, 1, CODE; LOCATION_MODE),
        el!("type", 0, *, c!(CODEABLE_CONCEPT)),
        el!("telecom", 0, *, c!(CONTACT_POINT)),
        el!("address", 0, 1, c!(ADDRESS)),
        el!("physicalType", 0, 1, c!(CODEABLE_CONCEPT)),
        el!("position", 0, 1, c!(LOCATION_POSITION)),
        el!("managingOrganization", 0, 1, c!(REFERENCE)),
        el!("partOf", 0, 1, c!(REFERENCE)),
        el!("hoursOfOperation", 0, *, c!(LOCATION_HOURS_OF_OPERATION)),
        el!("availabilityExceptions", 0, 1, STRING),
        el!("endpoint", 0, *, c!(REFERENCE)),
    ],
};

static LOCATION_POSITION: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Location.position",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: &[
        el!("longitude", 1, 1, DECIMAL),
        el!("latitude", 1, 1, DECIMAL),
        el!("altitude", 0, 1, DECIMAL),
    ],
};

static LOCATION_HOURS_OF_OPERATION: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Location.hoursOfOperation",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: &[
        el!("daysOfWeek", 0, *, CODE; DAYS_OF_WEEK),
        el!("allDay", 0, 1, BOOLEAN),
        el!("openingTime", 0, 1, TIME),
        el!("closingTime", 0, 1, TIME),
    ],
};

pub(crate) static HEALTHCARE_SERVICE: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "HealthcareService",
    kind: Kind::Resource,
    hook: Hook::None,
    elems: &[
        el!("identifier", 0, *, c!(IDENTIFIER)),
        el!("active", 0, 1, BOOLEAN),
        el!("providedBy", 0, 1, c!(REFERENCE)),
        el!("category", 0, *, c!(CODEABLE_CONCEPT)),
        el!("type", 0, *, c!(CODEABLE_CONCEPT)),
        el!("specialty", 0, *, c!(CODEABLE_CONCEPT)),
        el!("location", 0, *, c!(REFERENCE)),
        el!("name", 0, 1, STRING),
        el!("comment", 0, 1, STRING),
        el!("extraDetails", 0, 1, MARKDOWN),
        el!("photo", 0, 1, c!(ATTACHMENT)),
        el!("telecom", 0, *, c!(CONTACT_POINT)),
        el!("coverageArea", 0, *, c!(REFERENCE)),
        el!("serviceProvisionCode", 0, *, c!(CODEABLE_CONCEPT)),
        el!("eligibility", 0, *, c!(HEALTHCARE_SERVICE_ELIGIBILITY)),
        el!("program", 0, *, c!(CODEABLE_CONCEPT)),
        el!("characteristic", 0, *, c!(CODEABLE_CONCEPT)),
        el!("communication", 0, *, c!(CODEABLE_CONCEPT)),
        el!("referralMethod", 0, *, c!(CODEABLE_CONCEPT)),
        el!("appointmentRequired", 0, 1, BOOLEAN),
        el!("availableTime", 0, *, c!(HEALTHCARE_SERVICE_AVAILABLE_TIME)),
        el!("notAvailable", 0, *, c!(HEALTHCARE_SERVICE_NOT_AVAILABLE)),
        el!("availabilityExceptions", 0, 1, STRING),
        el!("endpoint", 0, *, c!(REFERENCE)),
    ],
};

static HEALTHCARE_SERVICE_ELIGIBILITY: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "HealthcareService.eligibility",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: &[
        el!("code", 0, 1, c!(CODEABLE_CONCEPT)),
        el!("comment", 0, 1, MARKDOWN),
    ],
};

static HEALTHCARE_SERVICE_AVAILABLE_TIME: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "HealthcareService.availableTime",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: AVAILABLE_TIME_ELEMS,
};

static HEALTHCARE_SERVICE_NOT_AVAILABLE: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "HealthcareService.notAvailable",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: NOT_AVAILABLE_ELEMS,
};

pub(crate) static SCHEDULE: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Schedule",
    kind: Kind::Resource,
    hook: Hook::None,
    elems: &[
        el!("identifier", 0, *, c!(IDENTIFIER)),
        el!("active", 0, 1, BOOLEAN),
        el!("serviceCategory", 0, *, c!(CODEABLE_CONCEPT)),
        el!("serviceType", 0, *, c!(CODEABLE_CONCEPT)),
        el!("specialty", 0, *, c!(CODEABLE_CONCEPT)),
        el!("actor", 1, *, c!(REFERENCE)),
        el!("planningHorizon", 0, 1, c!(PERIOD)),
        el!("comment", 0, 1, STRING),
    ],
};

pub(crate) static SLOT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Slot",
    kind: Kind::Resource,
    hook: Hook::None,
    elems: &[
        el!("identifier", 0, *, c!(IDENTIFIER)),
        el!("serviceCategory", 0, *, c!(CODEABLE_CONCEPT)),
        el!("serviceType", 0, *, c!(CODEABLE_CONCEPT)),
        el!("specialty", 0, *, c!(CODEABLE_CONCEPT)),
        el!("appointmentType", 0, 1, c!(CODEABLE_CONCEPT)),
        el!("schedule", 1, 1, c!(REFERENCE)),
        el!("status", 1, 1, CODE; SLOT_STATUS),
        el!("start", 1, 1, INSTANT),
        el!("end", 1, 1, INSTANT),
        el!("overbooked", 0, 1, BOOLEAN),
        el!("comment", 0, 1, STRING),
    ],
};

pub(crate) static APPOINTMENT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Appointment",
    kind: Kind::Resource,
    hook: Hook::None,
    elems: &[
        el!("identifier", 0, *, c!(IDENTIFIER)),
        el!("status", 1, 1, CODE; APPOINTMENT_STATUS),
        el!("cancelationReason", 0, 1, c!(CODEABLE_CONCEPT)),
        el!("serviceCategory", 0, *, c!(CODEABLE_CONCEPT)),
        el!("serviceType", 0, *, c!(CODEABLE_CONCEPT)),
        el!("specialty", 0, *, c!(CODEABLE_CONCEPT)),
        el!("appointmentType", 0, 1, c!(CODEABLE_CONCEPT)),
        el!("reasonCode", 0, *, c!(CODEABLE_CONCEPT)),
        el!("reasonReference", 0, *, c!(REFERENCE)),
        el!("priority", 0, 1, UNSIGNED_INT),
        el!("description", 0, 1, STRING),
        el!("supportingInformation", 0, *, c!(REFERENCE)),
        el!("start", 0, 1, INSTANT),
        el!("end", 0, 1, INSTANT),
        el!("minutesDuration", 0, 1, POSITIVE_INT),
        el!("slot", 0, *, c!(REFERENCE)),
        el!("created", 0, 1, DATE_TIME),
        el!("comment", 0, 1, STRING),
        el!("patientInstruction", 0, 1, STRING),
        el!("basedOn", 0, *, c!(REFERENCE)),
        el!("participant", 1, *, c!(APPOINTMENT_PARTICIPANT)),
        el!("requestedPeriod", 0, *, c!(PERIOD)),
    ],
};

static APPOINTMENT_PARTICIPANT: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Appointment.participant",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: &[
        el!("type", 0, *, c!(CODEABLE_CONCEPT)),
        el!("actor", 0, 1, c!(REFERENCE)),
        el!("required", 0, 1, CODE; PARTICIPANT_REQUIRED),
        el!("status", 1, 1, CODE; PARTICIPATION_STATUS),
        el!("period", 0, 1, c!(PERIOD)),
    ],
};

static SUBSCRIPTION_STATUS: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/subscription-status",
    codes: &["requested", "active", "error", "off"],
};

static SUBSCRIPTION_CHANNEL_TYPE: Binding = Binding {
    value_set: "http://hl7.org/fhir/ValueSet/subscription-channel-type",
    codes: &["rest-hook", "websocket", "email", "sms", "message"],
};

pub(crate) static SUBSCRIPTION: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Subscription",
    kind: Kind::Resource,
    hook: Hook::None,
    elems: &[
        el!("status", 1, 1, CODE; SUBSCRIPTION_STATUS),
        el!("contact", 0, *, c!(CONTACT_POINT)),
        el!("end", 0, 1, INSTANT),
        el!("reason", 1, 1, STRING),
        el!("criteria", 1, 1, STRING),
        el!("error", 0, 1, STRING),
        el!("channel", 1, 1, c!(SUBSCRIPTION_CHANNEL)),
    ],
};

static SUBSCRIPTION_CHANNEL: TypeDef = TypeDef {
    lut: Lut::new(),
    name: "Subscription.channel",
    kind: Kind::Backbone,
    hook: Hook::None,
    elems: &[
        el!("type", 1, 1, CODE; SUBSCRIPTION_CHANNEL_TYPE),
        el!("endpoint", 0, 1, URL),
        el!("payload", 0, 1, CODE),
        el!("header", 0, *, STRING),
    ],
};

/// The table of a served resource type.
pub(crate) fn resource_def(rtype: ResourceType) -> &'static TypeDef {
    match rtype {
        ResourceType::Patient => &PATIENT,
        ResourceType::Practitioner => &PRACTITIONER,
        ResourceType::PractitionerRole => &PRACTITIONER_ROLE,
        ResourceType::Organization => &ORGANIZATION,
        ResourceType::Location => &LOCATION,
        ResourceType::HealthcareService => &HEALTHCARE_SERVICE,
        ResourceType::Schedule => &SCHEDULE,
        ResourceType::Slot => &SLOT,
        ResourceType::Appointment => &APPOINTMENT,
        ResourceType::Subscription => &SUBSCRIPTION,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every type reachable from the served resources, visited once.
    fn reachable() -> Vec<&'static TypeDef> {
        let mut out: Vec<&'static TypeDef> = Vec::new();
        let mut todo: Vec<&'static TypeDef> =
            ResourceType::ALL.iter().map(|t| resource_def(*t)).collect();
        todo.push(&ELEMENT);
        while let Some(d) = todo.pop() {
            if out.iter().any(|o| std::ptr::eq(*o, d)) {
                continue;
            }
            out.push(d);
            for e in d.base().iter().chain(d.elems.iter()) {
                for t in e.types {
                    if let Ty::C(c) = t {
                        todo.push(c);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn element_names_unique_and_fit_in_u64() {
        for d in reachable() {
            assert!(d.len() <= 64, "{} has {} elements", d.name, d.len());
            let names: Vec<&str> = d
                .base()
                .iter()
                .chain(d.elems.iter())
                .map(|e| e.name)
                .collect();
            for (i, n) in names.iter().enumerate() {
                assert!(!names[..i].contains(n), "{} repeats {}", d.name, n);
            }
        }
    }

    #[test]
    fn choice_keys_resolve_and_plain_keys_are_not_shadowed() {
        for d in reachable() {
            for (i, e) in d.base().iter().chain(d.elems.iter()).enumerate() {
                if e.choice {
                    assert!(e.types.len() > 1, "{}.{}", d.name, e.name);
                    for t in e.types {
                        let key = format!("{}{}", e.name, t.suffix());
                        let got = d.lookup(&key).map(|(j, _, ty)| (j, ty.name()));
                        assert_eq!(got, Some((i, t.name())), "{}.{key}", d.name);
                    }
                } else {
                    assert_eq!(e.types.len(), 1, "{}.{}", d.name, e.name);
                    assert_eq!(
                        d.lookup(e.name).map(|(j, _, _)| j),
                        Some(i),
                        "{}.{}",
                        d.name,
                        e.name
                    );
                }
            }
        }
    }

    #[test]
    fn bytes_eq_is_equality() {
        let words: Vec<Vec<u8>> = (0..40)
            .flat_map(|n| {
                let base: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
                let mut out = vec![base.clone()];
                for i in 0..n {
                    let mut w = base.clone();
                    w[i] ^= 1;
                    out.push(w);
                }
                out
            })
            .collect();
        for a in &words {
            for b in &words {
                assert_eq!(bytes_eq(a, b), a == b, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn indexed_lookup_equals_the_scan() {
        let mut keys: Vec<String> = vec![
            String::new(),
            "value".into(),
            "valueFoo".into(),
            "resourceType".into(),
            "x".into(),
        ];
        for d in reachable() {
            for e in d.base().iter().chain(d.elems.iter()) {
                keys.push(e.name.to_string());
                keys.push(format!("{}x", e.name));
                keys.push(e.name.to_uppercase());
                for t in e.types {
                    keys.push(format!("{}{}", e.name, t.suffix()));
                    keys.push(t.suffix().to_string());
                }
            }
        }
        for d in reachable() {
            let mut required = 0u64;
            for (i, e) in d.base().iter().chain(d.elems.iter()).enumerate() {
                if i < 64 && e.min > 0 {
                    required |= 1 << i;
                }
            }
            assert_eq!(d.required_mask(), required, "{}", d.name);
            for k in &keys {
                let a = d.lookup(k).map(|(i, e, t)| (i, e.name, t.name()));
                let b = d.lookup_scan(k).map(|(i, e, t)| (i, e.name, t.name()));
                assert_eq!(a, b, "{}: {k}", d.name);
            }
        }
    }

    #[test]
    fn extension_value_covers_the_r4_open_type_list() {
        let count = EXTENSION
            .elems
            .iter()
            .find(|e| e.name == "value")
            .map(|e| e.types.len());
        assert_eq!(count, Some(50));
        assert!(EXTENSION.lookup("valueFoo").is_none());
        assert!(EXTENSION.lookup("value").is_none());
    }
}
