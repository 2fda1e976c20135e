//! `cargo xtask bench [--quick] [--hfs PATH] [--only booking]`: throughput, latency, start-up time, memory and
//! validation speed of Carebridge, measured side by side with the Helios FHIR Server (HFS) peer when it is
//! available, and the throughput and correctness of Carebridge's booking engine (no peer has one).
//!
//! Why it exists: performance claims need one reproducible command that measures both servers with the same
//! client in the same run, and prints the conditions (machine, durability, validation) next to the numbers.
//!
//! How: builds `carebridge` and `loadgen` in release, starts each server on a free loopback port with throw-away
//! data, drives it with `cb-loadgen` (runs interleaved server by server, so machine noise hits both), times
//! `fhir::validate_json` with `cb-validate-bench` against Python's fhir.resources on the same Patient, and writes
//! Markdown to stdout and `target/bench/results.md`. The HFS binary comes from `--hfs`, `$HFS_BIN` or `hfs` on
//! PATH; without it (or without its search-parameter bundle) the peer is skipped with the reason printed.
//! Booking (`cb-loadgen --scenario book`, `contention` and `free-slots`) runs last, on a fresh Carebridge of its own;
//! `--only booking` runs just that part (and writes `target/bench/results-booking.md`).
//!
//! Invariants: std only (xtask must build in seconds); every server it starts is stopped by pid, and its
//! temporary directory removed, on success and on error; nothing outside `target/` and the temp dir is written.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CONCURRENCY: [u32; 3] = [1, 8, 32];
/// Concurrency of the `contention` run (and the one the booking targets are judged at).
const BOOKING_TARGET_C: u32 = 32;
/// Booking targets: `book` bookings/s and p99 (ms) at C=32; `contention` bookings/s as a share of `book`'s.
const BOOK_TARGET_PER_S: f64 = 3_000.0;
const BOOK_TARGET_P99_MS: f64 = 25.0;
const CONTENTION_TARGET_SHARE: f64 = 0.5;
/// Patients each booking run creates for its bookings.
const BOOKING_PATIENTS: u32 = 200;
/// Stems of NHS numbers reserved per booking run (each creates `BOOKING_PATIENTS` patients).
const BOOKING_NHS_BLOCK: u64 = 10_000;
/// Slots the `contention` connections race for.
const CONTENTION_SLOTS: u32 = 100;
const SCENARIOS: [&str; 3] = ["create", "read", "search-identifier"];
/// Stems of NHS numbers reserved per cb-loadgen invocation that creates patients on one server (see
/// `loadgen::patient`; the range has 1,000,000 stems): the seeding and the three create runs. A 12-second
/// create run at 8,300/s uses about 110,000 stems, more than the 90,000 blocks used before.
const NHS_BLOCK: u64 = 250_000;

/// How much to measure.
struct Settings {
    quick: bool,
    duration: &'static str,
    warmup: &'static str,
    seed: u64,
    startup_samples: usize,
    validate_iterations: u64,
    python_iterations: u64,
    /// Concurrency levels of the `book` scenario.
    book_concurrency: &'static [u32],
    /// `--only booking`: nothing but the booking runs.
    only_booking: bool,
}

impl Settings {
    fn new(quick: bool) -> Settings {
        if quick {
            Settings {
                quick,
                duration: "1500ms",
                warmup: "300ms",
                seed: 500,
                startup_samples: 2,
                validate_iterations: 2_000,
                python_iterations: 300,
                book_concurrency: &[BOOKING_TARGET_C],
                only_booking: false,
            }
        } else {
            Settings {
                quick,
                duration: "10s",
                warmup: "2s",
                seed: 10_000,
                startup_samples: 5,
                validate_iterations: 50_000,
                python_iterations: 5_000,
                book_concurrency: &CONCURRENCY,
                only_booking: false,
            }
        }
    }
}

/// Entry point of `cargo xtask bench [args]`.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut quick = false;
    let mut hfs_arg = None;
    let mut only_booking = false;
    let mut only_hl7 = false;
    let mut only_pg = false;
    let mut only_mesh = false;
    let mut only_auth = false;
    let mut only_validation = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--only" => match it.next().map(String::as_str) {
                Some("booking") => only_booking = true,
                Some("hl7") => only_hl7 = true,
                Some("postgres") => only_pg = true,
                Some("mesh") => only_mesh = true,
                Some("auth") => only_auth = true,
                Some("validation") => only_validation = true,
                other => {
                    return Err(format!(
                        "bench: --only takes `auth`, `booking`, `hl7`, `mesh`, `postgres` or `validation` (the parts that run alone), got {}",
                        other.unwrap_or("nothing")
                    ));
                }
            },
            "--hfs" => {
                hfs_arg = Some(PathBuf::from(
                    it.next().ok_or("--hfs needs the path of the hfs binary")?,
                ))
            }
            "-h" | "--help" => {
                println!(
                    "usage: cargo xtask bench [--quick] [--hfs PATH_TO_HFS_BINARY] [--only auth|booking|hl7|mesh|postgres|validation]   (or HFS_BIN=PATH)\n\
                     \n  --quick          short runs (a smoke test, not for comparison)\
                     \n  --hfs PATH       the Helios FHIR Server binary of the peer (default: $HFS_BIN, then `hfs` on PATH)\
                     \n  --only auth      reads and identifier searches with authentication on beside off, written to target/bench/results-auth.md\
                     \n  --only booking   only the booking runs (Carebridge alone), written to target/bench/results-booking.md\
                     \n  --only hl7       only the HL7 v2 parse and MLLP ingest runs, written to target/bench/results-hl7.md\
                     \n  --only postgres  creates, bookings and free-slot searches on SQLite, PostgreSQL and two PostgreSQL processes, written to target/bench/results-postgres.md\
                     \n  --only mesh      1,000-message MESH round trip through mesh-sandbox beside mesh-client, written to target/bench/results-mesh.md\
                     \n  --only validation  in-process validation of the benchmark Patient beside fhir.resources, written to target/bench/results-validation.md"
                );
                return Ok(());
            }
            other => return Err(format!("bench: unknown argument {other:?} (try --help)")),
        }
    }
    let mut s = Settings::new(quick);
    s.only_booking = only_booking;
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let out_dir = target.join("bench");
    fs::create_dir_all(&out_dir).map_err(|e| format!("creating {}: {e}", out_dir.display()))?;
    let mut report = Report::header(args, &s);

    progress("building carebridge and loadgen (release)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--release", "-p", "carebridge", "-p", "loadgen"])
        .status()
        .map_err(|e| format!("running {cargo}: {e}"))?;
    if !status.success() {
        return Err("bench: `cargo build --release -p carebridge -p loadgen` failed".into());
    }
    let bin = |name: &str| target.join("release").join(name);
    let tmp = TempDir::create()?;
    report.data_dir(&tmp.0);

    if only_validation {
        report.validation(&bin("cb-validate-bench"), &root, &target, &tmp.0, &s);
        report.finish();
        return write_report(report, &out_dir.join("results-validation.md"));
    }

    if only_auth {
        match auth_onoff(&bin, &tmp.0, &s) {
            Ok(md) => report.out.push_str(&md),
            Err(e) => report.problem(format!("authentication benchmark: {e}")),
        }
        report.finish();
        return write_report(report, &out_dir.join("results-auth.md"));
    }

    if only_mesh {
        match mesh_roundtrip(&root, &target, quick) {
            Ok(md) => report.out.push_str(&md),
            Err(e) => report.problem(format!("MESH benchmark: {e}")),
        }
        report.finish();
        return write_report(report, &out_dir.join("results-mesh.md"));
    }

    if only_pg {
        match crate::bench_pg::run(&root, &target, quick) {
            Ok(md) => report.out.push_str(&md),
            Err(e) => report.problem(format!("PostgreSQL benchmark: {e}")),
        }
        report.finish();
        return write_report(report, &out_dir.join("results-postgres.md"));
    }

    if only_hl7 {
        match crate::bench_hl7::run(&root, &target, quick) {
            Ok(md) => report.out.push_str(&md),
            Err(e) => report.problem(format!("HL7 benchmark: {e}")),
        }
        report.finish();
        return write_report(report, &out_dir.join("results-hl7.md"));
    }

    if only_booking {
        let booking = run_booking(&bin("carebridge"), &bin("cb-loadgen"), &tmp.0, &s);
        report.booking_tables(&booking, &s);
        report.finish();
        return write_report(report, &out_dir.join("results-booking.md"));
    }

    // 1. Validation throughput (CPU only, before any server runs).
    report.validation(&bin("cb-validate-bench"), &root, &target, &tmp.0, &s);

    // 2. Carebridge start-up on a fresh store.
    let mut startups = Vec::new();
    for i in 0..s.startup_samples {
        let dir = tmp.0.join(format!("startup-{i}"));
        match start_carebridge(&bin("carebridge"), &dir, "fsync", &tmp.0) {
            Ok(st) => startups.push((st.to_listening, st.to_ready)),
            Err(e) => report.problem(format!("carebridge start-up sample {i}: {e}")),
        }
    }

    // 3. Servers under load.
    let hfs = find_hfs(hfs_arg, &root);
    let mut servers: Vec<Target> = Vec::new();
    match start_carebridge(&bin("carebridge"), &tmp.0.join("cb-fsync"), "fsync", &tmp.0) {
        Ok(st) => servers.push(Target::new(
            "Carebridge",
            "fsync (default): fsync per commit",
            false,
            st,
        )),
        Err(e) => return Err(format!("bench: carebridge does not start: {e}")),
    }
    match start_carebridge(&bin("carebridge"), &tmp.0.join("cb-os"), "os", &tmp.0) {
        Ok(st) => servers.push(Target::new(
            "Carebridge os",
            "`--durability os`: no fsync per commit",
            true,
            st,
        )),
        Err(e) => report.problem(format!("carebridge --durability os does not start: {e}")),
    }
    match &hfs {
        Ok(path) => match start_hfs(path, &root, &tmp.0) {
            Ok(st) => {
                let validation =
                    std::env::var("HFS_VALIDATION_MODE").unwrap_or_else(|_| "off (default)".into());
                let durability = format!(
                    "SQLite WAL, synchronous=NORMAL: no fsync per commit; write validation {validation}"
                );
                servers.push(Target::new("HFS", &durability, false, st));
            }
            Err(e) => report.problem(format!("HFS peer skipped: it does not start: {e}")),
        },
        Err(why) => report.problem(format!("HFS peer skipped: {why}")),
    }
    for t in &mut servers {
        t.rss_idle_kb = rss_kb(t.server.pid());
    }
    let loadgen = bin("cb-loadgen");
    for t in servers.iter_mut().filter(|t| !t.create_only) {
        progress(&format!("seeding {} patients into {}", s.seed, t.name));
        let seed_file = tmp.0.join(format!("{}.seed", t.name.replace(' ', "-")));
        let nhs = t.next_nhs_block();
        let args = vec![
            "--seed".into(),
            s.seed.to_string(),
            "--seed-concurrency".into(),
            "32".into(),
            "--save-seed".into(),
            seed_file.display().to_string(),
            "--nhs-start".into(),
            nhs.to_string(),
        ];
        match run_loadgen(&loadgen, &t.url, &args) {
            Ok(runs) => {
                t.seed = runs
                    .into_iter()
                    .next()
                    .ok_or_else(|| "no seed result".to_string());
                t.seed_file = Some(seed_file);
            }
            Err(e) => t.seed = Err(e),
        }
    }
    for scenario in SCENARIOS {
        for c in CONCURRENCY {
            for t in servers.iter_mut() {
                if scenario != "create" && (t.create_only || t.seed_file.is_none()) {
                    continue;
                }
                let mut args = vec![
                    "--scenario".to_string(),
                    scenario.into(),
                    "--concurrency".into(),
                    c.to_string(),
                    "--duration".into(),
                    s.duration.into(),
                    "--warmup".into(),
                    s.warmup.into(),
                ];
                // Only creates take NHS numbers (reads and searches use the seeded patients).
                if scenario == "create" {
                    args.extend(["--nhs-start".to_string(), t.next_nhs_block().to_string()]);
                }
                if let Some(f) = &t.seed_file {
                    args.extend(["--seed-file".to_string(), f.display().to_string()]);
                }
                progress(&format!("{scenario} c={c} against {}", t.name));
                let r = run_loadgen(&loadgen, &t.url, &args)
                    .and_then(|v| v.into_iter().next().ok_or("no result".into()));
                t.runs.push((scenario, c, r));
            }
        }
    }
    for t in &mut servers {
        std::thread::sleep(Duration::from_millis(500));
        t.rss_loaded_kb = rss_kb(t.server.pid());
    }

    // 4. Restart Carebridge on its populated store.
    let mut restart = None;
    if let Some(t) = servers.iter_mut().find(|t| t.name == "Carebridge") {
        t.server.stop();
        match start_carebridge(&bin("carebridge"), &tmp.0.join("cb-fsync"), "fsync", &tmp.0) {
            Ok(st) => restart = Some((st.to_listening, st.to_ready, rss_kb(st.server.pid()))),
            Err(e) => report.problem(format!("carebridge restart on the populated store: {e}")),
        }
    }

    for t in &mut servers {
        t.server.stop();
    }

    // 5. Booking, on a fresh Carebridge of its own (the peer has no booking engine).
    let booking = run_booking(&bin("carebridge"), &loadgen, &tmp.0, &s);

    report.load_tables(&servers, &s);
    report.booking_tables(&booking, &s);
    report.startup_table(&startups, restart, &servers);
    // 6. Webhook delivery, by its own harness (it starts its own hub and receivers).
    let mut delivery = Command::new(bin("cb-delivery-bench"));
    delivery.arg("--hub-bin").arg(bin("carebridge"));
    if s.quick {
        delivery.arg("--quick");
    }
    progress(&format!("running {delivery:?}"));
    match delivery.output() {
        Ok(out) => {
            report
                .out
                .push_str("\n## Webhook delivery (`cb-delivery-bench`)\n\n");
            // Paths relative to the workspace, so the report names no machine's folders.
            let text = String::from_utf8_lossy(&out.stdout)
                .replace(&format!("{}/", workspace_root().display()), "");
            // Its own title line is replaced by the heading above; its sections become subsections.
            for line in text.lines().skip_while(|l| l.starts_with("# ")) {
                if let Some(rest) = line.strip_prefix("## ") {
                    report.out.push_str("### ");
                    report.out.push_str(rest);
                } else {
                    report.out.push_str(line);
                }
                report.out.push('\n');
            }
            if !out.status.success() {
                report.problem(format!("cb-delivery-bench exited with {}", out.status));
            }
        }
        Err(e) => report.problem(format!("cb-delivery-bench did not start: {e}")),
    }
    // 7. HL7 v2: parse throughput beside python-hl7/hl7apy, MLLP ingest.
    for t in &mut servers {
        t.server.stop();
    }
    match crate::bench_hl7::run(&root, &target, quick) {
        Ok(md) => {
            report.out.push('\n');
            report.out.push_str(&md);
        }
        Err(e) => report.problem(format!("HL7 benchmark: {e}")),
    }
    // 8. MESH round trip through the official sandbox, beside mesh-client.
    match mesh_roundtrip(&root, &target, quick) {
        Ok(md) => {
            report.out.push('\n');
            report.out.push_str(&md);
        }
        Err(e) => report.problem(format!("MESH benchmark: {e}")),
    }
    // 9. PostgreSQL beside the embedded store, and two processes beside one.
    match crate::bench_pg::run(&root, &target, quick) {
        Ok(md) => {
            report.out.push('\n');
            report.out.push_str(&md);
        }
        Err(e) => report.problem(format!("PostgreSQL benchmark: {e}")),
    }
    report.finish();
    for t in &mut servers {
        t.server.stop();
    }
    write_report(report, &out_dir.join("results.md"))
}

fn write_report(report: Report, path: &Path) -> Result<(), String> {
    let md = report.out;
    println!("{md}");
    fs::write(path, &md).map_err(|e| format!("writing {}: {e}", path.display()))?;
    progress(&format!("written to {}", path.display()));
    Ok(())
}

pub(crate) fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

fn workspace_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// A temporary directory, removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn create() -> Result<TempDir, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("cb-bench-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&p).map_err(|e| format!("creating {}: {e}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Servers

/// A server process, stopped (SIGTERM, then SIGKILL after 10 s) on drop.
struct Server {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    fn stop(&mut self) {
        if self.exited() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        for _ in 0..200 {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Started {
    server: Server,
    /// Spawn to the `listening on` line (Carebridge only).
    to_listening: Option<Duration>,
    /// Spawn to the first 200 from the readiness path.
    to_ready: Duration,
}

fn log_file(dir: &Path, name: &str) -> Result<(PathBuf, fs::File), String> {
    let path = dir.join(format!("{name}.log"));
    let f = fs::File::create(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    Ok((path, f))
}

fn start_carebridge(
    bin: &Path,
    data_dir: &Path,
    durability: &str,
    tmp: &Path,
) -> Result<Started, String> {
    start_carebridge_auth(bin, data_dir, durability, tmp, false)
}

/// `start_carebridge` with authentication on (signed-JWT clients, the hub's default) or off.
fn start_carebridge_auth(
    bin: &Path,
    data_dir: &Path,
    durability: &str,
    tmp: &Path,
    auth: bool,
) -> Result<Started, String> {
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (log, log_f) = log_file(tmp, &format!("carebridge-{name}"))?;
    let t0 = Instant::now();
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--durability",
            durability,
            "--data-dir",
        ])
        .arg(data_dir)
        // The benchmarks measure the FHIR server on loopback; authentication has its own comparison.
        .env("CAREBRIDGE_AUTH", if auth { "jwt" } else { "none" })
        .env_remove("CAREBRIDGE_CONFIG")
        .env_remove("CAREBRIDGE_PUBLIC_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_f)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let stdout = child.stdout.take();
    let mut server = Server {
        child,
        addr: String::new(),
        log,
    };
    let (tx, rx) = mpsc::channel();
    if let Some(out) = stdout {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((Instant::now(), line));
            }
        });
    }
    let (at, addr) = loop {
        match rx.recv_timeout(Duration::from_secs(30).saturating_sub(t0.elapsed())) {
            Ok((at, line)) => {
                if let Some(addr) = line
                    .split("listening on http://")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                {
                    break (at, addr.to_string());
                }
            }
            Err(_) => {
                return Err(format!(
                    "no `listening on http://` line on stdout; log: {}",
                    server.log_tail()
                ));
            }
        }
    };
    server.addr = addr;
    let to_ready = wait_ready(&mut server, "/health", t0, Duration::from_secs(30))?;
    Ok(Started {
        server,
        to_listening: Some(at.duration_since(t0)),
        to_ready,
    })
}

/// The HFS binary, or why there is none.
fn find_hfs(arg: Option<PathBuf>, root: &Path) -> Result<PathBuf, String> {
    let bundle = bundle_path(root);
    if !bundle.is_file() {
        return Err(format!(
            "its search-parameter bundle {} is absent",
            bundle.display()
        ));
    }
    if let Some(p) = arg.or_else(|| std::env::var_os("HFS_BIN").map(PathBuf::from)) {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "{} (from --hfs / HFS_BIN) is not a file",
                p.display()
            ))
        };
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("hfs"))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            "no binary: pass --hfs PATH or set HFS_BIN, or put `hfs` on PATH".to_string()
        })
}

fn bundle_path(root: &Path) -> PathBuf {
    root.join("../shared/corpus/peers/hfs/search-parameters-r4.json")
}

pub(crate) fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// Start HFS as its README says: API at the root, UI off, a temporary SQLite database, the R4 bundle in its
/// data dir.
fn start_hfs(bin: &Path, root: &Path, tmp: &Path) -> Result<Started, String> {
    let dir = tmp.join("hfs");
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    fs::copy(bundle_path(root), dir.join("search-parameters-r4.json"))
        .map_err(|e| format!("copying the bundle: {e}"))?;
    let port = free_port()?;
    let (log, log_f) = log_file(tmp, "hfs")?;
    let log_err = log_f.try_clone().map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let child = Command::new(bin)
        .env("HFS_UI_ENABLED", "false")
        .env("HFS_BASE_URL", format!("http://127.0.0.1:{port}"))
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--database-url",
        ])
        .arg(dir.join("hfs.db"))
        .arg("--data-dir")
        .arg(&dir)
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(log_f)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let mut server = Server {
        child,
        addr: format!("127.0.0.1:{port}"),
        log,
    };
    let to_ready = wait_ready(&mut server, "/metadata", t0, Duration::from_secs(120))?;
    Ok(Started {
        server,
        to_listening: None,
        to_ready,
    })
}

/// Poll `path` until it answers 200; the time from `t0`.
fn wait_ready(
    server: &mut Server,
    path: &str,
    t0: Instant,
    limit: Duration,
) -> Result<Duration, String> {
    loop {
        if http_status(&server.addr, path) == Some(200) {
            return Ok(t0.elapsed());
        }
        if server.exited() {
            return Err(format!(
                "exited during start-up; log: {}",
                server.log_tail()
            ));
        }
        if t0.elapsed() > limit {
            return Err(format!(
                "no 200 from {path} within {}s; log: {}",
                limit.as_secs(),
                server.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(
            if t0.elapsed() < Duration::from_secs(2) {
                1
            } else {
                50
            },
        ));
    }
}

/// Status code of a `GET path` (connection closed after it), or `None` on any failure.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let sock = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/fhir+json\r\nConnection: close\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// VmRSS of a process, in kB.
fn rss_kb(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------------------
// Load

/// One cb-loadgen result (its `--json` line).
struct Run {
    ok_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    responses: f64,
    errors: f64,
    non_2xx: f64,
    problem: Option<String>,
}

/// A server under load and what was measured on it.
struct Target {
    name: String,
    durability: String,
    /// Only the create scenario is run (a durability variant).
    create_only: bool,
    server: Server,
    url: String,
    startup: Duration,
    nhs_blocks: u64,
    rss_idle_kb: Option<u64>,
    rss_loaded_kb: Option<u64>,
    seed: Result<Run, String>,
    seed_file: Option<PathBuf>,
    runs: Vec<(&'static str, u32, Result<Run, String>)>,
}

impl Target {
    fn new(name: &str, durability: &str, create_only: bool, st: Started) -> Target {
        let base = if name.starts_with("Carebridge") {
            "/fhir"
        } else {
            ""
        };
        Target {
            name: name.into(),
            durability: durability.into(),
            create_only,
            url: format!("http://{}{base}", st.server.addr),
            server: st.server,
            startup: st.to_ready,
            nhs_blocks: 0,
            rss_idle_kb: None,
            rss_loaded_kb: None,
            seed: Err("not seeded".into()),
            seed_file: None,
            runs: Vec::new(),
        }
    }

    /// A fresh range of NHS numbers for one cb-loadgen invocation, so creates on this server never repeat one.
    fn next_nhs_block(&mut self) -> u64 {
        self.nhs_blocks += 1;
        (self.nhs_blocks - 1) * NHS_BLOCK
    }

    fn run(&self, scenario: &str, c: u32) -> Option<&Result<Run, String>> {
        self.runs
            .iter()
            .find(|(s, cc, _)| *s == scenario && *cc == c)
            .map(|(_, _, r)| r)
    }
}

/// Run cb-loadgen with `--json`; its JSON lines (at least one, else an error naming its last stderr line).
/// Its other lines are shown as progress.
fn loadgen_json_lines(bin: &Path, url: &str, args: &[String]) -> Result<Vec<String>, String> {
    let out = Command::new(bin)
        .args(["--url", url, "--json"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines().filter(|l| !l.starts_with('{')) {
        progress(&format!("  {line}"));
    }
    let lines: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "cb-loadgen failed ({}): {}",
            out.status,
            err.trim().lines().last().unwrap_or("")
        ));
    }
    Ok(lines)
}

/// A number field of a flat JSON line (0 when absent or not a number).
fn json_num(line: &str, key: &str) -> f64 {
    json_field(line, key)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// A string field of a flat JSON line, unquoted (escapes kept), `None` when absent or null.
fn json_str(line: &str, key: &str) -> Option<String> {
    json_field(line, key)
        .filter(|v| *v != "null")
        .map(|v| v.trim_matches('"').to_string())
}

/// The first error or non-2xx example of a run, shortened.
fn json_problem(line: &str) -> Option<String> {
    json_str(line, "first_error")
        .or_else(|| json_str(line, "first_non_2xx"))
        .map(|v| v.chars().take(160).collect())
}

fn run_loadgen(bin: &Path, url: &str, args: &[String]) -> Result<Vec<Run>, String> {
    Ok(loadgen_json_lines(bin, url, args)?
        .iter()
        .map(|l| run_of(l))
        .collect())
}

/// The [`Run`] of one cb-loadgen `--json` line.
fn run_of(line: &str) -> Run {
    Run {
        ok_per_s: json_num(line, "ok_per_s"),
        p50_us: json_num(line, "p50_us"),
        p99_us: json_num(line, "p99_us"),
        responses: json_num(line, "responses"),
        errors: json_num(line, "errors"),
        non_2xx: json_num(line, "non_2xx"),
        problem: json_problem(line),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Booking

/// One `book` result (cb-loadgen's JSON line).
struct BookRun {
    bookings_per_s: f64,
    book_p50_us: f64,
    book_p99_us: f64,
    cancel_p50_us: f64,
    cancel_p99_us: f64,
    errors: f64,
    non_2xx: f64,
    pairs: f64,
    slots: f64,
    slots_reused: f64,
    problem: Option<String>,
}

/// One `contention` result, with its correctness check.
struct ContentionRun {
    attempts_per_s: f64,
    bookings_per_s: f64,
    conflicts: f64,
    p50_us: f64,
    p99_us: f64,
    errors: f64,
    non_2xx: f64,
    pass: bool,
    check: String,
    problem: Option<String>,
}

/// Slots of the schedule `free-slots` searches (about 520 days of 15-minute slots).
const FREE_SLOTS: u32 = 50_000;

/// What the booking part measured.
struct Booking {
    /// The server's start-up problem, if it did not start.
    server: Result<(), String>,
    book: Vec<(u32, Result<BookRun, String>)>,
    contention: Option<Result<ContentionRun, String>>,
    /// `free-slots` runs: searches of one day's free slots of a large schedule.
    free_slots: Vec<(u32, Result<Run, String>)>,
}

/// Start a fresh Carebridge (fsync, the default) and run `book` at each of the settings' concurrencies, then
/// `contention` at C=32; each cb-loadgen run sets up its own practitioner, patients, schedule and slots.
fn run_booking(carebridge: &Path, loadgen: &Path, tmp: &Path, s: &Settings) -> Booking {
    let mut out = Booking {
        server: Ok(()),
        book: Vec::new(),
        contention: None,
        free_slots: Vec::new(),
    };
    let mut server = match start_carebridge(carebridge, &tmp.join("cb-booking"), "fsync", tmp) {
        Ok(st) => st.server,
        Err(e) => {
            out.server = Err(format!(
                "carebridge for the booking runs does not start: {e}"
            ));
            return out;
        }
    };
    let url = format!("http://{}/fhir", server.addr);
    let mut nhs_block = 0;
    let mut args = |scenario: &str, c: u32| {
        nhs_block += 1;
        vec![
            "--scenario".to_string(),
            scenario.into(),
            "--concurrency".into(),
            c.to_string(),
            "--duration".into(),
            s.duration.into(),
            "--warmup".into(),
            s.warmup.into(),
            "--patients".into(),
            BOOKING_PATIENTS.to_string(),
            "--contention-slots".into(),
            CONTENTION_SLOTS.to_string(),
            "--nhs-start".into(),
            (nhs_block * BOOKING_NHS_BLOCK).to_string(),
        ]
    };
    for &c in s.book_concurrency {
        progress(&format!("book c={c} against Carebridge"));
        let r = loadgen_json_lines(loadgen, &url, &args("book", c)).and_then(|lines| {
            let l = lines
                .iter()
                .find(|l| json_field(l, "scenario") == Some("\"book\""))
                .ok_or("no book result")?;
            Ok(BookRun {
                bookings_per_s: json_num(l, "bookings_per_s"),
                book_p50_us: json_num(l, "p50_us"),
                book_p99_us: json_num(l, "p99_us"),
                cancel_p50_us: json_num(l, "cancel_p50_us"),
                cancel_p99_us: json_num(l, "cancel_p99_us"),
                errors: json_num(l, "errors"),
                non_2xx: json_num(l, "non_2xx"),
                pairs: json_num(l, "pairs"),
                slots: json_num(l, "slots"),
                slots_reused: json_num(l, "slots_reused"),
                problem: json_problem(l),
            })
        });
        out.book.push((c, r));
    }
    progress(&format!(
        "contention c={BOOKING_TARGET_C} over {CONTENTION_SLOTS} slots against Carebridge"
    ));
    let r = loadgen_json_lines(loadgen, &url, &args("contention", BOOKING_TARGET_C)).and_then(
        |lines| {
            let l = lines
                .iter()
                .find(|l| json_field(l, "scenario") == Some("\"contention\""))
                .ok_or("no contention result")?;
            Ok(ContentionRun {
                attempts_per_s: json_num(l, "attempts_per_s"),
                bookings_per_s: json_num(l, "bookings_per_s"),
                conflicts: json_num(l, "conflicts"),
                p50_us: json_num(l, "p50_us"),
                p99_us: json_num(l, "p99_us"),
                errors: json_num(l, "errors"),
                non_2xx: json_num(l, "non_2xx"),
                pass: json_str(l, "check").as_deref() == Some("PASS"),
                check: json_str(l, "check_detail").unwrap_or_else(|| "no check made".into()),
                problem: json_problem(l),
            })
        },
    );
    out.contention = Some(r);
    progress(&format!(
        "free-slots c=1,{BOOKING_TARGET_C} over a schedule of {FREE_SLOTS} slots against Carebridge"
    ));
    let mut fs_args = args("free-slots", 1);
    if let Some(i) = fs_args.iter().position(|a| a == "--concurrency") {
        fs_args[i + 1] = format!("1,{BOOKING_TARGET_C}");
    }
    fs_args.extend(["--slots".to_string(), FREE_SLOTS.to_string()]);
    match loadgen_json_lines(loadgen, &url, &fs_args) {
        Ok(lines) => {
            for l in lines
                .iter()
                .filter(|l| json_field(l, "scenario") == Some("\"free-slots\""))
            {
                out.free_slots
                    .push((json_num(l, "concurrency") as u32, Ok(run_of(l))));
            }
            if out.free_slots.is_empty() {
                out.free_slots.push((0, Err("no free-slots result".into())));
            }
        }
        Err(e) => out.free_slots.push((0, Err(e))),
    }
    server.stop();
    out
}

/// The raw text of `"key":VALUE` in a flat JSON object (strings keep their quotes, escapes untouched).
pub(crate) fn json_field<'a>(obj: &'a str, key: &str) -> Option<&'a str> {
    let start = obj.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &obj[start..];
    if rest.starts_with('"') {
        let mut escaped = false;
        for (i, ch) in rest.char_indices().skip(1) {
            match ch {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => return Some(&rest[..=i]),
                _ => escaped = false,
            }
        }
        None
    } else {
        Some(rest[..rest.find([',', '}']).unwrap_or(rest.len())].trim())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Report

struct Report {
    out: String,
    problems: Vec<String>,
}

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

fn dur_ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kb: Option<u64>) -> String {
    kb.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "n/a".into())
}

fn first_line_of(path: &str, prefix: &str) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .map(|l| l.split_once(':').map_or(l, |(_, v)| v).trim().to_string())
}

impl Report {
    fn header(args: &[String], s: &Settings) -> Report {
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let nproc = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let cpu =
            first_line_of("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown CPU".into());
        let mem = first_line_of("/proc/meminfo", "MemTotal")
            .and_then(|m| m.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".into());
        let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Carebridge benchmark{}{}\n",
            if s.only_booking { ": booking only" } else { "" },
            if s.quick {
                " (--quick: smoke run, not for comparison)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "- Command: `cargo xtask bench{}{}`",
            if args.is_empty() { "" } else { " " },
            args.join(" ")
        );
        let _ = writeln!(out, "- Date: {date}");
        let _ = writeln!(
            out,
            "- Machine: {nproc} CPUs ({cpu}), {mem} memory, Linux {}; load average at start: {}",
            kernel.trim(),
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        if s.only_booking {
            let _ = writeln!(
                out,
                "- Client: `cb-loadgen` (HTTP/1.1 keep-alive, 1 thread) on the same machine as the server; closed loop, C \
                 connections with one request in flight each; {} per run after a {} warm-up.",
                s.duration, s.warmup
            );
        } else {
            let _ = writeln!(
                out,
                "- Client: `cb-loadgen` (HTTP/1.1 keep-alive, 1 thread) on the same machine as the servers; closed loop, C \
                 connections with one request in flight each; {} per run after a {} warm-up; read and search over {} \
                 seeded patients; the same ~1.5 KB UK Core Patient shape for every create.",
                s.duration, s.warmup, s.seed
            );
        }
        let _ = writeln!(
            out,
            "- Caveat: runs on shared 2-core machines vary by 20-40%; servers are interleaved run by run, so compare \
             ratios within this report, not absolute numbers across reports."
        );
        Report {
            out,
            problems: Vec::new(),
        }
    }

    /// Where the servers' data lives: fsync cost depends on it.
    fn data_dir(&mut self, dir: &Path) {
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        let mount = mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 3 && dir.starts_with(f[1]))
                    .then(|| (f[1].len(), format!("{} on {} ({})", f[2], f[1], f[0])))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, m)| m)
            .unwrap_or_else(|| "unknown filesystem".into());
        let _ = writeln!(
            self.out,
            "- Server data (stores, databases) in a temporary directory: {mount}\n"
        );
    }

    fn problem(&mut self, msg: String) {
        progress(&msg);
        self.problems.push(msg);
    }

    fn validation(&mut self, bench: &Path, root: &Path, target: &Path, tmp: &Path, s: &Settings) {
        progress("validation throughput");
        let sample = tmp.join("patient.json");
        let _ = writeln!(
            self.out,
            "## Validation throughput (in-process, one UK Core Patient, parse + validate)\n\n\
             Carebridge is timed in the two ways the hub validates: `fhir::check_json` gives the verdict and \
             issues only (what `$validate` and `carebridge validate` run); `fhir::validate_json` also builds the \
             resource as the `serde_json::Value` a write stores and indexes. fhir.resources always builds its \
             model.\n"
        );
        let _ = writeln!(
            self.out,
            "| validator | validations/s | µs each | × fhir.resources |\n|---|---:|---:|---:|"
        );
        // Alternating rounds; each side's fastest round is reported (as Python's timeit does: the fastest run
        // is the one least disturbed by the rest of a shared machine), with every round listed below.
        let mut cb_rates = Vec::new();
        let mut cb_value_rates = Vec::new();
        let mut py_rates = Vec::new();
        let mut py_name = String::new();
        for _ in 0..VALIDATION_ROUNDS {
            let cb = Command::new(bench)
                .args([
                    "--iterations",
                    &s.validate_iterations.to_string(),
                    "--json",
                    "--write-sample",
                ])
                .arg(&sample)
                .output();
            match cb {
                Ok(o) if o.status.success() => {
                    let text = String::from_utf8_lossy(&o.stdout);
                    let field = |name: &str| {
                        text.lines()
                            .filter(|l| l.starts_with('{'))
                            .find_map(|l| json_field(l, name)?.parse::<f64>().ok())
                    };
                    if let Some(r) = field("per_s") {
                        cb_rates.push(r);
                    }
                    if let Some(r) = field("with_value_per_s") {
                        cb_value_rates.push(r);
                    }
                }
                Ok(o) => {
                    self.problem(format!(
                        "cb-validate-bench failed: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ));
                    return;
                }
                Err(e) => {
                    self.problem(format!("cb-validate-bench: {e}"));
                    return;
                }
            }
            match python_validate(root, target, &sample, s.python_iterations) {
                Ok((name, r)) => {
                    py_name = name;
                    py_rates.push(r);
                }
                Err(e) => {
                    self.problem(format!("fhir.resources comparison skipped: {e}"));
                    break;
                }
            }
        }
        let best = |v: &[f64]| v.iter().copied().reduce(f64::max);
        let py_rate = best(&py_rates);
        let times = |r: f64| {
            py_rate
                .map(|p| format!("{:.1}", r / p))
                .unwrap_or_else(|| "n/a".into())
        };
        for (name, rates) in [
            (
                "Carebridge `fhir::check_json` (Rust; verdict and issues)",
                &cb_rates,
            ),
            (
                "Carebridge `fhir::validate_json` (Rust; verdict and the stored `Value`)",
                &cb_value_rates,
            ),
        ] {
            if let Some(r) = best(rates) {
                let _ = writeln!(
                    self.out,
                    "| {name} | {r:.0} | {:.1} | {} |",
                    1e6 / r,
                    times(r)
                );
            }
        }
        if let Some(r) = py_rate {
            let _ = writeln!(
                self.out,
                "| {py_name} (Python; builds its model) | {r:.0} | {:.1} | 1.0 |",
                1e6 / r
            );
        }
        let list = |v: &[f64]| {
            v.iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            self.out,
            "\nValidations/s of every round (alternating; the fastest of each is shown above): \
             `check_json` {}; `validate_json` {}; fhir.resources {}.",
            list(&cb_rates),
            list(&cb_value_rates),
            list(&py_rates)
        );
        let _ = writeln!(
            self.out,
            "\nfhir.resources 8.x default models are FHIR R5; the R4B (4.3.0) models are used as the nearest to R4. \
             They check structure and datatypes only (no profile, terminology or NHS-number rules), so they do less \
             work than Carebridge's validator.\n"
        );
    }

    fn load_tables(&mut self, servers: &[Target], s: &Settings) {
        let _ = writeln!(
            self.out,
            "## Servers and durability\n\n| server | durability / validation | start-up to first 200 |\n|---|---|---:|"
        );
        for t in servers {
            let validation = if t.name.starts_with("Carebridge") {
                "; every write validated"
            } else {
                ""
            };
            let _ = writeln!(
                self.out,
                "| {} | {}{validation} | {} |",
                t.name,
                t.durability,
                dur_ms(t.startup)
            );
        }
        let _ = writeln!(
            self.out,
            "\n## Seeding ({} patients, c=32)\n\n| server | creates/s | errors | non-2xx |\n|---|---:|---:|---:|",
            s.seed
        );
        for t in servers.iter().filter(|t| !t.create_only) {
            match &t.seed {
                Ok(r) => {
                    let _ = writeln!(
                        self.out,
                        "| {} | {:.0} | {} | {} |",
                        t.name, r.ok_per_s, r.errors, r.non_2xx
                    );
                }
                Err(e) => {
                    let _ = writeln!(self.out, "| {} | failed: {e} | | |", t.name);
                }
            }
        }
        let hfs = servers.iter().position(|t| t.name == "HFS");
        for scenario in SCENARIOS {
            let cols: Vec<&Target> = servers
                .iter()
                .filter(|t| scenario == "create" || !t.create_only)
                .collect();
            let _ = write!(
                self.out,
                "\n## {scenario} (2xx responses/s; latency p50 / p99 in ms)\n\n| C |"
            );
            for t in &cols {
                let _ = write!(self.out, " {} ok/s | p50 | p99 |", t.name);
            }
            if hfs.is_some() {
                let _ = write!(self.out, " Carebridge (fsync) ÷ HFS |");
            }
            let _ = write!(self.out, "\n|---:|{}", "---:|---:|---:|".repeat(cols.len()));
            if hfs.is_some() {
                let _ = write!(self.out, "---:|");
            }
            let _ = writeln!(self.out);
            for c in CONCURRENCY {
                let _ = write!(self.out, "| {c} |");
                for t in &cols {
                    match t.run(scenario, c) {
                        Some(Ok(r)) => {
                            let bad = r.errors + r.non_2xx;
                            let note = if bad > 0.0 {
                                format!(
                                    " ({} errors, {} non-2xx of {})",
                                    r.errors,
                                    r.non_2xx,
                                    r.responses + r.errors
                                )
                            } else {
                                String::new()
                            };
                            let _ = write!(
                                self.out,
                                " {:.0}{note} | {} | {} |",
                                r.ok_per_s,
                                ms(r.p50_us),
                                ms(r.p99_us)
                            );
                            if let Some(p) = &r.problem {
                                self.problems
                                    .push(format!("{scenario} c={c} on {}: {p}", t.name));
                            }
                        }
                        Some(Err(e)) => {
                            let _ = write!(self.out, " failed | | |");
                            self.problems
                                .push(format!("{scenario} c={c} on {}: {e}", t.name));
                        }
                        None => {
                            let _ = write!(self.out, " n/a | | |");
                        }
                    }
                }
                if let Some(h) = hfs {
                    let rate = |t: &Target| match t.run(scenario, c) {
                        Some(Ok(r)) if r.ok_per_s > 0.0 => Some(r.ok_per_s),
                        _ => None,
                    };
                    let ratio = match (rate(&servers[0]), rate(&servers[h])) {
                        (Some(a), Some(b)) => format!("{:.2}", a / b),
                        _ => "n/a".into(),
                    };
                    let _ = write!(self.out, " {ratio} |");
                }
                let _ = writeln!(self.out);
            }
        }
        let _ = writeln!(self.out);
    }

    fn booking_tables(&mut self, b: &Booking, s: &Settings) {
        let _ = writeln!(
            self.out,
            "## Booking (Carebridge only)\n\n\
             The HFS peer has no booking engine (no slot claiming, `$generate-slots` or `$transition`), so these runs \
             measure Carebridge alone, on a fresh server of their own (`--durability fsync`, the default; every write \
             validated). Each cb-loadgen run first creates 1 Practitioner, {BOOKING_PATIENTS} Patients (valid NHS \
             numbers), 1 Schedule and its 15-minute slots (00:00-24:00 every day, from the day after tomorrow, UTC) \
             through `$generate-slots` calls of at most 9,600 slots each; then {} per run after a {} warm-up.\n",
            s.duration, s.warmup
        );
        if let Err(e) = &b.server {
            let _ = writeln!(self.out, "Not measured: {e}\n");
            self.problems.push(e.clone());
            return;
        }
        let _ = writeln!(
            self.out,
            "### book: book a distinct free slot (POST Appointment, 201), then cancel it (`$transition` cancelled, 200)\n\n\
             Bookings/s counts completed book + cancel pairs; latencies in ms. Target at C={BOOKING_TARGET_C}: \
             ≥ {BOOK_TARGET_PER_S:.0} bookings/s with p99 < {BOOK_TARGET_P99_MS:.0} ms (booking and cancel requests).\n\n\
             | C | bookings/s | booking p50 | booking p99 | cancel p50 | cancel p99 | errors | non-2xx | slots (reused) | target |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        let mut book_at_target = None;
        for (c, r) in &b.book {
            match r {
                Ok(r) => {
                    let target = if *c == BOOKING_TARGET_C {
                        book_at_target = Some(r.bookings_per_s);
                        let mut missed = Vec::new();
                        if r.bookings_per_s < BOOK_TARGET_PER_S {
                            missed.push(format!(
                                "{:.0} < {BOOK_TARGET_PER_S:.0} bookings/s",
                                r.bookings_per_s
                            ));
                        }
                        for (what, p99) in [("booking", r.book_p99_us), ("cancel", r.cancel_p99_us)]
                        {
                            if p99 / 1000.0 >= BOOK_TARGET_P99_MS {
                                missed.push(format!(
                                    "{what} p99 {} ≥ {BOOK_TARGET_P99_MS:.0} ms",
                                    ms(p99)
                                ));
                            }
                        }
                        if r.errors + r.non_2xx > 0.0 {
                            missed.push("failed requests".into());
                        }
                        if missed.is_empty() {
                            "met".to_string()
                        } else {
                            format!("missed: {}", missed.join(", "))
                        }
                    } else {
                        "—".to_string()
                    };
                    let _ = writeln!(
                        self.out,
                        "| {c} | {:.0} | {} | {} | {} | {} | {} | {} | {} ({}) | {target} |",
                        r.bookings_per_s,
                        ms(r.book_p50_us),
                        ms(r.book_p99_us),
                        ms(r.cancel_p50_us),
                        ms(r.cancel_p99_us),
                        r.errors,
                        r.non_2xx,
                        r.slots,
                        r.slots_reused
                    );
                    if r.pairs == 0.0 {
                        self.problems
                            .push(format!("book c={c}: no booking completed"));
                    }
                    if let Some(p) = &r.problem {
                        self.problems.push(format!("book c={c}: {p}"));
                    }
                }
                Err(e) => {
                    let _ = writeln!(self.out, "| {c} | failed | | | | | | | | |");
                    self.problems.push(format!("book c={c}: {e}"));
                }
            }
        }
        let _ = writeln!(
            self.out,
            "\n### contention: {BOOKING_TARGET_C} connections book random slots of {CONTENTION_SLOTS} (201 or 409), cancelling each success at once\n\n\
             Afterwards every slot is read (it must be free), `Appointment?slot=Slot/{{id}}&status=booked` must be empty for \
             each, and the 201s counted (warm-up included) must equal the appointments created \
             (`Appointment?_summary=count` before and after, and summed per slot). Target: correct, and bookings/s \
             ≥ {:.0}% of `book`'s at C={BOOKING_TARGET_C}.\n\n\
             | C | attempts/s | bookings/s (201) | 409s | attempt p50 | attempt p99 | errors | other non-2xx | correctness | ÷ book bookings/s | target |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
            CONTENTION_TARGET_SHARE * 100.0
        );
        match &b.contention {
            Some(Ok(r)) => {
                let share = book_at_target
                    .filter(|b| *b > 0.0)
                    .map(|b| r.bookings_per_s / b);
                let target = match (r.pass, share) {
                    (false, _) => "missed: check FAILED".to_string(),
                    (true, Some(x)) if x >= CONTENTION_TARGET_SHARE => "met".to_string(),
                    (true, Some(x)) => format!(
                        "missed: {:.0}% < {:.0}% of book",
                        x * 100.0,
                        CONTENTION_TARGET_SHARE * 100.0
                    ),
                    (true, None) => "n/a (no book result)".to_string(),
                };
                let _ = writeln!(
                    self.out,
                    "| {BOOKING_TARGET_C} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {target} |",
                    r.attempts_per_s,
                    r.bookings_per_s,
                    r.conflicts,
                    ms(r.p50_us),
                    ms(r.p99_us),
                    r.errors,
                    r.non_2xx,
                    if r.pass { "PASS" } else { "**FAIL**" },
                    share.map_or_else(|| "n/a".into(), |x| format!("{x:.2}")),
                );
                let _ = writeln!(
                    self.out,
                    "\nCorrectness check: **{}** — {}",
                    if r.pass { "PASS" } else { "FAIL" },
                    r.check
                );
                if !r.pass {
                    self.problems
                        .push(format!("contention check FAILED: {}", r.check));
                }
                if let Some(p) = &r.problem {
                    self.problems.push(format!("contention: {p}"));
                }
            }
            Some(Err(e)) => {
                let _ = writeln!(
                    self.out,
                    "| {BOOKING_TARGET_C} | failed | | | | | | | | | |"
                );
                self.problems.push(format!("contention: {e}"));
            }
            None => {}
        }
        if !b.free_slots.is_empty() {
            let _ = writeln!(
                self.out,
                "\n### free-slots: one day's free slots of a schedule of {FREE_SLOTS} slots\n\n\
                 Each request is `GET Slot?schedule=..&status=free&start=ge{{day}}&start=lt{{next day}}` for a random \
                 day of the schedule (about 520 days of 15-minute slots); a 200 that lists no Slot counts as non-2xx. \
                 Reported, no target.\n\n\
                 | C | searches/s | p50 | p99 | responses | errors | non-2xx |\n|---:|---:|---:|---:|---:|---:|---:|"
            );
            for (c, r) in &b.free_slots {
                match r {
                    Ok(r) => {
                        let _ = writeln!(
                            self.out,
                            "| {c} | {:.0} | {} | {} | {} | {} | {} |",
                            r.ok_per_s,
                            ms(r.p50_us),
                            ms(r.p99_us),
                            r.responses,
                            r.errors,
                            r.non_2xx
                        );
                        if r.errors > 0.0 || r.non_2xx > 0.0 {
                            self.problems.push(format!(
                                "free-slots c={c}: {} errors, {} non-2xx",
                                r.errors, r.non_2xx
                            ));
                        }
                        if let Some(p) = &r.problem {
                            self.problems.push(format!("free-slots c={c}: {p}"));
                        }
                    }
                    Err(e) => {
                        let _ = writeln!(self.out, "| {c} | failed | | | | | |");
                        self.problems.push(format!("free-slots: {e}"));
                    }
                }
            }
        }
        let _ = writeln!(self.out);
    }

    fn startup_table(
        &mut self,
        samples: &[(Option<Duration>, Duration)],
        restart: Option<(Option<Duration>, Duration, Option<u64>)>,
        servers: &[Target],
    ) {
        let _ = writeln!(
            self.out,
            "## Start-up and memory\n\n| what | spawn → `listening` line | spawn → first 200 | RSS |\n|---|---:|---:|---:|"
        );
        if !samples.is_empty() {
            let mut listen: Vec<Duration> = samples.iter().filter_map(|s| s.0).collect();
            let mut ready: Vec<Duration> = samples.iter().map(|s| s.1).collect();
            listen.sort();
            ready.sort();
            let fmt = |v: &[Duration]| match v {
                [] => "n/a".to_string(),
                _ => format!(
                    "{} (min {}, max {})",
                    dur_ms(v[(v.len() - 1) / 2]),
                    dur_ms(v[0]),
                    dur_ms(v[v.len() - 1])
                ),
            };
            let _ = writeln!(
                self.out,
                "| Carebridge, empty store (median of {}) | {} | {} (`/health`) | |",
                samples.len(),
                fmt(&listen),
                fmt(&ready)
            );
        }
        if let Some((l, r, rss)) = restart {
            let _ = writeln!(
                self.out,
                "| Carebridge, restart on the benchmark's populated store | {} | {} (`/health`) | {} |",
                l.map(dur_ms).unwrap_or_else(|| "n/a".into()),
                dur_ms(r),
                mib(rss)
            );
        }
        for t in servers {
            let path = if t.name == "HFS" {
                "`/metadata`"
            } else {
                "`/health`"
            };
            let _ = writeln!(
                self.out,
                "| {}, idle after start | | {} ({path}) | {} |",
                t.name,
                dur_ms(t.startup),
                mib(t.rss_idle_kb)
            );
            let _ = writeln!(
                self.out,
                "| {}, after the load | | | {} |",
                t.name,
                mib(t.rss_loaded_kb)
            );
        }
    }

    fn finish(&mut self) {
        if !self.problems.is_empty() {
            let _ = writeln!(self.out, "\n## Problems and skipped parts\n");
            for p in &self.problems {
                let _ = writeln!(self.out, "- {}", p.replace('\n', " "));
            }
        }
    }
}

/// Time fhir.resources on `sample` in a venv under `target/bench-venv` (created and filled on first use).
fn python_validate(
    root: &Path,
    target: &Path,
    sample: &Path,
    iterations: u64,
) -> Result<(String, f64), String> {
    let venv = target.join("bench-venv");
    let python = venv.join("bin/python");
    if !python.is_file() {
        progress("creating target/bench-venv");
        let ok = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err("`python3 -m venv` failed (is python3 with venv installed?)".into());
        }
    }
    let have = Command::new(&python)
        .args([
            "-c",
            "import fhir.resources as f, sys; sys.exit(f.__version__ != '8.3.0')",
        ])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have {
        progress("pip install -r bench/requirements.txt (fhir.resources==8.3.0)");
        let out = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(root.join("bench/requirements.txt"))
            .output()
            .map_err(|e| format!("running pip: {e}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "pip install failed: {}",
                err.trim().lines().last().unwrap_or("")
            ));
        }
    }
    let out = Command::new(&python)
        .arg(root.join("bench/fhir_resources_validate.py"))
        .arg(sample)
        .arg(iterations.to_string())
        .arg("--json")
        .output()
        .map_err(|e| format!("running the script: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the script failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .ok_or("the script printed no JSON line")?;
    let rate = json_field(line, "per_s")
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or("no per_s in the script's output")?;
    let name = json_field(line, "validator")
        .unwrap_or("\"fhir.resources\"")
        .trim_matches('"')
        .to_string();
    Ok((name, rate))
}

/// `bench/mesh_roundtrip.py` (its own mesh-sandbox; the hub's Rust client beside mesh-client), in the test venv.
fn mesh_roundtrip(root: &Path, target: &Path, quick: bool) -> Result<String, String> {
    let venv = crate::python_env()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(&cargo)
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "mesh",
            "--example",
            "roundtrip",
            "-p",
            "carebridge",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("building the MESH round-trip example failed".into());
    }
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.arg(root.join("bench/mesh_roundtrip.py"))
        .arg("--hub-bin")
        .arg(target.join("release/carebridge"))
        .arg("--roundtrip-bin")
        .arg(target.join("release/examples/roundtrip"));
    if quick {
        cmd.args(["--n", "200", "--repeat", "1"]);
    }
    progress(&format!("running {cmd:?}"));
    let out = cmd
        .output()
        .map_err(|e| format!("running the MESH benchmark: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the MESH benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout).replace(&format!("{}/", root.display()), "");
    Ok(format!(
        "## MESH round trip (`bench/mesh_roundtrip.py`)\n\n{text}\n"
    ))
}

/// Rounds of the validation comparison (each side's fastest is reported).
const VALIDATION_ROUNDS: usize = 5;

// ---------------------------------------------------------------------------------------------------------
// Authentication on vs off

/// Rounds of the read run per mode; the modes alternate (off, on, off, on, ...) so drift on a shared machine
/// hits both alike, and the median round of each is reported.
const AUTH_ROUNDS: usize = 5;
/// Reads may be at most this much slower with authentication on.
const AUTH_TARGET_LOSS: f64 = 0.10;

/// A fresh access token for the bootstrap admin client of the hub in `data_dir`.
fn admin_token(carebridge: &Path, data_dir: &Path, addr: &str) -> Result<String, String> {
    let out = Command::new(carebridge)
        .arg("token")
        .arg("--key")
        .arg(data_dir.join("admin-client-key.pem"))
        .args(["--url", &format!("http://{addr}")])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running carebridge token: {e}"))?;
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || token.is_empty() {
        return Err(format!(
            "carebridge token failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(token)
}

/// `cargo xtask bench --only auth`: the same reads (and identifier searches) against a hub with signed-JWT
/// authentication on (every request carries a bearer token: verified, scope-checked and audited) and one with
/// it off, C=32.
fn auth_onoff(bin: &dyn Fn(&str) -> PathBuf, tmp: &Path, s: &Settings) -> Result<String, String> {
    let carebridge = bin("carebridge");
    let loadgen = bin("cb-loadgen");
    let mut hubs = Vec::new();
    for (name, auth) in [("off", false), ("on", true)] {
        let dir = tmp.join(format!("cb-auth-{name}"));
        let st = start_carebridge_auth(&carebridge, &dir, "fsync", tmp, auth)
            .map_err(|e| format!("carebridge with auth {name} does not start: {e}"))?;
        let url = format!("http://{}/fhir", st.server.addr);
        let seed_file = tmp.join(format!("auth-{name}.seed"));
        let mut args = vec![
            "--seed".to_string(),
            s.seed.to_string(),
            "--save-seed".into(),
            seed_file.display().to_string(),
            "--scenario".into(),
            "seed".into(),
        ];
        if auth {
            args.extend([
                "--token".into(),
                admin_token(&carebridge, &dir, &st.server.addr)?,
            ]);
        }
        progress(&format!("seeding {} patients (auth {name})", s.seed));
        run_loadgen(&loadgen, &url, &args)?;
        hubs.push((name, auth, dir, st.server, url, seed_file));
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Authentication on vs off (reads, C=32)\n\n\
         Two fresh hubs, each seeded with {} patients: one with `CAREBRIDGE_AUTH=none`, one with signed-JWT \
         authentication (the default), where every request carries the bootstrap admin client's bearer token \
         (RS512-signed by the hub, verified, scope-checked, rate-limit-checked and audited per request). \
         {AUTH_ROUNDS} rounds per mode, alternating off/on; the median round is shown. Target: reads with \
         authentication on at most {:.0}% lower.\n",
        s.seed,
        AUTH_TARGET_LOSS * 100.0
    );
    let _ = writeln!(
        md,
        "| scenario | auth | rounds (responses/s) | median/s | p50 ms | p99 ms | errors + non-2xx |\n|---|---|---|---|---|---|---|"
    );
    let mut verdicts = Vec::new();
    for scenario in ["read", "search-identifier"] {
        let mut rounds: Vec<Vec<Run>> = vec![Vec::new(), Vec::new()];
        for round in 0..AUTH_ROUNDS {
            for (i, (name, auth, dir, server, url, seed_file)) in hubs.iter().enumerate() {
                let mut args = vec![
                    "--scenario".to_string(),
                    scenario.into(),
                    "--concurrency".into(),
                    "32".into(),
                    "--duration".into(),
                    s.duration.into(),
                    "--warmup".into(),
                    s.warmup.into(),
                    "--seed-file".into(),
                    seed_file.display().to_string(),
                ];
                if *auth {
                    args.extend([
                        "--token".into(),
                        admin_token(&carebridge, dir, &server.addr)?,
                    ]);
                }
                progress(&format!("{scenario} round {} auth {name}", round + 1));
                let r = run_loadgen(&loadgen, url, &args)?
                    .into_iter()
                    .next()
                    .ok_or("no result")?;
                rounds[i].push(r);
            }
        }
        let mut medians = Vec::new();
        for (i, (name, ..)) in hubs.iter().enumerate() {
            let list = &rounds[i];
            let mut order: Vec<usize> = (0..list.len()).collect();
            order.sort_by(|a, b| list[*a].ok_per_s.total_cmp(&list[*b].ok_per_s));
            let m = &list[order[order.len() / 2]];
            let all: Vec<String> = list.iter().map(|r| format!("{:.0}", r.ok_per_s)).collect();
            let bad: f64 = list.iter().map(|r| r.errors + r.non_2xx).sum();
            let _ = writeln!(
                md,
                "| {scenario} | {name} | {} | {:.0} | {} | {} | {bad:.0}{} |",
                all.join(", "),
                m.ok_per_s,
                ms(m.p50_us),
                ms(m.p99_us),
                list.iter()
                    .find_map(|r| r.problem.clone())
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default()
            );
            medians.push(m.ok_per_s);
        }
        let ratio = medians[1] / medians[0];
        verdicts.push(format!(
            "{scenario}: auth on = {:.1}% of auth off ({})",
            ratio * 100.0,
            if ratio >= 1.0 - AUTH_TARGET_LOSS {
                "target met"
            } else {
                "target missed"
            }
        ));
    }
    for (_, _, _, server, _, _) in &mut hubs {
        server.stop();
    }
    let _ = writeln!(md);
    for v in verdicts {
        let _ = writeln!(md, "- {v}");
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields() {
        let l = r#"{"scenario":"read","ok_per_s":12.5,"first_error":"a \"b\", c","x":null}"#;
        assert_eq!(json_field(l, "ok_per_s"), Some("12.5"));
        assert_eq!(json_field(l, "scenario"), Some("\"read\""));
        assert_eq!(json_field(l, "first_error"), Some(r#""a \"b\", c""#));
        assert_eq!(json_field(l, "x"), Some("null"));
        assert_eq!(json_field(l, "missing"), None);
    }
}
