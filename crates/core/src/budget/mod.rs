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

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use crate::telemetry::Metrics;

/// The span over which the others' answers are counted for the one-client
/// rule.
const MEASURE_WINDOW: Duration = Duration::from_millis(250);
/// How often the running totals are sampled for that count.
const SAMPLE_STEP: Duration = Duration::from_millis(25);
/// A 429 this long after the last one starts a new episode: the throttle's
/// bucket is empty again, and the rate it refills at is measured afresh
/// from there.
const EPISODE_GAP: Duration = Duration::from_secs(1);
/// Answers through the throttle (accepted, or 5xx and the like) since the
/// episode's first 429 from which their count over that span is the
/// throttle's rate (its bucket was empty at both ends, so what it let
/// through is what it refilled: one token more or less is 5 %)...
const MIN_ACCEPTED: u64 = 20;
/// ...or, at a rate too low to reach that count soon, the span after which
/// whatever was accepted is measure enough.
const MAX_MEASURE_SPAN: Duration = Duration::from_millis(250);
/// A cut goes this far under the measured rate, so the throttle's bucket
/// refills while the rate holds.
const UNDER_ACCEPTED: f64 = 0.9;
/// 429s in a row on one connection from which it may be that client's
/// buffer, not the account's throttle...
pub const CLIENT_STREAK: u32 = 3;
/// ...when at least this share of the other posts of the window succeeded.
const CLIENT_STREAK_OTHERS_OK: f64 = 0.9;
/// After a cut, hold the rate this long before climbing again, so the
/// throttle's bucket can refill.
const HOLD_AFTER_DECREASE: Duration = Duration::from_secs(1);
/// Climbing adds this share of the current rate per second: the rate was cut
/// to just under what the endpoint took, so the ceiling (possibly far above)
/// says nothing about how far to climb...
const INCREASE_OF_CURRENT_PER_SECOND: f64 = 0.05;
/// ...and at most this share of the ceiling per second.
const INCREASE_PER_SECOND: f64 = 0.02;
/// How often the climb is applied (rebuilding the limiter is cheap, but not
/// free).
const INCREASE_STEP: Duration = Duration::from_millis(100);
/// The rate never drops under this share of the ceiling (nor under 1/s):
/// low, because a high ceiling says little about what the endpoint takes.
const FLOOR_SHARE: f64 = 0.001;
/// The slowest pace, per second, of a positive fleet share: the adaptive
/// rate's floor too. Sends reserve their slots in turn, so a slower one
/// would hold the sends already waiting long after the share rose again;
/// only a fleet rate under its task count gives a share that small.
const MIN_PACED_RATE: f64 = 1.0;

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
    /// clock once when nothing waits, as before there was a count.
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
    /// The fleet share's f64 bits, +∞ without a fleet, so that capping by it
    /// is one `min` on the hot path whether or not there is a fleet.
    share: AtomicU64,
    /// Wakes the sends a share of zero holds.
    share_raised: Notify,
    /// The earliest instant the next paced send may go; only used while the
    /// current rate is under the ceiling.
    next_slot: Mutex<Instant>,
    /// Answers the endpoint accepted, and 429s, since the start: sampled
    /// into `Aimd::samples` to measure the last window.
    accepted: AtomicU64,
    refused: AtomicU64,
    /// Answers that passed the throttle without counting as accepted (5xx
    /// and the like): the throttle let them through, so its rate is
    /// measured on them too.
    passed: AtomicU64,
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
    /// The last 429 (of the account's throttle, not one client's).
    last_refused: Option<Instant>,
    /// Since the first 429 of the current run of them.
    episode: Option<Episode>,
    /// The running totals every [`SAMPLE_STEP`] or so, oldest first, over
    /// the last two windows.
    samples: VecDeque<Sample>,
}

/// The first 429 of a run of them: the throttle's bucket was empty then.
#[derive(Clone, Copy, Debug)]
struct Episode {
    at: Instant,
    /// The answers through the throttle (accepted or passed) before it.
    through: u64,
    /// 429s since it that were the first of their connection's run: one
    /// client's run of 429s alone is not a throttle.
    fresh: u32,
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
            share: AtomicU64::new(f64::INFINITY.to_bits()),
            share_raised: Notify::new(),
            next_slot: Mutex::new(born),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            passed: AtomicU64::new(0),
            next_sample: AtomicU64::new(0),
            born,
            state: Mutex::new(Aimd {
                last_decrease: None,
                last_increase: born,
                last_refused: None,
                episode: None,
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

    fn share(&self) -> f64 {
        f64::from_bits(self.share.load(Ordering::Relaxed))
    }

    fn set_share(&self, share: Option<f64>) {
        // A share that is not a number is no share at all: hold the sends
        // rather than send without a cap.
        let share = share.map_or(f64::INFINITY, |s| if s > 0.0 { s } else { 0.0 });
        self.share.store(share.to_bits(), Ordering::Relaxed);
        if share > 0.0 {
            self.share_raised.notify_waiters();
        }
    }

    /// Waits while the share is zero; returns whether it waited.
    async fn share_wait(&self) -> bool {
        if self.share() > 0.0 {
            return false;
        }
        loop {
            let raised = self.share_raised.notified();
            tokio::pin!(raised);
            // Registered before the check, so a rise between the check and
            // the wait is not missed.
            raised.as_mut().enable();
            if self.share() > 0.0 {
                return true;
            }
            raised.await;
        }
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
    ///
    /// Returns whether it waited (for the turn or for a cell).
    async fn ceiling_wait(&self) -> bool {
        // tokio's lock hands itself to the first waiter in line, so trying
        // first never jumps the queue.
        let (_turn, mut waited) = match self.turn.try_lock() {
            Ok(turn) => (turn, false),
            Err(_) => (self.turn.lock().await, true),
        };
        let clock = self.ceiling_limiter.clock();
        while let Err(not_until) = self.ceiling_limiter.check() {
            waited = true;
            tokio::time::sleep(not_until.wait_time_from(clock.now())).await;
        }
        waited
    }

    /// Reserves the next send's slot at the current rate, capped by the
    /// fleet share: `None` to go now. At the ceiling governor alone paces,
    /// and this takes no lock.
    fn pace(&self, now: Instant) -> Option<Instant> {
        let rate = self.current().min(self.share());
        // Zero: the share fell in the instant since this send checked it,
        // as if the send had gone a moment earlier.
        if rate >= self.ceiling() || rate <= 0.0 {
            return None;
        }
        let interval = Duration::from_secs_f64(1.0 / rate.max(MIN_PACED_RATE));
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
    /// idle time or at the start, the oldest one).
    fn window(&self, state: &Aimd, now: Instant) -> Option<Window> {
        let base = state
            .samples
            .iter()
            .rev()
            .find(|s| now.saturating_duration_since(s.at) >= MEASURE_WINDOW)
            .or(state.samples.front())?;
        Some(Window {
            accepted: self.accepted.load(Ordering::Relaxed) - base.accepted,
            refused: self.refused.load(Ordering::Relaxed) - base.refused,
        })
    }

    /// A 429 for a post sent at `sent`.
    ///
    /// The rate the throttle accepts is measured from the first 429 of a run
    /// of them, when its bucket was empty: what it let through from then to
    /// a later 429 (empty again) is what it refilled, whatever burst came
    /// before. The first 429s wait for that measure rather than guess; the
    /// rate is then cut to just under it, and every later 429 of the run
    /// measures again over the longer span, so the rate converges on the
    /// measure, it is not cut by a share that a cluster of 429s compounds.
    /// A 429 for a post sent before the last cut says nothing about the
    /// rate cut to.
    fn throttled(&self, now: Instant, sent: Instant, streak: u32) -> bool {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.sample(&mut state, now);
        // Told apart at a fixed rate too: the engine sends such a client on
        // to its deferred passes, so that its page does not hold back the
        // sends two pages on for its whole throttle deadline.
        if streak >= CLIENT_STREAK
            && self.window(&state, now).is_some_and(|w| {
                // This connection's own run of 429s is not the others'.
                let others_refused = w.refused.saturating_sub(u64::from(streak));
                let others = w.accepted + others_refused;
                others > 0 && w.accepted as f64 >= CLIENT_STREAK_OTHERS_OK * others as f64
            })
        {
            return true;
        }
        if !self.settings.adaptive {
            return false;
        }
        let through_now =
            self.accepted.load(Ordering::Relaxed) + self.passed.load(Ordering::Relaxed);
        let quiet = state
            .last_refused
            .is_none_or(|last| now.saturating_duration_since(last) >= EPISODE_GAP);
        state.last_refused = Some(now);
        if quiet {
            state.episode = Some(Episode {
                at: now,
                through: through_now,
                fresh: 0,
            });
        }
        let Some(episode) = state.episode.as_mut() else {
            return false;
        };
        if streak <= 1 {
            episode.fresh += 1;
        }
        let episode = *episode;
        if episode.fresh < 2 || state.last_decrease.is_some_and(|cut| sent < cut) {
            return false;
        }
        let through = through_now - episode.through;
        let span = now.saturating_duration_since(episode.at);
        if through < MIN_ACCEPTED && span < MAX_MEASURE_SPAN {
            return false;
        }
        let measured = through as f64 / span.as_secs_f64().max(1e-3);
        let current = self.current();
        // Not the lower of it and the current rate: under the throttle the
        // endpoint accepts no more than is sent, and a cut from a cut would
        // compound.
        let target = measured * UNDER_ACCEPTED;
        if target >= current {
            return false;
        }
        let floor = (self.ceiling() * FLOOR_SHARE).max(1.0);
        let rate = target.max(floor);
        state.last_decrease = Some(now);
        state.last_increase = now;
        drop(state);
        tracing::debug!(rate, "throttled: send rate lowered to the accepted rate");
        self.set(rate);
        false
    }

    fn succeeded(&self, now: Instant) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        let due = self.nanos(now) >= self.next_sample.load(Ordering::Relaxed);
        if !self.settings.adaptive {
            // Samples still tell one slow client from the account's
            // throttle (see `throttled`).
            if due && let Ok(mut state) = self.state.try_lock() {
                self.sample(&mut state, now);
            }
            return;
        }
        let current = self.current();
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
        let per_second = (current * INCREASE_OF_CURRENT_PER_SECOND)
            .min(self.ceiling() * INCREASE_PER_SECOND)
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
    fn under_the_ceiling_sends_are_paced_at_the_current_rate() {
        let rate = AdaptiveRate::new(settings(1000, true));
        let t0 = Instant::now();
        assert_eq!(rate.pace(t0), None, "at the ceiling governor alone paces");
        rate.set(800.0);
        // 800/s: one slot every 1.25 ms, reserved in turn.
        let slots: Vec<_> = (0..4).map(|_| rate.pace(t0)).collect();
        assert_eq!(slots[0], None, "the first goes at once");
        let gap = Duration::from_micros(1250);
        assert_eq!(slots[1], Some(t0 + gap));
        assert_eq!(slots[3], Some(t0 + gap * 3));
        // A later cut applies to the very next reservation.
        rate.set(640.0);
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

    /// A 429 to a post sent as it came back, the first of its connection.
    fn refused(rate: &AdaptiveRate, at: Instant) {
        rate.throttled(at, at, 1);
    }

    #[test]
    fn a_cut_goes_to_the_rate_accepted_since_the_first_429_not_counting_the_burst() {
        let rate = AdaptiveRate::new(settings(100_000, true));
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // A burst of 1,500 in 5 ms, then the bucket is empty.
        accepted(&rate, t0, ms(5), 1500);
        let t1 = t0 + ms(5);
        refused(&rate, t1);
        assert_eq!(rate.current(), 100_000.0, "one 429 measures nothing");
        // 3,000/s refilled and taken while most posts meet an empty bucket.
        accepted(&rate, t1, ms(10), 30);
        refused(&rate, t1 + ms(10));
        let target = 3000.0 * UNDER_ACCEPTED;
        assert!(
            (rate.current() - target).abs() < target * 0.05,
            "cut to {}, not to about {target}",
            rate.current()
        );
        // A later 429 of the same run measures over the longer span.
        accepted(&rate, t1 + ms(10), ms(90), 270);
        refused(&rate, t1 + ms(100));
        assert!(
            (rate.current() - target).abs() < target * 0.02,
            "{}",
            rate.current()
        );
    }

    #[test]
    fn a_cluster_of_429s_to_posts_sent_before_the_cut_cuts_nothing_more() {
        let rate = AdaptiveRate::new(settings(100_000, true));
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        refused(&rate, t0);
        accepted(&rate, t0, ms(10), 30);
        let cut_at = t0 + ms(10);
        refused(&rate, cut_at);
        let cut = rate.current();
        // The posts in flight at the cut meet the empty bucket too.
        for n in 1..=128 {
            rate.throttled(cut_at + Duration::from_micros(n * 10), cut_at - ms(1), 1);
        }
        assert_eq!(rate.current(), cut);
    }

    #[test]
    fn nothing_accepted_for_a_while_cuts_to_the_floor() {
        let rate = AdaptiveRate::new(settings(1000, true));
        let t0 = Instant::now();
        refused(&rate, t0);
        refused(&rate, t0 + Duration::from_millis(100));
        assert_eq!(rate.current(), 1000.0, "not measured yet");
        refused(&rate, t0 + MAX_MEASURE_SPAN);
        assert_eq!(rate.current(), 1.0, "0.1% of the ceiling");
    }

    #[test]
    fn quiet_time_climbs_back_by_a_share_of_the_current_rate_up_to_the_ceiling() {
        let rate = AdaptiveRate::new(settings(100_000, true));
        let t0 = Instant::now();
        refused(&rate, t0);
        accepted(&rate, t0, Duration::from_millis(900), 2700);
        let t1 = t0 + Duration::from_millis(900);
        refused(&rate, t1);
        let cut = rate.current();
        assert!((cut - 3000.0 * UNDER_ACCEPTED).abs() < 5.0, "{cut}");
        // Held right after the cut.
        rate.succeeded(t1 + Duration::from_millis(500));
        assert_eq!(rate.current(), cut);
        // 5% of the current rate per second after the hold, not 2% of
        // 100,000.
        rate.succeeded(t1 + HOLD_AFTER_DECREASE + Duration::from_secs(1));
        assert!(
            (rate.current() - cut * 1.05).abs() < 1.0,
            "{} after {cut}",
            rate.current()
        );
        rate.succeeded(t1 + Duration::from_secs(100_000));
        assert_eq!(rate.current(), 100_000.0);
    }

    #[test]
    fn one_clients_run_of_429s_cuts_nothing_while_the_others_succeed() {
        let rate = AdaptiveRate::new(settings(1000, true));
        let t0 = Instant::now();
        accepted(&rate, t0, Duration::from_millis(500), 500);
        let t1 = t0 + Duration::from_millis(500);
        // Its first 429, then its next ones, while the others succeed.
        rate.throttled(t1, t1, 1);
        accepted(&rate, t1, Duration::from_millis(100), 100);
        let t2 = t1 + Duration::from_millis(100);
        rate.throttled(t2, t2, 2);
        rate.throttled(t2, t2, CLIENT_STREAK);
        rate.throttled(t2, t2, CLIENT_STREAK + 5);
        assert_eq!(rate.current(), 1000.0, "one slow client is not the account");
        // Another connection's first 429: the account's throttle.
        refused(&rate, t2);
        assert!(rate.current() < 1000.0);
    }

    #[test]
    fn runs_of_429s_while_the_others_are_throttled_too_cut_the_rate() {
        let rate = AdaptiveRate::new(settings(1000, true));
        let t0 = Instant::now();
        accepted(&rate, t0, Duration::from_millis(500), 100);
        let t1 = t0 + Duration::from_millis(500);
        for _ in 0..30 {
            refused(&rate, t1);
        }
        for _ in 0..30 {
            rate.throttled(t1 + MAX_MEASURE_SPAN, t1, CLIENT_STREAK);
        }
        assert!(rate.current() < 1000.0, "more than 10% of posts throttled");
    }

    /// A model of one broadcast over simulated time: a token-bucket
    /// endpoint (API Gateway's account throttle) and a sender paced by
    /// [`AdaptiveRate`], with `in_flight` connections sent to at once, as the
    /// engine does, each retrying 429s and 5xx after the engine's backoff.
    mod simulation {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;

        use super::*;
        use crate::backoff::Backoff;

        pub struct Scenario {
            /// The throttle's steady rate and burst.
            pub accepts: f64,
            pub burst: f64,
            pub connections: u32,
            /// Every `gone_every`-th connection answers 410.
            pub gone_every: u32,
            /// Share of answers that are 500, at (seeded) random.
            pub fail_share: f64,
            /// What the sender can post per second at most (the machine).
            pub sender_per_second: f64,
            pub latency: Duration,
            pub in_flight: usize,
            pub ceiling: u32,
            pub seed: u64,
        }

        #[derive(Debug)]
        pub struct Outcome {
            pub posts: u64,
            pub throttled: u64,
            pub delivered: u64,
            /// Delivered ÷ (last delivery's post − first post).
            pub delivery_rate: f64,
        }

        impl Outcome {
            pub fn throttled_share(&self) -> f64 {
                self.throttled as f64 / self.posts as f64
            }
        }

        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
        enum Event {
            /// The connection asks for its slot.
            Ready(u32),
            /// Its post reaches the endpoint.
            Post(u32),
            /// Its answer comes back: 0 accepted, 1 gone, 2 throttled, 3 500;
            /// with when it was sent, in nanoseconds.
            Answer(u32, u8, u64),
        }

        struct Xorshift(u64);

        impl Xorshift {
            fn unit(&mut self) -> f64 {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 11) as f64 / (1u64 << 53) as f64
            }
        }

        pub fn run(s: &Scenario) -> Outcome {
            let rate = AdaptiveRate::new(RateSettings {
                per_second: NonZeroU32::new(s.ceiling).unwrap(),
                burst: NonZeroU32::new(s.ceiling).unwrap(),
                adaptive: true,
            });
            let t0 = rate.born;
            let at = |ns: u64| t0 + Duration::from_nanos(ns);
            let ns = |d: Duration| d.as_nanos() as u64;
            // The engine's defaults: 100 ms doubling to 2 s, six attempts.
            let backoff = Backoff {
                base: Duration::from_millis(100),
                max: Duration::from_secs(2),
                max_attempts: 6,
            };
            let mut random = Xorshift(s.seed | 1);
            let mut events = BinaryHeap::new();
            let mut seq = 0u64;
            let mut push = |events: &mut BinaryHeap<_>, when: u64, e: Event| {
                seq += 1;
                events.push(Reverse((when, seq, e)));
            };
            let mut next_connection = 0u32;
            for _ in 0..s.in_flight.min(s.connections as usize) {
                push(&mut events, 0, Event::Ready(next_connection));
                next_connection += 1;
            }
            let mut streak = vec![0u32; s.connections as usize];
            let mut attempts = vec![0u32; s.connections as usize];
            let (mut tokens, mut filled_at) = (s.burst, 0u64);
            let mut sender_free = 0u64;
            let sender_gap = 1e9 / s.sender_per_second;
            let (mut posts, mut throttled, mut delivered) = (0u64, 0u64, 0u64);
            let (mut first_post, mut last_delivery) = (None, 0u64);
            while let Some(Reverse((now, _, event))) = events.pop() {
                match event {
                    Event::Ready(c) => {
                        let slot = rate.pace(at(now)).map_or(now, |slot| ns(slot - t0));
                        let post = slot.max(sender_free);
                        sender_free = post + sender_gap as u64;
                        push(&mut events, post, Event::Post(c));
                    }
                    Event::Post(c) => {
                        posts += 1;
                        first_post.get_or_insert(now);
                        let elapsed = (now - filled_at) as f64 / 1e9;
                        tokens = (tokens + elapsed * s.accepts).min(s.burst);
                        filled_at = now;
                        let answer = if tokens < 1.0 {
                            2
                        } else {
                            tokens -= 1.0;
                            if s.gone_every > 0 && c % s.gone_every == 0 {
                                1
                            } else if random.unit() < s.fail_share {
                                3
                            } else {
                                0
                            }
                        };
                        push(
                            &mut events,
                            now + ns(s.latency),
                            Event::Answer(c, answer, now),
                        );
                    }
                    Event::Answer(c, answer, sent) => {
                        let i = c as usize;
                        let retry = match answer {
                            0 | 1 => {
                                rate.succeeded(at(now));
                                if answer == 0 {
                                    delivered += 1;
                                    last_delivery = sent;
                                }
                                None
                            }
                            2 => {
                                throttled += 1;
                                streak[i] += 1;
                                rate.throttled(at(now), at(sent), streak[i]);
                                Some(backoff.cap(streak[i] - 1))
                            }
                            _ => {
                                rate.passed.fetch_add(1, Ordering::Relaxed);
                                streak[i] = 0;
                                attempts[i] += 1;
                                backoff
                                    .allows_another(attempts[i])
                                    .then(|| backoff.cap(attempts[i] - 1))
                            }
                        };
                        if answer != 2 {
                            streak[i] = 0;
                        }
                        match retry {
                            Some(cap) => {
                                let delay = (ns(cap) as f64 * random.unit()) as u64;
                                push(&mut events, now + delay, Event::Ready(c));
                            }
                            None if next_connection < s.connections => {
                                push(&mut events, now, Event::Ready(next_connection));
                                next_connection += 1;
                            }
                            None => {}
                        }
                    }
                }
            }
            let span = (last_delivery - first_post.unwrap_or(0)) as f64 / 1e9;
            Outcome {
                posts,
                throttled,
                delivered,
                delivery_rate: delivered as f64 / span,
            }
        }
    }

    /// The missed-clients scenario: 3,000/s with a burst of 1,500, 5 % 500s,
    /// 6,000 connections of which 10 % are gone, a 100,000/s ceiling, 128 in
    /// flight; a sender that can post 20,000/s, or only 1,200/s against the
    /// throttle scaled down five times. Over simulated time: at most 5 % of
    /// the posts throttled, and the delivery rate at least 90 % of what the
    /// endpoint accepts.
    #[test]
    fn in_simulated_time_the_rate_converges_with_few_429s() {
        use simulation::{Scenario, run};
        let issue = |seed, sender_per_second| Scenario {
            accepts: 3000.0,
            burst: 1500.0,
            connections: 6000,
            gone_every: 10,
            fail_share: 0.05,
            sender_per_second,
            latency: Duration::from_millis(1),
            in_flight: 128,
            ceiling: 100_000,
            seed,
        };
        let scaled = |seed| Scenario {
            accepts: 600.0,
            burst: 300.0,
            connections: 3000,
            gone_every: 0,
            fail_share: 0.0,
            sender_per_second: 1200.0,
            latency: Duration::from_millis(2),
            in_flight: 128,
            ceiling: 100_000,
            seed,
        };
        for (name, scenario) in [
            ("issue, fast sender", issue(1, 20_000.0)),
            ("issue, fast sender", issue(2, 20_000.0)),
            ("issue, faster sender", issue(3, 100_000.0)),
            ("scaled down", scaled(4)),
            ("scaled down", scaled(5)),
        ] {
            let out = run(&scenario);
            let accepts = scenario.accepts;
            println!(
                "{name}: {out:?}, {:.2} % throttled, {:.0} % of {accepts}/s",
                out.throttled_share() * 100.0,
                out.delivery_rate / accepts * 100.0
            );
            let gone = if scenario.gone_every > 0 {
                scenario.connections.div_ceil(scenario.gone_every)
            } else {
                0
            };
            assert_eq!(out.delivered, u64::from(scenario.connections - gone));
            assert!(out.throttled_share() <= 0.05, "{name}: {out:?}");
            assert!(out.delivery_rate >= 0.9 * accepts, "{name}: {out:?}");
        }
    }

    #[test]
    fn a_fixed_rate_ignores_429s() {
        let rate = AdaptiveRate::new(settings(1000, false));
        let t0 = Instant::now();
        for n in 0..100 {
            refused(&rate, t0 + Duration::from_millis(n * 10));
        }
        assert_eq!(rate.current(), 1000.0);
    }

    #[test]
    fn a_fixed_rate_still_tells_one_slow_client_from_the_account() {
        let rate = AdaptiveRate::new(settings(1000, false));
        let t0 = Instant::now();
        accepted(&rate, t0, Duration::from_millis(500), 500);
        let t1 = t0 + Duration::from_millis(500);
        assert!(!rate.throttled(t1, t1, 1), "one 429 is no run");
        accepted(&rate, t1, Duration::from_millis(100), 100);
        let t2 = t1 + Duration::from_millis(100);
        assert!(
            rate.throttled(t2, t2, CLIENT_STREAK),
            "a run of 429s on one connection while the others succeed"
        );
        assert_eq!(rate.current(), 1000.0, "a fixed rate is never cut");
    }
    #[test]
    fn a_share_under_the_ceiling_paces_sends_at_the_share() {
        let rate = AdaptiveRate::new(settings(1000, true));
        let t0 = Instant::now();
        rate.set_share(Some(500.0));
        assert_eq!(rate.pace(t0), None, "the first goes at once");
        assert_eq!(rate.pace(t0), Some(t0 + Duration::from_millis(2)));
        // A share above the ceiling leaves the ceiling to governor.
        rate.set_share(Some(5000.0));
        assert_eq!(rate.pace(t0), None);
        rate.set_share(None);
        assert_eq!(rate.pace(t0), None);
    }

    #[test]
    fn the_adaptive_rate_still_cuts_below_the_share() {
        let budget = SendBudget::new(Some(settings(100_000, true)), 8);
        budget.set_share(Some(5000.0));
        assert_eq!(budget.current_rate(), Some(5000.0));
        let rate = budget.rate.as_ref().unwrap();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // The endpoint takes 3,000/s: the cut goes under that, under the
        // share.
        refused(rate, t0);
        accepted(rate, t0, ms(10), 30);
        refused(rate, t0 + ms(10));
        let cut = budget.current_rate().unwrap();
        assert!((cut - 3000.0 * UNDER_ACCEPTED).abs() < 150.0, "{cut}");
        // A share under the cut caps it again.
        budget.set_share(Some(1000.0));
        assert_eq!(budget.current_rate(), Some(1000.0));
        assert_eq!(budget.share(), Some(1000.0));
        budget.set_share(None);
        assert_eq!(budget.share(), None);
    }

    #[tokio::test]
    async fn a_share_of_zero_holds_sends_until_it_rises() {
        let budget = SendBudget::new(Some(settings(1000, true)), 8);
        budget.set_share(Some(0.0));
        let held = budget.acquire();
        tokio::pin!(held);
        assert!(futures::poll!(&mut held).is_pending());
        assert!(futures::poll!(&mut held).is_pending(), "still held");
        budget.set_share(Some(100.0));
        let _sent = held.await;
        // Not a number is no share: held, not unlimited.
        budget.set_share(Some(f64::NAN));
        assert_eq!(budget.share(), Some(0.0));
    }

    #[test]
    fn without_a_rate_limit_a_share_changes_nothing() {
        let budget = SendBudget::new(None, 8);
        budget.set_share(Some(0.0));
        assert_eq!(budget.share(), None);
        assert_eq!(budget.ceiling(), None);
        assert_eq!(
            SendBudget::new(Some(settings(700, false)), 8).ceiling(),
            Some(700)
        );
    }

    #[test]
    fn waits_add_up_to_whole_milliseconds_without_losing_the_short_ones() {
        let budget = SendBudget::new(Some(settings(1000, true)), 8);
        let metrics = Metrics::default();
        for _ in 0..5 {
            budget.count_wait(Duration::from_micros(400), &metrics);
        }
        assert_eq!(Metrics::get(&metrics.budget_wait_ms), 2, "2.0 ms in all");
        budget.count_wait(Duration::from_millis(7), &metrics);
        assert_eq!(Metrics::get(&metrics.budget_wait_ms), 9);
        budget.count_wait(Duration::ZERO, &metrics);
        assert_eq!(Metrics::get(&metrics.budget_wait_ms), 9);
    }
}
