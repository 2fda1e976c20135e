//! Known answers (a JWKS and assertions signed by PyJWT with keys made for these tests), claim checks, scope
//! grammar and the hub's own tokens.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use serde_json::{Value, json};

const KAT: &str = include_str!("../testdata/kat.txt");
const AUD: &str = "http://hub.test/oauth2/token";
const NOW: i64 = 1_700_000_010;

fn kat() -> (Jwks, String, String, String) {
    let mut lines = KAT.lines();
    let jwks = Jwks::from_json(&serde_json::from_str(lines.next().unwrap()).unwrap()).unwrap();
    let rs512 = lines.next().unwrap().to_string();
    let es384 = lines.next().unwrap().to_string();
    let rs256 = lines.next().unwrap().to_string();
    (jwks, rs512, es384, rs256)
}

fn verify(jwks: &Jwks, token: &str) -> bool {
    let jws = Jws::parse(token).unwrap();
    let key = jwks.find(jws.kid().unwrap()).unwrap();
    key.verify(jws.alg(), jws.signing_input.as_bytes(), &jws.signature)
}

fn tamper_last_char(token: &str) -> String {
    // A character inside the signature (the last one may carry padding bits the strict decoder rejects).
    let mut chars: Vec<char> = token.chars().collect();
    let i = chars.len() - 3;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

#[test]
fn known_rs512_and_es384_signatures_verify() {
    let (jwks, rs512, es384, _) = kat();
    assert_eq!(jwks.keys.len(), 2);
    assert_eq!(jwks.keys[0].alg(), "RS512");
    assert_eq!(jwks.keys[1].alg(), "ES384");
    assert!(verify(&jwks, &rs512));
    assert!(verify(&jwks, &es384));
    let claims = check_assertion_claims(&Jws::parse(&rs512).unwrap().claims, AUD, NOW).unwrap();
    assert_eq!(claims.client_id, "kat-client");
    assert_eq!(claims.jti, "kat-1");
    assert_eq!(claims.exp, 1_700_000_300);
}

#[test]
fn tampered_signatures_and_payloads_fail() {
    let (jwks, rs512, es384, _) = kat();
    assert!(!verify(&jwks, &tamper_last_char(&rs512)));
    assert!(!verify(&jwks, &tamper_last_char(&es384)));
    // Same signature over a different payload.
    let parts: Vec<&str> = rs512.split('.').collect();
    let other = b64::encode(br#"{"iss":"x","sub":"x"}"#);
    assert!(!verify(
        &jwks,
        &format!("{}.{other}.{}", parts[0], parts[2])
    ));
}

#[test]
fn the_key_decides_the_algorithm() {
    let (jwks, rs512, es384, rs256) = kat();
    // RS256 with the right RSA key: refused (RS512 only).
    assert!(!verify(&jwks, &rs256));
    let rsa = jwks.find("kat-rsa").unwrap();
    let ec = jwks.find("kat-ec").unwrap();
    let r = Jws::parse(&rs512).unwrap();
    let e = Jws::parse(&es384).unwrap();
    // A correct signature presented under another alg name, or to the other key type, fails.
    for alg in ["none", "HS256", "HS512", "RS256", "PS512", "ES384", ""] {
        assert!(
            !rsa.verify(alg, r.signing_input.as_bytes(), &r.signature),
            "{alg}"
        );
    }
    assert!(!ec.verify("RS512", e.signing_input.as_bytes(), &e.signature));
    assert!(!ec.verify("ES384", r.signing_input.as_bytes(), &r.signature));
    // alg none with an empty signature.
    let none = format!(
        "{}.{}.",
        b64::encode(br#"{"alg":"none","kid":"kat-rsa"}"#),
        rs512.split('.').nth(1).unwrap()
    );
    let jws = Jws::parse(&none).unwrap();
    assert!(jws.signature.is_empty());
    assert!(!rsa.verify(jws.alg(), jws.signing_input.as_bytes(), &jws.signature));
}

#[test]
fn malformed_compact_serialisations_are_refused() {
    let h = b64::encode(br#"{"alg":"RS512"}"#);
    let p = b64::encode(br#"{"iss":"a"}"#);
    for bad in [
        String::new(),
        "a.b".into(),
        "a.b.c.d".into(),
        format!("{h}.{p}"),
        format!("{h}.{p}.!!"),
        format!("{}.{p}.AA", b64::encode(b"[1]")),
        format!("{}.{p}.AA", b64::encode(b"not json")),
        format!("{h}=.{p}.AA"),
        format!(
            "{}.{p}.AA",
            b64::encode(br#"{"alg":"RS512","crit":["exp"]}"#)
        ),
        "x".repeat(MAX_JWT_BYTES + 1),
    ] {
        assert!(Jws::parse(&bad).is_err(), "{bad}");
    }
    assert!(Jws::parse(&format!("{h}.{p}.AA")).is_ok());
}

#[test]
fn jwks_rules() {
    let (jwks, ..) = kat();
    let rsa = KAT.lines().next().unwrap();
    let doc: Value = serde_json::from_str(rsa).unwrap();
    let k0 = doc["keys"][0].clone();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut k = k0.clone();
        f(&mut k);
        Jwk::from_json(&k)
    };
    assert!(with(&|_| {}).is_ok());
    assert!(
        with(&|k| {
            k.as_object_mut().unwrap().remove("kid");
        })
        .is_err()
    );
    assert!(with(&|k| k["alg"] = json!("RS256")).is_err());
    assert!(with(&|k| k["use"] = json!("enc")).is_err());
    assert!(with(&|k| k["kty"] = json!("oct")).is_err());
    assert!(with(&|k| k["n"] = json!("AQAB")).is_err(), "short modulus");
    let mut ec = doc["keys"][1].clone();
    ec["crv"] = json!("P-256");
    assert!(Jwk::from_json(&ec).is_err());
    assert!(
        Jwks::from_json(&json!({"keys": [k0.clone(), k0]})).is_err(),
        "duplicate kid"
    );
    assert!(Jwks::from_json(&json!([])).is_err());
    assert!(jwks.find("nope").is_none());
}

fn claims(f: impl Fn(&mut serde_json::Map<String, Value>)) -> Result<AssertionClaims, OAuthError> {
    let mut c =
        json!({"iss": "c1", "sub": "c1", "aud": AUD, "jti": "j1", "exp": NOW + 120, "iat": NOW})
            .as_object()
            .unwrap()
            .clone();
    f(&mut c);
    check_assertion_claims(&c, AUD, NOW)
}

#[test]
fn assertion_claim_checks() {
    assert!(claims(|_| {}).is_ok());
    assert!(
        claims(|c| {
            c.insert("aud".into(), json!(["x", AUD]));
        })
        .is_ok()
    );
    assert!(
        claims(|c| {
            c.insert("exp".into(), json!(NOW + 300));
        })
        .is_ok()
    );
    type Edit = Box<dyn Fn(&mut serde_json::Map<String, Value>)>;
    let refused: Vec<(&str, Edit)> = vec![
        (
            "iss != sub",
            Box::new(|c| {
                c.insert("sub".into(), json!("c2"));
            }),
        ),
        (
            "no iss",
            Box::new(|c| {
                c.remove("iss");
            }),
        ),
        (
            "wrong aud",
            Box::new(|c| {
                c.insert("aud".into(), json!("http://other/oauth2/token"));
            }),
        ),
        (
            "no aud",
            Box::new(|c| {
                c.remove("aud");
            }),
        ),
        (
            "expired",
            Box::new(|c| {
                c.insert("exp".into(), json!(NOW - 60));
            }),
        ),
        (
            "too far ahead",
            Box::new(|c| {
                c.insert("exp".into(), json!(NOW + 3600));
            }),
        ),
        (
            "exp string",
            Box::new(|c| {
                c.insert("exp".into(), json!("1700000100"));
            }),
        ),
        (
            "no exp",
            Box::new(|c| {
                c.remove("exp");
            }),
        ),
        (
            "future nbf",
            Box::new(|c| {
                c.insert("nbf".into(), json!(NOW + 120));
            }),
        ),
        (
            "future iat",
            Box::new(|c| {
                c.insert("iat".into(), json!(NOW + 120));
            }),
        ),
        (
            "no jti",
            Box::new(|c| {
                c.remove("jti");
            }),
        ),
        (
            "empty jti",
            Box::new(|c| {
                c.insert("jti".into(), json!(""));
            }),
        ),
    ];
    for (what, f) in refused {
        let e = claims(f).expect_err(what);
        assert_eq!(e.code, OAuthErrorCode::InvalidClient, "{what}");
        assert!(!e.description.is_empty());
    }
}

#[test]
fn scope_grammar() {
    let s = Scopes::parse("system/Appointment.cruds system/Patient.rs admin").unwrap();
    assert!(s.allows("Appointment", Interaction::Delete));
    assert!(s.allows("Patient", Interaction::Search));
    assert!(!s.allows("Patient", Interaction::Create));
    assert!(!s.allows("Slot", Interaction::Read));
    assert!(s.is_admin());
    assert_eq!(
        s.to_string(),
        "system/Appointment.cruds system/Patient.rs admin"
    );
    let v1 = Scopes::parse("system/*.read").unwrap();
    assert!(v1.allows("Slot", Interaction::Read) && v1.allows("Slot", Interaction::Search));
    assert!(!v1.allows("Slot", Interaction::Update) && !v1.is_admin());
    assert_eq!(
        Scopes::parse("system/*.write").unwrap().to_string(),
        "system/*.cud"
    );
    assert_eq!(
        Scopes::parse("system/*.*").unwrap().to_string(),
        "system/*.cruds"
    );
    for bad in [
        "patient/Patient.r",
        "user/*.read",
        "system/Patient",
        "system/Patient.sr",
        "system/Patient.rr",
        "system/Patient.x",
        "system/patient.r",
        "system/Patient.",
        "system/.r",
        "admin2",
    ] {
        assert!(Scopes::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(
        Scopes::needed("Patient", Interaction::Update),
        "system/Patient.u"
    );
}

#[test]
fn requested_scopes_must_be_granted() {
    let granted = Scopes::parse("system/Appointment.crus system/Patient.rs").unwrap();
    let ok = |s: &str| Scopes::parse(s).unwrap().is_within(&granted);
    assert!(ok("system/Appointment.r"));
    assert!(ok("system/Appointment.cr system/Patient.s"));
    assert!(ok(""));
    assert!(!ok("system/Appointment.d"));
    assert!(!ok("system/*.r"));
    assert!(!ok("admin"));
    let all = Scopes::parse("system/*.cruds admin").unwrap();
    assert!(
        Scopes::parse("system/Slot.rs admin")
            .unwrap()
            .is_within(&all)
    );
}

/// The claims of a hub token for client `c1` of RXX, valid for 5 minutes from `NOW`.
fn access_claims(cnf_x5t: Option<String>) -> AccessClaims {
    AccessClaims {
        client_id: "c1".into(),
        org: "RXX".into(),
        scope: "system/Patient.r".into(),
        iat: NOW,
        exp: NOW + 300,
        jti: "t1".into(),
        cnf_x5t,
    }
}

#[test]
fn hub_tokens_round_trip_and_are_bound_to_their_hub() {
    let secret = "A".repeat(43);
    let key = token::HubKey::from_secret(&secret, "http://hub.test").unwrap();
    let c = access_claims(None);
    let t = key.mint(&c);
    // Deterministic: HS256 over a fixed header and claims.
    assert_eq!(t, key.mint(&c));
    assert_eq!(key.verify(&t, NOW).unwrap(), c);
    assert!(key.verify(&t, NOW + 300).is_err(), "expired");
    assert!(key.verify(&tamper_last_char(&t), NOW).is_err());
    let other =
        token::HubKey::from_secret(&format!("{}A", "B".repeat(42)), "http://hub.test").unwrap();
    assert!(other.verify(&t, NOW).is_err(), "another hub's secret");
    let elsewhere = token::HubKey::from_secret(&secret, "http://other.test").unwrap();
    assert!(elsewhere.verify(&t, NOW).is_err(), "another issuer");
    assert!(token::HubKey::from_secret("short", "x").is_err());
    // A client assertion is not an access token.
    let (_, rs512, ..) = kat();
    assert!(key.verify(&rs512, NOW).is_err());
    assert!(token::HubKey::generate_secret().unwrap() != token::HubKey::generate_secret().unwrap());
}

#[test]
fn generated_keys_sign_what_their_jwk_verifies() {
    for signer in [
        keys::Signer::generate_rsa().unwrap(),
        keys::Signer::generate_p384().unwrap(),
    ] {
        let jwk = Jwk::from_json(&signer.public_jwk("k1")).unwrap();
        let t = signer
            .sign_jwt(&json!({"typ": "JWT", "kid": "k1"}), &json!({"iss": "a"}))
            .unwrap();
        let jws = Jws::parse(&t).unwrap();
        assert_eq!(jws.alg(), signer.alg());
        assert!(jwk.verify(jws.alg(), jws.signing_input.as_bytes(), &jws.signature));
        let pem = signer.to_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let again = keys::Signer::from_pem(&pem).unwrap();
        assert_eq!(again.public_jwk("k1"), signer.public_jwk("k1"));
    }
    assert!(
        keys::Signer::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
            .is_err()
    );
    assert!(keys::pem_decode("nothing", "PRIVATE KEY").is_err());
}

#[test]
fn scope_needed_per_interaction() {
    use Interaction::*;
    use access::{Need, bundle_entry, required};
    let one = |t: &str, i| Need::Scopes(vec![(t.to_string(), i)]);
    assert_eq!(required("GET", "/health", ""), Need::Open);
    assert_eq!(required("GET", "/fhir/metadata", ""), Need::Open);
    assert_eq!(required("POST", "/oauth2/token", ""), Need::Open);
    assert_eq!(required("GET", "/metrics", ""), Need::Admin);
    assert_eq!(required("GET", "/admin/deliveries", ""), Need::Admin);
    assert_eq!(
        required("GET", "/events", ""),
        Need::CrossOrg(vec![("*".into(), Read)])
    );
    assert_eq!(
        required("POST", "/fhir/Patient", ""),
        one("Patient", Create)
    );
    assert_eq!(required("GET", "/fhir/Patient/1", ""), one("Patient", Read));
    assert_eq!(
        required("GET", "/fhir/Patient/1/_history/2", ""),
        one("Patient", Read)
    );
    assert_eq!(
        required("GET", "/fhir/Patient/_history", ""),
        one("Patient", Read)
    );
    assert_eq!(
        required("PUT", "/fhir/Patient/1", ""),
        one("Patient", Update)
    );
    assert_eq!(
        required("PATCH", "/fhir/Appointment/1", ""),
        one("Appointment", Update)
    );
    assert_eq!(
        required("POST", "/fhir/Appointment/1/$transition", ""),
        one("Appointment", Update)
    );
    assert_eq!(
        required("DELETE", "/fhir/Patient/1", ""),
        one("Patient", Delete)
    );
    assert_eq!(
        required("GET", "/fhir/Patient", "family=x"),
        one("Patient", Search)
    );
    assert_eq!(
        required("POST", "/fhir/Patient/_search", ""),
        one("Patient", Search)
    );
    assert_eq!(
        required("POST", "/fhir/Subscription/1/$replay", ""),
        Need::Admin
    );
    assert_eq!(required("GET", "/fhir/AuditEvent", ""), Need::Admin);
    assert_eq!(required("POST", "/fhir", ""), Need::Bundle);
    assert_eq!(required("POST", "/fhir/", ""), Need::Bundle);
    assert_eq!(required("GET", "/nowhere", ""), Need::Authenticated);
    assert_eq!(
        required("GET", "/fhir/Slot", "status=free&_include=Slot:schedule"),
        Need::Scopes(vec![("Slot".into(), Search), ("*".into(), Read)])
    );
    assert_eq!(
        required(
            "GET",
            "/fhir/Slot",
            "_include=Slot%3Aschedule%3ASchedule&_revinclude=Appointment:slot"
        ),
        Need::Scopes(vec![
            ("Slot".into(), Search),
            ("Schedule".into(), Read),
            ("Appointment".into(), Read)
        ])
    );
    assert_eq!(bundle_entry("post", "Patient"), one("Patient", Create));
    assert_eq!(
        bundle_entry("GET", "Patient?identifier=a|b"),
        one("Patient", Search)
    );
    assert!(matches!(bundle_entry("POST", ""), Need::Scopes(v) if v.len() == 5));
    let reader = Scopes::parse("system/Patient.rs").unwrap();
    assert_eq!(one("Patient", Read).missing(&reader), None);
    assert_eq!(
        one("Patient", Update).missing(&reader).as_deref(),
        Some("system/Patient.u")
    );
    assert_eq!(Need::Admin.missing(&reader).as_deref(), Some("admin"));
    assert_eq!(
        one("*", Read).missing(&reader).as_deref(),
        Some("system/*.r")
    );
}

#[test]
fn encoded_paths_and_parameters_are_judged_by_what_they_mean() {
    use Interaction::*;
    use access::{Need, percent_decode, required};
    let one = |t: &str, i| Need::Scopes(vec![(t.to_string(), i)]);
    assert_eq!(
        required("GET", "/fhir/%50atient/1", ""),
        one("Patient", Read)
    );
    assert_eq!(
        required("DELETE", "/fhir/Patient/%31", ""),
        one("Patient", Delete)
    );
    assert_eq!(
        required("HEAD", "/fhir/Patient/1", ""),
        one("Patient", Read)
    );
    assert_eq!(required("GET", "/%61dmin/deliveries", ""), Need::Admin);
    assert_eq!(required("GET", "/fhir/%41uditEvent", ""), Need::Admin);
    assert_eq!(
        required("GET", "/fhir/Slot", "%5Finclude=Slot%3Aschedule"),
        Need::Scopes(vec![("Slot".into(), Search), ("*".into(), Read)])
    );
    assert_eq!(percent_decode("a%2"), "a%2");
    assert_eq!(percent_decode("%zz%41"), "%zzA");
    assert_eq!(percent_decode("%ff"), "\u{fffd}");
}

#[test]
fn certificate_bound_tokens_carry_cnf() {
    let key = token::HubKey::from_secret(&"A".repeat(43), "http://hub.test").unwrap();
    let thumb = cert::thumbprint(b"not really a certificate");
    let c = access_claims(Some(thumb.clone()));
    let t = key.mint(&c);
    let jws = Jws::parse(&t).unwrap();
    assert_eq!(jws.claims["cnf"], json!({ "x5t#S256": thumb }));
    assert_eq!(key.verify(&t, NOW).unwrap(), c);
}

#[test]
fn certificate_thumbprints() {
    // SHA-256("abc") = ba7816bf 8f01cfea 414140de 5dae2223 b00361a3 96177a9c b410ff61 f20015ad.
    assert_eq!(
        cert::thumbprint(b"abc"),
        "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"
    );
    let der = [0x30u8, 0x03, 0x02, 0x01, 0x05];
    let pem = keys::pem_encode("CERTIFICATE", &der);
    let chain = format!("{pem}{}", keys::pem_encode("CERTIFICATE", &[0x30, 0x00]));
    assert_eq!(
        cert::thumbprint_pem(&chain).unwrap(),
        cert::thumbprint(&der),
        "the leaf, first in a chain"
    );
    assert!(cert::thumbprint_pem("no pem here").is_err());
    assert!(
        cert::thumbprint_pem(&keys::pem_encode("CERTIFICATE", b"xyz")).is_err(),
        "not DER"
    );
    let t = cert::thumbprint(&der);
    assert_eq!(t.len(), 43);
    assert_eq!(cert::parse_thumbprint(&format!(" {t}\n")).unwrap(), t);
    assert!(cert::parse_thumbprint(&format!("{t}=")).is_err(), "padding");
    assert!(
        cert::parse_thumbprint("ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0").is_err(),
        "standard alphabet"
    );
    assert!(
        cert::parse_thumbprint(&cert::thumbprint(b"x")[..40]).is_err(),
        "too short"
    );
    assert!(
        cert::parse_thumbprint(&hex_of(b"abc")).is_err(),
        "hex is not base64url of 32 bytes"
    );
    assert!(cert::matches(&t, Some(&t)));
    assert!(!cert::matches(&t, None));
    assert!(!cert::matches(&t, Some(&cert::thumbprint(b"other"))));
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn jwks_url_cache_decisions() {
    use jwks_cache::{Decision, JwksCache, MIN_REFETCH_MS, max_age};
    let (jwks, ..) = kat();
    let kid = jwks.keys[0].kid.clone();
    let url = "https://client.test/jwks.json";
    let t0 = 1_700_000_000_000i64;
    let mut cache = JwksCache::default();
    assert_eq!(
        cache.decide(url, &kid, t0),
        Decision::Fetch,
        "nothing cached"
    );
    cache.fetched(url, jwks.clone(), None, t0);
    assert_eq!(
        cache.decide(url, &kid, t0 + 1),
        Decision::Use(jwks.keys[0].clone())
    );
    assert_eq!(
        cache.decide("https://other.test/", &kid, t0 + 1),
        Decision::Fetch,
        "per URL"
    );
    // An unknown kid refetches, but at most once per MIN_REFETCH_MS.
    assert_eq!(cache.decide(url, "new", t0 + 1), Decision::Unknown);
    assert_eq!(
        cache.decide(url, "new", t0 + MIN_REFETCH_MS),
        Decision::Fetch
    );
    // Five minutes by default, then fetched again.
    assert_eq!(
        cache.decide(url, &kid, t0 + 299_999),
        Decision::Use(jwks.keys[0].clone())
    );
    assert_eq!(cache.decide(url, &kid, t0 + 300_000), Decision::Fetch);
    // max-age is honoured, within bounds.
    cache.fetched(url, jwks.clone(), Some(60), t0);
    assert_eq!(cache.decide(url, &kid, t0 + 60_000), Decision::Fetch);
    cache.fetched(url, jwks.clone(), Some(0), t0);
    assert!(
        matches!(
            cache.decide(url, &kid, t0 + MIN_REFETCH_MS - 1),
            Decision::Use(_)
        ),
        "at least the refetch interval"
    );
    cache.fetched(url, jwks.clone(), Some(i64::MAX), t0);
    assert_eq!(
        cache.decide(url, &kid, t0 + 86_400_000),
        Decision::Fetch,
        "at most a day"
    );
    // A failed refetch keeps the current keys until they expire; a failure with nothing current is reported
    // (without fetching again) until the interval has passed.
    cache.fetched(url, jwks.clone(), None, t0);
    cache.failed(url, "connection refused".into(), t0 + MIN_REFETCH_MS);
    assert!(matches!(
        cache.decide(url, &kid, t0 + MIN_REFETCH_MS + 1),
        Decision::Use(_)
    ));
    assert_eq!(
        cache.decide(url, "new", t0 + MIN_REFETCH_MS + 1),
        Decision::Unknown
    );
    let down = "https://down.test/jwks";
    cache.failed(down, "HTTP 503".into(), t0);
    assert_eq!(
        cache.decide(down, &kid, t0 + 1),
        Decision::Failed("HTTP 503".into())
    );
    assert_eq!(
        cache.decide(down, &kid, t0 + MIN_REFETCH_MS),
        Decision::Fetch
    );
    assert_eq!(max_age("public, max-age=600"), Some(600));
    assert_eq!(max_age("max-age=\"30\", must-revalidate"), Some(30));
    assert_eq!(max_age("no-store"), Some(0));
    assert_eq!(max_age("public"), None);
    assert_eq!(max_age("max-age=-5"), Some(0));
}

#[test]
fn cross_org_is_a_scope_of_its_own() {
    use access::{Need, required};
    let s = Scopes::parse("system/*.cruds admin cross-org").unwrap();
    assert!(s.is_cross_org() && s.is_admin());
    assert_eq!(s.to_string(), "system/*.cruds admin cross-org");
    let org_bound = Scopes::parse("system/*.cruds").unwrap();
    assert!(!org_bound.is_cross_org());
    assert_eq!(
        Scopes::parse("cross-org system/Patient.r")
            .unwrap()
            .to_string(),
        "system/Patient.r cross-org"
    );
    assert!(!Scopes::parse("cross-org").unwrap().is_within(&org_bound));
    assert!(Scopes::parse("system/Slot.r").unwrap().is_within(&s));
    assert!(Scopes::parse("cross-org").unwrap().is_within(&s));
    assert!(Scopes::parse("crossorg").is_err());
    // The feed and Subscriptions need it; other FHIR interactions do not.
    let events = required("GET", "/events", "");
    assert_eq!(events.missing(&org_bound).as_deref(), Some("cross-org"));
    assert_eq!(events.missing(&s), None);
    assert_eq!(
        events
            .missing(&Scopes::parse("cross-org").unwrap())
            .as_deref(),
        Some("system/*.r"),
        "the type scope is named first"
    );
    for (m, p) in [
        ("GET", "/fhir/Subscription"),
        ("POST", "/fhir/Subscription"),
        ("GET", "/fhir/Subscription/1"),
        ("DELETE", "/fhir/Subscription/1"),
    ] {
        let need = required(m, p, "");
        assert!(matches!(need, Need::CrossOrg(_)), "{m} {p}: {need:?}");
        assert_eq!(need.missing(&org_bound).as_deref(), Some("cross-org"));
    }
    assert!(matches!(
        required("GET", "/fhir/Appointment/1", ""),
        Need::Scopes(_)
    ));
    assert_eq!(
        required("POST", "/fhir/Subscription/1/$replay", ""),
        Need::Admin
    );
}

#[test]
fn ownership_is_read_from_the_resource() {
    use org::*;
    assert_eq!(kind("Practitioner"), Kind::Shared);
    assert_eq!(kind("Organization"), Kind::Shared);
    assert_eq!(kind("Schedule"), Kind::Schedule);
    assert_eq!(kind("Slot"), Kind::Slot);
    assert_eq!(kind("Appointment"), Kind::Appointment);
    assert_eq!(kind("Patient"), Kind::Patient);
    assert_eq!(kind("Subscription"), Kind::CrossOrgOnly);

    assert_eq!(reference_id("Slot/1", "Slot"), Some("1"));
    assert_eq!(reference_id("http://h/fhir/Slot/a-b", "Slot"), Some("a-b"));
    assert_eq!(reference_id("Slot/1/_history/3", "Slot"), Some("1"));
    assert_eq!(reference_id("Schedule/1", "Slot"), None);
    assert_eq!(reference_id("Slot/", "Slot"), None);
    assert_eq!(reference_id("urn:uuid:1", "Slot"), None);

    let schedule = json!({"resourceType": "Schedule", "actor": [
        {"reference": "Practitioner/p"},
        {"reference": "Organization/o1"},
        {"identifier": {"system": ODS_SYSTEM, "value": "rxx01"}},
        {"identifier": {"system": "https://example.org/other", "value": "NOPE"}},
    ], "extension": [
        {"url": BOOKING_ORGANIZATION_URL, "valueReference": {"identifier": {"system": ODS_SYSTEM, "value": "B1"}}},
        {"url": "https://example.org/other-extension", "valueReference": {"reference": "Organization/o9"}},
    ]});
    assert_eq!(
        schedule_organizations(&schedule),
        vec![
            OrgRef::Organization("o1".into()),
            OrgRef::Ods("RXX01".into()),
            OrgRef::Ods("B1".into())
        ]
    );
    assert!(
        schedule_organizations(&json!({"actor": [{"reference": "Practitioner/p"}]})).is_empty()
    );

    let slot = json!({"schedule": {"reference": "Schedule/s1"}});
    assert_eq!(slot_schedule(&slot).as_deref(), Some("s1"));
    assert_eq!(slot_schedule(&json!({"schedule": {"display": "x"}})), None);

    let appt = json!({
        "slot": [{"reference": "Slot/a"}, {"reference": "Slot/b"}],
        "participant": [
            {"actor": {"reference": "Patient/p1"}},
            {"actor": {"reference": "Practitioner/d"}},
            {"actor": {"reference": "http://h/fhir/Patient/p2"}},
        ],
        "extension": [{"url": BOOKING_ORGANIZATION_URL, "valueReference": {"reference": "Organization/o2"}}],
    });
    assert_eq!(appointment_slots(&appt), vec!["a", "b"]);
    assert_eq!(appointment_patients(&appt), vec!["p1", "p2"]);
    assert_eq!(
        booking_organizations(&appt),
        vec![OrgRef::Organization("o2".into())]
    );

    let patient = json!({"managingOrganization": {"reference": "Organization/o3",
        "identifier": {"system": ODS_SYSTEM, "value": "Y1"}}});
    assert_eq!(
        managing_organization(&patient),
        vec![OrgRef::Organization("o3".into()), OrgRef::Ods("Y1".into())]
    );
    assert!(managing_organization(&json!({})).is_empty());

    let org = json!({"identifier": [
        {"system": ODS_SYSTEM, "value": " rxx "},
        {"system": "https://example.org/x", "value": "Q"},
    ]});
    assert_eq!(ods_codes(&org), vec!["RXX"]);
    assert!(same_org("rxx01", "RXX01") && !same_org("RXX01", "RXX02"));
}
