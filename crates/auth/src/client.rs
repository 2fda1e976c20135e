//! Registered API clients (kept in the store's key-value table, never as FHIR resources) and OAuth errors.

use serde::{Deserialize, Serialize};

/// Key-value namespace of client records (key = client id, value = [`Client`] as JSON).
pub const CLIENT_NAMESPACE: &str = "auth-client";
/// Key-value namespace of the list of client ids (key [`INDEX_KEY`], value = JSON array of ids).
pub const CLIENT_INDEX_NAMESPACE: &str = "auth-client-index";
/// The one key of [`CLIENT_INDEX_NAMESPACE`].
pub const INDEX_KEY: &str = "all";

/// A registered client: who it is, what it may do, the public keys its assertions are signed with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Client {
    /// The client id (`iss` and `sub` of its assertions).
    pub id: String,
    /// Human-readable name.
    #[serde(default)]
    pub name: String,
    /// ODS code of the organisation the client acts for.
    pub ods: String,
    /// Granted scopes, space separated (SMART v2 system scopes and `admin`).
    pub scopes: String,
    /// Registered public keys (a JWKS document).
    #[serde(default)]
    pub jwks: serde_json::Value,
    /// A JWKS URL, used when no inline key has the assertion's `kid` (fetched by the hub and cached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// RFC 8705 binding: the `x5t#S256` thumbprint of the client certificate the client must present (over
    /// mutual TLS) to get a token; its tokens are bound to that certificate (`cnf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_thumbprint: Option<String>,
    /// Requests per second this client may make (token bucket with a one-second burst); `None` = the hub's
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<f64>,
    /// Revoked clients get no tokens, and their existing tokens are refused.
    #[serde(default)]
    pub revoked: bool,
    /// Creation time, epoch seconds.
    #[serde(default)]
    pub created: i64,
}

impl Client {
    /// Parse a stored record; `None` when it is not one.
    pub fn from_json(text: &str) -> Option<Client> {
        serde_json::from_str(text).ok()
    }

    /// The stored form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The error codes of RFC 6749 section 5.2 used by the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthErrorCode {
    /// A parameter is missing, repeated or malformed (including an unparseable assertion).
    InvalidRequest,
    /// Client authentication failed: unknown client, unknown `kid`, bad signature, bad claims, revoked client.
    InvalidClient,
    /// The assertion was already used (replayed `jti`).
    InvalidGrant,
    /// The client may not use this grant.
    UnauthorizedClient,
    /// `grant_type` is not `client_credentials`.
    UnsupportedGrantType,
    /// A requested scope was not granted to the client, or is not a scope.
    InvalidScope,
}

impl OAuthErrorCode {
    /// The wire form, e.g. `invalid_client`.
    pub fn as_str(self) -> &'static str {
        match self {
            OAuthErrorCode::InvalidRequest => "invalid_request",
            OAuthErrorCode::InvalidClient => "invalid_client",
            OAuthErrorCode::InvalidGrant => "invalid_grant",
            OAuthErrorCode::UnauthorizedClient => "unauthorized_client",
            OAuthErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            OAuthErrorCode::InvalidScope => "invalid_scope",
        }
    }

    /// HTTP status of the error response: 401 for failed client authentication, 400 otherwise.
    pub fn http_status(self) -> u16 {
        match self {
            OAuthErrorCode::InvalidClient => 401,
            _ => 400,
        }
    }
}

/// A refusal of the token endpoint, with its `error_description`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    /// The RFC 6749 code.
    pub code: OAuthErrorCode,
    /// What exactly was wrong, for the client's developer.
    pub description: String,
}

impl OAuthError {
    /// Build an error.
    pub fn new(code: OAuthErrorCode, description: impl Into<String>) -> OAuthError {
        OAuthError {
            code,
            description: description.into(),
        }
    }
}

impl std::fmt::Display for OAuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.description)
    }
}

impl std::error::Error for OAuthError {}
