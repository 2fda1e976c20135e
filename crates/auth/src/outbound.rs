//! Carebridge as a client of the NHS API Platform: the signed-JWT (application-restricted) flow, pure parts.
//!
//! An outbound call (PDS, NHS Notify, ...) needs an access token from the platform's token endpoint, got with a
//! client assertion signed by a key the application registered. Each environment (sandbox, int, prod) is a
//! named profile with its own base URL, API key and signing key. A key is labelled with the one environment
//! it was registered for; a profile that names a key of another environment is refused, as is the same key
//! material registered under two environments (a production key must never sign for int, and the reverse).
//!
//! No IO and no clock here: the shell (`carebridge` crate) reads the key files, posts the form and passes
//! `now` in.

use crate::keys::Signer;
use serde_json::{Value, json};
use std::fmt;

/// How long before a cached token's expiry it is replaced, seconds. The platform issues tokens for about ten
/// minutes and recommends refreshing at about nine.
pub const REFRESH_MARGIN_S: i64 = 60;

/// Lifetime declared by the assertions this client signs (`exp - iat`), seconds; the platform allows at most 5
/// minutes.
pub const ASSERTION_LIFETIME_S: i64 = 240;

/// An NHS API Platform environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    /// Open, stateless, canned responses.
    Sandbox,
    /// Integration testing: authentication enforced, test data.
    Int,
    /// Production.
    Prod,
}

impl Environment {
    /// Parse `sandbox`, `int` or `prod` (also `production`, `live`).
    pub fn parse(s: &str) -> Result<Environment, String> {
        match s.to_ascii_lowercase().as_str() {
            "sandbox" => Ok(Environment::Sandbox),
            "int" => Ok(Environment::Int),
            "prod" | "production" | "live" => Ok(Environment::Prod),
            other => Err(format!(
                "unknown environment '{other}' (expected sandbox, int or prod)"
            )),
        }
    }

    /// The platform's base URL of this environment.
    pub fn base_url(self) -> &'static str {
        match self {
            Environment::Sandbox => "https://sandbox.api.service.nhs.uk",
            Environment::Int => "https://int.api.service.nhs.uk",
            Environment::Prod => "https://api.service.nhs.uk",
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Sandbox => "sandbox",
            Environment::Int => "int",
            Environment::Prod => "prod",
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A signing key registered with the platform for one environment.
#[derive(Debug)]
pub struct OutboundKey {
    /// The `kid` registered in the application's JWKS.
    pub kid: String,
    /// The environment the key was registered for.
    pub environment: Environment,
    /// The private key (RSA only: the platform accepts RS512 alone).
    pub signer: Signer,
}

impl OutboundKey {
    /// A key for `environment`; refuses anything but RSA.
    pub fn new(kid: &str, environment: Environment, signer: Signer) -> Result<OutboundKey, String> {
        if kid.trim().is_empty() {
            return Err("an outbound key needs a kid".into());
        }
        if signer.alg() != "RS512" {
            return Err(format!(
                "outbound key {kid}: the NHS API Platform accepts RS512 (RSA) keys only, not {}",
                signer.alg()
            ));
        }
        Ok(OutboundKey {
            kid: kid.to_string(),
            environment,
            signer,
        })
    }

    /// The public modulus and exponent as a JWK: what identifies the key material across labels.
    fn fingerprint(&self) -> String {
        let jwk = self.signer.public_jwk("");
        format!(
            "{}.{}",
            jwk.get("n").and_then(Value::as_str).unwrap_or(""),
            jwk.get("e").and_then(Value::as_str).unwrap_or("")
        )
    }
}

/// A named profile: where to call and as whom.
#[derive(Debug, Clone)]
pub struct Profile {
    /// The profile's name (`int`, `prod`, or any name the operator chose).
    pub name: String,
    pub environment: Environment,
    /// Base URL of the APIs (the environment's unless overridden).
    pub base_url: String,
    /// The token endpoint (`<base_url>/oauth2/token` unless overridden); the assertions' `aud`.
    pub token_url: String,
    /// The application's API key: `iss` and `sub` of its assertions.
    pub api_key: String,
    /// The `kid` of the key it signs with (one of the keyring's).
    pub kid: String,
}

impl Profile {
    /// A profile on `environment`'s URLs; `base_url` / `token_url` override them when given.
    pub fn new(
        name: &str,
        environment: Environment,
        api_key: &str,
        kid: &str,
        base_url: Option<&str>,
        token_url: Option<&str>,
    ) -> Result<Profile, String> {
        if api_key.trim().is_empty() {
            return Err(format!("outbound profile {name}: api_key is empty"));
        }
        let base = base_url
            .unwrap_or(environment.base_url())
            .trim_end_matches('/')
            .to_string();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(format!(
                "outbound profile {name}: base URL '{base}' must be http(s)"
            ));
        }
        let token_url = token_url
            .map(|t| t.to_string())
            .unwrap_or_else(|| format!("{base}/oauth2/token"));
        Ok(Profile {
            name: name.to_string(),
            environment,
            base_url: base,
            token_url,
            api_key: api_key.to_string(),
            kid: kid.to_string(),
        })
    }
}

/// Every configured key and profile, checked together.
#[derive(Debug, Default)]
pub struct Keyring {
    keys: Vec<OutboundKey>,
    profiles: Vec<Profile>,
}

impl Keyring {
    /// Check the keys and profiles: kids unique; no key material under two environments; every profile names a
    /// known key of its own environment; profile names unique.
    pub fn new(keys: Vec<OutboundKey>, profiles: Vec<Profile>) -> Result<Keyring, String> {
        for (i, k) in keys.iter().enumerate() {
            for other in &keys[..i] {
                if other.kid == k.kid {
                    return Err(format!("outbound key kid '{}' is configured twice", k.kid));
                }
                if other.fingerprint() == k.fingerprint() && other.environment != k.environment {
                    return Err(format!(
                        "outbound keys '{}' ({}) and '{}' ({}) are the same key: a key belongs to one environment",
                        other.kid, other.environment, k.kid, k.environment
                    ));
                }
            }
        }
        for (i, p) in profiles.iter().enumerate() {
            if profiles[..i].iter().any(|o| o.name == p.name) {
                return Err(format!("outbound profile '{}' is configured twice", p.name));
            }
            let Some(key) = keys.iter().find(|k| k.kid == p.kid) else {
                return Err(format!(
                    "outbound profile '{}' names key '{}', which is not configured",
                    p.name, p.kid
                ));
            };
            if key.environment != p.environment {
                return Err(format!(
                    "outbound profile '{}' is for {} but key '{}' was registered for {}: refused",
                    p.name, p.environment, key.kid, key.environment
                ));
            }
        }
        Ok(Keyring { keys, profiles })
    }

    /// The profile named `name`.
    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.iter().find(|p| p.name == name)
    }

    /// Profile names, in configuration order.
    pub fn profile_names(&self) -> Vec<&str> {
        self.profiles.iter().map(|p| p.name.as_str()).collect()
    }

    /// The form body of a token request for `profile` (form-urlencoded), with a fresh assertion signed at `now`
    /// carrying `jti`.
    pub fn token_request(&self, profile: &str, now: i64, jti: &str) -> Result<String, String> {
        let p = self
            .profile(profile)
            .ok_or_else(|| format!("no outbound profile '{profile}'"))?;
        let key = self
            .keys
            .iter()
            .find(|k| k.kid == p.kid && k.environment == p.environment)
            .ok_or_else(|| format!("no key '{}' for {}", p.kid, p.environment))?;
        let assertion = key.signer.sign_jwt(
            &json!({"typ": "JWT", "kid": key.kid}),
            &json!({"iss": p.api_key, "sub": p.api_key, "aud": p.token_url, "jti": jti,
                    "iat": now, "exp": now + ASSERTION_LIFETIME_S}),
        )?;
        Ok(format!(
            "grant_type=client_credentials&client_assertion_type={}&client_assertion={}",
            form_encode(crate::ASSERTION_TYPE),
            form_encode(&assertion)
        ))
    }
}

fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A token from the platform, as parsed from its response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub access_token: String,
    /// Epoch seconds when it expires.
    pub expires_at: i64,
}

/// Parse a token response (`expires_in` may be a string, as the platform sends it, or a number); `now` is when
/// the request was sent.
pub fn parse_token_response(body: &[u8], now: i64) -> Result<IssuedToken, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the token response is not JSON: {e}"))?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        let desc = v
            .get("error_description")
            .and_then(Value::as_str)
            .unwrap_or("");
        return Err(format!("token endpoint refused: {err}: {desc}"));
    }
    let token = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or("the token response has no access_token")?;
    if let Some(t) = v.get("token_type").and_then(Value::as_str)
        && !t.eq_ignore_ascii_case("bearer")
    {
        return Err(format!("token_type '{t}' is not Bearer"));
    }
    let expires_in = match v.get("expires_in") {
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        Some(Value::Number(n)) => n.as_i64(),
        _ => None,
    }
    .filter(|s| *s > 0)
    .ok_or("the token response has no positive expires_in")?;
    Ok(IssuedToken {
        access_token: token.to_string(),
        expires_at: now.saturating_add(expires_in),
    })
}

/// The cached token of one profile: reused until [`REFRESH_MARGIN_S`] before it expires (or half its lifetime,
/// for very short tokens).
#[derive(Debug, Default)]
pub struct TokenCache {
    token: Option<(IssuedToken, i64)>,
}

impl TokenCache {
    /// The cached token when it is still good at `now`.
    pub fn get(&self, now: i64) -> Option<&str> {
        let (t, issued) = self.token.as_ref()?;
        let margin = REFRESH_MARGIN_S.min((t.expires_at - issued) / 2);
        (now < t.expires_at - margin).then_some(t.access_token.as_str())
    }

    /// Keep `token`, obtained by a request sent at `issued_at`.
    pub fn put(&mut self, token: IssuedToken, issued_at: i64) {
        self.token = Some((token, issued_at));
    }

    /// Forget the token (the API answered 401 with it).
    pub fn clear(&mut self) {
        self.token = None;
    }
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
    use crate::jose::{Jwks, Jws};

    fn rsa() -> Signer {
        Signer::generate_rsa().expect("rsa")
    }

    fn same_key(s: &Signer) -> Signer {
        Signer::from_pem(&s.to_pem().expect("pem")).expect("reload")
    }

    fn ring() -> (Keyring, Value) {
        let key = rsa();
        let jwks = json!({"keys": [key.public_jwk("int-1")]});
        let ring = Keyring::new(
            vec![OutboundKey::new("int-1", Environment::Int, key).expect("key")],
            vec![
                Profile::new("int", Environment::Int, "APIKEY123", "int-1", None, None).expect("p"),
            ],
        )
        .expect("ring");
        (ring, jwks)
    }

    fn form_field(form: &str, name: &str) -> String {
        let raw = form
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .expect("field");
        let mut out = Vec::new();
        let b = raw.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&raw[i + 1..i + 3], 16).expect("hex"));
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn environments_have_the_platform_urls() {
        assert_eq!(Environment::parse("INT"), Ok(Environment::Int));
        assert_eq!(Environment::parse("live"), Ok(Environment::Prod));
        assert!(Environment::parse("dev").is_err());
        assert_eq!(Environment::Prod.base_url(), "https://api.service.nhs.uk");
        let p = Profile::new("x", Environment::Int, "k", "kid", None, None).expect("p");
        assert_eq!(p.token_url, "https://int.api.service.nhs.uk/oauth2/token");
    }

    #[test]
    fn assertion_follows_the_platform_rules_and_verifies() {
        let (ring, jwks) = ring();
        let form = ring
            .token_request("int", 1_700_000_000, "jti-1")
            .expect("form");
        assert_eq!(form_field(&form, "grant_type"), "client_credentials");
        assert_eq!(
            form_field(&form, "client_assertion_type"),
            crate::ASSERTION_TYPE
        );
        let jws = Jws::parse(&form_field(&form, "client_assertion")).expect("jws");
        assert_eq!(jws.alg(), "RS512");
        assert_eq!(jws.kid(), Some("int-1"));
        assert_eq!(jws.claim_str("iss"), Some("APIKEY123"));
        assert_eq!(jws.claim_str("sub"), Some("APIKEY123"));
        assert_eq!(
            jws.claim_str("aud"),
            Some("https://int.api.service.nhs.uk/oauth2/token")
        );
        assert_eq!(jws.claim_str("jti"), Some("jti-1"));
        let jwks = Jwks::from_json(&jwks).expect("jwks");
        let jwk = jwks.find("int-1").expect("kid");
        let token = form_field(&form, "client_assertion");
        let (input, sig) = token.rsplit_once('.').expect("sig");
        let sig = crate::b64::decode(sig).expect("b64");
        assert!(jwk.verify("RS512", input.as_bytes(), &sig));
    }

    #[test]
    fn a_key_of_one_environment_is_refused_for_another() {
        let err = Keyring::new(
            vec![OutboundKey::new("prod-1", Environment::Prod, rsa()).expect("key")],
            vec![Profile::new("int", Environment::Int, "K", "prod-1", None, None).expect("p")],
        )
        .expect_err("refused");
        assert!(err.contains("registered for prod"), "{err}");

        let k = rsa();
        let copy = same_key(&k);
        let err = Keyring::new(
            vec![
                OutboundKey::new("int-1", Environment::Int, k).expect("key"),
                OutboundKey::new("prod-1", Environment::Prod, copy).expect("key"),
            ],
            vec![],
        )
        .expect_err("refused");
        assert!(err.contains("same key"), "{err}");
    }

    #[test]
    fn unknown_keys_duplicates_and_ec_keys_are_refused() {
        assert!(
            Keyring::new(
                vec![],
                vec![Profile::new("int", Environment::Int, "K", "nope", None, None).expect("p")]
            )
            .is_err()
        );
        assert!(
            Keyring::new(
                vec![
                    OutboundKey::new("a", Environment::Int, rsa()).expect("key"),
                    OutboundKey::new("a", Environment::Int, rsa()).expect("key"),
                ],
                vec![]
            )
            .is_err()
        );
        let ec = Signer::generate_p384().expect("ec");
        assert!(OutboundKey::new("ec", Environment::Int, ec).is_err());
        assert!(Profile::new("p", Environment::Int, "", "k", None, None).is_err());
        assert!(Profile::new("p", Environment::Int, "K", "k", Some("ftp://x"), None).is_err());
    }

    #[test]
    fn token_responses_parse_in_both_forms_and_errors_are_clear() {
        let t = parse_token_response(
            br#"{"access_token":"abc","expires_in":"599","token_type":"Bearer","issued_at":"1"}"#,
            1000,
        )
        .expect("string form");
        assert_eq!(t.expires_at, 1599);
        let t = parse_token_response(br#"{"access_token":"abc","expires_in":300}"#, 1000)
            .expect("number form");
        assert_eq!(t.expires_at, 1300);
        let e = parse_token_response(
            br#"{"error":"invalid_request","error_description":"Invalid exp claim"}"#,
            0,
        )
        .expect_err("error");
        assert!(e.contains("Invalid exp claim"));
        assert!(parse_token_response(b"not json", 0).is_err());
        assert!(parse_token_response(br#"{"access_token":"a"}"#, 0).is_err());
        assert!(
            parse_token_response(
                br#"{"access_token":"a","expires_in":9,"token_type":"mac"}"#,
                0
            )
            .is_err()
        );
    }

    #[test]
    fn cache_reuses_until_shortly_before_expiry() {
        let mut c = TokenCache::default();
        assert_eq!(c.get(0), None);
        c.put(
            IssuedToken {
                access_token: "t".into(),
                expires_at: 1599,
            },
            1000,
        );
        assert_eq!(c.get(1000), Some("t"));
        assert_eq!(c.get(1538), Some("t"));
        assert_eq!(c.get(1539), None, "refreshed 60 s before expiry");
        // A 30-second token is reused for half its life.
        c.put(
            IssuedToken {
                access_token: "u".into(),
                expires_at: 2030,
            },
            2000,
        );
        assert_eq!(c.get(2014), Some("u"));
        assert_eq!(c.get(2015), None);
        c.clear();
        assert_eq!(c.get(2000), None);
    }
}
