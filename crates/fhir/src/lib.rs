//! FHIR R4 / UK Core resource layer of Carebridge: pure, no IO.
//!
//! Why it exists: the canonical model of the hub is FHIR R4 JSON aligned with UK Core. This crate knows the
//! resource types the hub serves, validates a resource (base R4 structure, required bindings, invariants and
//! UK Core rules) reporting *every* problem with a FHIRPath location, normalises what UK Core says to
//! normalise (ODS identifier systems), extracts search-index values, and builds OperationOutcomes.
//!
//! Resources are kept as `serde_json::Value` (with `preserve_order` and `arbitrary_precision`), so what a
//! client sent is stored and returned losslessly: extensions, primitive extensions (`_birthDate`), decimal
//! text such as `1.50` and offsets such as `+00:00` are never rewritten.
//!
//! Invariants: no IO, no async runtime, no panics on any input value.

mod datetime;
mod index;
mod json;
mod nhs_number;
mod node;
mod outcome;
mod resource_type;
mod schema;
mod text;
mod validate;

pub use datetime::{format_instant_ms, parse_date_range, parse_instant_ms};
pub use index::{
    DELIVERY_CHANNEL_EXTENSION_URL, DELIVERY_CHANNEL_SYSTEM, INSTANT_WIDTH_MS, IndexEntry,
    IndexValue, ParamKind, SearchParamDef, also_indexed_under, index_entries, instant_param,
    search_param, search_params, single_valued, sortable, stored_as,
};
pub use json::parse_json;
pub use nhs_number::{NHS_NUMBER_SYSTEM, NhsNumber, NhsNumberError};
pub use outcome::{Issue, IssueType, Severity, operation_outcome};
pub use resource_type::ResourceType;
pub use text::{normalize_string, string_prefix_upper_bound};
pub use validate::{Validated, check_json, validate, validate_json};
