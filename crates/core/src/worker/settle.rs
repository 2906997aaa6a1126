//! Settlement: what a job's run came to, and the one place that applies it
//! to the job's message. Deleted only when the job is done (or handed on in
//! new messages); made visible again after a backoff when it may pass;
//! dead-lettered with its reason when it never can. Each way says what it
//! did as a report [`Status`].

use std::time::Duration;

use super::halt::Halt;
use super::{Fate, JobContext, SETTLE_BACKOFF};
use crate::engine::summary::RunSummary;
use crate::gateway::Gateway;
use crate::job::Segment;
use crate::job::keys::RunKey;
use crate::job::{self, Job};
use crate::limits::MAX_SEND_DELAY;
use crate::queue::{DeadLettered, JobQueue, Message, SendOptions};
use crate::reports::{Draft, Status};
use crate::runs::BroadcastTally;
use crate::store::{ConnectionStore, Cursor};
use crate::telemetry::Metrics;

/// What a job's run came to, and so what becomes of its message.
pub(super) enum Settlement {
    /// Every connection final and none deferred: the message goes.
    Done,
    /// The job was split into this many segment jobs: the message goes.
    Split(u32),
    /// Every connection final, some deferred: they go on in delayed
    /// continuation jobs (or to the dead-letter queue one by one), then the
    /// message goes.
    Deferred { job: Job, report: Box<RunSummary> },
    /// Stopped by shutdown: continued from its finished pages in a new
    /// message, or handed back as it is.
    Interrupted { job: Job, resume: Vec<Cursor> },
    /// Stopped with too many connections deferred (an outage): continued
    /// from its finished pages after a backoff, or handed back whole.
    Backlogged { job: Job, resume: Vec<Cursor> },
    /// The job can never run: to the dead-letter queue with this reason.
    DeadLetter(String),
    /// A passing failure: visible again after a backoff.
    RetryLater,
    /// Its run is live on another task, which renews this message's
    /// visibility now: left as it is.
    LeaveHidden,
    /// Stopped, or not started, by its deadline or a cancel: the message
    /// goes, and nothing of it is handed on.
    Halted(Halt),
    /// A cancel job whose tombstone is written: the message goes.
    CancelRecorded,
}

/// What settling did: where the message is, what its report says, what it
/// handed on, and, when it was the last piece of its broadcast, the
/// broadcast's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Settled {
    pub(super) fate: Fate,
    pub(super) status: Status,
    pub(super) handed_on: HandedOn,
    pub(super) broadcast: Option<BroadcastTally>,
}

/// The jobs a settled message handed on, which its broadcast now waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum HandedOn {
    #[default]
    Nothing,
    /// Segment jobs `0..n` of a split.
    Segments(u32),
    /// The continuation from its resume points.
    Continuation,
    /// Continuations of deferred connections, parts `0..n`.
    Parts(u32),
}

impl HandedOn {
    /// The run keys (as stored) the broadcast waits for once `key` has
    /// settled: those it handed on, and the producer's job itself.
    fn after(self, key: &RunKey) -> Vec<String> {
        let next = |segment, continuation, part| RunKey {
            broadcast: key.broadcast.clone(),
            segment,
            continuation,
            part,
        };
        let mut runs: Vec<RunKey> = match self {
            Self::Nothing => Vec::new(),
            Self::Segments(total) => (0..total)
                .map(|index| next(Some(Segment { index, total }), 0, 0))
                .collect(),
            Self::Continuation => vec![next(key.segment, key.continuation + 1, 0)],
            Self::Parts(n) => (0..n)
                .map(|part| next(key.segment, key.continuation + 1, part))
                .collect(),
        };
        if key.is_first() && key.segment.is_none() {
            runs.push(key.clone());
        }
        runs.iter().map(RunKey::storage_key).collect()
    }
}

impl Settled {
    fn new(fate: Fate, status: Status) -> Self {
        Self {
            fate,
            status,
            handed_on: HandedOn::Nothing,
            broadcast: None,
        }
    }

    fn handing_on(mut self, handed_on: HandedOn) -> Self {
        self.handed_on = handed_on;
        self
    }
}

impl<Q: JobQueue, S: ConnectionStore, G: Gateway> JobContext<Q, S, G> {
    /// Applies what the run came to. A message that goes is first added to
    /// its broadcast's record (with run records and a report destination),
    /// then deleted: a task that dies between the two runs the piece again,
    /// which finds it counted and reports the broadcast again if it is over.
    pub(super) async fn settle(
        &self,
        message: &Message,
        settlement: Settlement,
        draft: Option<&Draft>,
    ) -> Settled {
        let mut settled = self.apply(message, settlement).await;
        if settled.fate == Fate::Gone {
            if let (Some(draft), Some(ledger)) = (draft, &self.ledger)
                && !self.reports.is_empty()
                && settled.status != Status::CancelRecorded
            {
                let key = draft.run_key();
                let expects = settled.handed_on.after(&key);
                let piece = draft.piece(settled.status, expects);
                settled.broadcast = ledger.tally(&key.broadcast, &piece).await;
            }
            self.deleter.push(message.receipt.clone()).await;
        }
        settled
    }

    async fn apply(&self, message: &Message, settlement: Settlement) -> Settled {
        match settlement {
            Settlement::Done => Settled::new(Fate::Gone, Status::Done),
            Settlement::Split(total) => {
                Settled::new(Fate::Gone, Status::Split).handing_on(HandedOn::Segments(total))
            }
            Settlement::Deferred { job, report } => self.hand_on(message, &job, &report).await,
            Settlement::Interrupted { job, resume } => {
                self.continue_unfinished(message, &job, resume, Duration::ZERO)
                    .await
            }
            Settlement::Backlogged { job, resume } => {
                let delay = self
                    .settings
                    .job_retry
                    .cap(message.receive_count.saturating_sub(1))
                    .min(MAX_SEND_DELAY);
                self.continue_unfinished(message, &job, resume, delay).await
            }
            Settlement::DeadLetter(reason) => self.dead_letter(message, &reason).await,
            Settlement::RetryLater => self.retry_later(message).await,
            Settlement::Halted(Halt::Lapsed) => Settled::new(Fate::Gone, Status::Lapsed),
            Settlement::Halted(Halt::Cancelled) => Settled::new(Fate::Gone, Status::Cancelled),
            Settlement::Halted(Halt::Superseded) => Settled::new(Fate::Gone, Status::Superseded),
            Settlement::CancelRecorded => Settled::new(Fate::Gone, Status::CancelRecorded),
            // Not reported (the holder reports its run): the status is moot.
            Settlement::LeaveHidden => Settled::new(Fate::Kept, Status::Retrying),
        }
    }

    /// Settles a job whose connections are all final but some deferred:
    /// they go on in delayed continuation jobs listing exactly them, or to
    /// the dead-letter queue one by one once deferred too often. The
    /// message is deleted only once every one of them has been handed on.
    /// On a FIFO queue (no per-message delay, and order must hold) the job
    /// fails as a whole and is retried in its place.
    async fn hand_on(&self, message: &Message, job: &Job, report: &RunSummary) -> Settled {
        let count = report.deferred.len();
        if message.group_id.is_some() {
            tracing::warn!(job_id = %job.id, deferred = count, deferred_to = "retry in place (FIFO)", "connections deferred; the job will be retried whole");
            return self.retry_later(message).await;
        }
        let connections: Vec<_> = report
            .deferred
            .iter()
            .map(|d| d.connection.clone())
            .collect();
        if job.deferrals >= self.settings.deferred_limit {
            return self.dead_letter_each(message, job, report).await;
        }
        let of = report
            .receipts
            .as_ref()
            .map(|r| r.deferred_of.clone())
            .unwrap_or_default();
        let bodies = match job.deferred_continuations_of(
            &connections,
            &of,
            job::MAX_CONTINUATION_BYTES,
        ) {
            Ok(bodies) => bodies,
            Err(e) => {
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
                    tracing::error!(job_id = %job.id, error = %e, "cannot enqueue the continuation of deferred connections; the job will be retried");
                    return self.retry_later(message).await;
                }
            }
        }
        tracing::info!(
            job_id = %job.id,
            deferred = count,
            deferred_to = "continuation",
            continuations = ?sent,
            delay_ms = delay.as_millis() as u64,
            deferrals = job.deferrals + 1,
            "deferred connections continue in new jobs"
        );
        Metrics::add(&self.metrics.deferred_at_end, count as u64);
        Metrics::incr(&self.metrics.jobs_completed);
        Settled::new(Fate::Gone, Status::Continued).handing_on(HandedOn::Parts(sent.len() as u32))
    }

    /// Dead-letters each deferred connection as a one-connection job with
    /// its reason; then the message goes. If any cannot be dead-lettered
    /// the job is kept (retried later), so none is dropped.
    async fn dead_letter_each(&self, message: &Message, job: &Job, report: &RunSummary) -> Settled {
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
                    Metrics::incr(&self.metrics.unreached);
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
        Settled::new(Fate::Gone, Status::DeadLettered)
    }

    /// Hands an unfinished job to another worker. With pages finished, a
    /// continuation job carrying the resume cursors replaces the message, so
    /// the broadcast goes on from there instead of from its start;
    /// otherwise the message itself becomes visible again at once.
    async fn continue_unfinished(
        &self,
        message: &Message,
        job: &Job,
        resume: Vec<Cursor>,
        delay: Duration,
    ) -> Settled {
        let handed_back = |fate| Settled::new(fate, Status::Interrupted);
        // On a FIFO queue a new message would join the end of its group and
        // let later broadcasts overtake this one: keep the original, which
        // holds its place (the group waits for it).
        if resume.is_empty() || job.resume.as_ref() == Some(&resume) || message.group_id.is_some() {
            return handed_back(self.hand_back(message, delay).await);
        }
        let body = match serde_json::to_string(&job.continuation(resume)) {
            Ok(body) => body,
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %e, "cannot encode the continuation; the job restarts from its start");
                return handed_back(self.hand_back(message, Duration::ZERO).await);
            }
        };
        let options = SendOptions {
            delay: (!delay.is_zero()).then_some(delay),
            ..SendOptions::default()
        };
        match self.queue.send(&body, &options).await {
            Ok(continuation) => {
                tracing::info!(job_id = %job.id, continuation, "job continues in a new message");
                // If this delete is lost, the original runs again from its
                // start as well: duplicates, never a loss.
                Settled::new(Fate::Gone, Status::Continued).handing_on(HandedOn::Continuation)
            }
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %e, "cannot enqueue the continuation; the job restarts from its start");
                handed_back(self.hand_back(message, Duration::ZERO).await)
            }
        }
    }

    /// A job that can never run: to the dead-letter queue with its reason,
    /// then off the jobs queue. Without a dead-letter queue the message
    /// stays for the queue's redrive policy.
    /// Counted once its outcome is known: a copy that fails is a retry.
    async fn dead_letter(&self, message: &Message, reason: &str) -> Settled {
        match self.queue.dead_letter(message, reason).await {
            Ok(DeadLettered::Sent) => {
                Metrics::incr(&self.metrics.jobs_dead_lettered);
                tracing::error!(message_id = %message.id, reason, "job sent to the dead-letter queue");
                Settled::new(Fate::Gone, Status::DeadLettered)
            }
            Ok(DeadLettered::NotConfigured) => {
                Metrics::incr(&self.metrics.jobs_dead_lettered);
                tracing::error!(message_id = %message.id, reason, "job cannot run; no dead-letter queue is configured, so it is left for the queue's redrive policy");
                Settled::new(Fate::Kept, Status::DeadLettered)
            }
            Err(e) => {
                tracing::error!(message_id = %message.id, reason, error = %e, "job cannot run and could not be dead-lettered; it will be tried again");
                self.retry_later(message).await
            }
        }
    }

    /// Makes a failed job visible again after a delay growing with its
    /// receive count.
    pub(super) async fn retry_later(&self, message: &Message) -> Settled {
        Metrics::incr(&self.metrics.jobs_retried);
        let delay = self
            .settings
            .job_retry
            .cap(message.receive_count.saturating_sub(1));
        Settled::new(self.hand_back(message, delay).await, Status::Retrying)
    }

    /// Makes the message visible again after `after`; it stays on the queue.
    pub(super) async fn hand_back(&self, message: &Message, after: Duration) -> Fate {
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
