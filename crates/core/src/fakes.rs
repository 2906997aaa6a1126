//! Small in-process fakes behind the crate's seams: for this crate's unit
//! tests, and (feature `fakes`) for other crates' tests, examples and
//! benchmarks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream};

use crate::connection::expiry::Expired;
use crate::connection::{Connection, ConnectionId, KeyValue, RowKey};
use crate::fleet::{FleetError, Lease, LeaseTable};
use crate::gateway::{Gateway, PostOutcome};
use crate::queue::{DeadLettered, JobQueue, Message, QueueError, Receipt, SendOptions};
use crate::reports::{BroadcastReport, ReportError, ReportSink};
use crate::store::{
    AudienceQuery, ChannelOrder, ConnectionStore, Cursor, Page, Position, Removal, StoreError,
};

/// Engine settings for tests: delays of milliseconds, so retries and
/// passes over deferred connections take no noticeable time; 4 attempts,
/// 2 deferred passes, 50 ms of 429s per connection, the production
/// connect window.
pub fn engine_settings(max_in_flight: usize) -> crate::engine::EngineSettings {
    crate::engine::EngineSettings {
        send_backoff: crate::Backoff {
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
    }
}

pub fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("conn-{i}")).collect()
}

/// An in-memory table: rows are ids, pages of `page_size`.
pub struct FakeTable {
    pub rows: Mutex<Vec<String>>,
    pub channels: HashMap<String, Vec<String>>,
    /// How `channels` is laid out; with [`ChannelOrder::ById`] each list
    /// must be in id order, and a channel resumes after an id.
    pub channel_order: ChannelOrder,
    /// Named audiences: name → key value → ids.
    pub audiences: HashMap<String, HashMap<String, Vec<String>>>,
    pub page_size: usize,
    pub pages_read: AtomicUsize,
    pub fail_after_pages: Option<usize>,
    /// The page reader panics once this many pages were read.
    pub panic_after_pages: Option<usize>,
    /// The size of every removal call, in order.
    pub remove_calls: Mutex<Vec<usize>>,
    /// The next this many removal calls leave their last item unprocessed,
    /// as BatchWriteItem does under load.
    pub unprocessed_removals: AtomicUsize,
    /// Removal calls fail with a permanent error.
    pub reject_removals: bool,
    /// Gone connections read without a row key are skipped, as the
    /// DynamoDB store skips them on a table with a composite key.
    pub composite_key: bool,
    /// Rows the store reads as certainly gone by age (started at
    /// [`EXPIRED_START_MS`]).
    pub expired: HashSet<String>,
    /// Rows whose conditional delete finds them changed (kept).
    pub rewritten: HashSet<String>,
    /// The ids of the conditional deletes asked for, in order.
    pub expired_removals: Mutex<Vec<String>>,
}

/// The start [`FakeTable`] reads its expired rows with.
pub const EXPIRED_START_MS: i64 = 1_600_000_000_000;

impl FakeTable {
    pub fn with(ids: &[String], page_size: usize) -> Self {
        Self {
            rows: Mutex::new(ids.to_vec()),
            channels: HashMap::new(),
            channel_order: ChannelOrder::Disjoint,
            audiences: HashMap::new(),
            page_size,
            pages_read: AtomicUsize::new(0),
            fail_after_pages: None,
            panic_after_pages: None,
            remove_calls: Mutex::new(Vec::new()),
            unprocessed_removals: AtomicUsize::new(0),
            reject_removals: false,
            composite_key: false,
            expired: HashSet::new(),
            rewritten: HashSet::new(),
            expired_removals: Mutex::new(Vec::new()),
        }
    }

    pub fn remaining(&self) -> HashSet<String> {
        self.rows.lock().unwrap().iter().cloned().collect()
    }
}

/// The start [`FakeTable`] reads its rows with: long established (but not
/// certainly gone by age, which the fake decides by its `expired` set).
pub const ESTABLISHED_START_MS: i64 = 1_700_000_000_000;

fn keyed(id: &str) -> Connection {
    Connection {
        id: id.into(),
        key: Some(RowKey(vec![(
            "connectionId".into(),
            KeyValue::S(id.into()),
        )])),
        started_ms: Some(ESTABLISHED_START_MS),
    }
}

impl ConnectionStore for Arc<FakeTable> {
    fn pages(
        &self,
        audience: &AudienceQuery,
        from: Option<Vec<Cursor>>,
    ) -> BoxStream<'static, Result<Page, StoreError>> {
        // One segment: resume at its offset; a cursor without a position
        // means the segment is done.
        let mut after = None;
        let start = match from
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.segment == 0)
        {
            None => 0,
            Some(Cursor {
                position: Some(Position::Offset(n)),
                ..
            }) => n,
            Some(Cursor {
                position: Some(Position::After { after: id }),
                ..
            }) => {
                after = Some(id.to_string());
                0
            }
            Some(_) => usize::MAX,
        };
        let ids: Vec<String> = match audience {
            AudienceQuery::All { .. } => self.rows.lock().unwrap().clone(),
            AudienceQuery::Segment { index, total } => {
                let rows = self.rows.lock().unwrap();
                rows.iter()
                    .enumerate()
                    .filter(|(n, _)| *n as u32 % total == *index)
                    .map(|(_, id)| id.clone())
                    .collect()
            }
            AudienceQuery::Channel(c) => self.channels.get(c).cloned().unwrap_or_default(),
            AudienceQuery::Audience { name, value } => self
                .audiences
                .get(name)
                .and_then(|values| values.get(value))
                .cloned()
                .unwrap_or_default(),
            AudienceQuery::Explicit(ids) => ids.iter().map(|i| i.to_string()).collect(),
        };
        let mut ids = ids.get(start..).unwrap_or_default().to_vec();
        if let Some(after) = &after {
            ids.retain(|id| id > after);
        }
        let explicit = matches!(audience, AudienceQuery::Explicit(_));
        let table = self.clone();
        let page_size = self.page_size;
        let pages: Vec<_> = ids.chunks(page_size).map(|c| c.to_vec()).collect();
        let total = ids.len();
        stream::iter(pages.into_iter().enumerate().map(move |(n, chunk)| {
            let read = table.pages_read.fetch_add(1, Ordering::SeqCst);
            if table.panic_after_pages.is_some_and(|limit| read >= limit) {
                panic!("the page reader panicked");
            }
            if table.fail_after_pages.is_some_and(|limit| read >= limit) {
                return Err(StoreError::Unavailable("table went away".into()));
            }
            let next = Cursor {
                segment: 0,
                position: Some(Position::Offset(start + ((n + 1) * page_size).min(total))),
            };
            let (expired, live): (Vec<_>, Vec<_>) =
                chunk.iter().partition(|id| table.expired.contains(*id));
            // Like the real store: an explicit list's start is unknown.
            let read = |id: &str| Connection {
                started_ms: (!explicit).then_some(ESTABLISHED_START_MS),
                ..keyed(id)
            };
            let mut page = Page::new(live.iter().map(|id| read(id)).collect(), next);
            page.expired = expired
                .iter()
                .map(|id| Expired {
                    connection: keyed(id),
                    started_ms: EXPIRED_START_MS,
                })
                .collect();
            Ok(page)
        }))
        .boxed()
    }

    fn channel_order(&self) -> ChannelOrder {
        self.channel_order
    }

    async fn remove(&self, mut gone: Vec<Connection>) -> Result<Removal, StoreError> {
        assert!(
            gone.len() <= crate::store::MAX_REMOVE_BATCH,
            "a batch over the limit"
        );
        self.remove_calls.lock().unwrap().push(gone.len());
        if self.reject_removals {
            return Err(StoreError::Rejected("validation".into()));
        }
        let mut removal = Removal::default();
        let left_over = self
            .unprocessed_removals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if left_over && let Some(last) = gone.pop() {
            removal.unprocessed.push(last);
        }
        if self.composite_key {
            let (keyed, unkeyed): (Vec<_>, Vec<_>) =
                gone.into_iter().partition(|c| c.key.is_some());
            removal.skipped = unkeyed;
            gone = keyed;
        }
        let doomed: HashSet<_> = gone.iter().map(|c| c.id.to_string()).collect();
        self.rows.lock().unwrap().retain(|r| !doomed.contains(r));
        Ok(removal)
    }

    async fn remove_expired(&self, row: Expired) -> Result<bool, StoreError> {
        let id = row.connection.id.to_string();
        self.expired_removals.lock().unwrap().push(id.clone());
        if self.reject_removals {
            return Err(StoreError::Rejected("validation".into()));
        }
        if self.rewritten.contains(&id) || row.started_ms != EXPIRED_START_MS {
            return Ok(false);
        }
        let mut rows = self.rows.lock().unwrap();
        let before = rows.len();
        rows.retain(|r| *r != id);
        Ok(rows.len() < before)
    }
}

/// A gateway that answers from a script per connection and records
/// deliveries and the peak of concurrent calls.
#[derive(Default)]
pub struct FakeGateway {
    /// Answers to give, in order, per id; then `Delivered`.
    pub script: Mutex<HashMap<String, Vec<PostOutcome>>>,
    pub gone: HashSet<String>,
    pub delivered: Mutex<Vec<(String, Bytes)>>,
    pub in_flight: AtomicUsize,
    pub peak: AtomicUsize,
    /// Every post waits forever (a stuck endpoint).
    pub stall: bool,
    /// Posts to these ids wait forever.
    pub stall_ids: HashSet<String>,
    /// Posts to these ids panic (a bug in a job).
    pub panic_ids: HashSet<String>,
    /// Posts to these ids wait until [`FakeGateway::release`].
    pub held_ids: HashSet<String>,
    /// Set by [`FakeGateway::release`] (public only so struct update
    /// syntax works outside this module).
    pub released: AtomicBool,
    pub release: tokio::sync::Notify,
}

impl FakeGateway {
    /// The ids delivered to, in order, once per delivery.
    pub fn delivered_ids(&self) -> Vec<String> {
        self.delivered
            .lock()
            .unwrap()
            .iter()
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Lets the posts to `held_ids` go on, now and from now on.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.release.notify_waiters();
    }
}

impl Gateway for FakeGateway {
    async fn post(&self, id: &ConnectionId, payload: Bytes) -> PostOutcome {
        if self.stall || self.stall_ids.contains(id.as_str()) {
            return std::future::pending().await;
        }
        if self.held_ids.contains(id.as_str()) {
            loop {
                let released = self.release.notified();
                if self.released.load(Ordering::SeqCst) {
                    break;
                }
                released.await;
            }
        }
        if self.panic_ids.contains(id.as_str()) {
            panic!("posting to {id} panicked");
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::task::yield_now().await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.gone.contains(id.as_str()) {
            return PostOutcome::Gone;
        }
        let scripted = self
            .script
            .lock()
            .unwrap()
            .get_mut(id.as_str())
            .and_then(|answers| (!answers.is_empty()).then(|| answers.remove(0)));
        match scripted {
            Some(answer) => answer,
            None => {
                self.delivered
                    .lock()
                    .unwrap()
                    .push((id.to_string(), payload));
                PostOutcome::Delivered
            }
        }
    }
}

/// An in-memory queue: `visible` messages are handed out by `receive`;
/// everything the worker does to them is recorded.
#[derive(Default)]
pub struct FakeQueue {
    pub visible: Mutex<Vec<Message>>,
    pub deleted: Mutex<Vec<Receipt>>,
    /// (receipt, timeout) per ChangeMessageVisibility.
    pub visibility: Mutex<Vec<(Receipt, Duration)>>,
    /// (message id, reason); `None` here means no dead-letter queue.
    pub dead: Option<Mutex<Vec<(String, String)>>>,
    pub sent: Mutex<Vec<String>>,
    /// The options of each send, in the order of `sent`.
    pub sent_options: Mutex<Vec<SendOptions>>,
    /// The visibility timeout each receive asked for.
    pub receive_visibility: Mutex<Vec<Duration>>,
    /// Receives that fail before the queue answers again.
    pub failing_receives: AtomicUsize,
    pub receives: AtomicUsize,
    /// Every call answers that the queue does not exist.
    pub missing: bool,
    /// How long an empty receive waits (a long poll); at least 5 ms.
    pub poll_wait: Duration,
    /// Receives that answer empty although messages are visible, as an SQS
    /// short poll does when it samples servers that hold none.
    pub empty_receives: AtomicUsize,
    /// How long each send takes.
    pub send_wait: Duration,
    /// Dead-letter copies that fail before the queue takes them.
    pub failing_dead_letters: AtomicUsize,
    /// Visibility changes, deletes and sends never answer (a hung queue).
    pub stall_settles: bool,
    /// How long every call takes before it answers, as an SQS call does.
    pub latency: Duration,
}

impl FakeQueue {
    pub fn with_jobs(bodies: &[&str], dead_letter_queue: bool) -> Self {
        let visible = bodies
            .iter()
            .enumerate()
            .map(|(n, body)| Message {
                id: format!("m{n}"),
                body: body.to_string(),
                receipt: Receipt(format!("r{n}")),
                receive_count: 1,
                group_id: None,
                attributes: Default::default(),
                trace_header: None,
            })
            .collect();
        Self {
            visible: Mutex::new(visible),
            dead: dead_letter_queue.then(|| Mutex::new(Vec::new())),
            ..Self::default()
        }
    }

    async fn answer_after_latency(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    pub fn deleted_ids(&self) -> Vec<String> {
        let mut ids: Vec<_> = self
            .deleted
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.0.clone())
            .collect();
        ids.sort();
        ids
    }
}

impl JobQueue for FakeQueue {
    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Message>, QueueError> {
        self.answer_after_latency().await;
        self.receives.fetch_add(1, Ordering::SeqCst);
        self.receive_visibility.lock().unwrap().push(visibility);
        if self.missing {
            return Err(QueueError::NoSuchQueue {
                url: "http://127.0.0.1:1/q".into(),
            });
        }
        let failing = self.failing_receives.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing_receives.store(failing - 1, Ordering::SeqCst);
            return Err(QueueError::Unavailable("connection refused".into()));
        }
        let empty = self.empty_receives.load(Ordering::SeqCst);
        if empty > 0 {
            self.empty_receives.store(empty - 1, Ordering::SeqCst);
            return Ok(Vec::new());
        }
        let take = || {
            let mut visible = self.visible.lock().unwrap();
            let n = max.min(visible.len());
            visible.drain(..n).collect::<Vec<Message>>()
        };
        let batch = take();
        if !batch.is_empty() {
            return Ok(batch);
        }
        // A long poll that finds nothing waits, then takes what arrived.
        tokio::time::sleep(self.poll_wait.max(Duration::from_millis(5))).await;
        Ok(take())
    }

    async fn set_visibility(&self, receipt: &Receipt, timeout: Duration) -> Result<(), QueueError> {
        self.answer_after_latency().await;
        if self.stall_settles {
            return std::future::pending().await;
        }
        self.visibility
            .lock()
            .unwrap()
            .push((receipt.clone(), timeout));
        Ok(())
    }

    async fn delete(&self, receipts: &[Receipt]) -> Result<Vec<Receipt>, QueueError> {
        assert!(receipts.len() <= crate::queue::MAX_BATCH);
        self.answer_after_latency().await;
        if self.stall_settles {
            return std::future::pending().await;
        }
        self.deleted
            .lock()
            .unwrap()
            .extend(receipts.iter().cloned());
        Ok(Vec::new())
    }

    async fn dead_letter(
        &self,
        message: &Message,
        reason: &str,
    ) -> Result<DeadLettered, QueueError> {
        let failing = self.failing_dead_letters.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing_dead_letters
                .store(failing - 1, Ordering::SeqCst);
            return Err(QueueError::Unavailable("connection refused".into()));
        }
        match &self.dead {
            Some(dead) => {
                dead.lock()
                    .unwrap()
                    .push((message.id.clone(), reason.to_owned()));
                Ok(DeadLettered::Sent)
            }
            None => Ok(DeadLettered::NotConfigured),
        }
    }

    async fn send(&self, body: &str, options: &SendOptions) -> Result<String, QueueError> {
        if self.stall_settles {
            return std::future::pending().await;
        }
        if !self.send_wait.is_zero() {
            tokio::time::sleep(self.send_wait).await;
        }
        if self.missing {
            return Err(QueueError::NoSuchQueue {
                url: "http://127.0.0.1:1/q".into(),
            });
        }
        self.sent_options.lock().unwrap().push(options.clone());
        let mut sent = self.sent.lock().unwrap();
        sent.push(body.to_owned());
        Ok(format!("sent-{}", sent.len()))
    }
}

/// `rows` connection rows `conn-0` … `conn-{rows-1}` generated page by
/// page, as a table scan would hand them out, so a million-connection
/// audience never exists in memory at once; removals are counted, not
/// stored. Segments are contiguous shares of the ids. Channel `room-{n}`
/// holds `conn-{n·c}` … `conn-{n·c+c-1}` (c = `channel_size`), in one Query
/// page. Every page and every removal answers after `latency`, as a
/// DynamoDB call does.
pub struct GeneratedTable {
    pub rows: u64,
    pub page_size: u64,
    pub channel_size: u64,
    pub latency: Duration,
    /// Rows "deleted"; the engine's report counts the same.
    pub removed: AtomicU64,
}

impl GeneratedTable {
    /// `rows` rows in pages of `page_size`, no channels, no latency.
    pub fn new(rows: u64, page_size: u64) -> Self {
        Self {
            rows,
            page_size,
            channel_size: 0,
            latency: Duration::ZERO,
            removed: AtomicU64::new(0),
        }
    }
}

impl ConnectionStore for GeneratedTable {
    fn pages(
        &self,
        query: &AudienceQuery,
        _: Option<Vec<Cursor>>,
    ) -> BoxStream<'static, Result<Page, StoreError>> {
        let page_size = self.page_size.max(1);
        let latency = self.latency;
        // A segment is a contiguous share of the ids, as a parallel scan's
        // segment is a share of the table.
        let (segment, first, rows, page_size) = match query {
            AudienceQuery::Segment { index, total } => {
                let share = |i: u32| self.rows * u64::from(i) / u64::from((*total).max(1));
                (*index, share(*index), share(*index + 1), page_size)
            }
            AudienceQuery::Channel(channel) => {
                let room = channel
                    .strip_prefix("room-")
                    .and_then(|n| n.parse::<u64>().ok());
                let size = self.channel_size * u64::from(room.is_some());
                let first = room.unwrap_or(0) * self.channel_size;
                (0, first, first + size, size.max(1))
            }
            _ => (0, 0, self.rows, page_size),
        };
        stream::unfold(first, move |start| async move {
            if start >= rows {
                return None;
            }
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let end = (start + page_size).min(rows);
            let connections = (start..end).map(row).collect();
            let next = Cursor {
                segment,
                position: (end < rows).then_some(Position::Offset(end as usize)),
            };
            Some((Ok(Page::new(connections, next)), end))
        })
        .boxed()
    }

    async fn remove(&self, gone: Vec<Connection>) -> Result<Removal, StoreError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        self.removed.fetch_add(gone.len() as u64, Ordering::Relaxed);
        Ok(Removal::default())
    }

    /// Its rows have no start: none is ever expired.
    async fn remove_expired(&self, _: Expired) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// A row as the DynamoDB store reads it: the id and its full key.
pub fn row(n: u64) -> Connection {
    let id = format!("conn-{n}");
    Connection {
        key: Some(RowKey(vec![(
            "connectionId".into(),
            KeyValue::S(id.clone()),
        )])),
        id: id.into(),
        started_ms: Some(ESTABLISHED_START_MS),
    }
}

/// An in-memory fleet table that several tasks share: each task reaches it
/// through its own [`FakeLeaseTable`], with faults of its own.
#[derive(Debug, Default)]
pub struct FakeLeases {
    pub leases: Mutex<BTreeMap<String, Lease>>,
}

impl FakeLeases {
    /// One task's connection to the table.
    pub fn connect(self: &Arc<Self>) -> FakeLeaseTable {
        FakeLeaseTable {
            leases: Arc::clone(self),
            failing: AtomicUsize::new(0),
            latency: Mutex::new(Duration::ZERO),
            calls: AtomicUsize::new(0),
        }
    }

    /// The tasks with a lease in the table, expired or not.
    pub fn tasks(&self) -> Vec<String> {
        self.leases.lock().unwrap().keys().cloned().collect()
    }
}

/// One task's way to a [`FakeLeases`]: the next `failing` calls fail as an
/// unreachable table does (and change nothing); the others take effect at
/// once and answer after `latency`, so a write whose answer comes too late
/// has landed all the same, and a read answers with what the table held
/// when it was asked.
#[derive(Debug)]
pub struct FakeLeaseTable {
    pub leases: Arc<FakeLeases>,
    pub failing: AtomicUsize,
    pub latency: Mutex<Duration>,
    pub calls: AtomicUsize,
}

impl FakeLeaseTable {
    /// The next `calls` calls fail.
    pub fn fail_next(&self, calls: usize) {
        self.failing.store(calls, Ordering::SeqCst);
    }

    /// Every call from now on takes `latency` to answer.
    pub fn set_latency(&self, latency: Duration) {
        *self.latency.lock().unwrap() = latency;
    }

    /// Fails if a failure is due; else applies `call` to the leases, and
    /// answers after the latency.
    async fn call<R>(
        &self,
        call: impl FnOnce(&mut BTreeMap<String, Lease>) -> R,
    ) -> Result<R, FleetError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let due = self
            .failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if due.is_ok() {
            return Err(FleetError::Unavailable("connection refused".into()));
        }
        let answer = call(&mut self.leases.leases.lock().unwrap());
        let latency = *self.latency.lock().unwrap();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        Ok(answer)
    }
}

impl LeaseTable for FakeLeaseTable {
    async fn put(&self, lease: &Lease) -> Result<(), FleetError> {
        self.call(|leases| {
            leases.insert(lease.task.clone(), lease.clone());
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Lease>, FleetError> {
        self.call(|leases| leases.values().cloned().collect()).await
    }

    async fn remove(&self, task: &str) -> Result<(), FleetError> {
        self.call(|leases| {
            leases.remove(task);
        })
        .await
    }
}

/// An in-memory run table with DynamoDB's conditional write.
#[derive(Default)]
pub struct FakeRunTable {
    pub records: Mutex<HashMap<String, crate::runs::RunRecord>>,
    /// Every call fails as a throttled table does, while set.
    pub throttle: AtomicBool,
    /// Writes that were applied.
    pub writes: AtomicU64,
    /// Every call: reads and writes, applied or not.
    pub calls: AtomicU64,
    /// Waited in every call, as a table's round trip takes time.
    pub latency: Duration,
}

impl crate::runs::RunTable for FakeRunTable {
    async fn load(
        &self,
        key: &str,
    ) -> Result<Option<crate::runs::RunRecord>, crate::runs::DurableError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.throttle.load(Ordering::SeqCst) {
            return Err(crate::runs::DurableError::Throttled("fake".into()));
        }
        Ok(self.records.lock().unwrap().get(key).cloned())
    }

    async fn store(
        &self,
        record: &crate::runs::RunRecord,
        read: Option<u64>,
    ) -> Result<bool, crate::runs::DurableError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.throttle.load(Ordering::SeqCst) {
            return Err(crate::runs::DurableError::Throttled("fake".into()));
        }
        let mut records = self.records.lock().unwrap();
        let current = records.get(&record.key).map(|r| r.version);
        if current != read {
            return Ok(false);
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        records.insert(record.key.clone(), record.clone());
        Ok(true)
    }
}

impl crate::runs::RunTable for Arc<FakeRunTable> {
    async fn load(
        &self,
        key: &str,
    ) -> Result<Option<crate::runs::RunRecord>, crate::runs::DurableError> {
        crate::runs::RunTable::load(&**self, key).await
    }

    async fn store(
        &self,
        record: &crate::runs::RunRecord,
        read: Option<u64>,
    ) -> Result<bool, crate::runs::DurableError> {
        crate::runs::RunTable::store(&**self, record, read).await
    }
}

/// A report destination that keeps what it is sent, or fails, or never
/// answers.
#[derive(Default)]
pub struct FakeReports {
    pub bodies: Mutex<Vec<String>>,
    fail: bool,
    hang: bool,
}

impl FakeReports {
    /// Refuses every report.
    pub fn failing() -> Self {
        Self {
            fail: true,
            ..Self::default()
        }
    }

    /// Never answers.
    pub fn hanging() -> Self {
        Self {
            hang: true,
            ..Self::default()
        }
    }

    /// The reports taken, in order.
    pub fn reports(&self) -> Vec<BroadcastReport> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|body| serde_json::from_str(body).expect("a report"))
            .collect()
    }
}

impl ReportSink for FakeReports {
    fn destination(&self) -> &str {
        "fake"
    }

    fn send<'a>(&'a self, body: &'a str) -> BoxFuture<'a, Result<(), ReportError>> {
        Box::pin(async move {
            if self.hang {
                std::future::pending::<()>().await;
            }
            if self.fail {
                return Err(ReportError::Unavailable("the fake refuses".into()));
            }
            self.bodies.lock().unwrap().push(body.to_owned());
            Ok(())
        })
    }
}
