//! Durable runs: a record per run key in the checkpoint table
//! (`FANOUT_CHECKPOINT_TABLE`), so that a broadcast a producer sends again is
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
//! Every write is conditional on the version read, so two tasks that read
//! the same record cannot both claim it. When the table cannot be read or
//! written, delivery goes on without it (at-least-once beats at-most-once):
//! the failure is logged and counted.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::connection::expiry::epoch_ms;
use crate::job::DeferredSpec;
use crate::job::Job;
use crate::job::keys::{RunKey, fingerprint};
use crate::queue::{Message, Receipt};
use crate::store::Cursor;
use crate::telemetry::Metrics;

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
}

/// Why the run table could not answer.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error(
        "the checkpoint table {table} does not exist or is not keyed pk (S) + sk (S); create it or fix FANOUT_CHECKPOINT_TABLE"
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
}

/// What the worker asks for one job.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub key: &'a str,
    pub fingerprint: &'a str,
    pub owner: &'a str,
    pub message_id: &'a str,
    pub receipt: &'a str,
}

/// What to do with a job, given its run's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Run it: write this record, conditional on the version read.
    Claim {
        record: RunRecord,
        read: Option<u64>,
    },
    /// A producer's retry of a finished broadcast: delete its message.
    Duplicate { finished_at_ms: i64 },
    /// The broadcast key was used for another body: dead-letter it.
    Conflict { finished_at_ms: Option<i64> },
    /// The same message, redelivered while its run is live elsewhere:
    /// write the newest receipt for the holder (this record, conditional),
    /// and leave the message hidden.
    Adopt { record: RunRecord, read: u64 },
    /// Another copy of a message whose run is live elsewhere: delete it.
    Twin { lease_until_ms: i64 },
}

/// How long a record lives, and how long a lease lasts.
#[derive(Clone, Copy, Debug)]
pub struct Windows {
    /// `FANOUT_DEDUP_WINDOW`: how long a finished broadcast is remembered.
    pub dedup: Duration,
    /// The visibility timeout: a lease lasts as long as the message stays
    /// hidden, and the heartbeat renews both.
    pub lease: Duration,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Decides what becomes of a job whose run has `existing` as its record.
pub fn admit(
    existing: Option<&RunRecord>,
    request: &Request<'_>,
    now_ms: i64,
    windows: Windows,
) -> Admission {
    let claim = |read: Option<u64>, checkpoint: Option<String>| Admission::Claim {
        record: RunRecord {
            key: request.key.to_owned(),
            fingerprint: request.fingerprint.to_owned(),
            owner: request.owner.to_owned(),
            message_id: request.message_id.to_owned(),
            receipt: request.receipt.to_owned(),
            lease_until_ms: now_ms + ms(windows.lease),
            finished_at_ms: None,
            expires_at: (now_ms + ms(windows.lease) + ms(windows.dedup)) / 1000,
            checkpoint,
            version: read.map_or(1, |v| v + 1),
        },
        read,
    };
    let Some(record) = existing else {
        return claim(None, None);
    };
    if let Some(finished_at_ms) = record.finished_at_ms {
        // The TTL sweep is lazy: the window is checked here.
        if now_ms - finished_at_ms > ms(windows.dedup) {
            return claim(Some(record.version), None);
        }
        return if record.fingerprint == request.fingerprint {
            Admission::Duplicate { finished_at_ms }
        } else {
            Admission::Conflict {
                finished_at_ms: Some(finished_at_ms),
            }
        };
    }
    if record.fingerprint != request.fingerprint {
        return Admission::Conflict {
            finished_at_ms: None,
        };
    }
    if record.lease_until_ms <= now_ms {
        // Its task died (or let go): take over, from where it got to.
        return claim(Some(record.version), record.checkpoint.clone());
    }
    if record.message_id == request.message_id {
        let mut adopted = record.clone();
        adopted.receipt = request.receipt.to_owned();
        adopted.version += 1;
        return Admission::Adopt {
            record: adopted,
            read: record.version,
        };
    }
    Admission::Twin {
        lease_until_ms: record.lease_until_ms,
    }
}

/// What became of a renewal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Renewed {
    /// Still held, until then; with the message's newest receipt.
    Held { receipt: String },
    /// Another task took the run over (this one's lease had lapsed).
    Lost,
}

/// Reads `key`, and writes `change` applied to it if this owner still holds
/// it, retrying when another write (an adoption) came in between.
async fn update<T: RunTable>(
    table: &T,
    key: &str,
    owner: &str,
    change: impl Fn(&mut RunRecord),
) -> Result<Option<RunRecord>, DurableError> {
    update_from(table, key, owner, None, change).await
}

/// [`update`], starting from `known`, the record as this owner last wrote
/// it: a write conditional on its version is right without a read, since
/// every write bumps the version. Only when another write came in between
/// (an adoption, a takeover) does it read and try again.
async fn update_from<T: RunTable>(
    table: &T,
    key: &str,
    owner: &str,
    known: Option<RunRecord>,
    change: impl Fn(&mut RunRecord),
) -> Result<Option<RunRecord>, DurableError> {
    if let Some(mut record) = known.filter(|r| r.key == key && r.owner == owner) {
        let read = record.version;
        change(&mut record);
        record.version = read + 1;
        if table.store(&record, Some(read)).await? {
            return Ok(Some(record));
        }
    }
    // An adoption between the read and the write is the only write another
    // task makes to a held record: a few rounds always get through.
    for _ in 0..4 {
        let Some(mut record) = table.load(key).await? else {
            return Ok(None);
        };
        if record.owner != owner {
            return Ok(None);
        }
        let read = record.version;
        change(&mut record);
        record.version = read + 1;
        if table.store(&record, Some(read)).await? {
            return Ok(Some(record));
        }
    }
    Err(DurableError::Rejected(format!(
        "the record of {key} kept changing under its owner"
    )))
}

/// Extends the lease of a held run to `now_ms` + the lease window.
pub async fn renew<T: RunTable>(
    table: &T,
    key: &str,
    owner: &str,
    now_ms: i64,
    windows: Windows,
) -> Result<Renewed, DurableError> {
    let renewed = update(table, key, owner, renewal(now_ms, windows)).await?;
    Ok(held(renewed.as_ref()))
}

fn renewal(now_ms: i64, windows: Windows) -> impl Fn(&mut RunRecord) {
    let until = now_ms + ms(windows.lease);
    move |r| {
        r.lease_until_ms = until;
        r.expires_at = r.expires_at.max((until + ms(windows.dedup)) / 1000);
    }
}

fn held(renewed: Option<&RunRecord>) -> Renewed {
    match renewed {
        Some(record) => Renewed::Held {
            receipt: record.receipt.clone(),
        },
        None => Renewed::Lost,
    }
}

/// Marks a held run finished: its message is off the queue.
pub async fn finish<T: RunTable>(
    table: &T,
    key: &str,
    owner: &str,
    now_ms: i64,
    windows: Windows,
) -> Result<bool, DurableError> {
    let done = update(table, key, owner, finishing(now_ms, windows)).await?;
    Ok(done.is_some())
}

fn finishing(now_ms: i64, windows: Windows) -> impl Fn(&mut RunRecord) {
    move |r| {
        r.finished_at_ms = Some(now_ms);
        r.lease_until_ms = now_ms;
        r.expires_at = (now_ms + ms(windows.dedup)) / 1000;
    }
}

/// Stores where a held run would resume (through [`Ledger::save`], which
/// starts from the record the holder wrote last).
fn checkpointing(checkpoint: &str) -> impl Fn(&mut RunRecord) + '_ {
    move |r| r.checkpoint = Some(checkpoint.to_owned())
}

/// Lets a held run go at once (its message is back on the queue), so the
/// next receive need not wait for the lease to expire.
pub async fn release<T: RunTable>(table: &T, key: &str, owner: &str) -> Result<bool, DurableError> {
    let released = update(table, key, owner, releasing).await?;
    Ok(released.is_some())
}

fn releasing(r: &mut RunRecord) {
    r.lease_until_ms = 0;
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = Result<T, DurableError>> + Send + 'a>>;

/// [`RunTable`] behind a pointer: the worker holds one of whatever kind.
trait AnyTable: Send + Sync {
    fn load_boxed<'a>(&'a self, key: &'a str) -> Boxed<'a, Option<RunRecord>>;
    fn store_boxed<'a>(&'a self, record: &'a RunRecord, read: Option<u64>) -> Boxed<'a, bool>;
}

impl<T: RunTable> AnyTable for T {
    fn load_boxed<'a>(&'a self, key: &'a str) -> Boxed<'a, Option<RunRecord>> {
        Box::pin(self.load(key))
    }

    fn store_boxed<'a>(&'a self, record: &'a RunRecord, read: Option<u64>) -> Boxed<'a, bool> {
        Box::pin(self.store(record, read))
    }
}

/// The table through its pointer, as a [`RunTable`] again.
struct Table(Box<dyn AnyTable>);

impl RunTable for Table {
    async fn load(&self, key: &str) -> Result<Option<RunRecord>, DurableError> {
        self.0.load_boxed(key).await
    }

    async fn store(&self, record: &RunRecord, read: Option<u64>) -> Result<bool, DurableError> {
        self.0.store_boxed(record, read).await
    }
}

/// The worker's side of the run records: admission, leases, settlement.
pub struct Ledger {
    table: Table,
    windows: Windows,
    /// Unique to this process: with the message id, it names a run's owner.
    process: String,
    metrics: Arc<Metrics>,
}

/// What the worker does with a job, once admitted.
#[derive(Debug)]
pub enum Admitted {
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
        }
    }

    fn failed(&self, what: &str, key: &str, error: &DurableError) {
        Metrics::incr(&self.metrics.checkpoint_failures);
        tracing::warn!(run = key, error = %error, "the checkpoint table failed to {what}; delivery goes on without it");
    }

    /// Decides whether `job`, received in `message`, runs here.
    pub async fn admit(&self, message: &Message, job: &Job) -> Admitted {
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
        if let Admission::Claim { record, read: None } =
            admit(None, &request, epoch_ms(SystemTime::now()), self.windows)
        {
            match RunTable::store(table, &record, None).await {
                Ok(true) => return Admitted::Run(self.lease(message, record), None),
                Ok(false) => {}
                Err(e) => {
                    self.failed("claim the run", &key, &e);
                    return Admitted::Unrecorded;
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
                    return Admitted::Unrecorded;
                }
            };
            let now = epoch_ms(SystemTime::now());
            let (record, read, claimed) =
                match admit(existing.as_ref(), &request, now, self.windows) {
                    Admission::Claim { record, read } => (record, read, true),
                    Admission::Adopt { record, read } => (record, Some(read), false),
                    Admission::Duplicate { finished_at_ms } => {
                        return Admitted::Duplicate { finished_at_ms };
                    }
                    Admission::Conflict { finished_at_ms } => {
                        let when = match finished_at_ms {
                            Some(at) => format!("finished at {}", rfc3339(at)),
                            None => "running now".to_owned(),
                        };
                        return Admitted::Conflict(format!(
                            "the broadcast key {} was used for another body ({when}); a broadcast \
                         key names one broadcast: send a new id for a new one",
                            job.id
                        ));
                    }
                    Admission::Twin { .. } => return Admitted::Twin,
                };
            match RunTable::store(table, &record, read).await {
                Ok(true) if claimed => {
                    let resume = record.checkpoint.as_deref().and_then(|text| {
                        serde_json::from_str::<Checkpoint>(text)
                            .inspect_err(|e| tracing::warn!(run = key, error = %e, "an unreadable checkpoint; the run starts from its job's own start"))
                            .ok()
                    });
                    if let Some(checkpoint) = &resume {
                        tracing::info!(
                            run = key,
                            segments = checkpoint.resume.len(),
                            deferred = checkpoint.deferred.len(),
                            "taking over a run whose task stopped: resuming from its checkpoint"
                        );
                    }
                    return Admitted::Run(self.lease(message, record), resume);
                }
                Ok(true) => return Admitted::Adopted,
                Ok(false) => continue,
                Err(e) => {
                    self.failed("claim the run", &key, &e);
                    return Admitted::Unrecorded;
                }
            }
        }
        let e = DurableError::Rejected("the run's record kept changing".into());
        self.failed("claim the run", &key, &e);
        Admitted::Unrecorded
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

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("windows", &self.windows)
            .finish_non_exhaustive()
    }
}

/// Epoch ms as RFC 3339, for log lines and reasons.
pub fn rfc3339(at_ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(at_ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests;
