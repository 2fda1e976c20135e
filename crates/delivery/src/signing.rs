//! Standard Webhooks signatures: `webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`
//! where the secret is given as `whsec_<base64 key>`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const SECRET_PREFIX: &str = "whsec_";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigningError {
    /// The secret is not `whsec_` followed by base64 of at least 16 bytes.
    BadSecret(String),
}

impl std::fmt::Display for SigningError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SigningError::BadSecret(why) => write!(f, "invalid signing secret: {why}"),
        }
    }
}

fn key(secret: &str) -> Result<Vec<u8>, SigningError> {
    let b64 = secret.strip_prefix(SECRET_PREFIX).ok_or_else(|| {
        SigningError::BadSecret(format!(
            "it must start with '{SECRET_PREFIX}' followed by base64"
        ))
    })?;
    let key = STANDARD
        .decode(b64)
        .map_err(|e| SigningError::BadSecret(format!("not base64: {e}")))?;
    if key.len() < 16 {
        return Err(SigningError::BadSecret(
            "the key must be at least 16 bytes".into(),
        ));
    }
    Ok(key)
}

/// Check a secret without signing anything.
pub fn check_secret(secret: &str) -> Result<(), SigningError> {
    key(secret).map(|_| ())
}

fn mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail; fall back to an empty MAC rather than panic.
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(key) else {
        return Vec::new();
    };
    m.update(id.as_bytes());
    m.update(b".");
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().to_vec()
}

/// The `webhook-signature` header value for a message.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, SigningError> {
    let key = key(secret)?;
    Ok(format!(
        "v1,{}",
        STANDARD.encode(mac(&key, id, timestamp, body))
    ))
}

/// Verify a `webhook-signature` header (space-separated `v1,<sig>` entries; any one matching suffices).
pub fn verify(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
    header: &str,
) -> Result<bool, SigningError> {
    let key = key(secret)?;
    let want = mac(&key, id, timestamp, body);
    Ok(header
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|sig| {
            STANDARD
                .decode(sig)
                .map(|got| constant_time_eq(&got, &want))
                .unwrap_or(false)
        }))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use super::*;

    // The example from the Standard Webhooks specification's reference libraries.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;

    #[test]
    fn known_answer() {
        let sig = sign(SECRET, ID, TS, BODY).expect("sign");
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(verify(SECRET, ID, TS, BODY, &format!("v1,bogus {sig}")).expect("verify"));
        assert!(!verify(SECRET, ID, TS + 1, BODY, &sig).expect("verify"));
    }

    #[test]
    fn bad_secrets_are_refused() {
        assert!(sign("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", ID, TS, BODY).is_err());
        assert!(sign("whsec_***", ID, TS, BODY).is_err());
        assert!(sign("whsec_c2hvcnQ=", ID, TS, BODY).is_err());
    }
}
