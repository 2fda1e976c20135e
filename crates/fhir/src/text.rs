/// Normalise a string for FHIR string search: lower case, common Latin accents removed, runs of whitespace
/// collapsed to one space, trimmed. Used both when indexing and when querying.
pub fn normalize_string(s: &str) -> String {
    s.to_lowercase() // TODO(helper): accents and whitespace
}
