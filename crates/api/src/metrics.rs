//! Delivery metrics in the Prometheus text format, at `/metrics`. The delivery runner (in the binary) records
//! attempts here; gauges (deliveries per state, lag) are read from the store when scraped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Counters shared between the delivery runner and the API.
#[derive(Debug, Default)]
pub struct Metrics {
    attempts: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl Metrics {
    /// One delivery attempt to `subscription` ended with `result` (`delivered`, `failed` or `dead`).
    pub fn record_attempt(&self, subscription: &str, result: &'static str) {
        if let Ok(mut m) = self.attempts.lock() {
            *m.entry((subscription.to_string(), result)).or_insert(0) += 1;
        }
    }

    fn attempts(&self) -> Vec<((String, &'static str), u64)> {
        self.attempts
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Render counters plus the store-derived gauges.
pub fn render(
    metrics: &Metrics,
    counts: &[(String, store::DeliveryState, u64)],
    lag_seconds: &[(String, f64)],
    last_event_seq: i64,
) -> String {
    let mut out = String::new();
    out.push_str(
        "# HELP carebridge_delivery_attempts_total Delivery attempts by subscription and result.\n",
    );
    out.push_str("# TYPE carebridge_delivery_attempts_total counter\n");
    for ((sub, result), n) in metrics.attempts() {
        let _ = writeln!(
            out,
            "carebridge_delivery_attempts_total{{subscription=\"{}\",result=\"{result}\"}} {n}",
            label(&sub)
        );
    }
    out.push_str("# HELP carebridge_deliveries Deliveries by subscription and state (dead = dead letters).\n");
    out.push_str("# TYPE carebridge_deliveries gauge\n");
    for (sub, state, n) in counts {
        let _ = writeln!(
            out,
            "carebridge_deliveries{{subscription=\"{}\",state=\"{}\"}} {n}",
            label(sub),
            state.as_str()
        );
    }
    out.push_str("# HELP carebridge_delivery_lag_seconds Age of the oldest pending delivery per subscription.\n");
    out.push_str("# TYPE carebridge_delivery_lag_seconds gauge\n");
    for (sub, lag) in lag_seconds {
        let _ = writeln!(
            out,
            "carebridge_delivery_lag_seconds{{subscription=\"{}\"}} {lag:.3}",
            label(sub)
        );
    }
    out.push_str("# HELP carebridge_outbox_last_seq Highest committed outbox sequence number.\n");
    out.push_str("# TYPE carebridge_outbox_last_seq gauge\n");
    let _ = writeln!(out, "carebridge_outbox_last_seq {last_event_seq}");
    out
}
