//! Authentication and authorisation of Carebridge: the pure parts.
//!
//! Why it exists: the hub follows the NHS API Platform's signed-JWT pattern (OAuth 2.0 client credentials with
//! a `private_key_jwt` client assertion, RFC 7523) and SMART on FHIR v2 system scopes. This crate holds what can
//! be decided without IO: compact JWS parsing and verification against a registered JWKS (RS512 and ES384 only),
//! the claim checks of a client assertion, the scope grammar and its per-interaction decisions, minting and
//! verifying the hub's own access tokens (optionally bound to a client certificate, RFC 8705), the caching rules
//! of JWKS URLs, and the RSA key material of the bootstrap admin client. The HTTP
//! layer (`api::auth`) and the CLI (`carebridge clients`, `carebridge token`) do the IO.
//!
//! Invariants: no IO, no clock of its own (time is passed in as epoch seconds), never panics on outside bytes;
//! an algorithm is chosen by the verifier's policy, never by the token's header alone (`alg: none`, HS256 with a
//! public key, RS256 are all refused); access-token MACs are compared in constant time.

pub mod access;
mod b64;
pub mod cert;
pub mod client;
pub mod jose;
pub mod jwks_cache;
pub mod keys;
pub mod org;
pub mod outbound;
pub mod scope;
pub mod token;

pub use access::{Need, bundle_entry, required};
pub use client::{Client, OAuthError, OAuthErrorCode};
pub use jose::{AssertionClaims, Jwk, Jwks, Jws, check_assertion_claims};
pub use jwks_cache::JwksCache;
pub use scope::{Interaction, Scopes};
pub use token::{AccessClaims, HubKey};

/// Largest accepted compact JWS (client assertion or access token), in bytes.
pub const MAX_JWT_BYTES: usize = 16 * 1024;

/// `client_assertion_type` of RFC 7523 client authentication.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Longest lifetime a client assertion may declare (`exp` at most this far ahead), seconds.
pub const MAX_ASSERTION_LIFETIME_S: i64 = 300;

/// Clock skew tolerated on `exp`, `nbf` and `iat`, seconds.
pub const LEEWAY_S: i64 = 10;

#[cfg(test)]
mod tests;
