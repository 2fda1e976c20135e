//! Latency and outcome statistics of one run.
//!
//! Why it exists: a benchmark number is only meaningful with its tail and its failures next to it. All latencies
//! (µs) are kept and sorted, which is exact and cheap at the request counts a 2-core machine can produce.

use std::collections::BTreeMap;
use std::time::Duration;

/// What one worker (connection) recorded.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Latency in µs of every request that got a response (any status).
    pub latencies_us: Vec<u32>,
    /// Requests that got no response (connect, i/o, protocol error or timeout).
    pub errors: u64,
    /// Responses by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// The first error message seen, and the first non-2xx status with the start of its body.
    pub first_error: Option<String>,
    pub first_non_2xx: Option<String>,
}

impl Recorder {
    pub fn response(&mut self, latency: Duration, status: u16, body: &[u8]) {
        self.response_allowing(latency, status, body, 200);
    }

    /// Like [`Recorder::response`], but a non-2xx `allowed` status (say an expected 409) is not kept as the
    /// first non-2xx example (it is still counted).
    pub fn response_allowing(&mut self, latency: Duration, status: u16, body: &[u8], allowed: u16) {
        self.latencies_us
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
        *self.statuses.entry(status).or_default() += 1;
        if !(200..300).contains(&status) && status != allowed && self.first_non_2xx.is_none() {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            self.first_non_2xx = Some(format!("{status}: {text}"));
        }
    }

    pub fn error(&mut self, msg: impl FnOnce() -> String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(msg());
        }
    }

    /// Fold another worker's records into this one.
    pub fn merge(&mut self, other: Recorder) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        for (s, n) in other.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        self.first_error = self.first_error.take().or(other.first_error);
        self.first_non_2xx = self.first_non_2xx.take().or(other.first_non_2xx);
    }
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub scenario: String,
    pub concurrency: usize,
    /// Requests that got a response, any status.
    pub responses: u64,
    pub errors: u64,
    pub non_2xx: u64,
    pub elapsed: Duration,
    /// Successful (2xx) responses per second.
    pub ok_per_s: f64,
    /// Responses (any status) per second.
    pub rps: f64,
    pub mean_us: u64,
    pub p50_us: u32,
    pub p90_us: u32,
    pub p99_us: u32,
    pub max_us: u32,
    pub statuses: BTreeMap<u16, u64>,
    pub first_error: Option<String>,
    pub first_non_2xx: Option<String>,
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Summary {
    pub fn new(
        scenario: &str,
        concurrency: usize,
        mut rec: Recorder,
        elapsed: Duration,
    ) -> Summary {
        rec.latencies_us.sort_unstable();
        let lat = &rec.latencies_us;
        let responses = lat.len() as u64;
        let ok: u64 = rec
            .statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        let secs = elapsed.as_secs_f64().max(1e-9);
        let mean_us = if lat.is_empty() {
            0
        } else {
            lat.iter().map(|&v| u64::from(v)).sum::<u64>() / responses
        };
        Summary {
            scenario: scenario.to_string(),
            concurrency,
            responses,
            errors: rec.errors,
            non_2xx: responses - ok,
            elapsed,
            ok_per_s: ok as f64 / secs,
            rps: responses as f64 / secs,
            mean_us,
            p50_us: percentile(lat, 50.0),
            p90_us: percentile(lat, 90.0),
            p99_us: percentile(lat, 99.0),
            max_us: lat.last().copied().unwrap_or(0),
            statuses: rec.statuses,
            first_error: rec.first_error,
            first_non_2xx: rec.first_non_2xx,
        }
    }

    /// One human-readable line.
    pub fn line(&self) -> String {
        let ms = |us: u32| f64::from(us) / 1000.0;
        let mut s = format!(
            "{} c={}: {:.1} ok/s ({} responses in {:.2}s), latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} errors, {} non-2xx",
            self.scenario,
            self.concurrency,
            self.ok_per_s,
            self.responses,
            self.elapsed.as_secs_f64(),
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.max_us),
            self.errors,
            self.non_2xx
        );
        if let Some(e) = &self.first_error {
            s.push_str(&format!("; first error: {e}"));
        }
        if let Some(e) = &self.first_non_2xx {
            s.push_str(&format!("; first non-2xx: {}", e.replace('\n', " ")));
        }
        s
    }

    /// One flat JSON object (numbers and strings only, so simple tools can read it).
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "scenario": self.scenario,
            "concurrency": self.concurrency,
            "responses": self.responses,
            "errors": self.errors,
            "non_2xx": self.non_2xx,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "ok_per_s": self.ok_per_s,
            "rps": self.rps,
            "mean_us": self.mean_us,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
            "max_us": self.max_us,
            "statuses": self.statuses.iter().map(|(s, n)| format!("{s}:{n}")).collect::<Vec<_>>().join(","),
            "first_error": self.first_error,
            "first_non_2xx": self.first_non_2xx,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 99.0), 7);
    }

    #[test]
    fn counts_non_2xx() {
        let mut r = Recorder::default();
        r.response(Duration::from_micros(10), 201, b"");
        r.response(Duration::from_micros(30), 422, b"bad");
        r.error(|| "refused".into());
        let s = Summary::new("create", 1, r, Duration::from_secs(1));
        assert_eq!((s.responses, s.non_2xx, s.errors), (2, 1, 1));
        assert_eq!(s.ok_per_s, 1.0);
        assert_eq!(s.max_us, 30);
    }
}
