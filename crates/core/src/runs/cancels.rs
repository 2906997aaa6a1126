//! Cancels: a tombstone per cancelled broadcast key in the run table, read
//! before any piece of that broadcast runs (a segment, a continuation, a
//! dead letter brought back) and, while one runs, every [`CANCEL_POLL`].
//!
//! Standard SQS does not keep order, so a cancel may come before its
//! broadcast: the tombstone is written whether or not a run of it is on
//! record, and kept for [`TOMBSTONE_LIFETIME`], longer than any piece of
//! the broadcast can come back. Its key (`cancel:` + the broadcast key) is
//! apart from every run key, which starts with `s`.

use std::time::{Duration, SystemTime};

use super::{DurableError, Ledger, RunRecord, RunTable};
use crate::connection::expiry::epoch_ms;
use crate::job::keys::RunKey;
use crate::limits::TOMBSTONE_LIFETIME;

/// How often a running broadcast's tombstone is read: a cancel stops it on
/// every task within this, plus the posts already in flight.
pub const CANCEL_POLL: Duration = Duration::from_secs(1);

/// What recording a cancel found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// The broadcast's first run is on record: it is stopped wherever it
    /// runs, and no piece of it starts again.
    Seen,
    /// No run of it is on record yet: its pieces are stopped if they come
    /// within the tombstone's lifetime.
    NotSeenYet,
}

/// Cancelled broadcast keys kept in memory at most; past it the set starts
/// over (the table still has every tombstone).
const KNOWN_CANCELS: usize = 10_000;

fn tombstone_key(broadcast: &str) -> String {
    format!("cancel:{broadcast}")
}

impl Ledger {
    /// Records that `broadcast` is cancelled, by the cancel job in message
    /// `message_id`.
    pub async fn cancel(
        &self,
        broadcast: &str,
        message_id: &str,
    ) -> Result<Cancelled, DurableError> {
        let now = epoch_ms(SystemTime::now());
        let lifetime = TOMBSTONE_LIFETIME.as_millis() as i64;
        let tombstone = RunRecord {
            key: tombstone_key(broadcast),
            fingerprint: "cancel".to_owned(),
            owner: message_id.to_owned(),
            message_id: message_id.to_owned(),
            receipt: String::new(),
            lease_until_ms: 0,
            finished_at_ms: Some(now),
            expires_at: (now + lifetime) / 1000,
            checkpoint: None,
            version: 1,
        };
        // Written once: a second cancel of the same key finds it there.
        RunTable::store(&self.table, &tombstone, None).await?;
        self.known_cancelled(broadcast);
        self.cancel_recorded.send_modify(|n| *n += 1);
        let first = RunKey {
            broadcast: broadcast.to_owned(),
            segment: None,
            continuation: 0,
            part: 0,
        };
        Ok(
            match RunTable::load(&self.table, &first.storage_key()).await? {
                Some(_) => Cancelled::Seen,
                None => Cancelled::NotSeenYet,
            },
        )
    }

    /// Whether `broadcast` is cancelled. A table that cannot answer says
    /// no (counted and logged): a broadcast goes on rather than be lost.
    pub async fn is_cancelled(&self, broadcast: &str) -> bool {
        if self.known(broadcast) {
            return true;
        }
        match RunTable::load(&self.table, &tombstone_key(broadcast)).await {
            Ok(Some(_)) => {
                self.known_cancelled(broadcast);
                true
            }
            Ok(None) => false,
            Err(e) => {
                self.failed("read a cancel", broadcast, &e);
                false
            }
        }
    }

    /// Waits until `broadcast` is cancelled: a tombstone read every
    /// [`CANCEL_POLL`], or, when this task records the cancel, at once.
    pub async fn until_cancelled(&self, broadcast: &str) {
        let mut recorded = self.cancel_recorded.subscribe();
        loop {
            if self.known(broadcast) {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(CANCEL_POLL) => {
                    if self.is_cancelled(broadcast).await {
                        return;
                    }
                }
                _ = recorded.changed() => {}
            }
        }
    }

    /// Whether `broadcast` is known here to be cancelled (no table read).
    fn known(&self, broadcast: &str) -> bool {
        self.cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(broadcast)
    }

    fn known_cancelled(&self, broadcast: &str) {
        let mut known = self.cancelled.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= KNOWN_CANCELS {
            known.clear();
        }
        known.insert(broadcast.to_owned());
    }
}
