use crate::{Issue, ResourceType};
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
    let _ = (rtype, resource);
    Vec::new() // TODO(helper): implement
}

/// Parse bytes and validate whatever supported resource they hold (used by `$validate` and `carebridge validate`).
/// `expected`: if set, `resourceType` must equal it.
pub fn validate_json(bytes: &[u8], expected: Option<ResourceType>) -> Result<Validated, Vec<Issue>> {
    let _ = (bytes, expected);
    Err(Vec::new()) // TODO(helper): implement
}
