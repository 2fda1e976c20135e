//! The `carebridge` binary: composition root of the hub.
//!
//! Invariants: the only crate that reads configuration (flags, environment, TOML file), owns the runtime,
//! binds listeners, spawns tasks and handles shutdown. Nothing depends on it.

mod admin_cmd;
mod config;
mod deliver;
mod validate_cmd;

use anyhow::{Context, Result};
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
        Command::Slots(cmd) => report(admin_cmd::slots(cmd)),
        Command::Deliveries(cmd) => report(admin_cmd::deliveries(cmd)),
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
    runtime.block_on(async move {
        let store = store_sqlite::SqliteStore::open(
            &cfg.data_dir,
            store_sqlite::SqliteOptions { durability: cfg.durability, ..Default::default() },
        )
        .with_context(|| format!("opening the embedded store in {}", cfg.data_dir.display()))?;
        let store = Arc::new(store);
        let listener = tokio::net::TcpListener::bind(&cfg.http)
            .await
            .with_context(|| format!("binding the HTTP listener to {}", cfg.http))?;
        let local = listener.local_addr().context("reading the bound address")?;
        let public_url = cfg.public_url.clone().unwrap_or_else(|| format!("http://{local}"));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut api_config = api::ApiConfig::new(public_url.clone());
        api_config.stopping = stop_rx.clone();
        let metrics = api_config.metrics.clone();
        let app = api::router(store.clone(), api_config);
        deliver::spawn(
            store.clone(),
            deliver::Config {
                policy: cfg.delivery_policy,
                timeout: cfg.delivery_timeout,
                max_in_flight: 256,
                per_subscription: 64,
                public_url: public_url.clone(),
            },
            metrics,
            stop_rx,
        );
        // Install the signal handlers before announcing readiness, so a supervisor that stops the hub as soon as
        // it is ready still gets a graceful shutdown.
        let signal = shutdown_signal()?;
        println!(
            "carebridge {} listening on http://{local} (FHIR base {public_url}/fhir, store {}, ready in {} ms)",
            env!("CARGO_PKG_VERSION"),
            cfg.data_dir.display(),
            started.elapsed().as_millis()
        );
        tracing::info!(%local, "listening");
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                signal.await;
                // Stop the delivery runner and end long polls, then let axum drain the rest.
                let _ = stop_tx.send(true);
            })
            .await
            .context("serving HTTP")?;
        tracing::info!("drained in-flight requests; stopping");
        drop(store);
        Ok(())
    })
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
