//! Rechecks: 410s that are not evidence yet. A connection that may still
//! be connecting (its start unknown or within the connect window), or
//! whose endpoint has not proven itself, is posted to again once the window
//! has passed: a client that was connecting then gets the message, and only
//! a second 410 from a proven endpoint removes its row.
//!
//! One queue serves the whole process, so a recheck never holds a job's
//! slot. It is bounded in entries and in payload bytes: what does not fit
//! is left in the table (a row left, never a live one removed), and so is
//! what a crash or shutdown loses. Every recheck goes through the send
//! budget (the rate and the fleet share) like any other post.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::backoff::Backoff;
use crate::budget::SendBudget;
use crate::connection::{Connection, ConnectionState};
use crate::engine::evidence::{EndpointWatch, Standing};
use crate::engine::remover::{Outstanding, REMOVE_BACKOFF, Remover};
use crate::engine::tally::Tally;
use crate::gateway::{Gateway, Pace, PostOutcome, Step};
use crate::store::ConnectionStore;
use crate::telemetry::Metrics;

/// Rechecks waiting at once, process-wide. Each holds an id, a row key and
/// the other rows of that connection: about 200 bytes, so 20,000 is a few
/// MB.
pub const MAX_RECHECKS: usize = 20_000;

/// Distinct payload bytes the waiting rechecks may hold (a broadcast's
/// payload is shared by all its rechecks, so this bounds broadcasts, not
/// entries): 128 payloads of the largest size.
pub const MAX_RECHECK_BYTES: usize = 16 * 1024 * 1024;

/// Rechecks posting at once.
const IN_FLIGHT: usize = 32;

/// How a recheck that met a 5xx (or no answer) is tried again before its
/// row is left. A recheck is the last chance of a client that was
/// connecting, so it is as patient as a first send: with 5 % of posts
/// failing, three failures in a row come once in 8,000 rechecks, six once
/// in 64 million.
const RETRY: Backoff = Backoff {
    base: Duration::from_secs(1),
    max: Duration::from_secs(10),
    max_attempts: 6,
};

/// How a recheck that met a 429 is tried again. A 429 says nothing of the
/// connection, and the send budget slows down for it, so it does not use
/// up [`RETRY`]'s attempts: a throttle that outlasts a burst would
/// otherwise leave gone rows behind.
const THROTTLED_RETRY: Backoff = Backoff {
    base: Duration::from_secs(1),
    max: Duration::from_secs(10),
    max_attempts: 12,
};

/// The tries one recheck has had, by what stopped them.
#[derive(Clone, Copy, Debug)]
struct Tries {
    transient: u32,
    throttled: u32,
}

impl Tries {
    const FIRST: Self = Self {
        transient: 1,
        throttled: 1,
    };

    /// After a 429 (`throttled`) or another answer that decides nothing:
    /// the tries to go on with and the wait before, or `None` when the
    /// bound is reached.
    fn next(mut self, throttled: bool) -> Option<(Self, Duration)> {
        let (policy, tries) = if throttled {
            (THROTTLED_RETRY, &mut self.throttled)
        } else {
            (RETRY, &mut self.transient)
        };
        let wait = policy
            .allows_another(*tries)
            .then(|| policy.delay(*tries - 1))?;
        *tries += 1;
        Some((self, wait))
    }
}

/// One connection to post to again.
#[derive(Debug)]
pub struct Recheck {
    pub connection: Connection,
    /// Its other rows (a connection in several channels): removed with it.
    pub siblings: Vec<Connection>,
    pub payload: Bytes,
    /// When to post.
    pub after: Duration,
}

/// Where a broadcast's payloads are counted against [`MAX_RECHECK_BYTES`]:
/// by their buffer, so the rechecks of one broadcast count it once.
#[derive(Default)]
struct Held {
    entries: usize,
    bytes: usize,
    payloads: HashMap<usize, (usize, usize)>,
}

impl Held {
    fn admit(&mut self, payload: &Bytes) -> bool {
        let key = payload.as_ptr() as usize;
        let new = !self.payloads.contains_key(&key);
        if self.entries >= MAX_RECHECKS || (new && self.bytes + payload.len() > MAX_RECHECK_BYTES) {
            return false;
        }
        self.entries += 1;
        let slot = self.payloads.entry(key).or_insert((0, payload.len()));
        if new {
            self.bytes += payload.len();
        }
        slot.0 += 1;
        true
    }

    fn release(&mut self, payload: &Bytes) {
        let key = payload.as_ptr() as usize;
        self.entries = self.entries.saturating_sub(1);
        if let Some(slot) = self.payloads.get_mut(&key) {
            slot.0 -= 1;
            if slot.0 == 0 {
                self.bytes -= slot.1;
                self.payloads.remove(&key);
            }
        }
    }
}

/// The process's recheck queue; its task ends when this is dropped.
pub struct Rechecks {
    tx: mpsc::UnboundedSender<Recheck>,
    held: Arc<Mutex<Held>>,
    metrics: Arc<Metrics>,
    /// The rows the rechecks decided to remove, not removed yet.
    removing: Outstanding,
    task: Mutex<Option<JoinHandle<()>>>,
    stop: CancellationToken,
    /// Stops the task when the engine goes without [`Rechecks::finish`].
    _stop_on_drop: DropGuard,
}

/// What the recheck task posts with.
pub struct RecheckDeps<S, G> {
    pub store: Arc<S>,
    pub gateway: Arc<G>,
    pub budget: Arc<SendBudget>,
    pub watch: Arc<EndpointWatch>,
    pub metrics: Arc<Metrics>,
}

impl Rechecks {
    /// Starts the task that posts each recheck when it is due.
    pub fn spawn<S: ConnectionStore, G: Gateway>(deps: RecheckDeps<S, G>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let held = Arc::new(Mutex::new(Held::default()));
        let stop = CancellationToken::new();
        let metrics = deps.metrics.clone();
        let counts = Arc::new(Tally::new(deps.metrics.clone()));
        let remover = Remover::spawn(deps.store.clone(), REMOVE_BACKOFF, counts.clone());
        let removing = remover.outstanding();
        let task = tokio::spawn(run(deps, rx, held.clone(), stop.clone(), remover, counts));
        Self {
            tx,
            held,
            metrics,
            removing,
            task: Mutex::new(Some(task)),
            stop: stop.clone(),
            _stop_on_drop: stop.drop_guard(),
        }
    }

    /// Queues a recheck; `false` if the queue is full (the row is left).
    pub fn push(&self, recheck: Recheck) -> bool {
        if !lock(&self.held).admit(&recheck.payload) {
            tracing::warn!(connection = %recheck.connection.id, "the recheck queue is full; a gone row is left in the table");
            return false;
        }
        Metrics::incr(&self.metrics.rechecks);
        if let Err(returned) = self.tx.send(recheck) {
            lock(&self.held).release(&returned.0.payload);
            return false;
        }
        true
    }

    /// Rechecks waiting or posting now, and the rows they decided to
    /// remove that are not removed (or given up on) yet.
    pub fn pending(&self) -> usize {
        lock(&self.held).entries + self.removing.get()
    }

    /// Stops taking rechecks and waits until the removals they decided are
    /// done or given up on (their own retries bound that). Rechecks still
    /// waiting for their window are dropped: their rows stay in the table.
    pub async fn finish(&self) {
        self.stop.cancel();
        let task = lock(&self.task).take();
        if let Some(task) = task
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "the recheck task failed; gone rows may remain");
        }
    }
}

fn lock<T>(held: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    held.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one recheck came to. The first two carry the payload, to release
/// its share of [`MAX_RECHECK_BYTES`].
enum Verdict {
    Done(Bytes),
    Remove(Vec<Connection>, Bytes),
    /// Post again after the wait.
    Again(Recheck, Tries, Duration),
}

async fn run<S: ConnectionStore, G: Gateway>(
    deps: RecheckDeps<S, G>,
    mut rx: mpsc::UnboundedReceiver<Recheck>,
    held: Arc<Mutex<Held>>,
    stop: CancellationToken,
    remover: Remover,
    counts: Arc<Tally>,
) {
    let mut due: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut waiting: HashMap<u64, (Recheck, Tries)> = HashMap::new();
    let mut seq = 0u64;
    let mut posting = FuturesUnordered::new();
    loop {
        let next = due.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            () = stop.cancelled() => break,
            received = rx.recv() => {
                let Some(recheck) = received else { break };
                seq += 1;
                due.push(Reverse((Instant::now() + recheck.after, seq)));
                waiting.insert(seq, (recheck, Tries::FIRST));
            }
            () = sleep_until(next), if next.is_some() && posting.len() < IN_FLIGHT => {
                while posting.len() < IN_FLIGHT
                    && let Some(Reverse((at, key))) = due.peek().copied()
                    && at <= Instant::now()
                {
                    due.pop();
                    if let Some((recheck, tries)) = waiting.remove(&key) {
                        posting.push(post_again(&deps, &counts, recheck, tries));
                    }
                }
            }
            Some(verdict) = posting.next(), if !posting.is_empty() => match verdict {
                Verdict::Done(payload) => lock(&held).release(&payload),
                Verdict::Remove(rows, payload) => {
                    // Queued before the entry is released, so that
                    // `pending` never reads none in between.
                    for row in rows {
                        remover.remove(row).await;
                    }
                    lock(&held).release(&payload);
                }
                Verdict::Again(recheck, tries, wait) => {
                    seq += 1;
                    due.push(Reverse((Instant::now() + wait, seq)));
                    waiting.insert(seq, (recheck, tries));
                    continue;
                }
            },
        }
    }
    let left = waiting.len() + posting.len();
    if left > 0 {
        tracing::warn!(
            rechecks = left,
            "rechecks not done at shutdown; their rows are left in the table"
        );
    }
    drop(posting);
    remover.finish().await;
}

/// Sleeps until `at`, or forever without one (the branch is off then).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn post_again<S: ConnectionStore, G: Gateway>(
    deps: &RecheckDeps<S, G>,
    counts: &Tally,
    recheck: Recheck,
    tries: Tries,
) -> Verdict {
    if deps.watch.gate().is_err() {
        return done(deps, recheck, "the endpoint looks wrong");
    }
    let (outcome, sent) = {
        let _slot = deps.budget.acquire_counted(&deps.metrics).await;
        let sent = std::time::Instant::now();
        let outcome = deps
            .gateway
            .post(&recheck.connection.id, recheck.payload.clone())
            .await;
        (outcome, sent)
    };
    Metrics::incr(&deps.metrics.posts);
    deps.watch.record(&outcome);
    let meaning = outcome.meaning();
    match meaning.pace {
        Pace::Throttled => {
            deps.budget.throttled(sent, 1);
        }
        Pace::Accepted => deps.budget.succeeded(),
        Pace::NoSignal => deps.budget.passed(),
    }
    if let Some(counter) = meaning.counter {
        counts.answer(counter);
    }
    match meaning.step {
        Step::Final(ConnectionState::Delivered) => {
            Metrics::incr(&deps.metrics.recheck_delivered);
            tracing::debug!(connection = %recheck.connection.id, "a connection that answered 410 took the message on its recheck");
            Verdict::Done(recheck.payload)
        }
        Step::Final(ConnectionState::Gone) if deps.watch.standing() == Standing::Proven => {
            let mut rows = vec![recheck.connection];
            rows.extend(recheck.siblings);
            Verdict::Remove(rows, recheck.payload)
        }
        step @ (Step::RetryThrottled | Step::RetryTransient) => {
            match tries.next(matches!(step, Step::RetryThrottled)) {
                Some((tries, wait)) => Verdict::Again(recheck, tries, wait),
                None => done(deps, recheck, outcome_text(&outcome)),
            }
        }
        _ => done(deps, recheck, outcome_text(&outcome)),
    }
}

fn outcome_text(outcome: &PostOutcome) -> &'static str {
    match outcome {
        PostOutcome::Gone => "a second 410 from an endpoint not proven",
        _ => "no answer that decides",
    }
}

/// A recheck that ends with its row left in the table.
fn done<S, G>(deps: &RecheckDeps<S, G>, recheck: Recheck, why: &str) -> Verdict {
    Metrics::incr(&deps.metrics.gone_kept);
    tracing::debug!(connection = %recheck.connection.id, why, "a recheck left its row");
    Verdict::Done(recheck.payload)
}
