//! Carebridge calling NHS APIs (PDS, NHS Notify, ...): the signed-JWT client of the NHS API Platform, with one
//! named profile per environment (`[[outbound.profiles]]`) and keys labelled with the environment they were
//! registered for (`[[outbound.keys]]`), both in the `--config` file. The pure rules (which key may sign for
//! which profile, the assertion, the token cache) are `auth::outbound`; this module reads the files, posts the
//! token request, keeps one token per profile until shortly before it expires, and offers
//! `carebridge outbound token|get` to operators.

use anyhow::{Context, Result, anyhow, bail};
use auth::outbound::{
    Environment, Keyring, OutboundKey, Profile, TokenCache, parse_token_response,
};
use clap::{Args, Subcommand};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The `[outbound]` section of the `--config` file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct OutboundFileConfig {
    #[serde(default)]
    keys: Vec<KeyFile>,
    #[serde(default)]
    profiles: Vec<ProfileFile>,
}

/// `[[outbound.keys]]`: a private key registered with the platform for one environment.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    kid: String,
    environment: String,
    /// PKCS#8 PEM file (relative paths are relative to the configuration file).
    private_key: Option<PathBuf>,
    /// Or the name of an environment variable holding the PEM.
    private_key_env: Option<String>,
}

/// `[[outbound.profiles]]`: where to call and as whom.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    name: String,
    environment: String,
    /// The application's API key (`iss`/`sub`), or `api_key_env` naming a variable holding it.
    api_key: Option<String>,
    api_key_env: Option<String>,
    kid: String,
    base_url: Option<String>,
    token_url: Option<String>,
}

fn from_env(var: &str, what: &str) -> Result<String> {
    std::env::var(var).map_err(|_| anyhow!("{what}: environment variable {var} is not set"))
}

/// Build the keyring of an `[outbound]` section; `dir` is the configuration file's folder.
pub fn keyring(section: OutboundFileConfig, dir: &Path) -> Result<Keyring> {
    let mut keys = Vec::new();
    for k in section.keys {
        let env = Environment::parse(&k.environment).map_err(|e| anyhow!("key {}: {e}", k.kid))?;
        let pem = match (&k.private_key, &k.private_key_env) {
            (Some(path), None) => {
                let path = dir.join(path);
                std::fs::read_to_string(&path).with_context(|| {
                    format!("outbound key {}: reading {}", k.kid, path.display())
                })?
            }
            (None, Some(var)) => from_env(var, &format!("outbound key {}", k.kid))?,
            _ => bail!(
                "outbound key {}: give exactly one of private_key and private_key_env",
                k.kid
            ),
        };
        let signer = auth::keys::Signer::from_pem(&pem)
            .map_err(|e| anyhow!("outbound key {}: {e}", k.kid))?;
        keys.push(OutboundKey::new(&k.kid, env, signer).map_err(|e| anyhow!(e))?);
    }
    let mut profiles = Vec::new();
    for p in section.profiles {
        let env = Environment::parse(&p.environment)
            .map_err(|e| anyhow!("outbound profile {}: {e}", p.name))?;
        let api_key = match (&p.api_key, &p.api_key_env) {
            (Some(k), None) => k.clone(),
            (None, Some(var)) => from_env(var, &format!("outbound profile {}", p.name))?,
            _ => bail!(
                "outbound profile {}: give exactly one of api_key and api_key_env",
                p.name
            ),
        };
        profiles.push(
            Profile::new(
                &p.name,
                env,
                &api_key,
                &p.kid,
                p.base_url.as_deref(),
                p.token_url.as_deref(),
            )
            .map_err(|e| anyhow!(e))?,
        );
    }
    Keyring::new(keys, profiles).map_err(|e| anyhow!(e))
}

/// Read the `[outbound]` section of a configuration file.
pub fn keyring_from_file(path: &Path) -> Result<Keyring> {
    let section = crate::config::outbound_section(path)?
        .ok_or_else(|| anyhow!("{} has no [outbound] section", path.display()))?;
    keyring(section, path.parent().unwrap_or(Path::new(".")))
}

/// Access tokens for every profile of a keyring: one token per profile, reused until shortly before it
/// expires; concurrent callers of one profile share a single token request.
pub struct OutboundAuth {
    ring: Arc<Keyring>,
    http: reqwest::Client,
    caches: HashMap<String, tokio::sync::Mutex<TokenCache>>,
    /// Token requests made (for operators and tests).
    requests: std::sync::atomic::AtomicU64,
}

impl OutboundAuth {
    pub fn new(ring: Keyring) -> Result<OutboundAuth> {
        let caches = ring
            .profile_names()
            .into_iter()
            .map(|n| {
                (
                    n.to_string(),
                    tokio::sync::Mutex::new(TokenCache::default()),
                )
            })
            .collect();
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        Ok(OutboundAuth {
            ring: Arc::new(ring),
            http,
            caches,
            requests: Default::default(),
        })
    }

    /// The profile named `name`.
    pub fn profile(&self, name: &str) -> Result<&Profile> {
        self.ring.profile(name).ok_or_else(|| {
            anyhow!(
                "no outbound profile '{name}' (configured: {})",
                self.ring.profile_names().join(", ")
            )
        })
    }

    /// How many token requests were sent.
    pub fn token_requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A valid access token for `profile`: the cached one, or a new one from the token endpoint.
    pub async fn access_token(&self, profile: &str) -> Result<String> {
        let p = self.profile(profile)?;
        let cache = self
            .caches
            .get(profile)
            .ok_or_else(|| anyhow!("no outbound profile '{profile}'"))?;
        let mut cache = cache.lock().await;
        let now = now_s();
        if let Some(t) = cache.get(now) {
            return Ok(t.to_string());
        }
        let jti = uuid::Uuid::new_v4().to_string();
        let form = self
            .ring
            .token_request(profile, now, &jti)
            .map_err(|e| anyhow!(e))?;
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let res = self
            .http
            .post(&p.token_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .with_context(|| format!("POST {}", p.token_url))?;
        let status = res.status();
        let body = res.bytes().await.context("reading the token response")?;
        let issued = parse_token_response(&body, now)
            .map_err(|e| anyhow!("{} ({status}): {e}", p.token_url))?;
        if !status.is_success() {
            bail!("{} answered {status}", p.token_url);
        }
        let token = issued.access_token.clone();
        cache.put(issued, now);
        Ok(token)
    }

    /// Forget `profile`'s token (an API answered 401 with it).
    pub async fn invalidate(&self, profile: &str) {
        if let Some(c) = self.caches.get(profile) {
            c.lock().await.clear();
        }
    }

    /// GET `path` (relative to the profile's base URL, or absolute) with the profile's token; one retry with
    /// a fresh token after a 401.
    pub async fn get(&self, profile: &str, path: &str) -> Result<(u16, String)> {
        let p = self.profile(profile)?;
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}/{}", p.base_url, path.trim_start_matches('/'))
        };
        for attempt in 0..2 {
            let token = self.access_token(profile).await?;
            let res = self
                .http
                .get(&url)
                .bearer_auth(&token)
                .header("X-Request-ID", uuid::Uuid::new_v4().to_string())
                .send()
                .await
                .with_context(|| format!("GET {url}"))?;
            let status = res.status().as_u16();
            let text = res.text().await.context("reading the response")?;
            if status == 401 && attempt == 0 {
                self.invalidate(profile).await;
                continue;
            }
            return Ok((status, text));
        }
        bail!("GET {url}: refused twice with a fresh token")
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[derive(Args, Debug)]
pub struct OutboundArgs {
    /// TOML configuration file with `[outbound]` keys and profiles (the same file `serve` reads).
    #[arg(long, env = "CAREBRIDGE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: OutboundCommand,
}

#[derive(Subcommand, Debug)]
enum OutboundCommand {
    /// Get an access token for a profile and print it.
    Token {
        /// Profile name ([[outbound.profiles]] name).
        #[arg(long)]
        profile: String,
    },
    /// GET paths of the profile's base URL with its token (one token for all of them) and print each answer.
    Get {
        #[arg(long)]
        profile: String,
        /// Paths (relative to the profile's base URL) or absolute URLs.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Check the `[outbound]` configuration (keys, environments, profiles) without any network call.
    Check,
}

/// `carebridge outbound ...`; exit code 0 on success, 1 when an API answered an error, 2 on a failure.
pub fn run(args: OutboundArgs) -> i32 {
    match run_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("carebridge: {e:#}");
            2
        }
    }
}

fn run_inner(args: OutboundArgs) -> Result<i32> {
    let path = args.config.ok_or_else(|| {
        anyhow!("no configuration: pass --config FILE with an [outbound] section")
    })?;
    let ring = keyring_from_file(&path)?;
    if let OutboundCommand::Check = args.command {
        for name in ring.profile_names() {
            if let Some(p) = ring.profile(name) {
                println!(
                    "{name}: {} via {} as {} with key {}",
                    p.environment, p.token_url, p.api_key, p.kid
                );
            }
        }
        return Ok(0);
    }
    let client = OutboundAuth::new(ring)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        match args.command {
            OutboundCommand::Token { profile } => {
                println!("{}", client.access_token(&profile).await?);
                Ok(0)
            }
            OutboundCommand::Get { profile, paths } => {
                let mut code = 0;
                for path in &paths {
                    let (status, body) = client.get(&profile, path).await?;
                    println!("{status} {path}\n{body}");
                    if status >= 400 {
                        code = 1;
                    }
                }
                eprintln!(
                    "carebridge: {} request(s), {} token request(s)",
                    paths.len(),
                    client.token_requests()
                );
                Ok(code)
            }
            OutboundCommand::Check => Ok(0),
        }
    })
}
