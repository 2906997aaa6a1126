//! Telemetry: the process-wide counters that the metrics exporters
//! (CloudWatch EMF lines, Prometheus) read. The binary installs the log
//! subscriber; this crate only emits `tracing` events.
//!
//! Counters are plain atomics, bumped on the hot path with relaxed ordering:
//! they are statistics, not synchronisation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Declares the counter set once: each counter's field, its EMF name, its
/// Prometheus name (`fanout_{name}_total`) and its help text. [`Metrics`],
/// [`Snapshot`] and both exporters are generated from this one list, so a
/// counter cannot be added to one and forgotten in another.
macro_rules! counter_set {
    ($( $(#[$doc:meta])* $field:ident: $emf:literal, $help:literal; )*) => {
        /// Process-wide counters since start. Shared as `Arc<Metrics>`.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[$doc])* pub $field: AtomicU64, )*
            /// Jobs running now (a gauge).
            pub jobs_in_flight: AtomicU64,
            /// Sum of finished jobs' durations, in milliseconds.
            pub job_duration_ms_sum: AtomicU64,
            /// Finished jobs counted in `job_duration_ms_sum`.
            pub job_duration_count: AtomicU64,
            /// When the receive loop last finished a poll, in ms since the
            /// Unix epoch; the liveness check reads it.
            pub last_poll_unix_ms: AtomicU64,
        }

        /// The counters at one instant, read once so a line is consistent
        /// with itself.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct Snapshot {
            $( pub $field: u64, )*
            pub jobs_in_flight: u64,
            pub job_duration_ms_sum: u64,
            pub job_duration_count: u64,
            pub last_poll_unix_ms: u64,
        }

        impl Snapshot {
            pub fn read(m: &Metrics) -> Self {
                let g = Metrics::get;
                Self {
                    $( $field: g(&m.$field), )*
                    jobs_in_flight: g(&m.jobs_in_flight),
                    job_duration_ms_sum: g(&m.job_duration_ms_sum),
                    job_duration_count: g(&m.job_duration_count),
                    last_poll_unix_ms: g(&m.last_poll_unix_ms),
                }
            }

            /// The counts since `earlier`. Gauges (jobs in flight, last
            /// poll) keep their current value.
            pub fn since(&self, earlier: &Self) -> Self {
                Self {
                    $( $field: self.$field.saturating_sub(earlier.$field), )*
                    jobs_in_flight: self.jobs_in_flight,
                    job_duration_ms_sum: self
                        .job_duration_ms_sum
                        .saturating_sub(earlier.job_duration_ms_sum),
                    job_duration_count: self
                        .job_duration_count
                        .saturating_sub(earlier.job_duration_count),
                    last_poll_unix_ms: self.last_poll_unix_ms,
                }
            }

            /// The counters as (EMF name, Prometheus name, help, value).
            pub fn counters(&self) -> Vec<(&'static str, &'static str, &'static str, u64)> {
                vec![ $( ($emf, stringify!($field), $help, self.$field), )* ]
            }
        }
    };
}

counter_set! {
    /// PostToConnection attempts, retries included.
    posts: "Posts", "PostToConnection attempts, retries included";
    /// Connections that took the message.
    delivered: "Delivered", "Connections that took the message";
    /// Connections that answered gone (410).
    gone: "Gone", "Connections that answered gone (410)";
    /// Gone rows deleted from the table.
    removed: "Removed", "Gone rows deleted from the table";
    /// Gone rows that could not be deleted after every retry.
    remove_failed: "RemoveFailed", "Gone rows not deleted after every retry";
    /// Connections that did not get the message after every retry.
    failed: "Failed", "Connections that did not get the message after every retry";
    /// 429 answers.
    throttled: "Throttled", "429 answers from API Gateway";
    /// Send attempts that were retries.
    retries: "Retries", "Send attempts that were retries";
    /// Jobs that finished and were deleted from the queue.
    jobs_completed: "JobsCompleted", "Jobs finished and deleted from the queue";
    /// Whole-table jobs replaced by their segment jobs (not completed: the
    /// segments complete them).
    jobs_split: "JobsSplit", "Whole-table jobs replaced by their segment jobs";
    /// Jobs given back to the queue to be tried again.
    jobs_retried: "JobsRetried", "Jobs given back to the queue to be tried again";
    /// Jobs sent to the dead-letter queue (or left for the redrive policy).
    jobs_dead_lettered: "JobsDeadLettered", "Jobs sent to the dead-letter queue";
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
