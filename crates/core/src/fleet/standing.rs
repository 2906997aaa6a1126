//! One task's standing in the fleet: what share it may use, decided from
//! its own rounds alone (what it wrote, when, and what it read back). Pure:
//! the renewal loop feeds it the instants and the answers.
//!
//! The rule that keeps the fleet's sum within its rate: a task uses, for
//! itself, the lowest demand the others may still have on record for it,
//! that is the lowest of the demands it sent since [`JOIN_WAIT`] ago and of
//! the one the table had taken by then. A higher demand (a join, or work
//! after idle time) counts only once it has been on record that long; a
//! lower one counts at once, and the share is cut to it before it is sent.
//! A write whose answer never came may have landed all the same, so it
//! counts as sent too.
//!
//! The share is [`shares_in_use`] of that demand among the others' as last
//! read, capped at the task's own ceiling: every term of the fleet's sum is
//! then at most what the same split gives with every demand at its lowest
//! on record, and those add up to the fleet's rate.

use std::collections::VecDeque;

use tokio::time::Instant;

use super::shares::shares_in_use;
use super::timing::JOIN_WAIT;

/// One write of this task's lease.
#[derive(Clone, Copy, Debug)]
struct Written {
    /// When the table answered that it took the write: from then on every
    /// read sees it. `None`: no answer (yet), though it may have landed.
    taken: Option<Instant>,
    demand: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The share comes from the last round's read.
    Counted,
    /// The last round failed: the fallback rules apply.
    Fallback,
}

#[derive(Debug)]
pub(super) struct Standing {
    /// The rate to use while the table cannot be reached.
    fallback: f64,
    /// The most the task can send (its configured rate): a share above it
    /// would only be a number.
    ceiling: f64,
    /// The fleet's rate and the others' demands as the last round read
    /// them: a lower demand cuts the share by the same split before it is
    /// written.
    rate: f64,
    others: Vec<f64>,
    /// The last write taken [`JOIN_WAIT`] ago or earlier and every write
    /// sent since, oldest first; cut to the latest when the lease lapsed,
    /// since the others forgot the ones before.
    written: VecDeque<Written>,
    /// The expiry (epoch ms) of the last write the table took: until then
    /// the others count this task.
    expires_at_ms: Option<u64>,
    /// The share in force.
    share: f64,
    mode: Mode,
    /// Back after the lease lapsed while on the fallback rate: the task
    /// keeps that rate (or less) until its new lease has been read, rather
    /// than stop sending because the table answers again.
    rejoining: bool,
}

impl Standing {
    /// A task that has written nothing yet: it sends nothing.
    pub(super) fn new(fallback: f64, ceiling: f64) -> Self {
        Self {
            fallback,
            ceiling,
            rate: 0.0,
            others: Vec::new(),
            written: VecDeque::new(),
            expires_at_ms: None,
            share: 0.0,
            mode: Mode::Counted,
            rejoining: false,
        }
    }

    pub(super) fn share(&self) -> f64 {
        self.share
    }

    pub(super) fn on_fallback(&self) -> bool {
        self.mode == Mode::Fallback
    }

    /// A write of `demand` is about to be sent: a demand lower than the
    /// ones on record cuts the share now (to its split among the others as
    /// last read), before the others can read it and take the rest. Returns
    /// the new share if it changed.
    pub(super) fn sending(&mut self, demand: f64) -> Option<f64> {
        let demand = demand.max(0.0);
        self.written.push_back(Written {
            taken: None,
            demand,
        });
        let cut = if self.mode == Mode::Counted {
            self.share_for(demand)
        } else {
            demand
        };
        (cut < self.share).then(|| {
            self.share = cut;
            cut
        })
    }

    /// When a higher demand than the one on record comes on record, if one
    /// is pending: a round then takes the larger share without waiting for
    /// the next renewal. That is when the first write after the last one at
    /// the lowest demand has been taken for [`JOIN_WAIT`]: the writes
    /// before it are forgotten then.
    pub(super) fn pending_until(&self) -> Option<Instant> {
        let lowest = self
            .written
            .iter()
            .map(|w| w.demand)
            .fold(f64::INFINITY, f64::min);
        let last_low = self.written.iter().rposition(|w| w.demand <= lowest)?;
        let next = self.written.get(last_low + 1)?;
        next.taken.map(|taken| taken + JOIN_WAIT)
    }

    /// This task's share if its demand were `own`, the others' as last read.
    fn share_for(&self, own: f64) -> f64 {
        let mut demands = self.others.clone();
        demands.push(own);
        let share = shares_in_use(self.rate, &demands).last().copied();
        share.unwrap_or(0.0).min(self.ceiling)
    }

    /// The table took the write last sent, expiring at `expires_at_ms`; it
    /// answered at `at`, when the epoch clock read `now_ms`.
    pub(super) fn written(&mut self, at: Instant, expires_at_ms: u64, now_ms: u64) {
        let lapsed = self.expires_at_ms.is_none_or(|expiry| expiry <= now_ms);
        if lapsed {
            // The others forgot this task: it joins again.
            let latest = self.written.len().saturating_sub(1);
            self.written.drain(..latest);
            self.rejoining = self.mode == Mode::Fallback;
        }
        if let Some(last) = self.written.back_mut() {
            last.taken = Some(at);
        }
        self.expires_at_ms = Some(expires_at_ms);
        self.forget(at);
    }

    /// The round read the live leases: `others` are the other tasks'
    /// demands, `demand` this task's, `rate` the fleet's. Returns the share.
    pub(super) fn read(&mut self, at: Instant, rate: f64, others: &[f64], demand: f64) -> f64 {
        self.rate = rate;
        self.others = others.to_vec();
        let on_record = self.on_record(at);
        if on_record.is_some() {
            self.rejoining = false;
        }
        self.share = match on_record {
            Some(on_record) => self.share_for(on_record.min(demand)),
            None if self.rejoining => self.share_for(demand).min(self.fallback),
            None => 0.0,
        };
        self.mode = Mode::Counted;
        self.share
    }

    /// The round failed at `now_ms`. While the others still count the last
    /// lease, the share drops to the lower of what it was and the fallback;
    /// once that lease has expired, to the fallback.
    pub(super) fn failed(&mut self, now_ms: u64) -> f64 {
        let counted = self.expires_at_ms.is_some_and(|expiry| now_ms < expiry);
        self.share = if counted {
            self.share.min(self.fallback)
        } else {
            self.fallback
        };
        self.mode = Mode::Fallback;
        self.share
    }

    /// The lowest demand the others may have on record for this task at
    /// `at`: `None` until a write has been on record for [`JOIN_WAIT`].
    fn on_record(&mut self, at: Instant) -> Option<f64> {
        self.forget(at);
        let since = at.checked_sub(JOIN_WAIT)?;
        let first = self.written.front()?;
        first.taken.is_some_and(|taken| taken <= since).then(|| {
            self.written
                .iter()
                .map(|w| w.demand)
                .fold(f64::INFINITY, f64::min)
        })
    }

    /// Drops the writes before the last one taken [`JOIN_WAIT`] before `at`
    /// or earlier: it replaced them, and every other task's share in force
    /// was computed from a read after it.
    fn forget(&mut self, at: Instant) {
        let Some(since) = at.checked_sub(JOIN_WAIT) else {
            return;
        };
        let in_force = self
            .written
            .iter()
            .rposition(|w| w.taken.is_some_and(|taken| taken <= since));
        if let Some(in_force) = in_force {
            self.written.drain(..in_force);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const FALLBACK: f64 = 300.0;
    const RATE: f64 = 1000.0;
    const SECOND: Duration = Duration::from_secs(1);
    /// Epoch ms at the test's start.
    const EPOCH: u64 = 1_700_000_000_000;

    /// A task that writes `demand` once a second from `t0`, each write
    /// returning at once and expiring 3 s later, the others' demands being
    /// `others`; returns its share after each round.
    fn rounds(
        standing: &mut Standing,
        t0: Instant,
        from: u32,
        demands: &[f64],
        others: &[f64],
    ) -> Vec<f64> {
        demands
            .iter()
            .enumerate()
            .map(|(n, &demand)| {
                let at = t0 + SECOND * (from + n as u32);
                let now_ms = EPOCH + (at - t0).as_millis() as u64;
                standing.sending(demand);
                standing.written(at, now_ms + 3000, now_ms);
                standing.read(at, RATE, others, demand)
            })
            .collect()
    }

    /// A task with `fallback` that wrote `demand` in three rounds from the
    /// instant it returns, the others' demands being `others`.
    fn after_three_rounds(fallback: f64, demand: f64, others: &[f64]) -> (Standing, Instant) {
        let t0 = Instant::now();
        let mut standing = Standing::new(fallback, f64::INFINITY);
        rounds(&mut standing, t0, 0, &[demand; 3], others);
        (standing, t0)
    }

    #[test]
    fn a_joining_task_takes_its_share_once_its_lease_has_been_on_record() {
        let t0 = Instant::now();
        let mut standing = Standing::new(FALLBACK, f64::INFINITY);
        assert_eq!(standing.share(), 0.0);
        let shares = rounds(&mut standing, t0, 0, &[1000.0; 4], &[1000.0]);
        // Written at 0 s; on record for JOIN_WAIT (1.05 s) at the round of
        // 2 s.
        assert_eq!(shares, vec![0.0, 0.0, 500.0, 500.0]);
    }

    #[test]
    fn a_lower_demand_counts_at_once_and_cuts_the_share_before_it_is_written() {
        let (mut standing, t0) = after_three_rounds(FALLBACK, 1000.0, &[1000.0]);
        assert_eq!(standing.share(), 500.0);
        assert_eq!(standing.sending(200.0), Some(200.0));
        assert_eq!(standing.sending(0.0), Some(0.0));
        assert_eq!(standing.sending(0.0), None, "already there");
        let shares = rounds(&mut standing, t0, 3, &[0.0, 0.0], &[1000.0]);
        assert_eq!(shares, vec![0.0, 0.0]);
    }

    #[test]
    fn a_write_that_never_answered_counts_as_on_record() {
        let (mut standing, t0) = after_three_rounds(FALLBACK, 1000.0, &[1000.0]);
        // Idle: 0 sent, no answer; the others may have read it.
        assert_eq!(standing.sending(0.0), Some(0.0));
        standing.failed(EPOCH + 3000);
        // Busy again: the 0 counts until a later write has been on record
        // for JOIN_WAIT.
        let shares = rounds(&mut standing, t0, 4, &[1000.0; 3], &[1000.0]);
        assert_eq!(shares, vec![0.0, 0.0, 500.0]);
    }

    #[test]
    fn work_after_idle_time_waits_as_a_join_does() {
        let t0 = Instant::now();
        let mut standing = Standing::new(FALLBACK, f64::INFINITY);
        rounds(&mut standing, t0, 0, &[0.0; 4], &[1000.0]);
        let shares = rounds(&mut standing, t0, 4, &[1000.0; 3], &[1000.0]);
        // The idle lease (0) is on record until the busy one has been for
        // JOIN_WAIT.
        assert_eq!(shares, vec![0.0, 0.0, 500.0]);
    }

    #[test]
    fn a_demand_that_dips_counts_at_its_lowest_until_the_dip_is_forgotten() {
        let (mut standing, t0) = after_three_rounds(FALLBACK, 1000.0, &[1000.0]);
        assert_eq!(standing.share(), 500.0);
        let shares = rounds(
            &mut standing,
            t0,
            3,
            &[100.0, 1000.0, 1000.0, 1000.0],
            &[1000.0],
        );
        assert_eq!(shares, vec![100.0, 100.0, 100.0, 500.0]);
    }

    #[test]
    fn what_no_task_claims_is_used_by_the_tasks_with_work() {
        // Alone, a small claim still gets the whole rate...
        let (standing, _) = after_three_rounds(FALLBACK, 10.0, &[]);
        assert_eq!(standing.share(), RATE);
        // ...beside two small claims, its part of what they leave...
        let (standing, _) = after_three_rounds(FALLBACK, 10.0, &[10.0, 10.0]);
        assert_eq!(standing.share(), RATE / 3.0);
        // ...and never more than its own ceiling.
        let t0 = Instant::now();
        let mut capped = Standing::new(FALLBACK, 250.0);
        rounds(&mut capped, t0, 0, &[10.0; 3], &[10.0]);
        assert_eq!(capped.share(), 250.0);
    }

    #[test]
    fn a_lower_claim_cuts_the_unclaimed_part_by_the_same_split() {
        let (mut standing, _) = after_three_rounds(FALLBACK, 100.0, &[300.0]);
        // 100 + (1000 - 400) / 2.
        assert_eq!(standing.share(), 400.0);
        // Claiming 0 leaves it all to the other at once.
        assert_eq!(standing.sending(0.0), Some(0.0));
        let (mut standing, _) = after_three_rounds(FALLBACK, 100.0, &[300.0]);
        // 50 + (1000 - 350) / 2 = 375.
        assert_eq!(standing.sending(50.0), Some(375.0));
    }

    #[test]
    fn a_higher_claim_is_due_once_its_first_write_has_been_on_record() {
        let (mut standing, t0) = after_three_rounds(FALLBACK, 100.0, &[3000.0]);
        assert_eq!(standing.pending_until(), None, "nothing higher pending");
        let at = t0 + SECOND * 3;
        standing.sending(900.0);
        standing.written(at, EPOCH + 6000, EPOCH + 3000);
        standing.read(at, RATE, &[3000.0], 900.0);
        assert_eq!(standing.share(), 100.0, "not on record yet");
        assert_eq!(standing.pending_until(), Some(at + JOIN_WAIT));
        standing.read(at + JOIN_WAIT, RATE, &[3000.0], 900.0);
        assert_eq!(standing.share(), 500.0, "due then: half of the rate");
        assert_eq!(standing.pending_until(), None);
    }

    #[test]
    fn a_failed_round_drops_to_the_lower_of_the_share_and_the_fallback_then_the_fallback() {
        let (mut standing, _) = after_three_rounds(700.0, 1000.0, &[1000.0]);
        assert_eq!(standing.share(), 500.0);
        // The last write (at 2 s) expires at 5 s.
        let at_ms = |secs: u64| EPOCH + secs * 1000;
        assert_eq!(standing.failed(at_ms(3)), 500.0, "the lower: the share");
        assert!(standing.on_fallback());
        assert_eq!(standing.failed(at_ms(4)), 500.0);
        assert_eq!(standing.failed(at_ms(5)), 700.0, "expired: the fallback");
        // A fallback under the share is used at once.
        let (mut standing, _) = after_three_rounds(FALLBACK, 1000.0, &[1000.0]);
        assert_eq!(standing.failed(at_ms(3)), FALLBACK);
    }

    #[test]
    fn a_joiner_whose_first_write_fails_sends_at_the_fallback() {
        let mut standing = Standing::new(FALLBACK, f64::INFINITY);
        assert_eq!(standing.failed(EPOCH), FALLBACK);
    }

    #[test]
    fn a_short_failure_keeps_the_lease_on_record() {
        let (mut standing, t0) = after_three_rounds(FALLBACK, 1000.0, &[1000.0]);
        standing.failed(EPOCH + 3000);
        let shares = rounds(&mut standing, t0, 4, &[1000.0], &[1000.0]);
        assert_eq!(shares, vec![500.0]);
        assert!(!standing.on_fallback());
    }

    #[test]
    fn back_after_the_lease_lapsed_the_task_keeps_the_fallback_until_it_is_read() {
        let (mut standing, t0) = after_three_rounds(FALLBACK, 1000.0, &[1000.0]);
        for secs in 3..=6 {
            standing.failed(EPOCH + secs * 1000);
        }
        assert_eq!(standing.share(), FALLBACK);
        let shares = rounds(&mut standing, t0, 7, &[1000.0; 3], &[1000.0]);
        assert_eq!(shares, vec![FALLBACK, FALLBACK, 500.0]);
        // Never more than its share meanwhile.
        let (mut standing, t0) = after_three_rounds(FALLBACK, 1000.0, &[1000.0; 9]);
        standing.failed(EPOCH + 9000);
        let shares = rounds(&mut standing, t0, 10, &[1000.0], &[1000.0; 9]);
        assert_eq!(shares, vec![100.0]);
    }

    #[test]
    fn a_lease_that_lapsed_while_counted_joins_again_from_nothing() {
        let (mut standing, t0) = after_three_rounds(FALLBACK, 1000.0, &[1000.0]);
        // A round 4 s late (a stalled process): the lease expired at 5 s.
        let shares = rounds(&mut standing, t0, 6, &[1000.0], &[1000.0]);
        assert_eq!(shares, vec![0.0]);
    }
}
