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

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::engine::{Engine, FanoutError, Report};
use crate::gateway::Gateway;
use crate::job::{self, Capabilities, Job, Target};
use crate::queue::{DeadLettered, JobQueue, MAX_BATCH, Message, QueueError, Receipt, SendOptions};
use crate::store::ConnectionStore;
use crate::store::Cursor;
use crate::telemetry::Metrics;

/// How the worker consumes the queue.
#[derive(Clone, Copy, Debug)]
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
}

use crate::limits::MAX_SEND_DELAY;

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
/// `exit_when_idle`, until there is nothing left to do).
pub async fn run<Q, S, G>(
    queue: Arc<Q>,
    engine: Arc<Engine<S, G>>,
    settings: WorkerSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
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
        settings,
        metrics: metrics.clone(),
        deleter: deleter.handle(),
        abort: abort.clone(),
    });

    let mut failed_receives = 0u32;
    // A long poll abandoned at shutdown stays open at SQS until its wait
    // ends, and takes any message that shows up meanwhile (even this
    // worker's own hand-backs): it is finished instead, and what it brings is
    // handed back at once.
    let mut abandoned_receive = None;
    let stopped = loop {
        let first = tokio::select! {
            biased;
            () = shutdown.cancelled() => break Stopped::Shutdown,
            permit = slots.clone().acquire_owned() => permit.expect("the job semaphore is never closed"),
        };
        let mut permits = vec![first];
        while permits.len() < MAX_BATCH {
            match slots.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        // A deletion under way can unblock a FIFO group during this receive,
        // and a long poll does not always wake for it: only a receive that
        // began with nothing pending may conclude that the queue is empty.
        let settled_before = deleter.handle.idle();
        let mut receive = AbortOnDropHandle::new(tokio::spawn({
            let queue = queue.clone();
            let max = permits.len();
            let visibility = settings.visibility_timeout;
            async move { queue.receive(max, visibility).await }
        }));
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
                    && jobs.is_empty()
                    && settled_before
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

    let grace_over = tokio::time::Instant::now() + settings.shutdown_grace;
    if let Some(receive) = abandoned_receive {
        let ctx = ctx.clone();
        jobs.spawn(kill.clone().run_until_cancelled_owned(async move {
            if let Ok(Ok(messages)) = receive.await {
                for message in messages {
                    ctx.hand_back(&message, Duration::ZERO).await;
                }
            }
        }));
    }
    jobs.close();
    if stopped != Stopped::Idle && !jobs.is_empty() {
        tracing::info!(
            running = jobs.len(),
            grace_ms = settings.shutdown_grace.as_millis() as u64,
            "shutting down: waiting for running jobs"
        );
        if tokio::time::timeout_at(grace_over, jobs.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = jobs.len(),
                "grace period over: handing unfinished jobs back to the queue"
            );
            abort.cancel();
        }
    }
    let settled = tokio::time::timeout_at(grace_over + SHUTDOWN_SETTLE_BOUND, async {
        jobs.wait().await;
        drop(ctx);
        deleter.finish().await;
    })
    .await;
    if settled.is_err() {
        tracing::warn!(
            running = jobs.len(),
            bound_ms = SHUTDOWN_SETTLE_BOUND.as_millis() as u64,
            "the queue or the table did not answer in time: exiting with work unsettled; those messages reappear after their visibility timeout"
        );
        kill.cancel();
        // Every job task ends at its next poll; waiting for that is quick
        // and leaves nothing of this worker running.
        jobs.wait().await;
    }
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
}

impl<Q: JobQueue, S: ConnectionStore, G: Gateway> JobContext<Q, S, G> {
    /// Runs one message to a settled state. A panic inside is caught and
    /// reported: the message is handed back, the worker goes on.
    async fn process(&self, message: &Message) -> Fate {
        Metrics::incr(&self.metrics.jobs_in_flight);
        let outcome = AssertUnwindSafe(self.run_job(message)).catch_unwind().await;
        self.metrics
            .jobs_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        match outcome {
            Ok(fate) => fate,
            Err(_) => {
                tracing::error!(message_id = %message.id, "the job panicked; handing its message back");
                self.retry_later(message).await
            }
        }
    }

    /// Runs messages of one FIFO group, received together, one after the
    /// other in their order. The ones still waiting are kept hidden; if one
    /// stays on the queue, the rest are handed back behind it rather than
    /// run ahead of it.
    async fn process_in_order(&self, chain: Vec<(Message, OwnedSemaphorePermit)>) {
        let waiting: Vec<AbortOnDropHandle<()>> = chain
            .iter()
            .skip(1)
            .map(|(message, _)| self.heartbeat(message.receipt.clone(), message.id.clone()))
            .collect();
        let mut waiting = waiting.into_iter();
        let mut chain = chain.into_iter();
        while let Some((message, permit)) = chain.next() {
            let fate = self.process(&message).await;
            drop(permit);
            drop(waiting.next());
            if fate == Fate::Kept {
                waiting.by_ref().for_each(drop);
                for (rest, permit) in chain.by_ref() {
                    self.hand_back(&rest, Duration::ZERO).await;
                    drop(permit);
                }
            }
        }
    }

    async fn run_job(&self, message: &Message) -> Fate {
        let job = match job::parse(&message.body, &message.id, self.settings.capabilities) {
            Ok(job) => job,
            Err(e) => return self.dead_letter(message, &e.to_string()).await,
        };
        if let Some(total) = self.split_of(&job).filter(|_| message.group_id.is_none()) {
            return self.split(message, &job, total).await;
        }
        let heartbeat = self.heartbeat(message.receipt.clone(), job.id.clone());
        let (report, result) = self.engine.run(&job, &self.abort).await;
        drop(heartbeat);
        self.metrics.record_job_duration(report.duration);
        match result {
            Ok(()) if !report.deferred.is_empty() => self.hand_on(message, &job, &report).await,
            Ok(()) => {
                log_report(&job.id, &report, "done");
                Metrics::incr(&self.metrics.jobs_completed);
                // The deleter retries; it only fails if the queue is gone for
                // good, and then the job is redelivered: a duplicate, never a
                // loss.
                self.delete(message).await
            }
            Err(FanoutError::Interrupted) => {
                log_report(&job.id, &report, "interrupted");
                self.give_up(message, &job, report.resume).await
            }
            Err(e) if e.is_permanent() => {
                log_report(&job.id, &report, "failed");
                self.dead_letter(message, &e.to_string()).await
            }
            Err(e) => {
                tracing::error!(job_id = %job.id, error = %e, "the job failed; it will be retried");
                log_report(&job.id, &report, "failed");
                self.retry_later(message).await
            }
        }
    }

    /// Settles a job whose connections are all final but some deferred:
    /// they go on in delayed continuation jobs listing exactly them, or to
    /// the dead-letter queue one by one once deferred too often. The
    /// message is deleted only once every one of them has been handed on.
    /// On a FIFO queue (no per-message delay, and order must hold) the job
    /// fails as a whole and is retried in its place.
    async fn hand_on(&self, message: &Message, job: &Job, report: &Report) -> Fate {
        let count = report.deferred.len();
        if message.group_id.is_some() {
            log_report(&job.id, report, "deferred");
            tracing::warn!(job_id = %job.id, deferred = count, deferred_to = "retry in place (FIFO)", "connections deferred; the job will be retried whole");
            return self.retry_later(message).await;
        }
        let connections: Vec<_> = report
            .deferred
            .iter()
            .map(|d| d.connection.clone())
            .collect();
        if job.deferrals >= self.settings.deferred_limit {
            log_report(&job.id, report, "deferred");
            return self.dead_letter_each(message, job, report).await;
        }
        let bodies = match job.deferred_continuations(&connections, job::MAX_CONTINUATION_BYTES) {
            Ok(bodies) => bodies,
            Err(e) => {
                log_report(&job.id, report, "deferred");
                tracing::error!(job_id = %job.id, error = %e, "cannot continue the deferred connections; dead-lettering them");
                return self.dead_letter_each(message, job, report).await;
            }
        };
        let delay = self
            .settings
            .job_retry
            .cap(job.deferrals)
            .min(MAX_SEND_DELAY);
        let options = SendOptions {
            delay: Some(delay),
            ..SendOptions::default()
        };
        let mut sent = Vec::with_capacity(bodies.len());
        for body in &bodies {
            match self.queue.send(body, &options).await {
                Ok(id) => sent.push(id),
                Err(e) => {
                    // The whole job runs again: duplicates, never a loss.
                    log_report(&job.id, report, "deferred");
                    tracing::error!(job_id = %job.id, error = %e, "cannot enqueue the continuation of deferred connections; the job will be retried");
                    return self.retry_later(message).await;
                }
            }
        }
        log_report(&job.id, report, "deferred");
        tracing::info!(
            job_id = %job.id,
            deferred = count,
            deferred_to = "continuation",
            continuations = ?sent,
            delay_ms = delay.as_millis() as u64,
            deferrals = job.deferrals + 1,
            "deferred connections continue in new jobs"
        );
        Metrics::incr(&self.metrics.jobs_completed);
        self.delete(message).await
    }

    /// Dead-letters each deferred connection as a one-connection job with
    /// its reason; then the message goes. If any cannot be dead-lettered
    /// the job is kept (retried later), so none is dropped.
    async fn dead_letter_each(&self, message: &Message, job: &Job, report: &Report) -> Fate {
        for d in &report.deferred {
            let body = match serde_json::to_string(&job.for_one(&d.connection)) {
                Ok(body) => body,
                Err(e) => {
                    tracing::error!(job_id = %job.id, error = %e, "cannot encode a deferred connection's job");
                    return self.retry_later(message).await;
                }
            };
            let one = Message {
                id: format!("{}/{}", message.id, d.connection.id),
                body,
                receipt: message.receipt.clone(),
                receive_count: message.receive_count,
                group_id: None,
                // The producer's metadata and trace context go with each
                // connection's dead letter, as with the whole job's.
                attributes: message.attributes.clone(),
                trace_header: message.trace_header.clone(),
            };
            let reason = format!(
                "connection {} deferred across {} continuations: {}",
                d.connection.id, job.deferrals, d.reason
            );
            match self.queue.dead_letter(&one, &reason).await {
                Ok(DeadLettered::Sent) => {
                    Metrics::incr(&self.metrics.jobs_dead_lettered);
                }
                Ok(DeadLettered::NotConfigured) => {
                    tracing::error!(job_id = %job.id, connection = %d.connection.id, reason, "a connection was deferred too often and no dead-letter queue is configured; the job is kept for the queue's redrive policy");
                    return self.retry_later(message).await;
                }
                Err(e) => {
                    tracing::error!(job_id = %job.id, connection = %d.connection.id, error = %e, "cannot dead-letter a deferred connection; the job will be retried");
                    return self.retry_later(message).await;
                }
            }
        }
        tracing::error!(
            job_id = %job.id,
            deferred = report.deferred.len(),
            deferred_to = "dead-letter queue",
            "connections deferred too often were dead-lettered one by one"
        );
        self.delete(message).await
    }

    /// Queues the message's deletion.
    async fn delete(&self, message: &Message) -> Fate {
        self.deleter.push(message.receipt.clone()).await;
        Fate::Gone
    }

    /// How many segment jobs `job` becomes, if it is to be split. (Not on
    /// FIFO queues: a group runs one job at a time, so shares could not run
    /// side by side, and they would queue behind later broadcasts.)
    fn split_of(&self, job: &Job) -> Option<u32> {
        if job.segment.is_some() || job.resume.is_some() || job.target != Target::All {
            return None;
        }
        let total = job.split.unwrap_or(self.settings.split_segments);
        (total > 1).then_some(total)
    }

    /// Puts a broadcast's segment jobs on the queue, then deletes it. If a
    /// send fails, the job is retried whole later: segments already sent
    /// then run twice (duplicates, never a loss).
    async fn split(&self, message: &Message, job: &Job, total: u32) -> Fate {
        // Up to MAX_SPLIT sends one after another can outlast the visibility
        // timeout; another worker would then split the job again.
        let heartbeat = self.heartbeat(message.receipt.clone(), job.id.clone());
        for (index, part) in job.split_into(total).into_iter().enumerate() {
            let sent = match serde_json::to_string(&part) {
                Ok(body) => self
                    .queue
                    .send(&body, &SendOptions::default())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = sent {
                tracing::error!(job_id = %job.id, index, error = %e, "splitting the job failed; it will be retried");
                drop(heartbeat);
                return self.retry_later(message).await;
            }
        }
        drop(heartbeat);
        tracing::info!(job_id = %job.id, segments = total, "job split into segment jobs");
        Metrics::incr(&self.metrics.jobs_split);
        self.delete(message).await
    }

    /// Hands an unfinished job to another worker. With pages finished, a
    /// continuation job carrying the resume cursors replaces the message, so
    /// the broadcast goes on from there instead of from its start;
    /// otherwise the message itself becomes visible again at once.
    async fn give_up(&self, message: &Message, job: &Job, resume: Vec<Cursor>) -> Fate {
        // On a FIFO queue a new message would join the end of its group and
        // let later broadcasts overtake this one: keep the original, which
        // holds its place (the group waits for it).
        if resume.is_empty() || job.resume.as_ref() == Some(&resume) || message.group_id.is_some() {
            return self.hand_back(message, Duration::ZERO).await;
        }
        let body = match serde_json::to_string(&job.continuation(resume)) {
            Ok(body) => body,
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %e, "cannot encode the continuation; the job restarts from its start");
                return self.hand_back(message, Duration::ZERO).await;
            }
        };
        match self.queue.send(&body, &SendOptions::default()).await {
            Ok(continuation) => {
                tracing::info!(job_id = %job.id, continuation, "job continues in a new message");
                // If this delete is lost, the original runs again from its
                // start as well: duplicates, never a loss.
                self.delete(message).await
            }
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %e, "cannot enqueue the continuation; the job restarts from its start");
                self.hand_back(message, Duration::ZERO).await
            }
        }
    }

    /// Keeps the message hidden until the handle is dropped. Dropping, not an
    /// explicit abort, ends it: a panic or a dropped job task unwinds past
    /// any abort call, and a detached heartbeat would keep the message
    /// hidden for ever.
    fn heartbeat(&self, receipt: Receipt, job_id: String) -> AbortOnDropHandle<()> {
        let queue = self.queue.clone();
        let settings = self.settings;
        AbortOnDropHandle::new(tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(
                tokio::time::Instant::now() + settings.heartbeat_interval,
                settings.heartbeat_interval,
            );
            loop {
                ticks.tick().await;
                if let Err(e) = queue
                    .set_visibility(&receipt, settings.visibility_timeout)
                    .await
                {
                    tracing::warn!(job_id, error = %e, "heartbeat failed; the job may be redelivered while it runs");
                }
            }
        }))
    }

    /// A job that can never run: to the dead-letter queue with its reason,
    /// then off the jobs queue. Without a dead-letter queue the message
    /// stays for the queue's redrive policy.
    /// Counted once its outcome is known: a copy that fails is a retry.
    async fn dead_letter(&self, message: &Message, reason: &str) -> Fate {
        match self.queue.dead_letter(message, reason).await {
            Ok(DeadLettered::Sent) => {
                Metrics::incr(&self.metrics.jobs_dead_lettered);
                tracing::error!(message_id = %message.id, reason, "job sent to the dead-letter queue");
                self.delete(message).await
            }
            Ok(DeadLettered::NotConfigured) => {
                Metrics::incr(&self.metrics.jobs_dead_lettered);
                tracing::error!(message_id = %message.id, reason, "job cannot run; no dead-letter queue is configured, so it is left for the queue's redrive policy");
                Fate::Kept
            }
            Err(e) => {
                tracing::error!(message_id = %message.id, reason, error = %e, "job cannot run and could not be dead-lettered; it will be tried again");
                self.retry_later(message).await
            }
        }
    }

    /// Makes a failed job visible again after a delay growing with its
    /// receive count.
    async fn retry_later(&self, message: &Message) -> Fate {
        Metrics::incr(&self.metrics.jobs_retried);
        let delay = self
            .settings
            .job_retry
            .cap(message.receive_count.saturating_sub(1));
        self.hand_back(message, delay).await
    }

    /// Makes the message visible again after `after`; it stays on the queue.
    async fn hand_back(&self, message: &Message, after: Duration) -> Fate {
        for attempt in 1.. {
            match self.queue.set_visibility(&message.receipt, after).await {
                Ok(()) => break,
                Err(e) if SETTLE_BACKOFF.allows_another(attempt) => {
                    tracing::debug!(error = %e, attempt, "handing a message back failed; retrying");
                    tokio::time::sleep(SETTLE_BACKOFF.delay(attempt - 1)).await;
                }
                Err(e) => {
                    // It becomes visible anyway when its visibility timeout
                    // runs out: later, not lost.
                    tracing::warn!(message_id = %message.id, error = %e, "could not hand the message back; it reappears after its visibility timeout");
                    break;
                }
            }
        }
        Fate::Kept
    }
}

/// Groups received messages into chains that must run one after another:
/// messages of one FIFO group (SQS may return several at once, in order)
/// form one chain; every other message is a chain of its own.
fn in_group_order<P>(received: impl IntoIterator<Item = (Message, P)>) -> Vec<Vec<(Message, P)>> {
    let mut chains: Vec<Vec<(Message, P)>> = Vec::new();
    for (message, permit) in received {
        let group = message.group_id.clone();
        match chains
            .iter_mut()
            .find(|chain| group.is_some() && chain[0].0.group_id == group)
        {
            Some(chain) => chain.push((message, permit)),
            None => chains.push(vec![(message, permit)]),
        }
    }
    chains
}

fn log_report(job_id: &str, report: &Report, status: &str) {
    tracing::info!(
        job_id,
        status,
        audience = report.audience,
        delivered = report.delivered,
        gone = report.gone,
        removed = report.removed,
        remove_failed = report.remove_failed,
        failed = report.failed,
        deferred = report.deferred.len(),
        passes = report.passes,
        excluded = report.excluded,
        retries = report.retries,
        throttled = report.throttled,
        duration_ms = report.duration.as_millis() as u64,
        rate_per_second = report.rate().round(),
        "broadcast"
    );
}

/// Deletes finished jobs' messages in batches of up to ten, retrying the
/// entries the queue reports failed.
struct Deleter {
    handle: DeleteHandle,
    /// Dropped (deletions abandoned) if shutdown runs out of time.
    task: AbortOnDropHandle<()>,
}

/// Queues deletions, and counts them so the idle check can tell whether
/// one is still under way.
#[derive(Clone, Debug)]
struct DeleteHandle {
    tx: mpsc::Sender<Receipt>,
    /// Receipts queued, and receipts whose deletion is over (done or given
    /// up): equal when nothing is pending.
    queued: Arc<AtomicU64>,
    settled: Arc<AtomicU64>,
}

impl DeleteHandle {
    async fn push(&self, receipt: Receipt) {
        self.queued.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(receipt).await.is_err() {
            // The deleter is gone (shutdown): the message reappears after its
            // visibility timeout, a duplicate, never a loss.
            self.settled.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn idle(&self) -> bool {
        self.queued.load(Ordering::SeqCst) == self.settled.load(Ordering::SeqCst)
    }
}

impl Deleter {
    fn spawn<Q: JobQueue>(queue: Arc<Q>) -> Self {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 10);
        let handle = DeleteHandle {
            tx,
            queued: Arc::new(AtomicU64::new(0)),
            settled: Arc::new(AtomicU64::new(0)),
        };
        let settled = handle.settled.clone();
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            ReceiverStream::new(rx)
                .ready_chunks(MAX_BATCH)
                .for_each(|batch| {
                    let settled = settled.clone();
                    let n = batch.len() as u64;
                    let queue = queue.clone();
                    async move {
                        delete_batch(&*queue, batch).await;
                        settled.fetch_add(n, Ordering::SeqCst);
                    }
                })
                .await;
        }));
        Self { handle, task }
    }

    fn handle(&self) -> DeleteHandle {
        self.handle.clone()
    }

    /// Waits until every queued deletion is done or given up on.
    async fn finish(self) {
        drop(self.handle);
        let _ = self.task.await;
    }
}

async fn delete_batch<Q: JobQueue>(queue: &Q, mut pending: Vec<Receipt>) {
    for attempt in 1.. {
        match queue.delete(&pending).await {
            Ok(failed) if failed.is_empty() => return,
            Ok(failed) => pending = failed,
            Err(e) => {
                tracing::debug!(error = %e, attempt, "deleting finished jobs failed; retrying")
            }
        }
        if !SETTLE_BACKOFF.allows_another(attempt) {
            tracing::warn!(
                messages = pending.len(),
                "finished jobs could not be deleted; they will be delivered again"
            );
            return;
        }
        tokio::time::sleep(SETTLE_BACKOFF.delay(attempt - 1)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::engine::EngineSettings;
    use crate::limiter::SendBudget;
    use crate::testing::{FakeGateway, FakeQueue, FakeTable, ids};

    /// A shutdown token cancelled after `delay` (paused time runs it at once).
    fn shutdown_after(delay: Duration) -> CancellationToken {
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            trigger.cancel();
        });
        shutdown
    }

    fn settings() -> WorkerSettings {
        WorkerSettings {
            max_concurrent_jobs: 2,
            visibility_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            job_retry: Backoff {
                base: Duration::from_secs(5),
                max: Duration::from_secs(60),
                max_attempts: 1,
            },
            shutdown_grace: Duration::from_secs(5),
            exit_when_idle: true,
            capabilities: Capabilities { channels: false },
            split_segments: 1,
            deferred_limit: 2,
        }
    }

    struct Rig {
        queue: Arc<FakeQueue>,
        table: Arc<FakeTable>,
        gateway: Arc<FakeGateway>,
        metrics: Arc<Metrics>,
    }

    impl Rig {
        fn new(queue: FakeQueue, gateway: FakeGateway) -> Self {
            Self {
                queue: Arc::new(queue),
                table: Arc::new(FakeTable::with(&ids(20), 5)),
                gateway: Arc::new(gateway),
                metrics: Arc::new(Metrics::default()),
            }
        }

        async fn run(&self, settings: WorkerSettings, shutdown: CancellationToken) -> Stopped {
            let engine = Engine::new(
                Arc::new(self.table.clone()),
                self.gateway.clone(),
                Arc::new(SendBudget::new(None, 8)),
                EngineSettings {
                    send_backoff: Backoff {
                        base: Duration::from_millis(1),
                        max: Duration::from_millis(1),
                        max_attempts: 2,
                    },
                    throttle_deadline: Duration::from_millis(20),
                    deferred_passes: 1,
                    pass_pause: Duration::from_millis(1),
                    max_in_flight: 8,
                    scan_segments: 1,
                },
                self.metrics.clone(),
            );
            run(
                self.queue.clone(),
                Arc::new(engine),
                settings,
                self.metrics.clone(),
                shutdown,
            )
            .await
        }
    }

    fn failing(id: &str) -> FakeGateway {
        let gateway = FakeGateway::default();
        gateway.script.lock().unwrap().insert(
            id.into(),
            vec![crate::gateway::PostOutcome::Transient("HTTP 503".into()); 1000],
        );
        gateway
    }

    #[tokio::test]
    async fn deferred_connections_go_on_in_a_delayed_continuation_then_the_message_goes() {
        let rig = Rig::new(
            FakeQueue::with_jobs(&[r#"{"id":"j","data":"a"}"#], true),
            failing("conn-3"),
        );
        assert_eq!(
            rig.run(settings(), CancellationToken::new()).await,
            Stopped::Idle
        );
        assert_eq!(rig.gateway.delivered.lock().unwrap().len(), 19);
        let sent = rig.queue.sent.lock().unwrap().clone();
        let [body] = &sent[..] else {
            panic!("{sent:?}")
        };
        let next = job::parse(body, "m", settings().capabilities).expect("parses");
        assert_eq!(next.id, "j");
        assert_eq!(next.deferrals, 1);
        let Target::Deferred(listed) = next.target else {
            panic!("{:?}", next.target)
        };
        let ids: Vec<_> = listed.iter().map(|c| c.id.to_string()).collect();
        assert_eq!(ids, ["conn-3"], "exactly the deferred one");
        assert!(listed[0].key.is_some(), "with its row key");
        assert_eq!(rig.queue.deleted_ids(), ["r0"], "handed on, then deleted");
    }

    #[tokio::test]
    async fn a_connection_deferred_across_the_limit_is_dead_lettered_alone() {
        let body =
            r#"{"id":"j","data":"a","deferrals":2,"deferred":[{"id":"conn-3"},{"id":"conn-4"}]}"#;
        let rig = Rig::new(FakeQueue::with_jobs(&[body], true), failing("conn-3"));
        assert_eq!(
            rig.run(settings(), CancellationToken::new()).await,
            Stopped::Idle
        );
        assert_eq!(rig.gateway.delivered.lock().unwrap().len(), 1, "conn-4");
        assert!(rig.queue.sent.lock().unwrap().is_empty(), "no continuation");
        let dead = rig.queue.dead.as_ref().unwrap().lock().unwrap().clone();
        let [(id, reason)] = &dead[..] else {
            panic!("{dead:?}")
        };
        assert_eq!(id, "m0/conn-3");
        assert!(
            reason.contains("HTTP 503") && reason.contains("conn-3"),
            "{reason}"
        );
        assert_eq!(rig.queue.deleted_ids(), ["r0"]);
    }

    #[tokio::test]
    async fn without_a_dead_letter_queue_a_connection_deferred_too_often_keeps_its_job() {
        let body = r#"{"data":"a","deferrals":2,"deferred":[{"id":"conn-3"}]}"#;
        let rig = Rig::new(FakeQueue::with_jobs(&[body], false), failing("conn-3"));
        assert_eq!(
            rig.run(settings(), CancellationToken::new()).await,
            Stopped::Idle
        );
        assert!(rig.queue.deleted_ids().is_empty(), "nothing dropped");
    }

    #[tokio::test]
    async fn on_a_fifo_queue_deferred_connections_fail_the_job_in_its_place() {
        let mut queue = FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true);
        queue.visible.get_mut().unwrap()[0].group_id = Some("news".into());
        let rig = Rig::new(queue, failing("conn-3"));
        assert_eq!(
            rig.run(settings(), CancellationToken::new()).await,
            Stopped::Idle
        );
        assert!(rig.queue.sent.lock().unwrap().is_empty(), "no new message");
        assert!(rig.queue.deleted_ids().is_empty(), "kept in its place");
        let visibility = rig.queue.visibility.lock().unwrap().clone();
        assert!(
            visibility
                .iter()
                .any(|(r, after)| r.0 == "r0" && !after.is_zero()),
            "retried later: {visibility:?}"
        );
    }

    #[tokio::test]
    async fn good_jobs_are_delivered_then_deleted_and_bad_ones_dead_lettered() {
        let rig = Rig::new(
            FakeQueue::with_jobs(
                &[
                    r#"{"data":"a"}"#,
                    "{not json",
                    r#"{"data":"b"}"#,
                    r#"{"data":"x","channel":"c"}"#,
                ],
                true,
            ),
            FakeGateway::default(),
        );
        let stopped = rig.run(settings(), CancellationToken::new()).await;
        assert_eq!(stopped, Stopped::Idle);
        assert_eq!(
            rig.gateway.delivered.lock().unwrap().len(),
            40,
            "two jobs × 20"
        );
        assert_eq!(rig.queue.deleted_ids(), ["r0", "r1", "r2", "r3"]);
        let dead = rig.queue.dead.as_ref().unwrap().lock().unwrap().clone();
        assert_eq!(dead.len(), 2);
        assert!(
            dead.iter()
                .any(|(id, why)| id == "m1" && why.contains("not a valid job")),
            "{dead:?}"
        );
        assert!(
            dead.iter()
                .any(|(id, why)| id == "m3" && why.contains("FANOUT_CHANNEL_INDEX")),
            "{dead:?}"
        );
        assert_eq!(Metrics::get(&rig.metrics.jobs_completed), 2);
        assert_eq!(Metrics::get(&rig.metrics.jobs_in_flight), 0);
    }

    #[tokio::test]
    async fn without_a_dead_letter_queue_a_bad_job_is_left_for_redrive() {
        let rig = Rig::new(FakeQueue::with_jobs(&["[]"], false), FakeGateway::default());
        rig.run(settings(), CancellationToken::new()).await;
        assert!(
            rig.queue.deleted_ids().is_empty(),
            "a bad job must not be deleted without a DLQ"
        );
        assert!(rig.queue.visibility.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_permanent_send_failure_dead_letters_and_a_passing_one_retries_later() {
        let gateway = FakeGateway::default();
        gateway.script.lock().unwrap().insert(
            "conn-0".into(),
            vec![crate::gateway::PostOutcome::PayloadTooLarge],
        );
        let rig = Rig::new(FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true), gateway);
        rig.run(settings(), CancellationToken::new()).await;
        assert_eq!(rig.queue.deleted_ids(), ["r0"]);
        let dead = rig.queue.dead.as_ref().unwrap().lock().unwrap().clone();
        assert!(dead[0].1.contains("too large"), "{dead:?}");

        let gateway = FakeGateway::default();
        gateway.script.lock().unwrap().insert(
            "conn-0".into(),
            vec![crate::gateway::PostOutcome::Forbidden("403".into())],
        );
        let mut queue = FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true);
        queue.visible.get_mut().unwrap()[0].receive_count = 3;
        let rig = Rig::new(queue, gateway);
        rig.run(settings(), CancellationToken::new()).await;
        assert!(
            rig.queue.deleted_ids().is_empty(),
            "a retried job is not deleted"
        );
        let visibility = rig.queue.visibility.lock().unwrap().clone();
        // Third receive: base 5 s doubled twice.
        assert_eq!(
            visibility,
            [(Receipt("r0".into()), Duration::from_secs(20))]
        );
        assert_eq!(Metrics::get(&rig.metrics.jobs_retried), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_running_job_keeps_its_message_hidden_and_shutdown_hands_it_back() {
        let rig = Rig::new(
            FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true),
            FakeGateway {
                stall: true,
                ..FakeGateway::default()
            },
        );
        let shutdown = shutdown_after(Duration::from_secs(31));
        let mut s = settings();
        s.exit_when_idle = false;
        let stopped = rig.run(s, shutdown).await;
        assert_eq!(stopped, Stopped::Shutdown);
        let visibility = rig.queue.visibility.lock().unwrap().clone();
        let heartbeats = visibility
            .iter()
            .filter(|(_, t)| *t == Duration::from_secs(30))
            .count();
        assert_eq!(
            heartbeats, 3,
            "heartbeats at 10, 20, 30 s; shutdown at 31 s, grace over at 36 s: {visibility:?}"
        );
        assert_eq!(
            visibility.last().unwrap(),
            &(Receipt("r0".into()), Duration::ZERO),
            "handed back at once"
        );
        assert!(
            rig.queue.sent.lock().unwrap().is_empty(),
            "no page finished: no continuation"
        );
        assert!(rig.queue.deleted_ids().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_within_grace_and_bound_when_the_queue_hangs() {
        // The job never ends by itself, and nothing the worker asks of the
        // queue after receiving is ever answered.
        let rig = Rig::new(
            FakeQueue {
                stall_settles: true,
                ..FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true)
            },
            FakeGateway {
                stall: true,
                ..FakeGateway::default()
            },
        );
        let mut s = settings();
        s.exit_when_idle = false;
        let started = tokio::time::Instant::now();
        let shutdown = shutdown_after(Duration::from_secs(1));
        let bound = Duration::from_secs(1) + s.shutdown_grace + SHUTDOWN_SETTLE_BOUND;
        let stopped = tokio::time::timeout(Duration::from_secs(3600), rig.run(s, shutdown))
            .await
            .expect("the worker must stop despite a hung queue");
        assert_eq!(stopped, Stopped::Shutdown);
        assert!(started.elapsed() <= bound, "{:?}", started.elapsed());
        assert!(rig.queue.deleted_ids().is_empty(), "nothing settled");
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_of_a_stopped_worker_runs_on_not_even_a_fifo_chains_waiting_heartbeats() {
        // Two jobs of one group: the second waits, hidden by a heartbeat,
        // behind the first, which never ends; the queue hangs at shutdown.
        let mut queue = fifo(&[r#"{"data":"1"}"#, r#"{"data":"2"}"#], "g");
        queue.stall_settles = true;
        let rig = Rig::new(
            queue,
            FakeGateway {
                stall: true,
                ..FakeGateway::default()
            },
        );
        let mut s = settings();
        s.exit_when_idle = false;
        s.max_concurrent_jobs = 4;
        let stopped = rig.run(s, shutdown_after(Duration::from_secs(1))).await;
        assert_eq!(stopped, Stopped::Shutdown);
        // Aborted tasks let go of what they hold once the runtime drops them.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            Arc::strong_count(&rig.queue),
            1,
            "a task of the stopped worker still holds the queue"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_interrupted_job_with_finished_pages_continues_in_a_new_message() {
        // Pages of 5; conn-12 never answers: pages 1 and 2 finish, page 3 not.
        let rig = Rig::new(
            FakeQueue::with_jobs(&[r#"{"id":"big","data":"a"}"#], true),
            FakeGateway {
                stall_ids: ["conn-12".to_owned()].into(),
                ..FakeGateway::default()
            },
        );
        let shutdown = shutdown_after(Duration::from_secs(1));
        let mut s = settings();
        s.exit_when_idle = false;
        rig.run(s, shutdown).await;
        let sent = rig.queue.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 1, "one continuation");
        let next = job::parse(&sent[0], "m9", Capabilities { channels: false }).expect("parses");
        assert_eq!(next.id, "big");
        let after_two_pages = Cursor {
            segment: 0,
            position: Some(crate::store::Position::Offset(10)),
        };
        assert_eq!(next.resume, Some(vec![after_two_pages]));
        assert_eq!(rig.queue.deleted_ids(), ["r0"], "the original is replaced");
        let visibility = rig.queue.visibility.lock().unwrap().clone();
        assert!(
            visibility.iter().all(|(_, t)| !t.is_zero()),
            "{visibility:?}"
        );
    }

    #[tokio::test]
    async fn receives_hide_messages_for_the_workers_visibility_timeout() {
        let rig = Rig::new(
            FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true),
            FakeGateway::default(),
        );
        rig.run(settings(), CancellationToken::new()).await;
        let asked = rig.queue.receive_visibility.lock().unwrap().clone();
        assert!(!asked.is_empty());
        assert!(
            asked.iter().all(|t| *t == Duration::from_secs(30)),
            "{asked:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_that_panics_stops_its_heartbeat() {
        let rig = Rig::new(
            FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true),
            FakeGateway {
                panic_ids: ["conn-3".to_owned()].into(),
                ..FakeGateway::default()
            },
        );
        let stopped = rig.run(settings(), CancellationToken::new()).await;
        assert_eq!(stopped, Stopped::Idle);
        // Long after the job is over, nothing keeps its message hidden.
        tokio::time::sleep(Duration::from_secs(120)).await;
        let visibility = rig.queue.visibility.lock().unwrap().clone();
        assert_eq!(
            visibility,
            [(Receipt("r0".into()), Duration::from_secs(5))],
            "handed back for a retry, then no heartbeat: {visibility:?}"
        );
        assert!(rig.queue.deleted_ids().is_empty());
    }

    #[tokio::test]
    async fn a_panic_of_the_page_reader_retries_the_job_instead_of_deleting_it() {
        let mut table = FakeTable::with(&ids(20), 5);
        table.panic_after_pages = Some(2);
        let rig = Rig {
            table: Arc::new(table),
            ..Rig::new(
                FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true),
                FakeGateway::default(),
            )
        };
        rig.run(settings(), CancellationToken::new()).await;
        assert!(
            rig.queue.deleted_ids().is_empty(),
            "half the audience unsent"
        );
        assert_eq!(
            rig.queue.visibility.lock().unwrap().clone(),
            [(Receipt("r0".into()), Duration::from_secs(5))]
        );
        assert_eq!(Metrics::get(&rig.metrics.jobs_completed), 0);
        assert_eq!(Metrics::get(&rig.metrics.jobs_retried), 1);
    }

    #[tokio::test]
    async fn a_dead_letter_that_fails_counts_as_a_retry_only() {
        let queue = FakeQueue::with_jobs(&["{not json"], true);
        queue.failing_dead_letters.store(1, Ordering::SeqCst);
        let rig = Rig::new(queue, FakeGateway::default());
        rig.run(settings(), CancellationToken::new()).await;
        assert!(rig.queue.deleted_ids().is_empty());
        assert_eq!(Metrics::get(&rig.metrics.jobs_dead_lettered), 0);
        assert_eq!(Metrics::get(&rig.metrics.jobs_retried), 1);

        let rig = Rig::new(
            FakeQueue::with_jobs(&["{not json"], true),
            FakeGateway::default(),
        );
        rig.run(settings(), CancellationToken::new()).await;
        assert_eq!(Metrics::get(&rig.metrics.jobs_dead_lettered), 1);
        assert_eq!(Metrics::get(&rig.metrics.jobs_retried), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn splitting_keeps_the_message_hidden_while_it_sends_segments() {
        // Four sends of 15 s each outlast the 30 s visibility timeout.
        let rig = Rig::new(
            FakeQueue {
                send_wait: Duration::from_secs(15),
                ..FakeQueue::with_jobs(&[r#"{"id":"big","data":"s","split":4}"#], true)
            },
            FakeGateway::default(),
        );
        rig.run(settings(), CancellationToken::new()).await;
        assert_eq!(rig.queue.sent.lock().unwrap().len(), 4);
        assert_eq!(rig.queue.deleted_ids(), ["r0"]);
        let visibility = rig.queue.visibility.lock().unwrap().clone();
        assert!(
            visibility.len() >= 5
                && visibility
                    .iter()
                    .all(|v| v == &(Receipt("r0".into()), Duration::from_secs(30))),
            "a heartbeat every 10 s of the 60 s split: {visibility:?}"
        );
        assert_eq!(
            Metrics::get(&rig.metrics.jobs_completed),
            0,
            "a split is not a completed broadcast"
        );
        assert_eq!(Metrics::get(&rig.metrics.jobs_split), 1);
    }

    #[tokio::test]
    async fn a_split_job_becomes_segment_jobs_that_cover_the_table_once() {
        let rig = Rig::new(
            FakeQueue::with_jobs(&[r#"{"id":"big","data":"s","split":3}"#], true),
            FakeGateway::default(),
        );
        rig.run(settings(), CancellationToken::new()).await;
        assert_eq!(rig.queue.deleted_ids(), ["r0"], "the whole job is replaced");
        assert!(
            rig.gateway.delivered.lock().unwrap().is_empty(),
            "nothing sent yet"
        );
        let parts = rig.queue.sent.lock().unwrap().clone();
        assert_eq!(parts.len(), 3);

        // Run the shares as other workers would.
        let bodies: Vec<&str> = parts.iter().map(String::as_str).collect();
        let rig2 = Rig::new(FakeQueue::with_jobs(&bodies, true), FakeGateway::default());
        rig2.run(settings(), CancellationToken::new()).await;
        let delivered = rig2.gateway.delivered.lock().unwrap();
        let unique: std::collections::HashSet<_> = delivered.iter().map(|(id, _)| id).collect();
        assert_eq!(delivered.len(), 20, "every row once");
        assert_eq!(unique.len(), 20);
        assert!(
            rig2.queue.sent.lock().unwrap().is_empty(),
            "shares are not split again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fifo_jobs_are_neither_continued_nor_split_so_order_holds() {
        let mut queue = FakeQueue::with_jobs(&[r#"{"id":"f","data":"a","split":4}"#], true);
        queue.visible.get_mut().unwrap()[0].group_id = Some("news".into());
        let rig = Rig::new(
            queue,
            FakeGateway {
                stall_ids: ["conn-12".to_owned()].into(),
                ..FakeGateway::default()
            },
        );
        let shutdown = shutdown_after(Duration::from_secs(1));
        let mut s = settings();
        s.exit_when_idle = false;
        rig.run(s, shutdown).await;
        assert!(rig.queue.sent.lock().unwrap().is_empty(), "no new message");
        assert!(
            rig.queue.deleted_ids().is_empty(),
            "the original keeps its place"
        );
        let visibility = rig.queue.visibility.lock().unwrap().clone();
        assert_eq!(
            visibility.last(),
            Some(&(Receipt("r0".into()), Duration::ZERO))
        );
        assert!(
            rig.gateway.delivered.lock().unwrap().len() >= 10,
            "it ran, unsplit"
        );
    }

    fn fifo(bodies: &[&str], group: &str) -> FakeQueue {
        let mut queue = FakeQueue::with_jobs(bodies, true);
        for message in queue.visible.get_mut().unwrap() {
            message.group_id = Some(group.into());
        }
        queue
    }

    #[tokio::test]
    async fn messages_of_one_fifo_group_received_together_run_in_order() {
        let rig = Rig::new(
            fifo(
                &[r#"{"data":"1"}"#, r#"{"data":"2"}"#, r#"{"data":"3"}"#],
                "g",
            ),
            FakeGateway::default(),
        );
        let mut s = settings();
        s.max_concurrent_jobs = 4;
        rig.run(s, CancellationToken::new()).await;
        assert_eq!(rig.queue.deleted_ids(), ["r0", "r1", "r2"]);
        let delivered = rig.gateway.delivered.lock().unwrap();
        let to_first: Vec<_> = delivered
            .iter()
            .filter(|(id, _)| id == "conn-0")
            .map(|(_, payload)| payload.clone())
            .collect();
        assert_eq!(to_first, ["1", "2", "3"]);
    }

    #[tokio::test]
    async fn a_fifo_job_that_stays_on_the_queue_keeps_its_group_mates_behind_it() {
        let gateway = FakeGateway::default();
        gateway.script.lock().unwrap().insert(
            "conn-0".into(),
            vec![crate::gateway::PostOutcome::Forbidden("403".into())],
        );
        let rig = Rig::new(fifo(&[r#"{"data":"1"}"#, r#"{"data":"2"}"#], "g"), gateway);
        let mut s = settings();
        s.max_concurrent_jobs = 4;
        rig.run(s, CancellationToken::new()).await;
        assert!(rig.queue.deleted_ids().is_empty());
        let visibility = rig.queue.visibility.lock().unwrap().clone();
        assert!(
            visibility.contains(&(Receipt("r1".into()), Duration::ZERO)),
            "{visibility:?}"
        );
        let delivered = rig.gateway.delivered.lock().unwrap();
        assert!(
            delivered.iter().all(|(_, payload)| payload == "1"),
            "the second job must not overtake the first"
        );
    }

    #[tokio::test]
    async fn the_configured_split_applies_to_whole_table_jobs_only() {
        let rig = Rig::new(
            FakeQueue::with_jobs(
                &[
                    r#"{"data":"a"}"#,
                    r#"{"data":"b","connections":["conn-1"]}"#,
                ],
                true,
            ),
            FakeGateway::default(),
        );
        let mut s = settings();
        s.split_segments = 4;
        rig.run(s, CancellationToken::new()).await;
        assert_eq!(rig.queue.sent.lock().unwrap().len(), 4);
        assert_eq!(
            rig.gateway.delivered.lock().unwrap().len(),
            1,
            "the list job ran"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn what_a_long_poll_brings_after_shutdown_is_handed_back_at_once() {
        let rig = Rig::new(
            FakeQueue {
                poll_wait: Duration::from_secs(2),
                ..FakeQueue::default()
            },
            FakeGateway::default(),
        );
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        let queue = rig.queue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            trigger.cancel();
            // A message arrives while the abandoned poll still waits.
            tokio::time::sleep(Duration::from_millis(400)).await;
            queue.visible.lock().unwrap().extend(
                FakeQueue::with_jobs(&[r#"{"data":"late"}"#], true)
                    .visible
                    .into_inner()
                    .unwrap(),
            );
        });
        let mut s = settings();
        s.exit_when_idle = false;
        let stopped = rig.run(s, shutdown).await;
        assert_eq!(stopped, Stopped::Shutdown);
        let visibility = rig.queue.visibility.lock().unwrap().clone();
        assert_eq!(visibility, [(Receipt("r0".into()), Duration::ZERO)]);
        assert!(rig.gateway.delivered.lock().unwrap().is_empty(), "not run");
    }

    #[tokio::test(start_paused = true)]
    async fn receive_errors_back_off_and_the_worker_goes_on() {
        let queue = FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true);
        queue.failing_receives.store(5, Ordering::SeqCst);
        let rig = Rig::new(queue, FakeGateway::default());
        rig.run(settings(), CancellationToken::new()).await;
        assert_eq!(rig.queue.deleted_ids(), ["r0"]);
        assert!(rig.queue.receives.load(Ordering::SeqCst) >= 7);
    }

    #[tokio::test]
    async fn a_missing_queue_stops_the_worker_with_the_reason() {
        let queue = FakeQueue {
            missing: true,
            ..FakeQueue::default()
        };
        let rig = Rig::new(queue, FakeGateway::default());
        let stopped = rig.run(settings(), CancellationToken::new()).await;
        assert!(
            matches!(&stopped, Stopped::Failed(why) if why.contains("does not exist")),
            "{stopped:?}"
        );
    }

    #[tokio::test]
    async fn no_more_jobs_run_at_once_than_allowed() {
        let bodies: Vec<String> = (0..7).map(|i| format!(r#"{{"data":"{i}"}}"#)).collect();
        let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
        let rig = Rig::new(FakeQueue::with_jobs(&refs, true), FakeGateway::default());
        rig.run(settings(), CancellationToken::new()).await;
        assert_eq!(rig.queue.deleted_ids().len(), 7);
        assert_eq!(rig.gateway.delivered.lock().unwrap().len(), 140);
    }
}
