//! A running broadcast's progress: every progress interval, one log line
//! with what it has done so far, its rate over the last interval and, where
//! the share of the audience done is known, an estimate of the time left;
//! the same figures go to the progress gauges in [`Metrics`].
//!
//! The share is known for an explicit list (connections answered / listed)
//! and for a whole-table scan in several parallel segments (segments done /
//! segments). A channel, a single scan segment or a resumed run has no
//! share: its audience's size is not known before it is read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::task::AbortOnDropHandle;

use crate::engine::resume::ResumePoints;
use crate::engine::tally::Tally;
use crate::job::Job;
use crate::job::keys::RunKey;
use crate::telemetry::{Figures, Metrics};

/// How the share of a run's audience that is done can be known.
pub(crate) enum Share {
    Unknown,
    /// An explicit list: answers so far of `total`.
    Listed {
        answers: Arc<AtomicU64>,
        total: u64,
    },
    /// A parallel scan: segments done of `total`.
    Segments {
        progress: Arc<Mutex<ResumePoints>>,
        total: u32,
    },
}

impl Share {
    fn fraction(&self) -> Option<f64> {
        let (done, total) = match self {
            Self::Unknown => return None,
            Self::Listed { answers, total } => (answers.load(Ordering::Relaxed), *total),
            Self::Segments { progress, total } => {
                let progress = progress
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                (u64::from(progress.segments_done()), u64::from(*total))
            }
        };
        (total > 0).then(|| (done as f64 / total as f64).min(1.0))
    }
}

/// The figures of one progress line: `delivered` and `gone` so far,
/// `previous` delivered at the last line, `interval` since it, `elapsed`
/// since the run began.
pub(crate) fn figures(
    (delivered, gone): (u64, u64),
    previous: u64,
    interval: Duration,
    elapsed: Duration,
    share: Option<f64>,
) -> Figures {
    let secs = interval.as_secs_f64();
    let rate_per_second = if secs > 0.0 {
        delivered.saturating_sub(previous) as f64 / secs
    } else {
        0.0
    };
    // At the pace of the run so far: what is left takes (1 - s) / s of the
    // time the share s took.
    let eta = share
        .filter(|s| *s > 0.0)
        .map(|s| elapsed.mul_f64((1.0 - s) / s));
    Figures {
        delivered,
        gone,
        rate_per_second,
        share,
        eta,
    }
}

/// Logs the run's progress every `interval` until the handle is dropped.
pub(crate) fn spawn(
    job: &Job,
    counts: Arc<Tally>,
    share: Share,
    metrics: Arc<Metrics>,
    interval: Duration,
) -> AbortOnDropHandle<()> {
    let run = RunKey::of(job);
    let job_id = job.id.clone();
    AbortOnDropHandle::new(tokio::spawn(async move {
        // Dropped when the task is aborted: the run leaves the gauges.
        struct Entry(Arc<Metrics>, u64);
        impl Drop for Entry {
            fn drop(&mut self) {
                self.0.running.leave(self.1);
            }
        }
        let entry = Entry(metrics.clone(), metrics.running.enter());
        let started = Instant::now();
        let mut ticks = tokio::time::interval_at(started + interval, interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let (mut previous, mut last) = (0, started);
        loop {
            let now = ticks.tick().await;
            let f = figures(
                counts.so_far(),
                previous,
                now - last,
                now - started,
                share.fraction(),
            );
            (previous, last) = (f.delivered, now);
            metrics.running.update(entry.1, f);
            let rate_per_second = f.rate_per_second.round() as u64;
            match (f.share, f.eta) {
                (Some(share), Some(eta)) => tracing::info!(
                    job_id = %job_id,
                    run = %run,
                    delivered = f.delivered,
                    gone = f.gone,
                    rate_per_second,
                    share_done = (share * 1000.0).round() / 1000.0,
                    eta_seconds = eta.as_secs(),
                    "broadcast progress"
                ),
                (Some(share), None) => tracing::info!(
                    job_id = %job_id,
                    run = %run,
                    delivered = f.delivered,
                    gone = f.gone,
                    rate_per_second,
                    share_done = share,
                    "broadcast progress"
                ),
                (None, _) => tracing::info!(
                    job_id = %job_id,
                    run = %run,
                    delivered = f.delivered,
                    gone = f.gone,
                    rate_per_second,
                    "broadcast progress"
                ),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_over_the_last_interval_and_the_time_left_follows_the_share() {
        let f = figures(
            (300, 7),
            100,
            Duration::from_secs(10),
            Duration::from_secs(20),
            Some(0.25),
        );
        assert_eq!((f.delivered, f.gone), (300, 7));
        assert_eq!(f.rate_per_second, 20.0);
        // A quarter in 20 s: three quarters take 60 s more.
        assert_eq!(f.eta, Some(Duration::from_secs(60)));
    }

    #[test]
    fn without_a_share_or_before_any_there_is_no_estimate() {
        let none = figures(
            (5, 0),
            0,
            Duration::from_secs(5),
            Duration::from_secs(5),
            None,
        );
        assert_eq!((none.share, none.eta), (None, None));
        assert_eq!(none.rate_per_second, 1.0);
        let zero = figures((0, 0), 0, Duration::ZERO, Duration::ZERO, Some(0.0));
        assert_eq!(
            (zero.share, zero.eta, zero.rate_per_second),
            (Some(0.0), None, 0.0)
        );
    }

    #[test]
    fn a_listed_share_counts_answers_and_a_scan_counts_segments() {
        let answers = Arc::new(AtomicU64::new(3));
        let listed = Share::Listed {
            answers: answers.clone(),
            total: 4,
        };
        assert_eq!(listed.fraction(), Some(0.75));
        answers.store(9, Ordering::Relaxed);
        assert_eq!(listed.fraction(), Some(1.0), "never past the whole");
        let progress = Arc::new(Mutex::new(ResumePoints::starting_from(&[
            crate::store::Cursor {
                segment: 1,
                position: None,
            },
        ])));
        let scan = Share::Segments { progress, total: 4 };
        assert_eq!(scan.fraction(), Some(0.25));
        assert_eq!(Share::Unknown.fraction(), None);
    }
}
