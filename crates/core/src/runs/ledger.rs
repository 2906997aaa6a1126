//! The worker's side of the run records: the [`Ledger`] admits a job,
//! holds its run's lease while it runs, saves its checkpoints and settles
//! it; a table failure is logged and counted, and delivery goes on.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::admission::*;
use super::{Checkpoint, DurableError, Piece, RunRecord, RunTable, Tallied, rfc3339};
use crate::connection::expiry::epoch_ms;
use crate::job::Job;
use crate::job::keys::{RunKey, fingerprint};
use crate::queue::{Message, Receipt};
use crate::telemetry::Metrics;

type Boxed<'a, T> = Pin<Box<dyn Future<Output = Result<T, DurableError>> + Send + 'a>>;

/// [`RunTable`] behind a pointer: the worker holds one of whatever kind.
trait AnyTable: Send + Sync {
    fn load_boxed<'a>(&'a self, key: &'a str) -> Boxed<'a, Option<RunRecord>>;
    fn store_boxed<'a>(&'a self, record: &'a RunRecord, read: Option<u64>) -> Boxed<'a, bool>;
    fn tally_boxed<'a>(&'a self, broadcast: &'a str, piece: &'a Piece) -> Boxed<'a, Tallied>;
}

impl<T: RunTable> AnyTable for T {
    fn load_boxed<'a>(&'a self, key: &'a str) -> Boxed<'a, Option<RunRecord>> {
        Box::pin(self.load(key))
    }

    fn store_boxed<'a>(&'a self, record: &'a RunRecord, read: Option<u64>) -> Boxed<'a, bool> {
        Box::pin(self.store(record, read))
    }

    fn tally_boxed<'a>(&'a self, broadcast: &'a str, piece: &'a Piece) -> Boxed<'a, Tallied> {
        Box::pin(self.tally(broadcast, piece))
    }
}

/// The table through its pointer, as a [`RunTable`] again.
pub(super) struct Table(Box<dyn AnyTable>);

impl RunTable for Table {
    async fn load(&self, key: &str) -> Result<Option<RunRecord>, DurableError> {
        self.0.load_boxed(key).await
    }

    async fn store(&self, record: &RunRecord, read: Option<u64>) -> Result<bool, DurableError> {
        self.0.store_boxed(record, read).await
    }

    async fn tally(&self, broadcast: &str, piece: &Piece) -> Result<Tallied, DurableError> {
        self.0.tally_boxed(broadcast, piece).await
    }
}

/// The worker's side of the run records: admission, leases, settlement.
pub struct Ledger {
    pub(super) table: Table,
    windows: Windows,
    /// Unique to this process: with the message id, it names a run's owner.
    process: String,
    pub(super) metrics: Arc<Metrics>,
    /// Broadcast keys known to be cancelled: a cancel is for good, so a
    /// tombstone once read need not be read again.
    pub(super) cancelled: Mutex<HashSet<String>>,
    /// Bumped when this task records a cancel, so its own runs of that
    /// broadcast stop at once rather than at their next poll.
    pub(super) cancel_recorded: tokio::sync::watch::Sender<u64>,
}

/// What the worker does with a job, once admitted.
#[derive(Debug)]
pub enum Admission {
    /// Run it, holding this lease; from this checkpoint when an earlier
    /// run of it died after writing one.
    Run(RunLease, Option<Checkpoint>),
    /// Run it without a record: the table failed (counted and logged).
    Unrecorded,
    /// Do not run it: delete its message, a producer's retry.
    Duplicate { finished_at_ms: i64 },
    /// Do not run it: dead-letter it with this reason.
    Conflict(String),
    /// Do not run it: its run is live on another task, which now holds
    /// this message's newest receipt; leave the message hidden.
    Adopted,
    /// Do not run it: another copy of a message whose run is live; delete
    /// this one.
    Twin,
}

/// A claimed run: renewed by the heartbeat, closed when its message is
/// settled.
#[derive(Clone, Debug)]
pub struct RunLease {
    key: String,
    owner: String,
    /// The message's newest receipt, which a redelivery's adoption may
    /// change: renewals and the settlement use it.
    receipt: Arc<Mutex<Receipt>>,
    /// The record as this task last wrote it, so that the next write needs
    /// no read first (see [`update_from`]).
    written: Arc<Mutex<Option<RunRecord>>>,
}

impl RunLease {
    fn written(&self) -> Option<RunRecord> {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps what a write stored (`None`: the run is no longer this task's).
    fn wrote(&self, record: Option<RunRecord>) {
        *self.written.lock().unwrap_or_else(|p| p.into_inner()) = record;
    }

    pub fn receipt(&self) -> Receipt {
        self.receipt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Ledger {
    pub fn new<T: RunTable>(table: T, windows: Windows, metrics: Arc<Metrics>) -> Self {
        Self {
            table: Table(Box::new(table)),
            windows,
            process: format!("{:016x}", rand::random::<u64>()),
            metrics,
            cancelled: Mutex::new(HashSet::new()),
            cancel_recorded: tokio::sync::watch::Sender::new(0),
        }
    }

    pub(super) fn failed(&self, what: &str, key: &str, error: &DurableError) {
        Metrics::incr(&self.metrics.checkpoint_failures);
        tracing::warn!(run = key, error = %error, "the checkpoint table failed to {what}; delivery goes on without it");
    }

    /// Decides whether `job`, received in `message`, runs here.
    pub async fn admit(&self, message: &Message, job: &Job) -> Admission {
        let key = RunKey::of(job).storage_key();
        let fingerprint = fingerprint(job);
        let owner = format!("{}/{}/{}", self.process, message.id, message.receive_count);
        let table = &self.table;
        let request = Request {
            key: &key,
            fingerprint: &fingerprint,
            owner: &owner,
            message_id: &message.id,
            receipt: &message.receipt.0,
        };
        // Most runs are new: claim as if there were no record (one
        // conditional write), and read only when there is one.
        if let Ruling::Claim { record, read: None } =
            admit(None, &request, epoch_ms(SystemTime::now()), self.windows)
        {
            match RunTable::store(table, &record, None).await {
                Ok(true) => return Admission::Run(self.lease(message, record), None),
                Ok(false) => {}
                Err(e) => {
                    self.failed("claim the run", &key, &e);
                    return Admission::Unrecorded;
                }
            }
        }
        // A conditional write that loses means another task wrote first:
        // decide again on what it wrote.
        for _ in 0..4 {
            let existing = match RunTable::load(table, &key).await {
                Ok(existing) => existing,
                Err(e) => {
                    self.failed("read the run", &key, &e);
                    return Admission::Unrecorded;
                }
            };
            let now = epoch_ms(SystemTime::now());
            let (record, read, claimed) =
                match admit(existing.as_ref(), &request, now, self.windows) {
                    Ruling::Claim { record, read } => (record, read, true),
                    Ruling::Adopt { record, read } => (record, Some(read), false),
                    Ruling::Duplicate { finished_at_ms } => {
                        return Admission::Duplicate { finished_at_ms };
                    }
                    Ruling::Conflict { finished_at_ms } => {
                        return Admission::Conflict(conflict(&job.id, finished_at_ms));
                    }
                    Ruling::Twin { .. } => return Admission::Twin,
                };
            match RunTable::store(table, &record, read).await {
                Ok(true) if claimed => {
                    let resume = taken_over(&key, &record);
                    return Admission::Run(self.lease(message, record), resume);
                }
                Ok(true) => return Admission::Adopted,
                Ok(false) => continue,
                Err(e) => {
                    self.failed("claim the run", &key, &e);
                    return Admission::Unrecorded;
                }
            }
        }
        let e = DurableError::Rejected("the run's record kept changing".into());
        self.failed("claim the run", &key, &e);
        Admission::Unrecorded
    }

    /// The lease of a run this task has just claimed with `record`.
    fn lease(&self, message: &Message, record: RunRecord) -> RunLease {
        RunLease {
            key: record.key.clone(),
            owner: record.owner.clone(),
            receipt: Arc::new(Mutex::new(message.receipt.clone())),
            written: Arc::new(Mutex::new(Some(record))),
        }
    }

    /// [`update_from`] the record this lease last wrote, keeping what it
    /// writes for the next.
    async fn update(
        &self,
        lease: &RunLease,
        change: impl Fn(&mut RunRecord),
    ) -> Result<Option<RunRecord>, DurableError> {
        let written = update_from(
            &self.table,
            &lease.key,
            &lease.owner,
            lease.written(),
            change,
        )
        .await;
        if let Ok(record) = &written {
            lease.wrote(record.clone());
        }
        written
    }

    /// Extends the lease (heartbeat); `false` once another task holds the
    /// run, when the heartbeat should stop keeping the message hidden.
    pub async fn renew(&self, lease: &RunLease) -> bool {
        let now = epoch_ms(SystemTime::now());
        let renewed = self.update(lease, renewal(now, self.windows)).await;
        match renewed.map(|r| held(r.as_ref())) {
            Ok(Renewed::Held { receipt }) => {
                *lease.receipt.lock().unwrap_or_else(|p| p.into_inner()) = Receipt(receipt);
                true
            }
            Ok(Renewed::Lost) => {
                tracing::warn!(
                    run = lease.key,
                    "another task took this run over; its lease had lapsed"
                );
                false
            }
            Err(e) => {
                self.failed("renew the lease", &lease.key, &e);
                true
            }
        }
    }

    /// Stores the run's resume points; a failure is counted and logged,
    /// and the run goes on.
    pub async fn save(&self, lease: &RunLease, checkpoint: &Checkpoint) {
        let checkpoint = match serde_json::to_string(checkpoint) {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(run = lease.key, error = %e, "cannot encode a checkpoint");
                return;
            }
        };
        match self
            .update(lease, checkpointing(&checkpoint))
            .await
            .map(|r| r.is_some())
        {
            Ok(true) => {}
            Ok(false) => tracing::debug!(
                run = lease.key,
                "the run has another owner now; checkpoint not written"
            ),
            Err(e) => self.failed("write a checkpoint", &lease.key, &e),
        }
    }

    /// The run's message was settled: off the queue (`finished`), or back
    /// on it for another try.
    pub async fn close(&self, lease: RunLease, finished: bool) {
        let result = if finished {
            let now = epoch_ms(SystemTime::now());
            self.update(&lease, finishing(now, self.windows)).await
        } else {
            self.update(&lease, releasing).await
        };
        if let Err(e) = result {
            self.failed(
                if finished {
                    "record the finish"
                } else {
                    "release the run"
                },
                &lease.key,
                &e,
            );
        }
    }
}

impl Ledger {
    /// Adds a settled piece to its broadcast's record; the record, once
    /// this add has left nothing outstanding (its piece sends the
    /// broadcast's report). A piece counted before finds the record as it
    /// was, over or not, and says so again: the report is at least once. A
    /// table failure is counted and logged: no broadcast report then.
    pub async fn tally(&self, broadcast: &str, piece: &Piece) -> Option<super::BroadcastTally> {
        match RunTable::tally(&self.table, broadcast, piece).await {
            Ok(tallied) if tallied.tally.is_over() => Some(tallied.tally),
            Ok(_) => None,
            Err(e) => {
                self.failed("add up the broadcast", &piece.run, &e);
                None
            }
        }
    }
}

/// The reason a body sent under a used broadcast key is dead-lettered.
fn conflict(id: &str, finished_at_ms: Option<i64>) -> String {
    let when = match finished_at_ms {
        Some(at) => format!("finished at {}", rfc3339(at)),
        None => "running now".to_owned(),
    };
    format!(
        "the broadcast key {id} was used for another body ({when}); a broadcast key names one \
         broadcast: send a new id for a new one"
    )
}

/// The checkpoint of a run claimed from a task that stopped, if it left a
/// readable one.
fn taken_over(key: &str, record: &RunRecord) -> Option<Checkpoint> {
    let checkpoint = record.checkpoint.as_deref().and_then(|text| {
        serde_json::from_str::<Checkpoint>(text)
            .inspect_err(|e| tracing::warn!(run = key, error = %e, "an unreadable checkpoint; the run starts from its job's own start"))
            .ok()
    })?;
    tracing::info!(
        run = key,
        segments = checkpoint.resume.len(),
        deferred = checkpoint.deferred.len(),
        "taking over a run whose task stopped: resuming from its checkpoint"
    );
    Some(checkpoint)
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("windows", &self.windows)
            .finish_non_exhaustive()
    }
}
