//! The job on the wire: the JSON producers write (and fanout writes on
//! its hand-ons), the SNS envelope it may come in, and the format version.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::connection::RowKey;
use crate::store::Cursor;

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
    /// One named audience (one of the deployment's audience indexes) and its key, e.g.
    /// `{"user": "u-42"}`, or a list of keys (format version 2),
    /// `{"user": ["u-1", "u-2"]}`: exactly one entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<BTreeMap<String, AudienceKeys>>,
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
    /// Format version 2: deliver nothing after this instant, RFC 3339 text
    /// or epoch milliseconds (see [`super::deadline`]). fanout writes it on
    /// hand-ons as epoch milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliver_by: Option<serde_json::Value>,
    /// Format version 2: this job stops the broadcast with this key, on
    /// every task; nothing else but `v` comes with it (see
    /// [`super::Order::Cancel`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<String>,
    /// Format version 2: this job is an update of a stream of values, of
    /// which only the newest matters (see [`super::Latest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<LatestSpec>,
    /// Set by fanout on a newer update that takes over from an older one:
    /// after the audience's end, read it again from its start, up to the
    /// first connection this update sent to. Producers leave it out.
    #[serde(default, skip_serializing_if = "is_false")]
    pub wrap: bool,
}

/// `latest` as producers write it: the stream's key and this update's
/// place in it, by the producer's own sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatestSpec {
    pub key: String,
    pub seq: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One deferred connection in a continuation job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeferredSpec {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RowKey>,
    /// The audience key it was read for: its index in the job's `to` list,
    /// so the run that retries it can say whether that key was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of: Option<u32>,
}

/// The key or keys of a named audience: one string, or a list (format
/// version 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum AudienceKeys {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for AudienceKeys {
    /// Read by hand: an untagged enum would refuse a wrong value without
    /// saying what was wanted.
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let wrong = || {
            serde::de::Error::custom(
                "expected an audience key (a string) or a list of keys (strings)",
            )
        };
        match serde_json::Value::deserialize(de)? {
            serde_json::Value::String(key) => Ok(Self::One(key)),
            serde_json::Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    serde_json::Value::String(key) => Ok(key),
                    _ => Err(wrong()),
                })
                .collect::<Result<_, _>>()
                .map(Self::Many),
            _ => Err(wrong()),
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

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

/// The newest job format this build reads (see [`JobSpec::v`]). Version 2
/// adds `deliver_by`, `cancel`, lists of `to` keys and `latest`.
pub const JOB_FORMAT_VERSION: u32 = 2;
