//! Connection ids and the table row keys they were read with.
//!
//! A gone connection is removed by the full primary key of the row it was
//! read from, so a table keyed by `(channel, connectionId)` works as well as
//! one keyed by `connectionId` alone.

pub mod expiry;

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
    /// connection had time to be established (see [`crate::engine::evidence`]), so
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

/// The longest connection id fanout accepts: a DynamoDB sort key's limit
/// (1,024 bytes), since an id may be the sort key of a `channel` +
/// `connectionId` table. API Gateway's own ids are 16 characters.
pub const MAX_ID_BYTES: usize = crate::limits::MAX_SORT_KEY_BYTES;

/// Why a string cannot be an API Gateway connection id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadId {
    #[error("it is empty")]
    Empty,
    #[error("it is {len} bytes; a connection id is at most {MAX_ID_BYTES} (a DynamoDB sort key)")]
    TooLong { len: usize },
    #[error("it holds {found:?}, outside the connection-id alphabet A-Z a-z 0-9 + / = _ -")]
    OutsideAlphabet { found: char },
}

/// Whether `id` can be an API Gateway connection id: not empty, at most
/// [`MAX_ID_BYTES`], and only the characters of the ids API Gateway hands
/// out (standard base64, plus the URL-safe `-` and `_`).
///
/// An id outside that alphabet cannot be a live connection, and some (`.`,
/// `..`) would name another resource once in a URL path: such an id is
/// refused before any post, so one bad row never reaches the endpoint.
pub fn check_id(id: &str) -> Result<(), BadId> {
    if id.is_empty() {
        return Err(BadId::Empty);
    }
    if id.len() > MAX_ID_BYTES {
        return Err(BadId::TooLong { len: id.len() });
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '_' | '-')))
    {
        Some(found) => Err(BadId::OutsideAlphabet { found }),
        None => Ok(()),
    }
}

/// What became of one connection in a broadcast. All but
/// [`Deferred`](Self::Deferred) are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    /// API Gateway accepted the message (2xx).
    Delivered,
    /// API Gateway answered 410: the row is removed.
    Gone,
    /// Its row is older than API Gateway's connection limit allows: removed
    /// without a post.
    Expired,
    /// A 4xx about that connection alone (such as 400): not retried, not
    /// removed.
    Rejected,
    /// Not reached yet (throttled past its deadline, or 5xx past its
    /// attempts): retried in a later pass or continuation.
    Deferred,
}

impl ConnectionState {
    pub fn is_final(self) -> bool {
        self != Self::Deferred
    }

    /// The name used in logs, reports and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Gone => "gone",
            Self::Expired => "expired",
            Self::Rejected => "rejected",
            Self::Deferred => "deferred",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_against_api_gateways_alphabet_and_dynamodbs_key_limit() {
        let longest = "A".repeat(MAX_ID_BYTES);
        let too_long = "A".repeat(MAX_ID_BYTES + 1);
        let cases: &[(&str, Result<(), BadId>)] = &[
            ("L0SM9cOFvHcCIhw=", Ok(())),
            ("GVWNvcmFJAMCIwg=", Ok(())),
            // Standard base64 has `+` and `/`; API Gateway's ids are base64.
            ("ab+c/d==", Ok(())),
            ("url-safe_id", Ok(())),
            (&longest, Ok(())),
            ("", Err(BadId::Empty)),
            (
                &too_long,
                Err(BadId::TooLong {
                    len: MAX_ID_BYTES + 1,
                }),
            ),
            (".", Err(BadId::OutsideAlphabet { found: '.' })),
            ("..", Err(BadId::OutsideAlphabet { found: '.' })),
            ("a.b", Err(BadId::OutsideAlphabet { found: '.' })),
            ("a b", Err(BadId::OutsideAlphabet { found: ' ' })),
            ("a%2F", Err(BadId::OutsideAlphabet { found: '%' })),
            ("a?b", Err(BadId::OutsideAlphabet { found: '?' })),
            ("a#b", Err(BadId::OutsideAlphabet { found: '#' })),
            ("a\\b", Err(BadId::OutsideAlphabet { found: '\\' })),
            ("ä", Err(BadId::OutsideAlphabet { found: 'ä' })),
            ("a\nb", Err(BadId::OutsideAlphabet { found: '\n' })),
        ];
        for (id, expected) in cases {
            assert_eq!(&check_id(id), expected, "{id:.20}");
        }
        assert_eq!(
            check_id(&too_long).unwrap_err().to_string(),
            "it is 1025 bytes; a connection id is at most 1024 (a DynamoDB sort key)"
        );
    }
}
