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
}

#[derive(Debug)]
pub struct Config {
    pub http: String,
    pub data_dir: PathBuf,
    pub public_url: Option<String>,
    pub durability: Durability,
    pub log: String,
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
    })
}
