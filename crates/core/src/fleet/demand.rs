//! What a task claims of the fleet's rate, round by round: its whole
//! ceiling while it joins (it cannot know yet what its jobs will send),
//! then about what it sent in the last round, with headroom, and its whole
//! ceiling again as soon as its share, not its jobs, holds it back. Pure:
//! the renewal loop feeds it what the round measured.
//!
//! A raised claim counts for the task itself only once the others have
//! read it, but it lowers their shares at once. Tasks that claim little and
//! then all raise their claims together (several segments of one broadcast
//! starting on tasks busy with small jobs) therefore send at their former
//! claims for about [`JOIN_WAIT`](super::JOIN_WAIT); a joiner claims its
//! ceiling from the start so that tasks starting together never do.
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

/// A task claims this many times what it sent in the last round, so that
/// use that varies from one round to the next stays within the claim (and
/// the share) without counting as held back.
pub const HEADROOM: f64 = 2.0;

/// A round in which the task sent at least this share of its share in
/// force was held back by the share: it claims its ceiling.
pub const HELD_BACK: f64 = 0.9;

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
    /// The share in force since the last round, per second.
    pub share: f64,
    /// The adaptive rate now, per second (`None`: not adaptive).
    pub adaptive: Option<f64>,
}

/// One task's claim, from its rounds.
#[derive(Debug)]
pub(super) struct Claim {
    /// The task's configured rate: the most it ever claims.
    ceiling: f64,
    /// The least it claims while it has work.
    least: f64,
    /// The claim of the last round.
    last: f64,
    /// The last round that found a job running.
    last_busy: Option<Instant>,
}

impl Claim {
    /// A task whose configured rate is `ceiling`, in a fleet of `rate`.
    pub(super) fn new(ceiling: f64, rate: f64) -> Self {
        Self {
            ceiling,
            least: (rate * LEAST_CLAIM_OF_RATE).max(1.0).min(ceiling),
            last: 0.0,
            last_busy: None,
        }
    }

    /// The claim to write this round.
    pub(super) fn next(&mut self, round: Round) -> f64 {
        if round.busy {
            self.last_busy = Some(round.at);
        }
        // Jobs run back to back with gaps of milliseconds: the claim stays
        // through a gap, else the next job would wait as a joiner does.
        let lingering = self
            .last_busy
            .is_some_and(|busy| round.at.duration_since(busy) < DEMAND_LINGER);
        self.last = if lingering { self.used(round) } else { 0.0 };
        self.last
    }

    fn used(&self, round: Round) -> f64 {
        let seconds = round.elapsed.as_secs_f64();
        // A share of zero with work: the task joins (or its work resumed
        // after idle time) and waits for its claim to be read.
        let joined = round.share > 0.0;
        let throttled = round
            .adaptive
            .is_some_and(|adaptive| adaptive < round.share * THROTTLED_UNDER);
        let held_back = seconds > 0.0 && round.sent as f64 >= round.share * seconds * HELD_BACK;
        let claim = if !joined {
            self.ceiling
        } else if throttled && self.last > 0.0 {
            self.last
        } else if held_back {
            self.ceiling
        } else if seconds > 0.0 {
            round.sent as f64 / seconds * HEADROOM
        } else {
            self.last
        };
        claim.clamp(self.least, self.ceiling)
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
            share,
            adaptive: None,
        }
    }

    #[test]
    fn a_task_with_work_claims_what_it_sent_with_headroom() {
        let t0 = Instant::now();
        let mut claim = Claim::new(3000.0, 3000.0);
        // 35 posts in a second, of a share of 1,000: 70.
        assert_eq!(claim.next(round(t0, 35, 1000.0)), 70.0);
        // Nothing sent yet: the least claim, 1 % of the fleet's rate.
        assert_eq!(claim.next(round(t0 + SECOND, 0, 1000.0)), 30.0);
    }

    #[test]
    fn a_task_its_share_holds_back_claims_its_ceiling() {
        let t0 = Instant::now();
        let mut claim = Claim::new(3000.0, 3000.0);
        assert_eq!(claim.next(round(t0, 950, 1000.0)), 3000.0);
        // Under the mark: back to its use.
        assert_eq!(claim.next(round(t0 + SECOND, 800, 1000.0)), 1600.0);
    }

    #[test]
    fn a_joiner_claims_its_ceiling_until_it_has_a_share() {
        let t0 = Instant::now();
        let mut claim = Claim::new(3000.0, 3000.0);
        assert_eq!(claim.next(round(t0, 0, 0.0)), 3000.0);
        assert_eq!(claim.next(round(t0 + SECOND, 10, 1000.0)), 30.0);
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
        // The throttle gone: its use again.
        let back = Round {
            adaptive: Some(3000.0),
            ..round(t0 + SECOND * 2, 400, 1000.0)
        };
        assert_eq!(claim.next(back), 800.0);
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
        assert_eq!(claim.next(idle(t0 + SECOND)), 30.0, "between two jobs");
        assert_eq!(claim.next(idle(t0 + DEMAND_LINGER)), 0.0, "idle");
    }

    #[test]
    fn a_claim_never_goes_over_the_ceiling_nor_under_one_post_a_second() {
        let t0 = Instant::now();
        let mut claim = Claim::new(500.0, 30.0);
        assert_eq!(claim.next(round(t0, 400, 1000.0)), 500.0);
        assert_eq!(claim.next(round(t0 + SECOND, 0, 1000.0)), 1.0);
    }
}
