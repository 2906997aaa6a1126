//! A generated connections table, read page by page, for audiences too large to hold.

use super::*;

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
