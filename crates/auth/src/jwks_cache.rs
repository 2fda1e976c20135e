//! The decisions of a JWKS URL cache: when a client's key set must be fetched, when a cached one is used, and
//! when an unknown `kid` may trigger a refetch (rate-limited per URL, so assertions with made-up `kid`s cannot
//! turn the hub into a load generator against a client's key server). The caller does the fetching and passes
//! the clock in (milliseconds since the epoch).

use crate::jose::{Jwk, Jwks};
use std::collections::HashMap;

/// How long a fetched key set is used when the response says nothing (`Cache-Control: max-age`), ms.
pub const DEFAULT_TTL_MS: i64 = 300_000;
/// Longest a key set is cached whatever the response says, ms.
pub const MAX_TTL_MS: i64 = 86_400_000;
/// Shortest time between two fetches of one URL (also the shortest cache lifetime), ms.
pub const MIN_REFETCH_MS: i64 = 5_000;

/// What to do for an assertion's `kid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// This cached key verifies it.
    Use(Jwk),
    /// Fetch the URL, record the outcome, then decide again.
    Fetch,
    /// The key set is current (or was fetched too recently to fetch again) and has no such `kid`.
    Unknown,
    /// The last fetch failed (too recently to retry) and no current key set is cached: why.
    Failed(String),
}

#[derive(Debug, Clone)]
struct Entry {
    jwks: Option<Jwks>,
    /// When the key set stops being current.
    expires_ms: i64,
    /// Last fetch attempt (successful or not).
    attempt_ms: i64,
    /// Why the last attempt failed, when it did.
    error: Option<String>,
}

/// Key sets by URL.
#[derive(Debug, Clone, Default)]
pub struct JwksCache {
    entries: HashMap<String, Entry>,
}

impl JwksCache {
    /// Decide for `kid` of the key set at `url`, at `now_ms`.
    pub fn decide(&self, url: &str, kid: &str, now_ms: i64) -> Decision {
        let Some(e) = self.entries.get(url) else {
            return Decision::Fetch;
        };
        let current = e.jwks.as_ref().filter(|_| now_ms < e.expires_ms);
        if let Some(key) = current.and_then(|j| j.find(kid)) {
            return Decision::Use(key.clone());
        }
        if now_ms - e.attempt_ms >= MIN_REFETCH_MS {
            return Decision::Fetch;
        }
        match (&e.error, current) {
            (Some(err), None) => Decision::Failed(err.clone()),
            (None, None) => Decision::Fetch,
            _ => Decision::Unknown,
        }
    }

    /// Record a successful fetch; `max_age_s` is the response's `Cache-Control: max-age`, when it had one.
    pub fn fetched(&mut self, url: &str, jwks: Jwks, max_age_s: Option<i64>, now_ms: i64) {
        let ttl = max_age_s
            .map(|s| s.saturating_mul(1000))
            .unwrap_or(DEFAULT_TTL_MS)
            .clamp(MIN_REFETCH_MS, MAX_TTL_MS);
        self.entries.insert(
            url.to_string(),
            Entry {
                jwks: Some(jwks),
                expires_ms: now_ms + ttl,
                attempt_ms: now_ms,
                error: None,
            },
        );
    }

    /// Record a failed fetch. A previously fetched key set stays usable until it expires.
    pub fn failed(&mut self, url: &str, error: String, now_ms: i64) {
        let e = self.entries.entry(url.to_string()).or_insert(Entry {
            jwks: None,
            expires_ms: 0,
            attempt_ms: now_ms,
            error: None,
        });
        e.attempt_ms = now_ms;
        e.error = Some(error);
    }
}

/// The `max-age` of a `Cache-Control` header value, seconds (`no-store` and `no-cache` count as 0).
pub fn max_age(cache_control: &str) -> Option<i64> {
    let mut out = None;
    for d in cache_control.split(',') {
        let d = d.trim().to_ascii_lowercase();
        if d == "no-store" || d == "no-cache" {
            return Some(0);
        }
        if let Some(v) = d.strip_prefix("max-age=") {
            out = v.trim_matches('"').parse::<i64>().ok().map(|s| s.max(0));
        }
    }
    out
}
