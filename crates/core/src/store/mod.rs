//! The audience: connection rows read page by page, and removal of gone ones.
//!
//! [`ConnectionStore`] is the seam; `fanout-aws` implements it on DynamoDB.
//! Pages carry a [`Cursor`] so an interrupted broadcast can resume after the
//! last page it finished.

pub mod channels;

use std::future::Future;

use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::connection::expiry::{AgeProblems, Expired};
use crate::connection::{Connection, ConnectionId};

/// Rows per removal: BatchWriteItem's limit (a 26th item is a validation
/// error, not a partial success).
pub use crate::limits::MAX_BATCH_WRITE as MAX_REMOVE_BATCH;

/// Who a broadcast goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AudienceQuery {
    /// Every row of the table: a Scan, in `segments` parallel segments.
    All { segments: u32 },
    /// One segment of a table split `total` ways (a split broadcast's share):
    /// a Scan with Segment = `index`, TotalSegments = `total`.
    Segment { index: u32, total: u32 },
    /// Rows whose channel attribute equals this: a Query on the channel index.
    /// With [`ChannelOrder::ById`], its pages come in connection-id order
    /// and it resumes from [`Position::After`] too.
    Channel(String),
    /// Rows of the named audience `name` (one of the audience indexes) whose
    /// key equals `value`: a Query on that audience's index.
    Audience { name: String, value: String },
    /// These ids; no table read.
    Explicit(Vec<ConnectionId>),
}

/// Where to resume reading one audience stream: the segment (0 for a Query or
/// an explicit list) and its position after the last page handed out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub segment: u32,
    /// `None` once the segment is exhausted.
    pub position: Option<Position>,
}

/// A position inside one segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Position {
    /// DynamoDB's LastEvaluatedKey, as attribute name → key value.
    Key(crate::connection::RowKey),
    /// Offset into an explicit list.
    Offset(usize),
    /// After this connection id, in id order: where a merge of channels read
    /// in id order resumes (see [`crate::store::channels`]).
    After { after: ConnectionId },
}

/// How the rows of one channel are laid out, which decides how several
/// channels make one audience.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelOrder {
    /// One row per connection, with one channel: channels are disjoint, and
    /// their union is their concatenation.
    Disjoint,
    /// One row per (channel, connection), a channel's rows in connection-id
    /// order (the channel index's sort key is the id): a connection may be
    /// in several channels, and their union is an ordered merge that keeps
    /// each id once.
    ById,
}

/// One page of an audience.
#[derive(Clone, Debug)]
pub struct Page {
    /// The connections to post to.
    pub connections: Vec<Connection>,
    /// More rows of connections on this page or an earlier one (one row
    /// per (channel, connection) in a merge of channels): not sent to again,
    /// removed with their connection if it is gone.
    pub duplicates: Vec<Connection>,
    /// Where the segment continues after this page.
    pub next: Cursor,
    /// Rows certainly gone by age (see [`crate::connection::expiry`]): part of the
    /// audience, not posted to, deleted on condition.
    pub expired: Vec<Expired>,
    /// Rows in `connections` whose start could not be trusted.
    pub age_problems: AgeProblems,
}

impl Page {
    /// A page of connections to post to, none known expired.
    pub fn new(connections: Vec<Connection>, next: Cursor) -> Self {
        Self {
            connections,
            duplicates: Vec::new(),
            next,
            expired: Vec::new(),
            age_problems: AgeProblems::default(),
        }
    }
}

/// What a removal call could not do this time, to be retried.
#[derive(Debug, Default)]
pub struct Removal {
    /// Rows the store accepted but did not process (DynamoDB's
    /// UnprocessedItems): retry them with backoff.
    pub unprocessed: Vec<Connection>,
    /// Connections without a derivable row key: they cannot be removed.
    pub skipped: Vec<Connection>,
    /// Rows deleted only on condition that they still hold the connection
    /// (a table whose key is not the id) which no longer did: rewritten
    /// since they were read, so kept.
    pub changed: Vec<Connection>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the connections table {table} does not exist; create it or fix {setting}",
        setting = crate::limits::setting::Setting::Table
    )]
    NoSuchTable { table: String },
    #[error(
        "channel audiences need {setting} (a GSI keyed by the channel attribute)",
        setting = crate::limits::setting::Setting::ChannelIndex
    )]
    NoChannelIndex,
    #[error(
        "the audience {name} has no index; name it in {setting}",
        setting = crate::limits::setting::Setting::AudienceIndexes
    )]
    NoAudienceIndex { name: String },
    /// A broadcast to everyone on a table where a connection can have
    /// several rows, without an index that keeps each connection's rows
    /// together: it would reach such a connection once per row.
    #[error("{0}")]
    NeedsConnectionIndex(String),
    #[error("a connection row has no usable {attribute} attribute")]
    BadRow { attribute: String },
    #[error("the table is throttling requests: {0}")]
    Throttled(String),
    #[error("the connections table could not be reached: {0}")]
    Unavailable(String),
    #[error("the connections table refused the request: {0}")]
    Rejected(String),
}

impl StoreError {
    /// Whether trying the same call again later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Throttled(_) | Self::Unavailable(_))
    }
}

/// Reads audiences and removes gone connections.
pub trait ConnectionStore: Send + Sync + 'static {
    /// The audience as a stream of pages, starting at `from` (or at the start
    /// of every segment). Pages of one segment arrive in order; segments
    /// interleave. Pages are read as the stream is polled (the engine reads
    /// ahead on its own).
    fn pages(
        &self,
        audience: &AudienceQuery,
        from: Option<Vec<Cursor>>,
    ) -> BoxStream<'static, Result<Page, StoreError>>;

    /// How a channel's rows are laid out; decided once, at startup.
    fn channel_order(&self) -> ChannelOrder {
        ChannelOrder::Disjoint
    }

    /// Deletes the rows of up to [`MAX_REMOVE_BATCH`] connections that
    /// answered gone, with evidence (see [`crate::engine::evidence`]). The row is
    /// named by the id that answered, never by a key alone: where the
    /// table's key holds the id, the key's id is that id; where it does not,
    /// the delete is conditional on the row still holding it.
    fn remove(
        &self,
        gone: Vec<Connection>,
    ) -> impl Future<Output = Result<Removal, StoreError>> + Send;

    /// Deletes one row certainly gone by age, on condition that it still
    /// holds the start it was read with: `Ok(true)` if deleted, `Ok(false)`
    /// if the row changed or went in the meantime (it is kept).
    fn remove_expired(&self, row: Expired)
    -> impl Future<Output = Result<bool, StoreError>> + Send;
}
