//! Compact JWS (RFC 7515) parsing, JWK/JWKS (RFC 7517) public keys, and the claim checks of a client assertion.
//!
//! Only two algorithms are accepted for client assertions: RS512 (RSASSA-PKCS1-v1_5 with SHA-512, keys of
//! 2048 to 8192 bits) and ES384 (ECDSA P-384 with SHA-384, fixed-size `r || s` signatures). The key decides: an
//! RSA key verifies only RS512, an EC P-384 key only ES384, whatever the header says otherwise.

use crate::client::{OAuthError, OAuthErrorCode};
use crate::{LEEWAY_S, MAX_ASSERTION_LIFETIME_S, MAX_JWT_BYTES, b64};
use aws_lc_rs::signature::{
    ECDSA_P384_SHA384_FIXED, RSA_PKCS1_2048_8192_SHA512, RsaPublicKeyComponents, UnparsedPublicKey,
};
use serde_json::{Map, Value};

/// A parsed compact JWS whose signature has not been checked yet.
#[derive(Debug, Clone)]
pub struct Jws {
    /// The protected header.
    pub header: Map<String, Value>,
    /// The payload, a JSON object (JWT claims).
    pub claims: Map<String, Value>,
    /// `BASE64URL(header) || '.' || BASE64URL(payload)`: the bytes that were signed.
    pub signing_input: String,
    /// The decoded signature.
    pub signature: Vec<u8>,
}

impl Jws {
    /// Parse `header.payload.signature`; both JSON parts must be objects. Refuses `crit` headers (no extension is
    /// understood) and anything larger than [`MAX_JWT_BYTES`].
    pub fn parse(compact: &str) -> Result<Jws, String> {
        if compact.len() > MAX_JWT_BYTES {
            return Err(format!("JWT longer than {MAX_JWT_BYTES} bytes"));
        }
        let mut parts = compact.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(
                "not a compact JWS (expected three base64url parts separated by '.')".into(),
            );
        };
        let header = object(h, "header")?;
        let claims = object(p, "payload")?;
        let signature = b64::decode(s).ok_or("signature is not base64url")?;
        if header.contains_key("crit") {
            return Err("the 'crit' header is not supported".into());
        }
        Ok(Jws {
            header,
            claims,
            signing_input: format!("{h}.{p}"),
            signature,
        })
    }

    /// The header's `alg` ("" when absent or not a string).
    pub fn alg(&self) -> &str {
        self.header.get("alg").and_then(Value::as_str).unwrap_or("")
    }

    /// The header's `kid`, if it is a string.
    pub fn kid(&self) -> Option<&str> {
        self.header.get("kid").and_then(Value::as_str)
    }

    /// A string claim.
    pub fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }
}

fn object(part: &str, what: &str) -> Result<Map<String, Value>, String> {
    let bytes = b64::decode(part).ok_or_else(|| format!("{what} is not base64url"))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(format!("{what} is not a JSON object")),
        Err(e) => Err(format!("{what} is not JSON: {e}")),
    }
}

/// The public part of one registered key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// RSA modulus and exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// EC P-384 uncompressed point `04 || x || y`.
    P384 { point: Vec<u8> },
}

/// One JWK of a client's JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    /// Key id.
    pub kid: String,
    /// The key.
    pub key: PublicKey,
}

impl Jwk {
    /// Parse one JWK object: `kty` RSA (`n`, `e`) or EC with `crv` P-384 (`x`, `y`); a `kid` is required; a
    /// declared `alg` must match the key type (RS512 / ES384); `use`, when present, must be `sig`.
    pub fn from_json(v: &Value) -> Result<Jwk, String> {
        let field = |name: &str| v.get(name).and_then(Value::as_str);
        let kid = field("kid").ok_or("a JWK without a 'kid'")?.to_string();
        if let Some(u) = field("use")
            && u != "sig"
        {
            return Err(format!("JWK {kid}: 'use' is '{u}', not 'sig'"));
        }
        let bytes = |name: &str| -> Result<Vec<u8>, String> {
            let s = field(name).ok_or_else(|| format!("JWK {kid}: missing '{name}'"))?;
            b64::decode(s).ok_or_else(|| format!("JWK {kid}: '{name}' is not base64url"))
        };
        let alg = field("alg");
        let key = match field("kty") {
            Some("RSA") => {
                if alg.is_some_and(|a| a != "RS512") {
                    return Err(format!("JWK {kid}: alg must be RS512 for an RSA key"));
                }
                let n = strip_zeros(bytes("n")?);
                if n.len() < 256 {
                    return Err(format!("JWK {kid}: RSA keys must have at least 2048 bits"));
                }
                PublicKey::Rsa {
                    n,
                    e: strip_zeros(bytes("e")?),
                }
            }
            Some("EC") => {
                if field("crv") != Some("P-384") || alg.is_some_and(|a| a != "ES384") {
                    return Err(format!(
                        "JWK {kid}: only EC keys on P-384 (ES384) are accepted"
                    ));
                }
                let (x, y) = (bytes("x")?, bytes("y")?);
                if x.len() != 48 || y.len() != 48 {
                    return Err(format!("JWK {kid}: P-384 coordinates must be 48 bytes"));
                }
                let mut point = Vec::with_capacity(97);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                PublicKey::P384 { point }
            }
            other => {
                return Err(format!(
                    "JWK {kid}: kty {} is not supported (RSA or EC P-384)",
                    other.unwrap_or("(missing)")
                ));
            }
        };
        Ok(Jwk { kid, key })
    }

    /// The JWS algorithm this key verifies.
    pub fn alg(&self) -> &'static str {
        match self.key {
            PublicKey::Rsa { .. } => "RS512",
            PublicKey::P384 { .. } => "ES384",
        }
    }

    /// True when `signature` is a valid `alg` signature of `message` by this key. The algorithm must be the
    /// key's own ([`Jwk::alg`]): a header cannot pick a weaker one.
    pub fn verify(&self, alg: &str, message: &[u8], signature: &[u8]) -> bool {
        if alg != self.alg() {
            return false;
        }
        match &self.key {
            PublicKey::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&RSA_PKCS1_2048_8192_SHA512, message, signature)
                .is_ok(),
            PublicKey::P384 { point } => UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, point)
                .verify(message, signature)
                .is_ok(),
        }
    }
}

fn strip_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let skip = v.iter().take_while(|b| **b == 0).count();
    v.drain(..skip);
    v
}

/// A client's registered keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Jwks {
    /// The keys, in document order.
    pub keys: Vec<Jwk>,
}

impl Jwks {
    /// Parse a JWKS document (`{"keys": [...]}`); every key must be valid and `kid`s unique.
    pub fn from_json(v: &Value) -> Result<Jwks, String> {
        let Some(list) = v.get("keys").and_then(Value::as_array) else {
            return Err("a JWKS is an object with a 'keys' array".into());
        };
        let mut keys = Vec::with_capacity(list.len());
        for k in list {
            let jwk = Jwk::from_json(k)?;
            if keys.iter().any(|o: &Jwk| o.kid == jwk.kid) {
                return Err(format!("kid {} appears twice", jwk.kid));
            }
            keys.push(jwk);
        }
        Ok(Jwks { keys })
    }

    /// The key with this `kid`.
    pub fn find(&self, kid: &str) -> Option<&Jwk> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

/// What the token endpoint keeps of a verified client assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssertionClaims {
    /// The client id (`iss` = `sub`).
    pub client_id: String,
    /// The single-use id.
    pub jti: String,
    /// Expiry, epoch seconds.
    pub exp: i64,
}

/// Check the claims of a client assertion (RFC 7523 section 3 plus the NHS API Platform rules): `iss` = `sub`
/// (a string), `aud` = `audience` (or an array containing it), `exp` an integer not past and at most five minutes
/// ahead, `nbf`/`iat` (when present) not in the future, `jti` a non-empty string of at most 256 characters. `now`
/// is epoch seconds; [`LEEWAY_S`] of skew is tolerated.
pub fn check_assertion_claims(
    claims: &Map<String, Value>,
    audience: &str,
    now: i64,
) -> Result<AssertionClaims, OAuthError> {
    let bad = |d: String| OAuthError::new(OAuthErrorCode::InvalidClient, d);
    let s = |name: &str| claims.get(name).and_then(Value::as_str);
    let iss = s("iss").ok_or_else(|| bad("the assertion has no 'iss' claim".into()))?;
    let sub = s("sub").ok_or_else(|| bad("the assertion has no 'sub' claim".into()))?;
    if iss != sub {
        return Err(bad(format!(
            "'iss' ({iss}) and 'sub' ({sub}) must both be the client id"
        )));
    }
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    };
    if !aud_ok {
        return Err(bad(format!("'aud' must be {audience}")));
    }
    let int = |name: &str| -> Result<Option<i64>, OAuthError> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| bad(format!("'{name}' must be an integer (epoch seconds)"))),
        }
    };
    let exp = int("exp")?.ok_or_else(|| bad("the assertion has no 'exp' claim".into()))?;
    if exp <= now - LEEWAY_S {
        return Err(bad(format!("the assertion expired at {exp} (now {now})")));
    }
    if exp > now + MAX_ASSERTION_LIFETIME_S + LEEWAY_S {
        return Err(bad(format!(
            "'exp' may be at most {MAX_ASSERTION_LIFETIME_S} s ahead (it is {} s ahead)",
            exp - now
        )));
    }
    for name in ["nbf", "iat"] {
        if let Some(t) = int(name)?
            && t > now + LEEWAY_S
        {
            return Err(bad(format!("'{name}' is in the future ({t}, now {now})")));
        }
    }
    let jti = s("jti")
        .filter(|j| !j.is_empty() && j.len() <= 256)
        .ok_or_else(|| bad("the assertion needs a 'jti' (1 to 256 characters)".into()))?;
    Ok(AssertionClaims {
        client_id: iss.to_string(),
        jti: jti.to_string(),
        exp,
    })
}
