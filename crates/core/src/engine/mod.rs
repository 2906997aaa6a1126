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
//! still deferred then is in the [`Report`] for the worker to continue.

mod counts;
pub mod evidence;
mod live;
mod progress;
mod rechecks;
mod remover;
pub mod summary;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt, TryStreamExt, stream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::backoff::Backoff;
use crate::budget::SendBudget;
use crate::connection::expiry::{AgeProblems, epoch_ms};
use crate::connection::{Connection, ConnectionId};
use crate::gateway::{Gateway, Pace, PostOutcome, Step};
use crate::job::{Job, Target};
use crate::runs::{Checkpoint, MAX_CHECKPOINT_DEFERRED};
use crate::store::{AudienceQuery, ConnectionStore, Cursor, Page, StoreError};
use crate::telemetry::Metrics;
use counts::JobCounts;
use evidence::{EndpointWatch, GoneEvidence, Standing, Verdict, judge_gone};
use live::Share;
use progress::Progress;
use rechecks::{Recheck, RecheckDeps, Rechecks};
use remover::{REMOVE_BACKOFF, Remover};
pub use summary::{Deferred, MAX_FAILED_IDS, Report};

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

/// What happened to one connection.
enum Delivery {
    Delivered,
    Gone(Connection),
    Rejected(ConnectionId),
    Deferred(Deferred),
    /// The whole job must stop.
    Abort(FanoutError),
}

/// The connections at most one deferred-audience page holds.
const DEFERRED_PAGE: usize = 1000;

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

    /// Runs one broadcast to its end, or until `stop` is cancelled. The
    /// report covers what was done either way.
    pub async fn run(
        &self,
        job: &Job,
        stop: &CancellationToken,
    ) -> (Report, Result<(), FanoutError>) {
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
    ) -> (Report, Result<(), FanoutError>) {
        let mut published = 0u64;
        let started = Instant::now();
        let query = match &job.target {
            Target::All => match job.segment {
                Some(share) => AudienceQuery::Segment {
                    index: share.index,
                    total: share.total,
                },
                None => AudienceQuery::All {
                    segments: self.settings.scan_segments,
                },
            },
            Target::Channel(channel) => AudienceQuery::Channel(channel.clone()),
            Target::Audience { name, value } => AudienceQuery::Audience {
                name: name.clone(),
                value: value.clone(),
            },
            Target::Connections(ids) => AudienceQuery::Explicit(ids.clone()),
            Target::Deferred(_) | Target::Channels(_) => AudienceQuery::Explicit(Vec::new()),
        };
        let pages = match &job.target {
            Target::Deferred(connections) => deferred_pages(connections, job.resume.as_deref()),
            Target::Channels(channels) => {
                crate::store::channels::pages(&*self.store, channels, job.resume.clone())
            }
            _ => self.store.pages(&query, job.resume.clone()),
        };
        let siblings = Siblings::default();
        let counts = Arc::new(JobCounts::new(self.metrics.clone()));
        let remover = Remover::spawn(self.store.clone(), REMOVE_BACKOFF, counts.clone());
        let held = Held::default();
        let settler = Settler {
            remover: &remover,
            siblings: &siblings,
            counts: &counts,
            watch: &self.watch,
            rechecks: &self.rechecks,
            held: &held,
            payload: &job.payload,
            window: self.settings.connect_window,
        };
        let excluded = AtomicU64::new(0);
        // Counted as pages are taken up, not from the outcomes: an
        // interrupted job has sends whose outcome never came.
        let audience = AtomicU64::new(0);
        let age_problems = Mutex::new(AgeProblems::default());

        let mut report = Report::default();
        audience.fetch_add(carried.len() as u64, Ordering::Relaxed);
        let mut deferred: Vec<Deferred> = carried
            .into_iter()
            .map(|connection| Deferred {
                connection,
                reason: "deferred before its run was taken over".to_owned(),
            })
            .collect();
        let mut rejected: Vec<ConnectionId> = Vec::new();
        // The block owns the send stream: leaving it drops the sends still in
        // flight, whose outcome is then unknown, which is why an interrupted
        // job is handed back, not deleted.
        let progress = Arc::new(Mutex::new(Progress::starting_from(
            job.resume.as_deref().unwrap_or_default(),
        )));
        // Connections with an answer in this run, for the share of an
        // explicit list that is done.
        let answers = Arc::new(AtomicU64::new(0));
        let share = match (&job.target, &query, &job.resume) {
            // A resumed run starts part-way: its own answers are no share
            // of the whole.
            (_, _, Some(_)) => Share::Unknown,
            (Target::Connections(ids), _, _) => Share::Listed {
                answers: answers.clone(),
                total: ids.len() as u64,
            },
            (Target::Deferred(connections), _, _) => Share::Listed {
                answers: answers.clone(),
                total: connections.len() as u64,
            },
            (Target::All, AudienceQuery::All { segments }, _) if *segments > 1 => Share::Segments {
                progress: progress.clone(),
                total: *segments,
            },
            _ => Share::Unknown,
        };
        let _ticker = live::spawn(
            job,
            counts.clone(),
            share,
            self.metrics.clone(),
            self.settings.progress_interval,
        );
        // Woken at every answer, for the pages waiting on `may_start`.
        let answered = tokio::sync::Notify::new();
        let result = {
            let deliveries = read_ahead(pages)
                .map_ok(|page| {
                    // An excluded connection is not sent to, so its other
                    // rows would never be settled.
                    siblings.add(
                        page.duplicates
                            .into_iter()
                            .filter(|c| !job.exclude.contains(&c.id))
                            .collect(),
                    );
                    let total = page.connections.len() + page.expired.len();
                    let kept: Vec<Connection> = page
                        .connections
                        .into_iter()
                        .filter(|c| !job.exclude.contains(&c.id))
                        .collect();
                    // An excluded row is left alone, expired or not: the
                    // job said not to touch it.
                    let expired: Vec<_> = page
                        .expired
                        .into_iter()
                        .filter(|e| !job.exclude.contains(&e.connection.id))
                        .collect();
                    let read = kept.len() + expired.len();
                    excluded.fetch_add((total - read) as u64, Ordering::Relaxed);
                    audience.fetch_add(read as u64, Ordering::Relaxed);
                    counts.expired(expired.len() as u64);
                    lock(&age_problems).merge(&page.age_problems);
                    let tag = lock(&progress).start_page(kept.len(), page.next);
                    let progress = &progress;
                    let answered = &answered;
                    let remover = &remover;
                    stream::once(async move {
                        // Final once queued: the remover deletes them
                        // whatever stops the job.
                        for row in expired {
                            remover.remove_expired(row).await;
                        }
                        // Bounds how far the sends run ahead of the resume
                        // point; see `Progress::may_start`.
                        loop {
                            let notified = answered.notified();
                            if lock(progress).may_start(tag) {
                                break;
                            }
                            notified.await;
                        }
                        stream::iter(kept).map(move |c| Ok((tag, c)))
                    })
                    .flatten()
                })
                .try_flatten()
                .map_ok(|(tag, c)| {
                    let id = c.id.clone();
                    self.deliver(c, job.payload.clone(), &counts, Pass::Audience)
                        .map(move |delivery| Ok((tag, id, delivery)))
                })
                .try_buffer_unordered(self.settings.max_in_flight);
            let mut deliveries = std::pin::pin!(deliveries);
            loop {
                let next = tokio::select! {
                    biased;
                    () = stop.cancelled() => break Err(FanoutError::Interrupted),
                    next = deliveries.next() => next,
                };
                let (tag, id, delivery) = match next {
                    None => break Ok(()),
                    Some(Err(e)) => break Err(FanoutError::Audience(e)),
                    Some(Ok(done)) => done,
                };
                // A page with a deferred connection is not finished: an
                // interrupted job resumes before it, and so never skips it.
                let finished = !matches!(delivery, Delivery::Deferred(_));
                answers.fetch_add(1, Ordering::Relaxed);
                let settled = settler
                    .settle((&mut deferred, &mut rejected), id, delivery)
                    .await;
                if let Err(e) = settled {
                    break Err(e);
                }
                // Past the bound, the pages after the deferred ones are
                // continued later instead of listing ever more connections.
                if deferred.len() > MAX_DEFERRED {
                    break Err(FanoutError::Backlog {
                        deferred: deferred.len(),
                    });
                }
                {
                    let mut progress = lock(&progress);
                    progress.answer(tag, finished);
                    if let Some(checkpoints) = &checkpoints
                        && progress.moves() != published
                    {
                        published = progress.moves();
                        checkpoints.send_replace(checkpoint_of(&progress, &deferred));
                    }
                }
                answered.notify_waiters();
            }
        };
        if let (Ok(()), Some(checkpoints)) = (&result, &checkpoints) {
            // Every page answered: only the deferred connections are left.
            checkpoints.send_replace(checkpoint_of(&lock(&progress), &deferred));
        }
        let result = match result {
            Ok(()) => {
                self.passes(
                    job,
                    stop,
                    settler,
                    &mut report,
                    (&mut deferred, &mut rejected),
                )
                .await
            }
            Err(e) => Err(e),
        };
        // Gone connections found so far are gone whatever stopped the job.
        settler.release_held(self.watch.standing()).await;
        remover.finish().await;

        report.excluded = excluded.load(Ordering::Relaxed);
        counts.report(&mut report);
        report.audience = audience.load(Ordering::Relaxed);
        report.age_problems = std::mem::take(&mut *lock(&age_problems));
        report.deferred = deferred;
        report.rejected = rejected;
        report.duration = started.elapsed();
        report.resume = lock(&progress).resume_points();
        if matches!(result, Err(FanoutError::Backlog { .. })) {
            // Continued from the resume points, which come before every
            // page with a deferred connection.
            report.deferred.clear();
        }
        let result = result.and_then(|()| self.proof(&report));
        (report, result)
    }

    /// A run that delivered nothing while every answer was a 410 or a
    /// refusal is not done unless the endpoint has proven itself: a wrong
    /// endpoint answers every post that way.
    fn proof(&self, report: &Report) -> Result<(), FanoutError> {
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

    /// Retries the deferred connections, pass after pass, until none is
    /// left or the passes are spent.
    async fn passes(
        &self,
        job: &Job,
        stop: &CancellationToken,
        settler: Settler<'_>,
        report: &mut Report,
        (deferred, rejected): (&mut Vec<Deferred>, &mut Vec<ConnectionId>),
    ) -> Result<(), FanoutError> {
        let counts = settler.counts;
        while !deferred.is_empty() && report.passes < self.settings.deferred_passes {
            tokio::select! {
                biased;
                () = stop.cancelled() => return Err(FanoutError::Interrupted),
                () = tokio::time::sleep(self.settings.pass_pause) => {}
            }
            report.passes += 1;
            tracing::info!(
                job_id = %job.id,
                pass = report.passes,
                deferred = deferred.len(),
                "retrying deferred connections"
            );
            let batch = std::mem::take(deferred);
            let sends = stream::iter(batch)
                .map(|d| {
                    let id = d.connection.id.clone();
                    self.deliver(d.connection, job.payload.clone(), counts, Pass::Deferred)
                        .map(move |delivery| (id, delivery))
                })
                .buffer_unordered(self.settings.max_in_flight);
            let mut sends = std::pin::pin!(sends);
            loop {
                let (id, delivery) = tokio::select! {
                    biased;
                    () = stop.cancelled() => return Err(FanoutError::Interrupted),
                    next = sends.next() => match next {
                        Some(done) => done,
                        None => break,
                    },
                };
                settler
                    .settle((&mut *deferred, &mut *rejected), id, delivery)
                    .await?;
            }
        }
        Ok(())
    }

    /// Sends to one connection, retrying what may succeed later: 5xx and
    /// timeouts up to its attempts, 429s until the throttle deadline.
    ///
    /// In the pass over the audience, a run of 429s that the budget finds to
    /// be that one client's (its buffer is full, the others succeed) defers
    /// it to the passes at once: waiting out its deadline there would hold
    /// its page unanswered, and with it the sends of the page two after
    /// (see [`Progress::may_start`]).
    async fn deliver(
        &self,
        connection: Connection,
        payload: Bytes,
        counts: &JobCounts,
        pass: Pass,
    ) -> Delivery {
        // A row's id outside API Gateway's alphabet cannot be a connection,
        // and posting it (`.`, `..`) would name another resource: rejected
        // without a post, so one bad row cannot stop a broadcast.
        if let Err(bad) = crate::connection::check_id(connection.id.as_str()) {
            tracing::warn!(connection = ?connection.id, reason = %bad, "not a connection id; rejected without a post");
            counts.answer(crate::gateway::Counter::Failed);
            return Delivery::Rejected(connection.id);
        }
        let backoff = self.settings.send_backoff;
        let mut attempt = 1;
        // 429s in a row, and when the first of them came.
        let mut streak = 0u32;
        let mut throttled_since: Option<Instant> = None;
        let mut one_client = false;
        loop {
            // The quota is the account's: no post while the endpoint
            // answers like another API's.
            if let Err(verdict) = self.watch.gate() {
                return Delivery::Abort(FanoutError::Endpoint(verdict));
            }
            let (outcome, sent) = {
                let _slot = self.budget.acquire_counted(&self.metrics).await;
                let sent = Instant::now();
                (
                    self.gateway.post(&connection.id, payload.clone()).await,
                    sent,
                )
            };
            Metrics::incr(&self.metrics.posts);
            self.watch.record(&outcome);
            let meaning = outcome.meaning();
            match meaning.pace {
                Pace::Throttled => {
                    streak += 1;
                    one_client = self.budget.throttled(sent, streak);
                }
                Pace::Accepted => {
                    streak = 0;
                    self.budget.succeeded();
                }
                Pace::NoSignal => {
                    streak = 0;
                    self.budget.passed();
                }
            }
            if let Some(counter) = meaning.counter {
                counts.answer(counter);
            }
            let delay = match meaning.step {
                Step::Delivered => return Delivery::Delivered,
                Step::Gone => return Delivery::Gone(connection),
                Step::Rejected => {
                    let reason = outcome.detail().unwrap_or_default();
                    tracing::warn!(connection = %connection.id, %reason, "send rejected");
                    return Delivery::Rejected(connection.id);
                }
                Step::StopJob { .. } => return Delivery::Abort(FanoutError::Refused(outcome)),
                Step::RetryThrottled => {
                    if one_client && pass == Pass::Audience {
                        return deferred(
                            connection,
                            format!("throttled (429) {streak} times in a row, alone"),
                        );
                    }
                    let since = *throttled_since.get_or_insert_with(Instant::now);
                    let left = self
                        .settings
                        .throttle_deadline
                        .saturating_sub(since.elapsed());
                    if left.is_zero() {
                        return deferred(
                            connection,
                            format!(
                                "throttled (429) for {}",
                                humantime::format_duration(self.settings.throttle_deadline)
                            ),
                        );
                    }
                    backoff.delay(streak - 1).min(left)
                }
                Step::RetryTransient => {
                    if !backoff.allows_another(attempt) {
                        let reason = outcome.detail().unwrap_or_default().to_owned();
                        return deferred(connection, reason);
                    }
                    attempt += 1;
                    backoff.delay(attempt - 2)
                }
            };
            tokio::time::sleep(delay).await;
            counts.retry();
        }
    }
}

fn deferred(connection: Connection, reason: String) -> Delivery {
    tracing::debug!(connection = %connection.id, %reason, "send deferred");
    Delivery::Deferred(Deferred { connection, reason })
}

/// What a run settles its answers with.
#[derive(Clone, Copy)]
struct Settler<'a> {
    remover: &'a Remover,
    siblings: &'a Siblings,
    counts: &'a JobCounts,
    watch: &'a EndpointWatch,
    rechecks: &'a Rechecks,
    held: &'a Held,
    payload: &'a Bytes,
    window: Duration,
}

/// 410s of established connections that came before the endpoint proved
/// itself: removed once a 2xx proves it, else rechecked at the run's end.
#[derive(Default)]
struct Held {
    count: AtomicU64,
    rows: Mutex<Vec<(Connection, Vec<Connection>)>>,
}

/// Rows one run holds at most; past it, a 410 goes to the recheck queue.
const MAX_HELD: usize = 1000;

impl Settler<'_> {
    /// Acts on one connection's outcome: gone ones by the evidence their
    /// 410 gives (see [`crate::engine::evidence`]), with the other rows read for
    /// them; deferred ones kept for the next pass; the first rejected ones
    /// named for the report (the counts were taken where the answer came,
    /// in [`JobCounts`]).
    async fn settle(
        &self,
        (deferred, rejected): (&mut Vec<Deferred>, &mut Vec<ConnectionId>),
        id: ConnectionId,
        delivery: Delivery,
    ) -> Result<(), FanoutError> {
        match delivery {
            Delivery::Delivered => {
                self.siblings.take(&id);
                if self.held.count.load(Ordering::Relaxed) > 0 && self.watch.proven() {
                    self.release_held(Standing::Proven).await;
                }
            }
            Delivery::Rejected(rejected_id) => {
                self.siblings.take(&id);
                if rejected.len() < MAX_FAILED_IDS {
                    rejected.push(rejected_id);
                }
            }
            Delivery::Deferred(d) => deferred.push(d),
            Delivery::Gone(connection) => {
                let rows = self.siblings.take(&id);
                self.gone(connection, rows).await;
            }
            Delivery::Abort(e) => return Err(e),
        }
        Ok(())
    }

    async fn gone(&self, connection: Connection, rows: Vec<Connection>) {
        let now_ms = epoch_ms(SystemTime::now());
        let standing = self.watch.standing();
        match judge_gone(&connection, &standing, now_ms, self.window) {
            // Queued removals complete even if the job stops, so the page
            // may count as finished.
            GoneEvidence::Remove => self.remove(connection, rows).await,
            GoneEvidence::Hold => {
                let mut held = lock(&self.held.rows);
                if held.len() < MAX_HELD {
                    held.push((connection, rows));
                    self.held.count.store(held.len() as u64, Ordering::Relaxed);
                } else {
                    drop(held);
                    self.recheck(connection, rows, self.window);
                }
            }
            GoneEvidence::Recheck { after } => self.recheck(connection, rows, after),
            GoneEvidence::Keep => self.counts.kept(1),
        }
    }

    async fn remove(&self, connection: Connection, rows: Vec<Connection>) {
        self.remover.remove(connection).await;
        for row in rows {
            self.remover.remove(row).await;
        }
    }

    fn recheck(&self, connection: Connection, siblings: Vec<Connection>, after: Duration) {
        let queued = self.rechecks.push(Recheck {
            connection,
            siblings,
            payload: self.payload.clone(),
            after,
        });
        if queued {
            self.counts.rechecking(1);
        } else {
            self.counts.kept(1);
        }
    }

    /// Acts on the held rows as `standing` says: removed once proven,
    /// rechecked while unproven, kept while the endpoint looks wrong.
    async fn release_held(&self, standing: Standing) {
        let rows = std::mem::take(&mut *lock(&self.held.rows));
        self.held.count.store(0, Ordering::Relaxed);
        for (connection, siblings) in rows {
            match &standing {
                Standing::Proven => self.remove(connection, siblings).await,
                Standing::Unproven => self.recheck(connection, siblings, self.window),
                Standing::Suspect(_) => self.counts.kept(1),
            }
        }
    }
}

/// The other rows read for connections whose answer is not final yet (a
/// connection in several channels of a merge has one row per channel): a
/// gone connection's rows are all removed, a live one's all kept. Holds
/// entries for the sends in flight and the deferred connections only.
#[derive(Default)]
struct Siblings(Mutex<HashMap<ConnectionId, Vec<Connection>>>);

impl Siblings {
    fn add(&self, rows: Vec<Connection>) {
        if rows.is_empty() {
            return;
        }
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for row in rows {
            map.entry(row.id.clone()).or_default().push(row);
        }
    }

    /// The other rows of `id`, which has its final answer.
    fn take(&self, id: &ConnectionId) -> Vec<Connection> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return Vec::new();
        }
        map.remove(id).unwrap_or_default()
    }
}

/// What a run would resume from now: past every answered page with its
/// deferred connections listed, or, with too many to list, past finished
/// pages only.
fn checkpoint_of(progress: &Progress, deferred: &[Deferred]) -> Checkpoint {
    if deferred.len() <= MAX_CHECKPOINT_DEFERRED {
        Checkpoint {
            resume: progress.answered_points(),
            deferred: deferred
                .iter()
                .map(|d| crate::job::deferred_spec(&d.connection))
                .collect(),
        }
    } else {
        Checkpoint {
            resume: progress.resume_points(),
            deferred: Vec::new(),
        }
    }
}

/// A continuation's deferred connections as pages, resumed from an offset.
fn deferred_pages(
    connections: &[Connection],
    resume: Option<&[Cursor]>,
) -> BoxStream<'static, Result<Page, StoreError>> {
    use crate::store::Position;
    let start = match resume.and_then(|c| c.iter().find(|c| c.segment == 0)) {
        None => 0,
        Some(Cursor {
            position: Some(Position::Offset(n)),
            ..
        }) => *n,
        Some(_) => connections.len(),
    };
    let rest = connections.get(start..).unwrap_or_default().to_vec();
    let pages: Vec<Page> = rest
        .chunks(DEFERRED_PAGE)
        .enumerate()
        .map(|(n, chunk)| {
            Page::new(
                chunk.to_vec(),
                Cursor {
                    segment: 0,
                    position: Some(Position::Offset(
                        (start + (n + 1) * DEFERRED_PAGE).min(connections.len()),
                    )),
                },
            )
        })
        .collect();
    stream::iter(pages.into_iter().map(Ok)).boxed()
}

/// Pages read while earlier ones are being sent, beyond the one being sent.
pub const READ_AHEAD_PAGES: usize = 2;

/// The audience's pages, fetched by a task of their own up to
/// [`READ_AHEAD_PAGES`] ahead of the sends. Read as the sends ask for them,
/// every page boundary would stall the sends for a Scan call's round trip.
/// Dropping the stream stops the reading.
///
/// The stream ends only when the reading task ended the audience: if the
/// task panicked, its closed channel would look like the audience's end and
/// the job would be deleted with the rest unsent, so it ends in an error
/// instead, a passing failure the job is retried for.
fn read_ahead(
    mut pages: BoxStream<'static, Result<Page, StoreError>>,
) -> impl Stream<Item = Result<Page, StoreError>> {
    // The channel holds one page less than the read-ahead: the reading task
    // holds the next while it waits for room.
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD_PAGES - 1);
    let reader = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(page) = pages.next().await {
            if tx.send(page).await.is_err() {
                break;
            }
        }
    }));
    // Owned by the stream, so the reading ends with it.
    stream::unfold(Some((rx, reader)), |state| async move {
        let (mut rx, mut reader) = state?;
        if let Some(page) = rx.recv().await {
            return Some((page, Some((rx, reader))));
        }
        match (&mut reader).await {
            Ok(()) => None,
            Err(e) => Some((
                Err(StoreError::Unavailable(format!(
                    "the task reading the audience failed: {e}"
                ))),
                None,
            )),
        }
    })
}

/// The progress lock is held for a counter update only; a poisoned lock
/// (a panic mid-update) still holds usable counts.
fn lock<T>(progress: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    progress
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Which pass a send belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// The pass over the audience.
    Audience,
    /// A pass over the connections deferred so far.
    Deferred,
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::fakes::{FakeGateway, FakeTable, ids};

    fn engine(
        table: Arc<FakeTable>,
        gateway: Arc<FakeGateway>,
        max_in_flight: usize,
    ) -> Engine<Arc<FakeTable>, FakeGateway> {
        let settings = EngineSettings {
            send_backoff: Backoff {
                base: Duration::from_millis(1),
                max: Duration::from_millis(4),
                max_attempts: 4,
            },
            throttle_deadline: Duration::from_millis(50),
            deferred_passes: 2,
            pass_pause: Duration::from_millis(1),
            max_in_flight,
            scan_segments: 1,
            progress_interval: Duration::from_secs(3600),
            connect_window: crate::engine::evidence::CONNECT_WINDOW,
        };
        Engine::new(
            Arc::new(table),
            gateway,
            Arc::new(SendBudget::new(None, max_in_flight)),
            settings,
            Arc::new(Metrics::default()),
        )
    }

    fn job(target: Target) -> Job {
        Job {
            id: "job".into(),
            payload: Bytes::from_static(b"hello"),
            target,
            exclude: HashSet::new(),
            resume: None,
            segment: None,
            split: None,
            deferrals: 0,
            continuation: 0,
            part: 0,
        }
    }

    /// Runs `job` until `gateway` has delivered `count`, then asks it to stop,
    /// and returns what the run came to.
    async fn stop_after_deliveries(
        engine: &Engine<Arc<FakeTable>, FakeGateway>,
        job: &Job,
        gateway: &FakeGateway,
        count: usize,
    ) -> (Report, Result<(), FanoutError>) {
        let stop = CancellationToken::new();
        let run = engine.run(job, &stop);
        tokio::pin!(run);
        loop {
            tokio::select! {
                out = &mut run => break out,
                () = tokio::task::yield_now() => {
                    if gateway.delivered.lock().unwrap().len() >= count {
                        stop.cancel();
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn every_live_connection_gets_it_once_and_only_gone_rows_go() {
        let all = ids(1000);
        let table = Arc::new(FakeTable::with(&all, 100));
        let gone: HashSet<String> = all.iter().step_by(7).cloned().collect();
        let gateway = Arc::new(FakeGateway {
            gone: gone.clone(),
            ..FakeGateway::default()
        });
        let engine = engine(table.clone(), gateway.clone(), 32);
        let (report, result) = engine
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        result.expect("completes");

        let delivered = gateway.delivered.lock().unwrap();
        let unique: HashSet<_> = delivered.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(delivered.len(), unique.len(), "a duplicate delivery");
        assert_eq!(unique.len(), 1000 - gone.len());
        assert!(unique.is_disjoint(&gone));
        assert!(
            delivered
                .iter()
                .all(|(_, p)| p == &Bytes::from_static(b"hello"))
        );

        let left = table.remaining();
        assert!(left.is_disjoint(&gone), "a gone row stayed");
        assert_eq!(left, unique, "a live row was removed");
        assert_eq!(report.audience, 1000);
        assert_eq!(report.delivered as usize, unique.len());
        assert_eq!(report.gone as usize, gone.len());
        assert_eq!(report.removed as usize, gone.len());
        assert_eq!(report.failed, 0);
        assert!(gateway.peak.load(Ordering::SeqCst) <= 32);
    }

    #[tokio::test]
    async fn rows_certainly_gone_by_age_are_removed_without_a_post() {
        let all = ids(300);
        let expired: HashSet<String> = all.iter().take(100).cloned().collect();
        let rewritten: HashSet<String> = all.iter().take(5).cloned().collect();
        let table = Arc::new(FakeTable {
            expired: expired.clone(),
            rewritten: rewritten.clone(),
            ..FakeTable::with(&all, 64)
        });
        let gone: HashSet<String> = all.iter().skip(100).step_by(10).cloned().collect();
        let gateway = Arc::new(FakeGateway {
            gone: gone.clone(),
            ..FakeGateway::default()
        });
        let engine = engine(table.clone(), gateway.clone(), 16);
        let mut job = job(Target::All);
        let excluded = all[10].clone();
        job.exclude.insert(excluded.as_str().into());
        let (report, result) = engine.run(&job, &CancellationToken::new()).await;
        result.expect("completes");

        let posted: HashSet<String> = gateway.delivered_ids().into_iter().collect();
        assert!(posted.is_disjoint(&expired), "an expired row was posted to");
        assert_eq!(posted.len(), 200 - gone.len());
        let asked: HashSet<String> = table
            .expired_removals
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect();
        assert_eq!(
            asked.len(),
            99,
            "each expired row once, the excluded one left alone"
        );
        assert!(!asked.contains(&excluded));
        let left = table.remaining();
        // Kept: the rewritten rows, the excluded one, and every live row.
        let kept_expired: HashSet<String> = left.intersection(&expired).cloned().collect();
        let mut expect_kept = rewritten.clone();
        expect_kept.insert(excluded);
        assert_eq!(kept_expired, expect_kept);
        assert_eq!(report.audience, 299);
        assert_eq!(report.excluded, 1);
        assert_eq!(report.expired, 99);
        assert_eq!(report.gone as usize, gone.len());
        assert_eq!(report.removed as usize, gone.len() + 99 - rewritten.len());
        assert_eq!(Metrics::get(&engine.metrics.expired), 99);
    }

    #[tokio::test]
    async fn a_checkpoint_passes_pages_whose_open_connections_it_lists_and_a_taker_retries_them() {
        let all = ids(20);
        let table = Arc::new(FakeTable::with(&all, 5));
        let stuck = FakeGateway::default();
        stuck.script.lock().unwrap().insert(
            "conn-3".into(),
            vec![PostOutcome::Transient("HTTP 503".into()); 1000],
        );
        let engine = engine(table.clone(), Arc::new(stuck), 4);
        let (tx, rx) = tokio::sync::watch::channel(Checkpoint::default());
        let (report, result) = engine
            .run_checkpointed(
                &job(Target::All),
                &CancellationToken::new(),
                Some(tx),
                Vec::new(),
            )
            .await;
        result.expect("completes");
        assert!(
            report.resume.is_empty(),
            "the strict point stays before conn-3's page"
        );
        let checkpoint = rx.borrow().clone();
        assert_eq!(checkpoint.resume.len(), 1, "{checkpoint:?}");
        assert_ne!(checkpoint.resume, report.resume, "past every answered page");
        let listed: Vec<_> = checkpoint.deferred.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(listed, ["conn-3"]);

        // The task dies; the run that takes over starts from the checkpoint
        // and retries what it lists.
        let gateway = Arc::new(FakeGateway::default());
        let taker = super::tests::engine(table, gateway.clone(), 4);
        let mut resumed = job(Target::All);
        resumed.resume = Some(checkpoint.resume.clone());
        let carried = checkpoint
            .deferred
            .iter()
            .map(|d| Connection {
                id: d.id.as_str().into(),
                key: d.key.clone(),
                started_ms: None,
            })
            .collect();
        let (report, result) = taker
            .run_checkpointed(&resumed, &CancellationToken::new(), None, carried)
            .await;
        result.expect("completes");
        let delivered: Vec<_> = gateway.delivered_ids().into_iter().collect();
        assert_eq!(delivered, ["conn-3"], "only what the checkpoint left open");
        assert_eq!((report.audience, report.delivered), (1, 1));
    }

    #[tokio::test]
    async fn pages_are_read_ahead_of_the_sends_but_not_all_at_once() {
        let table = Arc::new(FakeTable::with(&ids(100), 10));
        let gateway = Arc::new(FakeGateway {
            stall: true,
            ..FakeGateway::default()
        });
        // Five sends of the first page hang: the engine cannot go on.
        let engine = engine(table.clone(), gateway, 5);
        let job = job(Target::All);
        let stop = CancellationToken::new();
        tokio::select! {
            _ = engine.run(&job, &stop) => panic!("a stalled broadcast ended"),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        assert_eq!(
            table.pages_read.load(Ordering::SeqCst),
            1 + READ_AHEAD_PAGES,
            "the page being sent and the read-ahead, no more"
        );
    }

    #[tokio::test]
    async fn throttles_and_5xx_are_retried_until_delivered() {
        let table = Arc::new(FakeTable::with(&ids(3), 10));
        let gateway = Arc::new(FakeGateway::default());
        gateway.script.lock().unwrap().extend([
            (
                "conn-0".to_owned(),
                vec![PostOutcome::Throttled, PostOutcome::Throttled],
            ),
            (
                "conn-1".to_owned(),
                vec![PostOutcome::Transient("500".into())],
            ),
        ]);
        let (report, result) = engine(table, gateway.clone(), 4)
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        result.expect("completes");
        assert_eq!(report.delivered, 3);
        assert_eq!(report.retries, 3);
        assert_eq!(report.throttled, 2);
        assert_eq!(gateway.delivered.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_connection_failing_past_its_attempts_is_deferred_then_delivered_in_a_later_pass() {
        let table = Arc::new(FakeTable::with(&ids(2), 10));
        let gateway = Arc::new(FakeGateway::default());
        // Four attempts in the first pass, one more in the second.
        gateway.script.lock().unwrap().insert(
            "conn-0".into(),
            vec![PostOutcome::Transient("503".into()); 5],
        );
        let (report, result) = engine(table.clone(), gateway.clone(), 4)
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        result.expect("completes");
        assert_eq!((report.delivered, report.failed), (2, 0));
        assert!(report.deferred.is_empty(), "{:?}", report.deferred);
        assert_eq!(report.passes, 1);
        assert_eq!(report.retries, 4);
        assert_eq!(report.audience, 2);
        assert_eq!(gateway.delivered.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn still_deferred_after_every_pass_is_reported_with_its_key_not_dropped() {
        let table = Arc::new(FakeTable::with(&ids(3), 10));
        let gateway = Arc::new(FakeGateway::default());
        gateway.script.lock().unwrap().insert(
            "conn-1".into(),
            vec![PostOutcome::Transient("503".into()); 100],
        );
        let (report, result) = engine(table.clone(), gateway, 4)
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        result.expect("the job completes; one connection is deferred");
        assert_eq!((report.delivered, report.failed), (2, 0));
        assert_eq!(report.passes, 2);
        assert_eq!(report.audience, 3);
        let [d] = &report.deferred[..] else {
            panic!("{:?}", report.deferred)
        };
        assert_eq!(d.connection.id.as_str(), "conn-1");
        assert!(d.connection.key.is_some(), "the row key travels with it");
        assert_eq!(d.reason, "503");
        assert!(
            table.remaining().contains("conn-1"),
            "a deferred connection is not removed"
        );
        assert!(
            report.resume.is_empty(),
            "the page holding it never counts as finished"
        );
    }

    #[tokio::test]
    async fn a_connection_in_several_channels_gets_it_once_and_all_its_rows_go_if_gone() {
        let mut table = FakeTable::with(&[], 2);
        let members = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        table.channels = [
            ("a".to_owned(), members(&["m1", "m2", "m3", "x"])),
            ("b".to_owned(), members(&["m2", "m4", "x"])),
            ("c".to_owned(), members(&["m1", "m4", "m5", "x"])),
        ]
        .into();
        table.channel_order = crate::store::ChannelOrder::ById;
        let table = Arc::new(table);
        let gateway = Arc::new(FakeGateway {
            gone: ["x".to_owned()].into(),
            ..FakeGateway::default()
        });
        let target = Target::Channels(vec!["a".into(), "b".into(), "c".into()]);
        let (report, result) = engine(table.clone(), gateway.clone(), 4)
            .run(&job(target), &CancellationToken::new())
            .await;
        result.expect("completes");
        let mut got: Vec<String> = gateway.delivered_ids().into_iter().collect();
        got.sort();
        assert_eq!(got, ["m1", "m2", "m3", "m4", "m5"], "each member once");
        assert_eq!((report.audience, report.gone), (6, 1), "{report:?}");
        assert_eq!(report.removed, 3, "x's three rows, one per channel");
        let removed_rows: usize = table.remove_calls.lock().unwrap().iter().sum();
        assert_eq!(removed_rows, 3);
    }

    #[tokio::test]
    async fn an_interrupted_merge_of_channels_continues_after_its_last_finished_page() {
        use crate::job::{Capabilities, parse};
        // Three overlapping channels of 60 ids each, in id order; pages of 10.
        let id = |n: usize| format!("m{n:03}");
        let mut table = FakeTable::with(&[], 10);
        table.channels = [
            ("a".to_owned(), (0..120).step_by(2).map(id).collect()),
            ("b".to_owned(), (0..180).step_by(3).map(id).collect()),
            ("c".to_owned(), (60..120).map(id).collect()),
        ]
        .into();
        table.channel_order = crate::store::ChannelOrder::ById;
        let table = Arc::new(table);
        let members: HashSet<String> = table.channels.values().flatten().cloned().collect();
        // m050 never answers: the merge stops behind it.
        let gateway = Arc::new(FakeGateway {
            stall_ids: ["m050".to_owned()].into(),
            ..FakeGateway::default()
        });
        let first = engine(table.clone(), gateway.clone(), 4);
        let target = Target::Channels(vec!["a".into(), "b".into(), "c".into()]);
        let (report, result) =
            stop_after_deliveries(&first, &job(target.clone()), &gateway, 40).await;
        assert!(matches!(result, Err(FanoutError::Interrupted)));
        let [cursor] = &report.resume[..] else {
            panic!("one cursor for the merge: {:?}", report.resume)
        };
        let Some(crate::store::Position::After { after }) = &cursor.position else {
            panic!("{cursor:?}")
        };
        assert!(after.as_str() < "m050", "{after}");

        // The continuation, as the worker puts it on the queue.
        let mut stopped = job(target);
        stopped.id = "j".into();
        let body = serde_json::to_string(&stopped.continuation(report.resume.clone())).unwrap();
        let caps = Capabilities {
            channels: true,
            audiences: Some(Vec::new()),
        };
        let next = parse(&body, "m", &caps).expect("the continuation parses");
        let second = Arc::new(FakeGateway::default());
        let (report, result) = engine(table, second.clone(), 4)
            .run(&next, &CancellationToken::new())
            .await;
        result.expect("completes");
        let before: Vec<String> = gateway.delivered_ids().into_iter().collect();
        let after_ids: Vec<String> = second.delivered_ids().into_iter().collect();
        assert_eq!(report.delivered as usize, after_ids.len());
        assert!(
            after_ids.iter().all(|id| id.as_str() > after.as_str()),
            "the continuation starts after {after}"
        );
        let unique: HashSet<&String> = after_ids.iter().collect();
        assert_eq!(
            unique.len(),
            after_ids.len(),
            "each id once in the continuation"
        );
        let union: HashSet<String> = before.into_iter().chain(after_ids).collect();
        assert_eq!(union, members, "nobody lost");
    }

    #[tokio::test]
    async fn a_live_connection_keeps_every_row_and_disjoint_channels_are_concatenated() {
        let mut table = FakeTable::with(&[], 10);
        table.channels = [
            ("a".to_owned(), vec!["a1".to_owned(), "gone".to_owned()]),
            ("b".to_owned(), vec!["b1".to_owned()]),
        ]
        .into();
        let table = Arc::new(table);
        let gateway = Arc::new(FakeGateway {
            gone: ["gone".to_owned()].into(),
            ..FakeGateway::default()
        });
        let target = Target::Channels(vec!["a".into(), "b".into()]);
        let (report, result) = engine(table.clone(), gateway.clone(), 4)
            .run(&job(target), &CancellationToken::new())
            .await;
        result.expect("completes");
        assert_eq!(
            (
                report.audience,
                report.delivered,
                report.gone,
                report.removed
            ),
            (3, 2, 1, 1)
        );
    }

    #[tokio::test]
    async fn a_named_audience_reads_its_index_only() {
        let mut table = FakeTable::with(&ids(20), 5);
        table.audiences.insert(
            "user".into(),
            [(
                "u-42".to_owned(),
                vec!["conn-3".to_owned(), "conn-9".to_owned()],
            )]
            .into(),
        );
        let table = Arc::new(table);
        let gateway = Arc::new(FakeGateway::default());
        let target = Target::Audience {
            name: "user".into(),
            value: "u-42".into(),
        };
        let (report, result) = engine(table, gateway.clone(), 4)
            .run(&job(target), &CancellationToken::new())
            .await;
        result.expect("completes");
        assert_eq!(report.delivered, 2);
        let mut got: Vec<String> = gateway.delivered_ids().into_iter().collect();
        got.sort();
        assert_eq!(got, ["conn-3", "conn-9"]);
    }

    #[tokio::test]
    async fn throttling_is_bounded_by_time_not_by_attempts() {
        let table = Arc::new(FakeTable::with(&ids(2), 10));
        let gateway = Arc::new(FakeGateway::default());
        // More 429s than the four attempts, well within the deadline.
        gateway
            .script
            .lock()
            .unwrap()
            .insert("conn-0".into(), vec![PostOutcome::Throttled; 8]);
        let mut engine = engine(table, gateway.clone(), 4);
        engine.settings.throttle_deadline = Duration::from_secs(30);
        let (report, result) = engine
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        result.expect("completes");
        assert_eq!(report.delivered, 2, "{report:?}");
        assert_eq!(report.passes, 0, "delivered in the first pass");
        assert_eq!(report.throttled, 8);
    }

    #[tokio::test]
    async fn one_connection_that_always_answers_429_is_deferred_and_the_rest_delivered() {
        use crate::budget::RateSettings;
        use std::num::NonZeroU32;
        let table = Arc::new(FakeTable::with(&ids(200), 50));
        let gateway = Arc::new(FakeGateway::default());
        gateway
            .script
            .lock()
            .unwrap()
            .insert("conn-7".into(), vec![PostOutcome::Throttled; 100_000]);
        let mut engine = engine(table, gateway.clone(), 16);
        let budget = Arc::new(SendBudget::new(
            Some(RateSettings {
                per_second: NonZeroU32::new(1_000_000).unwrap(),
                burst: NonZeroU32::new(10_000).unwrap(),
                adaptive: true,
            }),
            16,
        ));
        engine.budget = budget.clone();
        let (report, result) = engine
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        result.expect("completes");
        assert_eq!(report.delivered, 199);
        let [d] = &report.deferred[..] else {
            panic!("{:?}", report.deferred)
        };
        assert_eq!(d.connection.id.as_str(), "conn-7");
        assert!(d.reason.starts_with("throttled (429) for"), "{}", d.reason);
        assert!(
            report.throttled > 4,
            "retried past its attempts: {}",
            report.throttled
        );
        assert_eq!(budget.answers(), (199, report.throttled));
    }

    #[tokio::test]
    async fn one_clients_run_of_429s_defers_it_at_once_from_the_pass_over_the_audience() {
        use crate::budget::{CLIENT_STREAK, RateSettings};
        use std::num::NonZeroU32;
        let table = Arc::new(FakeTable::with(&ids(200), 10));
        let gateway = Arc::new(FakeGateway::default());
        gateway
            .script
            .lock()
            .unwrap()
            .insert("conn-15".into(), vec![PostOutcome::Throttled; 100_000]);
        let mut engine = engine(table, gateway.clone(), 16);
        // Its deadline would hold page 2 unanswered, and page 4 behind it.
        engine.settings.throttle_deadline = Duration::from_secs(3600);
        engine.settings.deferred_passes = 0;
        engine.budget = Arc::new(SendBudget::new(
            Some(RateSettings {
                per_second: NonZeroU32::new(1_000_000).unwrap(),
                burst: NonZeroU32::new(10_000).unwrap(),
                adaptive: true,
            }),
            16,
        ));
        let (report, result) = engine
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        result.expect("completes");
        assert_eq!(report.delivered, 199);
        let [d] = &report.deferred[..] else {
            panic!("{:?}", report.deferred)
        };
        assert_eq!(d.connection.id.as_str(), "conn-15");
        assert!(d.reason.ends_with("alone"), "{}", d.reason);
        assert_eq!(report.throttled, u64::from(CLIENT_STREAK));
    }

    #[tokio::test]
    async fn only_answers_the_endpoint_took_count_as_accepted_for_the_rate() {
        use crate::budget::RateSettings;
        use std::num::NonZeroU32;
        let table = Arc::new(FakeTable::with(&ids(3), 10));
        let gateway = Arc::new(FakeGateway::default());
        gateway.script.lock().unwrap().extend([
            (
                "conn-0".to_owned(),
                vec![PostOutcome::Transient("500".into()); 3],
            ),
            (
                "conn-1".to_owned(),
                vec![PostOutcome::Rejected("400".into())],
            ),
        ]);
        let mut engine = engine(table, gateway, 4);
        let budget = Arc::new(SendBudget::new(
            Some(RateSettings {
                per_second: NonZeroU32::new(100_000).unwrap(),
                burst: NonZeroU32::new(1000).unwrap(),
                adaptive: true,
            }),
            4,
        ));
        engine.budget = budget.clone();
        let (_, result) = engine
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        result.expect("completes");
        // Three 500s were neither accepted nor throttled.
        assert_eq!(budget.answers(), (3, 0));
    }

    #[tokio::test]
    async fn a_deferred_audience_is_exactly_its_connections_from_its_offset() {
        use crate::store::Position;
        let table = Arc::new(FakeTable::with(&ids(10), 10));
        let gateway = Arc::new(FakeGateway {
            gone: ["conn-3".to_owned()].into(),
            ..FakeGateway::default()
        });
        let listed: Vec<Connection> = ["conn-2", "conn-3", "conn-4"]
            .into_iter()
            .map(|id| Connection {
                id: id.into(),
                key: Some(crate::connection::RowKey(vec![(
                    "connectionId".into(),
                    crate::connection::KeyValue::S(id.into()),
                )])),
                started_ms: None,
            })
            .collect();
        let mut j = job(Target::Deferred(listed));
        let (report, result) = engine(table.clone(), gateway.clone(), 4)
            .run(&j, &CancellationToken::new())
            .await;
        result.unwrap();
        // A listed connection's start is unknown: it may still be
        // connecting, so its first 410 is rechecked, not acted on.
        assert_eq!(
            (
                report.delivered,
                report.gone,
                report.removed,
                report.rechecking
            ),
            (2, 1, 0, 1)
        );
        assert!(
            table.remaining().contains("conn-3"),
            "kept until its recheck"
        );
        assert_eq!(table.pages_read.load(Ordering::SeqCst), 0, "no table read");
        j.resume = Some(vec![Cursor {
            segment: 0,
            position: Some(Position::Offset(2)),
        }]);
        let (report, _) = engine(table, gateway, 4)
            .run(&j, &CancellationToken::new())
            .await;
        assert_eq!(report.delivered, 1, "only conn-4 after the offset");
    }

    #[tokio::test]
    async fn forbidden_and_too_large_stop_the_job() {
        for (answer, permanent) in [
            (PostOutcome::Forbidden("no".into()), false),
            (PostOutcome::PayloadTooLarge, true),
        ] {
            let table = Arc::new(FakeTable::with(&ids(50), 10));
            let gateway = Arc::new(FakeGateway::default());
            gateway
                .script
                .lock()
                .unwrap()
                .insert("conn-0".into(), vec![answer]);
            let (report, result) = engine(table.clone(), gateway, 1)
                .run(&job(Target::All), &CancellationToken::new())
                .await;
            let err = result.expect_err("stops");
            assert_eq!(err.is_permanent(), permanent, "{err}");
            assert!(report.delivered < 50);
            assert_eq!(table.remaining().len(), 50, "nothing removed");
        }
    }

    #[tokio::test]
    async fn rejected_connections_fail_without_retry_or_removal() {
        let table = Arc::new(FakeTable::with(&ids(2), 10));
        let gateway = Arc::new(FakeGateway::default());
        gateway
            .script
            .lock()
            .unwrap()
            .insert("conn-1".into(), vec![PostOutcome::Rejected("400".into())]);
        let (report, result) = engine(table.clone(), gateway, 4)
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        result.unwrap();
        assert_eq!((report.delivered, report.failed, report.retries), (1, 1, 0));
        assert_eq!(report.rejected, [ConnectionId::new("conn-1")]);
        assert_eq!(table.remaining().len(), 2);
    }

    #[tokio::test]
    async fn the_report_names_the_first_rejected_connections_only() {
        let all = ids(MAX_FAILED_IDS + 20);
        let table = Arc::new(FakeTable::with(&all, 50));
        let gateway = Arc::new(FakeGateway::default());
        gateway.script.lock().unwrap().extend(
            all.iter()
                .map(|id| (id.clone(), vec![PostOutcome::Rejected("400".into())])),
        );
        let engine = engine(table, gateway, 8);
        // Proven by an earlier job: a run where every post is refused is
        // otherwise the sign of a wrong endpoint.
        engine.watch().record(&PostOutcome::Delivered);
        let (report, result) = engine
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        result.unwrap();
        assert_eq!(report.failed as usize, all.len());
        assert_eq!(report.rejected.len(), MAX_FAILED_IDS);
        let named: HashSet<_> = report.rejected.iter().map(|id| id.to_string()).collect();
        assert_eq!(named.len(), MAX_FAILED_IDS, "no id twice");
        assert!(named.iter().all(|id| all.contains(id)));
    }

    #[tokio::test]
    async fn excluded_and_explicit_audiences() {
        let table = Arc::new(FakeTable::with(&ids(10), 3));
        let gateway = Arc::new(FakeGateway::default());
        let mut j = job(Target::Connections(vec![
            "x".into(),
            "y".into(),
            "z".into(),
        ]));
        j.exclude.insert("y".into());
        let (report, result) = engine(table, gateway.clone(), 4)
            .run(&j, &CancellationToken::new())
            .await;
        result.unwrap();
        assert_eq!(
            (report.audience, report.excluded, report.delivered),
            (2, 1, 2)
        );
        let mut got: Vec<_> = gateway.delivered_ids().into_iter().collect();
        got.sort();
        assert_eq!(got, ["x", "z"]);
    }

    #[tokio::test]
    async fn an_audience_read_error_fails_the_job_transiently() {
        let mut table = FakeTable::with(&ids(100), 10);
        table.fail_after_pages = Some(3);
        let gateway = Arc::new(FakeGateway::default());
        let (report, result) = engine(Arc::new(table), gateway, 4)
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        let err = result.expect_err("fails");
        assert!(matches!(err, FanoutError::Audience(_)));
        assert!(!err.is_permanent());
        assert!(report.delivered <= 30);
    }

    #[tokio::test]
    async fn an_interrupted_broadcast_resumes_after_its_last_finished_page() {
        // Pages of 10; conn-25 never answers, so page 3 never finishes.
        let table = Arc::new(FakeTable::with(&ids(100), 10));
        let gateway = Arc::new(FakeGateway {
            stall_ids: ["conn-25".to_owned()].into(),
            ..FakeGateway::default()
        });
        let first = engine(table.clone(), gateway.clone(), 4);
        // Let it work until only the stuck send is left, then stop it.
        let (report, result) = stop_after_deliveries(&first, &job(Target::All), &gateway, 23).await;
        assert!(matches!(result, Err(FanoutError::Interrupted)));
        let resume = report.resume.clone();
        assert_eq!(
            resume,
            [Cursor {
                segment: 0,
                position: Some(crate::store::Position::Offset(20))
            }],
            "after pages 1 and 2, the last unbroken run of finished pages"
        );

        // The continuation starts at connection 20, not at 0.
        let gateway = Arc::new(FakeGateway::default());
        let mut again = job(Target::All);
        again.resume = Some(resume);
        let (report, result) = engine(table, gateway.clone(), 4)
            .run(&again, &CancellationToken::new())
            .await;
        result.unwrap();
        assert_eq!(report.delivered, 80);
        let delivered = gateway.delivered.lock().unwrap();
        assert!(
            delivered
                .iter()
                .all(|(id, _)| id.as_str() >= "conn-20" || id.len() > 7)
        );
        assert!(
            !delivered
                .iter()
                .any(|(id, _)| id == "conn-5" || id == "conn-19")
        );
    }

    #[tokio::test]
    async fn a_straggler_holds_the_sends_of_the_page_two_after_its_own() {
        // Pages of 10: conn-5 (page 1) answers only when released.
        let table = Arc::new(FakeTable::with(&ids(100), 10));
        let gateway = Arc::new(FakeGateway {
            held_ids: ["conn-5".to_owned()].into(),
            ..FakeGateway::default()
        });
        let engine = engine(table, gateway.clone(), 4);
        let everyone = job(Target::All);
        let stop = CancellationToken::new();
        let run = engine.run(&everyone, &stop);
        tokio::pin!(run);
        let page_of = |id: &str| id["conn-".len()..].parse::<usize>().unwrap() / 10 + 1;
        let pages_reached = |gateway: &FakeGateway| {
            let delivered = gateway.delivered.lock().unwrap();
            delivered.iter().map(|(id, _)| page_of(id)).max()
        };
        // Ample turns for every send that may go to go.
        for _ in 0..2_000 {
            tokio::select! {
                _ = &mut run => panic!("ended with conn-5 unanswered"),
                () = tokio::task::yield_now() => {}
            }
        }
        assert_eq!(
            gateway.delivered.lock().unwrap().len(),
            19,
            "pages 1 and 2 but the straggler"
        );
        assert_eq!(pages_reached(&gateway), Some(2), "page 3 waits for page 1");
        gateway.release();
        let (report, result) = run.await;
        result.expect("completes");
        assert_eq!(report.delivered, 100);
        assert_eq!(pages_reached(&gateway), Some(10));
    }

    #[tokio::test]
    async fn a_panic_of_the_page_reader_fails_the_job_transiently() {
        let mut table = FakeTable::with(&ids(100), 10);
        table.panic_after_pages = Some(3);
        let gateway = Arc::new(FakeGateway::default());
        let (report, result) = engine(Arc::new(table), gateway, 4)
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        let err = result.expect_err("the rest of the audience was never read");
        assert!(matches!(err, FanoutError::Audience(_)), "{err}");
        assert!(!err.is_permanent());
        assert!(report.delivered <= 30);
    }

    #[tokio::test]
    async fn an_interrupted_job_counts_the_sends_it_left_unfinished_in_its_audience() {
        let table = Arc::new(FakeTable::with(&ids(3), 10));
        let gateway = Arc::new(FakeGateway {
            stall_ids: ["conn-1".to_owned()].into(),
            ..FakeGateway::default()
        });
        let engine = engine(table, gateway.clone(), 4);
        let (report, result) = stop_after_deliveries(&engine, &job(Target::All), &gateway, 2).await;
        assert!(matches!(result, Err(FanoutError::Interrupted)));
        assert_eq!((report.delivered, report.failed, report.gone), (2, 0, 0));
        assert_eq!(
            report.audience, 3,
            "conn-1 was read and sent to, unanswered"
        );
    }

    #[tokio::test]
    async fn cancellation_interrupts() {
        let table = Arc::new(FakeTable::with(&ids(100), 10));
        let gateway = Arc::new(FakeGateway::default());
        let stop = CancellationToken::new();
        stop.cancel();
        let (_, result) = engine(table, gateway, 4)
            .run(&job(Target::All), &stop)
            .await;
        assert!(matches!(result, Err(FanoutError::Interrupted)));
    }

    /// The property: whatever the answers (410s, refusals, throttles, 5xx,
    /// 2xx, in any order per connection) and whatever a job lists and
    /// excludes, with or without a proven endpoint, no row is removed whose
    /// connection answered 2xx in the same run. Seeded, so a failure
    /// repeats.
    #[tokio::test(start_paused = true)]
    async fn no_answers_and_no_job_fields_remove_a_row_whose_connection_answered_2xx() {
        use rand::{Rng, SeedableRng};
        let answers = [
            PostOutcome::Delivered,
            PostOutcome::Gone,
            PostOutcome::Throttled,
            PostOutcome::Transient("503".into()),
            PostOutcome::Rejected("API Gateway answered HTTP 404 (x)".into()),
        ];
        for seed in 0..200u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let all = ids(rng.random_range(1..40));
            let table = Arc::new(FakeTable::with(&all, rng.random_range(1..8)));
            let gateway = Arc::new(FakeGateway::default());
            for id in &all {
                let script: Vec<PostOutcome> = (0..rng.random_range(0..4))
                    .map(|_| answers[rng.random_range(0..answers.len())].clone())
                    .collect();
                gateway.script.lock().unwrap().insert(id.clone(), script);
            }
            let target = match rng.random_range(0..3) {
                0 => Target::All,
                1 => Target::Connections(all.iter().map(|i| i.as_str().into()).collect()),
                _ => Target::Deferred(
                    all.iter()
                        .map(|id| Connection {
                            // A listed entry may carry any row's key.
                            key: Some(crate::connection::RowKey(vec![(
                                "connectionId".into(),
                                crate::connection::KeyValue::S(
                                    all[rng.random_range(0..all.len())].clone(),
                                ),
                            )])),
                            ..Connection::new(id.as_str(), None)
                        })
                        .collect(),
                ),
            };
            let mut j = job(target);
            if rng.random_bool(0.3) {
                j.exclude.insert(all[0].as_str().into());
            }
            let engine = engine(table.clone(), gateway.clone(), 4);
            if rng.random_bool(0.5) {
                engine.watch().record(&PostOutcome::Delivered);
            }
            let _ = engine.run(&j, &CancellationToken::new()).await;
            // Past the connect window: the rechecks have posted, and removed.
            tokio::time::sleep(crate::engine::evidence::CONNECT_WINDOW * 3).await;
            let delivered: HashSet<String> = gateway.delivered_ids().into_iter().collect();
            let left = table.remaining();
            for id in &delivered {
                assert!(
                    left.contains(id),
                    "seed {seed}: {id} answered 2xx and its row went"
                );
            }
        }
    }

    #[tokio::test]
    async fn an_outage_stops_the_run_past_its_deferred_bound_instead_of_listing_everyone() {
        let all = ids(MAX_DEFERRED + 5_000);
        let table = Arc::new(FakeTable::with(&all, 1000));
        let gateway = Arc::new(FakeGateway::default());
        gateway.script.lock().unwrap().extend(
            all.iter()
                .map(|id| (id.clone(), vec![PostOutcome::Transient("503".into()); 8])),
        );
        let (report, result) = engine(table, gateway, 64)
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        assert!(
            matches!(result, Err(FanoutError::Backlog { deferred }) if deferred == MAX_DEFERRED + 1),
            "{result:?}"
        );
        assert!(!result.as_ref().unwrap_err().is_permanent());
        assert!(
            report.deferred.is_empty(),
            "continued from its pages, not listed"
        );
        assert!(
            report.audience < all.len() as u64,
            "stopped before the end: {}",
            report.audience
        );
    }

    #[tokio::test]
    async fn a_row_whose_id_cannot_be_a_connection_is_rejected_without_a_post() {
        let mut all = ids(5);
        all.extend(["..".to_owned(), "a b".to_owned()]);
        let table = Arc::new(FakeTable::with(&all, 10));
        let gateway = Arc::new(FakeGateway::default());
        let (report, result) = engine(table.clone(), gateway.clone(), 4)
            .run(&job(Target::All), &CancellationToken::new())
            .await;
        result.unwrap();
        assert_eq!((report.delivered, report.failed), (5, 2), "{report:?}");
        let posted: HashSet<String> = gateway.delivered_ids().into_iter().collect();
        assert!(!posted.contains("..") && !posted.contains("a b"));
        assert_eq!(table.remaining().len(), 7, "rejected, not removed");
    }
}
