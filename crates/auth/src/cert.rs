//! Certificate-bound access tokens (RFC 8705): the `x5t#S256` thumbprint of an X.509 certificate, which binds a
//! client (and the tokens issued to it) to the certificate it presents over mutual TLS.

use crate::b64;
use aws_lc_rs::digest;

/// The `x5t#S256` thumbprint of a DER certificate: base64url (no padding) of its SHA-256.
pub fn thumbprint(der: &[u8]) -> String {
    b64::encode(digest::digest(&digest::SHA256, der).as_ref())
}

/// The thumbprint of the first certificate of a PEM file (the leaf of a chain).
pub fn thumbprint_pem(pem: &str) -> Result<String, String> {
    let der = crate::keys::pem_decode(pem, "CERTIFICATE")?;
    if der.first() != Some(&0x30) {
        return Err("the CERTIFICATE block is not DER".into());
    }
    Ok(thumbprint(&der))
}

/// Check a thumbprint given by an operator: base64url without padding of 32 bytes (43 characters). Returns it
/// as stored.
pub fn parse_thumbprint(s: &str) -> Result<String, String> {
    let s = s.trim();
    match b64::decode(s) {
        Some(bytes) if bytes.len() == 32 => Ok(s.to_string()),
        _ => Err(format!(
            "'{s}' is not an x5t#S256 thumbprint (base64url without padding of a SHA-256, 43 characters)"
        )),
    }
}

/// True when `presented` (the thumbprint of the connection's client certificate, if any) matches `bound`. Both
/// are public values; the comparison is exact.
pub fn matches(bound: &str, presented: Option<&str>) -> bool {
    presented == Some(bound)
}
