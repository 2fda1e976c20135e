//! The hub under test: a `carebridge serve` child process on a loopback port and a fresh temporary data
//! directory, stopped (SIGTERM, then SIGKILL after a grace period) and cleaned up when dropped; plus CPU
//! accounting of the process and of each of its threads from `/proc`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest wait for the hub to print its `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Grace period between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running hub. Dropping it stops the process and removes its data directory.
pub struct Hub {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    pub pid: u32,
    /// Holds `data/` (the store) and `hub.log` (the hub's stderr).
    root: PathBuf,
}

fn unique_root() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "cb-delivery-bench-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Hub {
    /// Start `bin serve` on `127.0.0.1:0` with a fresh data directory and the extra flags `extra`.
    pub fn start(bin: &Path, extra: &[String]) -> Result<Hub, String> {
        let root = unique_root();
        let data = root.join("data");
        std::fs::create_dir_all(&data).map_err(|e| format!("creating {}: {e}", data.display()))?;
        let log = std::fs::File::create(root.join("hub.log"))
            .map_err(|e| format!("creating the hub log: {e}"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--http")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data)
            .args(extra)
            // Loopback only: the benchmark measures delivery, not authentication.
            .env("CAREBRIDGE_AUTH", "none")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        // Only the flags above configure the hub (no CAREBRIDGE_* from the caller's environment).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CAREBRIDGE_") {
                cmd.env_remove(k);
            }
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&root);
                return Err(format!("starting {}: {e}", bin.display()));
            }
        };
        let pid = child.id();
        let mut hub = Hub {
            child: None,
            addr: String::new(),
            pid,
            root,
        };
        let Some(stdout) = child.stdout.take() else {
            hub.child = Some(child);
            return Err("the hub's stdout is not piped".into());
        };
        hub.child = Some(child);
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        // Reads every stdout line (so the pipe never fills) and forwards the first `listening on` line.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && line.contains("listening on http://") {
                    sent = tx.send(line).is_ok();
                }
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let addr = line
                        .split("listening on http://")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .unwrap_or("")
                        .trim_end_matches('/')
                        .to_string();
                    if addr.is_empty() {
                        return Err(format!("cannot read the hub's address from {line:?}"));
                    }
                    hub.addr = addr;
                    return Ok(hub);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(Ok(Some(status))) = hub.child.as_mut().map(Child::try_wait) {
                        return Err(format!(
                            "the hub exited ({status}) before listening; log:\n{}",
                            hub.log_tail(2000)
                        ));
                    }
                    if Instant::now() > deadline {
                        return Err(format!(
                            "the hub did not print its address within {START_TIMEOUT:?}; log:\n{}",
                            hub.log_tail(2000)
                        ));
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    // stdout closed without the line: wait briefly for the exit status, then report.
                    std::thread::sleep(Duration::from_millis(200));
                    return Err(format!(
                        "the hub closed its stdout before listening; log:\n{}",
                        hub.log_tail(2000)
                    ));
                }
            }
        }
    }

    /// The last `n` bytes of the hub's stderr.
    pub fn log_tail(&self, n: u64) -> String {
        let Ok(mut f) = std::fs::File::open(self.root.join("hub.log")) else {
            return String::new();
        };
        let len = f.metadata().map_or(0, |m| m.len());
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(n)));
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        s
    }

    /// Lines of the hub's log at WARN and at ERROR level, and the first of them (shortened).
    pub fn log_problems(&self) -> (usize, usize, Option<String>) {
        let text = std::fs::read_to_string(self.root.join("hub.log")).unwrap_or_default();
        let (mut warn, mut error, mut first) = (0, 0, None);
        for line in text.lines() {
            let w = line.contains(" WARN ") || line.contains("WARN\u{1b}");
            let e = line.contains(" ERROR ") || line.contains("ERROR\u{1b}");
            warn += usize::from(w);
            error += usize::from(e);
            if (w || e) && first.is_none() {
                first = Some(line.chars().take(300).collect());
            }
        }
        (warn, error, first)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// CPU time of the hub so far, in total and per thread.
    pub fn cpu(&self) -> CpuSample {
        CpuSample::of(self.pid)
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            // Graceful first: the hub drains in-flight requests on SIGTERM.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Clock ticks per second of `/proc` CPU times.
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// (comm, utime + stime ticks) from a `/proc/.../stat` file.
fn stat_ticks(path: &Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // After the comm: field 3 (state) is rest[0]; utime (14) is rest[11], stime (15) rest[12].
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU time used by a process, in total and per thread, at an instant.
#[derive(Debug, Clone)]
pub struct CpuSample {
    at: Instant,
    total: u64,
    /// tid -> (thread name, ticks)
    threads: HashMap<String, (String, u64)>,
    /// The whole machine (`/proc/stat`): (busy ticks, all ticks), summed over every CPU.
    machine: (u64, u64),
}

/// (busy, total) ticks of all CPUs since boot; busy excludes idle and iowait.
fn machine_ticks() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

impl CpuSample {
    pub fn of(pid: u32) -> CpuSample {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let total = stat_ticks(&proc.join("stat")).map_or(0, |(_, t)| t);
        let mut threads = HashMap::new();
        if let Ok(dir) = std::fs::read_dir(proc.join("task")) {
            for entry in dir.flatten() {
                if let Some(t) = stat_ticks(&entry.path().join("stat")) {
                    threads.insert(entry.file_name().to_string_lossy().into_owned(), t);
                }
            }
        }
        CpuSample {
            at: Instant::now(),
            total,
            threads,
            machine: machine_ticks(),
        }
    }

    pub fn of_self() -> CpuSample {
        CpuSample::of(std::process::id())
    }

    /// CPU used between `self` (earlier) and `later`, in % of one core: the total and, per thread name
    /// (threads of the same name summed; the busiest single thread of that name too), sorted busiest first.
    pub fn usage(&self, later: &CpuSample) -> CpuUsage {
        let secs = later.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let pct = |ticks: u64| ticks as f64 / clock_ticks() / secs * 100.0;
        let mut by_name: HashMap<String, (u64, u64, usize)> = HashMap::new();
        for (tid, (name, ticks)) in &later.threads {
            let before = self.threads.get(tid).map_or(0, |(_, t)| *t);
            let d = ticks.saturating_sub(before);
            let e = by_name.entry(name.clone()).or_insert((0, 0, 0));
            e.0 += d;
            e.1 = e.1.max(d);
            e.2 += 1;
        }
        let mut threads: Vec<ThreadUsage> = by_name
            .into_iter()
            .map(|(name, (sum, max, n))| ThreadUsage {
                name,
                threads: n,
                pct: pct(sum),
                busiest_pct: pct(max),
            })
            .collect();
        threads.sort_by(|a, b| b.pct.total_cmp(&a.pct));
        let busy = later.machine.0.saturating_sub(self.machine.0) as f64;
        let all = later.machine.1.saturating_sub(self.machine.1) as f64;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        CpuUsage {
            secs,
            total_pct: pct(later.total.saturating_sub(self.total)),
            threads,
            machine_busy_pct: if all > 0.0 {
                busy / all * cores * 100.0
            } else {
                0.0
            },
            machine_max_pct: cores * 100.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ThreadUsage {
    pub name: String,
    pub threads: usize,
    pub pct: f64,
    pub busiest_pct: f64,
}

#[derive(Debug, Clone)]
pub struct CpuUsage {
    pub secs: f64,
    pub total_pct: f64,
    pub threads: Vec<ThreadUsage>,
    /// Every process on the machine, in % of one core, and the most it could be (cores x 100).
    pub machine_busy_pct: f64,
    pub machine_max_pct: f64,
}

impl CpuUsage {
    /// `312% (carebridge x2 180%, carebridge-sqli x1 95%)`, threads under 2% left out.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .threads
            .iter()
            .filter(|t| t.pct >= 2.0)
            .map(|t| {
                if t.threads > 1 {
                    format!(
                        "{} x{} {:.0}% (busiest {:.0}%)",
                        t.name, t.threads, t.pct, t.busiest_pct
                    )
                } else {
                    format!("{} {:.0}%", t.name, t.pct)
                }
            })
            .collect();
        format!(
            "{:.0}% of one core over {:.1} s ({})",
            self.total_pct,
            self.secs,
            parts.join(", ")
        )
    }

    /// `183% of 200%`
    pub fn machine(&self) -> String {
        format!(
            "{:.0}% of {:.0}%",
            self.machine_busy_pct, self.machine_max_pct
        )
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "machine_busy_pct": round(self.machine_busy_pct, 1),
            "seconds": round(self.secs, 2),
            "total_pct": round(self.total_pct, 1),
            "threads": self.threads.iter().map(|t| serde_json::json!({
                "name": t.name, "count": t.threads, "pct": round(t.pct, 1),
                "busiest_pct": round(t.busiest_pct, 1)
            })).collect::<Vec<_>>(),
        })
    }
}

pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}
