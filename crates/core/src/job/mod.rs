//! The broadcast job: the JSON producers put on the queue, and its parser.
//!
//! Parsing is pure: a message body in, a [`Job`] or a [`JobError`] naming
//! the offending field out. A job that fails here is a permanent failure and
//! goes to the dead-letter queue with [`JobError`]'s text as the reason.
//!
//! ```json
//! {"id": "news-42", "data": {"headline": "…"}, "channel": "sports", "exclude": ["L0SM9cOFvHcCIhw="]}
//! ```
//!
//! A job names at most one audience selector: none (everyone), `channel`,
//! `channels`, `to` (a named audience) or `connections`.

pub mod deadline;
mod handon;
pub mod keys;
mod parse;
mod validate;
mod wire;

use std::collections::{HashMap, HashSet};
use std::fmt;

use bytes::Bytes;

use crate::connection::{BadId, Connection, ConnectionId};
use crate::store::Cursor;

pub use crate::limits::{MAX_CHANNELS, MAX_PAYLOAD_BYTES, MAX_SPLIT, MAX_SPLIT_BYTES};
pub(crate) use handon::deferred_spec;
pub use handon::{MAX_CONTINUATION_BYTES, TooLargeToContinue};
pub use parse::{parse, read};
pub use validate::validate;
pub use wire::{AudienceKeys, DeferredSpec, JOB_FORMAT_VERSION, JobSpec, LatestSpec, Segment};

/// Who a job goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every connection in the table.
    All,
    /// Connections whose channel attribute equals this.
    Channel(String),
    /// Connections in any of these channels (at least one, no repeats),
    /// each sent to once.
    Channels(Vec<String>),
    /// The rows of a named audience's index whose key is one of `values`
    /// (at least one, no repeats), read key after key.
    Audience { name: String, values: Vec<String> },
    /// Exactly these connections.
    Connections(Vec<ConnectionId>),
    /// Exactly these connections, deferred by an earlier run of the job,
    /// with their row keys.
    Deferred(Vec<Connection>),
}

/// A parsed, valid broadcast job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// The producer's id, or the queue message id.
    pub id: String,
    /// The bytes every connection receives; shared by all sends.
    pub payload: Bytes,
    pub target: Target,
    pub exclude: HashSet<ConnectionId>,
    /// Where to resume an interrupted broadcast.
    pub resume: Option<Vec<Cursor>>,
    /// The share of the table this job covers, when it is part of a split
    /// broadcast.
    pub segment: Option<Segment>,
    /// Segment jobs the producer asked this broadcast to split into.
    pub split: Option<u32>,
    /// Continuations its connections were deferred across (with
    /// [`Target::Deferred`]).
    pub deferrals: u32,
    /// Which hand-on of its broadcast this is (0: the producer's job).
    pub continuation: u32,
    /// Which message of that hand-on.
    pub part: u32,
    /// Epoch ms after which nothing of it is sent (`deliver_by`).
    pub deliver_by: Option<i64>,
    /// The audience keys whose receipts its report gives: a `to`
    /// broadcast's, or those a continuation of its deferred connections
    /// carries on.
    pub receipts: Option<Receipted>,
    /// The stream of updates it belongs to, of which the newest wins.
    pub latest: Option<Latest>,
    /// A newer update taking over from an older one: past the audience's
    /// end, it reads again from the start (see `engine::audience`).
    pub wrap: bool,
    /// With `wrap`, where the round ends (exclusive), when a stream's run
    /// knows it: the first connection its last round sent the newest value
    /// to. Not on the wire: a continuation goes round to where it began.
    pub round_end: Option<ConnectionId>,
}

/// A stream of updates to one audience, ordered by the producer's sequence:
/// an update older than one already started is not sent, and a newer one
/// stops an older one still sending and takes over where it stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Latest {
    pub key: String,
    pub seq: u64,
}

/// The keys of a `to` broadcast, for its receipts: whether any connection
/// read for a key accepted the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipted {
    /// The named audience.
    pub name: String,
    pub keys: Vec<String>,
    /// For connections not read by key (a continuation's deferred list):
    /// the index in `keys` of the key each was read for.
    pub of: HashMap<ConnectionId, u32>,
    /// Keys an earlier run of this very run reached before its task
    /// stopped, from its checkpoint.
    pub reached: Vec<u32>,
}

/// What a message on the jobs queue orders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Order {
    /// Send this broadcast.
    Broadcast(Box<Job>),
    /// Stop the broadcast with this broadcast key, on every task, now and
    /// whenever a piece of it comes later.
    Cancel { broadcast: String },
}

impl Order {
    /// The broadcast it orders; a cancel is no broadcast.
    pub fn into_job(self) -> Result<Job, JobError> {
        match self {
            Self::Broadcast(job) => Ok(*job),
            Self::Cancel { .. } => Err(JobError::NotABroadcast),
        }
    }
}

impl Job {
    /// A producer's job of `payload` to `target`, with no exclusions and
    /// nothing handed on yet.
    pub fn new(id: impl Into<String>, payload: Bytes, target: Target) -> Self {
        Self {
            id: id.into(),
            payload,
            target,
            exclude: HashSet::new(),
            resume: None,
            segment: None,
            split: None,
            deferrals: 0,
            continuation: 0,
            part: 0,
            deliver_by: None,
            receipts: None,
            latest: None,
            wrap: false,
            round_end: None,
        }
    }
}

impl fmt::Display for Target {
    /// How logs name the audience: `everyone`, `channel sports`,
    /// `channels a,b`, `to user=u-42`, `to user (3 keys)`, `connections (3)`,
    /// `deferred (5)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("everyone"),
            Self::Channel(channel) => write!(f, "channel {channel}"),
            Self::Channels(channels) => write!(f, "channels {}", channels.join(",")),
            Self::Audience { name, values } => match &values[..] {
                [one] => write!(f, "to {name}={one}"),
                several => write!(f, "to {name} ({} keys)", several.len()),
            },
            Self::Connections(ids) => write!(f, "connections ({})", ids.len()),
            Self::Deferred(connections) => write!(f, "deferred ({})", connections.len()),
        }
    }
}

/// What this deployment can serve, which parsing checks jobs against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Whether a channel index is configured.
    pub channels: bool,
    /// The named audiences configured for `to`; `None` takes any name (a
    /// producer's check, which need not know the worker's indexes).
    pub audiences: Option<Vec<String>>,
}

/// Why a message is not a job this deployment can run. Permanent: the same
/// body fails the same way every time.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobError {
    /// Written for a newer fanout: handed back, never dead-lettered.
    #[error(
        "the job needs format version {version}; this task reads up to {JOB_FORMAT_VERSION}, so \
         it leaves the job to a newer task"
    )]
    NewerFormat { version: u64 },
    #[error("the body is not a valid job: {path}: {reason}")]
    Malformed { path: String, reason: String },
    #[error("the job has neither `data` nor `data_base64`")]
    NoData,
    #[error("the job has both `data` and `data_base64`; send one")]
    BothData,
    #[error("`data` is null; send a value, or an empty string")]
    NullData,
    #[error("`data_base64` is not valid base64: {0}")]
    BadBase64(String),
    #[error(
        "the payload is {size} bytes; API Gateway takes at most {MAX_PAYLOAD_BYTES} bytes per message"
    )]
    TooLarge { size: usize },
    #[error("`{first}` and `{second}` cannot be combined; send one audience selector")]
    TwoAudiences {
        first: &'static str,
        second: &'static str,
    },
    #[error("`{field}` contains an empty string")]
    EmptyValue { field: &'static str },
    #[error("`{field}` is an empty list; leave it out to send to everyone")]
    EmptyList { field: &'static str },
    #[error(
        "`to` lists {count} keys; a job takes at most {MAX_AUDIENCE_KEYS} (send several jobs)",
        MAX_AUDIENCE_KEYS = crate::limits::MAX_AUDIENCE_KEYS
    )]
    TooManyKeys { count: usize },
    #[error("`to` must name exactly one audience, as {{\"user\": \"u-42\"}}; it names {count}")]
    ToNeedsOne { count: usize },
    #[error(
        "the audience `{name}` is not configured here; {setting} names {known}",
        setting = crate::limits::setting::Setting::AudienceIndexes
    )]
    UnknownAudience { name: String, known: String },
    #[error(
        "the job names a channel but this deployment has no channel index ({setting})",
        setting = crate::limits::setting::Setting::ChannelIndex
    )]
    ChannelsUnsupported,
    #[error(
        "`split` and `segment` apply to whole-table broadcasts only, not to a channel, an audience or a list"
    )]
    SplitNeedsTable,
    #[error("`split` must be between 1 and {MAX_SPLIT}")]
    BadSplit,
    #[error("`segment` must have index < total <= {MAX_SPLIT}")]
    BadSegment,
    #[error(
        "`deferred` is set by fanout on continuation jobs, alone: not with `channel`, `channels`, `to`, `connections` or `split`"
    )]
    DeferredAlone,
    #[error(
        "`channels` names {count} channels; a job takes at most {MAX_CHANNELS} (send several jobs, or use a named audience with `to`)"
    )]
    TooManyChannels { count: usize },
    #[error(
        "`split` {split} copies the {payload}-byte payload into {total} bytes of jobs; at most {MAX_SPLIT_BYTES} (split fewer ways, or send a smaller payload)",
        total = *split as usize * payload
    )]
    SplitTooLarge { split: u32, payload: usize },
    #[error(
        "`{field}` holds a value of {len} bytes ({value}); DynamoDB takes at most {limit} bytes in a key"
    )]
    KeyTooLong {
        field: &'static str,
        /// The value's start, for the reason (the whole may be kilobytes).
        value: String,
        len: usize,
        limit: usize,
    },
    #[error(
        "`{field}` belongs to job format version {version}: add \"v\": {version}, so that a task \
         of an older version hands the job back instead of dead-lettering it"
    )]
    NeedsVersion { field: &'static str, version: u32 },
    #[error("`deliver_by`: {reason}")]
    BadDeadline { reason: String },
    #[error(
        "`deliver_by` is {deadline}, more than {days} days ahead: SQS keeps a job at most 14 days, \
         so a later deadline is a mistake (epoch microseconds for milliseconds?)",
        days = crate::limits::MAX_DEADLINE_AHEAD.as_secs() / 86_400
    )]
    DeadlineTooFar { deadline: String },
    #[error("a cancel job names the broadcast to stop and nothing else: `v` and `cancel` alone")]
    CancelAlone,
    #[error(
        "`latest` applies to one `channel` or one `to` key, read in one order each time; \
         this job's audience is {audience}"
    )]
    LatestNeedsOneQuery { audience: String },
    #[error("`latest` cannot be combined with `split`: a stream's updates are read in one pass")]
    LatestSplit,
    #[error("the job is a cancel, not a broadcast")]
    NotABroadcast,
    #[error("`{field}` holds {id:?}, which is not an API Gateway connection id: {problem}")]
    BadConnectionId {
        field: &'static str,
        /// The id's start, for the reason.
        id: String,
        problem: BadId,
    },
}

impl JobError {
    /// Whether another task (a newer one) may run it: the message goes
    /// back to the queue, not to the dead-letter queue.
    pub fn is_for_a_newer_task(&self) -> bool {
        matches!(self, Self::NewerFormat { .. })
    }
}

#[cfg(test)]
mod tests;
