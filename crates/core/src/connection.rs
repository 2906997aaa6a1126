//! Connection ids and the table row keys they were read with.
//!
//! A gone connection is removed by the full primary key of the row it was
//! read from, so a table keyed by `(channel, connectionId)` works as well as
//! one keyed by `connectionId` alone.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// An API Gateway connection id, e.g. `L0SM9cOFvHcCIhw=`.
///
/// Cheap to clone: the same id travels from the audience page to the send,
/// and on to the remover when the connection is gone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConnectionId(Arc<str>);

impl ConnectionId {
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ConnectionId {
    fn from(id: &str) -> Self {
        Self::new(id)
    }
}

impl From<String> for ConnectionId {
    fn from(id: String) -> Self {
        Self::new(id)
    }
}

/// One key attribute value, in DynamoDB's scalar key types.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyValue {
    S(String),
    N(String),
    B(Vec<u8>),
}

/// The full primary key of a connection's row, as it was read.
///
/// Opaque to the engine: only the store that produced it interprets it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RowKey(pub Vec<(String, KeyValue)>);

/// One member of a broadcast's audience.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Connection {
    pub id: ConnectionId,
    /// The row to delete if the connection turns out to be gone; `None` when
    /// the id did not come from the table (an explicit list) and the table's
    /// key cannot be derived from the id alone.
    pub key: Option<RowKey>,
    /// When the connection started (epoch ms), as its row held it and only
    /// if the store trusts it; `None` for an explicit list, a hand-on, or a
    /// row read without a usable start. A removal needs to know the
    /// connection had time to be established (see [`crate::evidence`]), so
    /// `None` counts as "may still be connecting".
    pub started_ms: Option<i64>,
}

impl Connection {
    /// A connection whose start is unknown.
    pub fn new(id: impl Into<ConnectionId>, key: Option<RowKey>) -> Self {
        Self {
            id: id.into(),
            key,
            started_ms: None,
        }
    }
}
