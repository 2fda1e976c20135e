//! Base64url without padding (RFC 7515 section 2), strict: padding or other alphabets are refused.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Decode base64url without padding; `None` for anything else.
pub(crate) fn decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.as_bytes()).ok()
}

/// Encode as base64url without padding.
pub(crate) fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}
