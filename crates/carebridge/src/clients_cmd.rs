//! API clients: `carebridge clients add|list|rotate-key|revoke` (writing through the store, so they work while
//! `serve` runs), the first-start `admin` client, and `carebridge token` (signs an assertion with a private key
//! and asks a hub's token endpoint for an access token).

use anyhow::{Context, Result, anyhow, bail};
use auth::Client;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use store::Store;

/// Id of the client created on first start.
pub const ADMIN_CLIENT: &str = "admin";
/// `kid` of the admin client's first key.
pub const ADMIN_KID: &str = "admin-1";
/// File (in the data directory) the admin client's private key is written to.
pub const ADMIN_KEY_FILE: &str = "admin-client-key.pem";

/// The store the commands work on (the same as `serve`'s).
#[derive(Args, Debug)]
pub struct StoreArgs {
    /// Directory of the embedded store [default: ./carebridge-data].
    #[arg(long, env = "CAREBRIDGE_DATA_DIR", default_value = "carebridge-data")]
    pub data_dir: PathBuf,
    /// PostgreSQL store URL (as `serve --database-url`); the embedded store in --data-dir when absent.
    #[arg(long, env = "CAREBRIDGE_DATABASE_URL")]
    pub database_url: Option<String>,
}

/// `carebridge clients ...`
#[derive(Subcommand, Debug)]
pub enum ClientsCommand {
    /// Register a client: its organisation, scopes and public keys (JWKS file or URL), optionally bound to its
    /// TLS client certificate.
    Add {
        #[command(flatten)]
        store: StoreArgs,
        /// Client id (the `iss` and `sub` of its assertions).
        #[arg(long)]
        id: String,
        /// ODS code of the organisation it acts for: without the `cross-org` scope the client sees and changes
        /// only that organisation's Schedules, Slots and Appointments and the Patients linked to them.
        #[arg(long)]
        ods: String,
        /// Granted scopes, space separated, e.g. "system/Appointment.cruds system/Patient.rs"; `admin` for the
        /// admin endpoints, `cross-org` for every organisation's data, the event feed and Subscriptions.
        #[arg(long)]
        scopes: String,
        /// The client's public keys (RS512 RSA or ES384 P-384, each with a kid): a JWKS file, or an https (or
        /// http) URL the hub fetches and caches (checked now: it must answer with a usable key set).
        #[arg(long)]
        jwks: String,
        #[command(flatten)]
        cert: CertArgs,
        /// Human-readable name.
        #[arg(long, default_value = "")]
        name: String,
        /// Requests per second (token bucket, one second of burst); default: the hub's --rate-limit.
        #[arg(long)]
        rate_limit: Option<f64>,
    },
    /// List clients (keys shown by kid).
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Print the records as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Add keys (overlapping rotation) and/or remove one by kid.
    RotateKey {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        id: String,
        /// JWKS file whose keys are added (a kid already registered is replaced).
        #[arg(long)]
        jwks: Option<String>,
        /// Remove the key with this kid (which may begin with '-', as RFC 7638 thumbprints can).
        #[arg(long, allow_hyphen_values = true)]
        remove_kid: Option<String>,
        #[command(flatten)]
        cert: CertArgs,
        /// Remove the client's certificate binding.
        #[arg(long, conflicts_with_all = ["cert", "cert_thumbprint"])]
        unbind_cert: bool,
    },
    /// Replace a client's scopes (e.g. give the admin client of an older hub `cross-org`); tokens issued
    /// before keep their scopes until they expire.
    SetScopes {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        id: String,
        /// The new scopes, space separated.
        #[arg(long)]
        scopes: String,
    },
    /// Revoke a client: no new tokens, and its existing tokens are refused (within a second).
    Revoke {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        id: String,
    },
}

/// RFC 8705 certificate binding of a client.
#[derive(Args, Debug, Default)]
pub struct CertArgs {
    /// Bind the client to this TLS client certificate (PEM; the first certificate is the client's): it must
    /// request tokens over mutual TLS with it, and its tokens work only on connections presenting it.
    #[arg(long, conflicts_with = "cert_thumbprint")]
    pub cert: Option<PathBuf>,
    /// The same binding by the certificate's x5t#S256 thumbprint (base64url SHA-256 of its DER; one in 32
    /// begins with '-', which is taken as the value, not as an option).
    #[arg(long, allow_hyphen_values = true)]
    pub cert_thumbprint: Option<String>,
}

impl CertArgs {
    /// The thumbprint given (checked), if any.
    fn thumbprint(&self) -> Result<Option<String>> {
        if let Some(path) = &self.cert {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            return auth::cert::thumbprint_pem(&pem)
                .map(Some)
                .map_err(|e| anyhow!("{}: {e}", path.display()));
        }
        self.cert_thumbprint
            .as_deref()
            .map(|t| auth::cert::parse_thumbprint(t).map_err(|e| anyhow!("--cert-thumbprint: {e}")))
            .transpose()
    }
}

/// `carebridge token`: get an access token with a client's private key.
#[derive(Args, Debug)]
pub struct TokenArgs {
    /// PKCS#8 PEM private key of the client (RSA: RS512, EC P-384: ES384).
    #[arg(long)]
    pub key: PathBuf,
    /// Client id.
    #[arg(long, default_value = ADMIN_CLIENT)]
    pub client: String,
    /// Base URL of the hub, e.g. http://127.0.0.1:8080.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// kid of the key [default: admin-1]; it may begin with '-'.
    #[arg(long, default_value = ADMIN_KID, allow_hyphen_values = true)]
    pub kid: String,
    /// Scopes to ask for (default: all the client was granted).
    #[arg(long)]
    pub scope: Option<String>,
    /// Print the whole token response (JSON) instead of the access token alone.
    #[arg(long)]
    pub json: bool,
    /// PEM CA bundle the hub's https certificate is verified against (instead of the system's roots).
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (a client bound to its certificate needs it).
    #[arg(long, requires = "cert_key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert")]
    pub cert_key: Option<PathBuf>,
}

fn open(args: &StoreArgs) -> Result<crate::anystore::AnyStore> {
    crate::anystore::AnyStore::open(
        &args.data_dir,
        args.database_url.as_deref(),
        store_sqlite::SqliteOptions::default(),
    )
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Where a client's keys come from: an inline JWKS (from a file) or a URL.
enum KeySource {
    Inline(Value),
    Url(String),
}

fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

fn key_source(rt: &tokio::runtime::Runtime, source: &str) -> Result<KeySource> {
    if !is_url(source) {
        return read_jwks(source).map(KeySource::Inline);
    }
    let (doc, _) = rt
        .block_on(api::auth::fetch_jwks(source))
        .map_err(|e| anyhow!("the JWKS URL cannot be used: {e}"))?;
    let jwks = auth::Jwks::from_json(&doc).map_err(|e| anyhow!("{source}: {e}"))?;
    if jwks.keys.is_empty() {
        bail!("{source}: the key set has no keys");
    }
    Ok(KeySource::Url(source.to_string()))
}

fn read_jwks(source: &str) -> Result<Value> {
    let text = std::fs::read_to_string(source).with_context(|| format!("reading {source}"))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {source}"))?;
    auth::Jwks::from_json(&v).map_err(|e| anyhow!("{source}: {e}"))?;
    Ok(v)
}

fn check_ods(ods: &str) -> Result<()> {
    if ods.is_empty() || ods.len() > 12 || !ods.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("--ods must be an ODS code (letters and digits), not '{ods}'");
    }
    Ok(())
}

/// Run a `clients` command.
/// Change the stored record of client `id` in one write; an unknown id is an error.
fn update_client(
    rt: &tokio::runtime::Runtime,
    store: &StoreArgs,
    id: &str,
    change: impl FnOnce(&mut auth::Client) + Send + 'static,
) -> Result<()> {
    let st = open(store)?;
    let who = id.to_string();
    let found = rt.block_on(st.write(move |tx| {
        let Some(mut c) = api::auth::get_client(tx, &who)? else {
            return Ok(false);
        };
        change(&mut c);
        api::auth::put_client(tx, &c)?;
        Ok(true)
    }))?;
    if !found {
        bail!("no client {id}");
    }
    Ok(())
}

pub fn run(cmd: ClientsCommand) -> Result<()> {
    let rt = runtime()?;
    match cmd {
        ClientsCommand::Add {
            store,
            id,
            ods,
            scopes,
            jwks,
            cert,
            name,
            rate_limit,
        } => {
            if id.is_empty() || id.len() > 128 || id.contains(char::is_whitespace) {
                bail!("--id must be 1 to 128 characters without spaces");
            }
            check_ods(&ods)?;
            let parsed = auth::Scopes::parse(&scopes).map_err(|e| anyhow!("--scopes: {e}"))?;
            let cert_thumbprint = cert.thumbprint()?;
            let (jwks, jwks_url) = match key_source(&rt, &jwks)? {
                KeySource::Inline(v) => (v, None),
                KeySource::Url(u) => (json!({ "keys": [] }), Some(u)),
            };
            let client = Client {
                id: id.clone(),
                name,
                ods: ods.to_ascii_uppercase(),
                scopes: parsed.to_string(),
                jwks,
                jwks_url,
                cert_thumbprint,
                rate_limit,
                revoked: false,
                created: now_s(),
            };
            let st = open(&store)?;
            let added = rt.block_on(st.write(move |tx| {
                if api::auth::get_client(tx, &client.id)?.is_some() {
                    return Ok(false);
                }
                api::auth::put_client(tx, &client)?;
                Ok(true)
            }))?;
            if !added {
                bail!("client {id} already exists (use rotate-key or revoke)");
            }
            println!("client {id} added");
        }
        ClientsCommand::List { store, json } => {
            let st = open(&store)?;
            let clients = rt.block_on(st.write(|tx| {
                let mut out = Vec::new();
                for id in api::auth::client_ids(tx)? {
                    if let Some(c) = api::auth::get_client(tx, &id)? {
                        out.push(c);
                    }
                }
                Ok(out)
            }))?;
            for c in clients {
                if json {
                    println!("{}", c.to_json());
                } else {
                    let kids: Vec<&str> = c
                        .jwks
                        .get("keys")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|k| k.get("kid").and_then(Value::as_str))
                        .collect();
                    let mut keys = kids.join(",");
                    if let Some(u) = &c.jwks_url {
                        if !keys.is_empty() {
                            keys.push(',');
                        }
                        keys.push_str(u);
                    }
                    if let Some(t) = &c.cert_thumbprint {
                        keys.push_str(&format!("\tcert={t}"));
                    }
                    println!(
                        "{}\t{}\t{}\tkeys={}\t{}{}",
                        c.id,
                        c.ods,
                        c.scopes,
                        keys,
                        if c.revoked { "REVOKED" } else { "active" },
                        if c.name.is_empty() {
                            String::new()
                        } else {
                            format!("\t{}", c.name)
                        }
                    );
                }
            }
        }
        ClientsCommand::RotateKey {
            store,
            id,
            jwks,
            remove_kid,
            cert,
            unbind_cert,
        } => {
            let bind = cert.thumbprint()?;
            if jwks.is_none() && remove_kid.is_none() && bind.is_none() && !unbind_cert {
                bail!(
                    "give --jwks FILE|URL (keys to add), --remove-kid KID, --cert FILE / --cert-thumbprint T \
                     or --unbind-cert"
                );
            }
            let (add, url) = match jwks.as_deref().map(|j| key_source(&rt, j)).transpose()? {
                Some(KeySource::Inline(v)) => (Some(v), None),
                Some(KeySource::Url(u)) => (None, Some(u)),
                None => (None, None),
            };
            let st = open(&store)?;
            let who = id.clone();
            let result = rt.block_on(st.write(move |tx| {
                let Some(mut c) = api::auth::get_client(tx, &who)? else {
                    return Ok(Err(format!("no client {who}")));
                };
                let mut keys: Vec<Value> = c
                    .jwks
                    .get("keys")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let kid_of = |k: &Value| k.get("kid").and_then(Value::as_str).map(str::to_string);
                if let Some(add) = add {
                    for k in add
                        .get("keys")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        let kid = kid_of(k);
                        keys.retain(|o| kid_of(o) != kid);
                        keys.push(k.clone());
                    }
                }
                if let Some(r) = &remove_kid {
                    let before = keys.len();
                    keys.retain(|k| kid_of(k).as_deref() != Some(r.as_str()));
                    if keys.len() == before {
                        return Ok(Err(format!("client {who} has no key {r}")));
                    }
                }
                if let Some(u) = url {
                    c.jwks_url = Some(u);
                }
                if keys.is_empty() && c.jwks_url.is_none() {
                    return Ok(Err("that would leave the client without keys".into()));
                }
                if unbind_cert {
                    c.cert_thumbprint = None;
                } else if bind.is_some() {
                    c.cert_thumbprint = bind;
                }
                c.jwks = json!({ "keys": keys });
                api::auth::put_client(tx, &c)?;
                Ok(Ok(keys.len()))
            }))?;
            let n = result.map_err(|e| anyhow!(e))?;
            println!("client {id} now has {n} inline key(s)");
        }
        ClientsCommand::SetScopes { store, id, scopes } => {
            let parsed = auth::Scopes::parse(&scopes).map_err(|e| anyhow!("--scopes: {e}"))?;
            let text = parsed.to_string();
            let stored = text.clone();
            update_client(&rt, &store, &id, move |c| c.scopes = stored)?;
            println!("client {id} now has scopes {text}");
        }
        ClientsCommand::Revoke { store, id } => {
            update_client(&rt, &store, &id, |c| c.revoked = true)?;
            println!("client {id} revoked");
        }
    }
    Ok(())
}

/// First start: when no client is registered, create `admin` (scopes `system/*.cruds admin cross-org`) with a fresh RSA
/// key whose private half is written to `<data_dir>/admin-client-key.pem` (mode 0600). Returns the key file
/// when it was created now.
pub async fn bootstrap<S: Store>(store: &S, data_dir: &Path) -> Result<Option<PathBuf>> {
    let existing = store
        .kv_get(
            auth::client::CLIENT_INDEX_NAMESPACE,
            auth::client::INDEX_KEY,
        )
        .await?;
    if existing.is_some() {
        return Ok(None);
    }
    let signer = auth::keys::Signer::generate_rsa().map_err(|e| anyhow!(e))?;
    let pem = signer.to_pem().map_err(|e| anyhow!(e))?;
    let path = data_dir.join(ADMIN_KEY_FILE);
    std::fs::create_dir_all(data_dir).ok();
    write_private(&path, &pem)?;
    let client = Client {
        id: ADMIN_CLIENT.into(),
        name: "bootstrap administrator".into(),
        ods: "ADMIN".into(),
        scopes: "system/*.cruds admin cross-org".into(),
        jwks: json!({ "keys": [signer.public_jwk(ADMIN_KID)] }),
        jwks_url: None,
        cert_thumbprint: None,
        rate_limit: None,
        revoked: false,
        created: now_s(),
    };
    let created = store
        .write(move |tx| {
            if !api::auth::client_ids(tx)?.is_empty() {
                return Ok(false);
            }
            api::auth::put_client(tx, &client)?;
            Ok(true)
        })
        .await?;
    if !created {
        // Another process of this hub bootstrapped first.
        let _ = std::fs::remove_file(&path);
        return Ok(None);
    }
    Ok(Some(path))
}

fn write_private(path: &Path, pem: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(pem.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The HTTP client of `carebridge token`: the CA bundle and client certificate given, if any.
fn http_client(args: &TokenArgs) -> Result<reqwest::Client> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut builder = reqwest::Client::builder();
    if let Some(ca) = &args.cacert {
        let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?)
            .with_context(|| format!("parsing {}", ca.display()))?;
        builder = builder.tls_certs_only(certs);
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.cert_key) {
        let mut pem = read(cert)?;
        pem.push(b'\n');
        pem.extend_from_slice(&read(key)?);
        let identity = reqwest::Identity::from_pem(&pem).with_context(|| {
            format!(
                "client certificate {} / key {}",
                cert.display(),
                key.display()
            )
        })?;
        builder = builder.identity(identity);
    }
    builder.build().context("building the HTTP client")
}

/// `carebridge token`: prints the access token (or the whole response with --json); exit 0 on success.
pub fn token(args: TokenArgs) -> Result<()> {
    let pem = std::fs::read_to_string(&args.key)
        .with_context(|| format!("reading {}", args.key.display()))?;
    let signer =
        auth::keys::Signer::from_pem(&pem).map_err(|e| anyhow!("{}: {e}", args.key.display()))?;
    let base = args.url.trim_end_matches('/');
    let token_url = format!("{base}/oauth2/token");
    let now = now_s();
    let jti = auth::HubKey::generate_secret().map_err(|e| anyhow!(e))?;
    let assertion = signer
        .sign_jwt(
            &json!({"typ": "JWT", "kid": args.kid}),
            &json!({"iss": args.client, "sub": args.client, "aud": token_url, "jti": jti,
                    "iat": now, "exp": now + 240}),
        )
        .map_err(|e| anyhow!(e))?;
    let mut form = vec![
        ("grant_type", "client_credentials".to_string()),
        ("client_assertion_type", auth::ASSERTION_TYPE.to_string()),
        ("client_assertion", assertion),
    ];
    if let Some(s) = &args.scope {
        form.push(("scope", s.clone()));
    }
    let body = form
        .iter()
        .map(|(k, v)| format!("{k}={}", store::url::encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let rt = runtime()?;
    let (status, text) = rt.block_on(async {
        let res = http_client(&args)?
            .post(&token_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {token_url}"))?;
        let status = res.status();
        let text = res.text().await.context("reading the token response")?;
        anyhow::Ok((status, text))
    })?;
    if !status.is_success() {
        bail!("{token_url} answered {status}: {text}");
    }
    if args.json {
        println!("{text}");
    } else {
        let v: Value = serde_json::from_str(&text).context("the token response is not JSON")?;
        let t = v
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("no access_token in {text}"))?;
        println!("{t}");
    }
    Ok(())
}
