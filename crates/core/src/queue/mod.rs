//! The jobs queue: receive, keep invisible while working, settle.
//!
//! [`JobQueue`] is the seam the worker uses; `fanout-aws` implements it on SQS.

mod redrive;

pub use redrive::{Redriven, redrive};

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

/// Messages per receive and entries per batch delete (system attributes
/// such as `AWSTraceHeader` do not count towards the attribute limit).
pub use crate::limits::{MAX_MESSAGE_ATTRIBUTES, MAX_SQS_BATCH as MAX_BATCH};

/// The prefix of the attributes fanout itself sets; a redrive strips them,
/// and a dead letter replaces them.
pub const FANOUT_ATTRIBUTE_PREFIX: &str = "fanout.";

/// The message attribute that says why a job was dead-lettered.
pub const REASON_ATTRIBUTE: &str = "fanout.reason";

/// The message attribute naming the jobs-queue message a dead letter copies.
pub const SOURCE_MESSAGE_ATTRIBUTE: &str = "fanout.source-message-id";

/// Reasons are error chains; a few hundred characters say what went wrong
/// without eating into the 256 KiB message budget the body needs.
const MAX_REASON_CHARS: usize = 1024;

/// One message attribute as a producer set it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribute {
    /// `String`, `Number` or `Binary`, optionally with a custom suffix
    /// (`String.json`): kept as given.
    pub data_type: String,
    pub value: AttributeValue,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttributeValue {
    /// `String` and `Number` types.
    Text(String),
    Binary(Bytes),
}

impl Attribute {
    pub fn text(value: impl Into<String>) -> Self {
        Self {
            data_type: "String".to_owned(),
            value: AttributeValue::Text(value.into()),
        }
    }
}

/// Message attributes by name. Ordered, so which give way when there is no
/// room is decided the same way every time.
pub type Attributes = BTreeMap<String, Attribute>;

/// The producer's own attributes: those fanout sets are left out.
pub fn producer_attributes(attributes: &Attributes) -> Attributes {
    attributes
        .iter()
        .filter(|(name, _)| !name.starts_with(FANOUT_ATTRIBUTE_PREFIX))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// The attributes of a dead letter, within SQS's 10.
///
/// `fanout.reason` always has a place. The producer's attributes come next,
/// in name order; `fanout.source-message-id` takes a place only if one is
/// left. Whatever does not fit is named at the end of the reason (the source
/// id's value, a producer attribute's name), so nothing goes unnoticed.
pub fn dead_letter_attributes(message: &Message, reason: &str) -> Attributes {
    let mut reason = truncate(reason, MAX_REASON_CHARS).to_owned();
    let producer = producer_attributes(&message.attributes);
    // The reason's place is taken first.
    let room = MAX_MESSAGE_ATTRIBUTES - 1;
    let mut kept: Attributes = producer.clone().into_iter().take(room).collect();
    let dropped: Vec<&str> = producer.keys().skip(room).map(String::as_str).collect();
    if kept.len() < room {
        kept.insert(
            SOURCE_MESSAGE_ATTRIBUTE.to_owned(),
            Attribute::text(&message.id),
        );
    } else {
        reason.push_str(&format!(" [source message {}]", message.id));
    }
    if !dropped.is_empty() {
        reason.push_str(&format!(
            " [no room for message attributes: {}]",
            dropped.join(", ")
        ));
    }
    kept.insert(REASON_ATTRIBUTE.to_owned(), Attribute::text(reason));
    kept
}

/// The longest prefix of `text` with at most `max` characters.
fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// Whether `queue_url` names a FIFO queue: SQS requires a FIFO queue's name
/// to end in `.fifo`, and a URL may carry a trailing `/`. Every decision that
/// differs for FIFO queues (group ids, deduplication ids) asks this one
/// function, so they cannot disagree about a queue.
pub fn is_fifo(queue_url: &str) -> bool {
    queue_url.trim_end_matches('/').ends_with(".fifo")
}

/// The handle that settles one received message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Receipt(pub String);

/// One received job message.
#[derive(Clone, Debug)]
pub struct Message {
    /// The queue's message id (a job's default id).
    pub id: String,
    pub body: String,
    pub receipt: Receipt,
    /// How many times the queue has handed this message out, this time
    /// included (ApproximateReceiveCount); drives the retry delay.
    pub receive_count: u32,
    /// FIFO queues: the message's ordering group, kept by a continuation.
    pub group_id: Option<String>,
    /// The producer's message attributes (trace context, metadata), kept on
    /// a dead letter and by a redrive.
    pub attributes: Attributes,
    /// The `AWSTraceHeader` system attribute (X-Ray trace context).
    pub trace_header: Option<String>,
}

/// Options for sending a job.
#[derive(Clone, Debug, Default)]
pub struct SendOptions {
    /// FIFO queues: the ordering group (e.g. the channel).
    pub group_id: Option<String>,
    /// FIFO queues without content-based deduplication.
    pub deduplication_id: Option<String>,
    /// Message attributes to set (at most [`MAX_MESSAGE_ATTRIBUTES`]).
    pub attributes: Attributes,
    /// The `AWSTraceHeader` system attribute to set.
    pub trace_header: Option<String>,
    /// Standard queues: how long the message stays hidden after it is sent
    /// (whole seconds, at most 15 minutes).
    pub delay: Option<Duration>,
}

/// Whether a dead-lettered message went anywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLettered {
    Sent,
    /// No dead-letter queue is configured: the message stays for the queue's
    /// redrive policy.
    NotConfigured,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue {url} does not exist; create it or fix the queue URL")]
    NoSuchQueue { url: String },
    #[error("the receipt handle is no longer valid (the message was received again elsewhere)")]
    StaleReceipt,
    #[error("the queue could not be reached: {0}")]
    Unavailable(String),
    #[error("the queue refused the request: {0}")]
    Rejected(String),
}

/// The worker's view of the jobs queue (and its dead-letter queue).
pub trait JobQueue: Send + Sync + 'static {
    /// Long-polls for up to `max` (≤ [`MAX_BATCH`]) messages, each hidden
    /// for `visibility` from its receipt (not the queue's own default, which
    /// may be shorter than the caller's heartbeat), with its attributes.
    fn receive(
        &self,
        max: usize,
        visibility: Duration,
    ) -> impl Future<Output = Result<Vec<Message>, QueueError>> + Send;

    /// Keeps a message hidden for `timeout` from now (heartbeat), or makes it
    /// visible again after `timeout` (release; zero means at once).
    fn set_visibility(
        &self,
        receipt: &Receipt,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Deletes up to [`MAX_BATCH`] messages; returns the receipts that failed
    /// and may be retried.
    fn delete(
        &self,
        receipts: &[Receipt],
    ) -> impl Future<Output = Result<Vec<Receipt>, QueueError>> + Send;

    /// Copies the message to the dead-letter queue with `reason` as a message
    /// attribute beside the producer's (see [`dead_letter_attributes`]). The
    /// caller deletes the original once this returns `Sent`.
    fn dead_letter(
        &self,
        message: &Message,
        reason: &str,
    ) -> impl Future<Output = Result<DeadLettered, QueueError>> + Send;

    /// Sends a new job; returns its message id.
    fn send(
        &self,
        body: &str,
        options: &SendOptions,
    ) -> impl Future<Output = Result<String, QueueError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message_with(names: &[&str]) -> Message {
        Message {
            id: "m1".into(),
            body: "{}".into(),
            receipt: Receipt("r1".into()),
            receive_count: 1,
            group_id: None,
            attributes: names
                .iter()
                .map(|name| (name.to_string(), Attribute::text(format!("{name}-value"))))
                .collect(),
            trace_header: None,
        }
    }

    #[test]
    fn a_dead_letter_keeps_the_producers_attributes_beside_fanouts() {
        let got = dead_letter_attributes(&message_with(&["tenant", "fanout.reason"]), "bad");
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            [REASON_ATTRIBUTE, SOURCE_MESSAGE_ATTRIBUTE, "tenant"]
        );
        assert_eq!(got[REASON_ATTRIBUTE], Attribute::text("bad"));
        assert_eq!(got[SOURCE_MESSAGE_ATTRIBUTE], Attribute::text("m1"));
    }

    #[test]
    fn with_no_room_the_source_id_then_the_last_producer_attributes_give_way_named() {
        // Eight of the producer's: the reason and the source id still fit.
        let eight: Vec<String> = (0..8).map(|n| format!("a{n}")).collect();
        let names: Vec<&str> = eight.iter().map(String::as_str).collect();
        let got = dead_letter_attributes(&message_with(&names), "bad");
        assert_eq!(got.len(), MAX_MESSAGE_ATTRIBUTES);
        assert!(got.contains_key(SOURCE_MESSAGE_ATTRIBUTE));
        assert_eq!(got[REASON_ATTRIBUTE], Attribute::text("bad"));

        // Nine: the source id gives way, its value moves into the reason.
        let nine: Vec<String> = (0..9).map(|n| format!("a{n}")).collect();
        let names: Vec<&str> = nine.iter().map(String::as_str).collect();
        let got = dead_letter_attributes(&message_with(&names), "bad");
        assert_eq!(got.len(), MAX_MESSAGE_ATTRIBUTES);
        assert!(!got.contains_key(SOURCE_MESSAGE_ATTRIBUTE));
        assert_eq!(
            got[REASON_ATTRIBUTE],
            Attribute::text("bad [source message m1]")
        );

        // Ten: the last by name gives way too, and is named.
        let ten: Vec<String> = (0..10).map(|n| format!("a{n}")).collect();
        let names: Vec<&str> = ten.iter().map(String::as_str).collect();
        let got = dead_letter_attributes(&message_with(&names), "bad");
        assert_eq!(got.len(), MAX_MESSAGE_ATTRIBUTES);
        assert!(got.contains_key("a8") && !got.contains_key("a9"));
        assert_eq!(
            got[REASON_ATTRIBUTE],
            Attribute::text("bad [source message m1] [no room for message attributes: a9]")
        );
    }

    #[test]
    fn a_long_reason_is_cut_at_a_character_before_the_notes() {
        let got = dead_letter_attributes(&message_with(&[]), &"é".repeat(5000));
        let AttributeValue::Text(reason) = &got[REASON_ATTRIBUTE].value else {
            panic!("a text reason");
        };
        assert_eq!(reason.chars().count(), MAX_REASON_CHARS);
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("héllo", 2), "hé");
        assert_eq!(truncate("héllo", 5), "héllo");
        assert_eq!(truncate("héllo", 50), "héllo");
        assert_eq!(truncate("", 3), "");
    }

    #[test]
    fn fifo_queues_are_told_by_their_url() {
        assert!(is_fifo("http://127.0.0.1:5320/000000000000/jobs-dlq.fifo"));
        assert!(is_fifo("http://127.0.0.1:5320/000000000000/jobs.fifo/"));
        assert!(!is_fifo("http://127.0.0.1:5320/000000000000/jobs-dlq"));
        assert!(!is_fifo("http://127.0.0.1:5320/000000000000/fifo/"));
    }
}
