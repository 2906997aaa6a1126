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

pub mod keys;

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::connection::{self, BadId, Connection, ConnectionId, RowKey};
use crate::store::Cursor;

use crate::limits::{CONTINUATION_HEADROOM, MAX_PARTITION_KEY_BYTES, MAX_SQS_MESSAGE_BYTES};
pub use crate::limits::{MAX_CHANNELS, MAX_PAYLOAD_BYTES, MAX_SPLIT, MAX_SPLIT_BYTES};

/// The job as producers write it. Unknown fields are refused, so a typo
/// (`"chanel"`) fails loudly instead of broadcasting to everyone.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The version of the job format this body needs (absent: 1). A task
    /// that meets a newer one hands the message back for a newer task
    /// instead of dead-lettering it: during a rolling deploy, old and new
    /// tasks read one queue. fanout writes it on a hand-on only when the
    /// hand-on uses something version 1 lacks, so old tasks keep reading
    /// what they can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    /// The broadcast key: an idempotency key, unique per broadcast (with
    /// run records, a second job with the same id within the dedup window
    /// is not broadcast again); defaults to the queue's message id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A string is sent as its UTF-8 text; any other JSON value as its
    /// compact JSON text.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub data: Option<serde_json::Value>,
    /// Binary data, base64 (standard alphabet, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// Only connections in this channel (read from the channel index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Only connections in any of these channels, each sent to once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
    /// One named audience (`FANOUT_AUDIENCE_INDEXES`) and its key, e.g.
    /// `{"user": "u-42"}`: exactly one entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<BTreeMap<String, String>>,
    /// Only these connections; the table is not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<Vec<String>>,
    /// Connections to skip (e.g. the sender).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// Split a whole-table broadcast into this many segment jobs, put back
    /// on the queue so several workers share it (overrides the worker's
    /// `split_segments`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<u32>,
    /// Set by fanout on the jobs of a split broadcast: which share of the
    /// table this job covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<Segment>,
    /// Set by fanout on a continuation job: where each audience segment
    /// resumes. Producers leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Vec<Cursor>>,
    /// Set by fanout on a continuation of deferred connections: exactly
    /// these, with the row keys they were read with (so a gone one can still
    /// be removed). Producers leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred: Option<Vec<DeferredSpec>>,
    /// Set by fanout with `deferred`: how many continuations these
    /// connections have been deferred across.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deferrals: u32,
    /// Set by fanout on the jobs a run hands on: one more than the run's
    /// own (see [`crate::job::keys::RunKey`]). Producers leave it out.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub continuation: u32,
    /// Set by fanout when a hand-on takes several messages: which of them
    /// this is.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub part: u32,
}

/// One deferred connection in a continuation job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeferredSpec {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RowKey>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Continuation bodies stay a little under SQS's message size, leaving room
/// for the message's attributes.
pub const MAX_CONTINUATION_BYTES: usize = MAX_SQS_MESSAGE_BYTES - CONTINUATION_HEADROOM;

/// One share of a split broadcast: scan segment `index` of `total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub index: u32,
    pub total: u32,
}

/// Keeps an explicit `"data": null` apart from a missing `data`.
fn present<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(de).map(Some)
}

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
    /// The rows of a named audience's index whose key equals `value`.
    Audience { name: String, value: String },
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
}

impl fmt::Display for Target {
    /// How logs name the audience: `everyone`, `channel sports`,
    /// `channels a,b`, `to user=u-42`, `connections (3)`, `deferred (5)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("everyone"),
            Self::Channel(channel) => write!(f, "channel {channel}"),
            Self::Channels(channels) => write!(f, "channels {}", channels.join(",")),
            Self::Audience { name, value } => write!(f, "to {name}={value}"),
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
    #[error("`to` must name exactly one audience, as {{\"user\": \"u-42\"}}; it names {count}")]
    ToNeedsOne { count: usize },
    #[error("the audience `{name}` is not configured here; FANOUT_AUDIENCE_INDEXES names {known}")]
    UnknownAudience { name: String, known: String },
    #[error(
        "the job names a channel but this deployment has no channel index (FANOUT_CHANNEL_INDEX)"
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
    #[error("`{field}` holds {id:?}, which is not an API Gateway connection id: {problem}")]
    BadConnectionId {
        field: &'static str,
        /// The id's start, for the reason.
        id: String,
        problem: BadId,
    },
}

/// A deferred connection that cannot be continued: one entry alone does not
/// fit in a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a continuation for connection {id} would exceed {MAX_CONTINUATION_BYTES} bytes")]
pub struct TooLargeToContinue {
    pub id: String,
}

/// An SNS notification, as SNS delivers to SQS without raw message delivery.
#[derive(Deserialize)]
struct SnsEnvelope {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Message")]
    message: String,
    /// The broadcast key of a notification without an `id`: SNS keeps it
    /// across its own redeliveries, which come with new SQS message ids.
    #[serde(rename = "MessageId", default)]
    message_id: Option<String>,
}

impl Job {
    /// The job that finishes this one from `resume`: same id, payload,
    /// audience and exclusions, the next continuation number.
    pub fn continuation(&self, resume: Vec<Cursor>) -> JobSpec {
        let (data, data_base64) = match std::str::from_utf8(&self.payload) {
            Ok(text) => (Some(serde_json::Value::String(text.to_owned())), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&self.payload)),
            ),
        };
        let (mut channel, mut channels, mut to, mut connections) = (None, None, None, None);
        match &self.target {
            Target::All | Target::Deferred(_) => {}
            Target::Channel(c) => channel = Some(c.clone()),
            Target::Channels(cs) => channels = Some(cs.clone()),
            Target::Audience { name, value } => {
                to = Some(BTreeMap::from([(name.clone(), value.clone())]));
            }
            Target::Connections(ids) => {
                connections = Some(ids.iter().map(ToString::to_string).collect());
            }
        }
        let deferred = match &self.target {
            Target::Deferred(connections) => Some(connections.iter().map(deferred_spec).collect()),
            _ => None,
        };
        let mut exclude: Vec<String> = self.exclude.iter().map(ToString::to_string).collect();
        exclude.sort();
        JobSpec {
            v: None,
            id: Some(self.id.clone()),
            data,
            data_base64,
            channel,
            channels,
            to,
            connections,
            exclude,
            split: None,
            segment: self.segment,
            resume: Some(resume),
            deferred,
            deferrals: self.deferrals,
            continuation: self.continuation + 1,
            part: 0,
        }
    }

    /// The continuation jobs that go on with `connections`, deferred by this
    /// run: same id, payload and exclusions, exactly those connections, one
    /// more deferral; as message bodies, as many as it takes to keep each
    /// under `max_bytes`.
    pub fn deferred_continuations(
        &self,
        connections: &[Connection],
        max_bytes: usize,
    ) -> Result<Vec<String>, TooLargeToContinue> {
        // The segment stays: it tells this share's hand-ons apart from the
        // other shares'.
        let mut base = self.continuation(Vec::new());
        base.resume = None;
        base.deferred = Some(Vec::new());
        base.deferrals = self.deferrals + 1;
        // `"deferred":[]` holds the list; each entry adds its JSON and a
        // comma.
        let base_len = serde_json::to_string(&base).map_or(0, |b| b.len());
        let mut bodies = Vec::new();
        let mut chunk: Vec<DeferredSpec> = Vec::new();
        let mut len = base_len;
        // Each body also carries its part number (`,"part":N`), kept free.
        let base_len = base_len + 16;
        let encode = |chunk: Vec<DeferredSpec>, part: u32| {
            let mut spec = base.clone();
            spec.deferred = Some(chunk);
            spec.part = part;
            serde_json::to_string(&spec).expect("a job spec always encodes")
        };
        for connection in connections {
            let entry = deferred_spec(connection);
            let entry_len = serde_json::to_string(&entry).map_or(0, |e| e.len()) + 1;
            if base_len + entry_len > max_bytes {
                return Err(TooLargeToContinue {
                    id: entry.id.clone(),
                });
            }
            if len + entry_len > max_bytes {
                bodies.push(encode(std::mem::take(&mut chunk), bodies.len() as u32));
                len = base_len;
            }
            len += entry_len;
            chunk.push(entry);
        }
        if !chunk.is_empty() {
            bodies.push(encode(chunk, bodies.len() as u32));
        }
        Ok(bodies)
    }

    /// A job for one connection alone, as it is dead-lettered once it has
    /// been deferred too often.
    pub fn for_one(&self, connection: &Connection) -> JobSpec {
        let mut spec = self.continuation(Vec::new());
        spec.resume = None;
        spec.segment = None;
        spec.channel = None;
        spec.channels = None;
        spec.to = None;
        spec.connections = None;
        spec.deferred = Some(vec![deferred_spec(connection)]);
        spec.deferrals = self.deferrals;
        spec.part = 0;
        spec
    }

    /// The segment jobs of this broadcast split `total` ways, each covering
    /// one scan segment. They keep its id (the broadcast key); the segment
    /// tells their runs apart.
    pub fn split_into(&self, total: u32) -> Vec<JobSpec> {
        (0..total)
            .map(|index| {
                let mut spec = self.continuation(Vec::new());
                spec.segment = Some(Segment { index, total });
                spec.resume = None;
                spec.continuation = 0;
                spec
            })
            .collect()
    }
}

/// The newest job format this build reads (see [`JobSpec::v`]).
pub const JOB_FORMAT_VERSION: u32 = 1;

impl JobError {
    /// Whether another task (a newer one) may run it: the message goes
    /// back to the queue, not to the dead-letter queue.
    pub fn is_for_a_newer_task(&self) -> bool {
        matches!(self, Self::NewerFormat { .. })
    }
}

/// The format version a body names, read before its fields are checked: a
/// newer body may carry fields this build refuses as unknown.
fn newer_format(body: &str) -> Option<u64> {
    if !body.contains("\"v\"") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    let version = value.get("v")?.as_u64()?;
    (version > u64::from(JOB_FORMAT_VERSION)).then_some(version)
}

/// Parses a message body (a job, or an SNS notification wrapping one).
pub fn parse(body: &str, message_id: &str, caps: &Capabilities) -> Result<Job, JobError> {
    let unwrapped;
    let mut message_id = message_id;
    let sns_id;
    let body = match serde_json::from_str::<SnsEnvelope>(body) {
        Ok(envelope) if envelope.kind == "Notification" => {
            unwrapped = envelope.message;
            if let Some(id) = envelope.message_id.filter(|id| !id.is_empty()) {
                sns_id = id;
                message_id = &sns_id;
            }
            unwrapped.as_str()
        }
        _ => body,
    };
    if let Some(version) = newer_format(body) {
        return Err(JobError::NewerFormat { version });
    }
    let mut de = serde_json::Deserializer::from_str(body);
    let spec: JobSpec = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        JobError::Malformed {
            path: if path == "." { "body".to_owned() } else { path },
            reason: e.into_inner().to_string(),
        }
    })?;
    de.end().map_err(|e| JobError::Malformed {
        path: "body".to_owned(),
        reason: e.to_string(),
    })?;
    validate(spec, message_id, caps)
}

/// Turns a spec into a job, checking everything parsing alone cannot.
pub fn validate(spec: JobSpec, message_id: &str, caps: &Capabilities) -> Result<Job, JobError> {
    if let Some(version) = spec.v.filter(|v| *v > JOB_FORMAT_VERSION) {
        return Err(JobError::NewerFormat {
            version: version.into(),
        });
    }
    let payload = payload(spec.data, spec.data_base64)?;
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(JobError::TooLarge {
            size: payload.len(),
        });
    }
    let selectors: Vec<&'static str> = [
        ("channel", spec.channel.is_some()),
        ("channels", spec.channels.is_some()),
        ("to", spec.to.is_some()),
        ("connections", spec.connections.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, given)| given.then_some(name))
    .collect();
    if spec.deferred.is_some() && (!selectors.is_empty() || spec.split.is_some()) {
        return Err(JobError::DeferredAlone);
    }
    if let [first, second, ..] = selectors[..] {
        return Err(JobError::TwoAudiences { first, second });
    }
    let target = if let Some(connections) = spec.deferred {
        let ids = ids_of(
            "deferred",
            connections.iter().map(|d| d.id.clone()).collect(),
        )?;
        Target::Deferred(
            ids.into_iter()
                .zip(connections)
                .map(|(id, d)| Connection::new(id, d.key))
                .collect(),
        )
    } else if let Some(channel) = spec.channel {
        if channel.is_empty() {
            return Err(JobError::EmptyValue { field: "channel" });
        }
        key_value("channel", &channel)?;
        if !caps.channels {
            return Err(JobError::ChannelsUnsupported);
        }
        Target::Channel(channel)
    } else if let Some(channels) = spec.channels {
        if channels.is_empty() {
            return Err(JobError::EmptyList { field: "channels" });
        }
        if channels.iter().any(String::is_empty) {
            return Err(JobError::EmptyValue { field: "channels" });
        }
        for channel in &channels {
            key_value("channels", channel)?;
        }
        if !caps.channels {
            return Err(JobError::ChannelsUnsupported);
        }
        let mut seen = HashSet::new();
        let channels: Vec<String> = channels
            .into_iter()
            .filter(|c| seen.insert(c.clone()))
            .collect();
        // Counted once repeats are gone: a channel named twice is read once.
        if channels.len() > MAX_CHANNELS {
            return Err(JobError::TooManyChannels {
                count: channels.len(),
            });
        }
        match <[String; 1]>::try_from(channels) {
            // One channel is that channel, with its cursor.
            Ok([one]) => Target::Channel(one),
            Err(several) => Target::Channels(several),
        }
    } else if let Some(to) = spec.to {
        audience(to, caps)?
    } else if let Some(ids) = spec.connections {
        Target::Connections(first_occurrences(checked_ids("connections", ids)?))
    } else {
        Target::All
    };
    let exclude = checked_ids("exclude", spec.exclude)?.into_iter().collect();
    if spec.split.is_some_and(|n| n == 0 || n > MAX_SPLIT) {
        return Err(JobError::BadSplit);
    }
    if let Some(split) = spec.split
        && split as usize * payload.len() > MAX_SPLIT_BYTES
    {
        return Err(JobError::SplitTooLarge {
            split,
            payload: payload.len(),
        });
    }
    if spec
        .segment
        .is_some_and(|s| s.total == 0 || s.total > MAX_SPLIT || s.index >= s.total)
    {
        return Err(JobError::BadSegment);
    }
    let deferred = matches!(target, Target::Deferred(_));
    if (spec.split.is_some_and(|n| n > 1) || spec.segment.is_some())
        && target != Target::All
        && !deferred
    {
        return Err(JobError::SplitNeedsTable);
    }
    Ok(Job {
        id: spec.id.unwrap_or_else(|| message_id.to_owned()),
        payload,
        target,
        exclude,
        resume: spec.resume,
        segment: spec.segment,
        // Splitting a share again would only add jobs.
        split: spec.split.filter(|_| spec.segment.is_none()),
        deferrals: spec.deferrals,
        continuation: spec.continuation,
        part: spec.part,
    })
}

/// The one named audience `to` selects, checked against the configured
/// names.
fn audience(to: BTreeMap<String, String>, caps: &Capabilities) -> Result<Target, JobError> {
    let count = to.len();
    let Ok([(name, value)]) = <[(String, String); 1]>::try_from(to.into_iter().collect::<Vec<_>>())
    else {
        return Err(JobError::ToNeedsOne { count });
    };
    if name.is_empty() || value.is_empty() {
        return Err(JobError::EmptyValue { field: "to" });
    }
    key_value("to", &value)?;
    if let Some(known) = &caps.audiences
        && !known.contains(&name)
    {
        let known = if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        };
        return Err(JobError::UnknownAudience { name, known });
    }
    Ok(Target::Audience { name, value })
}

pub(crate) fn deferred_spec(connection: &Connection) -> DeferredSpec {
    DeferredSpec {
        id: connection.id.to_string(),
        key: connection.key.clone(),
    }
}

fn payload(data: Option<serde_json::Value>, base64: Option<String>) -> Result<Bytes, JobError> {
    match (data, base64) {
        (Some(_), Some(_)) => Err(JobError::BothData),
        (None, None) => Err(JobError::NoData),
        (Some(serde_json::Value::Null), None) => Err(JobError::NullData),
        (Some(serde_json::Value::String(text)), None) => Ok(Bytes::from(text)),
        (Some(value), None) => Ok(Bytes::from(value.to_string())),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded.as_bytes())
            .map(Bytes::from)
            .map_err(|e| JobError::BadBase64(e.to_string())),
    }
}

/// A listed id is one connection: sending to it once per listing would
/// repeat the message. The first listing keeps its place, so the positions a
/// continuation resumes from mean the same list every time the job is parsed.
fn first_occurrences(ids: Vec<ConnectionId>) -> Vec<ConnectionId> {
    let mut seen = HashSet::with_capacity(ids.len());
    ids.into_iter()
        .filter(|id| seen.insert(id.clone()))
        .collect()
}

/// A channel or audience value is the partition key of the index it is
/// read from: one DynamoDB cannot hold is refused here, not retried as a
/// failing Query later.
fn key_value(field: &'static str, value: &str) -> Result<(), JobError> {
    if value.len() > MAX_PARTITION_KEY_BYTES {
        return Err(JobError::KeyTooLong {
            field,
            value: shown(value),
            len: value.len(),
            limit: MAX_PARTITION_KEY_BYTES,
        });
    }
    Ok(())
}

/// A producer's ids, each one API Gateway could have handed out
/// ([`connection::check_id`]).
fn checked_ids(field: &'static str, ids: Vec<String>) -> Result<Vec<ConnectionId>, JobError> {
    ids.into_iter()
        .map(|id| match connection::check_id(&id) {
            Ok(()) => Ok(ConnectionId::from(id)),
            Err(BadId::Empty) => Err(JobError::EmptyValue { field }),
            Err(problem) => Err(JobError::BadConnectionId {
                field,
                id: shown(&id),
                problem,
            }),
        })
        .collect()
}

/// The start of a value, as a reason quotes it: enough to find it, short
/// enough for a log line and a message attribute.
fn shown(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}…", &value[..end]),
        None => value.to_owned(),
    }
}

fn ids_of(field: &'static str, ids: Vec<String>) -> Result<Vec<ConnectionId>, JobError> {
    ids.into_iter()
        .map(|id| {
            if id.is_empty() {
                Err(JobError::EmptyValue { field })
            } else {
                Ok(ConnectionId::from(id))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
