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
}

/// The `--config` file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    http: Option<String>,
    data_dir: Option<PathBuf>,
    public_url: Option<String>,
    durability: Option<String>,
    log: Option<String>,
    delivery_max_attempts: Option<u32>,
    delivery_max_age: Option<u64>,
    delivery_base_delay_ms: Option<u64>,
    delivery_max_delay: Option<u64>,
    delivery_timeout: Option<u64>,
}

#[derive(Debug)]
pub struct Config {
    pub http: String,
    pub data_dir: PathBuf,
    pub public_url: Option<String>,
    pub durability: Durability,
    pub log: String,
    pub delivery_policy: delivery::RetryPolicy,
    pub delivery_timeout: std::time::Duration,
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
    let durability = match args.durability.or(file.durability).as_deref() {
        None | Some("fsync") => Durability::Fsync,
        Some("os") => Durability::OsCrash,
        Some(other) => bail!("durability must be 'fsync' or 'os', not '{other}'"),
    };
    Ok(Config {
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
