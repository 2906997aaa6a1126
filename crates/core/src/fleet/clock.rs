//! The epoch time leases expire by: the wall clock read once, then carried
//! forward on tokio's monotonic clock.
//!
//! Expiries are compared across tasks, so they must be wall-clock times;
//! carried forward on the monotonic clock, a step of the system clock while
//! the task runs cannot expire its lease early or keep it alive, and tests
//! that pause tokio's clock pause this one with it.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug)]
pub struct EpochClock {
    /// The epoch time at `anchor`.
    anchor_ms: u64,
    anchor: Instant,
}

impl EpochClock {
    /// The system's wall clock, as of now.
    pub fn system() -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        Self::at(u64::try_from(now).unwrap_or(u64::MAX))
    }

    /// A clock that reads `epoch_ms` now (tests; a skewed peer).
    pub fn at(epoch_ms: u64) -> Self {
        Self {
            anchor_ms: epoch_ms,
            anchor: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.anchor.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.anchor_ms.saturating_add(elapsed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn it_moves_with_tokios_clock() {
        let clock = EpochClock::at(1_700_000_000_000);
        assert_eq!(clock.now_ms(), 1_700_000_000_000);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(clock.now_ms(), 1_700_000_001_500);
    }

    #[test]
    fn the_system_clock_reads_the_present() {
        // After 2023-11-14, the first epoch ms the tests above use.
        assert!(EpochClock::system().now_ms() > 1_700_000_000_000);
    }
}
