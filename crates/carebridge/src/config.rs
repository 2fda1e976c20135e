//! Configuration: command-line flags, then environment variables, then the TOML file given by `--config`,
//! then defaults.

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;
use std::path::PathBuf;
use store_sqlite::Durability;

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// Address of the HTTP listener [default: 127.0.0.1:8080].
    #[arg(long, env = "CAREBRIDGE_HTTP")]
    pub http: Option<String>,
    /// Directory of the embedded store [default: ./carebridge-data].
    #[arg(long, env = "CAREBRIDGE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL instead of the embedded store, e.g. postgres://user:pass@host/db (run `carebridge migrate`
    /// first). Several `serve` processes may share one database.
    #[arg(long, env = "CAREBRIDGE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// TOML configuration file with the same keys (http, data_dir, public_url, durability, log).
    #[arg(long, env = "CAREBRIDGE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Public base URL used in Location headers and links [default: http:// + the bound address].
    #[arg(long, env = "CAREBRIDGE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// `fsync` (a commit survives power loss) or `os` (survives a process crash; faster) [default: fsync].
    #[arg(long, env = "CAREBRIDGE_DURABILITY")]
    pub durability: Option<String>,
    /// Attempts before a webhook delivery becomes a dead letter [default: 12].
    #[arg(long, env = "CAREBRIDGE_DELIVERY_MAX_ATTEMPTS")]
    pub delivery_max_attempts: Option<u32>,
    /// Age (seconds since the event) after which a failing delivery becomes a dead letter [default: 86400].
    #[arg(long, env = "CAREBRIDGE_DELIVERY_MAX_AGE")]
    pub delivery_max_age: Option<u64>,
    /// First retry delay ceiling in milliseconds; doubles per attempt, with full jitter [default: 500].
    #[arg(long, env = "CAREBRIDGE_DELIVERY_BASE_DELAY_MS")]
    pub delivery_base_delay_ms: Option<u64>,
    /// Longest delay between two attempts, in seconds [default: 900].
    #[arg(long, env = "CAREBRIDGE_DELIVERY_MAX_DELAY")]
    pub delivery_max_delay: Option<u64>,
    /// Time limit of one webhook request, in seconds [default: 10].
    #[arg(long, env = "CAREBRIDGE_DELIVERY_TIMEOUT")]
    pub delivery_timeout: Option<u64>,
    /// Address of the HL7 v2 MLLP listener (off unless set), e.g. 127.0.0.1:2575.
    #[arg(long, env = "CAREBRIDGE_MLLP")]
    pub mllp: Option<String>,
    /// Largest MLLP message accepted, in bytes [default: 1048576].
    #[arg(long, env = "CAREBRIDGE_MLLP_MAX_MESSAGE_SIZE")]
    pub mllp_max_message_size: Option<usize>,
    /// Seconds an MLLP connection may stay idle before it is closed [default: 300].
    #[arg(long, env = "CAREBRIDGE_MLLP_IDLE_TIMEOUT")]
    pub mllp_idle_timeout: Option<u64>,
    /// Seconds an HL7 message for a not-yet-known appointment is held before it becomes a dead letter [default: 600].
    #[arg(long, env = "CAREBRIDGE_HL7_PARK_TIMEOUT")]
    pub hl7_park_timeout: Option<u64>,
    /// PEM certificate chain: TLS (https) on the HTTP listener and on the MLLP listener.
    #[arg(long, env = "CAREBRIDGE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "CAREBRIDGE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: when set, HTTP and MLLP clients must present a certificate signed by it (mutual TLS;
    /// others are refused at the handshake).
    #[arg(long, env = "CAREBRIDGE_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// `jwt` (Bearer tokens from /oauth2/token required) or `none` (only when every listener is on loopback)
    /// [default: jwt].
    #[arg(long, env = "CAREBRIDGE_AUTH")]
    pub auth: Option<String>,
    /// Lifetime of issued access tokens, in seconds [default: 300].
    #[arg(long, env = "CAREBRIDGE_TOKEN_LIFETIME")]
    pub token_lifetime: Option<u64>,
    /// Requests per second per client when its record sets none; 0 = no limit [default: 0].
    #[arg(long, env = "CAREBRIDGE_RATE_LIMIT")]
    pub rate_limit: Option<f64>,
}

/// The `--config` file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    http: Option<String>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    public_url: Option<String>,
    durability: Option<String>,
    log: Option<String>,
    delivery_max_attempts: Option<u32>,
    delivery_max_age: Option<u64>,
    delivery_base_delay_ms: Option<u64>,
    delivery_max_delay: Option<u64>,
    delivery_timeout: Option<u64>,
    mllp: Option<String>,
    mllp_max_message_size: Option<usize>,
    mllp_idle_timeout: Option<u64>,
    hl7_park_timeout: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    mesh: Option<MeshFileConfig>,
    auth: Option<String>,
    token_lifetime: Option<u64>,
    rate_limit: Option<f64>,
    outbound: Option<crate::outbound::OutboundFileConfig>,
}

/// The `[outbound]` section of a `--config` file (NHS API Platform profiles and keys), if it has one.
pub fn outbound_section(
    path: &std::path::Path,
) -> Result<Option<crate::outbound::OutboundFileConfig>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file = toml::from_str::<FileConfig>(&text)
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(file.outbound)
}

/// The `[mesh]` section of the `--config` file: `[[mesh.mailboxes]]` entries (see `mesh::MailboxConfig`).
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct MeshFileConfig {
    #[serde(default)]
    mailboxes: Vec<mesh::MailboxConfig>,
}

/// The `[[mesh.mailboxes]]` of a `--config` file, read with the same rules as `serve` reads it.
pub fn mesh_mailboxes(path: &std::path::Path) -> Result<Vec<mesh::MailboxConfig>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file = toml::from_str::<FileConfig>(&text)
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(file.mesh.unwrap_or_default().mailboxes)
}

#[derive(Debug)]
pub struct Config {
    pub http: String,
    pub data_dir: PathBuf,
    /// PostgreSQL URL; `None` = the embedded store in `data_dir`.
    pub database_url: Option<String>,
    pub public_url: Option<String>,
    pub durability: Durability,
    pub log: String,
    pub delivery_policy: delivery::RetryPolicy,
    pub delivery_timeout: std::time::Duration,
    pub mllp: Option<MllpConfig>,
    /// TLS of the HTTP listener (the same files as the MLLP listener's).
    pub tls: Option<TlsFiles>,
    /// MESH mailboxes `serve` polls and sends from (`[[mesh.mailboxes]]`), secrets resolved; empty = MESH off.
    pub mesh: Vec<mesh::Mailbox>,
    /// How long an HL7 message for an unknown appointment is held (MLLP and MESH alike).
    pub hl7_park_timeout: std::time::Duration,
    /// Bearer tokens required (`--auth jwt`, the default); false only with `--auth none`.
    pub auth: bool,
    /// Lifetime of issued access tokens, seconds.
    pub token_lifetime_s: i64,
    /// Default per-client requests per second (0 = no limit).
    pub rate_limit: f64,
}

/// The HL7 v2 MLLP listener.
#[derive(Debug, Clone)]
pub struct MllpConfig {
    pub addr: String,
    pub max_message_size: usize,
    pub idle_timeout: std::time::Duration,
    pub park_timeout: std::time::Duration,
    pub tls: Option<TlsFiles>,
}

/// Certificate, key and optional client CA (mutual TLS) of a listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

pub fn resolve(args: ServeArgs) -> Result<Config> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<FileConfig>(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    // The outbound profiles are checked at start-up (a key of one environment named by another's profile, or
    // a missing key file, stops the hub with a clear message rather than failing at the first call).
    if let (Some(section), Some(path)) = (file.outbound, &args.config) {
        crate::outbound::keyring(section, path.parent().unwrap_or(std::path::Path::new(".")))
            .context("the [outbound] section")?;
    }
    let durability = match args.durability.or(file.durability).as_deref() {
        None | Some("fsync") => Durability::Fsync,
        Some("os") => Durability::OsCrash,
        Some(other) => bail!("durability must be 'fsync' or 'os', not '{other}'"),
    };
    let tls = match (
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
        args.client_ca.or(file.client_ca),
    ) {
        (Some(cert), Some(key), client_ca) => Some(TlsFiles {
            cert,
            key,
            client_ca,
        }),
        (None, None, None) => None,
        _ => bail!("TLS needs both --tls-cert and --tls-key (and optionally --client-ca)"),
    };
    let mllp = args.mllp.or(file.mllp).map(|addr| MllpConfig {
        tls: tls.clone(),
        addr,
        max_message_size: args
            .mllp_max_message_size
            .or(file.mllp_max_message_size)
            .unwrap_or(1 << 20)
            .max(64),
        idle_timeout: std::time::Duration::from_secs(
            args.mllp_idle_timeout
                .or(file.mllp_idle_timeout)
                .unwrap_or(300)
                .max(1),
        ),
        park_timeout: std::time::Duration::from_secs(
            args.hl7_park_timeout
                .or(file.hl7_park_timeout)
                .unwrap_or(600),
        ),
    });
    let mesh = file
        .mesh
        .as_ref()
        .map(|m| m.mailboxes.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|m| {
            m.resolve()
                .map_err(|e| anyhow::anyhow!("[[mesh.mailboxes]]: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let auth = match args.auth.or(file.auth).as_deref() {
        None | Some("jwt") => true,
        Some("none") => false,
        Some(other) => bail!("auth must be 'jwt' or 'none', not '{other}'"),
    };
    let token_lifetime_s = i64::try_from(
        args.token_lifetime
            .or(file.token_lifetime)
            .unwrap_or(300)
            .clamp(30, 3600),
    )
    .unwrap_or(300);
    let rate_limit = args.rate_limit.or(file.rate_limit).unwrap_or(0.0).max(0.0);
    let database_url = args.database_url.or(file.database_url);
    Ok(Config {
        database_url,
        auth,
        token_lifetime_s,
        rate_limit,
        hl7_park_timeout: std::time::Duration::from_secs(
            args.hl7_park_timeout
                .or(file.hl7_park_timeout)
                .unwrap_or(600),
        ),
        mesh,
        mllp,
        tls,
        http: args
            .http
            .or(file.http)
            .unwrap_or_else(|| "127.0.0.1:8080".into()),
        data_dir: args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("carebridge-data")),
        public_url: args
            .public_url
            .or(file.public_url)
            .map(|u| u.trim_end_matches('/').to_string()),
        durability,
        log: file.log.unwrap_or_else(|| "info".into()),
        delivery_policy: {
            let d = delivery::RetryPolicy::default();
            let secs = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
            delivery::RetryPolicy {
                max_attempts: args
                    .delivery_max_attempts
                    .or(file.delivery_max_attempts)
                    .unwrap_or(d.max_attempts)
                    .max(1),
                max_age_ms: args
                    .delivery_max_age
                    .or(file.delivery_max_age)
                    .map_or(d.max_age_ms, secs),
                base_delay_ms: args
                    .delivery_base_delay_ms
                    .or(file.delivery_base_delay_ms)
                    .map_or(d.base_delay_ms, |ms| i64::try_from(ms).unwrap_or(i64::MAX)),
                max_delay_ms: args
                    .delivery_max_delay
                    .or(file.delivery_max_delay)
                    .map_or(d.max_delay_ms, secs),
            }
        },
        delivery_timeout: std::time::Duration::from_secs(
            args.delivery_timeout
                .or(file.delivery_timeout)
                .unwrap_or(10)
                .max(1),
        ),
    })
}
