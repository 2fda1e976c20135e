//! Retry policy: exponential backoff with full jitter, honouring `Retry-After`, with a dead-letter cut-off by
//! attempts or age.

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Try again at this instant (ms since the epoch).
    RetryAt(i64),
    /// Give up: the delivery becomes a dead letter.
    Dead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before a delivery is dead (the first attempt counts).
    pub max_attempts: u32,
    /// A delivery older than this (since its event was committed) is dead after its next failure.
    pub max_age_ms: i64,
    /// Delay ceiling of the first retry; doubles per attempt.
    pub base_delay_ms: i64,
    /// Largest delay between two attempts.
    pub max_delay_ms: i64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 12,
            max_age_ms: 24 * 3600 * 1000,
            base_delay_ms: 500,
            max_delay_ms: 15 * 60 * 1000,
        }
    }
}

impl RetryPolicy {
    /// After failed attempt number `attempt` (1-based) of a delivery whose event was committed at
    /// `created_ms`: when to retry, or dead. `retry_after_ms` is the receiver's `Retry-After` (a delay), which
    /// is honoured when it is longer than the computed backoff (but never beyond `max_delay_ms`). `random` is a
    /// uniformly random number supplied by the caller (full jitter: the delay is uniform in `[0, ceiling]`).
    pub fn after_failure(
        &self,
        attempt: u32,
        created_ms: i64,
        now_ms: i64,
        retry_after_ms: Option<i64>,
        random: u64,
    ) -> Outcome {
        if attempt >= self.max_attempts || now_ms.saturating_sub(created_ms) >= self.max_age_ms {
            return Outcome::Dead;
        }
        let exp = attempt.saturating_sub(1).min(40);
        let ceiling = self
            .base_delay_ms
            .max(1)
            .saturating_mul(1i64 << exp)
            .min(self.max_delay_ms.max(1));
        // Full jitter, but never less than a tenth of the ceiling so a failing endpoint is not hammered.
        let span = u64::try_from(ceiling).unwrap_or(1).max(1);
        let jittered = i64::try_from(random % span).unwrap_or(0).max(ceiling / 10);
        let delay = match retry_after_ms {
            Some(ra) if ra > jittered => ra.min(self.max_delay_ms),
            _ => jittered,
        };
        Outcome::RetryAt(now_ms.saturating_add(delay.max(1)))
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_jittered_within_its_ceiling() {
        let p = RetryPolicy {
            max_attempts: 10,
            max_age_ms: i64::MAX,
            base_delay_ms: 100,
            max_delay_ms: 10_000,
        };
        for attempt in 1..10u32 {
            let ceiling = (100i64 << (attempt - 1)).min(10_000);
            for r in [0u64, 1, 99, 12345, u64::MAX] {
                match p.after_failure(attempt, 0, 1_000, None, r) {
                    Outcome::RetryAt(t) => {
                        let d = t - 1_000;
                        assert!(
                            d >= ceiling / 10 && d <= ceiling,
                            "attempt {attempt}: {d} not in ({}, {ceiling})",
                            ceiling / 10
                        );
                    }
                    Outcome::Dead => panic!("dead too early"),
                }
            }
        }
        assert_eq!(p.after_failure(10, 0, 1_000, None, 0), Outcome::Dead);
    }

    #[test]
    fn retry_after_is_honoured_but_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            max_age_ms: i64::MAX,
            base_delay_ms: 100,
            max_delay_ms: 10_000,
        };
        assert_eq!(
            p.after_failure(1, 0, 0, Some(5_000), 0),
            Outcome::RetryAt(5_000)
        );
        assert_eq!(
            p.after_failure(1, 0, 0, Some(50_000), 0),
            Outcome::RetryAt(10_000)
        );
    }

    #[test]
    fn old_deliveries_die() {
        let p = RetryPolicy {
            max_attempts: 100,
            max_age_ms: 60_000,
            base_delay_ms: 100,
            max_delay_ms: 10_000,
        };
        assert_eq!(p.after_failure(1, 0, 60_000, None, 0), Outcome::Dead);
        assert!(matches!(
            p.after_failure(1, 0, 59_999, None, 0),
            Outcome::RetryAt(_)
        ));
    }
}
