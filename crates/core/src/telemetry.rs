//! Telemetry: the process-wide counters that the metrics exporters
//! (CloudWatch EMF lines, Prometheus) read. The binary installs the log
//! subscriber; this crate only emits `tracing` events.
//!
//! Counters are plain atomics, bumped on the hot path with relaxed ordering:
//! they are statistics, not synchronisation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Process-wide counters since start. Shared as `Arc<Metrics>`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// PostToConnection attempts, retries included.
    pub posts: AtomicU64,
    /// Connections that took the message.
    pub delivered: AtomicU64,
    /// Connections that answered gone (410).
    pub gone: AtomicU64,
    /// Gone rows deleted from the table.
    pub removed: AtomicU64,
    /// Gone rows that could not be deleted after every retry.
    pub remove_failed: AtomicU64,
    /// Connections that did not get the message after every retry.
    pub failed: AtomicU64,
    /// 429 answers.
    pub throttled: AtomicU64,
    /// Send attempts that were retries.
    pub retries: AtomicU64,
    /// Jobs that finished and were deleted from the queue.
    pub jobs_completed: AtomicU64,
    /// Whole-table jobs replaced by their segment jobs (not completed: the
    /// segments complete them).
    pub jobs_split: AtomicU64,
    /// Jobs given back to the queue to be tried again.
    pub jobs_retried: AtomicU64,
    /// Jobs sent to the dead-letter queue (or left for the redrive policy).
    pub jobs_dead_lettered: AtomicU64,
    /// Jobs running now (a gauge).
    pub jobs_in_flight: AtomicU64,
    /// Sum of finished jobs' durations, in milliseconds.
    pub job_duration_ms_sum: AtomicU64,
    /// Finished jobs counted in `job_duration_ms_sum`.
    pub job_duration_count: AtomicU64,
    /// When the receive loop last finished a poll, in ms since the Unix
    /// epoch; the liveness check reads it.
    pub last_poll_unix_ms: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one answer under its counter in the outcome table.
    pub fn count(&self, counter: crate::gateway::Counter) {
        use crate::gateway::Counter;
        Self::incr(match counter {
            Counter::Delivered => &self.delivered,
            Counter::Gone => &self.gone,
            Counter::Failed => &self.failed,
            Counter::Throttled => &self.throttled,
        });
    }

    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn record_job_duration(&self, duration: Duration) {
        Self::add(&self.job_duration_ms_sum, duration.as_millis() as u64);
        Self::incr(&self.job_duration_count);
    }

    /// Marks the receive loop alive now.
    pub fn mark_poll(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        self.last_poll_unix_ms.store(now, Ordering::Relaxed);
    }
}
