//! The fleet budget: one send rate shared by every task of a fleet, so that
//! together they stay within the account's quota however many are running.
//!
//! Each task keeps a lease in a shared table (its demand and an expiry),
//! renews it every half second, reads every lease, and takes its share of
//! the fleet's rate: the max-min fair split of the demands (no task more
//! than its demand, the rest split equally among those that want more),
//! plus an equal part of what the demands leave unclaimed for every task
//! with work. A demand follows use: about twice what the task sent in the
//! last round, four times its share while that share holds it back
//! (`demand`). [`LeaseTable`] is the seam; `fanout-aws` implements it on
//! DynamoDB.
//!
//! # What the fleet promises
//!
//! While the table answers every task, the shares in force never add up to
//! more than the fleet's rate, also while tasks join, leave and change their
//! demand:
//! - A task only takes more than before once every other task has read its
//!   lease with the higher demand: a joining task (or one whose work
//!   resumes) sends nothing for [`JOIN_WAIT`] after it first wrote that
//!   lease, a little over two renewals (about 1.1 s) in practice.
//! - A task lowers its share before it writes a lower demand, so the others
//!   never take what it still uses.
//! - A dead task's share stays unused until its lease expires and the others
//!   next read the table: at most [`DEAD_SHARE_UNUSED`] (3.8 s) after its
//!   last renewal.
//!
//! A task whose renewal fails (an error, or a round slower than
//! [`ROUND_TIMEOUT`]) drops at once to the lower of its last share and the
//! fallback rate, while the others still count its lease; once the lease
//! has expired, it sends at the fallback rate until the table answers again,
//! then takes its share once its new lease has been read. Such a task may
//! add up to the fallback rate to the fleet's total: the fallback is sized so
//! that every task on it at once stays within the fleet's rate.
//!
//! # Layout
//!
//! - `timing`: the renewal interval, the lease TTL and the waits they imply.
//! - `shares`: [`fair_shares`], the max-min fair split, and
//!   [`shares_in_use`], that split plus the unclaimed part (pure).
//! - `demand`: what a task claims, from what it sent (pure).
//! - `clock`: [`EpochClock`], the epoch time leases expire by.
//! - `standing`: one task's share from what its own rounds saw (pure).
//! - `coordinator`: [`Coordinator`], the renewal loop that applies the share
//!   to the [`SendBudget`](crate::SendBudget).

mod clock;
mod coordinator;
mod demand;
mod shares;
mod standing;
#[cfg(test)]
mod tests;
mod timing;

use std::future::Future;
use std::time::Duration;

pub use clock::EpochClock;
pub use coordinator::{Coordinator, FleetSettings};
pub use demand::{
    GROWTH, HEADROOM, HELD_BACK, LEAST_CLAIM_OF_RATE, THROTTLED_UNDER, USE_ROUNDS, WAITING_SENDS,
};
pub use shares::{fair_shares, shares_in_use};
pub use timing::{
    DEAD_SHARE_UNUSED, DEMAND_LINGER, JOIN_WAIT, LEASE_TTL, RENEW_INTERVAL, ROUND_TIMEOUT,
};

/// One task's claim on the fleet's rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    /// The task's key in the table: unique in the fleet and stable for the
    /// life of the process.
    pub task: String,
    /// Sends per second the task can use now (0 while idle).
    pub demand: f64,
    /// When the lease stops counting, in ms since the Unix epoch. Leases are
    /// judged by this, never by their presence: the table's own expiry
    /// sweeps old items lazily, long afterwards.
    pub expires_at_ms: u64,
}

impl Lease {
    /// Whether the lease still counts at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at_ms
    }

    /// The expiry in whole epoch seconds, rounded up (what a table's TTL
    /// sweep reads), so the sweep never removes a lease that still counts.
    pub fn expires_at_secs(&self) -> u64 {
        self.expires_at_ms.div_ceil(1000)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(
        "the fleet table {table} does not exist; create it or fix {setting}",
        setting = crate::limits::setting::Setting::FleetTable
    )]
    NoSuchTable { table: String },
    #[error("the fleet table is throttling requests: {0}")]
    Throttled(String),
    #[error("the fleet table could not be reached: {0}")]
    Unavailable(String),
    #[error("the fleet table did not answer within {0:?}")]
    TimedOut(Duration),
    #[error(
        "the fleet table refused the request: {0}; check {setting} and the task role's rights on it",
        setting = crate::limits::setting::Setting::FleetTable
    )]
    Rejected(String),
    #[error("a lease in the fleet table has no usable {attribute} attribute")]
    BadLease { attribute: String },
}

impl FleetError {
    /// Whether trying the same call again later can succeed. The renewal
    /// loop tries every round either way (the table may be fixed while the
    /// task runs); this decides how loudly a failure is logged.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Throttled(_) | Self::Unavailable(_) | Self::TimedOut(_)
        )
    }
}

/// Where the fleet's tasks keep their leases.
pub trait LeaseTable: Send + Sync + 'static {
    /// Writes (registers or renews) this task's lease, replacing the one it
    /// wrote before.
    fn put(&self, lease: &Lease) -> impl Future<Output = Result<(), FleetError>> + Send;

    /// Every lease of the fleet, expired ones included, read strongly
    /// consistently: a lease whose `put` returned before this call started
    /// is in the answer.
    fn list(&self) -> impl Future<Output = Result<Vec<Lease>, FleetError>> + Send;

    /// Removes a task's lease (on a clean stop).
    fn remove(&self, task: &str) -> impl Future<Output = Result<(), FleetError>> + Send;
}
