//! Mailbox configuration as written in the hub's TOML file (`[[mesh.mailboxes]]`), and its validation into a
//! [`Mailbox`] the client can use. Resolution is pure: environment variables are read through a function the
//! caller passes in, so `*_env` secrets are testable without touching the process environment.

use crate::chunk::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE};
use crate::environment::Environment;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// One `[[mesh.mailboxes]]` entry, exactly as configured.
#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct MailboxConfig {
    /// Base URL of the MESH server (e.g. a local sandbox); exclusive with `environment`.
    pub url: Option<String>,
    /// `int`, `dep` or `live`; exclusive with `url`.
    pub environment: Option<String>,
    /// Mailbox id, e.g. `X26ABC1`.
    pub mailbox: String,
    /// Mailbox password (prefer `password_env`).
    pub password: Option<String>,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// Environment shared secret used as the HMAC key (prefer `shared_key_env`).
    pub shared_key: Option<String>,
    /// Name of an environment variable holding the shared secret.
    pub shared_key_env: Option<String>,
    /// How often the hub polls the inbox, e.g. `"500ms"`, `"1s"`, `"5m"` [default: 5m, MESH's guidance].
    pub poll_interval: Option<String>,
    /// Workflow ids this mailbox sends or receives (informational filter for the hub).
    #[serde(default)]
    pub workflows: Vec<String>,
    /// Client certificate (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    pub client_key: Option<PathBuf>,
    /// CA bundle (PEM) that replaces the system roots when verifying the MESH server.
    pub ca_bundle: Option<PathBuf>,
    /// Uncompressed bytes per chunk: a number of bytes or a string such as `"20MiB"` [default: 75 MiB].
    pub chunk_size: Option<SizeValue>,
    /// Time limit of one HTTP request, e.g. `"60s"` [default: 10m, large chunks take a while].
    pub timeout: Option<String>,
}

/// A size written either as a number of bytes or as a string with a unit (`"512KiB"`, `"20MiB"`, `"5MB"`).
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum SizeValue {
    /// Plain bytes.
    Bytes(u64),
    /// With a unit.
    Text(String),
}

impl fmt::Debug for MailboxConfig {
    // Hand-written so secrets never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MailboxConfig")
            .field("url", &self.url)
            .field("environment", &self.environment)
            .field("mailbox", &self.mailbox)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_env", &self.password_env)
            .field(
                "shared_key",
                &self.shared_key.as_ref().map(|_| "<redacted>"),
            )
            .field("shared_key_env", &self.shared_key_env)
            .field("poll_interval", &self.poll_interval)
            .field("workflows", &self.workflows)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("ca_bundle", &self.ca_bundle)
            .field("chunk_size", &self.chunk_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A validated mailbox: what the client needs, secrets resolved.
#[derive(Clone)]
pub struct Mailbox {
    /// Base URL without trailing slash.
    pub base_url: String,
    /// Upper-case mailbox id.
    pub mailbox: String,
    /// Password.
    pub password: String,
    /// HMAC key.
    pub shared_key: Vec<u8>,
    /// Inbox poll interval.
    pub poll_interval: Duration,
    /// Configured workflows.
    pub workflows: Vec<String>,
    /// Client certificate and key (PEM files) for mutual TLS.
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// CA bundle (PEM file) replacing the system roots.
    pub ca_bundle: Option<PathBuf>,
    /// Uncompressed bytes per chunk.
    pub chunk_size: usize,
    /// Time limit of one HTTP request.
    pub timeout: Duration,
}

impl fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mailbox")
            .field("base_url", &self.base_url)
            .field("mailbox", &self.mailbox)
            .field("password", &"<redacted>")
            .field("shared_key", &"<redacted>")
            .field("poll_interval", &self.poll_interval)
            .field("workflows", &self.workflows)
            .field("client_identity", &self.client_identity)
            .field("ca_bundle", &self.ca_bundle)
            .field("chunk_size", &self.chunk_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl MailboxConfig {
    /// Validate and resolve secrets from the process environment.
    pub fn resolve(&self) -> Result<Mailbox> {
        self.resolve_with(&|name| std::env::var(name).ok())
    }

    /// Validate and resolve secrets, reading `*_env` variables through `env`.
    pub fn resolve_with(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Mailbox> {
        let mb = self.mailbox.trim().to_ascii_uppercase();
        if mb.is_empty()
            || !mb
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(Error::Config(format!(
                "mailbox id '{}' must be letters, digits, '_' or '-'",
                self.mailbox
            )));
        }
        let ctx = |msg: String| Error::Config(format!("mailbox {mb}: {msg}"));
        let base_url = match (&self.url, &self.environment) {
            (Some(_), Some(_)) => {
                return Err(ctx("set either url or environment, not both".into()));
            }
            (None, None) => return Err(ctx("set url or environment (int, dep, live)".into())),
            (Some(u), None) => {
                let u = u.trim().trim_end_matches('/');
                if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() < 9 {
                    return Err(ctx(format!(
                        "url '{u}' must start with http:// or https://"
                    )));
                }
                u.to_string()
            }
            (None, Some(e)) => {
                let env_ = Environment::parse(e).map_err(|e| ctx(e.to_string()))?;
                if self.client_cert.is_none() {
                    return Err(ctx(format!(
                        "environment '{e}' needs client_cert and client_key: MESH requires mutual TLS"
                    )));
                }
                env_.base_url().to_string()
            }
        };
        let password = secret("password", &self.password, &self.password_env, env).map_err(ctx)?;
        let shared_key =
            secret("shared_key", &self.shared_key, &self.shared_key_env, env).map_err(ctx)?;
        let client_identity = match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => return Err(ctx("client_cert and client_key go together".into())),
        };
        let poll_interval = match &self.poll_interval {
            Some(s) => parse_duration(s).map_err(ctx)?,
            None => Duration::from_secs(300),
        };
        let timeout = match &self.timeout {
            Some(s) => parse_duration(s).map_err(ctx)?,
            None => Duration::from_secs(600),
        };
        if timeout.is_zero() {
            return Err(ctx("timeout must be above zero".into()));
        }
        let chunk_size = match &self.chunk_size {
            None => DEFAULT_CHUNK_SIZE,
            Some(SizeValue::Bytes(n)) => usize::try_from(*n).unwrap_or(usize::MAX),
            Some(SizeValue::Text(s)) => parse_size(s).map_err(ctx)?,
        };
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(ctx(format!(
                "chunk_size must be between 1 byte and {MAX_CHUNK_SIZE} bytes (MESH takes at most 100 MB a request)"
            )));
        }
        Ok(Mailbox {
            base_url,
            mailbox: mb,
            password,
            shared_key: shared_key.into_bytes(),
            poll_interval,
            workflows: self.workflows.clone(),
            client_identity,
            ca_bundle: self.ca_bundle.clone(),
            chunk_size,
            timeout,
        })
    }
}

fn secret(
    name: &str,
    inline: &Option<String>,
    var: &Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    match (inline, var) {
        (Some(_), Some(_)) => Err(format!("set either {name} or {name}_env, not both")),
        (Some(v), None) => Ok(v.clone()),
        (None, Some(var)) => match env(var) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(format!("{name}_env names '{var}', which is not set")),
        },
        (None, None) => Err(format!("{name} (or {name}_env) is required")),
    }
}

/// Parse a duration such as `"500ms"`, `"1s"`, `"2m"`, `"1h"`, `"1m30s"` (a bare number means seconds).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let text = s.trim();
    let bad = || format!("'{s}' is not a duration like 500ms, 1s, 2m or 1h");
    if text.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = rest[..unit_len].trim();
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" | "sec" | "secs" => Duration::from_secs(n),
            "m" | "min" | "mins" => Duration::from_secs(n.saturating_mul(60)),
            "h" | "hr" | "hrs" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Parse a size such as `"1000"`, `"512KiB"`, `"20MiB"`, `"5MB"` into bytes.
pub fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let text = s.trim();
    let bad = || format!("'{s}' is not a size like 1000, 512KiB, 20MiB or 5MB");
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if digits == 0 {
        return Err(bad());
    }
    let n: usize = text[..digits].parse().map_err(|_| bad())?;
    let mult: usize = match text[digits..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn from_toml(s: &str) -> std::result::Result<MailboxConfig, String> {
        toml::from_str(s).map_err(|e| e.to_string())
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
        for bad in ["", "s", "1x", "1.5s", "-1s", "ms5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("20MiB").unwrap(), 20 << 20);
        assert_eq!(parse_size("512 KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("5MB").unwrap(), 5_000_000);
        for bad in ["", "MiB", "1GiB", "1.5MiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn full_config_resolves() {
        let c = from_toml(
            r#"url = "http://127.0.0.1:8700/"
mailbox = "x26abc2"
password = "password"
shared_key = "TestKey"
poll_interval = "1s"
workflows = ["TEST_WORKFLOW"]
chunk_size = "1KiB""#,
        )
        .unwrap();
        let m = c.resolve_with(&no_env).unwrap();
        assert_eq!(m.base_url, "http://127.0.0.1:8700");
        assert_eq!(m.mailbox, "X26ABC2");
        assert_eq!(m.password, "password");
        assert_eq!(m.shared_key, b"TestKey");
        assert_eq!(m.poll_interval, Duration::from_secs(1));
        assert_eq!(m.chunk_size, 1024);
        assert_eq!(m.workflows, ["TEST_WORKFLOW"]);
        assert!(m.client_identity.is_none());
        let dbg = format!("{m:?} {c:?}");
        assert!(
            !dbg.contains("TestKey") && !dbg.contains("\"password\""),
            "{dbg}"
        );
    }

    #[test]
    fn secrets_from_env() {
        let c = from_toml(
            r#"url = "https://mesh.example"
mailbox = "X26ABC1"
password_env = "MB_PW"
shared_key_env = "MB_KEY"
chunk_size = 4096"#,
        )
        .unwrap();
        let env = |k: &str| match k {
            "MB_PW" => Some("pw-from-env".to_string()),
            "MB_KEY" => Some("key-from-env".to_string()),
            _ => None,
        };
        let m = c.resolve_with(&env).unwrap();
        assert_eq!(m.password, "pw-from-env");
        assert_eq!(m.shared_key, b"key-from-env");
        assert_eq!(m.chunk_size, 4096);
        assert_eq!(m.poll_interval, Duration::from_secs(300));
        let err = c.resolve_with(&no_env).unwrap_err().to_string();
        assert!(
            err.contains("X26ABC1") && err.contains("MB_PW") && err.contains("not set"),
            "{err}"
        );
    }

    #[test]
    fn refusals() {
        let cases = [
            (
                r#"mailbox = "X1"
password = "p"
shared_key = "k""#,
                "url or environment",
            ),
            (
                r#"url = "http://h:1"
environment = "int"
mailbox = "X1"
password = "p"
shared_key = "k""#,
                "not both",
            ),
            (
                r#"url = "ftp://h"
mailbox = "X1"
password = "p"
shared_key = "k""#,
                "http://",
            ),
            (
                r#"environment = "int"
mailbox = "X1"
password = "p"
shared_key = "k""#,
                "mutual TLS",
            ),
            (
                r#"environment = "qa"
mailbox = "X1"
password = "p"
shared_key = "k"
client_cert = "c"
client_key = "k""#,
                "int, dep or live",
            ),
            (
                r#"url = "http://h:1"
mailbox = "X1"
shared_key = "k""#,
                "password (or password_env) is required",
            ),
            (
                r#"url = "http://h:1"
mailbox = "X1"
password = "p"
password_env = "P"
shared_key = "k""#,
                "not both",
            ),
            (
                r#"url = "http://h:1"
mailbox = "X1"
password = "p""#,
                "shared_key (or shared_key_env) is required",
            ),
            (
                r#"url = "http://h:1"
mailbox = "X1"
password = "p"
shared_key = "k"
client_cert = "c""#,
                "go together",
            ),
            (
                r#"url = "http://h:1"
mailbox = "X1"
password = "p"
shared_key = "k"
poll_interval = "soon""#,
                "duration",
            ),
            (
                r#"url = "http://h:1"
mailbox = "X1"
password = "p"
shared_key = "k"
chunk_size = 0"#,
                "chunk_size",
            ),
            (
                r#"url = "http://h:1"
mailbox = "X1"
password = "p"
shared_key = "k"
chunk_size = "200MiB""#,
                "chunk_size",
            ),
            (
                r#"url = "http://h:1"
mailbox = "X 1"
password = "p"
shared_key = "k""#,
                "mailbox id",
            ),
        ];
        for (json, needle) in cases {
            let err = from_toml(json)
                .unwrap()
                .resolve_with(&no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
        assert!(
            from_toml(
                r#"url = "http://h"
mailbox = "X1"
pasword = "typo""#
            )
            .unwrap_err()
            .contains("unknown field")
        );
    }

    #[test]
    fn named_environment_with_certificates() {
        let c = from_toml(
            r#"environment = "int"
mailbox = "X26ABC1"
password = "p"
shared_key = "k"
client_cert = "c.pem"
client_key = "k.pem"
ca_bundle = "ca.pem""#,
        )
        .unwrap();
        let m = c.resolve_with(&no_env).unwrap();
        assert_eq!(m.base_url, "https://msg.intspineservices.nhs.uk");
        assert_eq!(
            m.client_identity,
            Some((PathBuf::from("c.pem"), PathBuf::from("k.pem")))
        );
        assert_eq!(m.ca_bundle, Some(PathBuf::from("ca.pem")));
    }
}
