//! Streams of updates (`latest`): one record per stream key in the run
//! table says which update owns the stream now (its sequence, broadcast
//! key and run key, the fingerprint of its audience, and where it began
//! reading). An update claims the stream with a conditional write when it
//! is newer than the owner; the owner, still sending, reads the record
//! every [`LATEST_POLL`] and stops once a newer one holds it. The newer
//! one starts where the older one's checkpoint says it was.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Checkpoint, DurableError, Ledger, RunRecord, RunTable};
use crate::connection::expiry::epoch_ms;
use crate::job::Latest;
use crate::limits::TOMBSTONE_LIFETIME;
use crate::store::Cursor;

/// How often a running update reads its stream's record: a newer update
/// stops it within this, plus the posts already in flight.
pub const LATEST_POLL: Duration = Duration::from_millis(250);

/// A stream's record, as JSON in the record's `checkpoint`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Owner {
    seq: u64,
    /// The broadcast key of the update that owns the stream.
    id: String,
    /// Its first run's key, whose checkpoint says where it is.
    run: String,
    /// [`crate::job::keys::fingerprint`] of its audience.
    audience: String,
    /// Where it began reading (segment 0), for its own takeover.
    from: Vec<Cursor>,
}

/// What claiming a stream found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamClaim {
    /// This update owns the stream: read from `from` (where the older
    /// update was; empty: from the start) round to where it began.
    Owns { from: Vec<Cursor> },
    /// An update as new or newer owns it: this one is not sent.
    Superseded { by: u64 },
    /// The stream's updates go to another audience.
    OtherAudience,
}

fn stream_key(key: &str) -> String {
    format!("latest:{key}")
}

impl Ledger {
    /// Claims `latest`'s stream for the update `id` (first run `run`,
    /// audience fingerprint `audience`).
    pub async fn claim_stream(
        &self,
        latest: &Latest,
        id: &str,
        run: &str,
        audience: &str,
    ) -> Result<StreamClaim, DurableError> {
        let key = stream_key(&latest.key);
        for _ in 0..4 {
            let record = RunTable::load(&self.table, &key).await?;
            let owner = record.as_ref().and_then(owner_of);
            if let Some(owner) = &owner {
                if owner.audience != audience {
                    return Ok(StreamClaim::OtherAudience);
                }
                if owner.id == id {
                    return Ok(StreamClaim::Owns {
                        from: owner.from.clone(),
                    });
                }
                if owner.seq >= latest.seq {
                    return Ok(StreamClaim::Superseded { by: owner.seq });
                }
            }
            let from = match &owner {
                Some(older) => self.where_it_is(&older.run).await?,
                None => Vec::new(),
            };
            let claimed = Owner {
                seq: latest.seq,
                id: id.to_owned(),
                run: run.to_owned(),
                audience: audience.to_owned(),
                from: from.clone(),
            };
            let read = record.as_ref().map(|r| r.version);
            if RunTable::store(&self.table, &record_of(&key, &claimed, read), read).await? {
                return Ok(StreamClaim::Owns { from });
            }
        }
        Err(DurableError::Rejected(format!(
            "the record of the stream {} kept changing",
            latest.key
        )))
    }

    /// Whether a newer update than `latest` owns its stream now. A table
    /// that cannot answer says no (counted and logged).
    pub async fn superseded(&self, latest: &Latest) -> bool {
        match RunTable::load(&self.table, &stream_key(&latest.key)).await {
            Ok(record) => record
                .as_ref()
                .and_then(owner_of)
                .is_some_and(|owner| owner.seq > latest.seq),
            Err(e) => {
                self.failed("read a stream", &latest.key, &e);
                false
            }
        }
    }

    /// Where the run `run` is now, if it is still running: its checkpoint's
    /// furthest segment, as segment 0 (see `engine::audience`).
    async fn where_it_is(&self, run: &str) -> Result<Vec<Cursor>, DurableError> {
        let Some(record) = RunTable::load(&self.table, run).await? else {
            return Ok(Vec::new());
        };
        if record.finished_at_ms.is_some() {
            return Ok(Vec::new());
        }
        let checkpoint: Option<Checkpoint> = record
            .checkpoint
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok());
        let resume = checkpoint.map(|c| c.resume).unwrap_or_default();
        // Round from the start, an older update's second segment is the
        // furthest it got; a first segment read to its end is no place.
        let furthest = resume
            .iter()
            .filter(|c| c.position.is_some())
            .max_by_key(|c| c.segment)
            .map(|c| Cursor {
                segment: 0,
                position: c.position.clone(),
            });
        Ok(furthest.into_iter().collect())
    }
}

fn owner_of(record: &RunRecord) -> Option<Owner> {
    serde_json::from_str(record.checkpoint.as_deref()?).ok()
}

fn record_of(key: &str, owner: &Owner, read: Option<u64>) -> RunRecord {
    let now = epoch_ms(SystemTime::now());
    RunRecord {
        key: key.to_owned(),
        fingerprint: "latest".to_owned(),
        owner: owner.id.clone(),
        message_id: owner.run.clone(),
        receipt: String::new(),
        lease_until_ms: 0,
        finished_at_ms: Some(now),
        expires_at: (now + TOMBSTONE_LIFETIME.as_millis() as i64) / 1000,
        checkpoint: serde_json::to_string(owner).ok(),
        version: read.map_or(1, |v| v + 1),
    }
}
