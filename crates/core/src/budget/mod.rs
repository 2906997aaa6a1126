//! The process-wide send budget: PostToConnection calls per second (governor)
//! and calls in flight (a semaphore), shared by every job of the process.
//!
//! API Gateway's throttle is per account and region, so the budget belongs to
//! the process, not to a job: four concurrent jobs must not send four times
//! the configured rate. The account's other users take their share of the
//! same quota, so the rate also adapts: 429s cut it to just under the rate
//! the throttle let through since the first of them (so it converges within
//! milliseconds of the first 429s from any ceiling, whatever burst came
//! before), and quiet time brings it back up to the configured ceiling.
//! A run of 429s on one connection while the others succeed is that client's
//! full buffer, not the account's throttle: it cuts nothing.
//!
//! In a fleet (see [`crate::fleet`]) the task's share of the fleet's rate
//! caps the ceiling too: sends go at the lowest of the configured rate, the
//! share and the adaptive rate, and a share of zero holds them until it
//! rises.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

mod adaptive;

use crate::telemetry::Metrics;
use adaptive::AdaptiveRate;
pub use adaptive::CLIENT_STREAK;

/// How sends are limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateSettings {
    /// The configured rate: the ceiling the adaptive rate climbs back to.
    pub per_second: NonZeroU32,
    /// Calls allowed at once above the rate.
    pub burst: NonZeroU32,
    /// Whether 429s lower the rate (AIMD).
    pub adaptive: bool,
}

/// Rate and concurrency limits for sends.
#[derive(Debug)]
pub struct SendBudget {
    /// `None`: no rate limit (benchmarks, or an endpoint that is not API
    /// Gateway's).
    rate: Option<AdaptiveRate>,
    in_flight: Semaphore,
    /// Time sends waited for the rate since the start, in nanoseconds: the
    /// whole milliseconds it crosses go to the metrics, so waits shorter
    /// than a millisecond still add up.
    waited_ns: AtomicU64,
}

impl SendBudget {
    pub fn new(rate: Option<RateSettings>, max_in_flight: usize) -> Self {
        Self {
            rate: rate.map(AdaptiveRate::new),
            in_flight: Semaphore::new(max_in_flight.max(1)),
            waited_ns: AtomicU64::new(0),
        }
    }

    /// Waits for a slot in flight, then for the rate. Hold the permit for the
    /// duration of one call; do not hold it across a retry's backoff.
    pub async fn acquire(&self) -> SemaphorePermit<'_> {
        self.acquire_timed().await.0
    }

    /// As [`SendBudget::acquire`], and counts the time waited for the rate
    /// (the share, the configured and the adaptive rate; not the slot in
    /// flight, which waits on the endpoint's answers) in
    /// `metrics.budget_wait_ms`, summed over sends.
    pub async fn acquire_counted(&self, metrics: &Metrics) -> SemaphorePermit<'_> {
        let (permit, waited) = self.acquire_timed().await;
        self.count_wait(waited, metrics);
        permit
    }

    fn count_wait(&self, waited: Duration, metrics: &Metrics) {
        if waited.is_zero() {
            return;
        }
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        let before = self.waited_ns.fetch_add(ns, Ordering::Relaxed);
        // Each wait adds the millisecond boundaries its own nanoseconds
        // cross, so concurrent waits add up to the exact total.
        let crossed = before.saturating_add(ns) / 1_000_000 - before / 1_000_000;
        if crossed > 0 {
            Metrics::add(&metrics.budget_wait_ms, crossed);
        }
    }

    /// The slot in flight, and how long the rate then held it. Reads the
    /// clock once when nothing waits, so an unlimited send pays one clock
    /// read.
    async fn acquire_timed(&self) -> (SemaphorePermit<'_>, Duration) {
        let permit = self
            .in_flight
            .acquire()
            .await
            .expect("the send semaphore is never closed");
        let Some(rate) = &self.rate else {
            return (permit, Duration::ZERO);
        };
        let asked = Instant::now();
        let mut held = false;
        // The share first: sends it holds then queue for governor's cells
        // one by one when it rises, not all at once on cells spent earlier.
        // A share that fell to zero while this send waited for its cell
        // holds it too (the cell is lost, which only sends less).
        loop {
            held |= rate.share_wait().await;
            held |= rate.ceiling_wait().await;
            if rate.share() > 0.0 {
                break;
            }
        }
        let now = if held { Instant::now() } else { asked };
        let waited = match rate.pace(now) {
            Some(slot) => {
                tokio::time::sleep_until(slot.into()).await;
                Instant::now().saturating_duration_since(asked)
            }
            None => now.saturating_duration_since(asked),
        };
        (permit, waited)
    }

    /// Caps the rate at this task's share of the fleet's rate, per second
    /// (`None`: no fleet, the configured rate alone). The adaptive rate
    /// still cuts below it on 429s; a share of zero holds every send until
    /// the share rises. Without a rate limit there is nothing to cap, and
    /// this does nothing: a fleet needs a per-task rate.
    pub fn set_share(&self, share: Option<f64>) {
        if let Some(rate) = &self.rate {
            rate.set_share(share);
        }
    }

    /// The share set by [`SendBudget::set_share`] (`None` without a fleet
    /// or without a rate limit).
    pub fn share(&self) -> Option<f64> {
        let share = self.rate.as_ref()?.share();
        share.is_finite().then_some(share)
    }

    /// The configured rate per second: the most this task can send, and so
    /// what it asks of a fleet while it has work (`None` without a limit).
    pub fn ceiling(&self) -> Option<u32> {
        self.rate
            .as_ref()
            .map(|rate| rate.settings.per_second.get())
    }

    /// A 429 answer to a post sent at `sent`, the `streak`-th in a row on
    /// its connection: the endpoint wants less, unless it is that one
    /// client's buffer, or the post went before the last cut. Returns
    /// whether it is that one client's (see [`CLIENT_STREAK`]).
    pub fn throttled(&self, sent: Instant, streak: u32) -> bool {
        self.rate
            .as_ref()
            .is_some_and(|rate| rate.throttled(Instant::now(), sent, streak))
    }

    /// A call the endpoint took (2xx, 410, or a 4xx about that connection):
    /// room to climb back. 5xx, 403 and timeouts say nothing about the pace
    /// the endpoint accepts, and are neither this nor a 429.
    pub fn succeeded(&self) {
        if let Some(rate) = &self.rate {
            rate.succeeded(Instant::now());
        }
    }

    /// The rate in force now, per second: the adaptive rate, capped by the
    /// fleet share (`None` without a limit).
    pub fn current_rate(&self) -> Option<f64> {
        self.rate
            .as_ref()
            .map(|rate| rate.current().min(rate.share()))
    }

    /// The adaptive rate now, per second: the configured rate unless 429s
    /// cut it (`None` without a limit, or with the adaptive rate off).
    pub fn adaptive_rate(&self) -> Option<f64> {
        self.rate
            .as_ref()
            .filter(|rate| rate.settings.adaptive)
            .map(|rate| rate.current())
    }

    /// Answers counted as accepted and as throttled so far (zero without a
    /// limit).
    pub fn answers(&self) -> (u64, u64) {
        self.rate.as_ref().map_or((0, 0), |rate| {
            (
                rate.accepted.load(Ordering::Relaxed),
                rate.refused.load(Ordering::Relaxed),
            )
        })
    }

    /// An answer that passed the throttle but says nothing of the pace
    /// (5xx, 403, 413): counted for the rate the throttle lets through only.
    pub fn passed(&self) {
        if let Some(rate) = &self.rate {
            rate.passed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Slots in flight available now.
    #[cfg(test)]
    fn available(&self) -> usize {
        self.in_flight.available_permits()
    }
}

#[cfg(test)]
mod tests;
