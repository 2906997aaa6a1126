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
            /// This task's share of the fleet's rate, per second, rounded (a
            /// gauge; 0 without a fleet, while idle or while joining).
            pub fleet_share_per_second: AtomicU64,
            /// Live leases in the fleet table, this task's among them (a
            /// gauge; 0 without a fleet).
            pub fleet_tasks: AtomicU64,
            /// 1 while the fleet table cannot be reached and this task sends
            /// at the fallback rate, else 0 (a gauge).
            pub fleet_on_fallback: AtomicU64,
            /// The running broadcasts' latest progress figures.
            pub running: Running,
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
            pub fleet_share_per_second: u64,
            pub fleet_tasks: u64,
            pub fleet_on_fallback: u64,
            /// Delivered so far by the broadcasts running now (a gauge).
            pub progress_delivered: u64,
            /// Gone so far in the broadcasts running now (a gauge).
            pub progress_gone: u64,
            /// Their deliveries per second over their last progress
            /// interval, summed (a gauge).
            pub progress_rate_per_second: u64,
            /// The least done of them whose share is known, in percent
            /// (a gauge; 0 when none is known).
            pub progress_share_percent: u64,
            /// The longest estimated time left among them, in seconds (a
            /// gauge; 0 when none is known).
            pub progress_eta_seconds: u64,
        }

        impl Snapshot {
            pub fn read(m: &Metrics) -> Self {
                let g = Metrics::get;
                let running = m.running.totals();
                Self {
                    $( $field: g(&m.$field), )*
                    jobs_in_flight: g(&m.jobs_in_flight),
                    job_duration_ms_sum: g(&m.job_duration_ms_sum),
                    job_duration_count: g(&m.job_duration_count),
                    last_poll_unix_ms: g(&m.last_poll_unix_ms),
                    fleet_share_per_second: g(&m.fleet_share_per_second),
                    fleet_tasks: g(&m.fleet_tasks),
                    fleet_on_fallback: g(&m.fleet_on_fallback),
                    progress_delivered: running.delivered,
                    progress_gone: running.gone,
                    progress_rate_per_second: running.rate_per_second,
                    progress_share_percent: running.share_percent,
                    progress_eta_seconds: running.eta_seconds,
                }
            }

            /// The counts since `earlier`. Gauges (jobs in flight, last
            /// poll, the fleet's) keep their current value.
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
                    fleet_share_per_second: self.fleet_share_per_second,
                    fleet_tasks: self.fleet_tasks,
                    fleet_on_fallback: self.fleet_on_fallback,
                    progress_delivered: self.progress_delivered,
                    progress_gone: self.progress_gone,
                    progress_rate_per_second: self.progress_rate_per_second,
                    progress_share_percent: self.progress_share_percent,
                    progress_eta_seconds: self.progress_eta_seconds,
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
    /// Rows certainly gone by age, deleted without a post.
    expired: "Expired", "Rows certainly gone by age, deleted without a post";
    /// Rows deleted from the table: gone, or expired.
    removed: "Removed", "Rows deleted from the table (gone or expired)";
    /// Gone rows that could not be deleted after every retry.
    remove_failed: "RemoveFailed", "Gone rows not deleted after every retry";
    /// 410s that were not evidence yet (the connection may still have been
    /// connecting, or the endpoint had not proven itself): posted to again
    /// after the connect window.
    rechecks: "Rechecks", "410s set aside to be posted again after the connect window";
    /// Rechecked connections that took the message (they were connecting).
    recheck_delivered: "RecheckDelivered", "Rechecked connections that took the message";
    /// Rows a 410 did not remove for want of evidence (the endpoint looked
    /// wrong or unproven, or the recheck queue was full): left in the table.
    gone_kept: "GoneKept", "Rows a 410 did not remove for want of evidence";
    /// Jobs stopped because the endpoint answered like another API or stage
    /// (every post 410) or refused every post alike (404, 400, …).
    endpoint_suspect: "EndpointSuspect", "Jobs stopped because the endpoint looked misdirected or refused every post";
    /// Connections API Gateway rejected: a 4xx about that connection alone
    /// (the metric keeps its published name).
    failed: "Failed", "Connections rejected by API Gateway (a 4xx about that connection alone)";
    /// Connections still deferred when a run ended: handed on in
    /// continuation jobs, to be tried again (not final).
    deferred_at_end: "DeferredAtEnd", "Connections still deferred at a run's end, handed on to be tried again";
    /// Connections dead-lettered after being deferred across every
    /// continuation: the final count of those that never got the message.
    unreached: "Unreached", "Connections that never got the message: dead-lettered after every continuation";
    /// 429 answers.
    throttled: "Throttled", "429 answers from API Gateway";
    /// Send attempts that were retries.
    retries: "Retries", "Send attempts that were retries";
    /// Jobs that finished and were deleted from the queue.
    jobs_completed: "JobsCompleted", "Jobs finished and deleted from the queue";
    /// Whole-table jobs replaced by their segment jobs (not completed: the
    /// segments complete them).
    jobs_split: "JobsSplit", "Whole-table jobs replaced by their segment jobs";
    /// Jobs not run because their broadcast finished within the dedup
    /// window, or runs live on another task (their messages deleted or left
    /// hidden).
    jobs_duplicate: "JobsDuplicate", "Jobs not run: a broadcast already finished, or live on another task";
    /// Reads and writes of the checkpoint table that failed (delivery goes
    /// on without them).
    checkpoint_failures: "CheckpointFailures", "Checkpoint-table calls that failed; delivery went on";
    /// Jobs given back to the queue to be tried again.
    jobs_retried: "JobsRetried", "Jobs given back to the queue to be tried again";
    /// Jobs sent to the dead-letter queue (or left for the redrive policy).
    jobs_dead_lettered: "JobsDeadLettered", "Jobs sent to the dead-letter queue";
    /// Time sends waited for the send budget's rate (the fleet share, the
    /// configured and the adaptive rate), summed over sends, in ms.
    budget_wait_ms: "BudgetWaitMs", "Time sends waited for the send rate, summed over sends (ms)";
    /// Fleet lease renewals that failed or took too long (each sends at the
    /// fallback rate until the table answers again).
    fleet_renewals_failed: "FleetRenewalsFailed", "Fleet lease renewals that failed or took too long";
    /// Broadcast reports sent to a destination.
    reports_sent: "ReportsSent", "Broadcast reports sent to a destination";
    /// Broadcast reports a destination did not take (refused, unreachable
    /// or too slow); the broadcast's outcome is not changed by it.
    reports_failed: "ReportsFailed", "Broadcast reports a destination did not take";
}

/// One running broadcast's latest progress figures.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    pub delivered: u64,
    pub gone: u64,
    /// Deliveries per second over the last progress interval.
    pub rate_per_second: f64,
    /// The share of the audience done, 0 to 1, where it is known.
    pub share: Option<f64>,
    /// The time left at the run's pace so far, where the share is known
    /// and above zero.
    pub eta: Option<Duration>,
}

/// The running broadcasts' figures, each under a key of its own, summed
/// into the progress gauges when the metrics are read.
#[derive(Debug, Default)]
pub struct Running {
    next: AtomicU64,
    figures: std::sync::Mutex<std::collections::BTreeMap<u64, Figures>>,
}

/// The progress gauges, read at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunningTotals {
    pub delivered: u64,
    pub gone: u64,
    pub rate_per_second: u64,
    pub share_percent: u64,
    pub eta_seconds: u64,
}

impl Running {
    /// A key for a broadcast that starts now.
    pub fn enter(&self) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(key, Figures::default());
        key
    }

    pub fn update(&self, key: u64, figures: Figures) {
        if let Some(slot) = self.lock().get_mut(&key) {
            *slot = figures;
        }
    }

    /// The broadcast is over: its figures leave the gauges.
    pub fn leave(&self, key: u64) {
        self.lock().remove(&key);
    }

    pub fn totals(&self) -> RunningTotals {
        let figures = self.lock();
        let mut totals = RunningTotals::default();
        let mut rate = 0.0;
        let mut least_share: Option<f64> = None;
        for f in figures.values() {
            totals.delivered += f.delivered;
            totals.gone += f.gone;
            rate += f.rate_per_second;
            if let Some(share) = f.share {
                least_share = Some(least_share.map_or(share, |l| l.min(share)));
            }
            if let Some(eta) = f.eta {
                totals.eta_seconds = totals.eta_seconds.max(eta.as_secs());
            }
        }
        totals.rate_per_second = rate.round() as u64;
        totals.share_percent = least_share.map_or(0, |s| (s * 100.0).floor() as u64);
        totals
    }

    /// A poisoned lock (a panic mid-update) still holds usable figures.
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, Figures>> {
        self.figures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
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
            Counter::Rejected => &self.failed,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_gauges_keep_their_value_and_its_counters_are_exported() {
        let m = Metrics::default();
        m.fleet_share_per_second.store(500, Ordering::Relaxed);
        m.fleet_tasks.store(2, Ordering::Relaxed);
        Metrics::add(&m.budget_wait_ms, 40);
        let first = Snapshot::read(&m);
        Metrics::add(&m.budget_wait_ms, 2);
        Metrics::incr(&m.fleet_renewals_failed);
        m.fleet_on_fallback.store(1, Ordering::Relaxed);
        let d = Snapshot::read(&m).since(&first);
        assert_eq!(
            (d.fleet_share_per_second, d.fleet_tasks, d.fleet_on_fallback),
            (500, 2, 1)
        );
        assert_eq!((d.budget_wait_ms, d.fleet_renewals_failed), (2, 1));
        let exported: Vec<_> = d
            .counters()
            .into_iter()
            .map(|(emf, prometheus, _, value)| (emf, prometheus, value))
            .collect();
        assert!(exported.contains(&("BudgetWaitMs", "budget_wait_ms", 2)));
        assert!(exported.contains(&("FleetRenewalsFailed", "fleet_renewals_failed", 1)));
    }

    #[test]
    fn the_progress_gauges_sum_the_running_broadcasts_and_forget_finished_ones() {
        let m = Metrics::default();
        let (a, b) = (m.running.enter(), m.running.enter());
        m.running.update(
            a,
            Figures {
                delivered: 10,
                gone: 1,
                rate_per_second: 2.4,
                share: Some(0.5),
                eta: Some(Duration::from_secs(30)),
            },
        );
        m.running.update(
            b,
            Figures {
                delivered: 5,
                gone: 0,
                rate_per_second: 3.3,
                share: None,
                eta: None,
            },
        );
        let s = Snapshot::read(&m);
        assert_eq!(
            (
                s.progress_delivered,
                s.progress_gone,
                s.progress_rate_per_second,
                s.progress_share_percent,
                s.progress_eta_seconds
            ),
            (15, 1, 6, 50, 30)
        );
        assert_eq!(s.since(&s).progress_delivered, 15, "a gauge, not a count");
        m.running.leave(a);
        m.running.leave(b);
        assert_eq!(m.running.totals(), RunningTotals::default());
    }
}
