//! The live connections: id → the sender that feeds the client's socket.
//!
//! A sharded map (DashMap), so tens of thousands of POSTs a second to
//! different clients do not queue behind one lock. The map holds the only
//! long-lived sender of each client: removing the entry closes the client's
//! outbox, which makes its socket task send a close frame and end.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::ws::Message;
use dashmap::DashMap;
use tokio::sync::mpsc;

/// Frames a client can have waiting before a POST to it answers 429, as API
/// Gateway does when "the client's buffer is full".
pub const OUTBOX_CAPACITY: usize = 4096;

/// What the management API knows about one connection.
#[derive(Debug)]
pub struct Connection {
    /// Feeds the socket task; bounded so a client that does not read cannot
    /// make the gateway's memory grow without limit.
    pub outbox: mpsc::Sender<Message>,
    /// For `GET @connections/{id}` (`ConnectedAt`), epoch milliseconds.
    pub connected_at_ms: u64,
    /// For `GET` (`LastActiveAt`): the last frame in either direction.
    pub last_active_ms: AtomicU64,
    /// For `GET` (`Identity.SourceIp`).
    pub source_ip: IpAddr,
    /// For `GET` (`Identity.UserAgent`).
    pub user_agent: String,
}

impl Connection {
    pub fn touch(&self) {
        self.last_active_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// Why a frame was not queued for a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// No such connection, or it has left: API Gateway's 410.
    Gone,
    /// Its outbox is full: API Gateway's 429.
    BufferFull,
}

/// Every live connection of the gateway, shared by the socket tasks and the
/// management API.
#[derive(Debug, Default)]
pub struct Registry {
    connections: DashMap<Arc<str>, Connection>,
}

impl Registry {
    pub fn insert(&self, id: Arc<str>, connection: Connection) {
        self.connections.insert(id, connection);
    }

    /// Removes the connection; returns whether it was there. Its outbox
    /// closes, so its socket (if still open) is closed with a close frame.
    pub fn remove(&self, id: &str) -> bool {
        self.connections.remove(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    /// Queues one frame for the client, without waiting.
    pub fn deliver(&self, id: &str, frame: Message) -> Result<(), Refused> {
        let connection = self.connections.get(id).ok_or(Refused::Gone)?;
        match connection.outbox.try_send(frame) {
            Ok(()) => {
                connection.touch();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(Refused::BufferFull),
            // The socket task has ended but not yet removed its entry.
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Refused::Gone),
        }
    }

    /// Reads one connection's details under the shard's read lock.
    pub fn inspect<T>(&self, id: &str, read: impl FnOnce(&Connection) -> T) -> Option<T> {
        self.connections
            .get(id)
            .filter(|c| !c.outbox.is_closed())
            .map(|c| read(&c))
    }

    pub fn touch(&self, id: &str) {
        if let Some(connection) = self.connections.get(id) {
            connection.touch();
        }
    }
}

/// Milliseconds since the Unix epoch, for the timestamps API Gateway reports.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn connection(capacity: usize) -> (Connection, mpsc::Receiver<Message>) {
        let (outbox, rx) = mpsc::channel(capacity);
        let connection = Connection {
            outbox,
            connected_at_ms: 1,
            last_active_ms: AtomicU64::new(1),
            source_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            user_agent: "test".into(),
        };
        (connection, rx)
    }

    #[test]
    fn unknown_id_is_gone() {
        let registry = Registry::default();
        assert_eq!(
            registry.deliver("nope", Message::text("x")),
            Err(Refused::Gone)
        );
    }

    #[test]
    fn delivers_until_the_outbox_is_full() {
        let registry = Registry::default();
        let (c, mut rx) = connection(1);
        registry.insert("a".into(), c);
        assert_eq!(registry.deliver("a", Message::text("1")), Ok(()));
        assert_eq!(
            registry.deliver("a", Message::text("2")),
            Err(Refused::BufferFull)
        );
        assert_eq!(rx.try_recv().ok(), Some(Message::text("1")));
        assert!(
            registry
                .inspect("a", |c| c.last_active_ms.load(Ordering::Relaxed))
                .unwrap()
                > 1
        );
    }

    #[test]
    fn a_closed_outbox_or_a_removed_entry_is_gone() {
        let registry = Registry::default();
        let (c, rx) = connection(4);
        registry.insert("a".into(), c);
        drop(rx);
        assert_eq!(
            registry.deliver("a", Message::text("1")),
            Err(Refused::Gone)
        );
        assert!(registry.inspect("a", |_| ()).is_none());
        assert!(registry.remove("a"));
        assert!(!registry.remove("a"));
        assert!(registry.is_empty());
    }

    #[test]
    fn removing_closes_the_outbox() {
        let registry = Registry::default();
        let (c, mut rx) = connection(4);
        registry.insert("a".into(), c);
        registry.remove("a");
        assert!(rx.try_recv().is_err());
        assert!(rx.is_closed());
    }
}
