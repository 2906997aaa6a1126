//! An in-memory connections table, its rows held whole.

use super::*;

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
    /// Rows read with no start, as a row written by a `$connect` handler
    /// that sets none: a 410 for one is rechecked, not taken as evidence.
    pub connecting: HashSet<String>,
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
            connecting: HashSet::new(),
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
                started_ms: (!explicit && !table.connecting.contains(id))
                    .then_some(ESTABLISHED_START_MS),
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
