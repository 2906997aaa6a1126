//! Turning a parsed spec into a [`Job`]: everything parsing alone cannot
//! check, each rule beside the field it is about.

use std::collections::{BTreeMap, HashMap, HashSet};

use base64::Engine as _;
use bytes::Bytes;

use super::wire::{AudienceKeys, DeferredSpec, JOB_FORMAT_VERSION, JobSpec, LatestSpec, Segment};
use super::{Capabilities, Job, JobError, Latest, Order, Receipted, Target, deadline};
use crate::connection::{self, BadId, Connection, ConnectionId};
use crate::limits::{
    MAX_AUDIENCE_KEY_BYTES, MAX_AUDIENCE_KEYS, MAX_BROADCAST_KEY_BYTES, MAX_CHANNELS,
    MAX_PARTITION_KEY_BYTES, MAX_PAYLOAD_BYTES, MAX_SPLIT, MAX_SPLIT_BYTES,
};

/// Turns a spec into what it orders (a broadcast, or a cancel), checking
/// everything parsing alone cannot.
pub fn validate(spec: JobSpec, message_id: &str, caps: &Capabilities) -> Result<Order, JobError> {
    if let Some(version) = spec.v.filter(|v| *v > JOB_FORMAT_VERSION) {
        return Err(JobError::NewerFormat {
            version: version.into(),
        });
    }
    version_2_fields(&spec)?;
    if let Some(broadcast) = spec.cancel.clone() {
        return cancel(spec, broadcast);
    }
    broadcast(spec, message_id, caps).map(|job| Order::Broadcast(Box::new(job)))
}

/// A field of format version 2 needs `"v": 2`: a task of an older version
/// then hands the job back instead of dead-lettering it as unknown.
fn version_2_fields(spec: &JobSpec) -> Result<(), JobError> {
    let listed = spec.to.as_ref().is_some_and(|to| {
        to.values()
            .any(|keys| matches!(keys, AudienceKeys::Many(_)))
    });
    let field = if spec.cancel.is_some() {
        "cancel"
    } else if spec.latest.is_some() {
        "latest"
    } else if spec.deliver_by.is_some() {
        "deliver_by"
    } else if listed {
        "to (a list of keys)"
    } else if spec.to.is_some() && spec.deferred.is_some() {
        "to (beside deferred)"
    } else {
        return Ok(());
    };
    if spec.v.unwrap_or(1) < 2 {
        return Err(JobError::NeedsVersion { field, version: 2 });
    }
    Ok(())
}

/// A cancel names a broadcast key and nothing else.
fn cancel(spec: JobSpec, broadcast: String) -> Result<Order, JobError> {
    let alone = JobSpec {
        v: spec.v,
        cancel: spec.cancel.clone(),
        ..JobSpec::default()
    };
    if spec != alone {
        return Err(JobError::CancelAlone);
    }
    if broadcast.is_empty() {
        return Err(JobError::EmptyValue { field: "cancel" });
    }
    if broadcast.len() > MAX_BROADCAST_KEY_BYTES {
        return Err(JobError::KeyTooLong {
            field: "cancel",
            value: shown(&broadcast),
            len: broadcast.len(),
            limit: MAX_BROADCAST_KEY_BYTES,
        });
    }
    Ok(Order::Cancel { broadcast })
}

/// A broadcast job.
fn broadcast(spec: JobSpec, message_id: &str, caps: &Capabilities) -> Result<Job, JobError> {
    // An empty key would make every such job one broadcast.
    if spec.id.as_deref() == Some("") {
        return Err(JobError::EmptyValue { field: "id" });
    }
    let payload = payload(spec.data, spec.data_base64)?;
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(JobError::TooLarge {
            size: payload.len(),
        });
    }
    let selected = Selected {
        channel: spec.channel,
        channels: spec.channels,
        to: spec.to,
        connections: spec.connections,
        deferred: spec.deferred,
    };
    let (target, receipts) = selected.target(spec.split.is_some(), caps)?;
    let exclude = checked_ids("exclude", spec.exclude)?.into_iter().collect();
    shares(spec.split, spec.segment, payload.len(), &target)?;
    let deliver_by = spec.deliver_by.as_ref().map(deadline::read).transpose()?;
    let latest = spec
        .latest
        .map(|l| stream(l, &target, spec.split))
        .transpose()?;
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
        deliver_by,
        receipts,
        latest,
        wrap: spec.wrap,
        round_end: None,
    })
}

/// The audience selectors a spec carries: at most one, and a hand-on's
/// `deferred` list alone.
struct Selected {
    channel: Option<String>,
    channels: Option<Vec<String>>,
    to: Option<BTreeMap<String, AudienceKeys>>,
    connections: Option<Vec<String>>,
    deferred: Option<Vec<DeferredSpec>>,
}

impl Selected {
    /// The target, and the keys whose receipts its report gives: a `to`
    /// audience's, or those a continuation of deferred connections
    /// carries beside its list.
    fn target(
        self,
        split: bool,
        caps: &Capabilities,
    ) -> Result<(Target, Option<Receipted>), JobError> {
        let receipts = match &self.to {
            Some(to) => {
                let (name, keys) = audience(to.clone(), caps)?;
                let of = deferred_of(self.deferred.as_deref(), keys.len());
                Some(Receipted {
                    name,
                    keys,
                    of,
                    reached: Vec::new(),
                })
            }
            None => None,
        };
        let target = self.selector(split, caps)?;
        Ok((target, receipts))
    }

    fn selector(self, split: bool, caps: &Capabilities) -> Result<Target, JobError> {
        let given: Vec<&'static str> = [
            ("channel", self.channel.is_some()),
            ("channels", self.channels.is_some()),
            ("to", self.to.is_some()),
            ("connections", self.connections.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect();
        // A deferred list may carry its broadcast's `to` keys, for their
        // receipts: it is still read from the list alone.
        if self.deferred.is_some() && (given.iter().any(|g| *g != "to") || split) {
            return Err(JobError::DeferredAlone);
        }
        if let [first, second, ..] = given[..] {
            return Err(JobError::TwoAudiences { first, second });
        }
        if let Some(connections) = self.deferred {
            deferred(connections)
        } else if let Some(channel) = self.channel {
            one_channel(channel, caps)
        } else if let Some(channels) = self.channels {
            several_channels(channels, caps)
        } else if let Some(to) = self.to {
            let (name, values) = audience(to, caps)?;
            Ok(Target::Audience { name, values })
        } else if let Some(ids) = self.connections {
            Ok(Target::Connections(first_occurrences(checked_ids(
                "connections",
                ids,
            )?)))
        } else {
            Ok(Target::All)
        }
    }
}

/// A hand-on's deferred connections, with the row keys they were read
/// with.
fn deferred(connections: Vec<DeferredSpec>) -> Result<Target, JobError> {
    let ids = ids_of(
        "deferred",
        connections.iter().map(|d| d.id.clone()).collect(),
    )?;
    Ok(Target::Deferred(
        ids.into_iter()
            .zip(connections)
            .map(|(id, d)| Connection::new(id, d.key))
            .collect(),
    ))
}

fn one_channel(channel: String, caps: &Capabilities) -> Result<Target, JobError> {
    if channel.is_empty() {
        return Err(JobError::EmptyValue { field: "channel" });
    }
    key_value("channel", &channel)?;
    if !caps.channels {
        return Err(JobError::ChannelsUnsupported);
    }
    Ok(Target::Channel(channel))
}

fn several_channels(channels: Vec<String>, caps: &Capabilities) -> Result<Target, JobError> {
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
    Ok(match <[String; 1]>::try_from(channels) {
        // One channel is that channel, with its cursor.
        Ok([one]) => Target::Channel(one),
        Err(several) => Target::Channels(several),
    })
}

/// A stream's update: a key within bounds, on an audience read in one
/// order each time (one channel, one `to` key; or a continuation's list).
fn stream(spec: LatestSpec, target: &Target, split: Option<u32>) -> Result<Latest, JobError> {
    if spec.key.is_empty() {
        return Err(JobError::EmptyValue {
            field: "latest.key",
        });
    }
    if spec.key.len() > MAX_BROADCAST_KEY_BYTES {
        return Err(JobError::KeyTooLong {
            field: "latest.key",
            value: shown(&spec.key),
            len: spec.key.len(),
            limit: MAX_BROADCAST_KEY_BYTES,
        });
    }
    if split.is_some_and(|n| n > 1) {
        return Err(JobError::LatestSplit);
    }
    match target {
        Target::Channel(_) | Target::Deferred(_) => {}
        Target::Audience { values, .. } if values.len() == 1 => {}
        other => {
            return Err(JobError::LatestNeedsOneQuery {
                audience: other.to_string(),
            });
        }
    }
    Ok(Latest {
        key: spec.key,
        seq: spec.seq,
    })
}

/// A split into shares, or one share: within bounds, and of the whole
/// table (or a hand-on of one).
fn shares(
    split: Option<u32>,
    segment: Option<Segment>,
    payload: usize,
    target: &Target,
) -> Result<(), JobError> {
    if split.is_some_and(|n| n == 0 || n > MAX_SPLIT) {
        return Err(JobError::BadSplit);
    }
    if let Some(split) = split
        && split as usize * payload > MAX_SPLIT_BYTES
    {
        return Err(JobError::SplitTooLarge { split, payload });
    }
    if segment.is_some_and(|s| s.total == 0 || s.total > MAX_SPLIT || s.index >= s.total) {
        return Err(JobError::BadSegment);
    }
    let deferred = matches!(target, Target::Deferred(_));
    if (split.is_some_and(|n| n > 1) || segment.is_some()) && *target != Target::All && !deferred {
        return Err(JobError::SplitNeedsTable);
    }
    Ok(())
}

/// The one named audience `to` selects and its keys (one, or a list of
/// format version 2), checked against the configured names; a key listed
/// twice is read once.
fn audience(
    to: BTreeMap<String, AudienceKeys>,
    caps: &Capabilities,
) -> Result<(String, Vec<String>), JobError> {
    let count = to.len();
    let Ok([(name, keys)]) =
        <[(String, AudienceKeys); 1]>::try_from(to.into_iter().collect::<Vec<_>>())
    else {
        return Err(JobError::ToNeedsOne { count });
    };
    let keys = match keys {
        AudienceKeys::One(key) => {
            key_value("to", &key)?;
            vec![key]
        }
        AudienceKeys::Many(keys) => listed_keys(keys)?,
    };
    if name.is_empty() || keys.iter().any(String::is_empty) {
        return Err(JobError::EmptyValue { field: "to" });
    }
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
    Ok((name, keys))
}

/// A `to` list: not empty, each key within its bound, each once, at most
/// [`MAX_AUDIENCE_KEYS`] of them.
fn listed_keys(keys: Vec<String>) -> Result<Vec<String>, JobError> {
    if keys.is_empty() {
        return Err(JobError::EmptyList { field: "to" });
    }
    for key in &keys {
        if key.len() > MAX_AUDIENCE_KEY_BYTES {
            return Err(JobError::KeyTooLong {
                field: "to",
                value: shown(key),
                len: key.len(),
                limit: MAX_AUDIENCE_KEY_BYTES,
            });
        }
    }
    let mut seen = HashSet::new();
    let keys: Vec<String> = keys
        .into_iter()
        .filter(|k| seen.insert(k.clone()))
        .collect();
    if keys.len() > MAX_AUDIENCE_KEYS {
        return Err(JobError::TooManyKeys { count: keys.len() });
    }
    Ok(keys)
}

/// Which key each deferred connection was read for, as its entry says
/// (an index past the list names none).
fn deferred_of(deferred: Option<&[DeferredSpec]>, keys: usize) -> HashMap<ConnectionId, u32> {
    deferred
        .unwrap_or_default()
        .iter()
        .filter_map(|d| {
            let of = d.of.filter(|i| (*i as usize) < keys)?;
            Some((ConnectionId::from(d.id.clone()), of))
        })
        .collect()
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
