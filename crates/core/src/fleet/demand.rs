//! What a task claims of the fleet's rate, round by round: an even split
//! of the fleet's rate while it joins (it cannot know yet what its jobs
//! will send), then about what it sent in the last round, with headroom,
//! and [`GROWTH`] times its share as soon as its share, not its jobs, holds
//! it back. Pure: the renewal loop feeds it what the round measured.
//!
//! A raised claim counts for the task itself only once the others have
//! read it, but it lowers their shares at once. A task whose claim on
//! record is at least an even split keeps that much whatever the others
//! claim; one that claims less keeps its claim and its part of what nobody
//! claims. So tasks that claim little and then all raise their claims
//! together (several segments of one broadcast starting on tasks busy with
//! small jobs) send at their former claims for about
//! [`JOIN_WAIT`](super::JOIN_WAIT); a joiner claims an even split from the
//! start so that tasks starting together never do.
//!
//! Claims that follow use leave the rate a task does not use to the tasks
//! that do: beside an announcement to everyone, tasks busy with small jobs
//! claim what those jobs send, not their ceiling. What nobody claims is
//! split among the tasks with work ([`shares_in_use`](super::shares_in_use)),
//! so a task whose use grows sends more at once, and the larger claim adds
//! the rest once the others have read it.

use std::time::Duration;

use tokio::time::Instant;

use super::timing::DEMAND_LINGER;

/// A task claims this many times the most it sent in one of its last
/// [`USE_ROUNDS`] rounds (3 s of renewals), so that use that varies from one
/// round to the next (small jobs come in bursts) stays within the claim,
/// and the share, without counting as held back.
pub const HEADROOM: f64 = 2.0;
pub const USE_ROUNDS: usize = 6;

/// A round in which the task sent at least this share of its share in
/// force was held back by the share...
pub const HELD_BACK: f64 = 0.9;

/// ...and so was one in which this many sends, on average, waited for the
/// rate: a broadcast that began late in the round has hundreds waiting
/// (its slots in flight) before it has sent a round's worth, while a burst
/// of small jobs has a few.
pub const WAITING_SENDS: f64 = 10.0;

/// ...and it claims this many times that share, and at least an even split
/// of the fleet's rate (up to its ceiling): one step gives it what max-min
/// fairness gives every hungry task, the next ones each four times more
/// while the others leave it room (the whole rate of a fleet of up to four
/// tasks after two).
pub const GROWTH: f64 = 4.0;

/// While the adaptive rate (cut by 429s) is under this share of the share
/// in force, the endpoint's throttle holds the task back, not the share:
/// the claim stays as it was, so that the others do not grow into the same
/// throttle, nor does the task claim more than the throttle lets it send.
pub const THROTTLED_UNDER: f64 = 0.95;

/// The least a task with work claims, as a share of the fleet's rate: a job
/// that has not sent yet (it is reading its audience) still claims a
/// little.
pub const LEAST_CLAIM_OF_RATE: f64 = 0.01;

/// What one round measured.
#[derive(Clone, Copy, Debug)]
pub(super) struct Round {
    /// When the round started.
    pub at: Instant,
    /// Whether a job runs now.
    pub busy: bool,
    /// Posts sent since the last round.
    pub sent: u64,
    /// Time since the last round.
    pub elapsed: Duration,
    /// Time sends waited for the rate since the last round, summed over
    /// sends.
    pub waited: Duration,
    /// The share in force since the last round, per second.
    pub share: f64,
    /// The adaptive rate now, per second (`None`: not adaptive).
    pub adaptive: Option<f64>,
    /// Live tasks at the last read, this one among them (0: none yet).
    pub tasks: u64,
}

impl Round {
    /// The endpoint's 429s hold the task back, not its share.
    pub(super) fn throttled(&self) -> bool {
        self.adaptive
            .is_some_and(|adaptive| adaptive < self.share * THROTTLED_UNDER)
    }

    /// [`WAITING_SENDS`] or more sends waited for the rate, on average.
    pub(super) fn queued(&self) -> bool {
        let seconds = self.elapsed.as_secs_f64();
        seconds > 0.0 && self.waited.as_secs_f64() >= seconds * WAITING_SENDS
    }

    /// The share held the task back: it sent [`HELD_BACK`] of it, or its
    /// sends queued for it.
    fn held_back(&self) -> bool {
        let seconds = self.elapsed.as_secs_f64();
        seconds > 0.0 && (self.sent as f64 >= self.share * seconds * HELD_BACK || self.queued())
    }
}

/// One task's claim, from its rounds.
#[derive(Debug)]
pub(super) struct Claim {
    /// The task's configured rate: the most it ever claims.
    ceiling: f64,
    /// The fleet's rate.
    rate: f64,
    /// The least it claims while it has work.
    least: f64,
    /// The claim of the last round.
    last: f64,
    /// Posts per second sent in each of the last [`USE_ROUNDS`] rounds
    /// with work, oldest first.
    recent: std::collections::VecDeque<f64>,
    /// The last round that found a job running.
    last_busy: Option<Instant>,
}

impl Claim {
    /// A task whose configured rate is `ceiling`, in a fleet of `rate`.
    pub(super) fn new(ceiling: f64, rate: f64) -> Self {
        Self {
            ceiling,
            rate,
            least: (rate * LEAST_CLAIM_OF_RATE).max(1.0).min(ceiling),
            last: 0.0,
            recent: Default::default(),
            last_busy: None,
        }
    }

    /// Whether a held-back round would raise the claim above the last one
    /// written: a claim that already waits to be on record for this much
    /// (or the ceiling) gains nothing from writing it again.
    pub(super) fn would_grow(&self, round: &Round) -> bool {
        self.grown(round).clamp(self.least, self.ceiling) > self.last
    }

    /// What a round its share held back claims.
    fn grown(&self, round: &Round) -> f64 {
        (round.share * GROWTH).max(self.even_split(round.tasks))
    }

    /// The claim to write this round.
    pub(super) fn next(&mut self, round: Round) -> f64 {
        if round.busy {
            self.last_busy = Some(round.at);
        }
        // Jobs run back to back with gaps between them: the claim stays
        // through a gap as it was, else the next job would wait as a joiner
        // does, or grow its claim again.
        let lingering = self
            .last_busy
            .is_some_and(|busy| round.at.duration_since(busy) < DEMAND_LINGER);
        self.last = match (round.busy, lingering) {
            (true, _) => self.used(round),
            (false, true) => self.last,
            (false, false) => {
                self.recent.clear();
                0.0
            }
        };
        self.last
    }

    fn used(&mut self, round: Round) -> f64 {
        let seconds = round.elapsed.as_secs_f64();
        if seconds > 0.0 {
            if self.recent.len() == USE_ROUNDS {
                self.recent.pop_front();
            }
            self.recent.push_back(round.sent as f64 / seconds);
        }
        // A share of zero with work: the task joins (or its work resumed
        // after idle time) and waits for its claim to be read.
        let joined = round.share > 0.0;
        let claim = if !joined {
            // One claim for the whole join: a higher one would wait anew.
            match self.last {
                0.0 => self.even_split(round.tasks),
                last => last,
            }
        } else if round.throttled() && self.last > 0.0 {
            self.last
        } else if round.held_back() {
            self.grown(&round)
        } else if let Some(peak) = self.recent.iter().copied().reduce(f64::max) {
            peak * HEADROOM
        } else {
            self.last
        };
        claim.clamp(self.least, self.ceiling)
    }

    /// The fleet's rate split evenly among the tasks last read, counting
    /// this one; the ceiling before the first read.
    fn even_split(&self, tasks: u64) -> f64 {
        match tasks {
            0 => self.ceiling,
            tasks => self.rate / tasks as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn round(at: Instant, sent: u64, share: f64) -> Round {
        Round {
            at,
            busy: true,
            sent,
            elapsed: SECOND,
            waited: Duration::ZERO,
            share,
            adaptive: None,
            tasks: 3,
        }
    }

    #[test]
    fn a_task_with_work_claims_what_it_sent_with_headroom() {
        let t0 = Instant::now();
        let mut claim = Claim::new(3000.0, 3000.0);
        // 35 posts in a second, of a share of 1,000: 70.
        assert_eq!(claim.next(round(t0, 35, 1000.0)), 70.0);
        // The most of its last six rounds.
        for at in 1..USE_ROUNDS as u32 {
            assert_eq!(claim.next(round(t0 + SECOND * at, 10, 1000.0)), 70.0);
        }
        let later = t0 + SECOND * USE_ROUNDS as u32;
        assert_eq!(claim.next(round(later, 20, 1000.0)), 40.0);
        // Nothing sent yet: the least claim, 1 % of the fleet's rate.
        let mut fresh = Claim::new(3000.0, 3000.0);
        assert_eq!(fresh.next(round(t0, 0, 1000.0)), 30.0);
    }

    #[test]
    fn a_task_its_share_holds_back_claims_four_times_that_share() {
        let t0 = Instant::now();
        let mut claim = Claim::new(3000.0, 3000.0);
        assert_eq!(claim.next(round(t0, 285, 300.0)), 1200.0);
        // At least an even split of the fleet's rate (3,000 over 3 tasks).
        assert_eq!(claim.next(round(t0, 95, 100.0)), 1000.0);
        // Up to its ceiling.
        assert_eq!(claim.next(round(t0 + SECOND, 950, 1000.0)), 3000.0);
        // Under the mark: back to its use, the most of its last six
        // rounds (285, 95, 950, 800).
        assert_eq!(claim.next(round(t0 + SECOND * 2, 800, 1000.0)), 1900.0);
    }

    #[test]
    fn a_broadcast_that_began_late_in_the_round_is_held_back_by_its_waits() {
        let t0 = Instant::now();
        let mut claim = Claim::new(3000.0, 3000.0);
        claim.next(round(t0, 35, 1000.0));
        // 150 posts of a share of 1,000, but 256 sends waited 0.3 s each.
        let late = Round {
            waited: Duration::from_millis(256 * 300),
            ..round(t0 + SECOND, 150, 1000.0)
        };
        assert_eq!(claim.next(late), 3000.0);
        // A burst of 15 small posts that waited 0.2 s each is not.
        let burst = Round {
            waited: Duration::from_millis(15 * 200),
            ..round(t0 + SECOND * 2, 50, 1000.0)
        };
        assert_eq!(claim.next(burst), 300.0, "twice its peak, 150");
    }

    #[test]
    fn a_joiner_claims_an_even_split_until_it_has_a_share() {
        let t0 = Instant::now();
        let mut claim = Claim::new(3000.0, 3000.0);
        let joining = |at, tasks| Round {
            tasks,
            ..round(at, 0, 0.0)
        };
        assert_eq!(claim.next(joining(t0, 3)), 1000.0);
        assert_eq!(claim.next(joining(t0 + SECOND, 4)), 1000.0, "one claim");
        assert_eq!(claim.next(round(t0 + SECOND * 2, 10, 1000.0)), 30.0);
        let mut first = Claim::new(3000.0, 3000.0);
        assert_eq!(first.next(joining(t0, 0)), 3000.0, "before any read");
    }

    #[test]
    fn a_task_the_endpoints_throttle_holds_back_keeps_its_claim() {
        let t0 = Instant::now();
        let mut claim = Claim::new(3000.0, 3000.0);
        assert_eq!(claim.next(round(t0, 1000, 1000.0)), 3000.0);
        // 429s cut the adaptive rate to 400 of a share of 1,000: the task
        // sends 400 and claims as before, neither more nor its use.
        let throttled = Round {
            adaptive: Some(400.0),
            ..round(t0 + SECOND, 400, 1000.0)
        };
        assert_eq!(claim.next(throttled), 3000.0);
        // The throttle gone: its use again (its most of the last six
        // rounds: 1,000).
        let back = Round {
            adaptive: Some(3000.0),
            ..round(t0 + SECOND * 2, 400, 1000.0)
        };
        assert_eq!(claim.next(back), 2000.0);
    }

    #[test]
    fn an_idle_task_keeps_its_claim_for_the_linger_then_claims_nothing() {
        let t0 = Instant::now();
        let mut claim = Claim::new(3000.0, 3000.0);
        claim.next(round(t0, 1000, 1000.0));
        let idle = |at| Round {
            busy: false,
            ..round(at, 0, 1000.0)
        };
        assert_eq!(claim.next(idle(t0 + SECOND)), 3000.0, "between two jobs");
        assert_eq!(claim.next(idle(t0 + DEMAND_LINGER)), 0.0, "idle");
    }

    #[test]
    fn a_claim_never_goes_over_the_ceiling_nor_under_one_post_a_second() {
        let t0 = Instant::now();
        let mut claim = Claim::new(500.0, 30.0);
        assert_eq!(claim.next(round(t0, 400, 1000.0)), 500.0);
        let mut fresh = Claim::new(500.0, 30.0);
        assert_eq!(fresh.next(round(t0, 0, 1000.0)), 1.0);
    }
}
