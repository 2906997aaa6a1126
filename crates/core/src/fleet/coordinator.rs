//! The renewal loop: every [`RENEW_INTERVAL`] it writes this task's lease,
//! reads the fleet's, and applies the task's share to its send budget and
//! metrics; on a clean stop it removes the lease.
//!
//! A task's demand is its configured rate (the budget's ceiling) while a
//! job runs (`Metrics::jobs_in_flight` above zero) and for [`DEMAND_LINGER`]
//! after the last one, and 0 while idle: the simplest measure of "the rate
//! it can use now". A busy task that sends
//! less (a small audience, a slow endpoint) still claims its ceiling, so
//! the others do not get the part it leaves unused until its jobs end.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::{Instant, MissedTickBehavior};

use super::clock::EpochClock;
use super::standing::Standing;
use super::timing::{DEMAND_LINGER, LEASE_TTL, RENEW_INTERVAL, ROUND_TIMEOUT};
use super::{FleetError, Lease, LeaseTable};
use crate::budget::SendBudget;
use crate::telemetry::Metrics;

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
    /// Read for the demand (jobs in flight); written with the share, the
    /// live task count, the fallback flag and failed renewals.
    metrics: Arc<Metrics>,
    settings: FleetSettings,
    clock: EpochClock,
    standing: Standing,
    /// Whether the previous round failed: the first failure of a run and
    /// the recovery are logged, not every round between.
    failing: bool,
    /// The last round that found a job running.
    last_busy: Option<Instant>,
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
        let standing = Standing::new(f64::from(settings.fallback.get()));
        let coordinator = Self {
            table,
            budget,
            metrics,
            settings,
            clock: EpochClock::system(),
            standing,
            failing: false,
            last_busy: None,
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
        let mut ticks = tokio::time::interval(RENEW_INTERVAL);
        // A late round is followed by a full interval, not a catch-up burst.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            // A round in progress is never cut short by the stop: a write
            // abandoned midway could land after the removal.
            tokio::select! {
                biased;
                () = &mut stop => break,
                _ = ticks.tick() => self.round().await,
            }
        }
        self.leave().await;
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

    /// The budget's ceiling while a job runs and for [`DEMAND_LINGER`]
    /// after, else 0.
    fn demand(&mut self) -> f64 {
        let now = Instant::now();
        if Metrics::get(&self.metrics.jobs_in_flight) > 0 {
            self.last_busy = Some(now);
        }
        let lingering = self
            .last_busy
            .is_some_and(|busy| now.duration_since(busy) < DEMAND_LINGER);
        if !lingering {
            return 0.0;
        }
        let ceiling = self.budget.ceiling().unwrap_or(self.settings.rate.get());
        f64::from(ceiling)
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
