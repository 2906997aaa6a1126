//! The engine: one job's audience, streamed page by page, sent to
//! concurrently under the process-wide [`SendBudget`], with gone connections
//! handed to the [`Remover`] as they are found.
//!
//! Memory is bounded by the work, not by the audience: at most
//! [`READ_AHEAD_PAGES`] pages read ahead, plus at most `max_in_flight` sends
//! (each waiting, sending or backing off) per job, plus the connections
//! deferred so far, plus (in a merge of channels, see [`crate::store::channels`])
//! the other rows of those connections, removed with them if they are gone.
//!
//! Each connection ends in one of the states of
//! [`crate::job::keys::ConnectionState`]: delivered (2xx), gone (410, its row
//! removed), expired (its row certainly gone by age, removed without a
//! post), rejected (a 4xx about that connection alone), or deferred
//! (throttled past [`EngineSettings::throttle_deadline`], or 5xx and
//! timeouts past its attempts). All but deferred are final: deferred
//! connections are retried in further passes of the same job, and what is
//! still deferred then is in the [`RunSummary`] for the worker to continue.

mod audience;
mod delivery;
pub mod evidence;
mod progress;
mod receipts;
mod rechecks;
mod remover;
mod resume;
mod run;
mod settle;
pub mod summary;
mod tally;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::budget::SendBudget;
use crate::connection::Connection;
use crate::gateway::{Gateway, PostOutcome, Step};
use crate::job::Job;
use crate::runs::Checkpoint;
use crate::store::{ConnectionStore, Cursor, StoreError};
use crate::telemetry::Metrics;
pub use audience::READ_AHEAD_PAGES;
use evidence::{EndpointWatch, Standing, Verdict};
use rechecks::{RecheckDeps, Rechecks};
use run::{Checkpoints, Run, RunState};
pub use summary::{Deferred, KeyReceipts, MAX_FAILED_IDS, RunSummary};

/// A stream's run (see `runs::streams`): where its sends have got to, and
/// the value it sends now.
///
/// Where: after the furthest connection (in read order) whose post has
/// been answered, as a cursor a read in connection-id order can start
/// after (see [`Engine::reads_by_id`]); a newer update that claims the
/// stream starts there. Answers come nearly in order: the few before it
/// still in flight when a run stops get the stream's value on its next
/// round.
///
/// The value: a newer update handed to the run replaces the job's payload
/// from the next post on, so the run sweeps on with it without stopping
/// its read (a new read's first page would cost more than the 100 ms
/// between updates of a fast stream).
#[derive(Clone, Debug, Default)]
pub struct Frontier(Arc<Mutex<Place>>);

#[derive(Debug, Default)]
struct Place {
    furthest: Option<Cursor>,
    value: Option<bytes::Bytes>,
    /// The first connection of the audience's read sent `value`.
    first_sent: Option<crate::connection::ConnectionId>,
}

impl Frontier {
    pub fn get(&self) -> Option<Cursor> {
        lock(&self.0).furthest.clone()
    }

    /// Sends `value` instead of the job's payload from the next post on.
    pub fn replace(&self, value: bytes::Bytes) {
        let mut place = lock(&self.0);
        place.value = Some(value);
        place.first_sent = None;
    }

    /// The first connection of the audience's read that was sent the
    /// newest replacement: the connections read before it in this round
    /// got an older value (none: the replacement came after the read).
    pub fn first_sent(&self) -> Option<crate::connection::ConnectionId> {
        lock(&self.0).first_sent.clone()
    }

    /// The value to post now: the newest replacement, else `payload`;
    /// `to`, a connection of the audience's read, is noted as the first
    /// sent a replacement.
    fn value(
        &self,
        payload: &bytes::Bytes,
        to: Option<&crate::connection::ConnectionId>,
    ) -> bytes::Bytes {
        let mut place = lock(&self.0);
        let Some(value) = place.value.clone() else {
            return payload.clone();
        };
        if let (None, Some(to)) = (&place.first_sent, to) {
            place.first_sent = Some(to.clone());
        }
        value
    }

    fn answered(&self, segment: u32, id: &crate::connection::ConnectionId) {
        let furthest = &mut lock(&self.0).furthest;
        let further = match &*furthest {
            Some(Cursor {
                segment: at,
                position: Some(crate::store::Position::After { after }),
            }) => (segment, id) > (*at, after),
            _ => true,
        };
        if further {
            *furthest = Some(Cursor {
                segment,
                position: Some(crate::store::Position::After { after: id.clone() }),
            });
        }
    }
}

/// The value a run posts now (`to`: a connection of its audience's read):
/// its stream's newest, else its job's payload.
fn value_of(
    job: &Job,
    frontier: Option<&Frontier>,
    to: Option<&crate::connection::ConnectionId>,
) -> bytes::Bytes {
    frontier.map_or_else(|| job.payload.clone(), |f| f.value(&job.payload, to))
}

/// How the engine sends.
#[derive(Clone, Copy, Debug)]
pub struct EngineSettings {
    /// Retries of 5xx, timeouts and network errors, per connection (its
    /// attempts), and the delays between retries of 429s.
    pub send_backoff: Backoff,
    /// How long one connection's 429s are retried, from its first: a 429
    /// says the account is busy, not that the connection is bad, so it does
    /// not use up an attempt.
    pub throttle_deadline: Duration,
    /// Passes over the deferred connections after the pass over the
    /// audience.
    pub deferred_passes: u32,
    /// The wait before each of those passes, so a throttle's bucket refills
    /// and a failing endpoint recovers.
    pub pass_pause: Duration,
    /// Sends one job keeps going at once (the process-wide bound is the
    /// budget's; this bounds one job's memory).
    pub max_in_flight: usize,
    /// Parallel scan segments for whole-table audiences.
    pub scan_segments: u32,
    /// How often a running broadcast logs its progress and updates the
    /// progress gauges.
    pub progress_interval: Duration,
    /// How long after its start a connection may answer 410 because it is
    /// still connecting ([`crate::engine::evidence::CONNECT_WINDOW`] in
    /// production): a first 410 within it is rechecked, not removed.
    pub connect_window: Duration,
}

/// Why a broadcast stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    /// An answer that stops the job (see [`PostOutcome::meaning`]).
    #[error("{}", refusal(.0))]
    Refused(PostOutcome),
    #[error("reading the audience failed: {0}")]
    Audience(#[from] StoreError),
    #[error("interrupted by shutdown")]
    Interrupted,
    /// The endpoint answers like one that is not this table's.
    #[error("{0}")]
    Endpoint(Verdict),
    /// More connections deferred than one run lists
    /// ([`MAX_DEFERRED`]): an outage, not a few slow clients.
    #[error(
        "{deferred} connections deferred in one run (an outage of API Gateway or the account's \
         throttle): the broadcast continues later from its finished pages"
    )]
    Backlog { deferred: usize },
    /// Nothing delivered, and the endpoint has not proven itself: the job
    /// is not done, and its 410s are not evidence.
    #[error(
        "nothing was delivered: all {answers} posts answered {answer} and the endpoint has not \
         delivered a post lately, so {endpoint} may point at another API or stage, or have a \
         wrong base path; no row was removed"
    )]
    Unproven {
        answers: u64,
        answer: &'static str,
        endpoint: String,
    },
}

impl FanoutError {
    /// Whether running the job again cannot succeed (it belongs in the
    /// dead-letter queue).
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Refused(outcome) => {
                matches!(outcome.meaning().step, Step::StopJob { dead_letter: true })
            }
            // Configuration, which a retry does not change.
            Self::Audience(StoreError::NeedsConnectionIndex(_)) => true,
            Self::Audience(_)
            | Self::Interrupted
            | Self::Endpoint(_)
            | Self::Unproven { .. }
            | Self::Backlog { .. } => false,
        }
    }

    /// What the endpoint looked like, for a job it stopped: `misdirected`,
    /// `refusing` or `unproven`.
    pub fn endpoint_status(&self) -> Option<&'static str> {
        match self {
            Self::Endpoint(verdict) => Some(verdict.status()),
            Self::Unproven { .. } => Some("unproven"),
            _ => None,
        }
    }
}

/// How a job-stopping answer reads in logs and dead-letter reasons.
fn refusal(outcome: &PostOutcome) -> String {
    match outcome {
        PostOutcome::PayloadTooLarge => {
            "API Gateway refused the payload as too large (413)".to_owned()
        }
        // The detail carries the hint (gateway::status::forbidden).
        PostOutcome::Forbidden(detail) => format!("API Gateway answered 403 Forbidden ({detail})"),
        other => format!("API Gateway answered {other:?}"),
    }
}

/// Connections one run keeps deferred at most. Each is an id, a key and a
/// reason (about 200 bytes): 10,000 is 2 MB a job, and ten continuation
/// messages at most. More means an outage, and the run stops and continues
/// from its finished pages later instead of spilling its audience.
pub const MAX_DEFERRED: usize = 10_000;

/// The broadcast engine, shared by every job of the process.
pub struct Engine<S, G> {
    store: Arc<S>,
    gateway: Arc<G>,
    budget: Arc<SendBudget>,
    settings: EngineSettings,
    metrics: Arc<Metrics>,
    /// The process-wide judgement of the endpoint's answers.
    watch: Arc<EndpointWatch>,
    /// The process-wide queue of 410s to post to again.
    rechecks: Rechecks,
}

impl<S: ConnectionStore, G: Gateway> Engine<S, G> {
    pub fn new(
        store: Arc<S>,
        gateway: Arc<G>,
        budget: Arc<SendBudget>,
        settings: EngineSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let watch = Arc::new(EndpointWatch::new("the API Gateway endpoint"));
        let rechecks = Rechecks::spawn(RecheckDeps {
            store: store.clone(),
            gateway: gateway.clone(),
            budget: budget.clone(),
            watch: watch.clone(),
            metrics: metrics.clone(),
        });
        Self {
            store,
            gateway,
            budget,
            settings,
            metrics,
            watch,
            rechecks,
        }
    }

    /// Names the endpoint in the reasons its verdicts give (the binary
    /// passes its setting and value).
    pub fn with_endpoint(self, endpoint: impl Into<String>) -> Self {
        self.watch.name(endpoint);
        self
    }

    /// The endpoint's judgement, shared by every job.
    pub fn watch(&self) -> &Arc<EndpointWatch> {
        &self.watch
    }

    /// Rechecks waiting in the process's queue.
    pub fn rechecks_pending(&self) -> usize {
        self.rechecks.pending()
    }

    /// Ends the recheck queue as the process stops: the removals it
    /// decided complete, the rechecks still waiting are dropped.
    pub async fn finish_rechecks(&self) {
        self.rechecks.finish().await;
    }

    /// Runs one broadcast to its end, or until `stop` is cancelled. The
    /// report covers what was done either way.
    pub async fn run(
        &self,
        job: &Job,
        stop: &CancellationToken,
    ) -> (RunSummary, Result<(), FanoutError>) {
        self.run_checkpointed(job, stop, None, Vec::new()).await
    }

    /// [`run`](Self::run), publishing a [`Checkpoint`] to `checkpoints`
    /// each time a resume point moves (after a fully answered page), for a
    /// writer that stores it without holding up the sends; `carried` are
    /// the connections an earlier run's checkpoint had deferred, retried
    /// with this run's deferred ones.
    pub async fn run_checkpointed(
        &self,
        job: &Job,
        stop: &CancellationToken,
        checkpoints: Option<tokio::sync::watch::Sender<Checkpoint>>,
        carried: Vec<Connection>,
    ) -> (RunSummary, Result<(), FanoutError>) {
        self.run_tracked(job, stop, (checkpoints, None), carried)
            .await
    }

    /// [`run_checkpointed`](Self::run_checkpointed), keeping in `frontier`
    /// where its sends have got to, connection by connection (see
    /// [`Frontier`]).
    pub async fn run_tracked(
        &self,
        job: &Job,
        stop: &CancellationToken,
        (checkpoints, frontier): (
            Option<tokio::sync::watch::Sender<Checkpoint>>,
            Option<Frontier>,
        ),
        carried: Vec<Connection>,
    ) -> (RunSummary, Result<(), FanoutError>) {
        let started = Instant::now();
        let query = audience::query(job, self.settings.scan_segments);
        let pages = audience::pages(&self.store, job, &query);
        let (state, outstanding) =
            RunState::new(self.store.clone(), self.metrics.clone(), job, carried);
        let _ticker = progress::spawn(
            job,
            state.counts.clone(),
            state.share(job, &query),
            self.metrics.clone(),
            self.settings.progress_interval,
        );
        let run = Run {
            job,
            stop,
            frontier: frontier.as_ref(),
            state: &state,
            settler: self.settler(&state, job, frontier.as_ref()),
        };
        let (outstanding, passes, result) = self
            .sends(run, pages, outstanding, Checkpoints::new(checkpoints))
            .await;
        let backlogged = matches!(result, Err(FanoutError::Backlog { .. }));
        let report = state
            .finish(outstanding, passes, started, (backlogged, result.is_ok()))
            .await;
        let result = result.and_then(|()| self.proof(&report));
        (report, result)
    }

    /// The connections of `job`'s audience past `read_to` (where a stopped
    /// run's reading got to; empty: the whole audience), counted by reading
    /// on without sending: a broadcast stopped by its deadline or a cancel
    /// says how many it did not reach.
    pub async fn count_unread(&self, job: &Job, read_to: Vec<Cursor>) -> Result<u64, StoreError> {
        use futures::StreamExt;
        let mut rest = job.clone();
        if !read_to.is_empty() {
            rest.resume = Some(read_to);
        }
        let query = audience::query(&rest, self.settings.scan_segments);
        let mut pages = std::pin::pin!(audience::pages(&self.store, &rest, &query));
        let mut count = 0;
        while let Some(page) = pages.next().await {
            let page = page?;
            count += page
                .connections
                .iter()
                .filter(|c| !job.exclude.contains(&c.id))
                .count() as u64;
        }
        Ok(count)
    }

    /// Whether a run of `job` reads its audience in connection-id order, so
    /// that a [`Frontier`] names a place a read can start after.
    pub fn reads_by_id(&self, job: &Job) -> bool {
        matches!(job.target, crate::job::Target::Channel(_))
            && self.store.channel_order() == crate::store::ChannelOrder::ById
    }

    /// A run that delivered nothing while every answer was a 410 or a
    /// refusal is not done unless the endpoint has proven itself: a wrong
    /// endpoint answers every post that way.
    fn proof(&self, report: &RunSummary) -> Result<(), FanoutError> {
        let answered = report.gone + report.failed;
        if report.delivered > 0 || answered == 0 {
            return Ok(());
        }
        match self.watch.standing() {
            Standing::Proven => Ok(()),
            Standing::Suspect(verdict) => Err(FanoutError::Endpoint(verdict)),
            Standing::Unproven => Err(FanoutError::Unproven {
                answers: answered,
                answer: if report.failed == 0 {
                    "410"
                } else if report.gone == 0 {
                    "the same refusal"
                } else {
                    "410 or a refusal"
                },
                endpoint: self.watch.endpoint().to_owned(),
            }),
        }
    }
}

/// The progress lock is held for a counter update only; a poisoned lock
/// (a panic mid-update) still holds usable counts.
fn lock<T>(progress: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    progress
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests;
