//! One run of a broadcast, as [`Engine::run_checkpointed`] reads it
//! top-down: the pass over the audience, page by page under the resume
//! bound; the passes over the deferred connections; the summary. The
//! [`RunState`] is what the sends share while it goes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{FutureExt, Stream, StreamExt, TryStreamExt, stream};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::delivery::{Delivery, Pass};
use super::progress::Share;
use super::receipts::Receipts;
use super::remover::{REMOVE_BACKOFF, Remover};
use super::resume::{PageTag, ResumePoints};
use super::settle::{Held, Outstanding, Settler, Siblings};
use super::tally::Tally;
use super::{Deferred, Engine, FanoutError, MAX_DEFERRED, RunSummary, lock};
use crate::connection::expiry::{AgeProblems, Expired};
use crate::connection::{Connection, ConnectionId};
use crate::gateway::Gateway;
use crate::job::{Job, Target};
use crate::runs::{Checkpoint, MAX_CHECKPOINT_DEFERRED};
use crate::store::{AudienceQuery, ConnectionStore, Page, StoreError};
use crate::telemetry::Metrics;

/// What the sends of one run share while it goes.
pub(super) struct RunState {
    pub counts: Arc<Tally>,
    remover: Remover,
    siblings: Siblings,
    held: Held,
    excluded: AtomicU64,
    /// Counted as pages are taken up, not from the outcomes: an
    /// interrupted job has sends whose outcome never came.
    audience: AtomicU64,
    age_problems: Mutex<AgeProblems>,
    progress: Arc<Mutex<ResumePoints>>,
    /// Connections with an answer in this run, for the share of an
    /// explicit list that is done.
    answers: Arc<AtomicU64>,
    /// Woken at every answer, for the pages waiting on `may_start`.
    answered: Notify,
    /// A `to` broadcast's keys: which were reached.
    receipts: Option<Receipts>,
}

/// One run's fixed parts, handed to each step.
#[derive(Clone, Copy)]
pub(super) struct Run<'a> {
    pub job: &'a Job,
    pub stop: &'a CancellationToken,
    /// Where the sends have got to, for a stream's newer update.
    pub frontier: Option<&'a super::Frontier>,
    pub state: &'a RunState,
    pub settler: Settler<'a>,
}

impl RunState {
    /// A run's state, with `carried` (connections an earlier run deferred)
    /// already in its audience and deferred.
    pub fn new<S: ConnectionStore>(
        store: Arc<S>,
        metrics: Arc<Metrics>,
        job: &Job,
        carried: Vec<Connection>,
    ) -> (Self, Outstanding) {
        let counts = Arc::new(Tally::new(metrics));
        let state = Self {
            remover: Remover::spawn(store, REMOVE_BACKOFF, counts.clone()),
            counts,
            siblings: Siblings::default(),
            held: Held::default(),
            excluded: AtomicU64::new(0),
            audience: AtomicU64::new(carried.len() as u64),
            age_problems: Mutex::new(AgeProblems::default()),
            progress: Arc::new(Mutex::new(ResumePoints::starting_from(
                job.resume.as_deref().unwrap_or_default(),
            ))),
            answers: Arc::new(AtomicU64::new(0)),
            answered: Notify::new(),
            receipts: Receipts::of(job),
        };
        let deferred = carried
            .into_iter()
            .map(|connection| Deferred {
                connection,
                reason: "deferred before its run was taken over".to_owned(),
            })
            .collect();
        let outstanding = Outstanding {
            deferred,
            rejected: Vec::new(),
        };
        (state, outstanding)
    }

    /// How the share of the audience that is done can be known.
    pub fn share(&self, job: &Job, query: &AudienceQuery) -> Share {
        match (&job.target, query, &job.resume) {
            // A resumed run starts part-way: its own answers are no share
            // of the whole.
            (_, _, Some(_)) => Share::Unknown,
            (Target::Connections(ids), _, _) => Share::Listed {
                answers: self.answers.clone(),
                total: ids.len() as u64,
            },
            (Target::Deferred(connections), _, _) => Share::Listed {
                answers: self.answers.clone(),
                total: connections.len() as u64,
            },
            (Target::All, AudienceQuery::All { segments }, _) if *segments > 1 => Share::Segments {
                progress: self.progress.clone(),
                total: *segments,
            },
            _ => Share::Unknown,
        }
    }

    /// Takes up one page: counts it, leaves out the excluded connections,
    /// and starts tracking it for the resume point.
    fn take_page(&self, job: &Job, page: Page) -> (PageTag, Vec<Connection>, Vec<Expired>) {
        // An excluded connection is not sent to, so its other rows would
        // never be settled.
        self.siblings.add(
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
        // An excluded row is left alone, expired or not: the job said not
        // to touch it.
        let expired: Vec<_> = page
            .expired
            .into_iter()
            .filter(|e| !job.exclude.contains(&e.connection.id))
            .collect();
        let read = kept.len() + expired.len();
        self.excluded
            .fetch_add((total - read) as u64, Ordering::Relaxed);
        self.audience.fetch_add(read as u64, Ordering::Relaxed);
        self.counts.expired(expired.len() as u64);
        lock(&self.age_problems).merge(&page.age_problems);
        let tag = lock(&self.progress).start_page(kept.len(), page.next);
        (tag, kept, expired)
    }

    /// Sends a page's expired rows to removal (final once queued: the
    /// remover deletes them whatever stops the job), then waits until the
    /// page may start, which bounds how far the sends run ahead of the
    /// resume point (see `ResumePoints::may_start`).
    async fn open_page(&self, tag: PageTag, expired: Vec<Expired>) {
        for row in expired {
            self.remover.remove_expired(row).await;
        }
        loop {
            let notified = self.answered.notified();
            if lock(&self.progress).may_start(tag) {
                break;
            }
            notified.await;
        }
    }

    /// The run's summary, once its sends are over. `read_all`: the pass
    /// over the audience and the deferred passes ended.
    pub async fn finish(
        self,
        outstanding: Outstanding,
        passes: u32,
        started: Instant,
        (backlogged, read_all): (bool, bool),
    ) -> RunSummary {
        self.remover.finish().await;
        let mut report = RunSummary {
            passes,
            excluded: self.excluded.load(Ordering::Relaxed),
            ..RunSummary::default()
        };
        self.counts.report(&mut report);
        report.audience = self.audience.load(Ordering::Relaxed);
        report.age_problems = std::mem::take(&mut *lock(&self.age_problems));
        report.deferred = outstanding.deferred;
        report.rejected = outstanding.rejected;
        report.duration = started.elapsed();
        report.resume = lock(&self.progress).resume_points();
        report.read_to = lock(&self.progress).read_points();
        report.receipts = self
            .receipts
            .as_ref()
            .map(|r| r.summary(&report.deferred, read_all, &report.resume));
        if backlogged {
            // Continued from the resume points, which come before every
            // page with a deferred connection.
            report.deferred.clear();
        }
        report
    }
}

/// Where a run publishes its resume point, for a writer that stores it
/// without holding up the sends.
pub(super) struct Checkpoints {
    sender: Option<watch::Sender<Checkpoint>>,
    published: u64,
}

impl Checkpoints {
    pub fn new(sender: Option<watch::Sender<Checkpoint>>) -> Self {
        Self {
            sender,
            published: 0,
        }
    }

    /// Publishes when the resume point moved since the last time.
    fn moved(
        &mut self,
        progress: &ResumePoints,
        deferred: &[Deferred],
        receipts: Option<&Receipts>,
    ) {
        if let Some(sender) = &self.sender
            && progress.moves() != self.published
        {
            self.published = progress.moves();
            sender.send_replace(checkpoint_of(progress, deferred, receipts));
        }
    }

    /// Every page answered: only the deferred connections are left.
    fn all_answered(&self, state: &RunState, deferred: &[Deferred]) {
        if let Some(sender) = &self.sender {
            let progress = lock(&state.progress);
            sender.send_replace(checkpoint_of(&progress, deferred, state.receipts.as_ref()));
        }
    }
}

/// What a run would resume from now: past every answered page with its
/// deferred connections listed, or, with too many to list, past finished
/// pages only; with the keys a `to` broadcast has reached.
fn checkpoint_of(
    progress: &ResumePoints,
    deferred: &[Deferred],
    receipts: Option<&Receipts>,
) -> Checkpoint {
    let reached = receipts.map(Receipts::reached).unwrap_or_default();
    if deferred.len() <= MAX_CHECKPOINT_DEFERRED {
        Checkpoint {
            resume: progress.answered_points(),
            deferred: deferred
                .iter()
                .map(|d| {
                    let mut spec = crate::job::deferred_spec(&d.connection);
                    spec.of = receipts.and_then(|r| r.key_of(&d.connection.id));
                    spec
                })
                .collect(),
            reached,
        }
    } else {
        Checkpoint {
            resume: progress.resume_points(),
            deferred: Vec::new(),
            reached,
        }
    }
}

impl<S: ConnectionStore, G: Gateway> Engine<S, G> {
    /// The settler of one run's answers.
    pub(super) fn settler<'a>(
        &'a self,
        state: &'a RunState,
        job: &'a Job,
        frontier: Option<&'a super::Frontier>,
    ) -> Settler<'a> {
        Settler {
            remover: &state.remover,
            siblings: &state.siblings,
            counts: &state.counts,
            watch: &self.watch,
            rechecks: &self.rechecks,
            held: &state.held,
            payload: &job.payload,
            frontier,
            window: self.settings.connect_window,
        }
    }

    /// The pass over the audience, then the passes over the deferred
    /// connections, then the release of the rows held for evidence.
    /// Returns what is left outstanding, the passes made, and how the run
    /// ended.
    pub(super) async fn sends(
        &self,
        run: Run<'_>,
        pages: impl Stream<Item = Result<Page, StoreError>>,
        mut outstanding: Outstanding,
        mut checkpoints: Checkpoints,
    ) -> (Outstanding, u32, Result<(), FanoutError>) {
        let mut passes = 0;
        let mut result = self
            .sweep(run, pages, &mut outstanding, &mut checkpoints)
            .await;
        if result.is_ok() {
            checkpoints.all_answered(run.state, &outstanding.deferred);
            result = self.passes(run, &mut outstanding, &mut passes).await;
        }
        // Gone connections found so far are gone whatever stopped the job.
        run.settler.release_held(self.watch.standing()).await;
        (outstanding, passes, result)
    }

    /// The pass over the audience: each page's connections sent to as the
    /// page may start, every answer settled as it comes.
    ///
    /// The stream of sends lives in this call: leaving it drops the sends
    /// still in flight, whose outcome is then unknown, which is why an
    /// interrupted job is handed back, not deleted.
    async fn sweep(
        &self,
        run: Run<'_>,
        pages: impl Stream<Item = Result<Page, StoreError>>,
        outstanding: &mut Outstanding,
        checkpoints: &mut Checkpoints,
    ) -> Result<(), FanoutError> {
        let Run {
            job,
            stop,
            state,
            frontier,
            ..
        } = run;
        let deliveries = pages
            .map_ok(|page| {
                let (tag, kept, expired) = state.take_page(job, page);
                stream::once(async move {
                    state.open_page(tag, expired).await;
                    stream::iter(kept).map(move |c| Ok((tag, c)))
                })
                .flatten()
            })
            .try_flatten()
            .map_ok(|(tag, c)| {
                let id = c.id.clone();
                let value = super::value_of(job, frontier, Some(&id));
                self.deliver(c, value, &state.counts, Pass::Audience)
                    .map(move |delivery| Ok((tag, id, delivery)))
            })
            .try_buffer_unordered(self.settings.max_in_flight);
        let mut deliveries = std::pin::pin!(deliveries);
        loop {
            let next = tokio::select! {
                biased;
                () = stop.cancelled() => return Err(FanoutError::Interrupted),
                next = deliveries.next() => next,
            };
            match next {
                None => return Ok(()),
                Some(Err(e)) => return Err(FanoutError::Audience(e)),
                Some(Ok(answer)) => self.answered(run, answer, outstanding, checkpoints).await?,
            }
        }
    }

    /// Settles one answer of the pass over the audience and moves the
    /// page's resume point.
    async fn answered(
        &self,
        run: Run<'_>,
        (tag, id, delivery): (PageTag, ConnectionId, Delivery),
        outstanding: &mut Outstanding,
        checkpoints: &mut Checkpoints,
    ) -> Result<(), FanoutError> {
        // A page with a deferred connection is not finished: an
        // interrupted job resumes before it, and so never skips it.
        let finished = !matches!(delivery, Delivery::Deferred(_));
        run.state.answers.fetch_add(1, Ordering::Relaxed);
        if let Some(frontier) = run.frontier {
            frontier.answered(tag.segment(), &id);
        }
        if let Some(receipts) = &run.state.receipts {
            receipts.answered(tag.segment(), &id, &delivery);
        }
        run.settler.settle(outstanding, id, delivery).await?;
        // Past the bound, the pages after the deferred ones are continued
        // later instead of listing ever more connections.
        if outstanding.deferred.len() > MAX_DEFERRED {
            return Err(FanoutError::Backlog {
                deferred: outstanding.deferred.len(),
            });
        }
        {
            let mut progress = lock(&run.state.progress);
            progress.answer(tag, finished);
            checkpoints.moved(
                &progress,
                &outstanding.deferred,
                run.state.receipts.as_ref(),
            );
        }
        run.state.answered.notify_waiters();
        Ok(())
    }

    /// Retries the deferred connections, pass after pass, until none is
    /// left or the passes are spent.
    async fn passes(
        &self,
        run: Run<'_>,
        outstanding: &mut Outstanding,
        passes: &mut u32,
    ) -> Result<(), FanoutError> {
        let Run {
            job,
            stop,
            state,
            settler,
            frontier,
        } = run;
        while !outstanding.deferred.is_empty() && *passes < self.settings.deferred_passes {
            tokio::select! {
                biased;
                () = stop.cancelled() => return Err(FanoutError::Interrupted),
                () = tokio::time::sleep(self.settings.pass_pause) => {}
            }
            *passes += 1;
            tracing::info!(
                job_id = %job.id,
                pass = *passes,
                deferred = outstanding.deferred.len(),
                "retrying deferred connections"
            );
            let batch = std::mem::take(&mut outstanding.deferred);
            let sends = stream::iter(batch)
                .map(|d| {
                    let id = d.connection.id.clone();
                    self.deliver(
                        d.connection,
                        super::value_of(job, frontier, None),
                        &state.counts,
                        Pass::Deferred,
                    )
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
                if let Some(receipts) = &state.receipts {
                    receipts.retried(&id, &delivery);
                }
                settler.settle(outstanding, id, delivery).await?;
            }
        }
        Ok(())
    }
}
