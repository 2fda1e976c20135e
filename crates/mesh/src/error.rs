//! Errors of the MESH client, split by what the caller can do about them.

use std::fmt;

/// The error body MESH (or the sandbox) sent with a refusal, in whichever of its shapes it came.
///
/// Exists so an operator sees the MESH error code (e.g. `12` unregistered recipient) rather than a bare status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MeshErrorBody {
    /// Phase of the failure, e.g. `SEND` (v1 `errorEvent`, v2 `detail[].event`).
    pub event: Option<String>,
    /// MESH error code, e.g. `12` or `EPL-151` (v1 `errorCode`, v2 `detail[].code`).
    pub code: Option<String>,
    /// Human text (v1 `errorDescription`, v2 `detail[].msg`, or a validation error's `msg` and `loc`).
    pub description: String,
    /// Message id the error refers to, when the server gave one.
    pub message_id: Option<String>,
}

impl fmt::Display for MeshErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.code, &self.event) {
            (Some(c), Some(e)) => write!(f, "MESH error {c} ({e}): {}", self.description),
            (Some(c), None) => write!(f, "MESH error {c}: {}", self.description),
            (None, _) => f.write_str(&self.description),
        }
    }
}

/// Everything that can go wrong talking to MESH.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with a status that means "no" (4xx, or 5xx after the retries ran out).
    #[error("HTTP {status}{}", refused_suffix(*status, .body.as_ref()))]
    Refused {
        /// HTTP status code.
        status: u16,
        /// The MESH error body, when the response carried one we could read.
        body: Option<MeshErrorBody>,
    },
    /// The server answered, but not in a shape MESH defines (bad JSON, missing message id, a chunk range that
    /// does not add up, a corrupt gzip body ...). Never retried: the same server would say the same.
    #[error("malformed response from MESH: {0}")]
    Malformed(String),
    /// The request did not complete: connection refused, reset, TLS failure, timeout.
    #[error("transport error: {0}")]
    Transport(String),
    /// A send whose first chunk may or may not have reached MESH, and tracking by LocalID could not settle it.
    /// Resending blindly could deliver the message twice, so the caller must decide.
    #[error(
        "send outcome unknown for LocalID '{local_id}' ({reason}); check `track --local-id` before resending"
    )]
    SendUncertain {
        /// The LocalID the message was sent with.
        local_id: String,
        /// What made the outcome uncertain and why tracking did not resolve it.
        reason: String,
    },
    /// The mailbox configuration is unusable (missing secret, unreadable certificate, bad duration ...).
    #[error("configuration: {0}")]
    Config(String),
    /// The caller asked for something MESH cannot do (e.g. an empty payload).
    #[error("invalid request: {0}")]
    Invalid(String),
}

fn refused_suffix(status: u16, body: Option<&MeshErrorBody>) -> String {
    match body {
        Some(b) if !b.description.is_empty() || b.code.is_some() => format!(", {b}"),
        _ => match status {
            401 | 403 => {
                ": authentication failed (mailbox, password, shared key or certificate)".into()
            }
            404 => ": not found".into(),
            410 => ": gone (expired or already acknowledged)".into(),
            _ => String::new(),
        },
    }
}

impl Error {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The MESH error code, when the server gave one.
    pub fn mesh_code(&self) -> Option<&str> {
        match self {
            Error::Refused { body: Some(b), .. } => b.code.as_deref(),
            _ => None,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
