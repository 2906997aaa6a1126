//! Hand-ons: the jobs fanout writes itself to carry a broadcast on (a
//! continuation from resume points, deferred connections, one connection,
//! the shares of a split), each within one SQS message.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;

use super::wire::{AudienceKeys, DeferredSpec, JobSpec, Segment};
use super::{Job, Target};
use crate::connection::{Connection, ConnectionId};
use crate::limits::{CONTINUATION_HEADROOM, MAX_SQS_MESSAGE_BYTES};
use crate::store::Cursor;

/// Continuation bodies stay a little under SQS's message size, leaving room
/// for the message's attributes.
pub const MAX_CONTINUATION_BYTES: usize = MAX_SQS_MESSAGE_BYTES - CONTINUATION_HEADROOM;

/// A deferred connection that cannot be continued: one entry alone does not
/// fit in a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a continuation for connection {id} would exceed {MAX_CONTINUATION_BYTES} bytes")]
pub struct TooLargeToContinue {
    pub id: String,
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
            Target::Audience { name, values } => to = Some(audience_keys(name, values)),
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
        let listed = matches!(&self.target, Target::Audience { values, .. } if values.len() > 1);
        JobSpec {
            // Version 1 has no deadline and no list of keys: an older task
            // must hand such a job back, not send it late or refuse it.
            v: (self.deliver_by.is_some() || listed || self.latest.is_some()).then_some(2),
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
            deliver_by: self.deliver_by.map(serde_json::Value::from),
            cancel: None,
            latest: self.latest.as_ref().map(|l| super::LatestSpec {
                key: l.key.clone(),
                seq: l.seq,
            }),
            wrap: self.wrap,
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
        self.deferred_continuations_of(connections, &HashMap::new(), max_bytes)
    }

    /// [`Job::deferred_continuations`], each connection with the index of
    /// the `to` key it was read for (`of`), so the continuation's report
    /// gives that key's receipt.
    pub fn deferred_continuations_of(
        &self,
        connections: &[Connection],
        of: &HashMap<ConnectionId, u32>,
        max_bytes: usize,
    ) -> Result<Vec<String>, TooLargeToContinue> {
        // The segment stays: it tells this share's hand-ons apart from the
        // other shares'.
        let mut base = self.listing_alone();
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
            let mut entry = deferred_spec(connection);
            entry.of = of.get(&connection.id).copied();
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

    /// The continuation that lists its connections itself: a `deferred`
    /// list comes alone, so the audience it was read from goes (the parser
    /// refuses a selector beside it).
    ///
    /// Beside it, a `to` broadcast's keys go on for their receipts: the
    /// list is still what is read. An older task cannot read that, so it
    /// takes format version 2.
    fn listing_alone(&self) -> JobSpec {
        let mut spec = self.continuation(Vec::new());
        spec.resume = None;
        spec.channel = None;
        spec.channels = None;
        spec.to = None;
        spec.connections = None;
        // The list is read as it is, not round from a point.
        spec.wrap = false;
        if let Some(receipts) = &self.receipts {
            spec.to = Some(audience_keys(&receipts.name, &receipts.keys));
            spec.v = Some(2);
        }
        spec
    }

    /// A job for one connection alone, as it is dead-lettered once it has
    /// been deferred too often.
    pub fn for_one(&self, connection: &Connection) -> JobSpec {
        let mut spec = self.listing_alone();
        spec.segment = None;
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

pub(crate) fn deferred_spec(connection: &Connection) -> DeferredSpec {
    DeferredSpec {
        id: connection.id.to_string(),
        key: connection.key.clone(),
        of: None,
    }
}

/// `to` as a job writes it: one key as a string (which every version
/// reads), several as a list.
fn audience_keys(name: &str, keys: &[String]) -> BTreeMap<String, AudienceKeys> {
    let keys = match keys {
        [one] => AudienceKeys::One(one.clone()),
        several => AudienceKeys::Many(several.to_vec()),
    };
    BTreeMap::from([(name.to_owned(), keys)])
}
