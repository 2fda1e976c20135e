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

  --hub-bin PATH        the carebridge binary to start (e.g. target/release/carebridge)
  --quick               short runs: 3 s of load, 3,000 events replayed
  --json                also print one JSON line per scenario
  --scenarios LIST      comma-separated subset of: latency, throughput, dead-subscriber (or 1,2,3) [default: all]
  --durability MODE     passed to the hub as --durability [default: the hub's own, fsync]
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
        "machine: nproc {}, load average {} (uptime, before the run); hub: {}; durability: {}; mode: {}\n",
        machine.nproc,
        machine.load,
        a.hub_bin.display(),
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

fn cpu_rows(table: &mut Table, hub: &CpuUsage, bench: &CpuUsage) {
    table.row(vec!["hub CPU".into(), hub.describe()]);
    table.row(vec![
        "bench CPU (load + receivers)".into(),
        format!("{:.0}% of one core", bench.total_pct),
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

/// Backlog from `/metrics`: (pending deliveries, oldest pending age in s, failed attempts, dead letters).
fn backlog(metrics: &str, sub: Option<&str>) -> (f64, f64, f64, f64) {
    let labels_state = |state: &'static str| -> Vec<(&str, &str)> {
        let mut v = vec![("state", state)];
        if let Some(s) = sub {
            v.push(("subscription", s));
        }
        v
    };
    let sub_only: Vec<(&str, &str)> = sub.map(|s| vec![("subscription", s)]).unwrap_or_default();
    let lag = metrics
        .lines()
        .filter(|l| l.starts_with("carebridge_delivery_lag_seconds{"))
        .filter(|l| sub.is_none_or(|s| l.contains(&format!("subscription=\"{s}\""))))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .fold(0.0, f64::max);
    let mut failed_labels = sub_only.clone();
    failed_labels.push(("result", "failed"));
    (
        load::metric_sum(metrics, "carebridge_deliveries", &labels_state("pending")),
        lag,
        load::metric_sum(
            metrics,
            "carebridge_delivery_attempts_total",
            &failed_labels,
        ),
        load::metric_sum(metrics, "carebridge_deliveries", &labels_state("dead")),
    )
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
        let (pending, lag, _, _) = backlog(m, None);
        t.row(vec![
            "backlog when the load ended (/metrics)".into(),
            format!(
                "{} pending, oldest {:.2} s (scrape {} ms)",
                pending,
                lag,
                took.as_millis()
            ),
        ]);
        j["pending_at_load_end"] = json!(pending);
        j["oldest_pending_at_load_end_s"] = json!(lag);
    }
    if let Ok((m, _)) = &end_metrics {
        let (pending, _, failed, dead) = backlog(m, None);
        t.row(vec![
            "at the end (/metrics)".into(),
            format!("{pending} pending, {failed} failed attempts, {dead} dead letters"),
        ]);
    }
    cpu_rows(&mut t, &hub_cpu, &bench_cpu);
    if rec.unparsable > 0 {
        notes.push(format!(
            "{} requests had no readable id/time",
            rec.unparsable
        ));
    }
    Ok(Report {
        title: format!(
            "1. Commit-to-receipt latency at {:.0} events/s ({} s)",
            a.rate,
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
    if let Ok((m, took)) = &end_metrics {
        let (pending, _, failed, dead) = backlog(m, None);
        t.row(vec![
            "at the end (/metrics)".into(),
            format!(
                "{pending} pending, {failed} failed attempts, {dead} dead letters (scrape {} ms)",
                took.as_millis()
            ),
        ]);
    }
    cpu_rows(&mut t, &hub_cpu, &bench_cpu);
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
    });
    Ok(Report {
        title: format!(
            "2. Deliveries/s to one fast receiver ($replay of {} events)",
            thousands(n)
        ),
        table: t,
        notes: Vec::new(),
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
    /// Dead receiver: (connections, requests seen).
    dead_counts: Option<(u64, u64)>,
    /// Backlog at the end of the load and at the end: (pending, oldest age s, failed, dead) of the healthy
    /// nine and of the tenth subscription.
    at_load_end: Option<((f64, f64, f64, f64), (f64, f64, f64, f64))>,
    at_end: Option<((f64, f64, f64, f64), (f64, f64, f64, f64))>,
    hub_cpu: CpuUsage,
    bench_cpu: CpuUsage,
}

fn split_backlog(m: &str, subs: &[String]) -> ((f64, f64, f64, f64), (f64, f64, f64, f64)) {
    let mut nine = (0.0, 0.0, 0.0, 0.0);
    for s in &subs[..subs.len() - 1] {
        let b = backlog(m, Some(s));
        nine = (
            nine.0 + b.0,
            f64::max(nine.1, b.1),
            nine.2 + b.2,
            nine.3 + b.3,
        );
    }
    let tenth = subs
        .last()
        .map_or((0.0, 0.0, 0.0, 0.0), |s| backlog(m, Some(s)));
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
    Ok(FanoutRun {
        nine: Latency::of(nine),
        received: snaps.iter().map(|s| s.distinct()).collect(),
        duplicates: snaps.iter().map(|s| s.duplicates).sum(),
        drained,
        tail_ms: last.map(|l| l.saturating_duration_since(load_end).as_secs_f64() * 1000.0),
        dead_counts: dead_rx.as_ref().map(DeadReceiver::counts),
        at_load_end,
        at_end,
        hub_cpu: cpu0.usage(&cpu1),
        bench_cpu: self0.usage(&self1),
        created,
    })
}

fn fanout_json(r: &FanoutRun) -> serde_json::Value {
    let b = |x: Option<((f64, f64, f64, f64), (f64, f64, f64, f64))>| {
        x.map(|(n, t)| json!({
            "nine": {"pending": n.0, "oldest_pending_s": n.1, "failed_attempts": n.2, "dead": n.3},
            "tenth": {"pending": t.0, "oldest_pending_s": t.1, "failed_attempts": t.2, "dead": t.3},
        }))
    };
    json!({
        "created": created_json(&r.created), "nine_latency": r.nine.to_json(),
        "received_per_healthy_receiver": r.received, "expected_per_receiver": r.created.ok,
        "duplicates": r.duplicates, "drain": format!("{:?}", r.drained),
        "last_receipt_after_load_ms": r.tail_ms.map(|x| round(x, 1)),
        "dead_receiver": r.dead_counts.map(|(c, q)| json!({"connections": c, "requests": q})),
        "backlog_at_load_end": b(r.at_load_end), "backlog_at_end": b(r.at_end),
        "hub_cpu": r.hub_cpu.to_json(), "bench_cpu_pct": round(r.bench_cpu.total_pct, 1),
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
    t.row(vec![
        "received / expected (worst of the nine)".into(),
        ratio(min_recv(&healthy), healthy.created.ok),
        ratio(min_recv(&dead), dead.created.ok),
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
    let backlog_cell = |x: &Option<((f64, f64, f64, f64), (f64, f64, f64, f64))>| {
        x.map_or("-".into(), |(n, t)| {
            format!(
                "nine: {} pending (oldest {:.1} s); tenth: {} pending, {} failed attempts, {} dead",
                n.0, n.1, t.0, t.2, t.3
            )
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
        "hub CPU".into(),
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
    let notes = vec![format!(
        "each run: a fresh hub with --delivery-timeout 1, ten subscriptions (criteria Patient), Patients created open-loop at {:.0}/s for {} s = {} deliveries/s offered in total; latency merged over the nine receivers that are healthy in both runs",
        a.rate,
        a.load_duration().as_secs(),
        thousands((a.rate as u64) * FANOUT as u64)
    )];
    let j = json!({
        "rate": a.rate, "duration_s": a.load_duration().as_secs(), "subscriptions": FANOUT,
        "healthy": fanout_json(&healthy), "one_dead": fanout_json(&dead),
        "p50_ratio": r50.map(|r| round(r, 3)), "p99_ratio": r99.map(|r| round(r, 3)),
        "target_p99_ratio": 1.2, "pass": r99.map(|r| r <= 1.2),
    });
    Ok(Report {
        title: format!(
            "3. One dead subscriber of ten ({:.0} events/s, {} s, hub --delivery-timeout 1)",
            a.rate,
            a.load_duration().as_secs()
        ),
        table: t,
        notes,
        json: j,
    })
}
