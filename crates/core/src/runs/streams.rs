//! Streams of updates (`latest`): one record per stream key in the run
//! table says which update runs the stream now (the runner: its broadcast
//! key, run key and audience fingerprint, where it began reading), the
//! newest sequence started, and a newer update handed to the runner.
//!
//! A stream stays with its runner while updates flow, so it gets the whole
//! of that task's share of the fleet's rate (which grows to the fleet's
//! rate as the other tasks idle) and no two tasks send it at once. A newer
//! update received anywhere is written into the record (`handed`); the
//! runner, reading the record every [`LATEST_POLL`], takes it and sends
//! its value from the next post on, without stopping its read, and goes
//! round the audience again as long as its value changed during a round
//! (see `worker::run_passes`). The receiver keeps its message hidden and
//! settles it once the runner has sent its update round, or a newer one
//! took over; if the runner's run ends or its lease lapses first, the
//! receiver claims the stream and runs the update itself, from the place
//! the runner kept every [`POSITION_INTERVAL`]. Without a live runner an
//! update claims the stream with a conditional write, as the first does.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Checkpoint, DurableError, Ledger, RunRecord, RunTable};
use crate::connection::expiry::epoch_ms;
use crate::job::Latest;
use crate::limits::TOMBSTONE_LIFETIME;
use crate::store::Cursor;

/// How often a running update reads its stream's record, and a handed
/// update's receiver reads it while it waits: a newer update is taken (or
/// stops an older one on another task) within this, plus the posts already
/// in flight.
pub const LATEST_POLL: Duration = Duration::from_millis(100);

/// The largest payload handed to a runner through the stream's record (as
/// base64, with a pending one beside it, well within DynamoDB's 400 KB an
/// item); a larger update claims the stream as it would without a runner.
const HANDED_MAX_BYTES: usize = 96 * 1024;

/// A stream's record, as JSON in the record's `checkpoint`. Fields a task
/// does not know are ignored by it, so tasks of the version before run
/// beside these (see [`Ledger::claim_stream`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Owner {
    /// The newest update started: the runner's own, or one it took.
    seq: u64,
    /// The runner: the broadcast key of the update that claimed the stream.
    id: String,
    /// Its first run's key, whose record says whether it still runs.
    run: String,
    /// [`crate::job::keys::fingerprint`] of its audience.
    audience: String,
    /// Where it began reading (segment 0), for its own takeover.
    from: Vec<Cursor>,
    /// The broadcast key of update `seq` when the runner took it from
    /// another task's receiver (that receiver waits for `round`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sending: Option<String>,
    /// The newest update the runner has sent to every connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    round: Option<u64>,
    /// A newer update waiting for the runner to take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    handed: Option<Handed>,
}

/// A newer update handed to the stream's runner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handed {
    pub seq: u64,
    /// Its broadcast key.
    pub id: String,
    /// Its payload, base64.
    data: String,
}

impl Handed {
    /// The payload to send.
    pub fn payload(&self) -> Option<bytes::Bytes> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .ok()
            .map(bytes::Bytes::from)
    }
}

/// The update that claims or waits on a stream.
pub struct Claimant<'a> {
    /// Its broadcast key.
    pub id: &'a str,
    /// Its first run's key.
    pub run: &'a str,
    /// Its audience's fingerprint.
    pub audience: &'a str,
    pub payload: &'a [u8],
}

/// What claiming a stream found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamClaim {
    /// This update runs the stream: read from `from` (where the older
    /// update was; empty: from the start) round to where it began.
    Owns { from: Vec<Cursor> },
    /// An update as new or newer started: this one is not sent (further).
    Superseded { by: u64 },
    /// The stream's updates go to another audience.
    OtherAudience,
    /// Handed to the live runner (`runner`), which has not sent it round
    /// yet: wait, and ask again (see [`Ledger::claim_stream`]).
    Handed { runner: String },
    /// The runner `by` sent this update to every connection.
    SentRound { by: String },
}

/// What a runner's read of its stream's record found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamPoll {
    /// Nothing newer: go on.
    Running,
    /// Another update claimed the stream: stop.
    Superseded,
    /// A newer update, now taken by this runner: go on with it.
    Took(Handed),
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

/// What a claimant does with the record as read.
enum Step {
    Answer(StreamClaim),
    /// Write the stream's record as this (conditionally), then answer.
    Write(Owner, StreamClaim),
    /// Claim the stream from `older` (none: a first update).
    Claim(Option<Owner>),
}

impl Ledger {
    /// Claims `latest`'s stream for `me`, or hands it to the stream's live
    /// runner, or says where a handed one is. Called again while the answer
    /// is [`StreamClaim::Handed`]: the receiver keeps its message until the
    /// answer changes.
    ///
    /// A task of the version before never takes a handed update: the
    /// receiver waits until that runner's run ends, then claims. It also
    /// claims over a handed one: the receiver, seeing its update gone from
    /// the record, hands it again or claims in turn.
    pub async fn claim_stream(
        &self,
        latest: &Latest,
        me: &Claimant<'_>,
    ) -> Result<StreamClaim, DurableError> {
        let key = stream_key(&latest.key);
        for _ in 0..4 {
            let record = RunTable::load(&self.table, &key).await?;
            let owner = record.as_ref().and_then(owner_of);
            let (owner, claim) = match self.step(latest, me, owner).await? {
                Step::Answer(answer) => return Ok(answer),
                Step::Write(owner, answer) => (owner, answer),
                Step::Claim(older) => {
                    let from = match &older {
                        Some(older) => self.where_it_is(&latest.key, older).await?,
                        None => Vec::new(),
                    };
                    let claimed = Owner {
                        seq: latest.seq,
                        id: me.id.to_owned(),
                        run: me.run.to_owned(),
                        audience: me.audience.to_owned(),
                        from: from.clone(),
                        ..Owner::default()
                    };
                    (claimed, StreamClaim::Owns { from })
                }
            };
            let read = record.as_ref().map(|r| r.version);
            if RunTable::store(&self.table, &record_of(&key, &owner, read), read).await? {
                return Ok(claim);
            }
        }
        Err(DurableError::Rejected(format!(
            "the record of the stream {} kept changing",
            latest.key
        )))
    }

    /// What `me` (update `latest`) does with the stream's record `owner`.
    async fn step(
        &self,
        latest: &Latest,
        me: &Claimant<'_>,
        owner: Option<Owner>,
    ) -> Result<Step, DurableError> {
        let Some(owner) = owner else {
            return Ok(Step::Claim(None));
        };
        if owner.audience != me.audience {
            return Ok(Step::Answer(StreamClaim::OtherAudience));
        }
        let newest = owner
            .handed
            .as_ref()
            .map_or(owner.seq, |h| h.seq.max(owner.seq));
        if owner.id == me.id {
            // Its own run again (a takeover, a redelivery): unless it went
            // on with a newer update, whose receiver waits to take over.
            return Ok(Step::Answer(if newest == latest.seq {
                StreamClaim::Owns {
                    from: owner.from.clone(),
                }
            } else {
                StreamClaim::Superseded { by: newest }
            }));
        }
        let taken = owner.seq == latest.seq && owner.sending.as_deref() == Some(me.id);
        let waiting = owner.handed.as_ref().is_some_and(|h| h.id == me.id);
        if newest > latest.seq || (owner.seq == latest.seq && !taken) {
            return Ok(Step::Answer(StreamClaim::Superseded { by: newest }));
        }
        if taken && owner.round == Some(latest.seq) {
            return Ok(Step::Answer(StreamClaim::SentRound { by: owner.id }));
        }
        let runner = StreamClaim::Handed {
            runner: owner.id.clone(),
        };
        if !self.runs(&owner.run).await? {
            return Ok(Step::Claim(Some(owner)));
        }
        if taken || waiting {
            return Ok(Step::Answer(runner));
        }
        let data = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(me.payload)
        };
        if data.len() > HANDED_MAX_BYTES {
            return Ok(Step::Claim(Some(owner)));
        }
        let handed = Handed {
            seq: latest.seq,
            id: me.id.to_owned(),
            data,
        };
        Ok(Step::Write(
            Owner {
                handed: Some(handed),
                ..owner
            },
            runner,
        ))
    }

    /// Whether the run `run` is live: on record, unfinished, its lease
    /// held.
    async fn runs(&self, run: &str) -> Result<bool, DurableError> {
        let now = epoch_ms(SystemTime::now());
        Ok(RunTable::load(&self.table, run)
            .await?
            .is_some_and(|r| r.finished_at_ms.is_none() && r.lease_until_ms > now))
    }

    /// The runner `runner`, sending update `latest`, reads its stream's
    /// record: another update may have claimed the stream, or a newer one
    /// been handed to it, which it takes here. A table that cannot answer
    /// says go on (counted and logged).
    pub async fn poll_stream(&self, latest: &Latest, runner: &str) -> StreamPoll {
        let key = stream_key(&latest.key);
        let polled = async {
            let record = RunTable::load(&self.table, &key).await?;
            let Some((record, owner)) = record.and_then(|r| owner_of(&r).map(|o| (r, o))) else {
                return Ok(StreamPoll::Running);
            };
            if owner.id != runner {
                return Ok(if owner.seq > latest.seq {
                    StreamPoll::Superseded
                } else {
                    StreamPoll::Running
                });
            }
            let Some(handed) = owner.handed.clone().filter(|h| h.seq > latest.seq) else {
                return Ok(StreamPoll::Running);
            };
            let took = owner.taking(&handed);
            let read = Some(record.version);
            let stored = RunTable::store(&self.table, &record_of(&key, &took, read), read).await?;
            // Lost to another write: the next read decides again.
            Ok(if stored {
                StreamPoll::Took(handed)
            } else {
                StreamPoll::Running
            })
        };
        match polled.await {
            Ok(poll) => poll,
            Err(e) => {
                self.failed("read a stream", &latest.key, &e);
                StreamPoll::Running
            }
        }
    }

    /// The runner `runner` has sent update `latest` to every connection:
    /// noted for the receiver that handed it. A newer update handed
    /// meanwhile is taken instead, and the runner goes on with it.
    pub async fn sent_round(&self, latest: &Latest, runner: &str) -> Option<Handed> {
        let key = stream_key(&latest.key);
        for _ in 0..4 {
            let record = match RunTable::load(&self.table, &key).await {
                Ok(record) => record?,
                Err(e) => {
                    self.failed("note a stream sent round", &latest.key, &e);
                    return None;
                }
            };
            let owner = owner_of(&record)?;
            if owner.id != runner || owner.seq != latest.seq {
                return None;
            }
            let handed = owner.handed.clone().filter(|h| h.seq > latest.seq);
            let sent = Owner {
                round: Some(latest.seq),
                ..owner
            };
            let next = match &handed {
                Some(h) => sent.taking(h),
                None => sent,
            };
            let read = Some(record.version);
            match RunTable::store(&self.table, &record_of(&key, &next, read), read).await {
                Ok(true) => return handed,
                Ok(false) => continue,
                Err(e) => {
                    self.failed("note a stream sent round", &latest.key, &e);
                    return None;
                }
            }
        }
        None
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

impl Owner {
    /// The record once the runner took `handed`: the stream's newest, sent
    /// on behalf of its receiver.
    fn taking(self, handed: &Handed) -> Owner {
        Owner {
            seq: handed.seq,
            sending: Some(handed.id.clone()),
            handed: None,
            ..self
        }
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
