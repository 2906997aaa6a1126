//! The benchmark's audience: `n` connection rows generated page by page, as
//! a table scan would hand them out, so a 1,000,000-connection audience never
//! exists in memory at once; removals are counted, not stored.
//!
//! The ids are `conn-0` … `conn-{n-1}`; the sink answers 410 for every id
//! whose number is a multiple of [`GONE_EVERY`].

use std::sync::atomic::{AtomicU64, Ordering};

use fanout_core::connection::{Connection, KeyValue, RowKey};
use fanout_core::store::{
    AudienceQuery, ConnectionStore, Cursor, Page, Position, Removal, StoreError,
};
use futures::StreamExt;
use futures::stream::{self, BoxStream};

/// One in 20 connections is gone (5 %), as in every benchmark case.
pub const GONE_EVERY: u64 = 20;

pub struct GeneratedTable {
    pub rows: u64,
    pub page_size: u64,
    /// Rows "deleted"; the engine's report counts the same.
    pub removed: AtomicU64,
}

impl ConnectionStore for GeneratedTable {
    fn pages(
        &self,
        query: &AudienceQuery,
        _: Option<Vec<Cursor>>,
    ) -> BoxStream<'static, Result<Page, StoreError>> {
        let page_size = self.page_size.max(1);
        // A segment is a contiguous share of the ids, as a parallel scan's
        // segment is a share of the table.
        let (segment, first, rows) = match *query {
            AudienceQuery::Segment { index, total } => {
                let share = |i: u32| self.rows * u64::from(i) / u64::from(total.max(1));
                (index, share(index), share(index + 1))
            }
            _ => (0, 0, self.rows),
        };
        stream::unfold(first, move |start| async move {
            if start >= rows {
                return None;
            }
            let end = (start + page_size).min(rows);
            let connections = (start..end).map(row).collect();
            let next = Cursor {
                segment,
                position: (end < rows).then_some(Position::Offset(end as usize)),
            };
            Some((Ok(Page { connections, next }), end))
        })
        .boxed()
    }

    async fn remove(&self, gone: Vec<Connection>) -> Result<Removal, StoreError> {
        self.removed.fetch_add(gone.len() as u64, Ordering::Relaxed);
        Ok(Removal::default())
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
    }
}

/// Whether the sink answers 410 for this connection id.
pub fn is_gone(id: &str) -> bool {
    id.strip_prefix("conn-")
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| n % GONE_EVERY == 0)
}
