//! Operator commands that work on a store directly (also while `serve` runs on it):
//! `carebridge slots generate` and `carebridge deliveries list|replay`.

use anyhow::{Context, Result, anyhow, bail};
use booking::scheduling::{LocalDate, OpeningPeriod, OpeningRule, SlotTemplate, Weekday};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use store::{DeliveryQuery, DeliveryState, DeliveryUpdate, Store};
use store_sqlite::{SqliteOptions, SqliteStore};

#[derive(Args, Debug)]
pub struct StoreArgs {
    /// Directory of the embedded store [default: ./carebridge-data].
    #[arg(long, env = "CAREBRIDGE_DATA_DIR", default_value = "carebridge-data")]
    pub data_dir: PathBuf,
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

fn open(args: &StoreArgs) -> Result<SqliteStore> {
    SqliteStore::open(&args.data_dir, SqliteOptions::default())
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("opening the store in {}", args.data_dir.display()))
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
                println!(
                    "{:<38} {:>8} {:<10} {:>8} {:<24} {}",
                    d.subscription,
                    d.seq,
                    d.state.as_str(),
                    d.attempts,
                    d.subject,
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
