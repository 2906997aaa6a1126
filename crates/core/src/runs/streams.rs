//! Streams of updates (`latest`): one record per stream key in the run
//! table says which update owns the stream now (its sequence, broadcast
//! key and run key, the fingerprint of its audience, and where it began
//! reading). An update claims the stream with a conditional write when it
//! is newer than the owner; the owner, still sending, reads the record
//! every [`LATEST_POLL`] and stops once a newer one holds it. The newer
//! one starts where the older one is: the place it keeps every
//! [`POSITION_INTERVAL`] while it sends (when its audience is read in
//! connection-id order), else its last checkpoint (after a page).

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Checkpoint, DurableError, Ledger, RunRecord, RunTable};
use crate::connection::expiry::epoch_ms;
use crate::job::Latest;
use crate::limits::TOMBSTONE_LIFETIME;
use crate::store::Cursor;

/// How often a running update reads its stream's record: a newer update
/// stops it within this, plus the posts already in flight.
pub const LATEST_POLL: Duration = Duration::from_millis(100);

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

/// The record of where update `seq` of stream `key` has got to.
fn position_key(key: &str, seq: u64) -> String {
    format!("latest-at:{seq}:{key}")
}

/// How long an update's place is kept: past any takeover of it.
const POSITION_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// How often a running update keeps its place: more often than updates
/// come, so each newer one starts where the older one really is.
pub const POSITION_INTERVAL: Duration = Duration::from_millis(50);

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
                Some(older) => self.where_it_is(&latest.key, older).await?,
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

    /// Keeps where the update `latest` has got to (an answer's place, in
    /// id order) for the update that supersedes it. `written`: the version
    /// this task last wrote, as only it writes this record.
    pub async fn publish_position(&self, latest: &Latest, at: &Cursor, written: &mut Option<u64>) {
        let key = position_key(&latest.key, latest.seq);
        let now = epoch_ms(SystemTime::now());
        let record = RunRecord {
            key: key.clone(),
            fingerprint: "latest-at".to_owned(),
            owner: String::new(),
            message_id: String::new(),
            receipt: String::new(),
            lease_until_ms: 0,
            finished_at_ms: Some(now),
            expires_at: (now + POSITION_LIFETIME.as_millis() as i64) / 1000,
            checkpoint: serde_json::to_string(at).ok(),
            version: written.map_or(1, |v| v + 1),
        };
        match RunTable::store(&self.table, &record, *written).await {
            Ok(true) => *written = Some(record.version),
            // Another write came first (a redelivery of this update): go on
            // from what is there.
            Ok(false) => {
                *written = RunTable::load(&self.table, &key)
                    .await
                    .ok()
                    .flatten()
                    .map(|r| r.version)
            }
            Err(e) => self.failed("keep a stream's place", &latest.key, &e),
        }
    }

    /// Where the older update is now: the place it keeps while it sends
    /// (reads in id order), else, if it is still running, its checkpoint's
    /// furthest segment, else where it began; as segment 0 (see
    /// `engine::audience`).
    async fn where_it_is(&self, stream: &str, older: &Owner) -> Result<Vec<Cursor>, DurableError> {
        let kept = RunTable::load(&self.table, &position_key(stream, older.seq)).await?;
        let place = kept
            .and_then(|r| r.checkpoint)
            .and_then(|text| serde_json::from_str::<Cursor>(&text).ok());
        if let Some(place) = place {
            return Ok(vec![Cursor {
                segment: 0,
                position: place.position,
            }]);
        }
        // With no place of its own yet (superseded before its first
        // answer, or finished), the older one is where it began: the
        // stream's place never moves back.
        let began = older.from.clone();
        let Some(record) = RunTable::load(&self.table, &older.run).await? else {
            return Ok(began);
        };
        if record.finished_at_ms.is_some() {
            return Ok(began);
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
        Ok(furthest.map_or(began, |place| vec![place]))
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
