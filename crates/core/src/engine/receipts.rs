//! Receipts: for a `to` broadcast, which of its audience keys had a
//! connection accept the message (a 2xx), which are still being tried
//! (a connection deferred), and which were read to their end in this run.
//! The report turns that into `reached` and `unreached`.
//!
//! A key's connections come from its own segment of the read (key `i` is
//! segment `i`), or, in a continuation of deferred connections, from the
//! index each entry carries; a connection deferred here keeps its key for
//! the passes that retry it and the continuation that goes on with it.

use std::collections::HashMap;
use std::sync::Mutex;

use super::delivery::Delivery;
use super::lock;
use super::summary::{Deferred, KeyReceipts};
use crate::connection::ConnectionId;
use crate::job::{Job, Receipted, Target};
use crate::store::Cursor;

/// One run's receipts, as the answers come.
pub(super) struct Receipts {
    keys: Vec<String>,
    /// Keys whose segment was read to its end before this run began (a
    /// resumed run): not this run's to judge.
    done_before: Vec<bool>,
    state: Mutex<State>,
}

struct State {
    reached: Vec<bool>,
    /// The key of each connection not read by key: listed ones, and those
    /// deferred in this run.
    of: HashMap<ConnectionId, u32>,
}

impl Receipts {
    /// The receipts `job` reports, if it is a `to` broadcast (or carries
    /// one's keys on).
    pub fn of(job: &Job) -> Option<Self> {
        let Receipted {
            keys, of, reached, ..
        } = job.receipts.as_ref()?;
        let mut reached_now = vec![false; keys.len()];
        for &i in reached {
            if let Some(r) = reached_now.get_mut(i as usize) {
                *r = true;
            }
        }
        let done_before = (0..keys.len() as u32)
            .map(|segment| exhausted(job.resume.as_deref(), segment))
            .collect();
        Some(Self {
            keys: keys.clone(),
            // A continuation of deferred connections judges only the keys
            // its connections were read for; the run before judged the rest.
            done_before: match job.target {
                Target::Deferred(_) => (0..keys.len() as u32)
                    .map(|i| !of.values().any(|&k| k == i))
                    .collect(),
                _ => done_before,
            },
            state: Mutex::new(State {
                reached: reached_now,
                of: of.clone(),
            }),
        })
    }

    /// An answer of the pass over the audience, for a connection read in
    /// `segment`.
    pub fn answered(&self, segment: u32, id: &ConnectionId, delivery: &Delivery) {
        let mut state = lock(&self.state);
        let key = state.of.get(id).copied().unwrap_or(segment);
        match delivery {
            Delivery::Delivered => mark(&mut state.reached, key),
            Delivery::Deferred(_) => {
                state.of.insert(id.clone(), key);
            }
            _ => {}
        }
    }

    /// An answer of a pass over the deferred connections.
    pub fn retried(&self, id: &ConnectionId, delivery: &Delivery) {
        let mut state = lock(&self.state);
        if let (Delivery::Delivered, Some(&key)) = (delivery, state.of.get(id)) {
            mark(&mut state.reached, key);
        }
    }

    /// The keys reached so far, for a checkpoint.
    pub fn reached(&self) -> Vec<u32> {
        let state = lock(&self.state);
        (0..state.reached.len() as u32)
            .filter(|&i| state.reached[i as usize])
            .collect()
    }

    /// The key a deferred connection was read for, for a checkpoint.
    pub fn key_of(&self, id: &ConnectionId) -> Option<u32> {
        lock(&self.state).of.get(id).copied()
    }

    /// What the run came to, key by key. `read_all`: the pass over the
    /// audience ended; otherwise a key counts as read once `resume` shows
    /// its segment at its end.
    pub fn summary(&self, deferred: &[Deferred], read_all: bool, resume: &[Cursor]) -> KeyReceipts {
        let state = lock(&self.state);
        let mut pending = vec![false; self.keys.len()];
        let mut deferred_of = HashMap::new();
        for d in deferred {
            if let Some(&key) = state.of.get(&d.connection.id) {
                deferred_of.insert(d.connection.id.clone(), key);
                mark(&mut pending, key);
            }
        }
        let read = (0..self.keys.len())
            .map(|i| !self.done_before[i] && (read_all || exhausted(Some(resume), i as u32)))
            .collect();
        KeyReceipts {
            keys: self.keys.clone(),
            reached: state.reached.clone(),
            pending,
            read,
            earlier: self.done_before.clone(),
            deferred_of,
        }
    }
}

fn mark(flags: &mut [bool], key: u32) {
    if let Some(flag) = flags.get_mut(key as usize) {
        *flag = true;
    }
}

/// Whether `cursors` show `segment` read to its end.
fn exhausted(cursors: Option<&[Cursor]>, segment: u32) -> bool {
    cursors
        .unwrap_or_default()
        .iter()
        .any(|c| c.segment == segment && c.position.is_none())
}
