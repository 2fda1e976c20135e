//! `cb-delivery-bench`: webhook delivery of the Carebridge hub, end to end, on this machine.
//!
//! Starts its own hub (`--hub-bin`, on a loopback port and a temporary data directory, removed afterwards)
//! and its own webhook receivers (a minimal HTTP/1.1 server answering 200 on keep-alive connections, recording
//! receipt time minus the CloudEvent's `time`, the event's commit instant), and measures:
//!
//! 1. `latency`: commit-to-receipt latency of one subscription while Patients are created open-loop at
//!    1,000/s for 10 s (`--quick`: 3 s);
//! 2. `throughput`: deliveries/s to one fast receiver, from the `$replay` (sequence 1) answer to the last
//!    receipt, of 20,000 Patients (`--quick`: 3,000) created before the subscription existed;
//! 3. `dead-subscriber`: the latency of nine healthy subscribers under scenario 1's load, with the tenth
//!    subscriber healthy, then accepting connections but never answering (hub run with
//!    `--delivery-timeout 1`).
//!
//! Prints a Markdown table per scenario and, with `--json`, one JSON line per scenario. Every scenario has a
//! hard time limit; every address is loopback. Exit status: 0 when every scenario ran (whatever its numbers),
//! 1 when one failed or hit its time limit, 2 on a usage error.

#[path = "delivery_bench/hub.rs"]
mod hub;
#[path = "delivery_bench/load.rs"]
mod load;
#[path = "delivery_bench/receiver.rs"]
mod receiver;
#[path = "delivery_bench/report.rs"]
mod report;

use hub::{CpuSample, CpuUsage, Hub, round};
use load::{Created, Patients};
use receiver::{DeadReceiver, Receiver};
use report::{Latency, Machine, Table, ms, ratio, thousands};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: cb-delivery-bench --hub-bin PATH [--quick] [--json] [--scenarios LIST] [--durability fsync|os]
                         [--database-url URL]

  --hub-bin PATH        the carebridge binary to start (e.g. target/release/carebridge)
  --quick               short runs: 3 s of load, 3,000 events replayed
  --json                also print one JSON line per scenario
  --scenarios LIST      comma-separated subset of: latency, throughput, dead-subscriber (or 1,2,3) [default: all]
  --durability MODE     passed to the hub as --durability [default: the hub's own, fsync]
  --database-url URL    run the hub on this migrated PostgreSQL database instead of the embedded store (every
                        scenario's hub on the same database: give one scenario per run for a fresh one each)
  --rate N              events/s of the latency and dead-subscriber load [default: 1000]
  --connections N       connections creating Patients [default: 32]";

/// Receivers in the dead-subscriber scenario.
const FANOUT: usize = 10;

struct Args {
    hub_bin: PathBuf,
    quick: bool,
    json: bool,
    scenarios: Vec<u8>,
    durability: Option<String>,
    database_url: Option<String>,
    rate: f64,
    connections: usize,
}

impl Args {
    fn load_duration(&self) -> Duration {
        Duration::from_secs(if self.quick { 3 } else { 10 })
    }

    fn replay_events(&self) -> u64 {
        if self.quick { 3_000 } else { 20_000 }
    }

    fn durability_label(&self) -> String {
        match &self.durability {
            Some(d) => d.clone(),
            None => "fsync (hub default)".into(),
        }
    }

    fn hub_flags(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if let Some(d) = &self.durability {
            v.push("--durability".into());
            v.push(d.clone());
        }
        if let Some(url) = &self.database_url {
            v.push("--database-url".into());
            v.push(url.clone());
        }
        v
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("cb-delivery-bench: {msg}\n{USAGE}");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut a = Args {
        hub_bin: PathBuf::new(),
        quick: false,
        json: false,
        scenarios: vec![1, 2, 3],
        durability: None,
        database_url: None,
        rate: 1000.0,
        connections: 32,
    };
    let mut hub_bin = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--hub-bin" => {
                hub_bin = Some(it.next().unwrap_or_else(|| usage("--hub-bin needs a path")))
            }
            "--quick" => a.quick = true,
            "--json" => a.json = true,
            "--scenarios" => {
                let list = it
                    .next()
                    .unwrap_or_else(|| usage("--scenarios needs a list"));
                a.scenarios = list
                    .split(',')
                    .map(|s| match s.trim() {
                        "1" | "latency" => 1,
                        "2" | "throughput" => 2,
                        "3" | "dead-subscriber" | "dead" => 3,
                        other => usage(&format!("unknown scenario {other:?}")),
                    })
                    .collect();
            }
            "--durability" => match it.next().as_deref() {
                Some(d @ ("fsync" | "os")) => a.durability = Some(d.to_string()),
                _ => usage("--durability must be fsync or os"),
            },
            "--database-url" => match it.next() {
                Some(url) if !url.trim().is_empty() => a.database_url = Some(url),
                _ => usage("--database-url needs a PostgreSQL URL"),
            },
            "--rate" => match it.next().and_then(|v| v.parse::<f64>().ok()) {
                Some(r) if (1.0..=100_000.0).contains(&r) => a.rate = r,
                _ => usage("--rate needs a number of events/s between 1 and 100000"),
            },
            "--connections" => match it.next().and_then(|v| v.parse::<usize>().ok()) {
                Some(n) if (1..=1024).contains(&n) => a.connections = n,
                _ => usage("--connections needs a number between 1 and 1024"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => usage(&format!("unknown option {other}")),
        }
    }
    let Some(bin) = hub_bin else {
        usage("--hub-bin is required")
    };
    a.hub_bin = PathBuf::from(bin);
    if !a.hub_bin.is_file() {
        usage(&format!("{} is not a file", a.hub_bin.display()));
    }
    a
}

/// A scenario's outcome: its table, notes under it, and its JSON line.
struct Report {
    title: String,
    table: Table,
    notes: Vec<String>,
    json: serde_json::Value,
}

fn main() {
    let a = parse_args();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cb-delivery-bench: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(run(&a));
    // Receivers' connection tasks may still be parked; do not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

async fn run(a: &Args) -> i32 {
    let machine = Machine::now();
    println!("# Carebridge webhook delivery benchmark\n");
    println!(
        "machine: nproc {}, load average {} (uptime, before the run); hub: {}; store: {}; durability: {}; mode: {}\n",
        machine.nproc,
        machine.load,
        a.hub_bin.display(),
        if a.database_url.is_some() {
            "PostgreSQL"
        } else {
            "embedded (SQLite)"
        },
        a.durability_label(),
        if a.quick { "quick" } else { "full" }
    );
    let mut failed = false;
    for &s in &a.scenarios {
        let at_start = Machine::now();
        let (name, limit) = match s {
            1 => (
                "latency",
                Duration::from_secs(if a.quick { 60 } else { 120 }),
            ),
            2 => (
                "throughput",
                Duration::from_secs(if a.quick { 240 } else { 600 }),
            ),
            _ => (
                "dead-subscriber",
                Duration::from_secs(if a.quick { 240 } else { 480 }),
            ),
        };
        let fut = async {
            match s {
                1 => latency(a).await,
                2 => throughput(a).await,
                _ => dead_subscriber(a).await,
            }
        };
        let result = match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("hit the scenario's {limit:?} time limit")),
        };
        match result {
            Ok(mut r) => {
                println!("## {}\n", r.title);
                print!("{}", r.table.render());
                if !r.notes.is_empty() {
                    println!();
                    for n in &r.notes {
                        println!("- {n}");
                    }
                }
                println!();
                if a.json {
                    if let Some(o) = r.json.as_object_mut() {
                        o.insert("scenario".into(), json!(name));
                        o.insert("nproc".into(), json!(at_start.nproc));
                        o.insert("load_average".into(), json!(at_start.load));
                        o.insert("durability".into(), json!(a.durability_label()));
                        o.insert("quick".into(), json!(a.quick));
                    }
                    println!("{}\n", r.json);
                }
            }
            Err(e) => {
                failed = true;
                println!("## {name}: FAILED\n\n{e}\n");
                if a.json {
                    println!(
                        "{}\n",
                        json!({"scenario": name, "error": e, "nproc": at_start.nproc,
                               "load_average": at_start.load, "durability": a.durability_label()})
                    );
                }
            }
        }
    }
    i32::from(failed)
}

/// Start a hub (on a blocking thread: it waits for the hub's `listening on` line).
async fn start_hub(a: &Args, extra: &[&str]) -> Result<Hub, String> {
    let (bin, flags) = (a.hub_bin.clone(), a.hub_flags(extra));
    tokio::task::spawn_blocking(move || Hub::start(&bin, &flags))
        .await
        .map_err(|e| format!("starting the hub: {e}"))?
}

/// Create one subscription per endpoint, then one Patient, and wait until every receiver in `healthy` has
/// it (so the dispatcher knows the subscriptions and the hub's connections are open); then forget it.
async fn subscribe_and_probe(
    hub: &mut Hub,
    patients: &Patients,
    endpoints: &[String],
    healthy: &[&Receiver],
) -> Result<Vec<String>, String> {
    let mut subs = Vec::new();
    for e in endpoints {
        subs.push(load::create_subscription(&hub.addr, e).await?);
    }
    load::create_one(&hub.addr, patients).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while healthy.iter().any(|r| r.distinct() == 0) {
        if Instant::now() > deadline || !hub.alive() {
            return Err(format!(
                "the probe Patient's event did not reach every receiver within 15 s; hub log tail:\n{}",
                hub.log_tail(1500)
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in healthy {
        r.reset();
    }
    Ok(subs)
}

/// How waiting for deliveries ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// Every expected delivery arrived.
    Complete,
    /// Nothing new arrived for the stall period.
    Stalled,
    /// The cap was reached while deliveries were still arriving.
    Capped,
}

impl Drain {
    fn describe(self, stall: Duration, cap: Duration) -> String {
        match self {
            Drain::Complete => "complete".into(),
            Drain::Stalled => format!("stopped: nothing new for {} s", stall.as_secs()),
            Drain::Capped => format!("stopped at the {} s cap, still arriving", cap.as_secs()),
        }
    }
}

/// Wait until each receiver has `expected` distinct deliveries, nothing new arrives for `stall`, or `cap`.
async fn drain(receivers: &[&Receiver], expected: u64, stall: Duration, cap: Duration) -> Drain {
    let start = Instant::now();
    let mut seen = 0;
    let mut progress = Instant::now();
    loop {
        let counts: Vec<u64> = receivers.iter().map(|r| r.distinct()).collect();
        if counts.iter().all(|&n| n >= expected) {
            return Drain::Complete;
        }
        let total: u64 = counts.iter().sum();
        if total != seen {
            seen = total;
            progress = Instant::now();
        }
        if progress.elapsed() > stall {
            return Drain::Stalled;
        }
        if start.elapsed() > cap {
            return Drain::Capped;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn log_cell(hub: &Hub) -> String {
    match hub.log_problems() {
        (0, 0, _) => "no warnings or errors".into(),
        (w, e, first) => format!(
            "{w} WARN, {e} ERROR lines; first: `{}`",
            first
                .unwrap_or_default()
                .replace('|', "/")
                .replace('`', "'")
        ),
    }
}

fn cpu_rows(table: &mut Table, hub: &CpuUsage, bench: &CpuUsage) {
    table.row(vec![
        "hub CPU, whole measured window".into(),
        hub.describe(),
    ]);
    table.row(vec![
        "bench CPU (load + receivers)".into(),
        format!("{:.0}% of one core", bench.total_pct),
    ]);
    table.row(vec![
        "machine CPU busy (every process, /proc/stat)".into(),
        hub.machine(),
    ]);
}

fn created_rows(table: &mut Table, c: &Created, rate: f64) {
    let lat = Latency::of(c.latencies_ms.clone());
    table.row(vec![
        "Patients created (201) / sent".into(),
        format!(
            "{} / {} ({} errors{})",
            thousands(c.ok),
            thousands(c.sent),
            c.errors,
            c.first_error
                .as_ref()
                .map(|e| format!(", first: {e}"))
                .unwrap_or_default()
        ),
    ]);
    table.row(vec![
        "create rate achieved / target".into(),
        format!("{:.0}/s / {rate:.0}/s", c.rate()),
    ]);
    table.row(vec![
        "create latency from schedule p50 / p99 / max".into(),
        format!("{} / {} / {}", ms(lat.p50), ms(lat.p99), ms(lat.max)),
    ]);
}

fn created_json(c: &Created) -> serde_json::Value {
    json!({"sent": c.sent, "ok": c.ok, "errors": c.errors, "first_error": c.first_error,
           "rate": round(c.rate(), 1), "latency_from_schedule": Latency::of(c.latencies_ms.clone()).to_json(),
           "max_send_lag_ms": round(c.max_send_lag_ms, 1)})
}

/// Delivery state from `/metrics`, for one subscription or all of them.
#[derive(Debug, Clone, Copy, Default)]
struct Backlog {
    pending: f64,
    /// Age of the oldest pending delivery, in s.
    oldest_s: f64,
    /// Attempts by result.
    delivered_attempts: f64,
    failed_attempts: f64,
    dead: f64,
}

impl Backlog {
    fn of(metrics: &str, sub: Option<&str>) -> Backlog {
        let with = |pairs: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> {
            let mut v: Vec<(&str, &str)> = pairs.to_vec();
            if let Some(s) = sub {
                v.push(("subscription", s));
            }
            v
        };
        let oldest_s = metrics
            .lines()
            .filter(|l| l.starts_with("carebridge_delivery_lag_seconds{"))
            .filter(|l| sub.is_none_or(|s| l.contains(&format!("subscription=\"{s}\""))))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .fold(0.0, f64::max);
        let sum = |name: &str, pairs: &[(&'static str, &'static str)]| {
            load::metric_sum(metrics, name, &with(pairs))
        };
        Backlog {
            pending: sum("carebridge_deliveries", &[("state", "pending")]),
            oldest_s,
            delivered_attempts: sum(
                "carebridge_delivery_attempts_total",
                &[("result", "delivered")],
            ),
            failed_attempts: sum(
                "carebridge_delivery_attempts_total",
                &[("result", "failed")],
            ),
            dead: sum("carebridge_deliveries", &[("state", "dead")]),
        }
    }

    fn add(self, o: Backlog) -> Backlog {
        Backlog {
            pending: self.pending + o.pending,
            oldest_s: self.oldest_s.max(o.oldest_s),
            delivered_attempts: self.delivered_attempts + o.delivered_attempts,
            failed_attempts: self.failed_attempts + o.failed_attempts,
            dead: self.dead + o.dead,
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} pending (oldest {:.1} s), {} delivered + {} failed attempts, {} dead letters",
            self.pending, self.oldest_s, self.delivered_attempts, self.failed_attempts, self.dead
        )
    }

    fn to_json(self) -> serde_json::Value {
        json!({"pending": self.pending, "oldest_pending_s": round(self.oldest_s, 3),
               "delivered_attempts": self.delivered_attempts, "failed_attempts": self.failed_attempts,
               "dead": self.dead})
    }
}

/// Scenario 1.
async fn latency(a: &Args) -> Result<Report, String> {
    let mut hub = start_hub(a, &[]).await?;
    let rx = Receiver::start()
        .await
        .map_err(|e| format!("starting the receiver: {e}"))?;
    let patients = Patients::new();
    subscribe_and_probe(&mut hub, &patients, &[rx.url()], &[&rx]).await?;
    let duration = a.load_duration();
    let (cpu0, self0) = (hub.cpu(), CpuSample::of_self());
    let created = load::open_loop(
        &hub.addr,
        patients.clone(),
        a.rate,
        duration,
        a.connections,
        Duration::from_secs(30),
    )
    .await;
    let load_end = Instant::now();
    let cpu_load = cpu0.usage(&hub.cpu());
    let at_load_end = load::metrics(&hub.addr).await;
    let (stall, cap) = (Duration::from_secs(10), Duration::from_secs(30));
    let drained = drain(&[&rx], created.ok, stall, cap).await;
    let (cpu1, self1) = (hub.cpu(), CpuSample::of_self());
    let end_metrics = load::metrics(&hub.addr).await;
    let rec = rx.snapshot();
    let lat = Latency::of(rec.latencies_ms.clone());
    let (hub_cpu, bench_cpu) = (cpu0.usage(&cpu1), self0.usage(&self1));

    let mut t = Table::new(&["metric", "value"]);
    t.row(vec![
        "load".into(),
        format!(
            "1 subscription, Patients created open-loop at {:.0}/s for {} s over {} connections",
            a.rate,
            duration.as_secs(),
            a.connections
        ),
    ]);
    created_rows(&mut t, &created, a.rate);
    t.row(vec![
        "deliveries received / expected".into(),
        format!(
            "{} ({} duplicates)",
            ratio(rec.distinct(), created.ok),
            rec.duplicates
        ),
    ]);
    t.row(vec!["commit-to-receipt p50".into(), ms(lat.p50)]);
    t.row(vec!["commit-to-receipt p90".into(), ms(lat.p90)]);
    t.row(vec!["commit-to-receipt p99".into(), ms(lat.p99)]);
    t.row(vec!["commit-to-receipt max".into(), ms(lat.max)]);
    let tail = rec
        .last
        .map(|l| l.saturating_duration_since(load_end).as_secs_f64() * 1000.0);
    t.row(vec![
        "last receipt after the load ended".into(),
        format!("{} (drain {})", ms(tail), drained.describe(stall, cap)),
    ]);
    let mut notes = Vec::new();
    let mut j = json!({
        "rate": a.rate, "duration_s": duration.as_secs(), "connections": a.connections,
        "created": created_json(&created), "received": rec.distinct(), "expected": created.ok,
        "duplicates": rec.duplicates, "unparsable": rec.unparsable, "latency": lat.to_json(),
        "last_receipt_after_load_ms": tail.map(|x| round(x, 1)), "drain": format!("{drained:?}"),
        "hub_cpu": hub_cpu.to_json(), "bench_cpu_pct": round(bench_cpu.total_pct, 1),
    });
    if let Ok((m, took)) = &at_load_end {
        let b = Backlog::of(m, None);
        t.row(vec![
            "when the load ended (/metrics)".into(),
            format!("{} (scrape {} ms)", b.describe(), took.as_millis()),
        ]);
        j["at_load_end"] = b.to_json();
    }
    if let Ok((m, _)) = &end_metrics {
        let b = Backlog::of(m, None);
        t.row(vec!["at the end (/metrics)".into(), b.describe()]);
        j["at_end"] = b.to_json();
    }
    t.row(vec![
        "hub CPU during the load".into(),
        format!("{}; machine {}", cpu_load.describe(), cpu_load.machine()),
    ]);
    j["hub_cpu_during_load"] = cpu_load.to_json();
    cpu_rows(&mut t, &hub_cpu, &bench_cpu);
    t.row(vec!["hub log".into(), log_cell(&hub)]);
    if rec.unparsable > 0 {
        notes.push(format!(
            "{} requests had no readable id/time",
            rec.unparsable
        ));
    }
    if drained != Drain::Complete {
        notes.push(
            "the wait for deliveries ended before every one arrived; the percentiles cover only the deliveries received"
                .into(),
        );
    }
    Ok(Report {
        title: format!(
            "1. Commit-to-receipt latency at {} events/s ({} s)",
            thousands(a.rate as u64),
            duration.as_secs()
        ),
        table: t,
        notes,
        json: j,
    })
}

/// Scenario 2.
async fn throughput(a: &Args) -> Result<Report, String> {
    let mut hub = start_hub(a, &[]).await?;
    let rx = Receiver::start()
        .await
        .map_err(|e| format!("starting the receiver: {e}"))?;
    let patients = Patients::new();
    let n = a.replay_events();
    let seed = load::closed_loop(
        &hub.addr,
        patients.clone(),
        n,
        16,
        Duration::from_secs(if a.quick { 90 } else { 240 }),
    )
    .await;
    if seed.ok == 0 {
        return Err(format!(
            "no Patient could be created: {}",
            seed.first_error.unwrap_or_default()
        ));
    }
    let sub = subscribe_and_probe(&mut hub, &patients, &[rx.url()], &[&rx])
        .await?
        .pop()
        .unwrap_or_default();
    let (cpu0, self0) = (hub.cpu(), CpuSample::of_self());
    let asked = Instant::now();
    let (requeued, enqueued) = load::replay_from_1(&hub.addr, &sub).await?;
    let answered = Instant::now();
    let expected = requeued + enqueued;
    let (stall, cap) = (
        Duration::from_secs(15),
        Duration::from_secs(if a.quick { 120 } else { 300 }),
    );
    let drained = drain(&[&rx], expected, stall, cap).await;
    let (cpu1, self1) = (hub.cpu(), CpuSample::of_self());
    let end_metrics = load::metrics(&hub.addr).await;
    let rec = rx.snapshot();
    let (hub_cpu, bench_cpu) = (cpu0.usage(&cpu1), self0.usage(&self1));
    let got = rec.distinct();
    let span = rec
        .last
        .map(|l| l.saturating_duration_since(answered).as_secs_f64());
    let rate = span.map(|s| got as f64 / s.max(1e-9));
    // Signed: a receipt can precede the answer (the sender may start before the response is read).
    let first_after = rec.first.map(|f| {
        if f >= answered {
            f.duration_since(answered).as_secs_f64() * 1000.0
        } else {
            -(answered.duration_since(f).as_secs_f64() * 1000.0)
        }
    });
    let steady = match (rec.first, rec.last) {
        (Some(f), Some(l)) if l > f && got > 1 => {
            Some((got - 1) as f64 / l.duration_since(f).as_secs_f64())
        }
        _ => None,
    };

    let mut t = Table::new(&["metric", "value"]);
    t.row(vec![
        "setup".into(),
        format!(
            "{} Patients created with no subscription ({:.0}/s over 16 connections, {} errors), then 1 subscription + $replay sequence=1",
            thousands(seed.ok),
            seed.rate(),
            seed.errors
        ),
    ]);
    t.row(vec![
        "$replay answer".into(),
        format!(
            "{} enqueued + {} requeued in {} ms",
            thousands(enqueued),
            thousands(requeued),
            answered.duration_since(asked).as_millis()
        ),
    ]);
    t.row(vec![
        "deliveries received / expected".into(),
        format!("{} ({} duplicates)", ratio(got, expected), rec.duplicates),
    ]);
    t.row(vec![
        "**deliveries/s** ($replay answer → last receipt)".into(),
        format!(
            "**{}** over {} (target ≥ 10,000/s)",
            rate.map_or("-".into(), |r| format!("{r:.0}")),
            span.map_or("-".into(), |s| format!("{s:.2} s"))
        ),
    ]);
    t.row(vec![
        "first receipt after the answer".into(),
        ms(first_after),
    ]);
    t.row(vec![
        "deliveries/s first → last receipt".into(),
        steady.map_or("-".into(), |r| format!("{r:.0}")),
    ]);
    t.row(vec!["drain".into(), drained.describe(stall, cap)]);
    let end_backlog = end_metrics.as_ref().ok().map(|(m, _)| Backlog::of(m, None));
    if let (Ok((_, took)), Some(b)) = (&end_metrics, end_backlog) {
        t.row(vec![
            "at the end (/metrics)".into(),
            format!("{} (scrape {} ms)", b.describe(), took.as_millis()),
        ]);
    }
    cpu_rows(&mut t, &hub_cpu, &bench_cpu);
    t.row(vec!["hub log".into(), log_cell(&hub)]);
    let j = json!({
        "events": n, "seeded": seed.ok, "seed_rate": round(seed.rate(), 1), "seed_errors": seed.errors,
        "replay_enqueued": enqueued, "replay_requeued": requeued,
        "replay_answer_ms": answered.duration_since(asked).as_millis() as u64,
        "received": got, "expected": expected, "duplicates": rec.duplicates,
        "deliveries_per_s": rate.map(|r| round(r, 1)), "span_s": span.map(|s| round(s, 3)),
        "first_receipt_after_answer_ms": first_after.map(|x| round(x, 1)),
        "deliveries_per_s_first_to_last": steady.map(|r| round(r, 1)),
        "target_per_s": 10000, "drain": format!("{drained:?}"),
        "hub_cpu": hub_cpu.to_json(), "bench_cpu_pct": round(bench_cpu.total_pct, 1),
        "at_end": end_backlog.map(Backlog::to_json),
    });
    let mut notes = Vec::new();
    if rec.duplicates > 0 {
        notes.push(format!(
            "{} events arrived more than once (at least once delivery; every receipt was answered 200 at once): compare the hub's delivered attempts with the distinct deliveries",
            rec.duplicates
        ));
    }
    Ok(Report {
        title: format!(
            "2. Deliveries/s to one fast receiver ($replay of {} events)",
            thousands(n)
        ),
        table: t,
        notes,
        json: j,
    })
}

/// One run of scenario 3.
struct FanoutRun {
    created: Created,
    /// Latency of the nine receivers that are healthy in both runs, merged.
    nine: Latency,
    /// Distinct deliveries per healthy receiver (nine, or ten when all are healthy).
    received: Vec<u64>,
    duplicates: u64,
    drained: Drain,
    tail_ms: Option<f64>,
    /// Deliveries/s to the nine, from the start of the load to their last receipt.
    nine_rate: Option<f64>,
    /// Dead receiver: (connections, requests seen).
    dead_counts: Option<(u64, u64)>,
    /// Backlog at the end of the load and at the end: (pending, oldest age s, failed, dead) of the healthy
    /// nine and of the tenth subscription.
    at_load_end: Option<(Backlog, Backlog)>,
    at_end: Option<(Backlog, Backlog)>,
    hub_cpu: CpuUsage,
    /// From the start to the end of the load only.
    load_cpu: CpuUsage,
    log: String,
    bench_cpu: CpuUsage,
}

/// (the first nine subscriptions summed, the tenth).
fn split_backlog(m: &str, subs: &[String]) -> (Backlog, Backlog) {
    let nine = subs[..subs.len().saturating_sub(1)]
        .iter()
        .map(|s| Backlog::of(m, Some(s)))
        .fold(Backlog::default(), Backlog::add);
    let tenth = subs
        .last()
        .map_or(Backlog::default(), |s| Backlog::of(m, Some(s)));
    (nine, tenth)
}

async fn fanout_run(a: &Args, dead: bool) -> Result<FanoutRun, String> {
    let mut hub = start_hub(a, &["--delivery-timeout", "1"]).await?;
    let healthy_n = if dead { FANOUT - 1 } else { FANOUT };
    let mut receivers = Vec::new();
    for _ in 0..healthy_n {
        receivers.push(
            Receiver::start()
                .await
                .map_err(|e| format!("starting a receiver: {e}"))?,
        );
    }
    let dead_rx = if dead {
        Some(
            DeadReceiver::start()
                .await
                .map_err(|e| format!("starting the dead receiver: {e}"))?,
        )
    } else {
        None
    };
    let mut endpoints: Vec<String> = receivers.iter().map(Receiver::url).collect();
    if let Some(d) = &dead_rx {
        endpoints.push(d.url());
    }
    let healthy: Vec<&Receiver> = receivers.iter().collect();
    let patients = Patients::new();
    let subs = subscribe_and_probe(&mut hub, &patients, &endpoints, &healthy).await?;
    let (cpu0, self0) = (hub.cpu(), CpuSample::of_self());
    let load_start = Instant::now();
    let created = load::open_loop(
        &hub.addr,
        patients.clone(),
        a.rate,
        a.load_duration(),
        a.connections,
        Duration::from_secs(30),
    )
    .await;
    let load_end = Instant::now();
    let cpu_load = cpu0.usage(&hub.cpu());
    let at_load_end = load::metrics(&hub.addr)
        .await
        .ok()
        .map(|(m, _)| split_backlog(&m, &subs));
    let (stall, cap) = (
        Duration::from_secs(10),
        Duration::from_secs(if a.quick { 45 } else { 90 }),
    );
    let drained = drain(&healthy, created.ok, stall, cap).await;
    let (cpu1, self1) = (hub.cpu(), CpuSample::of_self());
    let at_end = load::metrics(&hub.addr)
        .await
        .ok()
        .map(|(m, _)| split_backlog(&m, &subs));
    let snaps: Vec<_> = receivers.iter().map(Receiver::snapshot).collect();
    let nine: Vec<f64> = snaps[..FANOUT - 1]
        .iter()
        .flat_map(|s| s.latencies_ms.iter().copied())
        .collect();
    let last = snaps.iter().filter_map(|s| s.last).max();
    let nine_last = snaps[..FANOUT - 1].iter().filter_map(|s| s.last).max();
    let nine_got: u64 = snaps[..FANOUT - 1].iter().map(|s| s.distinct()).sum();
    Ok(FanoutRun {
        nine_rate: nine_last
            .map(|l| nine_got as f64 / l.duration_since(load_start).as_secs_f64().max(1e-9)),
        nine: Latency::of(nine),
        received: snaps.iter().map(|s| s.distinct()).collect(),
        duplicates: snaps.iter().map(|s| s.duplicates).sum(),
        drained,
        tail_ms: last.map(|l| l.saturating_duration_since(load_end).as_secs_f64() * 1000.0),
        dead_counts: dead_rx.as_ref().map(DeadReceiver::counts),
        at_load_end,
        at_end,
        hub_cpu: cpu0.usage(&cpu1),
        load_cpu: cpu_load,
        log: log_cell(&hub),
        bench_cpu: self0.usage(&self1),
        created,
    })
}

fn fanout_json(r: &FanoutRun) -> serde_json::Value {
    let b = |x: Option<(Backlog, Backlog)>| {
        x.map(|(n, t)| json!({"nine": n.to_json(), "tenth": t.to_json()}))
    };
    json!({
        "created": created_json(&r.created), "nine_latency": r.nine.to_json(),
        "received_per_healthy_receiver": r.received, "expected_per_receiver": r.created.ok,
        "duplicates": r.duplicates, "drain": format!("{:?}", r.drained),
        "last_receipt_after_load_ms": r.tail_ms.map(|x| round(x, 1)),
        "nine_deliveries_per_s": r.nine_rate.map(|x| round(x, 1)),
        "dead_receiver": r.dead_counts.map(|(c, q)| json!({"connections": c, "requests": q})),
        "backlog_at_load_end": b(r.at_load_end), "backlog_at_end": b(r.at_end),
        "hub_cpu": r.hub_cpu.to_json(), "hub_cpu_during_load": r.load_cpu.to_json(),
        "bench_cpu_pct": round(r.bench_cpu.total_pct, 1),
    })
}

/// Scenario 3.
async fn dead_subscriber(a: &Args) -> Result<Report, String> {
    let healthy = fanout_run(a, false).await?;
    let dead = fanout_run(a, true).await?;
    let ratio_of = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    let r50 = ratio_of(dead.nine.p50, healthy.nine.p50);
    let r99 = ratio_of(dead.nine.p99, healthy.nine.p99);
    let fmt_ratio = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.2}×"));
    let min_recv = |r: &FanoutRun| r.received[..FANOUT - 1].iter().copied().min().unwrap_or(0);
    let mut t = Table::new(&[
        "nine healthy receivers",
        "all ten healthy",
        "one of ten dead",
        "dead / healthy",
    ]);
    t.row(vec![
        "Patients created (201) / sent".into(),
        format!(
            "{} / {}",
            thousands(healthy.created.ok),
            thousands(healthy.created.sent)
        ),
        format!(
            "{} / {}",
            thousands(dead.created.ok),
            thousands(dead.created.sent)
        ),
        String::new(),
    ]);
    t.row(vec![
        "create rate achieved".into(),
        format!("{:.0}/s", healthy.created.rate()),
        format!("{:.0}/s", dead.created.rate()),
        String::new(),
    ]);
    let create_p99 = |r: &FanoutRun| ms(Latency::of(r.created.latencies_ms.clone()).p99);
    t.row(vec![
        "create latency from schedule p99".into(),
        create_p99(&healthy),
        create_p99(&dead),
        String::new(),
    ]);
    t.row(vec![
        "received / expected (worst of the nine)".into(),
        ratio(min_recv(&healthy), healthy.created.ok),
        ratio(min_recv(&dead), dead.created.ok),
        String::new(),
    ]);
    t.row(vec![
        "duplicate receipts (all healthy receivers)".into(),
        thousands(healthy.duplicates),
        thousands(dead.duplicates),
        String::new(),
    ]);
    let rate_cell = |r: &FanoutRun| r.nine_rate.map_or("-".into(), |x| format!("{x:.0}/s"));
    t.row(vec![
        "deliveries/s to the nine (load start → their last receipt)".into(),
        rate_cell(&healthy),
        rate_cell(&dead),
        String::new(),
    ]);
    t.row(vec![
        "commit-to-receipt p50".into(),
        ms(healthy.nine.p50),
        ms(dead.nine.p50),
        fmt_ratio(r50),
    ]);
    t.row(vec![
        "commit-to-receipt p90".into(),
        ms(healthy.nine.p90),
        ms(dead.nine.p90),
        fmt_ratio(ratio_of(dead.nine.p90, healthy.nine.p90)),
    ]);
    t.row(vec![
        "**commit-to-receipt p99**".into(),
        format!("**{}**", ms(healthy.nine.p99)),
        format!("**{}**", ms(dead.nine.p99)),
        format!(
            "**{}** (target ≤ 1.20×: {})",
            fmt_ratio(r99),
            match r99 {
                Some(r) if r <= 1.2 => "PASS",
                Some(_) => "FAIL",
                None => "n/a",
            }
        ),
    ]);
    t.row(vec![
        "commit-to-receipt max".into(),
        ms(healthy.nine.max),
        ms(dead.nine.max),
        String::new(),
    ]);
    t.row(vec![
        "last receipt after the load ended (drain)".into(),
        format!("{} ({:?})", ms(healthy.tail_ms), healthy.drained),
        format!("{} ({:?})", ms(dead.tail_ms), dead.drained),
        String::new(),
    ]);
    let backlog_cell = |x: &Option<(Backlog, Backlog)>| {
        x.map_or("-".into(), |(n, t)| {
            format!("nine: {}; tenth: {}", n.describe(), t.describe())
        })
    };
    t.row(vec![
        "backlog when the load ended (/metrics)".into(),
        backlog_cell(&healthy.at_load_end),
        backlog_cell(&dead.at_load_end),
        String::new(),
    ]);
    t.row(vec![
        "backlog at the end (/metrics)".into(),
        backlog_cell(&healthy.at_end),
        backlog_cell(&dead.at_end),
        String::new(),
    ]);
    t.row(vec![
        "dead receiver: connections / requests seen".into(),
        "-".into(),
        dead.dead_counts
            .map_or("-".into(), |(c, q)| format!("{c} / {q}")),
        String::new(),
    ]);
    t.row(vec![
        "hub CPU during the load; machine".into(),
        format!(
            "{}; machine {}",
            healthy.load_cpu.describe(),
            healthy.load_cpu.machine()
        ),
        format!(
            "{}; machine {}",
            dead.load_cpu.describe(),
            dead.load_cpu.machine()
        ),
        String::new(),
    ]);
    t.row(vec![
        "hub CPU, load + drain".into(),
        healthy.hub_cpu.describe(),
        dead.hub_cpu.describe(),
        String::new(),
    ]);
    t.row(vec![
        "bench CPU".into(),
        format!("{:.0}%", healthy.bench_cpu.total_pct),
        format!("{:.0}%", dead.bench_cpu.total_pct),
        String::new(),
    ]);
    t.row(vec![
        "hub log".into(),
        healthy.log.clone(),
        dead.log.clone(),
        String::new(),
    ]);
    t.row(vec![
        "machine CPU busy (every process)".into(),
        healthy.hub_cpu.machine(),
        dead.hub_cpu.machine(),
        String::new(),
    ]);
    let mut notes = vec![format!(
        "each run: a fresh hub with --delivery-timeout 1, ten subscriptions (criteria Patient), Patients created open-loop at {:.0}/s for {} s = {} deliveries/s offered in total; latency merged over the nine receivers that are healthy in both runs",
        a.rate,
        a.load_duration().as_secs(),
        thousands((a.rate as u64) * FANOUT as u64)
    )];
    for (label, r) in [("all ten healthy", &healthy), ("one of ten dead", &dead)] {
        if r.drained != Drain::Complete {
            notes.push(format!(
                "{label}: the wait for deliveries ended before every one arrived ({:?}); the percentiles cover only the deliveries received, so the real tail is worse",
                r.drained
            ));
        }
    }
    let j = json!({
        "rate": a.rate, "duration_s": a.load_duration().as_secs(), "subscriptions": FANOUT,
        "healthy": fanout_json(&healthy), "one_dead": fanout_json(&dead),
        "p50_ratio": r50.map(|r| round(r, 3)), "p99_ratio": r99.map(|r| round(r, 3)),
        "target_p99_ratio": 1.2, "pass": r99.map(|r| r <= 1.2),
    });
    Ok(Report {
        title: format!(
            "3. One dead subscriber of ten ({} events/s, {} s, hub --delivery-timeout 1)",
            thousands(a.rate as u64),
            a.load_duration().as_secs()
        ),
        table: t,
        notes,
        json: j,
    })
}
