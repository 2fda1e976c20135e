//! Operator commands that work on a store directly (also while `serve` runs on it):
//! `carebridge slots generate`, `carebridge deliveries list|replay` and `carebridge mesh-inbound`.

use anyhow::{Context, Result, anyhow, bail};
use booking::scheduling::{LocalDate, OpeningPeriod, OpeningRule, SlotTemplate, Weekday};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use store::{DeliveryQuery, DeliveryState, DeliveryUpdate, Store};
use store_sqlite::SqliteOptions;

use crate::anystore::AnyStore;

#[derive(Args, Debug)]
pub struct StoreArgs {
    /// Directory of the embedded store [default: ./carebridge-data].
    #[arg(long, env = "CAREBRIDGE_DATA_DIR", default_value = "carebridge-data")]
    pub data_dir: PathBuf,
    /// PostgreSQL store instead of the embedded one (as `serve --database-url`).
    #[arg(long, env = "CAREBRIDGE_DATABASE_URL")]
    pub database_url: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum SlotsCommand {
    /// Generate the free slots of a Schedule from opening times (idempotent: existing slots are skipped).
    Generate {
        #[command(flatten)]
        store: StoreArgs,
        /// The Schedule id.
        #[arg(long)]
        schedule: String,
        /// Days of the week, e.g. mon,tue,wed.
        #[arg(long, value_delimiter = ',', required = true)]
        days: Vec<String>,
        /// Opening periods in UK wall-clock time, e.g. 09:00-12:30 (repeat or comma-separate).
        #[arg(long = "open", value_delimiter = ',', required = true)]
        open: Vec<String>,
        /// Slot length in minutes.
        #[arg(long)]
        slot_minutes: u32,
        /// First date (YYYY-MM-DD), inclusive.
        #[arg(long)]
        from: String,
        /// Last date (YYYY-MM-DD), inclusive.
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeliveriesCommand {
    /// List deliveries (oldest event first).
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        subscription: Option<String>,
        /// pending, delivered or dead (dead letters).
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Deliver again: every dead letter (--dead), one delivery (--event N), or everything matching the
    /// subscription from an event number (--sequence N) or an instant (--since 2026-11-24T09:00:00Z).
    Replay {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        subscription: String,
        #[arg(long)]
        dead: bool,
        #[arg(long)]
        event: Option<i64>,
        #[arg(long)]
        sequence: Option<i64>,
        #[arg(long)]
        since: Option<String>,
    },
}

/// `carebridge mesh-inbound`: what `serve` did with the messages its MESH pollers received.
#[derive(Args, Debug)]
pub struct MeshInboundArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// List the most recent messages, not only those that need an operator (failures, unrecognised or
    /// unsupported payloads, REPORTs).
    #[arg(long)]
    all: bool,
    /// Only this mailbox.
    #[arg(long)]
    mailbox: Option<String>,
    /// Print one message's full record (raw body included), by MESH message id.
    #[arg(long)]
    show: Option<String>,
    /// Print JSON (one array of records) instead of text.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

/// List the records of inbound MESH messages (see `mesh_poll`), newest first.
pub fn mesh_inbound(args: MeshInboundArgs) -> Result<()> {
    use crate::mesh_poll::{ATTENTION, INDEX_NS, NS, RECENT, Record};
    let rt = runtime()?;
    let st = open(&args.store)?;
    let kv = |ns: &str, key: &str| rt.block_on(st.kv_get(ns, key)).map_err(|e| anyhow!("{e}"));
    let list = if args.all { RECENT } else { ATTENTION };
    let keys: Vec<String> = kv(INDEX_NS, list)?
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let mut records = Vec::new();
    for key in keys.iter().rev() {
        let (mb, id) = key.split_once('/').unwrap_or(("", key.as_str()));
        if args.show.as_deref().is_some_and(|s| s != id)
            || args
                .mailbox
                .as_deref()
                .is_some_and(|m| !m.eq_ignore_ascii_case(mb))
        {
            continue;
        }
        let Some(rec) =
            kv(NS, key)?.and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        else {
            continue;
        };
        records.push(rec);
        if records.len() >= args.limit {
            break;
        }
    }
    if args.show.is_some() || args.json {
        if args.show.is_some() && records.is_empty() {
            bail!("no recorded MESH message {}", args.show.unwrap_or_default());
        }
        let out = if args.show.is_some() {
            records.swap_remove(0)
        } else {
            serde_json::Value::Array(records)
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<34} {:<16} {:<12} {:<8} detail",
        "mailbox", "message id", "kind", "outcome", "state"
    );
    for v in records {
        let Ok(r) = serde_json::from_value::<Record>(v) else {
            continue;
        };
        println!(
            "{:<10} {:<34} {:<16} {:<12} {:<8} {}",
            r.mailbox,
            r.message_id,
            r.kind,
            r.outcome,
            r.state,
            r.detail.unwrap_or_default().replace('\n', " ")
        );
    }
    Ok(())
}

fn open(args: &StoreArgs) -> Result<AnyStore> {
    AnyStore::open(
        &args.data_dir,
        args.database_url.as_deref(),
        SqliteOptions::default(),
    )
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

pub fn slots(cmd: SlotsCommand) -> Result<()> {
    let SlotsCommand::Generate {
        store,
        schedule,
        days,
        open: periods,
        slot_minutes,
        from,
        to,
    } = cmd;
    let days = days
        .iter()
        .map(|d| Weekday::parse(d.trim()).ok_or_else(|| anyhow!("'{d}' is not a day (mon..sun)")))
        .collect::<Result<Vec<_>>>()?;
    let periods = periods
        .iter()
        .map(|p| {
            OpeningPeriod::parse(p.trim())
                .ok_or_else(|| anyhow!("'{p}' is not an opening time like 09:00-12:30"))
        })
        .collect::<Result<Vec<_>>>()?;
    let template = SlotTemplate {
        schedule_id: schedule.clone(),
        rules: vec![OpeningRule { days, periods }],
        slot_minutes,
        start_date: LocalDate::parse(&from)
            .ok_or_else(|| anyhow!("--from '{from}' is not a date"))?,
        end_date: LocalDate::parse(&to).ok_or_else(|| anyhow!("--to '{to}' is not a date"))?,
        max_slots: None,
    };
    let st = open(&store)?;
    let result =
        runtime()?.block_on(st.write(move |tx| booking::generate_slots(tx, &schedule, &template)));
    match result.map_err(|e| anyhow!("{e}"))? {
        Ok(g) => {
            println!(
                "created {} slot(s), skipped {} existing",
                g.created, g.skipped
            );
            Ok(())
        }
        Err(e) => bail!(
            "refused: {}",
            e.issues()
                .first()
                .map(|i| i.diagnostics.clone())
                .unwrap_or_default()
        ),
    }
}

pub fn deliveries(cmd: DeliveriesCommand) -> Result<()> {
    let rt = runtime()?;
    match cmd {
        DeliveriesCommand::List {
            store,
            subscription,
            state,
            limit,
        } => {
            let state = match state.as_deref() {
                None => None,
                Some(s) => Some(
                    DeliveryState::parse(s)
                        .ok_or_else(|| anyhow!("--state must be pending, delivered or dead"))?,
                ),
            };
            let st = open(&store)?;
            let list = rt
                .block_on(st.deliveries(&DeliveryQuery {
                    subscription,
                    state,
                    after_seq: 0,
                    limit,
                }))
                .map_err(|e| anyhow!("{e}"))?;
            println!(
                "{:<38} {:>8} {:<10} {:>8} {:<24} last error",
                "subscription", "event", "state", "attempts", "subject"
            );
            for d in list {
                // A mesh:// delivery that MESH accepted: its message id, for `carebridge mesh track`.
                let mesh_id = rt
                    .block_on(st.kv_get(
                        crate::mesh_out::NS,
                        &format!("{}/{}", d.subscription, d.seq),
                    ))
                    .ok()
                    .flatten()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v["messageId"].as_str().map(|m| format!("MESH {m} ")))
                    .unwrap_or_default();
                println!(
                    "{:<38} {:>8} {:<10} {:>8} {:<24} {}{}",
                    d.subscription,
                    d.seq,
                    d.state.as_str(),
                    d.attempts,
                    d.subject,
                    mesh_id,
                    d.last_error.unwrap_or_default()
                );
            }
            Ok(())
        }
        DeliveriesCommand::Replay {
            store,
            subscription,
            dead,
            event,
            sequence,
            since,
        } => {
            let st = open(&store)?;
            let sub = subscription.clone();
            if dead {
                let n = rt
                    .block_on(st.write(move |tx| tx.requeue_dead(&sub)))
                    .map_err(|e| anyhow!("{e}"))?;
                println!("requeued {n} dead letter(s) of Subscription/{subscription}");
            } else if let Some(seq) = event {
                rt.block_on(
                    st.write(move |tx| tx.update_delivery(&sub, seq, DeliveryUpdate::Requeue)),
                )
                .map_err(|e| anyhow!("{e}"))?;
                println!("requeued event {seq} for Subscription/{subscription}");
            } else if sequence.is_some() || since.is_some() {
                let since_ms = match &since {
                    Some(s) => Some(
                        fhir::parse_instant_ms(s)
                            .ok_or_else(|| anyhow!("--since '{s}' is not an instant"))?,
                    ),
                    None => None,
                };
                let (requeued, enqueued) = rt
                    .block_on(async {
                        let q = api::criteria_of(&st, &subscription).await?;
                        api::replay_from(&st, &subscription, &q, sequence, since_ms).await
                    })
                    .map_err(|e| {
                        anyhow!(
                            "{}",
                            e.issues
                                .first()
                                .map(|i| i.diagnostics.clone())
                                .unwrap_or_default()
                        )
                    })?;
                println!(
                    "requeued {requeued}, enqueued {enqueued} delivery(ies) for Subscription/{subscription}"
                );
            } else {
                bail!("say what to replay: --dead, --event N, --sequence N or --since INSTANT");
            }
            Ok(())
        }
    }
}
