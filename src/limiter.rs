//! The process-wide send budget: PostToConnection calls per second (governor)
//! and calls in flight (a semaphore), shared by every job of the process.
//!
//! API Gateway's throttle is per account and region, so the budget belongs to
//! the process, not to a job: four concurrent jobs must not send four times
//! the configured rate. The account's other users take their share of the
//! same quota, so the rate also adapts: a 429 cuts it to the rate the
//! endpoint accepted over the last window (so it converges in one window from
//! any ceiling), and quiet time brings it back up to the configured ceiling.
//! A run of 429s on one connection while the others succeed is that client's
//! full buffer, not the account's throttle: it cuts nothing.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Semaphore, SemaphorePermit};

/// 429s arrive in clusters (every request in flight meets the same empty
/// bucket): cut the rate at most once per window, or one cluster would cut
/// it many times over.
const DECREASE_WINDOW: Duration = Duration::from_millis(250);
/// The span over which the accepted rate is measured when a 429 arrives.
const MEASURE_WINDOW: Duration = Duration::from_millis(250);
/// How often the running totals are sampled for that measure.
const SAMPLE_STEP: Duration = Duration::from_millis(25);
/// A measure over less than this (the first sends of a process) is taken
/// over this span instead: a burst accepted in a few milliseconds is not a
/// rate.
const MIN_MEASURE_SPAN: Duration = Duration::from_millis(50);
/// A cut goes this far under the accepted rate, so the throttle's bucket
/// refills while the rate holds.
const UNDER_ACCEPTED: f64 = 0.95;
/// Without a measure (no sample yet), a cut keeps this share of the rate.
const DECREASE_FACTOR: f64 = 0.8;
/// 429s in a row on one connection from which it may be that client's
/// buffer, not the account's throttle...
pub const CLIENT_STREAK: u32 = 3;
/// ...when at least this share of the other posts of the window succeeded.
const CLIENT_STREAK_OTHERS_OK: f64 = 0.9;
/// After a cut, hold the rate this long before climbing again, so the
/// throttle's bucket can refill.
const HOLD_AFTER_DECREASE: Duration = Duration::from_secs(1);
/// Climbing adds this share of the ceiling per second: slow enough that an
/// overshoot costs few 429s...
const INCREASE_PER_SECOND: f64 = 0.02;
/// ...and at most this share of the current rate per second, so a high
/// ceiling does not drive a low rate straight back into the throttle.
const INCREASE_OF_CURRENT_PER_SECOND: f64 = 0.1;
/// How often the climb is applied (rebuilding the limiter is cheap, but not
/// free).
const INCREASE_STEP: Duration = Duration::from_millis(100);
/// The rate never drops under this share of the ceiling (nor under 1/s):
/// low, because a high ceiling says little about what the endpoint takes.
const FLOOR_SHARE: f64 = 0.001;

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
}

impl SendBudget {
    pub fn new(rate: Option<RateSettings>, max_in_flight: usize) -> Self {
        Self {
            rate: rate.map(AdaptiveRate::new),
            in_flight: Semaphore::new(max_in_flight.max(1)),
        }
    }

    /// Waits for a slot in flight, then for the rate. Hold the permit for the
    /// duration of one call; do not hold it across a retry's backoff.
    pub async fn acquire(&self) -> SemaphorePermit<'_> {
        let permit = self
            .in_flight
            .acquire()
            .await
            .expect("the send semaphore is never closed");
        if let Some(rate) = &self.rate {
            rate.ceiling_wait().await;
            if let Some(slot) = rate.pace(Instant::now()) {
                tokio::time::sleep_until(slot.into()).await;
            }
        }
        permit
    }

    /// A 429 answer, the `streak`-th in a row on its connection: the
    /// endpoint wants less, unless it is that one client's buffer.
    pub fn throttled(&self, streak: u32) {
        if let Some(rate) = &self.rate {
            rate.throttled(Instant::now(), streak);
        }
    }

    /// A call the endpoint took (2xx, 410, or a 4xx about that connection):
    /// room to climb back. 5xx, 403 and timeouts say nothing about the pace
    /// the endpoint accepts, and are neither this nor a 429.
    pub fn succeeded(&self) {
        if let Some(rate) = &self.rate {
            rate.succeeded(Instant::now());
        }
    }

    /// The rate in force now, per second (`None` without a limit).
    pub fn current_rate(&self) -> Option<f64> {
        self.rate.as_ref().map(AdaptiveRate::current)
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

    /// Slots in flight available now (for tests and metrics).
    pub fn available(&self) -> usize {
        self.in_flight.available_permits()
    }
}

/// The configured rate (governor) and, under it, a rate that follows AIMD
/// between a floor and that ceiling.
#[derive(Debug)]
struct AdaptiveRate {
    settings: RateSettings,
    ceiling_limiter: DefaultDirectRateLimiter,
    /// Whose turn it is to wait on `ceiling_limiter` (FIFO).
    turn: tokio::sync::Mutex<()>,
    /// The current rate's f64 bits, read without a lock on the hot path.
    current: AtomicU64,
    /// The earliest instant the next paced send may go; only used while the
    /// current rate is under the ceiling.
    next_slot: Mutex<Instant>,
    /// Answers the endpoint accepted, and 429s, since the start: sampled
    /// into `Aimd::samples` to measure the last window.
    accepted: AtomicU64,
    refused: AtomicU64,
    /// When the next sample is due, in nanoseconds since `born`: checked
    /// without the lock on every answer.
    next_sample: AtomicU64,
    born: Instant,
    state: Mutex<Aimd>,
}

#[derive(Debug)]
struct Aimd {
    last_decrease: Option<Instant>,
    last_increase: Instant,
    /// The running totals every [`SAMPLE_STEP`] or so, oldest first, over
    /// the last two windows.
    samples: VecDeque<Sample>,
}

/// The running totals at one instant.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    accepted: u64,
    refused: u64,
}

/// What the endpoint answered over the last window.
#[derive(Clone, Copy, Debug)]
struct Window {
    accepted: u64,
    refused: u64,
    span: Duration,
}

impl AdaptiveRate {
    fn new(settings: RateSettings) -> Self {
        let ceiling = f64::from(settings.per_second.get());
        let born = Instant::now();
        Self {
            settings,
            ceiling_limiter: RateLimiter::direct(
                Quota::per_second(settings.per_second).allow_burst(settings.burst),
            ),
            turn: tokio::sync::Mutex::new(()),
            current: AtomicU64::new(ceiling.to_bits()),
            next_slot: Mutex::new(born),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            next_sample: AtomicU64::new(0),
            born,
            state: Mutex::new(Aimd {
                last_decrease: None,
                last_increase: born,
                samples: VecDeque::new(),
            }),
        }
    }

    fn ceiling(&self) -> f64 {
        f64::from(self.settings.per_second.get())
    }

    fn current(&self) -> f64 {
        f64::from_bits(self.current.load(Ordering::Relaxed))
    }

    fn set(&self, rate: f64) {
        self.current.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Waits for a cell of the configured rate.
    ///
    /// One waiter at a time (a fair lock): every waiter of governor's
    /// `until_ready` wakes for each cell, and it sleeps on a timer thread of
    /// its own (futures-timer), one precise sleep per cell. Measured at
    /// 5,000/s with 256 sends waiting: 160 µs of CPU per post, 101-112 µs
    /// with the lock alone. Here the one waiter asks governor, then sleeps
    /// on tokio's timer (1 ms granularity); cells accrued meanwhile pass the
    /// waiters queued behind it without a sleep, so the rate stays exact (up
    /// to the burst) with a wake-up per millisecond, not per cell.
    ///
    /// The clock is the limiter's own: building a quanta clock runs its
    /// CPUID feature checks, which cost tens of µs under a hypervisor, so
    /// one per send would dominate the CPU of a rate-limited run.
    async fn ceiling_wait(&self) {
        let _turn = self.turn.lock().await;
        let clock = self.ceiling_limiter.clock();
        while let Err(not_until) = self.ceiling_limiter.check() {
            tokio::time::sleep(not_until.wait_time_from(clock.now())).await;
        }
    }

    /// Reserves the next send's slot at the current rate: `None` to go now.
    /// At the ceiling governor alone paces, and this takes no lock.
    fn pace(&self, now: Instant) -> Option<Instant> {
        let rate = self.current();
        if rate >= self.ceiling() {
            return None;
        }
        let interval = Duration::from_secs_f64(1.0 / rate);
        let mut next = self.next_slot.lock().unwrap_or_else(|p| p.into_inner());
        // No credit for idle time: after a 429 there is no burst to spend.
        let slot = (*next).max(now);
        *next = slot + interval;
        (slot > now).then_some(slot)
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.born).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records the running totals if a sample is due (the caller holds the
    /// state lock), and forgets samples no window needs.
    fn sample(&self, state: &mut Aimd, now: Instant) {
        let due = self.next_sample.load(Ordering::Relaxed);
        let at = self.nanos(now);
        if at < due {
            return;
        }
        self.next_sample
            .store(at + SAMPLE_STEP.as_nanos() as u64, Ordering::Relaxed);
        state.samples.push_back(Sample {
            at: now,
            accepted: self.accepted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        });
        while state
            .samples
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) > MEASURE_WINDOW * 2)
        {
            state.samples.pop_front();
        }
    }

    /// The answers since the newest sample at least a window old (or, after
    /// idle time, the oldest one inside the window). After a cut, only what
    /// came since it counts, once that spans enough to measure: the window
    /// before it may hold a burst the throttle's bucket let through, which
    /// is not the rate it accepts.
    fn window(&self, state: &Aimd, now: Instant) -> Option<Window> {
        let since_cut = state.last_decrease.and_then(|cut| {
            state
                .samples
                .iter()
                .find(|s| s.at >= cut && now.saturating_duration_since(s.at) >= MIN_MEASURE_SPAN)
        });
        let old_enough = state
            .samples
            .iter()
            .rev()
            .find(|s| now.saturating_duration_since(s.at) >= MEASURE_WINDOW);
        let base = match (since_cut, old_enough) {
            (Some(after), Some(old)) if after.at > old.at => after,
            (Some(after), None) => after,
            (_, Some(old)) => old,
            (None, None) => state.samples.front()?,
        };
        Some(Window {
            accepted: self.accepted.load(Ordering::Relaxed) - base.accepted,
            refused: self.refused.load(Ordering::Relaxed) - base.refused,
            span: now.saturating_duration_since(base.at),
        })
    }

    fn throttled(&self, now: Instant, streak: u32) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if !self.settings.adaptive {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.sample(&mut state, now);
        let window = self.window(&state, now);
        if streak >= CLIENT_STREAK
            && window.is_some_and(|w| {
                // This connection's own run of 429s is not the others'.
                let others_refused = w.refused.saturating_sub(u64::from(streak));
                let others = w.accepted + others_refused;
                others > 0 && w.accepted as f64 >= CLIENT_STREAK_OTHERS_OK * others as f64
            })
        {
            return;
        }
        let current = self.current();
        let measured = window.filter(|w| w.accepted > 0).map(|w| {
            let accepted = w.accepted as f64 / w.span.max(MIN_MEASURE_SPAN).as_secs_f64();
            accepted.min(current) * UNDER_ACCEPTED
        });
        // A measured cut goes to a rate, not by a share, so a cluster of
        // 429s cannot compound it: it may follow the last one sooner, which
        // corrects at once a first measure that a burst inflated.
        let since_last = state.last_decrease.map(|last| now.duration_since(last));
        let target = match measured {
            Some(target) if since_last.is_none_or(|t| t >= MIN_MEASURE_SPAN) => target,
            _ if since_last.is_some_and(|t| t < DECREASE_WINDOW) => return,
            Some(target) => target,
            None => current * DECREASE_FACTOR,
        };
        if target >= current {
            return;
        }
        let floor = (self.ceiling() * FLOOR_SHARE).max(1.0);
        let rate = target.max(floor);
        state.last_decrease = Some(now);
        state.last_increase = now;
        drop(state);
        tracing::debug!(rate, "throttled: send rate lowered to the accepted rate");
        self.set(rate);
    }

    fn succeeded(&self, now: Instant) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        if !self.settings.adaptive {
            return;
        }
        let current = self.current();
        let due = self.nanos(now) >= self.next_sample.load(Ordering::Relaxed);
        if !due && current >= self.ceiling() {
            return;
        }
        // Sends succeed thousands of times a second: skip rather than wait
        // when another thread is adjusting.
        let Ok(mut state) = self.state.try_lock() else {
            return;
        };
        self.sample(&mut state, now);
        if current >= self.ceiling() {
            return;
        }
        if state
            .last_decrease
            .is_some_and(|last| now.duration_since(last) < HOLD_AFTER_DECREASE)
        {
            return;
        }
        // The climb starts when the hold ends.
        let climbing_since = match state.last_decrease {
            Some(last) => state.last_increase.max(last + HOLD_AFTER_DECREASE),
            None => state.last_increase,
        };
        let elapsed = now.saturating_duration_since(climbing_since);
        if elapsed < INCREASE_STEP {
            return;
        }
        let per_second = (self.ceiling() * INCREASE_PER_SECOND)
            .min(current * INCREASE_OF_CURRENT_PER_SECOND)
            .max(1.0);
        let rate = (current + per_second * elapsed.as_secs_f64()).min(self.ceiling());
        state.last_increase = now;
        drop(state);
        self.set(rate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(per_second: u32, adaptive: bool) -> RateSettings {
        RateSettings {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(3).unwrap(),
            adaptive,
        }
    }

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
        let budget = SendBudget::new(Some(settings(10, true)), 100);
        for _ in 0..3 {
            drop(budget.acquire().await);
        }
        // The fourth needs a fresh cell; governor answers that without
        // waiting when asked directly.
        let rate = budget.rate.as_ref().unwrap();
        assert!(rate.ceiling_limiter.check().is_err());
    }

    #[test]
    fn throttling_cuts_the_rate_once_per_window_down_to_a_floor() {
        let rate = AdaptiveRate::new(settings(1000, true));
        let t0 = Instant::now();
        rate.throttled(t0, 1);
        assert_eq!(rate.current(), 800.0);
        // The same cluster of 429s: no second cut.
        rate.throttled(t0 + Duration::from_millis(100), 1);
        assert_eq!(rate.current(), 800.0);
        rate.throttled(t0 + DECREASE_WINDOW, 1);
        assert_eq!(rate.current(), 640.0);
        for n in 2..100 {
            rate.throttled(t0 + DECREASE_WINDOW * n, 1);
        }
        assert_eq!(rate.current(), 1.0, "0.1% of the ceiling");
    }

    #[test]
    fn quiet_time_climbs_back_to_the_ceiling_and_no_further() {
        let rate = AdaptiveRate::new(settings(1000, true));
        let t0 = Instant::now();
        rate.throttled(t0, 1);
        // Held right after the cut.
        rate.succeeded(t0 + Duration::from_millis(500));
        assert_eq!(rate.current(), 800.0);
        // 2% of the ceiling per second after the hold.
        rate.succeeded(t0 + HOLD_AFTER_DECREASE + Duration::from_secs(1));
        assert!((rate.current() - 820.0).abs() < 1e-6, "{}", rate.current());
        rate.succeeded(t0 + Duration::from_secs(100));
        assert_eq!(rate.current(), 1000.0);
    }

    #[test]
    fn under_the_ceiling_sends_are_paced_at_the_current_rate() {
        let rate = AdaptiveRate::new(settings(1000, true));
        let t0 = Instant::now();
        assert_eq!(rate.pace(t0), None, "at the ceiling governor alone paces");
        rate.throttled(t0, 1);
        // 800/s: one slot every 1.25 ms, reserved in turn.
        let slots: Vec<_> = (0..4).map(|_| rate.pace(t0)).collect();
        assert_eq!(slots[0], None, "the first goes at once");
        let gap = Duration::from_micros(1250);
        assert_eq!(slots[1], Some(t0 + gap));
        assert_eq!(slots[3], Some(t0 + gap * 3));
        // A later cut applies to the very next reservation.
        rate.throttled(t0 + DECREASE_WINDOW, 1);
        let after = rate.pace(t0).unwrap();
        assert_eq!(after, t0 + gap * 4);
        assert_eq!(
            rate.pace(t0).unwrap() - after,
            Duration::from_nanos(1_562_500)
        );
    }

    /// `n` accepted answers spread evenly over `span` from `from`.
    fn accepted(rate: &AdaptiveRate, from: Instant, span: Duration, n: u32) {
        for i in 0..n {
            rate.succeeded(from + span * i / n);
        }
    }

    #[test]
    fn a_cut_goes_to_the_rate_accepted_over_the_last_window() {
        // A ceiling far above what the endpoint takes: one cut lands there.
        let rate = AdaptiveRate::new(settings(100_000, true));
        let t0 = Instant::now();
        accepted(&rate, t0, Duration::from_secs(1), 3000);
        rate.throttled(t0 + Duration::from_secs(1), 1);
        let target = 3000.0 * UNDER_ACCEPTED;
        assert!(
            (rate.current() - target).abs() < target * 0.05,
            "cut to {}, not to about {target}",
            rate.current()
        );
    }

    #[test]
    fn a_burst_accepted_in_a_few_milliseconds_is_not_taken_for_a_rate() {
        let rate = AdaptiveRate::new(settings(100_000, true));
        let t0 = Instant::now();
        accepted(&rate, t0, Duration::from_millis(5), 1500);
        rate.throttled(t0 + Duration::from_millis(5), 1);
        // 1,500 over the 50 ms minimum span, at most.
        assert!(rate.current() <= 30_000.0, "{}", rate.current());
        // The next window measures the steady rate.
        accepted(
            &rate,
            t0 + Duration::from_millis(5),
            Duration::from_millis(300),
            900,
        );
        rate.throttled(t0 + Duration::from_millis(305), 1);
        assert!(
            (rate.current() - 3000.0 * UNDER_ACCEPTED).abs() < 300.0,
            "{}",
            rate.current()
        );
    }

    #[test]
    fn one_clients_run_of_429s_cuts_nothing_while_the_others_succeed() {
        let rate = AdaptiveRate::new(settings(1000, true));
        let t0 = Instant::now();
        accepted(&rate, t0, Duration::from_millis(500), 500);
        let t1 = t0 + Duration::from_millis(500);
        rate.throttled(t1, CLIENT_STREAK);
        rate.throttled(t1, CLIENT_STREAK + 5);
        assert_eq!(rate.current(), 1000.0, "one slow client is not the account");
        // Its first 429s look like anyone's.
        rate.throttled(t1, 1);
        assert!(rate.current() < 1000.0);
    }

    #[test]
    fn runs_of_429s_while_the_others_are_throttled_too_cut_the_rate() {
        let rate = AdaptiveRate::new(settings(1000, true));
        let t0 = Instant::now();
        accepted(&rate, t0, Duration::from_millis(500), 100);
        let t1 = t0 + Duration::from_millis(500);
        for _ in 0..30 {
            rate.throttled(t1, CLIENT_STREAK);
        }
        assert!(rate.current() < 1000.0, "more than 10% of posts throttled");
    }

    #[test]
    fn the_climb_is_gentle_under_a_high_ceiling() {
        let rate = AdaptiveRate::new(settings(100_000, true));
        let t0 = Instant::now();
        accepted(&rate, t0, Duration::from_secs(1), 3000);
        let t1 = t0 + Duration::from_secs(1);
        rate.throttled(t1, 1);
        let cut = rate.current();
        rate.succeeded(t1 + HOLD_AFTER_DECREASE + Duration::from_secs(1));
        // 10% of the current rate a second, not 2% of 100,000.
        assert!(
            (rate.current() - cut * 1.1).abs() < 1.0,
            "{} after {cut}",
            rate.current()
        );
    }

    #[test]
    fn a_fixed_rate_ignores_429s() {
        let rate = AdaptiveRate::new(settings(1000, false));
        rate.throttled(Instant::now(), 1);
        assert_eq!(rate.current(), 1000.0);
    }
}
