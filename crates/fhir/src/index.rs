//! Search parameters the hub supports and extraction of their index values from a resource.

use crate::ResourceType;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Token,
    String,
    Date,
    Reference,
}

/// A supported search parameter of one resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchParamDef {
    pub name: &'static str,
    pub kind: ParamKind,
    /// For reference parameters: the resource types it may point to (first is the default for bare ids).
    pub targets: &'static [ResourceType],
    /// FHIRPath-like description for the CapabilityStatement, e.g. `Patient.identifier`.
    pub expression: &'static str,
}

/// One value indexed for one search parameter of one resource version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub param: &'static str,
    pub value: IndexValue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexValue {
    /// `system` is `None` when the coding/identifier has no system.
    Token { system: Option<String>, code: String },
    /// Normalised with `normalize_string`.
    String(String),
    /// Inclusive UTC range in ms since the epoch.
    Date { low_ms: i64, high_ms: i64 },
    /// `Type/id` (relative references only; absolute URLs are indexed as given).
    Reference(String),
}

/// All search parameters of a type (besides `_id` and `_lastUpdated`, which every type has).
pub fn search_params(rtype: ResourceType) -> &'static [SearchParamDef] {
    let _ = rtype;
    &[] // TODO(helper): implement
}

pub fn search_param(rtype: ResourceType, name: &str) -> Option<&'static SearchParamDef> {
    search_params(rtype).iter().find(|p| p.name == name)
}

/// Index values of a (valid) resource for every supported search parameter of its type.
pub fn index_entries(rtype: ResourceType, resource: &Value) -> Vec<IndexEntry> {
    let _ = (rtype, resource);
    Vec::new() // TODO(helper): implement
}
