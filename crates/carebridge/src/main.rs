//! The `carebridge` binary: composition root of the hub.
//!
//! Invariants: the only crate that reads configuration (flags, environment, TOML file), owns the runtime,
//! binds listeners, spawns tasks and handles shutdown. Nothing depends on it.

mod admin_cmd;
mod anystore;
mod clients_cmd;
mod config;
mod deliver;
mod hl7_cmd;
mod https;
mod lease;
mod mesh_cmd;
mod mesh_out;
mod mesh_poll;
mod mllp;
mod outbound;
mod transfer_cmd;
mod validate_cmd;

use anyhow::{Context, Result};

/// mimalloc instead of glibc malloc: the request path allocates many small, short-lived blocks on several
/// threads, and glibc's arenas spent measurable time consolidating them (see BENCHMARKS.md). Built without
/// asking for transparent huge pages (`no_thp`): with them, each thread's first heap segment took a whole
/// 2 MiB page, 14 MiB of the 27.9 MiB an idle hub held; without them it holds 15.7-17.7 MiB, at the same rates.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "carebridge",
    version,
    about = "Integration hub for NHS patient and appointment messaging"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the hub: FHIR R4 REST API at /fhir on an embedded store.
    Serve(config::ServeArgs),
    /// Availability: generate a Schedule's slots.
    #[command(subcommand)]
    Slots(admin_cmd::SlotsCommand),
    /// Webhook deliveries: list them (dead letters included) and replay.
    #[command(subcommand)]
    Deliveries(admin_cmd::DeliveriesCommand),
    /// HL7 v2: convert a message to the FHIR resources it maps to; send messages over MLLP.
    #[command(subcommand)]
    Hl7(hl7_cmd::Hl7Command),
    /// MESH mailboxes ([[mesh.mailboxes]] in --config): handshake, send, inbox, download, ack, track, lookup.
    Mesh(mesh_cmd::MeshArgs),
    /// MESH messages received by `serve`: those needing an operator (failures, unrecognised, REPORTs) or --all.
    MeshInbound(admin_cmd::MeshInboundArgs),
    /// API clients (signed-JWT client credentials): add, list, rotate-key, revoke.
    #[command(subcommand)]
    Clients(clients_cmd::ClientsCommand),
    /// Get an access token from a hub with a client's private key (prints the token).
    Token(clients_cmd::TokenArgs),
    /// NHS APIs as a client: signed-JWT access tokens per environment profile ([outbound] in --config).
    Outbound(outbound::OutboundArgs),
    /// Export resources as FHIR bulk-data NDJSON (one file per type; --all-versions for the whole history).
    Export(transfer_cmd::ExportArgs),
    /// Import NDJSON written by `export` into this store (ids, versions and history kept on an empty store).
    Import(transfer_cmd::ImportArgs),
    /// Apply the PostgreSQL schema migrations (`serve --database-url` refuses an unmigrated database).
    Migrate {
        /// PostgreSQL URL, e.g. postgres://user:pass@host/db.
        #[arg(long, env = "CAREBRIDGE_DATABASE_URL")]
        database_url: String,
    },
    /// Validate FHIR JSON files offline (exit 0 when all are valid, 1 otherwise).
    Validate {
        /// Files to validate.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print an OperationOutcome (JSON) per file instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve(args) => match serve(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("carebridge: {e:#}");
                2
            }
        },
        Command::Validate { files, json } => validate_cmd::run(&files, json),
        Command::Clients(cmd) => report(clients_cmd::run(cmd)),
        Command::Token(args) => report(clients_cmd::token(args)),
        Command::Slots(cmd) => report(admin_cmd::slots(cmd)),
        Command::Deliveries(cmd) => report(admin_cmd::deliveries(cmd)),
        Command::Hl7(cmd) => hl7_cmd::run(cmd),
        Command::Migrate { database_url } => report(migrate(&database_url)),
        Command::Export(args) => report(transfer_cmd::export(args)),
        Command::Import(args) => report(transfer_cmd::import(args)),
        Command::Mesh(args) => mesh_cmd::run(args),
        Command::Outbound(args) => outbound::run(args),
        Command::MeshInbound(args) => report(admin_cmd::mesh_inbound(args)),
    };
    std::process::exit(code);
}

fn report(r: Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("carebridge: {e:#}");
            2
        }
    }
}

fn serve(args: config::ServeArgs) -> Result<()> {
    let started = Instant::now();
    let cfg = config::resolve(args)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAREBRIDGE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("carebridge")
        .build()
        .context("starting the async runtime")?;
    let store = anystore::AnyStore::open(
        &cfg.data_dir,
        cfg.database_url.as_deref(),
        store_sqlite::SqliteOptions {
            durability: cfg.durability,
            // An escape hatch for the WAL-buffering VFS (ARCHITECTURE.md, store-sqlite): `off` leaves the
            // writes of WAL frames to SQLite.
            wal_buffer: std::env::var("CAREBRIDGE_SQLITE_WAL_BUFFER").map_or(true, |v| v != "off"),
            ..Default::default()
        },
    )?;
    let described = anystore::AnyStore::describe(&cfg.data_dir, cfg.database_url.as_deref());
    runtime.block_on(async move { run_hub(Arc::new(store), cfg, described, started).await })
}

/// `carebridge migrate`: apply the PostgreSQL schema migrations (safe to run from several processes at once).
fn migrate(database_url: &str) -> Result<()> {
    let report = store_postgres::migrate(database_url)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("migrating {}", anystore::redact(database_url)))?;
    if report.applied == 0 {
        println!("schema is current (version {})", report.to);
    } else {
        println!(
            "applied {} migration(s): schema version {} -> {}",
            report.applied, report.from, report.to
        );
    }
    Ok(())
}

/// Everything `serve` runs on an opened store: HTTP, the delivery runner, MLLP; returns after a graceful
/// shutdown.
async fn run_hub(
    store: Arc<anystore::AnyStore>,
    cfg: config::Config,
    store_description: String,
    started: Instant,
) -> Result<()> {
    {
        let listener = tokio::net::TcpListener::bind(&cfg.http)
            .await
            .with_context(|| format!("binding the HTTP listener to {}", cfg.http))?;
        let local = listener.local_addr().context("reading the bound address")?;
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        let public_url = cfg
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{local}"));
        // Read the TLS files before anything starts, so a bad file stops the hub at once.
        let http_tls = cfg
            .tls
            .as_ref()
            .map(|files| {
                let mut c = mllp::tls_server_config(files)?;
                c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                anyhow::Ok(tokio_rustls::TlsAcceptor::from(Arc::new(c)))
            })
            .transpose()?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut api_config = api::ApiConfig::new(public_url.clone());
        api_config.stopping = stop_rx.clone();
        let audit_log = configure_auth(&*store, &cfg, local, &public_url, &mut api_config).await?;
        let audit_writer = audit_log
            .clone()
            .map(|log| tokio::spawn(api::auth::write_audit(store.clone(), log)));
        let metrics = api_config.metrics.clone();
        let app = api::router(store.clone(), api_config);
        // MESH: the mailboxes' clients serve the mesh:// channel (installed before the runner starts) and the
        // inbox pollers.
        let mesh_clients = cfg
            .mesh
            .iter()
            .map(|m| mesh::MeshClient::from_mailbox(m.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("MESH mailbox: {e}"))?;
        if !mesh_clients.is_empty() {
            mesh_out::install(mesh_clients.clone());
            mesh_poll::spawn(
                store.clone(),
                &mesh_clients,
                hl7_adapter::Options {
                    park_timeout_ms: i64::try_from(cfg.hl7_park_timeout.as_millis())
                        .unwrap_or(i64::MAX),
                },
                format!("{public_url}/fhir"),
                cfg.mllp.is_none(),
                store.is_shared(),
                audit_log.clone(),
                stop_rx.clone(),
            );
        }
        deliver::spawn(
            store.clone(),
            deliver::Config {
                policy: cfg.delivery_policy,
                timeout: cfg.delivery_timeout,
                max_in_flight: 256,
                per_subscription: 64,
                public_url: public_url.clone(),
                shared: store.is_shared(),
            },
            metrics,
            stop_rx.clone(),
        );
        let mllp_addr = match &cfg.mllp {
            Some(m) => {
                let listener = tokio::net::TcpListener::bind(&m.addr)
                    .await
                    .with_context(|| format!("binding the MLLP listener to {}", m.addr))?;
                let addr = listener.local_addr().context("reading the MLLP address")?;
                let ingest = Arc::new(hl7_adapter::Ingest::new(
                    store.clone(),
                    hl7_adapter::Options {
                        park_timeout_ms: i64::try_from(m.park_timeout.as_millis())
                            .unwrap_or(i64::MAX),
                    },
                ));
                let tls = m.tls.as_ref().map(mllp::tls_acceptor).transpose()?;
                tokio::spawn(mllp::serve(
                    listener,
                    ingest.clone(),
                    m.clone(),
                    tls,
                    audit_log.clone(),
                    stop_rx.clone(),
                ));
                tokio::spawn(mllp::sweep_parked(ingest, stop_rx.clone()));
                Some(addr)
            }
            None => None,
        };
        // Install the signal handlers before announcing readiness, so a supervisor that stops the hub as soon as
        // it is ready still gets a graceful shutdown.
        let signal = shutdown_signal()?;
        // The MLLP line first: scripts take the HTTP line as "ready".
        if let Some(addr) = mllp_addr {
            let tls = match cfg.mllp.as_ref().and_then(|m| m.tls.as_ref()) {
                Some(t) if t.client_ca.is_some() => " (TLS, client certificates required)",
                Some(_) => " (TLS)",
                None => "",
            };
            println!("carebridge HL7 v2 MLLP listening on {addr}{tls}");
        }
        let tls_note = match &cfg.tls {
            Some(t) if t.client_ca.is_some() => ", TLS, client certificates required",
            Some(_) => ", TLS",
            None => "",
        };
        println!(
            "carebridge {} listening on {scheme}://{local} (FHIR base {public_url}/fhir, store {}{tls_note}, ready in {} ms)",
            env!("CARGO_PKG_VERSION"),
            store_description,
            started.elapsed().as_millis()
        );
        tracing::info!(%local, scheme, "listening");
        let shutdown = async move {
            signal.await;
            // Stop the delivery runner and end long polls, then let axum drain the rest.
            let _ = stop_tx.send(true);
        };
        match http_tls {
            Some(acceptor) => {
                let listener = https::TlsListener::new(listener, acceptor, stop_rx.clone())
                    .context("starting the HTTPS listener")?;
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<api::auth::PeerInfo>(),
                )
                .with_graceful_shutdown(shutdown)
                .await
                .context("serving HTTPS")?;
            }
            None => axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .context("serving HTTP")?,
        }
        // The router (and with it every audit sender) is gone: let the writer flush what is queued.
        if let Some(w) = audit_writer {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), w).await;
        }
        tracing::info!("drained in-flight requests; stopping");
        drop(store);
        Ok(())
    }
}

/// Authentication: with `--auth jwt` (the default) bootstrap the admin client on an empty store, load the hub's
/// token key and install the guard; returns the audit receiver to run. With `--auth none`, refuse unless every
/// listener is on loopback, and warn.
async fn configure_auth<S: store::Store>(
    store: &S,
    cfg: &config::Config,
    http: std::net::SocketAddr,
    public_url: &str,
    api_config: &mut api::ApiConfig,
) -> Result<Option<Arc<api::auth::AuditLog>>> {
    if !cfg.auth {
        let mllp_loopback = cfg.mllp.as_ref().is_none_or(|m| {
            let host = m.addr.rsplit_once(':').map_or(m.addr.as_str(), |(h, _)| h);
            host == "localhost"
                || host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        if !http.ip().is_loopback() || !mllp_loopback {
            anyhow::bail!(
                "--auth none is allowed only when every listener is bound to loopback (HTTP is on {http})"
            );
        }
        eprintln!(
            "carebridge: WARNING: authentication is OFF (--auth none): every local process can read and change all data"
        );
        tracing::warn!("authentication is off (--auth none)");
        return Ok(None);
    }
    if let Some(key_file) = clients_cmd::bootstrap(store, &cfg.data_dir).await? {
        println!(
            "carebridge: created the admin client; its private key is {} (mode 0600). Get a token with:\n  \
             carebridge token --key {} --client admin --url {public_url}",
            key_file.display(),
            key_file.display()
        );
    }
    let secret = api::auth::hub_secret(store)
        .await
        .context("loading the hub's token key")?;
    let log = api::auth::AuditLog::new();
    let mut guard = api::auth::Guard::new(&secret, public_url, Some(log.clone()))
        .map_err(|e| anyhow::anyhow!("the hub's token key: {e}"))?;
    guard.token_lifetime_s = cfg.token_lifetime_s;
    guard.default_rate = cfg.rate_limit;
    api_config.auth = Some(Arc::new(guard));
    Ok(Some(log))
}

/// Registers SIGINT and SIGTERM handlers now and returns a future that resolves on either.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        eprintln!("carebridge: shutdown requested, draining in-flight requests");
    })
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::panic, reason = "tests")]
mod tests {
    use super::*;

    /// base64url values (certificate thumbprints, RFC 7638 kids) begin with '-' one time in 32: they must be
    /// taken as the option's value, not refused as an unknown option.
    #[test]
    fn values_that_begin_with_a_hyphen_are_taken_as_values() {
        let tp = "-bjkUpE85zIg1Cjb-BiKHaKIV9agqanJ9JP5-6Gti6M";
        let cli = Cli::try_parse_from([
            "carebridge",
            "clients",
            "add",
            "--id",
            "c",
            "--ods",
            "RA1",
            "--scopes",
            "system/Patient.rs",
            "--jwks",
            "k.jwks",
            "--cert-thumbprint",
            tp,
        ])
        .expect("a thumbprint beginning with '-' parses");
        let Command::Clients(clients_cmd::ClientsCommand::Add { cert, .. }) = cli.command else {
            panic!("parsed as another command: {:?}", cli.command)
        };
        assert_eq!(cert.cert_thumbprint.as_deref(), Some(tp));

        let cli = Cli::try_parse_from([
            "carebridge",
            "clients",
            "rotate-key",
            "--id",
            "c",
            "--remove-kid",
            "-kid",
            "--cert-thumbprint",
            tp,
        ])
        .expect("a kid beginning with '-' parses");
        let Command::Clients(clients_cmd::ClientsCommand::RotateKey {
            remove_kid, cert, ..
        }) = cli.command
        else {
            panic!("parsed as another command: {:?}", cli.command)
        };
        assert_eq!(remove_kid.as_deref(), Some("-kid"));
        assert_eq!(cert.cert_thumbprint.as_deref(), Some(tp));

        let cli = Cli::try_parse_from([
            "carebridge",
            "token",
            "--key",
            "k.pem",
            "--client",
            "c",
            "--kid",
            "-k1",
        ]);
        match cli {
            Ok(Cli {
                command: Command::Token(t),
            }) => assert_eq!(t.kid, "-k1"),
            other => panic!("token --kid -k1: {other:?}"),
        }
    }
}
