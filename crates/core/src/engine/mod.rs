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
mod tests;
