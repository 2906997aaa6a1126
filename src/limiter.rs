//! The process-wide send budget: PostToConnection calls per second (governor)
//! and calls in flight (a semaphore), shared by every job of the process.
//!
//! API Gateway's throttle is per account and region, so the budget belongs to
//! the process, not to a job: four concurrent jobs must not send four times
//! the configured rate.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Rate and concurrency limits for sends.
#[derive(Debug)]
pub struct SendBudget {
    /// `None`: no rate limit (benchmarks, or an endpoint that is not API
    /// Gateway's).
    rate: Option<DefaultDirectRateLimiter>,
    in_flight: Semaphore,
}

impl SendBudget {
    /// `rate`: calls per second and the burst allowed above it.
    pub fn new(rate: Option<(NonZeroU32, NonZeroU32)>, max_in_flight: usize) -> Self {
        Self {
            rate: rate.map(|(per_second, burst)| {
                // A burst of one second (governor's default) would send twice
                // the rate in the first second; the caller picks a small one.
                RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst))
            }),
            in_flight: Semaphore::new(max_in_flight.max(1)),
        }
    }

    /// Waits for a slot in flight, then for the rate. Hold the permit for the
    /// duration of one call; do not hold it across a retry's backoff.
    pub async fn acquire(&self) -> SemaphorePermit<'_> {
        // The semaphore is never closed, so acquire cannot fail.
        let permit = self
            .in_flight
            .acquire()
            .await
            .expect("the send semaphore is never closed");
        if let Some(rate) = &self.rate {
            rate.until_ready().await;
        }
        permit
    }

    /// Slots in flight available now (for tests and metrics).
    pub fn available(&self) -> usize {
        self.in_flight.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_flight_is_bounded() {
        let budget = SendBudget::new(None, 2);
        let a = budget.acquire().await;
        let _b = budget.acquire().await;
        assert_eq!(budget.available(), 0);
        // A third waits until one is released.
        let third = budget.acquire();
        tokio::pin!(third);
        assert!(futures::poll!(&mut third).is_pending());
        drop(a);
        let _c = third.await;
        assert_eq!(budget.available(), 0);
    }

    #[tokio::test]
    async fn the_burst_passes_at_once_and_no_more() {
        let per_second = NonZeroU32::new(10).unwrap();
        let burst = NonZeroU32::new(3).unwrap();
        let budget = SendBudget::new(Some((per_second, burst)), 100);
        for _ in 0..3 {
            drop(budget.acquire().await);
        }
        // The fourth needs a fresh cell; governor answers that without
        // waiting when asked directly.
        let limiter = budget.rate.as_ref().unwrap();
        assert!(limiter.check().is_err());
    }
}
