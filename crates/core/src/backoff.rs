//! Exponential backoff with full jitter, shared by every retry in fanout.
//!
//! Full jitter (a uniform delay between zero and the exponential cap) spreads
//! retries of many concurrent sends apart, so a throttled endpoint is not hit
//! again by all of them at the same instant.

use std::time::Duration;

use rand::Rng;

/// A retry policy: how many attempts, and how long to wait between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The cap of the first retry's delay; doubles with each retry.
    pub base: Duration,
    /// No delay exceeds this.
    pub max: Duration,
    /// Attempts in all, the first one included; at least 1.
    pub max_attempts: u32,
}

impl Backoff {
    /// The exponential cap before retry number `retry` (0 for the first
    /// retry): `min(max, base * 2^retry)`.
    pub fn cap(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// A random delay in `[0, cap(retry)]`.
    pub fn delay(&self, retry: u32) -> Duration {
        let cap = self.cap(retry);
        if cap.is_zero() {
            return cap;
        }
        let nanos = rand::rng().random_range(0..=cap.as_nanos().min(u64::MAX as u128) as u64);
        Duration::from_nanos(nanos)
    }

    /// Whether another attempt may follow attempt number `attempt` (1-based).
    pub fn allows_another(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Backoff {
        Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
            max_attempts: 4,
        }
    }

    #[test]
    fn cap_doubles_then_saturates_at_max() {
        let b = policy();
        let caps: Vec<_> = (0..7).map(|r| b.cap(r).as_millis()).collect();
        assert_eq!(caps, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(b.cap(u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn delay_stays_within_cap() {
        let b = policy();
        for retry in 0..10 {
            for _ in 0..100 {
                assert!(b.delay(retry) <= b.cap(retry));
            }
        }
    }

    #[test]
    fn attempts_are_bounded() {
        let b = policy();
        assert!(b.allows_another(1));
        assert!(b.allows_another(3));
        assert!(!b.allows_another(4));
    }
}
