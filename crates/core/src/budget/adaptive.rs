//! The adaptive rate under the configured ceiling: 429s cut it to just
//! under what the throttle let through since the first of them, quiet time
//! climbs it back, a fleet share caps it, and one client's own run of 429s
//! cuts nothing.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Notify;

use super::RateSettings;

/// The span over which the others' answers are counted for the one-client
/// rule.
pub(super) const MEASURE_WINDOW: Duration = Duration::from_millis(250);
/// How often the running totals are sampled for that count.
pub(super) const SAMPLE_STEP: Duration = Duration::from_millis(25);
/// A 429 this long after the last one starts a new episode: the throttle's
/// bucket is empty again, and the rate it refills at is measured afresh
/// from there.
pub(super) const EPISODE_GAP: Duration = Duration::from_secs(1);
/// Answers through the throttle (accepted, or 5xx and the like) since the
/// episode's first 429 from which their count over that span is the
/// throttle's rate (its bucket was empty at both ends, so what it let
/// through is what it refilled: one token more or less is 5 %)...
pub(super) const MIN_ACCEPTED: u64 = 20;
/// ...or, at a rate too low to reach that count soon, the span after which
/// whatever was accepted is measure enough.
pub(super) const MAX_MEASURE_SPAN: Duration = Duration::from_millis(250);
/// A cut goes this far under the measured rate, so the throttle's bucket
/// refills while the rate holds.
pub(super) const UNDER_ACCEPTED: f64 = 0.9;
/// 429s in a row on one connection from which it may be that client's
/// buffer, not the account's throttle...
pub const CLIENT_STREAK: u32 = 3;
/// ...when at least this share of the other posts of the window succeeded.
pub(super) const CLIENT_STREAK_OTHERS_OK: f64 = 0.9;
/// After a cut, hold the rate this long before climbing again, so the
/// throttle's bucket can refill.
pub(super) const HOLD_AFTER_DECREASE: Duration = Duration::from_secs(1);
/// Climbing adds this share of the current rate per second: the rate was cut
/// to just under what the endpoint took, so the ceiling (possibly far above)
/// says nothing about how far to climb...
pub(super) const INCREASE_OF_CURRENT_PER_SECOND: f64 = 0.05;
/// ...and at most this share of the ceiling per second.
pub(super) const INCREASE_PER_SECOND: f64 = 0.02;
/// How often the climb is applied (rebuilding the limiter is cheap, but not
/// free).
pub(super) const INCREASE_STEP: Duration = Duration::from_millis(100);
/// The rate never drops under this share of the ceiling (nor under 1/s):
/// low, because a high ceiling says little about what the endpoint takes.
pub(super) const FLOOR_SHARE: f64 = 0.001;
/// The slowest pace, per second, of a positive fleet share: the adaptive
/// rate's floor too. Sends reserve their slots in turn, so a slower one
/// would hold the sends already waiting long after the share rose again;
/// only a fleet rate under its task count gives a share that small.
pub(super) const MIN_PACED_RATE: f64 = 1.0;

/// The configured rate (governor) and, under it, a rate that follows AIMD
/// between a floor and that ceiling.
#[derive(Debug)]
pub(super) struct AdaptiveRate {
    pub(super) settings: RateSettings,
    pub(super) ceiling_limiter: DefaultDirectRateLimiter,
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
    pub(super) accepted: AtomicU64,
    pub(super) refused: AtomicU64,
    /// Answers that passed the throttle without counting as accepted (5xx
    /// and the like): the throttle let them through, so its rate is
    /// measured on them too.
    pub(super) passed: AtomicU64,
    /// When the next sample is due, in nanoseconds since `born`: checked
    /// without the lock on every answer.
    next_sample: AtomicU64,
    pub(super) born: Instant,
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
    pub(super) fn new(settings: RateSettings) -> Self {
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

    pub(super) fn ceiling(&self) -> f64 {
        f64::from(self.settings.per_second.get())
    }

    pub(super) fn current(&self) -> f64 {
        f64::from_bits(self.current.load(Ordering::Relaxed))
    }

    pub(super) fn set(&self, rate: f64) {
        self.current.store(rate.to_bits(), Ordering::Relaxed);
    }

    pub(super) fn share(&self) -> f64 {
        f64::from_bits(self.share.load(Ordering::Relaxed))
    }

    pub(super) fn set_share(&self, share: Option<f64>) {
        // A share that is not a number is no share at all: hold the sends
        // rather than send without a cap.
        let share = share.map_or(f64::INFINITY, |s| if s > 0.0 { s } else { 0.0 });
        self.share.store(share.to_bits(), Ordering::Relaxed);
        if share > 0.0 {
            self.share_raised.notify_waiters();
        }
    }

    /// Waits while the share is zero; returns whether it waited.
    pub(super) async fn share_wait(&self) -> bool {
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
    /// its own (futures-timer), one precise sleep per cell, which made the
    /// waiting cost more CPU than the post. Here the one waiter asks governor, then sleeps
    /// on tokio's timer (1 ms granularity); cells accrued meanwhile pass the
    /// waiters queued behind it without a sleep, so the rate stays exact (up
    /// to the burst) with a wake-up per millisecond, not per cell.
    ///
    /// The clock is the limiter's own: building a quanta clock runs its
    /// CPUID feature checks, which are slow under a hypervisor, so one per
    /// send would dominate the CPU of a rate-limited run.
    ///
    /// Returns whether it waited (for the turn or for a cell).
    pub(super) async fn ceiling_wait(&self) -> bool {
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
    pub(super) fn pace(&self, now: Instant) -> Option<Instant> {
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

    pub(super) fn nanos(&self, at: Instant) -> u64 {
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
    pub(super) fn throttled(&self, now: Instant, sent: Instant, streak: u32) -> bool {
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

    pub(super) fn succeeded(&self, now: Instant) {
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
