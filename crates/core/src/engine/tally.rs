//! One job's counts, bumped once per event: each bump counts for the job's
//! report and for the process-wide [`Metrics`] (EMF and Prometheus) alike,
//! so the two cannot disagree. The engine counts the answers; the remover,
//! which runs in its own task, counts the removals through the same set.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::summary::RunSummary;
use crate::gateway::Counter;
use crate::telemetry::Metrics;

/// Shared as `Arc<Tally>` by a job's sends and its removal task.
#[derive(Debug)]
pub(crate) struct Tally {
    metrics: Arc<Metrics>,
    delivered: AtomicU64,
    gone: AtomicU64,
    /// Rows certainly gone by age, found as pages are read.
    expired: AtomicU64,
    failed: AtomicU64,
    throttled: AtomicU64,
    retries: AtomicU64,
    removed: AtomicU64,
    remove_failed: AtomicU64,
    /// Gone connections whose row key is unknown (an explicit list on a
    /// table with a composite key): not removed; the job's report counts
    /// them, and no process-wide counter does.
    remove_skipped: AtomicU64,
    /// 410s handed to the recheck queue.
    rechecking: AtomicU64,
    /// 410s that removed nothing for want of evidence.
    kept: AtomicU64,
}

impl Tally {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            delivered: AtomicU64::new(0),
            gone: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            removed: AtomicU64::new(0),
            remove_failed: AtomicU64::new(0),
            remove_skipped: AtomicU64::new(0),
            rechecking: AtomicU64::new(0),
            kept: AtomicU64::new(0),
        }
    }

    /// One answer, under its counter in the outcome table.
    pub(crate) fn answer(&self, counter: Counter) {
        let mine = match counter {
            Counter::Delivered => &self.delivered,
            Counter::Gone => &self.gone,
            Counter::Rejected => &self.failed,
            Counter::Throttled => &self.throttled,
        };
        mine.fetch_add(1, Ordering::Relaxed);
        self.metrics.count(counter);
    }

    /// One send attempt that was a retry.
    pub(crate) fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        Metrics::incr(&self.metrics.retries);
    }

    /// Rows found certainly gone by age: final, never posted to.
    pub(crate) fn expired(&self, rows: u64) {
        self.expired.fetch_add(rows, Ordering::Relaxed);
        Metrics::add(&self.metrics.expired, rows);
    }

    /// Rows deleted, gone or expired.
    pub(crate) fn removed(&self, rows: u64) {
        self.removed.fetch_add(rows, Ordering::Relaxed);
        Metrics::add(&self.metrics.removed, rows);
    }

    /// Gone rows still there after every retry.
    pub(crate) fn remove_failed(&self, rows: u64) {
        self.remove_failed.fetch_add(rows, Ordering::Relaxed);
        Metrics::add(&self.metrics.remove_failed, rows);
    }

    /// 410s handed to the recheck queue (counted there process-wide).
    pub(crate) fn rechecking(&self, rows: u64) {
        self.rechecking.fetch_add(rows, Ordering::Relaxed);
    }

    /// 410s that removed nothing for want of evidence.
    pub(crate) fn kept(&self, rows: u64) {
        self.kept.fetch_add(rows, Ordering::Relaxed);
        Metrics::add(&self.metrics.gone_kept, rows);
    }

    /// Gone connections that could not be removed for want of a row key.
    pub(crate) fn remove_skipped(&self, rows: u64) {
        self.remove_skipped.fetch_add(rows, Ordering::Relaxed);
    }

    /// Delivered and gone so far, for the progress line.
    pub(crate) fn so_far(&self) -> (u64, u64) {
        (
            self.delivered.load(Ordering::Relaxed),
            self.gone.load(Ordering::Relaxed),
        )
    }

    /// Writes the job's counts into its report.
    pub(crate) fn report(&self, report: &mut RunSummary) {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        report.delivered = get(&self.delivered);
        report.gone = get(&self.gone);
        report.expired = get(&self.expired);
        report.failed = get(&self.failed);
        report.throttled = get(&self.throttled);
        report.retries = get(&self.retries);
        report.removed = get(&self.removed);
        report.remove_failed = get(&self.remove_failed) + get(&self.remove_skipped);
        report.rechecking = get(&self.rechecking);
        report.kept = get(&self.kept);
    }

    /// Rows removed, failed and skipped so far.
    #[cfg(test)]
    pub(crate) fn removals(&self) -> (u64, u64, u64) {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        (
            get(&self.removed),
            get(&self.remove_failed),
            get(&self.remove_skipped),
        )
    }
}
