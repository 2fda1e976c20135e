//! `cargo xtask bench --only postgres`: the create, booking and free-slot search benchmarks on the embedded
//! store, on PostgreSQL with one hub process, and on PostgreSQL with two hub processes sharing the database
//! (the client load split between them), all in the same run against a throwaway cluster. Writes
//! `target/bench/results-postgres.md`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::bench::{TempDir, json_field, progress};

/// Target of the issue: PostgreSQL booking rate as a share of the embedded store's.
const PG_SHARE_TARGET: f64 = 0.6;

struct Hub(Child);

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..200 {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `carebridge serve` with `extra` arguments; returns it and its FHIR base URL.
fn start(bin: &Path, data_dir: &Path, extra: &[String]) -> Result<(Hub, String), String> {
    let mut child = Command::new(bin)
        .args(["serve", "--http", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("CAREBRIDGE_AUTH", "none")
        .env_remove("CAREBRIDGE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting carebridge: {e}"))?;
    let out = child.stdout.take();
    let hub = Hub(child);
    let (tx, rx) = mpsc::channel();
    if let Some(out) = out {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let t0 = Instant::now();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30).saturating_sub(t0.elapsed()))
            .map_err(|_| "carebridge printed no `listening on http://` line".to_string())?;
        if let Some(addr) = line
            .split("listening on http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        {
            return Ok((hub, format!("http://{addr}/fhir")));
        }
    }
}

fn psql() -> Option<PathBuf> {
    if Command::new("psql")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some(PathBuf::from("psql"));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin/psql")))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// A fresh, migrated database on the cluster; returns its URL.
fn database(carebridge: &Path, server_url: &str, name: &str) -> Result<String, String> {
    let psql = psql().ok_or("psql not found")?;
    let ok = Command::new(&psql)
        .args([server_url, "-q", "-c", &format!("CREATE DATABASE {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        return Err(format!("CREATE DATABASE {name} failed"));
    }
    let url = match server_url.split_once("/postgres") {
        Some((head, tail)) => format!("{head}/{name}{tail}"),
        None => return Err(format!("unexpected server URL {server_url}")),
    };
    let ok = Command::new(carebridge)
        .args(["migrate", "--database-url", &url])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Ok(url)
    } else {
        Err("carebridge migrate failed".into())
    }
}

/// Run `cb-loadgen` on each URL at once (concurrency split between them, `extra` arguments added); returns
/// the summed rate of `rate_key` and the worst p99 (µs) of the JSON lines of `scenario`.
#[expect(
    clippy::too_many_arguments,
    reason = "one call per benchmark row, each naming every setting"
)]
fn load(
    loadgen: &Path,
    urls: &[String],
    scenario: &str,
    total_c: u32,
    duration: &str,
    nhs_base: u64,
    rate_key: &str,
    extra: &[String],
) -> Result<(f64, f64), String> {
    let per = (total_c / urls.len() as u32).max(1);
    let handles: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let mut cmd = Command::new(loadgen);
            cmd.args([
                "--url",
                url,
                "--json",
                "--scenario",
                scenario,
                "--concurrency",
                &per.to_string(),
                "--duration",
                duration,
                "--warmup",
                "2s",
                "--patients",
                "200",
            ])
            .args(["--nhs-start", &(nhs_base + i as u64 * 90_000).to_string()])
            .args(extra)
            .stdin(Stdio::null());
            std::thread::spawn(move || cmd.output())
        })
        .collect();
    let (mut rate, mut p99) = (0f64, 0f64);
    for h in handles {
        let out = h
            .join()
            .map_err(|_| "loadgen thread panicked".to_string())?
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .filter(|l| l.starts_with('{'))
            .find(|l| json_field(l, "scenario").is_some_and(|s| s.trim_matches('"') == scenario))
            .ok_or_else(|| {
                format!(
                    "cb-loadgen gave no {scenario} result: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })?
            .to_string();
        rate += json_field(&line, rate_key)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        p99 = p99.max(
            json_field(&line, "p99_us")
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0),
        );
    }
    Ok((rate, p99))
}

pub fn run(root: &Path, target: &Path, quick: bool) -> Result<String, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(&cargo)
        .current_dir(root)
        .args(["build", "--release", "-p", "carebridge", "-p", "loadgen"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("the release build failed".into());
    }
    let rel = target.join("release");
    let (carebridge, loadgen) = (rel.join("carebridge"), rel.join("cb-loadgen"));
    progress("starting a throwaway PostgreSQL cluster");
    let cluster = crate::pg::ensure_cluster()?;
    let tmp = TempDir::create()?;
    let duration = if quick { "4s" } else { "10s" };
    // Slots of each `free-slots` loadgen's schedule (each process's loadgen makes its own).
    let free_slots = if quick { 10_000 } else { 50_000 };
    let c = 32;
    let mut rows = Vec::new();
    let setups: [(&str, usize); 3] = [
        ("embedded store (SQLite), 1 process", 0),
        ("PostgreSQL, 1 process", 1),
        ("PostgreSQL, 2 processes", 2),
    ];
    for (n, (name, procs)) in setups.iter().enumerate() {
        let mut hubs = Vec::new();
        let mut urls = Vec::new();
        if *procs == 0 {
            let (h, u) = start(&carebridge, &tmp.0.join("sqlite"), &[])?;
            hubs.push(h);
            urls.push(u);
        } else {
            let db = database(&carebridge, &cluster.url, &format!("cb_bench_{n}"))?;
            for p in 0..*procs {
                let (h, u) = start(
                    &carebridge,
                    &tmp.0.join(format!("pg{n}-{p}")),
                    &["--database-url".to_string(), db.clone()],
                )?;
                hubs.push(h);
                urls.push(u);
            }
        }
        progress(&format!("{name}: create c={c}"));
        let create = load(
            &loadgen,
            &urls,
            "create",
            c,
            duration,
            (n as u64 * 10 + 1) * 90_000,
            "ok_per_s",
            &[],
        )?;
        progress(&format!("{name}: book c={c}"));
        let book = load(
            &loadgen,
            &urls,
            "book",
            c,
            duration,
            (n as u64 * 10 + 5) * 90_000,
            "bookings_per_s",
            &[],
        )?;
        progress(&format!("{name}: free-slots c={c}"));
        let free = load(
            &loadgen,
            &urls,
            "free-slots",
            c,
            duration,
            (n as u64 * 10 + 8) * 90_000,
            "ok_per_s",
            &["--slots".to_string(), free_slots.to_string()],
        )?;
        rows.push((name.to_string(), create, book, free));
        drop(hubs);
    }
    drop(cluster);
    let mut md = String::new();
    let _ = writeln!(md, "## PostgreSQL and two processes\n");
    let _ = writeln!(
        md,
        "`cb-loadgen` at C={c} in total ({duration} per run after a 2 s warm-up); with two processes the connections are split between them (two loadgen processes). PostgreSQL 15 from Debian, a throwaway cluster on this machine (Unix socket, fsync on), one fresh database per setup. Everything shares the machine's 2 cores. Free-slot searches: one day's free slots of a schedule of {free_slots} 15-minute slots (`Slot?schedule=..&status=free&start=ge{{day}}&start=lt{{next day}}`), a random day per search; with two processes each loadgen searches a schedule of its own.\n"
    );
    let _ = writeln!(
        md,
        "| setup | creates/s | create p99 | bookings/s | book p99 | free-slot searches/s | search p99 |\n|---|---|---|---|---|---|---|"
    );
    for (name, (cr, cp), (br, bp), (fr, fp)) in &rows {
        let _ = writeln!(
            md,
            "| {name} | {cr:.0} | {:.1} ms | {br:.0} | {:.1} ms | {fr:.0} | {:.1} ms |",
            cp / 1000.0,
            bp / 1000.0,
            fp / 1000.0
        );
    }
    let sqlite_book = rows.first().map(|r| r.2.0).unwrap_or(f64::NAN);
    let pg1 = rows.get(1).map(|r| r.2.0).unwrap_or(f64::NAN);
    let pg2 = rows.get(2).map(|r| r.2.0).unwrap_or(f64::NAN);
    let _ = writeln!(
        md,
        "\nTargets: PostgreSQL at least {:.0}% of the embedded store's booking rate: **{}** ({:.0}%); two processes faster than one: **{}** ({:.2}x).\n",
        PG_SHARE_TARGET * 100.0,
        if pg1 / sqlite_book >= PG_SHARE_TARGET {
            "met"
        } else {
            "missed"
        },
        pg1 / sqlite_book * 100.0,
        if pg2 > pg1 { "met" } else { "missed" },
        pg2 / pg1
    );
    Ok(md)
}
