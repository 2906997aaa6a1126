//! The worker loop: receive jobs, fan each out, settle its message.
//!
//! A message is deleted only when its job is done; a job that failed for a
//! passing reason is made visible again after a backoff; a job that can never
//! run goes to the dead-letter queue with its reason. While a job runs, a
//! heartbeat keeps its message hidden. Shutdown arrives as a token: receiving
//! stops at once, running jobs get a grace period, and the messages of jobs
//! that did not finish are handed back at once for another worker; settling
//! gets [`SHUTDOWN_SETTLE_BOUND`] more, then the worker returns whatever its
//! peers do.
//!
//! # Reading order
//!
//! [`run`] receives; `JobContext::process` takes one message through parse →
//! run → settle. Each step's details have a file of their own:
//! - `receive`: free job slots, and the long poll that fills them.
//! - `chains`: messages of one FIFO group run one after another.
//! - `heartbeat`: keeps a running job's message hidden.
//! - `split`: a whole-table job becomes segment jobs.
//! - `settle`: what a run came to (a `Settlement`), and the one place that
//!   applies it to the message; the report of what became of it then goes
//!   to the report destinations.
//! - `deleter`: finished messages deleted in batches.
//! - `wind_down`: after the loop, the grace period and the settle bound.

mod chains;
mod deleter;
mod halt;
mod heartbeat;
mod receive;
mod settle;
mod shutdown;
mod split;
#[cfg(test)]
mod tests;
mod wind_down;

pub use shutdown::cancel_on_signal;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::connection::Connection;
use crate::connection::expiry::AwsClock;
use crate::engine::summary::RunSummary;
use crate::engine::{Engine, FanoutError};
use crate::gateway::Gateway;
use crate::job::keys::RunKey;
use crate::job::{self, Capabilities, Order};
use crate::queue::{JobQueue, Message, QueueError};
use crate::reports::{Draft, Reporter};
use crate::runs::{Admission, Ledger, RunLease, rfc3339};
use crate::store::ConnectionStore;
use crate::telemetry::Metrics;

use chains::in_group_order;
use deleter::{DeleteHandle, Deleter};
use settle::Settlement;

/// How the worker consumes the queue.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Jobs running at once; no more messages are received than can start.
    pub max_concurrent_jobs: usize,
    /// How long a running job's message stays hidden after each heartbeat.
    pub visibility_timeout: Duration,
    /// How often the heartbeat renews it; shorter than the timeout.
    pub heartbeat_interval: Duration,
    /// Delays before a failed job is visible again, by receive count
    /// (`cap`, not jittered: one message, no herd to spread).
    pub job_retry: Backoff,
    /// How long running jobs may go on after shutdown is asked.
    pub shutdown_grace: Duration,
    /// Exit once a receive finds the queue empty and no job is running.
    pub exit_when_idle: bool,
    /// What jobs this deployment can run.
    pub capabilities: Capabilities,
    /// Whole-table jobs without a `split` of their own are split into this
    /// many segment jobs (1: never).
    pub split_segments: u32,
    /// Continuations a connection may be deferred across; then it is
    /// dead-lettered as a one-connection job.
    pub deferred_limit: u32,
    /// AWS's time, which deadlines (`deliver_by`) are read against.
    pub clock: Arc<AwsClock>,
}

/// Receives of a job that the endpoint's answers stopped (see
/// [`crate::engine::evidence`]) before it is dead-lettered with the reason: one
/// fewer than the template's `maxReceiveCount` (5), whose redrive would
/// move it without one.
pub const ENDPOINT_ATTEMPTS: u32 = 4;

/// Waits after failed receives: an SQS blip never stops the worker.
const RECEIVE_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(200),
    max: Duration::from_secs(20),
    max_attempts: u32::MAX,
};

/// Retries of a failed delete, or of a hand-back after shutdown.
const SETTLE_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(100),
    max: Duration::from_secs(2),
    max_attempts: 5,
};

/// How long a stopping worker may go on after its grace period, handing
/// messages back, sending continuations, finishing removals and deletes,
/// whatever its peers do (a throttled table, a hung SQS: their own retries
/// and timeouts reach minutes). Past it, what is unfinished is dropped: its
/// messages reappear after their visibility timeout, later, never lost. The
/// container's stop timeout must cover `shutdown_grace` plus this, plus a
/// moment for the process to exit.
pub const SHUTDOWN_SETTLE_BOUND: Duration = Duration::from_secs(10);

/// Why the worker stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown was asked (SIGTERM/SIGINT).
    Shutdown,
    /// `exit_when_idle`: the queue was empty and nothing was running.
    Idle,
    /// The queue does not exist: configuration, not a blip; retrying would
    /// hide it.
    Failed(String),
}

/// Runs the worker until `shutdown` is cancelled (or, with
/// `exit_when_idle`, until there is nothing left to do). Each settled
/// message's report goes to `reports`. With run records in the checkpoint
/// table (`ledger`), a broadcast sent again is not broadcast twice, and a
/// run live on one task is not run by another at the same time.
pub async fn run<Q, S, G>(
    queue: Arc<Q>,
    engine: Arc<Engine<S, G>>,
    settings: WorkerSettings,
    metrics: Arc<Metrics>,
    reports: Reporter,
    shutdown: CancellationToken,
    ledger: Option<Arc<Ledger>>,
) -> Stopped
where
    Q: JobQueue,
    S: ConnectionStore,
    G: Gateway,
{
    let slots = Arc::new(Semaphore::new(settings.max_concurrent_jobs));
    let jobs = TaskTracker::new();
    // Cancelled when the grace period is over: running jobs stop and hand
    // their messages back.
    let abort = CancellationToken::new();
    // Cancelled when the settle bound is over too: what is still running is
    // dropped.
    let kill = CancellationToken::new();
    let deleter = Deleter::spawn(queue.clone());
    let ctx = Arc::new(JobContext {
        queue: queue.clone(),
        engine,
        settings: settings.clone(),
        metrics: metrics.clone(),
        deleter: deleter.handle(),
        abort: abort.clone(),
        reports,
        ledger,
    });

    let mut failed_receives = 0u32;
    // A long poll abandoned at shutdown stays open at SQS until its wait
    // ends, and takes any message that shows up meanwhile (even this
    // worker's own hand-backs): it is finished instead, and what it brings is
    // handed back at once.
    let mut abandoned_receive = None;
    let stopped = loop {
        let Some(permits) = receive::free_slots(&slots, &shutdown).await else {
            break Stopped::Shutdown;
        };
        // A deletion under way can unblock a FIFO group during this receive,
        // and a running job can hand its message back after the queue chose
        // what this receive brings (a long poll does not always wake for
        // either): only a receive that began with nothing running and
        // nothing pending may conclude that the queue is empty.
        let quiet_before = jobs.is_empty() && deleter.handle.idle();
        let mut receive = receive::spawn(&queue, permits.len(), settings.visibility_timeout);
        let received = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                abandoned_receive = Some(receive);
                break Stopped::Shutdown;
            }
            received = &mut receive => match received {
                Ok(received) => received,
                Err(e) => Err(QueueError::Unavailable(format!("the receive task failed: {e}"))),
            },
        };
        match received {
            Err(e @ QueueError::NoSuchQueue { .. }) => break Stopped::Failed(e.to_string()),
            Err(e) => {
                let wait = RECEIVE_BACKOFF.delay(failed_receives);
                failed_receives = failed_receives.saturating_add(1);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "receiving jobs failed");
                tokio::select! {
                    () = shutdown.cancelled() => break Stopped::Shutdown,
                    () = tokio::time::sleep(wait) => continue,
                }
            }
            Ok(messages) => {
                failed_receives = 0;
                metrics.mark_poll();
                if messages.is_empty()
                    && settings.exit_when_idle
                    && quiet_before
                    // Rechecks are work too: a batch run ends after them.
                    && ctx.engine.rechecks_pending() == 0
                {
                    break Stopped::Idle;
                }
                for chain in in_group_order(messages.into_iter().zip(permits)) {
                    let ctx = ctx.clone();
                    jobs.spawn(kill.clone().run_until_cancelled_owned(async move {
                        ctx.process_in_order(chain).await
                    }));
                }
            }
        }
    };

    let stopping = wind_down::Stopping {
        jobs,
        abort,
        kill,
        ctx,
        deleter,
        abandoned_receive,
    };
    stopping.wind_down(&stopped, settings.shutdown_grace).await;
    stopped
}

/// Where a processed message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Off the jobs queue (its deletion queued): done, dead-lettered,
    /// split or continued in a new message.
    Gone,
    /// Still on the queue, to be received again.
    Kept,
}

/// What a job task needs.
struct JobContext<Q, S, G> {
    queue: Arc<Q>,
    engine: Arc<Engine<S, G>>,
    settings: WorkerSettings,
    metrics: Arc<Metrics>,
    deleter: DeleteHandle,
    abort: CancellationToken,
    reports: Reporter,
    /// The checkpoint table's run records, when configured.
    ledger: Option<Arc<Ledger>>,
}

impl<Q: JobQueue, S: ConnectionStore, G: Gateway> JobContext<Q, S, G> {
    /// Takes one message through parse → run → settle → report. A panic
    /// inside is caught and logged: the message is handed back, the worker
    /// goes on (its next run reports).
    async fn process(&self, message: &Message) -> Fate {
        Metrics::incr(&self.metrics.jobs_in_flight);
        let outcome = AssertUnwindSafe(async {
            let (settlement, draft, lease) = self.run_job(message).await;
            // A redelivery while it ran may have made another receipt the
            // newest, the only one SQS deletes by.
            let current = lease.as_ref().map(|lease| Message {
                receipt: lease.receipt(),
                ..message.clone()
            });
            let settled = self
                .settle(
                    current.as_ref().unwrap_or(message),
                    settlement,
                    draft.as_ref(),
                )
                .await;
            if let (Some(ledger), Some(lease)) = (&self.ledger, lease) {
                ledger.close(lease, settled.fate == Fate::Gone).await;
            }
            // A job not run (a duplicate) has no report: its run reports.
            if let Some(draft) = draft
                && !self.reports.is_empty()
            {
                let ended = SystemTime::now();
                let whole = settled
                    .broadcast
                    .as_ref()
                    .map(|tally| draft.of_broadcast(tally, ended));
                let report = draft.settled(settled.status, ended);
                self.reports.send(&report, &self.metrics).await;
                if let Some(whole) = whole {
                    self.reports.send(&whole, &self.metrics).await;
                }
            }
            settled.fate
        })
        .catch_unwind()
        .await;
        self.metrics
            .jobs_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        match outcome {
            Ok(fate) => fate,
            Err(_) => {
                tracing::error!(message_id = %message.id, "the job panicked; handing its message back");
                self.retry_later(message).await.fate
            }
        }
    }

    /// Parses and runs one job. What it came to is a [`Settlement`], which
    /// [`settle`](Self::settle) applies to the message, the draft of its
    /// report (none for a job not run), and the lease of its run.
    async fn run_job(&self, message: &Message) -> (Settlement, Option<Draft>, Option<RunLease>) {
        let started = SystemTime::now();
        let order = match job::read(&message.body, &message.id, &self.settings.capabilities) {
            Ok(order) => order,
            Err(e) if e.is_for_a_newer_task() => {
                let reason = e.to_string();
                tracing::warn!(message_id = %message.id, reason, "a job for a newer fanout; handed back to the queue");
                let draft = Draft::of_unparsed(&message.body, &message.id, started);
                return (Settlement::RetryLater, Some(draft.because(reason)), None);
            }
            Err(e) => {
                let reason = e.to_string();
                let draft = Draft::of_unparsed(&message.body, &message.id, started);
                return (
                    Settlement::DeadLetter(reason.clone()),
                    Some(draft.because(reason)),
                    None,
                );
            }
        };
        let mut job = match order {
            Order::Broadcast(job) => *job,
            Order::Cancel { broadcast } => {
                let (settlement, draft) = self.record_cancel(message, &broadcast, started).await;
                return (settlement, Some(draft), None);
            }
        };
        if let Err((settlement, draft)) = self
            .may_start(&mut job, &message.receipt, |job| {
                Draft::of_job(job, &message.id, started)
            })
            .await
        {
            return (settlement, Some(draft), None);
        }
        let mut carried = Vec::new();
        let lease = match &self.ledger {
            None => None,
            Some(ledger) => match ledger.admit(message, &job).await {
                Admission::Run(lease, checkpoint) => {
                    // A checkpoint is newer than the job's own cursors: it
                    // was written by a run of this very job.
                    if let Some(checkpoint) = checkpoint {
                        carried = taking_over(&mut job, checkpoint);
                    }
                    Some(lease)
                }
                Admission::Unrecorded => None,
                Admission::Duplicate { finished_at_ms } => {
                    Metrics::incr(&self.metrics.jobs_duplicate);
                    tracing::info!(job_id = %job.id, run = %RunKey::of(&job), message_id = %message.id, finished_at = %rfc3339(finished_at_ms), "a duplicate of a broadcast finished at {}; not broadcast again", rfc3339(finished_at_ms));
                    return (Settlement::Done, None, None);
                }
                Admission::Twin => {
                    Metrics::incr(&self.metrics.jobs_duplicate);
                    tracing::info!(job_id = %job.id, run = %RunKey::of(&job), message_id = %message.id, "another copy of a broadcast running on another task; this copy is deleted");
                    return (Settlement::Done, None, None);
                }
                Admission::Adopted => {
                    Metrics::incr(&self.metrics.jobs_duplicate);
                    tracing::warn!(job_id = %job.id, run = %RunKey::of(&job), message_id = %message.id, "this message came back while its broadcast runs on another task (a heartbeat was late); that task keeps it hidden now");
                    return (Settlement::LeaveHidden, None, None);
                }
                Admission::Conflict(reason) => {
                    let draft = Draft::of_job(&job, &message.id, started).because(reason.clone());
                    return (Settlement::DeadLetter(reason), Some(draft), None);
                }
            },
        };
        let (settlement, draft) = self
            .run_admitted(message, job, (lease.clone(), carried), started)
            .await;
        (settlement, Some(draft), lease)
    }

    /// Runs a job this task holds (or runs without a record).
    async fn run_admitted(
        &self,
        message: &Message,
        job: job::Job,
        (lease, carried): (Option<RunLease>, Vec<Connection>),
        started: SystemTime,
    ) -> (Settlement, Draft) {
        if let Some(total) = self.split_of(&job).filter(|_| message.group_id.is_none()) {
            let draft = Draft::of_job(&job, &message.id, started).split_into(total);
            return match self.split(message, &job, total).await {
                Ok(()) => (Settlement::Split(total), draft),
                Err(reason) => (Settlement::RetryLater, draft.because(reason)),
            };
        }
        let heartbeat = self.heartbeat(message.receipt.clone(), job.id.clone(), lease.clone());
        let mut job = job;
        let (report, result, watch, sending) = self.run_passes(&mut job, lease, carried).await;
        self.metrics.record_job_duration(report.duration);
        let mut draft = Draft::of_run(&job, &message.id, &report, started);
        if let Some((seq, id)) = &sending {
            draft = draft.because(format!(
                "a newer update of its stream, {seq} ({id}), was handed to this run, which went \
                 on with it: the counts are of that update's last pass"
            ));
        }
        // A run that reached every connection is done, whatever came
        // after, unless it went on with a newer update (then its own value
        // was superseded); one stopped, or left with connections to hand
        // on, is not.
        let halted = match (&result, watch.halted()) {
            (Ok(()), _) if report.deferred.is_empty() => {
                sending.as_ref().map(|_| halt::Halt::Superseded)
            }
            (Ok(()), None) => self.lapsed_now(&job).then_some(halt::Halt::Lapsed),
            (Ok(()) | Err(FanoutError::Interrupted | FanoutError::Backlog { .. }), halt) => halt,
            _ => None,
        };
        if let Some(halt) = halted {
            log_report(&job, &report, &format!("{halt:?}").to_lowercase());
            // Counted while the heartbeat still keeps the message hidden.
            let draft = draft
                .stopped()
                .unread(self.unread(&job, halt, report.read_to).await);
            drop(heartbeat);
            return (Settlement::Halted(halt), draft);
        }
        drop(heartbeat);
        let settlement = match result {
            Ok(()) if !report.deferred.is_empty() => {
                log_report(&job, &report, "deferred");
                Settlement::Deferred {
                    job,
                    report: Box::new(report),
                }
            }
            Ok(()) => {
                log_report(&job, &report, "done");
                Metrics::incr(&self.metrics.jobs_completed);
                Settlement::Done
            }
            Err(FanoutError::Interrupted) => {
                log_report(&job, &report, "interrupted");
                Settlement::Interrupted {
                    job,
                    resume: report.resume,
                }
            }
            Err(FanoutError::Backlog { deferred }) => {
                tracing::warn!(job_id = %job.id, deferred, "too many connections deferred; the broadcast continues later from its finished pages");
                log_report(&job, &report, "backlogged");
                Settlement::Backlogged {
                    job,
                    resume: report.resume,
                }
            }
            Err(e) if e.endpoint_status().is_some() => {
                Metrics::incr(&self.metrics.endpoint_suspect);
                log_report(&job, &report, "failed");
                let reason = e.to_string();
                let draft = draft.because(reason.clone()).endpoint(e.endpoint_status());
                // Before the queue's redrive policy moves it without a
                // reason, the worker dead-letters it with one.
                if message.receive_count >= ENDPOINT_ATTEMPTS {
                    tracing::error!(job_id = %job.id, error = %reason, receives = message.receive_count, "the endpoint failed the job every time; dead-lettering it");
                    return (Settlement::DeadLetter(reason), draft);
                }
                tracing::error!(job_id = %job.id, error = %reason, "the job stopped on the endpoint's answers; it will be retried");
                return (Settlement::RetryLater, draft);
            }
            Err(e) if e.is_permanent() => {
                log_report(&job, &report, "failed");
                return (
                    Settlement::DeadLetter(e.to_string()),
                    draft.because(e.to_string()),
                );
            }
            Err(e) => {
                tracing::error!(job_id = %job.id, error = %e, "the job failed; it will be retried");
                log_report(&job, &report, "failed");
                return (Settlement::RetryLater, draft.because(e.to_string()));
            }
        };
        (settlement, draft)
    }

    /// Runs the job. A stream's run (the runner) sends each newer update
    /// handed to it from the next post on, and then goes round again, as
    /// often as its value changed during a round, so every connection ends
    /// with the newest: the summary and the watch are its last round's, and
    /// the last update it went on with (sequence, broadcast key) is returned
    /// beside them.
    async fn run_passes(
        &self,
        job: &mut job::Job,
        lease: Option<RunLease>,
        mut carried: Vec<Connection>,
    ) -> (
        RunSummary,
        Result<(), FanoutError>,
        halt::Watch,
        Option<(u64, String)>,
    ) {
        let mut sending: Option<(u64, String)> = None;
        loop {
            let checkpoints = self.checkpoint_writer(lease.clone());
            let frontier = job.latest.is_some().then(crate::engine::Frontier::default);
            let by_id = self.engine.reads_by_id(job);
            let watch = self.watch(
                job,
                (frontier.clone(), by_id),
                sending.clone().map(|(_, id)| id),
            );
            let (report, result) = match checkpoints {
                Some((sender, writer)) => {
                    let carried = std::mem::take(&mut carried);
                    let ran = self
                        .engine
                        .run_tracked(job, &watch.stop, (Some(sender), frontier.clone()), carried)
                        .await;
                    // The run is over: what a last write would hold no
                    // longer matters (its message is settled, or the next
                    // round writes its own).
                    drop(writer);
                    ran
                }
                None => self.engine.run(job, &watch.stop).await,
            };
            // What goes on (a continuation, the next round) goes on with
            // the newest value.
            let replaced = watch.taken().and_then(|h| go_on_with(job, h));
            if replaced.is_some() {
                sending.clone_from(&replaced);
            }
            let round_done = matches!(result, Ok(())) && watch.halted().is_none();
            if !round_done || !report.deferred.is_empty() {
                return (report, result, watch, sending);
            }
            let at = frontier.as_ref().and_then(|f| f.get());
            if replaced.is_some() {
                // The connections this round reached before it took the
                // newest value go next, up to the first it sent that to.
                log_report(job, &report, "newer");
                let first_sent = frontier.and_then(|f| f.first_sent());
                next_round(job, by_id, at, first_sent);
                continue;
            }
            let next = match (&self.ledger, &job.latest) {
                (Some(ledger), Some(latest)) => ledger.sent_round(latest, &job.id).await,
                _ => None,
            };
            let Some(went_on) = next.and_then(|h| go_on_with(job, h)) else {
                return (report, result, watch, sending);
            };
            log_report(job, &report, "newer");
            sending = Some(went_on);
            next_round(job, by_id, at, None);
        }
    }
}

/// A job taken over from a stopped task: its checkpoint's resume points,
/// the keys it had reached, and the connections it had deferred (which
/// come back as the run's first).
fn taking_over(job: &mut job::Job, checkpoint: crate::runs::Checkpoint) -> Vec<Connection> {
    if !checkpoint.resume.is_empty() {
        job.resume = Some(checkpoint.resume);
    }
    if let Some(receipts) = &mut job.receipts {
        receipts.reached = checkpoint.reached;
        for d in &checkpoint.deferred {
            if let Some(of) = d.of {
                receipts.of.insert(d.id.clone().into(), of);
            }
        }
    }
    checkpoint
        .deferred
        .into_iter()
        .map(|d| Connection::new(d.id, d.key))
        .collect()
}

/// The stream's job made the newer update `handed`, to send from now on:
/// its sequence and broadcast key, or `None` if its payload cannot be
/// read (the job is left as it was).
fn go_on_with(job: &mut job::Job, handed: crate::runs::Handed) -> Option<(u64, String)> {
    job.payload = handed.payload()?;
    if let Some(latest) = &mut job.latest {
        latest.seq = handed.seq;
    }
    Some((handed.seq, handed.id))
}

/// A stream's next round, up to `first_sent` (the first connection the
/// last round sent the newest value to; none: a whole round). On a read in
/// id order (`by_id`) it starts at `at`, where the last round's posts had
/// got to, round the audience. On any other read it starts from the read's
/// start, and stops at `first_sent` only when the last round also read
/// from the start (a round that went round from elsewhere reached the
/// connections before `first_sent` in two parts).
fn next_round(
    job: &mut job::Job,
    by_id: bool,
    at: Option<crate::store::Cursor>,
    first_sent: Option<crate::connection::ConnectionId>,
) {
    if !by_id {
        let from_start = job.resume.is_none() && !job.wrap;
        job.resume = None;
        job.wrap = false;
        job.round_end = first_sent.filter(|_| from_start);
        return;
    }
    if let Some(at) = at {
        job.resume = Some(vec![crate::store::Cursor {
            segment: 0,
            position: at.position,
        }]);
        job.wrap = true;
    }
    job.round_end = first_sent;
}

fn log_report(job: &job::Job, report: &RunSummary, status: &str) {
    tracing::info!(
        job_id = %job.id,
        run = %RunKey::of(job),
        selector = %job.target,
        status,
        audience = report.audience,
        delivered = report.delivered,
        gone = report.gone,
        expired = report.expired,
        removed = report.removed,
        remove_failed = report.remove_failed,
        rechecking = report.rechecking,
        kept = report.kept,
        failed = report.failed,
        deferred = report.deferred.len(),
        passes = report.passes,
        excluded = report.excluded,
        retries = report.retries,
        throttled = report.throttled,
        duration_ms = report.duration.as_millis() as u64,
        rate_per_second = report.rate().round(),
        unknown_age = report.age_problems.count,
        age_problem = report.age_problems.describe(),
        "broadcast"
    );
}
