//! The run records' pure rules and their writes: [`admit`] decides what
//! becomes of a job from its run's record, and each later write (renew,
//! finish, checkpoint, release) is a change to the record made by its
//! owner, conditional on the version read.

use std::time::Duration;

use super::{DurableError, RunRecord, RunTable};

/// What the worker asks for one job.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub key: &'a str,
    pub fingerprint: &'a str,
    pub owner: &'a str,
    pub message_id: &'a str,
    pub receipt: &'a str,
}

/// What to do with a job, given its run's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ruling {
    /// Run it: write this record, conditional on the version read.
    Claim {
        record: RunRecord,
        read: Option<u64>,
    },
    /// A producer's retry of a finished broadcast: delete its message.
    Duplicate { finished_at_ms: i64 },
    /// The broadcast key was used for another body: dead-letter it.
    Conflict { finished_at_ms: Option<i64> },
    /// The same message, redelivered while its run is live elsewhere:
    /// write the newest receipt for the holder (this record, conditional),
    /// and leave the message hidden.
    Adopt { record: RunRecord, read: u64 },
    /// Another copy of a message whose run is live elsewhere: delete it.
    Twin { lease_until_ms: i64 },
}

/// How long a record lives, and how long a lease lasts.
#[derive(Clone, Copy, Debug)]
pub struct Windows {
    /// The dedup window: how long a finished broadcast is remembered.
    pub dedup: Duration,
    /// The visibility timeout: a lease lasts as long as the message stays
    /// hidden, and the heartbeat renews both.
    pub lease: Duration,
}

pub(super) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Decides what becomes of a job whose run has `existing` as its record.
pub fn admit(
    existing: Option<&RunRecord>,
    request: &Request<'_>,
    now_ms: i64,
    windows: Windows,
) -> Ruling {
    let claim = |read: Option<u64>, checkpoint: Option<String>| Ruling::Claim {
        record: RunRecord {
            key: request.key.to_owned(),
            fingerprint: request.fingerprint.to_owned(),
            owner: request.owner.to_owned(),
            message_id: request.message_id.to_owned(),
            receipt: request.receipt.to_owned(),
            lease_until_ms: now_ms + ms(windows.lease),
            finished_at_ms: None,
            expires_at: (now_ms + ms(windows.lease) + ms(windows.dedup)) / 1000,
            checkpoint,
            version: read.map_or(1, |v| v + 1),
        },
        read,
    };
    let Some(record) = existing else {
        return claim(None, None);
    };
    if let Some(finished_at_ms) = record.finished_at_ms {
        // The TTL sweep is lazy: the window is checked here.
        if now_ms - finished_at_ms > ms(windows.dedup) {
            return claim(Some(record.version), None);
        }
        return if record.fingerprint == request.fingerprint {
            Ruling::Duplicate { finished_at_ms }
        } else {
            Ruling::Conflict {
                finished_at_ms: Some(finished_at_ms),
            }
        };
    }
    if record.fingerprint != request.fingerprint {
        return Ruling::Conflict {
            finished_at_ms: None,
        };
    }
    if record.lease_until_ms <= now_ms {
        // Its task died (or let go): take over, from where it got to.
        return claim(Some(record.version), record.checkpoint.clone());
    }
    if record.message_id == request.message_id {
        let mut adopted = record.clone();
        adopted.receipt = request.receipt.to_owned();
        adopted.version += 1;
        return Ruling::Adopt {
            record: adopted,
            read: record.version,
        };
    }
    Ruling::Twin {
        lease_until_ms: record.lease_until_ms,
    }
}

/// What became of a renewal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Renewed {
    /// Still held, until then; with the message's newest receipt.
    Held { receipt: String },
    /// Another task took the run over (this one's lease had lapsed).
    Lost,
}

/// Writes `change` applied to the record of `key` if this owner still
/// holds it, retrying when another write (an adoption) came in between.
/// It starts from `known`, the record as this owner last wrote it, if
/// given: a write conditional on its version is right without a read,
/// since every write bumps the version. Only when another write came in
/// between (an adoption, a takeover) does it read and try again.
pub(super) async fn update_from<T: RunTable>(
    table: &T,
    key: &str,
    owner: &str,
    known: Option<RunRecord>,
    change: impl Fn(&mut RunRecord),
) -> Result<Option<RunRecord>, DurableError> {
    if let Some(mut record) = known.filter(|r| r.key == key && r.owner == owner) {
        let read = record.version;
        change(&mut record);
        record.version = read + 1;
        if table.store(&record, Some(read)).await? {
            return Ok(Some(record));
        }
    }
    // An adoption between the read and the write is the only write another
    // task makes to a held record: a few rounds always get through.
    for _ in 0..4 {
        let Some(mut record) = table.load(key).await? else {
            return Ok(None);
        };
        if record.owner != owner {
            return Ok(None);
        }
        let read = record.version;
        change(&mut record);
        record.version = read + 1;
        if table.store(&record, Some(read)).await? {
            return Ok(Some(record));
        }
    }
    Err(DurableError::Rejected(format!(
        "the record of {key} kept changing under its owner"
    )))
}

/// Extends the lease of a held run to `now_ms` + the lease window.
pub(super) fn renewal(now_ms: i64, windows: Windows) -> impl Fn(&mut RunRecord) {
    let until = now_ms + ms(windows.lease);
    move |r| {
        r.lease_until_ms = until;
        r.expires_at = r.expires_at.max((until + ms(windows.dedup)) / 1000);
    }
}

pub(super) fn held(renewed: Option<&RunRecord>) -> Renewed {
    match renewed {
        Some(record) => Renewed::Held {
            receipt: record.receipt.clone(),
        },
        None => Renewed::Lost,
    }
}

/// Marks a held run finished: its message is off the queue.
pub(super) fn finishing(now_ms: i64, windows: Windows) -> impl Fn(&mut RunRecord) {
    move |r| {
        r.finished_at_ms = Some(now_ms);
        r.lease_until_ms = now_ms;
        r.expires_at = (now_ms + ms(windows.dedup)) / 1000;
    }
}

/// Stores where a held run would resume (through [`Ledger::save`], which
/// starts from the record the holder wrote last).
pub(super) fn checkpointing(checkpoint: &str) -> impl Fn(&mut RunRecord) + '_ {
    move |r| r.checkpoint = Some(checkpoint.to_owned())
}

/// Lets a held run go at once (its message is back on the queue), so the
/// next receive need not wait for the lease to expire.
pub(super) fn releasing(r: &mut RunRecord) {
    r.lease_until_ms = 0;
}
