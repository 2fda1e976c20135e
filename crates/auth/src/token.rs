//! The hub's access tokens: JWTs MAC'd (HS256) with a per-hub secret kept in the store, so every process of one
//! hub accepts them and another hub (another secret) refuses them. Verification costs one HMAC, not a
//! public-key operation, which keeps it off the read path's budget.

use crate::b64;
use aws_lc_rs::hmac;
use serde_json::{Value, json};

/// Key-value namespace of the hub's secrets (key [`HUB_KEY_NAME`], value = base64url of 32 random bytes).
pub const HUB_KEY_NAMESPACE: &str = "auth-hub";
/// The key of the token-signing secret in [`HUB_KEY_NAMESPACE`].
pub const HUB_KEY_NAME: &str = "token-key";

/// What an access token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessClaims {
    /// The client id.
    pub client_id: String,
    /// ODS code of the client's organisation.
    pub org: String,
    /// Granted scopes, space separated.
    pub scope: String,
    /// Issued at, epoch seconds.
    pub iat: i64,
    /// Expiry, epoch seconds.
    pub exp: i64,
    /// Unique id of the token.
    pub jti: String,
    /// `cnf.x5t#S256` (RFC 8705): the thumbprint of the client certificate the token is bound to; every request
    /// with the token must come over mutual TLS with that certificate.
    pub cnf_x5t: Option<String>,
}

/// The per-hub token key.
#[derive(Clone)]
pub struct HubKey {
    key: hmac::Key,
    issuer: String,
}

impl std::fmt::Debug for HubKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubKey")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl HubKey {
    /// A fresh random secret in its stored form.
    pub fn generate_secret() -> Result<String, String> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| "no randomness available".to_string())?;
        Ok(b64::encode(&bytes))
    }

    /// The key from its stored form; `issuer` is the hub's public URL (the tokens' `iss`).
    pub fn from_secret(secret: &str, issuer: &str) -> Result<HubKey, String> {
        let bytes = b64::decode(secret.trim())
            .filter(|b| b.len() >= 32)
            .ok_or("the stored token key is not 32+ bytes of base64url")?;
        Ok(HubKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
            issuer: issuer.to_string(),
        })
    }

    /// Mint an access token.
    pub fn mint(&self, c: &AccessClaims) -> String {
        let header = b64::encode(br#"{"alg":"HS256","typ":"at+jwt"}"#);
        let mut claims = json!({
            "iss": self.issuer, "sub": c.client_id, "client_id": c.client_id, "org": c.org,
            "scope": c.scope, "iat": c.iat, "exp": c.exp, "jti": c.jti,
        });
        if let (Some(t), Some(m)) = (&c.cnf_x5t, claims.as_object_mut()) {
            m.insert("cnf".into(), json!({ "x5t#S256": t }));
        }
        let payload = b64::encode(claims.to_string().as_bytes());
        let input = format!("{header}.{payload}");
        let tag = hmac::sign(&self.key, input.as_bytes());
        format!("{input}.{}", b64::encode(tag.as_ref()))
    }

    /// Verify a token minted by this hub and not expired at `now` (epoch seconds). The error says why, for the
    /// `error_description` of the 401.
    pub fn verify(&self, token: &str, now: i64) -> Result<AccessClaims, String> {
        let jws = crate::Jws::parse(token)?;
        if jws.alg() != "HS256" || jws.header.get("typ").and_then(Value::as_str) != Some("at+jwt") {
            return Err("not an access token of this hub".into());
        }
        hmac::verify(&self.key, jws.signing_input.as_bytes(), &jws.signature)
            .map_err(|_| "the token's signature is not this hub's".to_string())?;
        if jws.claim_str("iss") != Some(self.issuer.as_str()) {
            return Err("the token was issued for another hub".into());
        }
        let int = |n: &str| jws.claims.get(n).and_then(Value::as_i64);
        let exp = int("exp").ok_or("the token has no 'exp'")?;
        if exp <= now {
            return Err("the token has expired".into());
        }
        let s = |n: &str| jws.claim_str(n).unwrap_or_default().to_string();
        let cnf_x5t = match jws.claims.get("cnf") {
            None => None,
            Some(c) => Some(
                c.get("x5t#S256")
                    .and_then(Value::as_str)
                    .ok_or("the token's 'cnf' has no x5t#S256")?
                    .to_string(),
            ),
        };
        Ok(AccessClaims {
            cnf_x5t,
            client_id: s("client_id"),
            org: s("org"),
            scope: s("scope"),
            iat: int("iat").unwrap_or(0),
            exp,
            jti: s("jti"),
        })
    }
}
