//! Search results -> a `searchset` Bundle (the URL parsing lives in `store::url`, shared with delivery).

use fhir::ResourceType;
use store::Stored;
pub use store::url::{Chain, DEFAULT_COUNT, MAX_COUNT, encode, parse_pairs, parse_search};

/// Append one Bundle entry for a stored resource to `out` (a JSON array being built).
pub fn push_entry(out: &mut String, base: &str, s: &Stored, mode: &str) {
    if !out.ends_with('[') {
        out.push(',');
    }
    out.push_str("{\"fullUrl\":");
    push_json_str(out, &format!("{base}/{}/{}", s.rtype, s.id));
    out.push_str(",\"resource\":");
    out.push_str(&s.json);
    out.push_str(",\"search\":{\"mode\":\"");
    out.push_str(mode);
    out.push_str("\"}}");
}

pub fn push_json_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::Value::String(s.to_string()).to_string());
}

pub fn link_url(
    base: &str,
    rtype: ResourceType,
    params: &[(String, String)],
    count: usize,
    offset: usize,
) -> String {
    let mut url = format!("{base}/{rtype}?");
    for (k, v) in params {
        if k == "_count" {
            continue;
        }
        url.push_str(&encode(k));
        url.push('=');
        url.push_str(&encode(v));
        url.push('&');
    }
    url.push_str(&format!("_count={count}"));
    if offset > 0 {
        url.push_str(&format!("&_offset={offset}"));
    }
    url
}
