//! Statistics and output: percentiles, the machine line, Markdown tables.

use std::process::Command;

/// Nearest-rank percentile of an ascending slice (`p` in 0..=100); `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Latency summary in ms.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub n: usize,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

impl Latency {
    pub fn of(mut v: Vec<f64>) -> Latency {
        v.sort_by(f64::total_cmp);
        Latency {
            n: v.len(),
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            max: v.last().copied(),
        }
    }

    pub fn to_json(self) -> serde_json::Value {
        let r = |x: Option<f64>| x.map(|x| super::hub::round(x, 1));
        serde_json::json!({"n": self.n, "p50_ms": r(self.p50), "p90_ms": r(self.p90), "p99_ms": r(self.p99), "max_ms": r(self.max)})
    }
}

/// `12.3 ms`, or `-` when there is no value.
pub fn ms(x: Option<f64>) -> String {
    match x {
        Some(x) if x.abs() >= 1000.0 => format!("{:.0} ms", x),
        Some(x) => format!("{x:.1} ms"),
        None => "-".into(),
    }
}

/// `12,345`
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `received / expected (pct%)`
pub fn ratio(got: u64, expected: u64) -> String {
    let pct = if expected == 0 {
        0.0
    } else {
        got as f64 * 100.0 / expected as f64
    };
    format!("{} / {} ({pct:.1}%)", thousands(got), thousands(expected))
}

/// The machine: `nproc` and the `uptime` load averages.
#[derive(Debug, Clone)]
pub struct Machine {
    pub nproc: usize,
    pub load: String,
}

impl Machine {
    pub fn now() -> Machine {
        let nproc = Command::new("nproc")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(0, |n| n.get()));
        let uptime = Command::new("uptime")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .unwrap_or_default();
        let load = match uptime.split_once("load average:") {
            Some((_, l)) => l.trim().to_string(),
            None => std::fs::read_to_string("/proc/loadavg")
                .ok()
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
                .unwrap_or_else(|| "unknown".into()),
        };
        Machine { nproc, load }
    }
}

/// A Markdown table.
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        out.push_str(&line(&self.header));
        out.push_str(&format!(
            "|{}\n",
            self.header
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        ));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(thousands(20000), "20,000");
        assert_eq!(thousands(999), "999");
    }
}
