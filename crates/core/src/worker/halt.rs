//! Stopping a broadcast before its end: at its deadline (`deliver_by`), or
//! on a cancel. Either is checked when a piece of the broadcast is
//! received, and watched while it runs; a stopped run's message is deleted
//! with nothing handed on, and its report says which.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::JobContext;
use super::settle::Settlement;
use crate::engine::Frontier;
use crate::gateway::Gateway;
use crate::job::deadline::{self, Due};
use crate::job::keys::RunKey;
use crate::job::{Job, Latest};
use crate::queue::{JobQueue, Message, Receipt};
use crate::reports::Draft;
use crate::runs::{
    CANCEL_POLL, Cancelled, Claimant, Handed, LATEST_POLL, Ledger, POSITION_INTERVAL, StreamClaim,
    StreamPoll, rfc3339,
};
use crate::store::{ConnectionStore, Cursor};

/// How long counting what a stopped broadcast never read may take (at
/// 2,000 rows a page-read, minutes of sending are seconds of reading).
const COUNT_BOUND: Duration = Duration::from_secs(30);

/// Why a broadcast stops before its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Halt {
    /// Its deadline passed.
    Lapsed,
    /// A cancel named it.
    Cancelled,
    /// A newer update of its stream owns the stream.
    Superseded,
}

/// The watch over one run: a deadline timer and a tombstone poll, which
/// cancel `stop` and say why. Dropped when the run ends.
pub(super) struct Watch {
    pub(super) stop: CancellationToken,
    why: Arc<OnceLock<Halt>>,
    taken: Arc<std::sync::Mutex<Option<Handed>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Watch {
    /// Why the run was stopped, if it was.
    pub(super) fn halted(&self) -> Option<Halt> {
        self.why.get().copied()
    }

    /// The newest update of its stream the run took while it ran, whose
    /// value it has been sending since (see [`Frontier::replace`]).
    pub(super) fn taken(&self) -> Option<Handed> {
        self.taken.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Cancels `stop`, saying why, unless something else stopped it first.
fn halt(stop: &CancellationToken, why: &OnceLock<Halt>, halt: Halt) {
    if !stop.is_cancelled() {
        let _ = why.set(halt);
        stop.cancel();
    }
}

/// Keeps where a stream's run has got to (read in id order), every
/// [`POSITION_INTERVAL`], for a newer update that claims the stream.
async fn keep_place(ledger: Arc<Ledger>, latest: Latest, frontier: Frontier) {
    let (mut kept, mut written) = (None, None);
    loop {
        tokio::time::sleep(POSITION_INTERVAL).await;
        let now = frontier.get();
        if let Some(at) = now.as_ref().filter(|_| now != kept) {
            ledger.publish_position(&latest, at, &mut written).await;
            kept = now;
        }
    }
}

/// Reads the stream's record every [`LATEST_POLL`] for its run (`runner`):
/// stops the run once another update claims the stream, and takes a newer
/// one handed to it, whose value the run sends from then on (`frontier`),
/// noting it in `taken`; stops the run on a cancel of the newer update it
/// sends (`sending` at first, then each one it takes).
async fn follow_stream(
    (ledger, runner): (Arc<Ledger>, String),
    mut latest: Latest,
    (stop, why): (CancellationToken, Arc<OnceLock<Halt>>),
    (taken, frontier): (Arc<std::sync::Mutex<Option<Handed>>>, Option<Frontier>),
    sending: Option<String>,
) {
    // A cancel of the newer update whose value the run sends (the one it
    // went on with, then each one it takes) stops it within a poll, as a
    // cancel of the run's own broadcast would; the watch is dropped with
    // this task, or when a newer update is taken.
    let watch_cancel = |id: String| {
        let watch = stop_on_cancel(ledger.clone(), id, (stop.clone(), why.clone()));
        AbortOnDropHandle::new(tokio::spawn(watch))
    };
    let mut _cancel_watch = sending.map(watch_cancel);
    loop {
        tokio::time::sleep(LATEST_POLL).await;
        match ledger.poll_stream(&latest, &runner).await {
            StreamPoll::Running => {}
            StreamPoll::Superseded => {
                tracing::info!(
                    stream = latest.key,
                    seq = latest.seq,
                    "a newer update owns the stream; stopping this one"
                );
                halt(&stop, &why, Halt::Superseded);
                return;
            }
            StreamPoll::Took(handed) => {
                let (Some(frontier), Some(value)) = (&frontier, handed.payload()) else {
                    // Not sendable here: the receiver takes over once this
                    // run ends.
                    halt(&stop, &why, Halt::Superseded);
                    return;
                };
                tracing::info!(
                    stream = latest.key,
                    seq = handed.seq,
                    update = handed.id,
                    "took a newer update of the stream; sending it from here on"
                );
                frontier.replace(value);
                latest.seq = handed.seq;
                _cancel_watch = Some(watch_cancel(handed.id.clone()));
                *taken.lock().unwrap_or_else(|p| p.into_inner()) = Some(handed);
            }
        }
    }
}

/// The reason a piece of a cancelled broadcast gives for sending nothing.
fn cancelled_unsent(job: &Job) -> String {
    format!("the broadcast {} was cancelled: not sent", job.id)
}

/// Stops a stream's run once the newer update it sends (`sending`) is
/// cancelled: what it was sent stays sent, and the rest of the update's
/// round is its receiver's to settle, as cancelled.
async fn stop_on_cancel(
    ledger: Arc<Ledger>,
    sending: String,
    (stop, why): (CancellationToken, Arc<OnceLock<Halt>>),
) {
    ledger.until_cancelled(&sending).await;
    tracing::info!(job_id = %sending, "the update this stream's run sends was cancelled; stopping it");
    halt(&stop, &why, Halt::Superseded);
}

impl<Q: JobQueue, S: ConnectionStore, G: Gateway> JobContext<Q, S, G> {
    /// Whether `job` may start: `Err` settles it unsent (lapsed,
    /// cancelled, or a deadline too far ahead), with its report.
    pub(super) async fn may_start(
        &self,
        job: &mut Job,
        receipt: &Receipt,
        draft: impl Fn(&Job) -> Draft,
    ) -> Result<(), (Settlement, Draft)> {
        if let Some(deadline) = job.deliver_by {
            let now = self.settings.clock.now_ms();
            match deadline::due(deadline, now) {
                Ok(Due::In(_)) => {}
                Ok(Due::Lapsed) => {
                    let reason = format!(
                        "received at {}, after its deadline {}: not sent",
                        rfc3339(now),
                        rfc3339(deadline)
                    );
                    tracing::info!(job_id = %job.id, reason, "a broadcast past its deadline");
                    let unread = self.unread(job, Halt::Lapsed, Vec::new()).await;
                    let draft = draft(job).because(reason).unread(unread);
                    return Err((Settlement::Halted(Halt::Lapsed), draft));
                }
                Err(e) => {
                    let reason = e.to_string();
                    return Err((
                        Settlement::DeadLetter(reason.clone()),
                        draft(job).because(reason),
                    ));
                }
            }
        }
        if let Some(ledger) = &self.ledger
            && ledger.is_cancelled(&job.id).await
        {
            let reason = cancelled_unsent(job);
            tracing::info!(job_id = %job.id, "a piece of a cancelled broadcast; not sent");
            return Err((
                Settlement::Halted(Halt::Cancelled),
                draft(job).because(reason),
            ));
        }
        if job.latest.is_some() {
            return self
                .claim_stream(job, receipt)
                .await
                .map_err(|(s, reason)| {
                    let draft = draft(job).because(reason);
                    // Sent round by the runner, which knows the receipts.
                    let draft = match s {
                        Settlement::Done => draft.without_receipts(),
                        _ => draft,
                    };
                    (s, draft)
                });
        }
        Ok(())
    }

    /// An update of a stream (`latest`): it runs if it is the newest
    /// started and no live run of the stream can take it, from where an
    /// older one is; it waits while such a run (the runner) sends it, and
    /// is settled once that run has sent it round. An older one is settled
    /// superseded. Without run records it is refused.
    async fn claim_stream(
        &self,
        job: &mut Job,
        receipt: &Receipt,
    ) -> Result<(), (Settlement, String)> {
        let Some(latest) = job.latest.clone() else {
            return Ok(());
        };
        let Some(ledger) = &self.ledger else {
            let reason = format!(
                "`latest` needs the run records of durable broadcasts; set {}",
                crate::limits::setting::Setting::CheckpointTable
            );
            return Err((Settlement::DeadLetter(reason.clone()), reason));
        };
        let claim = match self.claim_or_wait(ledger, job, &latest, receipt).await {
            // A cancel can come while it waits on the runner, which stops
            // sending it then (`stop_on_cancel`).
            Some((Ok(StreamClaim::Owns { .. }), true)) if ledger.is_cancelled(&job.id).await => {
                return Err((Settlement::Halted(Halt::Cancelled), cancelled_unsent(job)));
            }
            Some((claim, _)) => claim,
            None => {
                let reason =
                    "stopped while the stream's running update had it: handed back".to_owned();
                let job = job.clone();
                return Err((
                    Settlement::Interrupted {
                        job,
                        resume: Vec::new(),
                    },
                    reason,
                ));
            }
        };
        match claim {
            Ok(StreamClaim::Owns { from }) => {
                let own_start = job.continuation == 0 && job.part == 0 && job.resume.is_none();
                if own_start && !from.is_empty() {
                    tracing::info!(job_id = %job.id, stream = latest.key, seq = latest.seq, "a newer update takes over where the older one is");
                    job.resume = Some(from);
                    job.wrap = true;
                }
                Ok(())
            }
            Ok(StreamClaim::Handed { .. }) => unreachable!("waited for above"),
            Ok(StreamClaim::SentRound { by }) => {
                let reason = format!(
                    "update {} of the stream {} was sent to every connection by the stream's \
                     running update {by}",
                    latest.seq, latest.key
                );
                Err((Settlement::Done, reason))
            }
            Ok(StreamClaim::Superseded { by }) => {
                let reason = format!(
                    "update {} of the stream {} is superseded by update {by}: not sent",
                    latest.seq, latest.key
                );
                Err((Settlement::Halted(Halt::Superseded), reason))
            }
            Ok(StreamClaim::OtherAudience) => {
                let reason = format!(
                    "the stream {} goes to another audience than {}: one stream, one \
                     audience (use another key)",
                    latest.key, job.target
                );
                Err((Settlement::DeadLetter(reason.clone()), reason))
            }
            Err(e) => {
                // At least once: without the record, the update goes out as
                // a plain broadcast.
                tracing::warn!(job_id = %job.id, error = %e, "cannot read the stream's record; sending the update as it is");
                Ok(())
            }
        }
    }

    /// Claims `job`'s stream, or waits while the stream's runner has it
    /// (its message kept hidden meanwhile), until the claim says more, and
    /// whether it waited; `None` when the worker stops meanwhile.
    async fn claim_or_wait(
        &self,
        ledger: &Ledger,
        job: &Job,
        latest: &Latest,
        receipt: &Receipt,
    ) -> Option<(Result<StreamClaim, crate::runs::DurableError>, bool)> {
        let first = RunKey {
            broadcast: job.id.clone(),
            segment: None,
            continuation: 0,
            part: 0,
        }
        .storage_key();
        let audience = job.target.to_string();
        let me = Claimant {
            id: &job.id,
            run: &first,
            audience: &audience,
            payload: &job.payload,
        };
        // The heartbeat starts with the first wait.
        let mut heartbeat = None;
        loop {
            match ledger.claim_stream(latest, &me).await {
                Ok(StreamClaim::Handed { runner }) => {
                    if heartbeat.is_none() {
                        tracing::info!(job_id = %job.id, stream = latest.key, seq = latest.seq, runner, "handed to the stream's running update");
                        heartbeat = Some(self.heartbeat(receipt.clone(), job.id.clone(), None));
                    }
                    tokio::select! {
                        () = self.abort.cancelled() => return None,
                        () = tokio::time::sleep(LATEST_POLL) => {}
                    }
                }
                other => return Some((other, heartbeat.is_some())),
            }
        }
    }

    /// Watches a starting run: stops it at its deadline, once a cancel of
    /// its broadcast (or of `sending`, the newer update of its stream it
    /// went on with) is on record, when a newer update claims its stream,
    /// and on shutdown as before. A newer update handed to a stream's run
    /// replaces the value it sends (in `frontier`), which keeps its place
    /// for a newer update that claims the stream when it is read in id
    /// order (`by_id`).
    pub(super) fn watch(
        &self,
        job: &Job,
        (frontier, by_id): (Option<Frontier>, bool),
        sending: Option<String>,
    ) -> Watch {
        let stop = self.abort.child_token();
        let why = Arc::new(OnceLock::new());
        let mut tasks = Vec::new();
        if let Some(deadline) = job.deliver_by {
            let left = deadline - self.settings.clock.now_ms();
            let left = Duration::from_millis(left.max(0) as u64);
            let (stop, why) = (stop.clone(), why.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(left).await;
                halt(&stop, &why, Halt::Lapsed);
            }));
        }
        if let (Some(ledger), Some(latest), Some(frontier), true) = (
            self.ledger.clone(),
            job.latest.clone(),
            frontier.clone(),
            by_id,
        ) {
            tasks.push(tokio::spawn(keep_place(ledger, latest, frontier)));
        }
        let taken = Arc::new(std::sync::Mutex::new(None));
        if let (Some(ledger), Some(latest)) = (self.ledger.clone(), job.latest.clone()) {
            let halting = (stop.clone(), why.clone());
            let (taken, frontier) = (taken.clone(), frontier.clone());
            tasks.push(tokio::spawn(follow_stream(
                (ledger, job.id.clone()),
                latest,
                halting,
                (taken, frontier),
                sending,
            )));
        }
        if let Some(ledger) = self.ledger.clone() {
            let (stop, why, id) = (stop.clone(), why.clone(), job.id.clone());
            tasks.push(tokio::spawn(async move {
                ledger.until_cancelled(&id).await;
                tracing::info!(job_id = %id, "the broadcast was cancelled; stopping it");
                halt(&stop, &why, Halt::Cancelled);
            }));
        }
        Watch {
            stop,
            why,
            taken,
            tasks,
        }
    }

    /// The connections a stopped broadcast never read, counted by reading
    /// on without sending (from `read_to`; empty: its whole audience), so
    /// its report says how many it did not reach. Bounded by
    /// [`COUNT_BOUND`] and half the visibility timeout; `None` past that or
    /// on a read error. A superseded update's are the newer one's to reach:
    /// not counted.
    pub(super) async fn unread(&self, job: &Job, halt: Halt, read_to: Vec<Cursor>) -> Option<u64> {
        if halt == Halt::Superseded {
            return Some(0);
        }
        let bound = COUNT_BOUND.min(self.settings.visibility_timeout / 2);
        match tokio::time::timeout(bound, self.engine.count_unread(job, read_to)).await {
            Ok(Ok(count)) => Some(count),
            Ok(Err(e)) => {
                tracing::warn!(job_id = %job.id, error = %e, "cannot count what the stopped broadcast did not read");
                None
            }
            Err(_) => {
                tracing::warn!(job_id = %job.id, bound_ms = bound.as_millis() as u64, "counting what the stopped broadcast did not read took too long");
                None
            }
        }
    }

    /// Whether a run that ended with connections deferred is past its
    /// deadline: they are then not handed on.
    pub(super) fn lapsed_now(&self, job: &Job) -> bool {
        job.deliver_by
            .is_some_and(|deadline| self.settings.clock.now_ms() >= deadline)
    }

    /// A cancel job: its tombstone is written, then its message goes.
    /// Without run records it is refused (dead-lettered) with the reason.
    pub(super) async fn record_cancel(
        &self,
        message: &Message,
        broadcast: &str,
        started: SystemTime,
    ) -> (Settlement, Draft) {
        let draft = Draft::of_cancel(broadcast, &message.id, started);
        let Some(ledger) = &self.ledger else {
            let reason = format!(
                "a cancel needs the run records of durable broadcasts; set {} to cancel {broadcast}",
                crate::limits::setting::Setting::CheckpointTable
            );
            return (
                Settlement::DeadLetter(reason.clone()),
                draft.because(reason),
            );
        };
        record(ledger, message, broadcast, draft).await
    }
}

async fn record(
    ledger: &Ledger,
    message: &Message,
    broadcast: &str,
    draft: Draft,
) -> (Settlement, Draft) {
    match ledger.cancel(broadcast, &message.id).await {
        Ok(seen) => {
            let reason = match seen {
                Cancelled::Seen => format!(
                    "the broadcast {broadcast} is cancelled: its runs stop within {} and no \
                     piece of it starts again",
                    humantime::format_duration(CANCEL_POLL)
                ),
                Cancelled::NotSeenYet => format!(
                    "no run of the broadcast {broadcast} is on record yet; it is stopped if it \
                     comes within {} (a cancel may overtake its broadcast)",
                    humantime::format_duration(crate::limits::TOMBSTONE_LIFETIME)
                ),
            };
            tracing::info!(broadcast, seen = ?seen, "cancel recorded");
            (Settlement::CancelRecorded, draft.because(reason))
        }
        Err(e) => {
            let reason = format!("cannot record the cancel of {broadcast}: {e}");
            tracing::warn!(broadcast, error = %e, "cannot record a cancel; it will be retried");
            let settlement = if e.is_transient() {
                Settlement::RetryLater
            } else {
                Settlement::DeadLetter(reason.clone())
            };
            (settlement, draft.because(reason))
        }
    }
}
