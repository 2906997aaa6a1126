//! The renewal loop: every [`RENEW_INTERVAL`] it writes this task's lease,
//! reads the fleet's, and applies the task's share to its send budget and
//! metrics; on a clean stop it removes the lease.
//!
//! A task's demand is what it can use now ([`Claim`]): what it sent in the
//! last round with headroom, more while its share holds it back,
//! and 0 once idle for [`DEMAND_LINGER`]. A round also runs as soon as a
//! higher claim has been on record for [`JOIN_WAIT`](super::JOIN_WAIT),
//! rather than at the next renewal, so a task whose use grows takes the
//! larger share without a round's delay.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::clock::EpochClock;
use super::demand::{Claim, Round};
use super::standing::Standing;
use super::timing::{LEASE_TTL, RENEW_INTERVAL, ROUND_TIMEOUT};
use super::{FleetError, Lease, LeaseTable};
use crate::budget::SendBudget;
use crate::telemetry::Metrics;

/// How often, between rounds, a task looks whether sends queue for its
/// share (reading two counters)...
const WATCH: std::time::Duration = std::time::Duration::from_millis(100);
/// ...and how long after a round an early one may start.
const EARLY_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

/// The counters a round's claim is measured from, read at one instant.
#[derive(Clone, Copy, Debug)]
struct Counted {
    at: Instant,
    posts: u64,
    /// The budget's summed wait for the rate, in ms.
    waited_ms: u64,
}

impl Counted {
    fn read(metrics: &Metrics) -> Self {
        Self {
            at: Instant::now(),
            posts: Metrics::get(&metrics.posts),
            waited_ms: Metrics::get(&metrics.budget_wait_ms),
        }
    }
}

/// How a task takes part in the fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetSettings {
    /// The fleet's total send rate, per second: its share of the account's
    /// quota, split among the tasks.
    pub rate: NonZeroU32,
    /// This task's rate while the table cannot be reached. Every task may be
    /// on it at once, so fleet rate ÷ the most tasks that run keeps the
    /// fleet within its rate even then.
    pub fallback: NonZeroU32,
    /// This task's key in the table: unique in the fleet, stable while the
    /// process runs (a new process is a new task).
    pub task: String,
}

/// Takes this task's share of the fleet's rate, round after round.
pub struct Coordinator<T> {
    table: Arc<T>,
    budget: Arc<SendBudget>,
    /// Read for the demand (jobs in flight, posts); written with the share,
    /// the live task count, the fallback flag and failed renewals.
    metrics: Arc<Metrics>,
    settings: FleetSettings,
    clock: EpochClock,
    standing: Standing,
    claim: Claim,
    /// The counters when the last round started.
    last_round: Counted,
    /// Whether the previous round failed: the first failure of a run and
    /// the recovery are logged, not every round between.
    failing: bool,
    /// Whether the fleet was last seen with more tasks than its rate has
    /// posts per second (warned once per such spell).
    warned_thin: bool,
}

impl<T: LeaseTable> Coordinator<T> {
    /// Holds the budget's sends (a share of zero) from now until the task's
    /// lease has been read by the others: start it before the worker.
    ///
    /// The budget must be rate-limited; without a per-task rate there is no
    /// ceiling to cap, and the share is not applied.
    pub fn new(
        table: Arc<T>,
        budget: Arc<SendBudget>,
        metrics: Arc<Metrics>,
        settings: FleetSettings,
    ) -> Self {
        if budget.ceiling().is_none() {
            tracing::error!(
                "the fleet share cannot be applied without a per-task rate: set {}",
                crate::limits::setting::Setting::RatePerSecond
            );
        }
        let rate = f64::from(settings.rate.get());
        let ceiling = budget.ceiling().map_or(rate, f64::from);
        let standing = Standing::new(f64::from(settings.fallback.get()), ceiling);
        let last_round = Counted::read(&metrics);
        let coordinator = Self {
            table,
            budget,
            metrics,
            settings,
            clock: EpochClock::system(),
            standing,
            claim: Claim::new(ceiling, rate),
            last_round,
            failing: false,
            warned_thin: false,
        };
        coordinator.apply();
        coordinator
    }

    /// Reads expiries from `clock` instead of the system's (tests; skew).
    pub fn with_clock(mut self, clock: EpochClock) -> Self {
        self.clock = clock;
        self
    }

    /// Renews the lease every [`RENEW_INTERVAL`] until `stop`, then removes
    /// it. Stop it after the worker has stopped sending: from the removal on,
    /// the others may take this task's share, and the budget holds any send
    /// still asked of it.
    pub async fn run(mut self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut next = Instant::now();
        loop {
            // A round in progress is never cut short by the stop: a write
            // abandoned midway could land after the removal.
            tokio::select! {
                biased;
                () = &mut stop => break,
                () = self.until_next_round(next) => {}
            }
            let started = Instant::now();
            self.round().await;
            next = self.next_round(started);
        }
        self.leave().await;
    }

    /// Sleeps until `next`, or until sends queue for a share the task could
    /// grow: a broadcast that begins between two rounds claims more at
    /// once, rather than at the next renewal.
    async fn until_next_round(&self, next: Instant) {
        loop {
            let wake = next.min(Instant::now() + WATCH);
            tokio::time::sleep_until(wake).await;
            if wake >= next || self.queued_for_share() {
                return;
            }
        }
    }

    /// Whether, since the last round (at least [`EARLY_AFTER`] ago), sends
    /// waited for the rate as a held-back round's do, while the share (not
    /// a join, not 429s) holds the task under what it would claim. A raise
    /// still waiting to be on record does not hold the round back: small
    /// jobs raise their claim by a few posts a second now and then, and a
    /// broadcast that begins meanwhile would wait for it first.
    fn queued_for_share(&self) -> bool {
        let round = self.since_last_round(Counted::read(&self.metrics));
        round.elapsed >= EARLY_AFTER
            && round.share > 0.0
            && !round.throttled()
            && round.queued()
            && self.claim.would_grow(&round)
    }

    /// One interval after the round that started at `started` (a late round
    /// is followed by a full interval, not a catch-up burst), or sooner if
    /// a higher claim comes on record before then.
    fn next_round(&self, started: Instant) -> Instant {
        let renewal = started + RENEW_INTERVAL;
        match self.standing.pending_until() {
            // A millisecond after: the read of that round must find the
            // write on record for the whole wait.
            Some(due) => renewal.min(due + std::time::Duration::from_millis(1)),
            None => renewal,
        }
        .max(Instant::now())
    }

    /// Write, read, apply; or fall back.
    async fn round(&mut self) {
        let previous = self.standing.share();
        let demand = self.demand();
        if self.standing.sending(demand).is_some() {
            self.apply();
        }
        let outcome = match tokio::time::timeout(ROUND_TIMEOUT, self.renew(demand)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(FleetError::TimedOut(ROUND_TIMEOUT)),
        };
        match outcome {
            Ok(tasks) => {
                if self.failing {
                    tracing::info!(
                        share = self.standing.share(),
                        "the fleet table answers again: back to the fleet share"
                    );
                }
                self.failing = false;
                self.metrics.fleet_tasks.store(tasks, Ordering::Relaxed);
                let rate = u64::from(self.settings.rate.get());
                if tasks > rate && !self.warned_thin {
                    // Shares under one post a second are paced at one a
                    // second: the fleet would then send more than its rate.
                    tracing::warn!(
                        tasks,
                        fleet_rate = rate,
                        "more tasks than {} allows one post a second each: raise the fleet rate or lower the fleet's task count",
                        crate::limits::setting::Setting::FleetRatePerSecond
                    );
                }
                self.warned_thin = tasks > rate;
            }
            Err(error) => {
                Metrics::incr(&self.metrics.fleet_renewals_failed);
                let share = self.standing.failed(self.clock.now_ms());
                if !self.failing {
                    let fallback = self.settings.fallback.get();
                    if error.is_transient() {
                        tracing::warn!(%error, share, fallback, "fleet lease renewal failed: sending at the fallback rate until the fleet table answers");
                    } else {
                        tracing::error!(%error, share, fallback, "fleet lease renewal failed: sending at the fallback rate until the fleet table answers");
                    }
                }
                self.failing = true;
            }
        }
        self.apply();
        let share = self.standing.share();
        if share != previous {
            tracing::debug!(share, previous, demand, "fleet share changed");
        }
    }

    /// Writes the lease and reads the fleet's; returns the live task count.
    /// The standing learns that the table took the write as soon as it
    /// answers, even if the read then fails.
    async fn renew(&mut self, demand: f64) -> Result<u64, FleetError> {
        let lease = Lease {
            task: self.settings.task.clone(),
            demand,
            expires_at_ms: self.clock.now_ms() + LEASE_TTL.as_millis() as u64,
        };
        self.table.put(&lease).await?;
        self.standing
            .written(Instant::now(), lease.expires_at_ms, self.clock.now_ms());
        let leases = self.table.list().await?;
        let now_ms = self.clock.now_ms();
        let others: Vec<f64> = leases
            .iter()
            .filter(|l| l.task != self.settings.task && l.is_live(now_ms))
            .map(|l| l.demand)
            .collect();
        let rate = f64::from(self.settings.rate.get());
        self.standing.read(Instant::now(), rate, &others, demand);
        Ok(others.len() as u64 + 1)
    }

    /// What the task claims this round, from what it sent since the last
    /// one under the share in force meanwhile.
    fn demand(&mut self) -> f64 {
        let now = Counted::read(&self.metrics);
        let round = self.since_last_round(now);
        self.last_round = now;
        self.claim.next(round)
    }

    /// What the counters say of the time from the last round to `now`,
    /// under the share in force meanwhile.
    fn since_last_round(&self, now: Counted) -> Round {
        let then = self.last_round;
        let sent = now.posts.saturating_sub(then.posts);
        let waited_ms = now.waited_ms.saturating_sub(then.waited_ms);
        Round {
            at: now.at,
            // Small jobs end within milliseconds: one that ran between two
            // rounds counts, not only one running at the round.
            busy: Metrics::get(&self.metrics.jobs_in_flight) > 0 || sent > 0,
            sent,
            elapsed: now.at.duration_since(then.at),
            waited: std::time::Duration::from_millis(waited_ms),
            share: self.standing.share(),
            adaptive: self.budget.adaptive_rate(),
            tasks: Metrics::get(&self.metrics.fleet_tasks),
        }
    }

    /// Puts the standing's share in force: the budget, then the gauges.
    fn apply(&self) {
        let share = self.standing.share();
        self.budget.set_share(Some(share));
        let m = &self.metrics;
        m.fleet_share_per_second
            .store(share.round() as u64, Ordering::Relaxed);
        m.fleet_on_fallback
            .store(u64::from(self.standing.on_fallback()), Ordering::Relaxed);
    }

    /// Sends nothing more, then removes the lease (a failure leaves it to
    /// expire within [`LEASE_TTL`]).
    async fn leave(&mut self) {
        self.budget.set_share(Some(0.0));
        self.metrics
            .fleet_share_per_second
            .store(0, Ordering::Relaxed);
        let task = &self.settings.task;
        match tokio::time::timeout(ROUND_TIMEOUT, self.table.remove(task)).await {
            Ok(Ok(())) => tracing::debug!(task = %task, "fleet lease removed"),
            Ok(Err(error)) => {
                tracing::warn!(%error, task = %task, "could not remove the fleet lease; it expires by itself");
            }
            Err(_) => {
                tracing::warn!(task = %task, "removing the fleet lease timed out; it expires by itself");
            }
        }
        self.metrics.fleet_tasks.store(0, Ordering::Relaxed);
    }
}
