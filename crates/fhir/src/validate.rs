//! Validation of the served FHIR R4 resources, with the UK Core rules the hub enforces.
//!
//! Why it exists: every write (REST, `$validate`, the HL7 and BaRS adapters, `carebridge validate`) must
//! refuse a malformed resource with an OperationOutcome that lists *every* problem, each located by a
//! FHIRPath expression (`Patient.identifier[0].value`, `Patient.deceased.ofType(dateTime)`,
//! `Patient.name[0].given[1].extension[0].url`), so a client can fix its payload in one round trip.
//!
//! How: the JSON, seen through [`Node`] (a view of a `serde_json::Value`, or of a tape parsed from the
//! bytes: `node.rs`), is walked against the element tables of `schema.rs`. The walk keeps a
//! stack of path segments borrowed from the JSON and renders an expression only when it reports an issue,
//! so a valid resource costs no string building. Checked: `resourceType`; JSON kinds and R4 lexical rules
//! of primitives (`primitive.rs`); arrays against max cardinality; min cardinality; unknown elements;
//! required bindings; nulls, empty strings/objects/arrays (ele-1 and the JSON rules); primitive extensions
//! (`_birthDate`, `_given` aligned with `given`); contained resources of the served types (others refused
//! as `not-supported`). Type and resource invariants and the UK Core rules are in `rules.rs`.
//!
//! Normalisation: ODS identifier systems written in any of the variants seen in the wild are rewritten to
//! the canonical UK Core spelling, in place, after the walk (an `information` issue says so). Nothing else
//! is rewritten: decimals such as `1.50`, offsets such as `+00:00` and extensions are kept as sent.
//!
//! Speed: `validate_json` builds the Value with the fast parser of `json.rs` (serde_json's exact result, with
//! serde_json itself as the fallback for anything unusual, so results and error messages are unchanged);
//! `check_json`, which needs no Value, walks a tape of the bytes from the same parser instead (no allocation
//! per key or string), falling back to serde_json the same way, so both report the same issues. Keys
//! resolve through the per-type index of `schema.rs`; members of the small objects FHIR is made of are found
//! by a scan (`Obj::get` in `node.rs`) rather than by hashing the name.
//!
//! Invariants: never panics on any input value (no unwrap, no panicking index); recursion is bounded.

mod primitive;
mod rules;

use crate::node::{Node, Obj};
use crate::schema::{self, Elem, Kind, Prim, Ty, TypeDef};
use crate::{Issue, IssueType, ResourceType, Severity};
use serde_json::Value;

/// A resource that passed validation (possibly normalised), with any warnings.
#[derive(Debug, Clone)]
pub struct Validated {
    pub rtype: ResourceType,
    pub resource: Value,
    pub warnings: Vec<Issue>,
}

/// Validate (and normalise in place) a resource of the expected type. Returns every issue found; the resource
/// is valid when no issue is an error.
pub fn validate(rtype: ResourceType, resource: &mut Value) -> Vec<Issue> {
    let (issues, fixes) = {
        let mut cx = Ctx::new();
        cx.root(rtype, Node::of(resource));
        (cx.issues, cx.fixes)
    };
    for fix in &fixes {
        fix.apply(resource);
    }
    issues
}

/// Parse bytes and validate whatever supported resource they hold; on success the resource as a
/// `serde_json::Value`, normalised, with any warnings (used by writes). `expected`: if set, `resourceType`
/// must equal it.
pub fn validate_json(
    bytes: &[u8],
    expected: Option<ResourceType>,
) -> Result<Validated, Vec<Issue>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    // The fast parser builds the same Value as serde_json; whatever it cannot decide (including every
    // malformed input) goes to serde_json, so values and error messages are serde_json's.
    let mut resource = match crate::json::parse(bytes) {
        Some(v) => v,
        None => parse_slow(bytes)?,
    };
    let (rtype, warnings, fixes) = check_node(Node::of(&resource), expected)?;
    for fix in &fixes {
        fix.apply(&mut resource);
    }
    Ok(Validated {
        rtype,
        resource,
        warnings,
    })
}

/// Parse bytes and validate whatever supported resource they hold, without building the resource: the
/// warnings when it is valid, else every issue (used by `$validate` and `carebridge validate`). Same
/// verdict and issues as [`validate_json`].
pub fn check_json(bytes: &[u8], expected: Option<ResourceType>) -> Result<Vec<Issue>, Vec<Issue>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match crate::json::parse_doc(bytes) {
        // The parser checks every number as serde_json would, so a tape here is what validate_json sees.
        Some(doc) => check_node(doc.root(), expected).map(|(_, warnings, _)| warnings),
        None => {
            let resource = parse_slow(bytes)?;
            check_node(Node::of(&resource), expected).map(|(_, warnings, _)| warnings)
        }
    }
}

/// serde_json's own parse, its error as the OperationOutcome issue a client gets (the fast parser leaves
/// every malformed input here, so error messages are serde_json's).
fn parse_slow(bytes: &[u8]) -> Result<Value, Vec<Issue>> {
    serde_json::from_slice::<Value>(bytes).map_err(|e| {
        let text = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let what = text.strip_suffix(&suffix).unwrap_or(&text);
        vec![Issue::error(
            IssueType::Structure,
            format!(
                "The body is not valid JSON (line {}, column {}): {what}",
                e.line(),
                e.column()
            ),
        )]
    })
}

/// The resource type of a parsed document, then the walk: `(type, warnings, fixes)` when valid, else
/// every issue.
fn check_node(
    node: Node<'_>,
    expected: Option<ResourceType>,
) -> Result<(ResourceType, Vec<Issue>, Vec<Fix>), Vec<Issue>> {
    let rtype = {
        let Some(obj) = node.as_object() else {
            return Err(vec![Issue::error(
                IssueType::Structure,
                format!(
                    "A FHIR resource must be a JSON object, found {}",
                    primitive::json_kind(node)
                ),
            )]);
        };
        let name = match obj.get("resourceType") {
            None => {
                return Err(vec![
                    Issue::error(IssueType::Required, "The resource has no resourceType")
                        .at("resourceType"),
                ]);
            }
            Some(Node::String(s)) => s,
            Some(other) => {
                return Err(vec![
                    Issue::error(
                        IssueType::Structure,
                        format!(
                            "resourceType must be a JSON string, found {}",
                            primitive::json_kind(other)
                        ),
                    )
                    .at("resourceType"),
                ]);
            }
        };
        if let Some(exp) = expected
            && name != exp.as_str()
        {
            return Err(vec![
                Issue::error(
                    IssueType::Invalid,
                    format!(
                        "resourceType is '{}' but a {} was expected",
                        primitive::shown(name),
                        exp.as_str()
                    ),
                )
                .at("resourceType"),
            ]);
        }
        match ResourceType::parse(name) {
            Some(t) => t,
            None => return Err(vec![unsupported_type(name).at("resourceType")]),
        }
    };
    let mut cx = Ctx::new();
    cx.root(rtype, node);
    if cx.issues.iter().any(Issue::is_error) {
        Err(cx.issues)
    } else {
        Ok((rtype, cx.issues, cx.fixes))
    }
}

fn supported_list() -> String {
    ResourceType::ALL
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn unsupported_type(name: &str) -> Issue {
    Issue::error(
        IssueType::NotSupported,
        format!(
            "Resource type '{}' is not supported; supported types are {}",
            primitive::shown(name),
            supported_list()
        ),
    )
}

/// Deepest nesting of complex elements followed (JSON from `serde_json` is at most 128 deep anyway; this
/// bounds values built in code).
const MAX_DEPTH: u32 = 100;

/// One step of the path to the element being validated.
#[derive(Debug, Clone, Copy)]
enum Seg<'a> {
    /// The resource type at the root.
    Root(&'static str),
    /// A JSON key of a known element (a `_x` key renders as `x`: FHIRPath reaches a primitive's extensions
    /// through the primitive).
    Key(&'a str),
    /// A choice element's key, e.g. `deceasedDateTime`, rendered `deceased.ofType(dateTime)`.
    Choice(&'a str, &'static str, &'static str),
    /// A key rendered exactly as sent (unknown elements).
    Raw(&'a str),
    /// Static name used by rules (`start`, `value`, ...).
    Name(&'static str),
    Index(usize),
}

/// A pending in-place rewrite of an Identifier's `system` (ODS normalisation).
struct Fix {
    /// Path from the resource root to the Identifier object.
    path: Vec<FixSeg>,
    system: &'static str,
}

enum FixSeg {
    Key(String),
    Index(usize),
}

impl Fix {
    fn apply(&self, root: &mut Value) {
        let mut v = root;
        for seg in &self.path {
            let next = match seg {
                FixSeg::Key(k) => v.get_mut(k.as_str()),
                FixSeg::Index(i) => v.get_mut(*i),
            };
            match next {
                Some(n) => v = n,
                None => return,
            }
        }
        if let Some(s) = v.get_mut("system") {
            *s = Value::String(self.system.to_string());
        }
    }
}

/// Validation state of one resource (and its contained resources).
struct Ctx<'a> {
    path: Vec<Seg<'a>>,
    issues: Vec<Issue>,
    fixes: Vec<Fix>,
    /// Ids of the root resource's contained resources (ref-1).
    contained_ids: Vec<&'a str>,
    /// Local references (`#id`) seen anywhere (dom-3).
    local_refs: Vec<&'a str>,
    /// Indexes of contained resources that refer to their container with `#` (dom-3).
    container_refs: Vec<usize>,
    /// Index of the contained resource being walked, if any.
    cur_contained: Option<usize>,
    depth: u32,
}

impl<'a> Ctx<'a> {
    fn new() -> Self {
        Ctx {
            path: Vec::with_capacity(16),
            issues: Vec::new(),
            fixes: Vec::new(),
            contained_ids: Vec::new(),
            local_refs: Vec::new(),
            container_refs: Vec::new(),
            cur_contained: None,
            depth: 0,
        }
    }

    // ---- reporting -------------------------------------------------------------------------------------

    fn render(&self, extra: &[Seg<'_>]) -> String {
        let mut out = String::with_capacity(64);
        for seg in self.path.iter().chain(extra.iter()) {
            match seg {
                Seg::Root(n) => out.push_str(n),
                Seg::Key(k) => {
                    out.push('.');
                    out.push_str(k.strip_prefix('_').unwrap_or(k));
                }
                Seg::Choice(_, base, ty) => {
                    out.push('.');
                    out.push_str(base);
                    out.push_str(".ofType(");
                    out.push_str(ty);
                    out.push(')');
                }
                Seg::Raw(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                Seg::Name(n) => {
                    out.push('.');
                    out.push_str(n);
                }
                Seg::Index(i) => {
                    out.push('[');
                    out.push_str(&i.to_string());
                    out.push(']');
                }
            }
        }
        out
    }

    /// Report an issue at the current path plus `extra` segments.
    fn report(
        &mut self,
        severity: Severity,
        code: IssueType,
        msg: impl Into<String>,
        extra: &[Seg<'_>],
    ) {
        let expression = self.render(extra);
        let expression = if expression.is_empty() {
            Vec::new()
        } else {
            vec![expression]
        };
        self.issues.push(Issue {
            severity,
            code,
            diagnostics: msg.into(),
            expression,
        });
    }

    fn error(&mut self, code: IssueType, msg: impl Into<String>) {
        self.report(Severity::Error, code, msg, &[]);
    }

    fn error_at(&mut self, code: IssueType, msg: impl Into<String>, extra: &[Seg<'_>]) {
        self.report(Severity::Error, code, msg, extra);
    }

    /// The current path as raw JSON steps from the root (for in-place fixes).
    fn fix_path(&self) -> Vec<FixSeg> {
        self.path
            .iter()
            .filter_map(|s| match s {
                Seg::Root(_) => None,
                Seg::Key(k) | Seg::Choice(k, _, _) | Seg::Raw(k) => {
                    Some(FixSeg::Key((*k).to_string()))
                }
                Seg::Name(n) => Some(FixSeg::Key((*n).to_string())),
                Seg::Index(i) => Some(FixSeg::Index(*i)),
            })
            .collect()
    }

    // ---- resources -------------------------------------------------------------------------------------

    fn root(&mut self, rtype: ResourceType, resource: Node<'a>) {
        let Some(obj) = resource.as_object() else {
            self.error(
                IssueType::Structure,
                format!(
                    "A FHIR resource must be a JSON object, found {}",
                    primitive::json_kind(resource)
                ),
            );
            return;
        };
        match obj.get("resourceType") {
            Some(Node::String(s)) if s == rtype.as_str() => {}
            None => self.issues.push(
                Issue::error(
                    IssueType::Required,
                    format!("The resource has no resourceType (expected {rtype})"),
                )
                .at("resourceType"),
            ),
            Some(Node::String(s)) => {
                self.issues.push(
                    Issue::error(
                        IssueType::Invalid,
                        format!(
                            "resourceType is '{}' but a {rtype} was expected",
                            primitive::shown(s)
                        ),
                    )
                    .at("resourceType"),
                );
                return;
            }
            Some(other) => {
                self.issues.push(
                    Issue::error(
                        IssueType::Structure,
                        format!(
                            "resourceType must be a JSON string, found {}",
                            primitive::json_kind(other)
                        ),
                    )
                    .at("resourceType"),
                );
                return;
            }
        }
        if let Some(Node::Array(items)) = obj.get("contained") {
            self.contained_ids = items
                .iter()
                .filter_map(|c| c.get("id").and_then(Node::as_str))
                .collect::<Vec<&'a str>>();
        }
        self.path.push(Seg::Root(rtype.as_str()));
        self.resource(rtype, obj);
        self.dom3(obj);
        self.path.pop();
    }

    fn resource(&mut self, rtype: ResourceType, obj: Obj<'a>) {
        self.walk_object(schema::resource_def(rtype), obj);
        self.resource_rules(rtype, obj);
    }

    /// One item of `contained` (the path already ends with its index).
    fn contained(&mut self, v: Node<'a>, index: usize) {
        let Node::Object(obj) = v else {
            self.error(
                IssueType::Structure,
                format!(
                    "a contained resource must be a JSON object, found {}",
                    primitive::json_kind(v)
                ),
            );
            return;
        };
        if self.cur_contained.is_some() {
            self.error(
                IssueType::Invariant,
                "dom-2: a contained resource SHALL NOT contain nested resources",
            );
            return;
        }
        let rtype = match obj.get("resourceType") {
            None => {
                self.error(
                    IssueType::Required,
                    "a contained resource must have a resourceType",
                );
                return;
            }
            Some(Node::String(s)) => match ResourceType::parse(s) {
                Some(t) => t,
                None => {
                    self.error(
                        IssueType::NotSupported,
                        format!(
                            "Contained resources of type '{}' are not supported; supported types are {}",
                            primitive::shown(s),
                            supported_list()
                        ),
                    );
                    return;
                }
            },
            Some(other) => {
                self.error_at(
                    IssueType::Structure,
                    format!(
                        "resourceType must be a JSON string, found {}",
                        primitive::json_kind(other)
                    ),
                    &[Seg::Name("resourceType")],
                );
                return;
            }
        };
        self.cur_contained = Some(index);
        self.resource(rtype, obj);
        self.contained_meta_rules(obj);
        self.cur_contained = None;
    }

    // ---- the walk --------------------------------------------------------------------------------------

    /// Validate an object of type `def` (the path points at it).
    fn walk_object(&mut self, def: &'static TypeDef, obj: Obj<'a>) {
        if obj.is_empty() {
            self.error(
                IssueType::Structure,
                format!(
                    "ele-1: an empty object is not a valid {}: it must have a value or children",
                    def.name
                ),
            );
            return;
        }
        if self.depth >= MAX_DEPTH {
            self.error(
                IssueType::TooCostly,
                "elements are nested too deeply to validate",
            );
            return;
        }
        self.depth += 1;
        let has_underscore = obj.keys().any(|k| k.starts_with('_'));
        let mut present: u64 = 0;
        for (key, val) in obj {
            if def.kind == Kind::Resource && key == "resourceType" {
                continue;
            }
            let (is_ext, name) = match key.strip_prefix('_') {
                Some(n) => (true, n),
                None => (false, key),
            };
            let Some((idx, elem, ty)) = def.lookup(name) else {
                self.unknown(def, key);
                continue;
            };
            if is_ext {
                if !ty.is_primitive() {
                    self.error_at(
                        IssueType::Structure,
                        format!(
                            "'{}' is not allowed: only primitive elements have a '_' form, and {name} is a {}",
                            primitive::shown(key),
                            ty.name()
                        ),
                        &[Seg::Raw(key)],
                    );
                    continue;
                }
                if obj.get(name).is_some() {
                    continue; // validated together with the value
                }
            }
            let bit = if idx < 64 { 1u64 << idx } else { 0 };
            if present & bit != 0 {
                // Only a second type of the same choice element can get here.
                self.error_at(
                    IssueType::Structure,
                    format!(
                        "only one type of {}[x] may be present; '{}' is a second one",
                        elem.name, key
                    ),
                    &[Seg::Raw(key)],
                );
                continue;
            }
            present |= bit;
            let ext = if !is_ext && has_underscore && ty.is_primitive() {
                obj.iter()
                    .find(|(k, _)| k.strip_prefix('_') == Some(key))
                    .map(|(_, v)| v)
            } else {
                None
            };
            let (value, ext) = if is_ext {
                (None, Some(val))
            } else {
                (Some(val), ext)
            };
            let seg = if elem.choice {
                Seg::Choice(key, elem.name, ty.name())
            } else {
                Seg::Key(key)
            };
            self.path.push(seg);
            self.element(elem, ty, value, ext);
            self.path.pop();
        }
        let required = def.required_mask();
        for i in 0..def.len().min(64) {
            if present & required == required {
                break; // nothing required is missing
            }
            if let Some(e) = def.elem(i)
                && e.min > 0
                && present & (1u64 << i) == 0
            {
                let shown = if e.choice {
                    format!("{}[x]", e.name)
                } else {
                    e.name.to_string()
                };
                self.error_at(
                    IssueType::Required,
                    format!("{shown} is required (minimum cardinality 1) but is missing"),
                    &[Seg::Name(e.name)],
                );
            }
        }
        self.hook(def.hook, obj);
        self.depth -= 1;
    }

    fn unknown(&mut self, def: &'static TypeDef, key: &'a str) {
        let msg = if key == "resourceType" {
            format!(
                "resourceType is not allowed inside a {} (only at the root of a resource)",
                def.name
            )
        } else {
            format!(
                "Unknown element '{}': it is not defined for {}",
                primitive::shown(key),
                def.name
            )
        };
        self.error_at(IssueType::Structure, msg, &[Seg::Raw(key)]);
    }

    /// Validate the value (`value`) and/or primitive extension (`ext`, the `_x` member) of one element.
    fn element(
        &mut self,
        elem: &'static Elem,
        ty: Ty,
        value: Option<Node<'a>>,
        ext: Option<Node<'a>>,
    ) {
        if elem.many {
            let items = match value {
                None => None,
                Some(Node::Array(a)) => Some(a),
                Some(other) => {
                    self.error(
                        IssueType::Structure,
                        format!(
                            "{} can repeat (max cardinality *), so it must be a JSON array, found {}",
                            elem.name,
                            primitive::json_kind(other)
                        ),
                    );
                    return;
                }
            };
            let exts = match ext {
                None => None,
                Some(Node::Array(a)) => Some(a),
                Some(other) => {
                    self.error(
                        IssueType::Structure,
                        format!(
                            "_{} must be a JSON array aligned with {}, found {}",
                            elem.name,
                            elem.name,
                            primitive::json_kind(other)
                        ),
                    );
                    return;
                }
            };
            if items.is_some_and(|a| a.is_empty()) {
                self.error(
                    IssueType::Structure,
                    format!(
                        "{}: an empty array is not allowed; leave the element out",
                        elem.name
                    ),
                );
                return;
            }
            if exts.is_some_and(|a| a.is_empty()) {
                self.error(
                    IssueType::Structure,
                    format!(
                        "_{}: an empty array is not allowed; leave the element out",
                        elem.name
                    ),
                );
                return;
            }
            let (n_items, n_exts) = (items.map_or(0, |a| a.len()), exts.map_or(0, |a| a.len()));
            if items.is_some() && exts.is_some() && n_items != n_exts {
                self.error(
                    IssueType::Structure,
                    format!(
                        "{} has {n_items} item(s) but _{} has {n_exts}: the arrays must be aligned (use null for a missing entry)",
                        elem.name, elem.name
                    ),
                );
            }
            // Both arrays walked in step (the shorter one runs out first).
            let mut item_iter = items.map(|a| a.iter());
            let mut ext_iter = exts.map(|a| a.iter());
            for i in 0..n_items.max(n_exts) {
                self.path.push(Seg::Index(i));
                self.item(
                    elem,
                    ty,
                    item_iter.as_mut().and_then(Iterator::next),
                    ext_iter.as_mut().and_then(Iterator::next),
                    i,
                );
                self.path.pop();
            }
        } else {
            if let Some(Node::Array(_)) = value {
                self.error(
                    IssueType::Structure,
                    format!(
                        "{} has max cardinality 1, so it must be a single value, not a JSON array",
                        elem.name
                    ),
                );
                return;
            }
            if let Some(Node::Array(_)) = ext {
                self.error(
                    IssueType::Structure,
                    format!(
                        "_{} must be a single JSON object (like {}), not an array",
                        elem.name, elem.name
                    ),
                );
                return;
            }
            if matches!(value, Some(Node::Null)) {
                self.error(
                    IssueType::Structure,
                    format!("{}: null is not allowed (null only aligns array entries); leave the element out", elem.name),
                );
            }
            if matches!(ext, Some(Node::Null)) {
                self.error(
                    IssueType::Structure,
                    format!("_{}: null is not allowed; leave it out", elem.name),
                );
            }
            self.item(elem, ty, value, ext, 0);
        }
    }

    /// One value of an element (an array entry or the single value) with its primitive extension.
    fn item(
        &mut self,
        elem: &'static Elem,
        ty: Ty,
        value: Option<Node<'a>>,
        ext: Option<Node<'a>>,
        index: usize,
    ) {
        let v = value.filter(|v| !v.is_null());
        let e = ext.filter(|e| !e.is_null());
        if v.is_none() && e.is_none() {
            if elem.many && (value.is_some() || ext.is_some()) {
                let msg = if ext.is_some() {
                    format!(
                        "{} entry is null in both {} and _{}",
                        elem.name, elem.name, elem.name
                    )
                } else if !ty.is_primitive() {
                    format!("{}: null is not allowed as an array entry", elem.name)
                } else {
                    format!(
                        "{}: null is not allowed as an array entry (only to align with _{})",
                        elem.name, elem.name
                    )
                };
                self.error(IssueType::Structure, msg);
            }
            return;
        }
        if let Some(v) = v {
            self.value(elem, ty, v, index);
        }
        if let Some(e) = e {
            match e {
                Node::Object(o) => self.walk_object(&schema::ELEMENT, o),
                other => self.error(
                    IssueType::Structure,
                    format!(
                        "the extension part of a primitive (_{}) must be a JSON object, found {}",
                        elem.name,
                        primitive::json_kind(other)
                    ),
                ),
            }
        }
    }

    fn value(&mut self, elem: &'static Elem, ty: Ty, v: Node<'a>, index: usize) {
        match ty {
            Ty::P(p) => match primitive::check(p, v) {
                Err(f) => self.error(f.code, f.msg),
                Ok(()) => {
                    let Node::String(s) = v else { return };
                    if let Some(b) = elem.binding
                        && !b
                            .codes
                            .iter()
                            .any(|c| schema::bytes_eq(c.as_bytes(), s.as_bytes()))
                    {
                        self.error(
                                IssueType::CodeInvalid,
                                format!(
                                    "'{}' is not a valid code for {} (required binding to {}); allowed codes: {}",
                                    primitive::shown(s),
                                    elem.name,
                                    b.value_set,
                                    b.codes.join(", ")
                                ),
                            );
                    }
                    if matches!(p, Prim::Uri | Prim::Url | Prim::Canonical) && s.starts_with('#') {
                        self.note_local_ref(s);
                    }
                }
            },
            Ty::C(def) => match v {
                Node::Object(o) => self.walk_object(def, o),
                other => self.error(
                    IssueType::Structure,
                    format!(
                        "{} is a {} and must be a JSON object, found {}",
                        elem.name,
                        def.name,
                        primitive::json_kind(other)
                    ),
                ),
            },
            Ty::Resource => self.contained(v, index),
        }
    }

    /// Record a local reference (`#id`, or `#` for the container) for ref-1/dom-3.
    fn note_local_ref(&mut self, r: &'a str) {
        if r == "#" {
            if let Some(i) = self.cur_contained {
                self.container_refs.push(i);
            }
        } else {
            self.local_refs.push(r);
        }
    }
}

#[cfg(test)]
#[allow(clippy::panic, reason = "tests")]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors(rtype: ResourceType, mut v: Value) -> Vec<(String, String)> {
        validate(rtype, &mut v)
            .into_iter()
            .filter(Issue::is_error)
            .map(|i| (i.expression.join("|"), i.diagnostics))
            .collect()
    }

    #[test]
    fn minimal_resources_are_valid() {
        assert!(errors(ResourceType::Patient, json!({"resourceType": "Patient"})).is_empty());
        assert!(
            errors(
                ResourceType::Organization,
                json!({"resourceType": "Organization", "name": "X"})
            )
            .is_empty()
        );
    }

    #[test]
    fn paths_of_choice_and_primitive_extensions() {
        let e = errors(
            ResourceType::Patient,
            json!({"resourceType": "Patient", "deceasedDateTime": "2020-13-01",
                   "name": [{"given": ["A", null], "_given": [null, {"extension": [{"valueString": "x"}]}]}]}),
        );
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "Patient.deceased.ofType(dateTime)",
                "Patient.name[0].given[1].extension[0].url"
            ]
        );
    }

    #[test]
    fn choice_conflict_and_bad_suffix() {
        let e = errors(
            ResourceType::Patient,
            json!({"resourceType": "Patient", "deceasedBoolean": true, "deceasedDateTime": "2020", "deceasedString": "x"}),
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].0, "Patient.deceasedDateTime");
        assert_eq!(e[1].0, "Patient.deceasedString");
    }

    #[test]
    fn wrong_type_for_expected() {
        let mut v = json!({"resourceType": "Slot"});
        let issues = validate(ResourceType::Patient, &mut v);
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].expression, vec!["resourceType".to_string()]);
        let r = validate_json(
            br#"{"resourceType":"Patient"}"#,
            Some(ResourceType::Appointment),
        );
        let Err(issues) = r else {
            panic!("expected refusal")
        };
        assert_eq!(issues[0].code, IssueType::Invalid);
        assert_eq!(issues[0].expression, vec!["resourceType".to_string()]);
    }

    #[test]
    fn json_errors() {
        let r = validate_json(b"{\n  \"resourceType\": \"Patient\",\n  oops\n}", None);
        let Err(issues) = r else {
            panic!("expected refusal")
        };
        assert!(
            issues[0].diagnostics.contains("line 3, column 3"),
            "{}",
            issues[0].diagnostics
        );
        let r = validate_json(b"[1]", None);
        assert!(r.is_err());
        let r = validate_json(b"{\"resourceType\": \"Observation\"}", None);
        let Err(issues) = r else {
            panic!("expected refusal")
        };
        assert_eq!(issues[0].code, IssueType::NotSupported);
        assert!(issues[0].diagnostics.contains("Patient, Practitioner"));
        let r = validate_json(b"\xEF\xBB\xBF{\"resourceType\": \"Patient\"}", None);
        assert!(r.is_ok());
    }

    #[test]
    fn deep_values_do_not_overflow() {
        let mut v = json!({"url": "x", "valueString": "y"});
        for _ in 0..500 {
            v = json!({"url": "x", "extension": [v]});
        }
        let e = errors(
            ResourceType::Patient,
            json!({"resourceType": "Patient", "extension": [v]}),
        );
        assert_eq!(e.len(), 1, "{e:?}");
    }
}
