//! One report for the whole broadcast: every piece of a broadcast (the
//! producer's job, its segment jobs, continuations and deferred parts)
//! adds what it came to into one record per broadcast key, once per run
//! key, and the piece that leaves nothing outstanding sends the
//! broadcast's report.
//!
//! The record keeps two sets of run keys: the pieces *settled*, and the
//! pieces *expected* (the producer's job expects itself; each piece adds
//! the pieces it handed on). The broadcast is over when the two are equal:
//! a piece that settles before its parent has written it is in `settled`
//! and not yet in `expected`, so nothing ends early. Each add is
//! conditional on the piece's run key not being in `settled`, so a piece
//! run again (a redelivery, a takeover) counts once.

use std::collections::BTreeSet;

/// What one settled piece adds to its broadcast.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Piece {
    /// Its run key, as stored.
    pub run: String,
    /// The pieces the broadcast now waits for because of it: those it
    /// handed on, and, for the producer's own job, itself.
    pub expects: Vec<String>,
    pub totals: Totals,
    /// A `to` broadcast's keys this piece reached, and those it left
    /// unreached (the broadcast's `unreached` are those no piece reached).
    pub reached: Vec<String>,
    pub unreached: Vec<String>,
    /// Epoch ms when the piece started.
    pub started_ms: i64,
}

/// The counts a broadcast adds up, piece by piece.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub audience: u64,
    pub delivered: u64,
    pub gone: u64,
    pub expired: u64,
    pub removed: u64,
    pub failed: u64,
    pub unsent: u64,
    pub throttled: u64,
    pub retries: u64,
    /// Pieces that ended `lapsed`, `cancelled`, `superseded` and
    /// `dead_lettered`.
    pub lapsed: u64,
    pub cancelled: u64,
    pub superseded: u64,
    pub dead_lettered: u64,
    /// Pieces whose `unsent` could not count what they never read.
    pub unsent_partial: u64,
}

impl Totals {
    /// Each count by the name it is stored under.
    pub fn named(&self) -> [(&'static str, u64); 14] {
        [
            ("audience", self.audience),
            ("delivered", self.delivered),
            ("gone", self.gone),
            ("expired", self.expired),
            ("removed", self.removed),
            ("failed", self.failed),
            ("unsent", self.unsent),
            ("throttled", self.throttled),
            ("retries", self.retries),
            ("lapsed", self.lapsed),
            ("cancelled", self.cancelled),
            ("superseded", self.superseded),
            ("deadLettered", self.dead_lettered),
            ("unsentPartial", self.unsent_partial),
        ]
    }

    /// The counts read back by name (an absent name is 0).
    pub fn from_named(get: impl Fn(&str) -> u64) -> Self {
        Self {
            audience: get("audience"),
            delivered: get("delivered"),
            gone: get("gone"),
            expired: get("expired"),
            removed: get("removed"),
            failed: get("failed"),
            unsent: get("unsent"),
            throttled: get("throttled"),
            retries: get("retries"),
            lapsed: get("lapsed"),
            cancelled: get("cancelled"),
            superseded: get("superseded"),
            dead_lettered: get("deadLettered"),
            unsent_partial: get("unsentPartial"),
        }
    }

    /// Adds `other`, count by count.
    pub fn add(&mut self, other: &Totals) {
        let sum = Self::from_named(|name| {
            let of = |t: &Totals| {
                t.named()
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(0, |p| p.1)
            };
            of(self) + of(other)
        });
        *self = sum;
    }
}

/// A broadcast's record after a piece's add.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BroadcastTally {
    pub totals: Totals,
    pub settled: BTreeSet<String>,
    pub expected: BTreeSet<String>,
    pub reached: BTreeSet<String>,
    pub unreached: BTreeSet<String>,
    /// Epoch ms when its first piece started.
    pub started_ms: i64,
}

impl BroadcastTally {
    /// Every piece expected has settled.
    pub fn is_over(&self) -> bool {
        !self.settled.is_empty() && self.settled == self.expected
    }

    /// The keys no piece reached.
    pub fn unreached(&self) -> Vec<String> {
        self.unreached.difference(&self.reached).cloned().collect()
    }
}

/// What adding a piece did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tallied {
    /// `false`: the piece had been counted before (a run again); the
    /// record is as it was.
    pub counted: bool,
    pub tally: BroadcastTally,
}

/// The key of a broadcast's record: apart from every run key (which starts
/// with `s`) and every tombstone (`cancel:`).
pub fn tally_key(broadcast: &str) -> String {
    format!("broadcast:{broadcast}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broadcast_is_over_when_every_expected_piece_has_settled() {
        let set = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect();
        let mut tally = BroadcastTally {
            settled: set(&["child"]),
            expected: set(&[]),
            ..BroadcastTally::default()
        };
        assert!(!tally.is_over(), "a child before its parent ends nothing");
        tally.settled = set(&["child", "root"]);
        tally.expected = set(&["root", "child", "other"]);
        assert!(!tally.is_over());
        tally.settled.insert("other".into());
        assert!(tally.is_over());
    }

    #[test]
    fn totals_add_up_count_by_count() {
        let mut sum = Totals {
            lapsed: 1,
            ..Totals::default()
        };
        sum.add(&Totals {
            delivered: 5,
            cancelled: 1,
            ..Totals::default()
        });
        assert_eq!((sum.delivered, sum.lapsed, sum.cancelled), (5, 1, 1));
        assert_eq!(Totals::from_named(|_| 7).named().map(|n| n.1), [7; 14]);
    }
}
