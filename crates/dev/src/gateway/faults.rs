//! Fault injection for POSTs (`--throttle-rps`, `--fail-percent`,
//! `--latency-ms`) and the counters tests read at `GET /{stage}/@stats`.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;

/// The faults one gateway injects, fixed at start.
#[derive(Debug)]
pub struct Faults {
    /// Lets N POSTs a second through, then answers 429. Lock-free (GCRA), so
    /// it adds no global lock to the hot path.
    throttle: Option<DefaultDirectRateLimiter>,
    fail_percent: u8,
    /// Counts fail decisions: failures are spread evenly (exactly P of each
    /// 100 POSTs fail), so tests need no tolerance for bad luck.
    fail_ticket: AtomicU64,
    latency: Duration,
}

impl Faults {
    pub fn new(throttle_rps: Option<NonZeroU32>, fail_percent: u8, latency_ms: u64) -> Self {
        Self {
            throttle: throttle_rps.map(|rps| RateLimiter::direct(Quota::per_second(rps))),
            fail_percent: fail_percent.min(100),
            fail_ticket: AtomicU64::new(0),
            latency: Duration::from_millis(latency_ms),
        }
    }

    /// Added to each POST before it is answered.
    pub fn latency(&self) -> Duration {
        self.latency
    }

    /// Whether this POST is past the configured rate.
    pub fn throttled(&self) -> bool {
        self.throttle.as_ref().is_some_and(|t| t.check().is_err())
    }

    /// Whether this POST fails with a 500 (nothing delivered).
    pub fn fails(&self) -> bool {
        if self.fail_percent == 0 {
            return false;
        }
        let n = self.fail_ticket.fetch_add(1, Ordering::Relaxed);
        spread_fails(n, self.fail_percent)
    }
}

/// True for exactly `percent` of every 100 consecutive tickets, spread out.
fn spread_fails(ticket: u64, percent: u8) -> bool {
    let p = u64::from(percent);
    (ticket + 1) * p / 100 > ticket * p / 100
}

/// Counters of the management API since start.
#[derive(Debug, Default)]
pub struct Stats {
    posts: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    delivered: AtomicU64,
    gone: AtomicU64,
    throttled: AtomicU64,
    failed: AtomicU64,
    too_large: AtomicU64,
    forbidden: AtomicU64,
    /// POSTs received per second of the Unix clock, the last
    /// [`SECONDS_KEPT`]: the rate a fleet of senders keeps, as API Gateway's
    /// own per-second throttle would see it.
    by_second: Mutex<BTreeMap<u64, u64>>,
    /// The first and the last POST, in ms since the Unix epoch (0: none).
    first_post_ms: AtomicU64,
    last_post_ms: AtomicU64,
}

/// Seconds of per-second counts kept (an hour).
const SECONDS_KEPT: usize = 3600;

/// What a POST ended as, for the counters.
#[derive(Clone, Copy, Debug)]
pub enum PostResult {
    Delivered,
    Gone,
    Throttled,
    Failed,
    TooLarge,
    Forbidden,
}

/// `GET /{stage}/@stats`: the counters as JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    /// Live WebSocket connections now.
    pub connections: u64,
    /// POST requests received, whatever their answer.
    pub posts: u64,
    /// POSTs being handled now.
    pub in_flight: u64,
    /// The most POSTs ever handled at once: checks a sender's concurrency
    /// bound from the receiving side.
    pub max_in_flight: u64,
    pub delivered: u64,
    pub gone: u64,
    pub throttled: u64,
    pub failed: u64,
    pub too_large: u64,
    pub forbidden: u64,
    /// `--sink`: distinct ids delivered to without a socket.
    #[serde(default)]
    pub sink_ids: u64,
    /// `--sink`: deliveries beyond the first, summed over those ids.
    #[serde(default)]
    pub sink_duplicates: u64,
    /// `--sink`: those ids grouped by prefix, with when each group was
    /// first and last reached.
    #[serde(default)]
    pub sink_groups: Vec<SinkGroup>,
    /// `--sink`: ids posted a payload with a `seq` (`@stats/seqs`), the
    /// highest `seq` any has had, and how many ids hold that one.
    #[serde(default)]
    pub sink_seq_ids: u64,
    #[serde(default)]
    pub sink_seq_newest: u64,
    #[serde(default)]
    pub sink_seq_holding_newest: u64,
    /// `[unix second, POSTs received in it]`, oldest first, the last hour.
    #[serde(default)]
    pub posts_per_second: Vec<(u64, u64)>,
    /// When the first and the last POST came, in ms since the Unix epoch
    /// (0: none yet): how long a broadcast took at the endpoint.
    #[serde(default)]
    pub first_post_ms: u64,
    #[serde(default)]
    pub last_post_ms: u64,
}

/// Sink ids that share a prefix (what comes before their last `-`).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SinkGroup {
    pub prefix: String,
    /// Distinct ids delivered to.
    pub ids: u64,
    /// When the first of them, and the last of them, got its first
    /// delivery (ms since the Unix epoch).
    pub first_ms: u64,
    pub last_ms: u64,
}

impl Stats {
    /// Counts a POST as started; it counts as in flight until the guard drops.
    pub fn start_post(&self) -> InFlight<'_> {
        self.posts.fetch_add(1, Ordering::Relaxed);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let second = now_ms / 1000;
        // The first one only: 0 means none yet.
        let _ =
            self.first_post_ms
                .compare_exchange(0, now_ms, Ordering::Relaxed, Ordering::Relaxed);
        self.last_post_ms.fetch_max(now_ms, Ordering::Relaxed);
        {
            let mut by_second = self.by_second.lock().unwrap_or_else(|e| e.into_inner());
            *by_second.entry(second).or_default() += 1;
            if by_second.len() > SECONDS_KEPT {
                by_second.pop_first();
            }
        }
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.max_in_flight.fetch_max(now, Ordering::AcqRel);
        InFlight(self)
    }

    pub fn record(&self, result: PostResult) {
        let counter = match result {
            PostResult::Delivered => &self.delivered,
            PostResult::Gone => &self.gone,
            PostResult::Throttled => &self.throttled,
            PostResult::Failed => &self.failed,
            PostResult::TooLarge => &self.too_large,
            PostResult::Forbidden => &self.forbidden,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self, connections: usize) -> StatsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            connections: connections as u64,
            posts: load(&self.posts),
            in_flight: load(&self.in_flight),
            max_in_flight: load(&self.max_in_flight),
            delivered: load(&self.delivered),
            gone: load(&self.gone),
            throttled: load(&self.throttled),
            failed: load(&self.failed),
            too_large: load(&self.too_large),
            forbidden: load(&self.forbidden),
            sink_ids: 0,
            sink_duplicates: 0,
            sink_groups: Vec::new(),
            sink_seq_ids: 0,
            sink_seq_newest: 0,
            sink_seq_holding_newest: 0,
            first_post_ms: load(&self.first_post_ms),
            last_post_ms: load(&self.last_post_ms),
            posts_per_second: self
                .by_second
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(&second, &n)| (second, n))
                .collect(),
        }
    }
}

/// A POST in flight; dropping it (whatever the answer) ends it.
pub struct InFlight<'a>(&'a Stats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_exactly_the_share_asked_for() {
        for percent in [0u8, 1, 10, 33, 50, 99, 100] {
            let failed = (0..1000).filter(|&n| spread_fails(n, percent)).count();
            assert_eq!(failed, usize::from(percent) * 10, "percent {percent}");
        }
    }

    #[test]
    fn no_faults_by_default() {
        let faults = Faults::new(None, 0, 0);
        assert!((0..1000).all(|_| !faults.throttled() && !faults.fails()));
        assert_eq!(faults.latency(), Duration::ZERO);
    }

    #[test]
    fn throttle_lets_the_burst_through_then_refuses() {
        let faults = Faults::new(NonZeroU32::new(5), 0, 0);
        // The burst equals the rate, and starts full.
        assert!((0..5).all(|_| !faults.throttled()));
        // Passing 1,000 more would take 200 s at 5/s.
        let refused = (0..1000).filter(|_| faults.throttled()).count();
        assert!(refused > 900, "refused {refused}");
    }

    #[test]
    fn tracks_the_most_posts_at_once() {
        let stats = Stats::default();
        let a = stats.start_post();
        let b = stats.start_post();
        drop(a);
        let c = stats.start_post();
        drop((b, c));
        stats.record(PostResult::Delivered);
        let snap = stats.snapshot(3);
        assert_eq!(
            snap.posts_per_second.iter().map(|&(_, n)| n).sum::<u64>(),
            3,
            "every POST in its second"
        );
        assert!(snap.first_post_ms > 0 && snap.first_post_ms <= snap.last_post_ms);
        assert_eq!(
            (
                snap.posts,
                snap.in_flight,
                snap.max_in_flight,
                snap.delivered,
                snap.connections
            ),
            (3, 0, 2, 1, 3)
        );
    }
}
