//! Key material on the client side: RSA key generation for the bootstrap admin client, PKCS#8 PEM files, the
//! JWK of a public key, and signing client assertions (used by `carebridge token` and by tests).

use crate::b64;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA512, RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

/// A private key that signs client assertions.
#[derive(Debug)]
pub enum Signer {
    /// RSA (RS512).
    Rsa(RsaKeyPair),
    /// EC P-384 (ES384).
    P384(EcdsaKeyPair),
}

impl Signer {
    /// A fresh 2048-bit RSA key.
    pub fn generate_rsa() -> Result<Signer, String> {
        RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .map(Signer::Rsa)
            .map_err(|_| "RSA key generation failed".into())
    }

    /// A fresh P-384 key.
    pub fn generate_p384() -> Result<Signer, String> {
        EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING)
            .map(Signer::P384)
            .map_err(|_| "EC key generation failed".into())
    }

    /// Read a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`), RSA or EC P-384.
    pub fn from_pem(pem: &str) -> Result<Signer, String> {
        let der = pem_decode(pem, "PRIVATE KEY")?;
        if let Ok(k) = RsaKeyPair::from_pkcs8(&der) {
            return Ok(Signer::Rsa(k));
        }
        EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &der)
            .map(Signer::P384)
            .map_err(|_| "not a PKCS#8 RSA or EC P-384 private key".into())
    }

    /// The key as a PKCS#8 PEM.
    pub fn to_pem(&self) -> Result<String, String> {
        let der = match self {
            Signer::Rsa(k) => k.as_der().map(|d| d.as_ref().to_vec()),
            Signer::P384(k) => k.to_pkcs8v1().map(|d| d.as_ref().to_vec()),
        }
        .map_err(|_| "could not encode the key".to_string())?;
        Ok(pem_encode("PRIVATE KEY", &der))
    }

    /// The JWS algorithm of this key.
    pub fn alg(&self) -> &'static str {
        match self {
            Signer::Rsa(_) => "RS512",
            Signer::P384(_) => "ES384",
        }
    }

    /// The public JWK, with `kid`, `alg` and `use: sig`.
    pub fn public_jwk(&self, kid: &str) -> Value {
        match self {
            Signer::Rsa(k) => {
                let p = k.public_key();
                json!({"kty": "RSA", "kid": kid, "alg": "RS512", "use": "sig",
                    "n": b64::encode(p.modulus().big_endian_without_leading_zero()),
                    "e": b64::encode(p.exponent().big_endian_without_leading_zero())})
            }
            Signer::P384(k) => {
                let point = k.public_key().as_ref();
                let (x, y) = point
                    .get(1..)
                    .unwrap_or_default()
                    .split_at(point.len().saturating_sub(1) / 2);
                json!({"kty": "EC", "crv": "P-384", "kid": kid, "alg": "ES384", "use": "sig",
                    "x": b64::encode(x), "y": b64::encode(y)})
            }
        }
    }

    /// Sign `header` (its `alg` is set to this key's) and `claims` as a compact JWS.
    pub fn sign_jwt(&self, header: &Value, claims: &Value) -> Result<String, String> {
        let mut header = header.clone();
        if let Some(h) = header.as_object_mut() {
            h.insert("alg".into(), Value::from(self.alg()));
        }
        let input = format!(
            "{}.{}",
            b64::encode(header.to_string().as_bytes()),
            b64::encode(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let sig = match self {
            Signer::Rsa(k) => {
                let mut sig = vec![0u8; k.public_modulus_len()];
                k.sign(&RSA_PKCS1_SHA512, &rng, input.as_bytes(), &mut sig)
                    .map_err(|_| "RSA signing failed".to_string())?;
                sig
            }
            Signer::P384(k) => k
                .sign(&rng, input.as_bytes())
                .map_err(|_| "EC signing failed".to_string())?
                .as_ref()
                .to_vec(),
        };
        Ok(format!("{input}.{}", b64::encode(&sig)))
    }
}

/// PEM-armour DER bytes with `label`.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER inside the first `label` PEM block of `text`.
pub fn pem_decode(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text
        .find(&begin)
        .ok_or_else(|| format!("no '{begin}' block"))?
        + begin.len();
    let stop = text[start..]
        .find(&end)
        .ok_or_else(|| format!("no '{end}' line"))?
        + start;
    let b64: String = text[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD
        .decode(b64)
        .map_err(|_| "the PEM body is not base64".into())
}
