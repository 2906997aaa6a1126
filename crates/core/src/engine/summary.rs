//! What one run came to: the summary the engine hands back, read by the
//! counts it is tallied from, the worker that settles the message, and the
//! broadcast report built from it. It sits below the engine so that none of
//! them imports the engine that drives them.

use std::collections::HashMap;
use std::time::Duration;

use crate::connection::expiry::AgeProblems;
use crate::connection::{Connection, ConnectionId};
use crate::store::Cursor;

/// The rejected connections a report names; `failed` counts them all. A
/// hundred ids of up to 128 bytes stay far below SQS's and SNS's 256 KiB.
pub const MAX_FAILED_IDS: usize = 100;

/// What one broadcast came to. Counts are connections, not attempts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Connections read for the job (excluded ones not counted).
    pub audience: u64,
    /// Connections skipped because the job excluded them.
    pub excluded: u64,
    pub delivered: u64,
    pub gone: u64,
    /// Rows certainly gone by age (connectedAt), deleted without a post.
    pub expired: u64,
    /// Rows deleted from the table: gone, or expired.
    pub removed: u64,
    /// Gone rows that could not be deleted.
    pub remove_failed: u64,
    /// 410s that were not evidence yet: posted to again after the connect
    /// window by the process's recheck queue, which removes the row only on
    /// a second 410 (see [`crate::engine::rechecks`]).
    pub rechecking: u64,
    /// 410s that removed nothing, for want of evidence: the endpoint looked
    /// wrong, or the recheck queue was full. Their rows stay.
    pub kept: u64,
    /// Connections rejected (a 4xx about that connection, such as 400):
    /// final, not retried, not removed.
    pub failed: u64,
    /// The first [`MAX_FAILED_IDS`] of those connections, for the broadcast
    /// report (`failed` counts them all).
    pub rejected: Vec<ConnectionId>,
    /// Connections still deferred after every pass, with why: the worker
    /// hands them on; none is final.
    pub deferred: Vec<Deferred>,
    /// Passes over deferred connections that ran.
    pub passes: u32,
    /// Send attempts that were retries.
    pub retries: u64,
    /// 429 answers.
    pub throttled: u64,
    pub duration: Duration,
    /// Where to resume each segment that finished pages (see
    /// [`crate::engine::progress`]); segments not listed start from the beginning.
    pub resume: Vec<Cursor>,
    /// Rows whose start could not be trusted for the age rule (posted to
    /// as usual): how many, and the first, to name the problem once.
    pub age_problems: AgeProblems,
    /// For a `to` broadcast: its keys, key by key.
    pub receipts: Option<KeyReceipts>,
    /// Where each segment's reading got to (see
    /// `ResumePoints::read_points`): a stopped run counts what lies past.
    pub read_to: Vec<Cursor>,
}

/// A `to` broadcast's keys at the end of a run, by index into `keys`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyReceipts {
    pub keys: Vec<String>,
    /// A connection read for the key accepted the message (a 2xx), in this
    /// run or the run it took over.
    pub reached: Vec<bool>,
    /// A connection read for the key is still deferred.
    pub pending: Vec<bool>,
    /// The key's rows were read to their end in this run.
    pub read: Vec<bool>,
    /// The key was read to its end before this run began (this run
    /// resumes one): the earlier run judged it.
    pub earlier: Vec<bool>,
    /// The key each still-deferred connection was read for, for the
    /// continuation that goes on with them.
    pub deferred_of: HashMap<ConnectionId, u32>,
}

impl KeyReceipts {
    /// Keys reached.
    pub fn reached_count(&self) -> u64 {
        self.reached.iter().filter(|r| **r).count() as u64
    }

    /// The keys reached.
    pub fn reached_keys(&self) -> Vec<String> {
        (0..self.keys.len())
            .filter(|&i| self.reached[i])
            .map(|i| self.keys[i].clone())
            .collect()
    }

    /// Keys none of whose connections accepted the message, with nothing
    /// of them left to try: read to their end and none deferred, or, when
    /// nothing of the broadcast goes on (`stopped`), every key not reached.
    pub fn unreached(&self, stopped: bool) -> Vec<String> {
        (0..self.keys.len())
            .filter(|&i| {
                let judged = if stopped {
                    !self.earlier[i]
                } else {
                    self.read[i] && !self.pending[i]
                };
                !self.reached[i] && judged
            })
            .map(|i| self.keys[i].clone())
            .collect()
    }
}

impl RunSummary {
    /// Deliveries per second over the whole job.
    pub fn rate(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            self.delivered as f64 / secs
        } else {
            0.0
        }
    }
}

/// A connection that could not be reached for now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deferred {
    pub connection: Connection,
    /// The last answer, e.g. `throttled (429) for 60s` or `HTTP 503`.
    pub reason: String,
}
