//! Durable runs: a record per run key in the checkpoint table
//! (the checkpoint table), so that a broadcast a producer sends again is
//! not broadcast twice, and a run live on one task is not run at once by
//! another.
//!
//! A record holds who runs the run now (an owner and a lease that the
//! heartbeat renews), the fingerprint of its body, and, once its message is
//! settled off the queue, when it finished. What a worker does with a job
//! whose run has a record is [`admit`], a pure function:
//!
//! | the record | the job | what happens |
//! |---|---|---|
//! | none, or a lease that expired | any | claimed: the job runs |
//! | finished within the window, same body | a producer's retry | not run; its message deleted (a duplicate) |
//! | finished within the window, another body | a producer error | dead-lettered with that reason |
//! | live lease, same SQS message | redelivered after a lapse | not run; kept hidden for the holder, who adopts the newest receipt |
//! | live lease, another message | a second copy | not run; deleted (the holder's copy is still on the queue if its task dies) |
//!
//! The same table keeps a tombstone per cancelled broadcast (see
//! [`cancels`]) and a record per broadcast that adds up its pieces for one
//! report (see the `broadcasts` module).
//!
//! Every write is conditional on the version read, so two tasks that read
//! the same record cannot both claim it. When the table cannot be read or
//! written, delivery goes on without it (at-least-once beats at-most-once):
//! the failure is logged and counted.

use std::future::Future;

mod admission;
mod broadcasts;
mod cancels;
mod ledger;
mod streams;

use crate::job::DeferredSpec;
use crate::store::Cursor;
pub use admission::{Renewed, Request, Ruling, Windows, admit};
pub use broadcasts::{BroadcastTally, Piece, Tallied, Totals, tally_key};
pub use cancels::{CANCEL_POLL, Cancelled};
pub use ledger::{Admission, Ledger, RunLease};
pub use streams::{Claimant, Handed, LATEST_POLL, POSITION_INTERVAL, StreamClaim, StreamPoll};

/// One run's record as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRecord {
    /// [`crate::job::keys::RunKey::storage_key`].
    pub key: String,
    /// [`crate::job::keys::fingerprint`] of the body that claimed it.
    pub fingerprint: String,
    /// The task and job that run it now (or ran it last).
    pub owner: String,
    /// The SQS message id it runs from.
    pub message_id: String,
    /// The newest receipt of that message: a redelivery's receiver writes
    /// its own here, and the holder deletes and renews with it (SQS deletes
    /// a message only by its latest receipt).
    pub receipt: String,
    /// Epoch ms until which the owner holds the run.
    pub lease_until_ms: i64,
    /// Epoch ms when its message was settled off the queue; `None` while
    /// it runs.
    pub finished_at_ms: Option<i64>,
    /// Epoch seconds after which the table may drop the record (its TTL).
    pub expires_at: i64,
    /// Where the run resumes if its task dies, a [`Checkpoint`] as JSON:
    /// written after each fully answered page.
    pub checkpoint: Option<String>,
    /// Bumped by every write; a write names the version it read.
    pub version: u64,
}

/// Connections a checkpoint lists at most: past this, it holds the
/// stricter resume points instead (those that never pass a page with a
/// deferred connection), so a record stays far under DynamoDB's 400 KB.
pub const MAX_CHECKPOINT_DEFERRED: usize = 1000;

/// Where a run resumes if its task dies: each segment's resume point, and
/// the connections deferred (in retry backoff) on the pages before it,
/// which the run that takes over retries first.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub resume: Vec<Cursor>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deferred: Vec<DeferredSpec>,
    /// A `to` broadcast's keys reached so far, by index: the run that takes
    /// over reports them reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reached: Vec<u32>,
}

/// Why the run table could not answer.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error(
        "the checkpoint table {table} does not exist or is not keyed pk (S) + sk (S); create it or fix {setting}",
        setting = crate::limits::setting::Setting::CheckpointTable
    )]
    NoSuchTable { table: String },
    #[error("the checkpoint table is throttling requests: {0}")]
    Throttled(String),
    #[error("the checkpoint table could not be reached: {0}")]
    Unavailable(String),
    #[error("the checkpoint table refused the request: {0}")]
    Rejected(String),
}

impl DurableError {
    /// Whether trying the same call again later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Throttled(_) | Self::Unavailable(_))
    }
}

/// Where run records are kept: one read and one conditional write.
pub trait RunTable: Send + Sync + 'static {
    /// The record of `key`, read consistently.
    fn load(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<RunRecord>, DurableError>> + Send;

    /// Writes `record` if the stored one still has version `read` (`None`:
    /// if there is none). `Ok(false)`: another write came first.
    fn store(
        &self,
        record: &RunRecord,
        read: Option<u64>,
    ) -> impl Future<Output = Result<bool, DurableError>> + Send;

    /// Adds `piece` to the record of its broadcast ([`tally_key`]) in one
    /// atomic update, unless its run key was added before; returns the
    /// record after (see the `broadcasts` module).
    fn tally(
        &self,
        broadcast: &str,
        piece: &Piece,
    ) -> impl Future<Output = Result<Tallied, DurableError>> + Send;
}

pub use crate::connection::expiry::rfc3339;

#[cfg(test)]
mod tests;
