//! Fleets of coordinators sharing one in-memory lease table, on tokio's
//! paused clock: the shares they take, checked every millisecond of
//! simulated time against the fleet's rate, while tasks join, leave, die,
//! change their use and lose the table. Each busy task sends, every
//! millisecond, what its share allows of what it wants to send (its
//! ceiling unless a test says less), so that claims follow use as they do
//! in a process.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::budget::{RateSettings, SendBudget};
use crate::fakes::{FakeLeaseTable, FakeLeases, Xorshift};
use crate::telemetry::Metrics;

/// The epoch time at each fleet's start.
const EPOCH: u64 = 1_700_000_000_000;
/// How often the shares are checked.
const STEP: Duration = Duration::from_millis(1);
/// Sends that wait for the rate while a task is held back (its slots in
/// flight).
const SENDS_WAITING: u64 = 256;
/// Room for floating-point rounding in a sum of shares.
const ROUNDING: f64 = 1e-9;

struct Member {
    table: Arc<FakeLeaseTable>,
    budget: Arc<SendBudget>,
    metrics: Arc<Metrics>,
    ceiling: u32,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// Killed: it sends nothing any more, and never removes its lease.
    dead: bool,
    /// Posts per second it would send while busy, if its share let it.
    wants: Cell<f64>,
    /// The fraction of a post sent but not yet counted.
    carry: Cell<f64>,
}

impl Member {
    fn share(&self) -> f64 {
        self.budget
            .share()
            .expect("a fleet member's budget has a share")
    }

    fn busy(&self) -> bool {
        Metrics::get(&self.metrics.jobs_in_flight) > 0
    }

    fn set_busy(&self, busy: bool) {
        self.metrics
            .jobs_in_flight
            .store(u64::from(busy), Ordering::Relaxed);
    }

    /// Sends for `span` what its share allows of what it wants.
    fn send_for(&self, span: Duration) {
        if !self.busy() || self.dead {
            return;
        }
        let rate = self
            .share()
            .min(self.wants.get())
            .min(f64::from(self.ceiling));
        let posts = self.carry.get() + rate * span.as_secs_f64();
        self.carry.set(posts.fract());
        Metrics::add(&self.metrics.posts, posts as u64);
        if self.wants.get() > rate {
            // Held back: its slots in flight all wait for the rate.
            let waited = SENDS_WAITING * span.as_millis() as u64;
            Metrics::add(&self.metrics.budget_wait_ms, waited);
        }
    }

    fn on_fallback(&self) -> bool {
        Metrics::get(&self.metrics.fleet_on_fallback) == 1
    }

    /// Still taking part: neither stopped nor dead.
    fn live(&self) -> bool {
        !self.dead && !self.stop.is_cancelled()
    }
}

/// Tasks of one fleet, by name.
struct Fleet {
    leases: Arc<FakeLeases>,
    rate: u32,
    fallback: u32,
    clock: EpochClock,
    members: BTreeMap<String, Member>,
    /// How far the sum may go over the rate: the fallback rate of each task
    /// the test makes lose the table.
    excess: f64,
}

impl Fleet {
    fn new(rate: u32, fallback: u32) -> Self {
        Self {
            leases: Arc::new(FakeLeases::default()),
            rate,
            fallback,
            clock: EpochClock::at(EPOCH),
            members: BTreeMap::new(),
            excess: 0.0,
        }
    }

    /// Starts a task with per-task rate `ceiling`, busy or idle, whose
    /// clock is `skew_ms` ahead of the fleet's (behind if negative).
    fn join_skewed(&mut self, name: &str, ceiling: u32, busy: bool, skew_ms: i64) {
        let table = Arc::new(self.leases.connect());
        let per_second = NonZeroU32::new(ceiling).unwrap();
        let budget = Arc::new(SendBudget::new(
            Some(RateSettings {
                per_second,
                burst: per_second,
                adaptive: false,
            }),
            8,
        ));
        let metrics = Arc::new(Metrics::default());
        let settings = FleetSettings {
            rate: NonZeroU32::new(self.rate).unwrap(),
            fallback: NonZeroU32::new(self.fallback).unwrap(),
            task: name.to_owned(),
        };
        let clock = EpochClock::at(self.clock.now_ms().saturating_add_signed(skew_ms));
        let coordinator =
            Coordinator::new(table.clone(), budget.clone(), metrics.clone(), settings)
                .with_clock(clock);
        let stop = CancellationToken::new();
        let member = Member {
            table,
            budget,
            metrics,
            ceiling,
            stop: stop.clone(),
            task: tokio::spawn(coordinator.run(stop.cancelled_owned())),
            dead: false,
            wants: Cell::new(f64::INFINITY),
            carry: Cell::new(0.0),
        };
        member.set_busy(busy);
        assert_eq!(member.share(), 0.0, "a joiner starts at nothing");
        self.members.insert(name.to_owned(), member);
    }

    fn join(&mut self, name: &str, ceiling: u32, busy: bool) {
        self.join_skewed(name, ceiling, busy, 0);
    }

    /// Two busy tasks, `a` and `b`, sharing a rate of 1000 that neither's
    /// ceiling limits, settled at half each.
    async fn two_at_half(fallback: u32) -> Self {
        let mut fleet = Self::new(1000, fallback);
        fleet.join("a", 2000, true);
        fleet.join("b", 2000, true);
        fleet.run_until(SETTLE, "half each", Self::settled).await;
        fleet
    }

    /// Lets time pass until task `a` has lost the table and sends at its
    /// fallback rate.
    async fn until_a_on_the_fallback(&self, limit: Duration) {
        self.run_until(limit, "on the fallback", |f| f.member("a").on_fallback())
            .await;
    }

    fn member(&self, name: &str) -> &Member {
        &self.members[name]
    }

    fn share(&self, name: &str) -> f64 {
        self.member(name).share()
    }

    /// A clean stop, left to finish on its own (the shares are checked
    /// meanwhile).
    fn stop(&self, name: &str) {
        self.member(name).stop.cancel();
    }

    /// The task dies: it renews no more, sends no more, removes nothing.
    fn kill(&mut self, name: &str) {
        let member = self.members.get_mut(name).unwrap();
        member.task.abort();
        member.dead = true;
    }

    /// The sum of the shares of the tasks that may send.
    fn sum(&self) -> f64 {
        self.members
            .values()
            .filter(|m| !m.dead)
            .map(Member::share)
            .sum()
    }

    fn shares(&self) -> BTreeMap<&str, f64> {
        self.members
            .iter()
            .filter(|(_, m)| !m.dead)
            .map(|(name, m)| (name.as_str(), m.share()))
            .collect()
    }

    fn check(&self) {
        let bound = f64::from(self.rate) + self.excess;
        let sum = self.sum();
        assert!(
            sum <= bound * (1.0 + ROUNDING),
            "the shares add up to {sum}, over {bound}: {:?}",
            self.shares()
        );
    }

    /// One step of simulated time: every busy task sends meanwhile.
    async fn step(&self) {
        tokio::time::sleep(STEP).await;
        for member in self.members.values() {
            member.send_for(STEP);
        }
    }

    /// Lets simulated time pass, checking the sum at every step.
    async fn run_for(&self, span: Duration) {
        let end = Instant::now() + span;
        while Instant::now() < end {
            self.check();
            self.step().await;
        }
        self.check();
    }

    /// Lets time pass until `done`, checking the sum at every step; returns
    /// how long it took.
    async fn run_until(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&Self) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            self.check();
            if done(self) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() <= limit,
                "{what}: not within {limit:?}; shares {:?}, leases {:?}",
                self.shares(),
                self.leases
                    .leases
                    .lock()
                    .unwrap()
                    .values()
                    .map(|l| (l.task.clone(), l.demand))
                    .collect::<Vec<_>>()
            );
            self.step().await;
        }
    }

    /// The shares the live tasks should have settled on: a busy task that
    /// wants all it can send claims its ceiling.
    fn fair(&self) -> BTreeMap<&str, f64> {
        let live: Vec<(&str, &Member)> = self
            .members
            .iter()
            .filter(|(_, m)| m.live())
            .map(|(name, m)| (name.as_str(), m))
            .collect();
        let demands: Vec<f64> = live
            .iter()
            .map(|(_, m)| if m.busy() { f64::from(m.ceiling) } else { 0.0 })
            .collect();
        let shares = shares_in_use(f64::from(self.rate), &demands);
        live.iter()
            .zip(shares)
            .map(|((name, m), share)| (*name, share.min(f64::from(m.ceiling))))
            .collect()
    }

    fn settled(&self) -> bool {
        self.fair()
            .iter()
            .all(|(name, fair)| (self.share(name) - fair).abs() <= fair * ROUNDING)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for member in self.members.values() {
            member.task.abort();
        }
    }
}

/// Long enough for any change to settle: a join's wait and a dead lease's
/// expiry, with a round to spare.
const SETTLE: Duration = Duration::from_secs(6);

#[tokio::test(start_paused = true)]
async fn a_task_alone_gets_the_whole_rate_up_to_its_ceiling() {
    let mut fleet = Fleet::new(1000, 250);
    fleet.join("a", 2000, true);
    let waited = fleet
        .run_until(SETTLE, "the whole rate", |f| f.share("a") == 1000.0)
        .await;
    assert!(waited >= JOIN_WAIT, "took it after {waited:?}");
    fleet.run_for(Duration::from_secs(5)).await;
    assert_eq!(fleet.share("a"), 1000.0, "and kept it");
    let metrics = &fleet.member("a").metrics;
    assert_eq!(Metrics::get(&metrics.fleet_tasks), 1);
    assert_eq!(Metrics::get(&metrics.fleet_share_per_second), 1000);
    assert_eq!(Metrics::get(&metrics.fleet_on_fallback), 0);

    let mut fleet = Fleet::new(1000, 250);
    fleet.join("a", 600, true);
    fleet
        .run_until(SETTLE, "its ceiling", |f| f.share("a") == 600.0)
        .await;
    fleet.run_for(Duration::from_secs(2)).await;
    assert_eq!(fleet.share("a"), 600.0, "never more than it can use");
}

#[tokio::test(start_paused = true)]
async fn two_busy_tasks_get_half_each() {
    let mut fleet = Fleet::new(1000, 250);
    fleet.join("a", 2000, true);
    fleet.join("b", 2000, true);
    fleet
        .run_until(SETTLE, "half each", |f| {
            f.share("a") == 500.0 && f.share("b") == 500.0
        })
        .await;
    fleet.run_for(Duration::from_secs(5)).await;
    assert_eq!(fleet.shares(), BTreeMap::from([("a", 500.0), ("b", 500.0)]));
    assert_eq!(Metrics::get(&fleet.member("b").metrics.fleet_tasks), 2);
}

#[tokio::test(start_paused = true)]
async fn an_idle_task_takes_nothing_and_waits_as_a_joiner_when_work_comes() {
    let mut fleet = Fleet::new(1000, 250);
    fleet.join("busy", 2000, true);
    fleet.join("idle", 2000, false);
    fleet.run_until(SETTLE, "settled", Fleet::settled).await;
    assert_eq!(fleet.share("busy"), 1000.0);
    assert_eq!(fleet.share("idle"), 0.0);
    fleet.member("idle").set_busy(true);
    let waited = fleet
        .run_until(SETTLE, "its share", |f| f.share("idle") > 0.0)
        .await;
    assert!(
        waited >= JOIN_WAIT,
        "the higher demand was used after {waited:?}"
    );
    fleet.run_until(SETTLE, "half each", Fleet::settled).await;
    assert_eq!(fleet.share("idle"), 500.0);
    // Idle again: the share goes once the demand's linger is over, and the
    // other takes it back.
    fleet.member("idle").set_busy(false);
    fleet.run_until(SETTLE, "idle again", Fleet::settled).await;
    assert_eq!(fleet.share("busy"), 1000.0);
}

#[tokio::test(start_paused = true)]
async fn a_gap_between_two_jobs_keeps_the_share_without_a_new_join() {
    let mut fleet = Fleet::new(1000, 250);
    fleet.join("a", 2000, true);
    fleet.run_until(SETTLE, "alone", Fleet::settled).await;
    assert_eq!(fleet.share("a"), 1000.0);
    // One job ends and the next starts within two rounds: no round in the
    // gap may cut the share, or the next job would wait as a joiner does.
    fleet.member("a").set_busy(false);
    let gap = RENEW_INTERVAL * 2;
    let started = Instant::now();
    while started.elapsed() < gap {
        fleet.run_for(STEP * 10).await;
        assert_eq!(
            fleet.share("a"),
            1000.0,
            "cut {:?} into the gap",
            started.elapsed()
        );
    }
    fleet.member("a").set_busy(true);
    fleet.run_for(RENEW_INTERVAL * 3).await;
    assert_eq!(fleet.share("a"), 1000.0);
    // Idle for longer than the linger: the claim goes.
    fleet.member("a").set_busy(false);
    fleet.run_for(DEMAND_LINGER + RENEW_INTERVAL * 2).await;
    assert_eq!(
        fleet.share("a"),
        0.0,
        "an idle task's claim lingers no longer"
    );
}

#[tokio::test(start_paused = true)]
async fn a_joiner_sends_nothing_until_the_others_have_read_its_lease() {
    let mut fleet = Fleet::new(1000, 250);
    fleet.join("a", 2000, true);
    fleet.run_until(SETTLE, "alone", Fleet::settled).await;
    fleet
        .member("a")
        .table
        .set_latency(Duration::from_millis(20));
    fleet.join("b", 2000, true);
    fleet
        .member("b")
        .table
        .set_latency(Duration::from_millis(20));
    // A send asked of the joiner's budget is held.
    let budget = fleet.member("b").budget.clone();
    let send = tokio::spawn(async move {
        drop(budget.acquire().await);
    });
    let joined = Instant::now();
    fleet.run_for(RENEW_INTERVAL).await;
    assert_eq!(fleet.share("b"), 0.0, "nothing during its first round");
    assert!(!send.is_finished(), "its sends are held");
    fleet
        .run_until(SETTLE, "the joiner's share", |f| f.share("b") > 0.0)
        .await;
    // Its first write answered 20 ms after it joined.
    assert!(joined.elapsed() >= JOIN_WAIT + Duration::from_millis(20));
    assert_eq!(fleet.share("a"), 500.0, "the other had made room");
    fleet.run_for(STEP * 5).await;
    assert!(send.is_finished(), "the held send went");
    fleet.run_until(SETTLE, "half each", Fleet::settled).await;
}

/// The longest a task its share holds back takes to reach its fair share
/// (an even split, or one step of growth from its part of what nobody
/// claims): two rounds to see that it is held back (the first may have
/// begun before it was), then its higher claim's wait to be on record (the
/// round that takes it runs then, not at the next renewal).
const GROWN_WITHIN: Duration = Duration::from_millis(
    2 * RENEW_INTERVAL.as_millis() as u64 + JOIN_WAIT.as_millis() as u64 + 10,
);

/// Three busy tasks of a fleet of 3,000/s, each sending 35 posts a second
/// (small jobs), settled on claims that follow that use.
async fn three_on_small_jobs() -> Fleet {
    let mut fleet = Fleet::new(3000, 1000);
    for name in ["a", "b", "c"] {
        fleet.join(name, 3000, true);
        fleet.member(name).wants.set(35.0);
    }
    fleet.run_for(SETTLE).await;
    fleet
}

/// The fair share of one of [`three_on_small_jobs`] whose use grows: the
/// fleet's rate less the others' claims, twice their most in a round (18
/// posts of a half second's 17.5, 36/s).
const FAIR_BESIDE_SMALL_JOBS: f64 = 3000.0 - 2.0 * 72.0;

#[tokio::test(start_paused = true)]
async fn claims_follow_use_and_a_task_whose_use_grows_takes_its_fair_share_soon() {
    let fleet = three_on_small_jobs().await;
    // Each claims twice what it sends; what none claims is split equally.
    for name in ["a", "b", "c"] {
        assert_eq!(fleet.share(name), 1000.0, "{name}");
    }
    // An announcement to everyone starts on a: at once it sends its part
    // of the unclaimed rate, and its fair share soon after.
    fleet.member("a").wants.set(f64::INFINITY);
    fleet.run_for(STEP * 20).await;
    assert_eq!(
        fleet.share("a"),
        1000.0,
        "no wait for the part nobody claims"
    );
    let fair = FAIR_BESIDE_SMALL_JOBS;
    let took = fleet
        .run_until(GROWN_WITHIN, "a's fair share", |f| f.share("a") >= fair)
        .await;
    assert!(
        took >= JOIN_WAIT,
        "took it after {took:?}, before its claim was read"
    );
    // Its sends queue at once: it claims more within a watch of the queue,
    // not at the next renewal.
    assert!(
        took <= JOIN_WAIT + Duration::from_millis(400),
        "took {took:?}"
    );
    fleet.run_for(Duration::from_secs(5)).await;
    assert_eq!(fleet.share("a"), fair, "and kept it");
    for name in ["b", "c"] {
        assert!(
            fleet.share(name) >= 35.0,
            "{name} still sends its small jobs"
        );
    }
    // A burst on b: held back at its claim, then an even split at once.
    fleet.member("b").wants.set(1000.0);
    fleet
        .run_until(GROWN_WITHIN, "b's burst served", |f| f.share("b") >= 1000.0)
        .await;
    // It claims twice what it sends, so max-min gives it up to an even
    // split with a; a keeps the rest, and nothing is left unused.
    fleet.run_for(Duration::from_secs(6)).await;
    assert!(fleet.share("b") >= 1000.0, "{:?}", fleet.shares());
    assert!(fleet.share("a") >= 1000.0, "{:?}", fleet.shares());
    assert!(
        fleet.sum() >= 3000.0 * (1.0 - ROUNDING),
        "{:?}",
        fleet.shares()
    );
}

#[tokio::test(start_paused = true)]
async fn a_broadcast_claims_more_at_once_while_a_small_raise_of_its_claim_waits() {
    let fleet = three_on_small_jobs().await;
    // a's small jobs send a little more: a claim higher by a few posts a
    // second, which waits to be on record as every higher claim does.
    fleet.member("a").wants.set(45.0);
    fleet
        .run_until(RENEW_INTERVAL * 2, "a's small raise written", |f| {
            f.leases.leases.lock().unwrap()["a"].demand > 80.0
        })
        .await;
    // An announcement to everyone starts on a meanwhile: its sends queue,
    // and it claims more within a watch of them, not once the small raise
    // is on record.
    fleet.member("a").wants.set(f64::INFINITY);
    let took = fleet
        .run_until(GROWN_WITHIN, "a's fair share", |f| {
            f.share("a") >= FAIR_BESIDE_SMALL_JOBS
        })
        .await;
    assert!(
        took <= JOIN_WAIT + Duration::from_millis(400),
        "took {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_whose_use_falls_leaves_the_rest_to_the_others_at_once() {
    let fleet = three_on_small_jobs().await;
    fleet.member("a").wants.set(f64::INFINITY);
    fleet
        .run_until(SETTLE, "a's fair share", |f| {
            f.share("a") >= FAIR_BESIDE_SMALL_JOBS
        })
        .await;
    // The announcement ends; a's small jobs go on.
    fleet.member("a").wants.set(35.0);
    fleet
        .run_until(
            RENEW_INTERVAL * (USE_ROUNDS as u32 + 1),
            "a's claim back to its use",
            |f| {
                // Each near a third again: a round's use varies by a post.
                ["a", "b", "c"]
                    .iter()
                    .all(|name| (f.share(name) - 1000.0).abs() < 5.0)
            },
        )
        .await;
}

/// Long enough for a fleet whose tasks joined, left and changed their use
/// at random to settle: a join's wait, a dead lease's expiry, and two steps
/// of growth ([`GROWN_WITHIN`] each) for a task that claimed an even split
/// of more tasks than remain.
const SETTLE_GROWN: Duration = Duration::from_secs(12);

/// Seeded random fleets over a few minutes of simulated time: tasks join
/// (busy or idle, with ceilings below and above the fleet's rate, clocks up
/// to 0.4 s apart, tables up to 140 ms slow per call, so a round of two
/// calls stays within its timeout), get work or run out
/// of it, stop, and die; the sum is checked every millisecond throughout,
/// and after each quiet spell the live tasks hold their fair shares.
#[tokio::test(start_paused = true)]
async fn the_sum_never_exceeds_the_fleet_rate_while_tasks_join_and_leave() {
    for seed in [1, 2, 3] {
        let mut fleet = Fleet::new(2000, 200);
        let mut random = Xorshift(0x2545_f491_4f6c_dd1d ^ seed);
        let mut joined = 0;
        for event in 0..120 {
            let live: Vec<String> = fleet
                .members
                .iter()
                .filter(|(_, m)| m.live())
                .map(|(name, _)| name.clone())
                .collect();
            match random.below(8) {
                0..=2 if live.len() < 8 => {
                    joined += 1;
                    let name = format!("t{joined}");
                    let ceiling = [500, 1500, 2000, 5000][random.below(4) as usize];
                    let skew = random.below(801) as i64 - 400;
                    fleet.join_skewed(&name, ceiling, random.below(3) > 0, skew);
                    let latency = Duration::from_millis(random.below(141));
                    fleet.member(&name).table.set_latency(latency);
                }
                3 | 4 => {
                    if let Some(name) = random.pick(&live) {
                        let member = fleet.member(name);
                        member.set_busy(!member.busy());
                    }
                }
                5 => {
                    if let Some(name) = random.pick(&live) {
                        fleet.stop(name);
                    }
                }
                6 => {
                    if let Some(name) = random.pick(&live).cloned() {
                        fleet.kill(&name);
                    }
                }
                _ => {
                    if let Some(name) = random.pick(&live) {
                        let latency = Duration::from_millis(random.below(141));
                        fleet.member(name).table.set_latency(latency);
                    }
                }
            }
            fleet
                .run_for(Duration::from_millis(50 + random.below(1500)))
                .await;
            if event % 30 == 29 {
                fleet
                    .run_until(
                        SETTLE_GROWN,
                        &format!("seed {seed}: settled"),
                        Fleet::settled,
                    )
                    .await;
            }
        }
        fleet
            .run_until(SETTLE_GROWN, "settled at the end", Fleet::settled)
            .await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_task_that_loses_the_table_drops_to_its_share_then_the_fallback_and_recovers() {
    // A fallback above the share: the share holds while the others count
    // the lease, then the fallback.
    let mut fleet = Fleet::two_at_half(700).await;
    fleet.excess = 700.0;
    fleet.member("a").table.fail_next(6);
    fleet.until_a_on_the_fallback(RENEW_INTERVAL).await;
    assert_eq!(fleet.share("a"), 500.0, "no more than the others count");
    let a = fleet.member("a");
    assert!(Metrics::get(&a.metrics.fleet_renewals_failed) >= 1);
    // Once its lease has expired to the others, the fallback rate.
    fleet
        .run_until(LEASE_TTL + RENEW_INTERVAL, "the fallback", |f| {
            f.share("a") == 700.0
        })
        .await;
    assert_eq!(fleet.share("a"), 700.0);
    fleet
        .run_until(DEAD_SHARE_UNUSED, "the other takes the rest", |f| {
            f.share("b") == 1000.0
        })
        .await;
    // The table answers again: the lost task takes its share once its new
    // lease has been read.
    fleet
        .run_until(SETTLE, "recovered", |f| {
            !f.member("a").on_fallback() && f.settled()
        })
        .await;
    fleet.excess = 0.0;
    fleet.run_for(Duration::from_secs(3)).await;
    assert_eq!(fleet.shares(), BTreeMap::from([("a", 500.0), ("b", 500.0)]));
    let a = fleet.member("a");
    assert_eq!(Metrics::get(&a.metrics.fleet_renewals_failed), 6);
    assert_eq!(Metrics::get(&a.metrics.fleet_on_fallback), 0);

    // A fallback under the share: at once.
    let mut fleet = Fleet::two_at_half(300).await;
    fleet.excess = 300.0;
    fleet.member("a").table.fail_next(1);
    fleet.until_a_on_the_fallback(RENEW_INTERVAL).await;
    assert_eq!(fleet.share("a"), 300.0);
    // One failed round, the lease still counted: straight back.
    fleet
        .run_until(RENEW_INTERVAL + ROUND_TIMEOUT, "recovered", |f| {
            !f.member("a").on_fallback()
        })
        .await;
    assert_eq!(fleet.share("a"), 500.0);
}

#[tokio::test(start_paused = true)]
async fn a_round_slower_than_its_timeout_counts_as_a_failed_renewal() {
    let mut fleet = Fleet::two_at_half(300).await;
    // Slow but in time: nothing changes.
    fleet.member("a").table.set_latency(ROUND_TIMEOUT / 3);
    fleet.run_for(Duration::from_secs(3)).await;
    assert!(!fleet.member("a").on_fallback());
    assert_eq!(
        Metrics::get(&fleet.member("a").metrics.fleet_renewals_failed),
        0
    );
    // Too slow: the fallback.
    fleet.excess = 300.0;
    fleet.member("a").table.set_latency(ROUND_TIMEOUT);
    fleet.until_a_on_the_fallback(Duration::from_secs(2)).await;
    assert_eq!(fleet.share("a"), 300.0);
    fleet
        .member("a")
        .table
        .set_latency(Duration::from_millis(10));
    fleet
        .run_until(SETTLE, "recovered", |f| {
            !f.member("a").on_fallback() && f.settled()
        })
        .await;
    assert!(Metrics::get(&fleet.member("a").metrics.fleet_renewals_failed) >= 1);
}

#[tokio::test(start_paused = true)]
async fn a_dead_tasks_share_goes_to_the_others_once_its_lease_expires() {
    let mut fleet = Fleet::new(1000, 250);
    fleet.join("a", 2000, true);
    fleet.join("b", 2000, true);
    fleet.join("c", 2000, true);
    fleet
        .run_until(SETTLE, "a third each", Fleet::settled)
        .await;
    // Killed right after a renewal: the longest its share can stay unused.
    fleet
        .run_until(RENEW_INTERVAL, "b's renewal", |f| {
            f.member("b").table.calls.load(Ordering::SeqCst) % 2 == 0
        })
        .await;
    let calls = fleet.member("b").table.calls.load(Ordering::SeqCst);
    fleet
        .run_until(RENEW_INTERVAL, "b's next renewal", |f| {
            f.member("b").table.calls.load(Ordering::SeqCst) > calls
        })
        .await;
    fleet.kill("b");
    let took = fleet
        .run_until(
            Duration::from_secs(5),
            "the dead task's share reused",
            |f| f.share("a") == 500.0 && f.share("c") == 500.0,
        )
        .await;
    assert!(
        took >= LEASE_TTL,
        "reused after {took:?}, before its lease expired"
    );
    assert!(took <= DEAD_SHARE_UNUSED, "{took:?}");
    // Judged by its expiry: the lease is still in the table.
    assert!(fleet.leases.tasks().contains(&"b".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn a_clean_stop_removes_the_lease_and_frees_the_share() {
    let fleet = Fleet::two_at_half(250).await;
    fleet.stop("b");
    let took = fleet
        .run_until(SETTLE, "the whole rate", |f| f.share("a") == 1000.0)
        .await;
    assert!(took <= RENEW_INTERVAL, "{took:?}");
    assert!(fleet.member("b").task.is_finished());
    assert_eq!(fleet.share("b"), 0.0);
    assert_eq!(fleet.leases.tasks(), vec!["a".to_owned()]);
}

#[tokio::test(start_paused = true)]
async fn clocks_apart_by_less_than_the_leases_margin_still_count_each_other() {
    let mut fleet = Fleet::new(1000, 250);
    fleet.join_skewed("ahead", 2000, true, 700);
    fleet.join_skewed("behind", 2000, true, -700);
    fleet.run_until(SETTLE, "half each", Fleet::settled).await;
    fleet.run_for(Duration::from_secs(10)).await;
    assert_eq!(
        fleet.shares(),
        BTreeMap::from([("ahead", 500.0), ("behind", 500.0)])
    );
    for name in ["ahead", "behind"] {
        assert_eq!(Metrics::get(&fleet.member(name).metrics.fleet_tasks), 2);
    }
}

#[test]
fn a_lease_counts_until_its_expiry_and_the_sweep_never_comes_earlier() {
    let lease = Lease {
        task: "a".into(),
        demand: 1000.0,
        expires_at_ms: EPOCH + 2500,
    };
    assert!(lease.is_live(EPOCH + 2499));
    assert!(!lease.is_live(EPOCH + 2500));
    assert_eq!(lease.expires_at_secs() * 1000, EPOCH + 3000, "rounded up");
}

#[test]
fn only_passing_table_failures_are_transient() {
    assert!(FleetError::Unavailable("refused".into()).is_transient());
    assert!(FleetError::Throttled("slow down".into()).is_transient());
    assert!(FleetError::TimedOut(ROUND_TIMEOUT).is_transient());
    assert!(!FleetError::Rejected("AccessDenied".into()).is_transient());
    let missing = FleetError::NoSuchTable {
        table: "fleet".into(),
    };
    assert!(!missing.is_transient());
    assert!(
        missing
            .to_string()
            .contains(&crate::limits::setting::Setting::FleetTable.to_string())
    );
}
