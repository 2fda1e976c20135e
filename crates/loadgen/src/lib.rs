//! Load generation and micro-benchmarks for Carebridge and peer FHIR servers.
//!
//! Why it exists: `cargo xtask bench` needs numbers for the hub next to a peer server, measured by the same
//! client in the same run. This crate holds that client ([`http`]), the synthetic UK Core patients
//! ([`patient`]), the Patient scenarios ([`scenario`]), the booking scenarios ([`booking`], Carebridge only)
//! and their statistics ([`stats`]); the binaries `cb-loadgen` and
//! `cb-validate-bench` are thin command lines over it.
//!
//! Invariants: nothing here panics on what a server sends; failures are counted and reported.

pub mod booking;
pub mod http;
pub mod patient;
pub mod scenario;
pub mod stats;

use std::time::Duration;

/// Parse a duration like `10s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (use e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("duration {s:?} out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("3h").is_err());
    }
}
