//! `cargo xtask bench --only hl7`: HL7 v2 parse throughput beside python-hl7 and hl7apy, and MLLP ingest with
//! durable ACKs over 4 connections, beside a python-hl7 MLLP server that only acknowledges (the transport
//! ceiling of a peer that stores nothing).
//!
//! Messages parsed: the corpus (`../shared/corpus/hl7v2`) when present, else the repo's own fixtures. Writes
//! Markdown to stdout and `target/bench/results-hl7.md`.

use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bench::{TempDir, free_port, json_field, progress};

/// Ingest target of the HL7 issue (messages/s over 4 connections).
const INGEST_TARGET: f64 = 5_000.0;
/// Parse target: times python-hl7.
const PARSE_TARGET_RATIO: f64 = 50.0;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16, timeout: Duration) -> Result<(), String> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing listens on port {port} after {timeout:?}"))
}

fn venv(target: &Path) -> Result<PathBuf, String> {
    let venv = target.join("bench-hl7-venv");
    let python = venv.join("bin/python");
    let have = Command::new(&python)
        .args(["-c", "import hl7, hl7apy"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Ok(python);
    }
    progress("creating target/bench-hl7-venv (hl7==0.4.5, hl7apy==1.3.5)");
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("`python3 -m venv` failed".into());
    }
    let ok = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "hl7==0.4.5",
            "hl7apy==1.3.5",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(python)
    } else {
        Err("pip install hl7 hl7apy failed".into())
    }
}

fn json_lines(cmd: &mut Command) -> Result<Vec<String>, String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(str::to_owned)
        .collect())
}

fn num(line: &str, key: &str) -> f64 {
    json_field(line, key)
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or(f64::NAN)
}

pub fn run(root: &Path, target: &Path, quick: bool) -> Result<String, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    progress("building carebridge, cb-mllp-bench and the hl7 parse benchmark (release)");
    let ok = Command::new(&cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "carebridge",
            "-p",
            "loadgen",
            "-p",
            "hl7",
            "--bins",
            "--example",
            "parse_bench",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("the release build failed".into());
    }
    let rel = target.join("release");
    let mut md = String::new();
    let _ = writeln!(md, "## HL7 v2\n");

    // 1. Parse throughput.
    let corpus = root.join("../shared/corpus/hl7v2");
    let inputs: Vec<PathBuf> = if corpus.is_dir() {
        vec![corpus.clone()]
    } else {
        vec![
            root.join("tests/python/hl7"),
            root.join("crates/hl7/tests/fixtures"),
        ]
    };
    let source = if corpus.is_dir() {
        "the corpus (`shared/corpus/hl7v2`)"
    } else {
        "the repo's fixtures (corpus absent)"
    };
    let iterations = if quick { 200 } else { 2_000 };
    let rust = json_lines(
        Command::new(rel.join("examples/parse_bench"))
            .args(&inputs)
            .args(["--iterations", &iterations.to_string()]),
    )?;
    let python = venv(target)?;
    let peers = json_lines(
        Command::new(&python)
            .arg(root.join("bench/hl7_parse_peers.py"))
            .args(&inputs)
            .args(["--iterations", &(iterations / 20).max(5).to_string()]),
    )?;
    let _ = writeln!(
        md,
        "Parse: every message of {source}, parsed and MSH-9, MSH-10, PID-3, PID-5 read, repeated; one process each, same machine, same run.\n"
    );
    let _ = writeln!(
        md,
        "| parser | messages parsed | msgs/s | vs python-hl7 |\n|---|---|---|---|"
    );
    let hl7py = peers
        .iter()
        .find(|l| json_field(l, "impl").is_some_and(|v| v.contains("python-hl7")))
        .map(|l| num(l, "msgs_per_s"))
        .unwrap_or(f64::NAN);
    for l in rust.iter().chain(peers.iter()) {
        let rate = num(l, "msgs_per_s");
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.2}x |",
            json_field(l, "impl").unwrap_or("?").trim_matches('"'),
            num(l, "messages"),
            rate,
            rate / hl7py
        );
    }
    let ours = rust
        .first()
        .map(|l| num(l, "msgs_per_s"))
        .unwrap_or(f64::NAN);
    let _ = writeln!(
        md,
        "\nTarget: at least {PARSE_TARGET_RATIO:.0}x python-hl7: **{}** ({:.1}x).\n",
        if ours / hl7py >= PARSE_TARGET_RATIO {
            "met"
        } else {
            "missed"
        },
        ours / hl7py
    );

    // 2. MLLP ingest with durable ACKs.
    let messages = if quick { "4000" } else { "20000" };
    let tmp = TempDir::create()?;
    let port = free_port()?;
    let log = fs::File::create(tmp.0.join("carebridge.log")).map_err(|e| e.to_string())?;
    let hub = Killed(
        Command::new(rel.join("carebridge"))
            .args([
                "serve",
                "--http",
                "127.0.0.1:0",
                "--mllp",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(tmp.0.join("data"))
            .env("CAREBRIDGE_AUTH", "none")
            .env_remove("CAREBRIDGE_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting carebridge: {e}"))?,
    );
    wait_port(port, Duration::from_secs(30))?;
    let mut runs = Vec::new();
    for (kind, window) in [("a28", "1"), ("siu", "1"), ("a28", "8")] {
        progress(&format!(
            "MLLP ingest: {kind}, 4 connections, window {window}"
        ));
        let lines = json_lines(Command::new(rel.join("cb-mllp-bench")).args([
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--connections",
            "4",
            "--messages",
            messages,
            "--kind",
            kind,
            "--window",
            window,
        ]))?;
        runs.push((
            "carebridge (fsync, every message committed before its ACK)",
            lines,
        ));
    }
    drop(hub);
    // The peer: python-hl7's asyncio MLLP server, acknowledging without storing anything.
    let peer_port = free_port()?;
    let script = format!(
        "import asyncio, hl7\nfrom hl7.mllp import start_hl7_server\nasync def h(r, w):\n    try:\n        while not w.is_closing():\n            m = await r.readmessage()\n            w.writemessage(m.create_ack()); await w.drain()\n    except asyncio.IncompleteReadError: pass\n    finally: w.close()\nasync def main():\n    s = await start_hl7_server(h, host='127.0.0.1', port={peer_port}, encoding='utf-8')\n    async with s: await s.serve_forever()\nasyncio.run(main())\n"
    );
    let peer = Killed(
        Command::new(&python)
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the python-hl7 server: {e}"))?,
    );
    wait_port(peer_port, Duration::from_secs(30))?;
    let lines = json_lines(Command::new(rel.join("cb-mllp-bench")).args([
        "--addr",
        &format!("127.0.0.1:{peer_port}"),
        "--connections",
        "4",
        "--messages",
        messages,
        "--kind",
        "a28",
        "--window",
        "1",
    ]))?;
    runs.push((
        "python-hl7 asyncio server (ACK only, stores nothing)",
        lines,
    ));
    drop(peer);
    let _ = writeln!(
        md,
        "MLLP ingest: `cb-mllp-bench`, 4 connections, {messages} distinct messages (a28: a new patient each; siu: an S12 booking each, creating its practitioner, schedule and slot), after a 500-message warm-up. Window 1 = send, wait for the ACK, send the next (what most engines do); window 8 = 8 in flight per connection.\n"
    );
    let _ = writeln!(
        md,
        "| server | kind | window | msgs/s | ACK p50 | ACK p99 | not AA/CA |\n|---|---|---|---|---|---|---|"
    );
    // Judged at window 1, what MLLP release 2 asks of a sender (wait for each ACK); sending ahead is reported
    // beside it.
    let (mut best, mut ahead) = (0f64, 0f64);
    for (name, lines) in &runs {
        for l in lines {
            let rate = num(l, "msgs_per_s");
            let a28 = json_field(l, "kind").map(|k| k.trim_matches('"')) == Some("a28");
            if name.starts_with("carebridge") && json_field(l, "window") == Some("1") {
                best = best.max(rate);
            } else if name.starts_with("carebridge") && a28 {
                ahead = ahead.max(rate);
            }
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {rate:.0} | {:.2} ms | {:.2} ms | {} |",
                json_field(l, "kind").unwrap_or("?").trim_matches('"'),
                json_field(l, "window").unwrap_or("?"),
                num(l, "p50_us") / 1000.0,
                num(l, "p99_us") / 1000.0,
                json_field(l, "not_accepted").unwrap_or("?"),
            );
        }
    }
    let _ = writeln!(
        md,
        "\nTarget: at least {INGEST_TARGET:.0} messages/s with durable ACKs over 4 connections: **{}** (best carebridge run at window 1: {best:.0}/s; A28 sent ahead, window 8: {ahead:.0}/s).\n",
        if best >= INGEST_TARGET {
            "met"
        } else {
            "missed"
        }
    );
    Ok(md)
}
