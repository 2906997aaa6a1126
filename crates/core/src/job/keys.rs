//! What identifies a broadcast and one run of it, and the final states a
//! connection reaches in it: the vocabulary checkpoints, leases,
//! deduplication, reports and logs share.
//!
//! - The **broadcast key** is the producer's `id`; for an SNS notification
//!   without one, the notification's `MessageId` (SNS redelivers with a new
//!   SQS message id but the same `MessageId`); otherwise the SQS message id.
//!   Continuations and segment jobs carry it on, so every job of one
//!   broadcast has the same key.
//! - The **run key** is the broadcast key plus the scan segment (for split
//!   broadcasts) and the continuation number and part (for the jobs a run
//!   hands on: a resume after shutdown, or the deferred connections). Two
//!   deliveries of one message have the same run key; a continuation never
//!   has its parent's.
//! - The **fingerprint** is a hash of what the run sends and to whom, so the
//!   same run key with another body is told apart from a redelivery.

use std::fmt;

use sha2::{Digest, Sha256};

pub use crate::connection::ConnectionState;
use crate::job::{Job, Segment, Target};

/// One run of a broadcast (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RunKey {
    pub broadcast: String,
    pub segment: Option<Segment>,
    /// 0 for the producer's job; one more for each job a run hands on.
    pub continuation: u32,
    /// Which of the bodies a hand-on was split into (deferred connections
    /// that do not fit one message).
    pub part: u32,
}

impl RunKey {
    pub fn of(job: &Job) -> Self {
        Self {
            broadcast: job.id.clone(),
            segment: job.segment,
            continuation: job.continuation,
            part: job.part,
        }
    }

    /// The key as stored: the fixed-form parts first, the producer's free
    /// text last, so no broadcast key can make two runs' keys equal.
    pub fn storage_key(&self) -> String {
        let segment = match self.segment {
            Some(s) => format!("{}of{}", s.index, s.total),
            None => "-".to_owned(),
        };
        format!(
            "s{segment}.c{}.{}:{}",
            self.continuation, self.part, self.broadcast
        )
    }

    /// Whether this is the producer's own job (not one fanout handed on):
    /// the run a producer's retry duplicates.
    pub fn is_first(&self) -> bool {
        self.continuation == 0 && self.part == 0
    }
}

impl fmt::Display for RunKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.broadcast)?;
        if let Some(s) = self.segment {
            write!(f, " segment {}/{}", s.index, s.total)?;
        }
        if self.continuation > 0 || self.part > 0 {
            write!(f, " continuation {}", self.continuation)?;
            if self.part > 0 {
                write!(f, ".{}", self.part)?;
            }
        }
        Ok(())
    }
}

/// A SHA-256 of what a run sends and to whom, in hex. Leaves out where it
/// resumes, so every delivery of one message has the same fingerprint.
pub fn fingerprint(job: &Job) -> String {
    let mut hash = Sha256::new();
    let mut field = |tag: &str, bytes: &[u8]| {
        hash.update(tag.as_bytes());
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    };
    field("payload", &job.payload);
    match &job.target {
        Target::All => field("all", b""),
        Target::Channel(channel) => field("channel", channel.as_bytes()),
        Target::Channels(channels) => {
            for channel in channels {
                field("channels", channel.as_bytes());
            }
        }
        Target::Audience { name, values } => {
            field("to", name.as_bytes());
            for value in values {
                field("to-value", value.as_bytes());
            }
        }
        Target::Connections(ids) => {
            for id in ids {
                field("connection", id.as_str().as_bytes());
            }
        }
        Target::Deferred(connections) => {
            for c in connections {
                field("deferred", c.id.as_str().as_bytes());
            }
        }
    }
    let mut exclude: Vec<&str> = job.exclude.iter().map(|id| id.as_str()).collect();
    exclude.sort_unstable();
    for id in exclude {
        field("exclude", id.as_bytes());
    }
    hex::encode(hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Capabilities, parse};

    const CAPS: Capabilities = Capabilities {
        channels: true,
        audiences: None,
    };

    fn job(body: &str) -> Job {
        parse(body, "msg-1", &CAPS).unwrap()
    }

    #[test]
    fn every_delivery_of_a_job_has_one_fingerprint_and_another_body_another() {
        let a = job(r#"{"id":"j","data":"x","exclude":["b","a"]}"#);
        let same = job(r#"{"id":"j","exclude":["a","b"],"data":"x"}"#);
        assert_eq!(fingerprint(&a), fingerprint(&same));
        for other in [
            r#"{"id":"j","data":"y","exclude":["a","b"]}"#,
            r#"{"id":"j","data":"x","exclude":["a"]}"#,
            r#"{"id":"j","data":"x","exclude":["a","b"],"channel":"c"}"#,
            r#"{"id":"j","data":"x","exclude":["a","b"],"connections":["a"]}"#,
        ] {
            assert_ne!(fingerprint(&a), fingerprint(&job(other)), "{other}");
        }
        // Where it resumes is not what it is.
        let resumed = serde_json::to_string(&a.continuation(vec![])).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&job(&resumed)));
    }

    #[test]
    fn continuations_and_segments_have_run_keys_of_their_own() {
        let first = job(r#"{"id":"j","data":"x"}"#);
        let key = RunKey::of(&first);
        assert!(key.is_first());
        assert_eq!(key.storage_key(), "s-.c0.0:j");
        let resumed = job(&serde_json::to_string(&first.continuation(vec![])).unwrap());
        assert_eq!(RunKey::of(&resumed).continuation, 1);
        assert_eq!(RunKey::of(&resumed).broadcast, "j");
        let shares: Vec<_> = first
            .split_into(2)
            .iter()
            .map(|s| RunKey::of(&job(&serde_json::to_string(s).unwrap())))
            .collect();
        assert_eq!(shares[0].broadcast, "j");
        assert_ne!(shares[0].storage_key(), shares[1].storage_key());
        assert_eq!(shares[1].to_string(), "j segment 1/2");
        // A producer's id that looks like a key's tail stays apart.
        let odd = job(r#"{"id":"j.c1.0:j","data":"x"}"#);
        assert_ne!(
            RunKey::of(&odd).storage_key(),
            RunKey::of(&resumed).storage_key()
        );
    }

    #[test]
    fn deferred_parts_of_one_hand_on_are_distinct_runs() {
        use crate::connection::Connection;
        let share = job(r#"{"id":"j","data":"x","segment":{"index":1,"total":3}}"#);
        let deferred: Vec<Connection> = (0..300)
            .map(|n| Connection {
                id: format!("conn-{n:04}").into(),
                key: None,
                started_ms: None,
            })
            .collect();
        let bodies = share.deferred_continuations(&deferred, 2_000).unwrap();
        assert!(bodies.len() > 1);
        let keys: std::collections::HashSet<_> = bodies
            .iter()
            .map(|b| RunKey::of(&job(b)).storage_key())
            .collect();
        assert_eq!(keys.len(), bodies.len());
        for body in &bodies {
            let next = RunKey::of(&job(body));
            assert_eq!(next.segment, share.segment, "the segment stays in the key");
            assert_eq!(next.continuation, 1);
        }
    }

    #[test]
    fn state_names() {
        let names: Vec<_> = [
            ConnectionState::Delivered,
            ConnectionState::Gone,
            ConnectionState::Expired,
            ConnectionState::Rejected,
            ConnectionState::Deferred,
        ]
        .iter()
        .map(|s| (s.as_str(), s.is_final()))
        .collect();
        assert_eq!(
            names,
            [
                ("delivered", true),
                ("gone", true),
                ("expired", true),
                ("rejected", true),
                ("deferred", false)
            ]
        );
        assert_eq!(
            serde_json::to_string(&ConnectionState::Expired).unwrap(),
            "\"expired\""
        );
    }
}
