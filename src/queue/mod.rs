//! The jobs queue: receive, keep invisible while working, settle.
//!
//! [`JobQueue`] is the seam the worker uses; `sqs` implements it.

pub mod sqs;

use std::future::Future;
use std::time::Duration;

/// SQS returns at most 10 messages per ReceiveMessage and takes at most 10
/// entries per DeleteMessageBatch.
pub const MAX_BATCH: usize = 10;

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
}

/// Options for sending a job.
#[derive(Clone, Debug, Default)]
pub struct SendOptions {
    /// FIFO queues: the ordering group (e.g. the channel).
    pub group_id: Option<String>,
    /// FIFO queues without content-based deduplication.
    pub deduplication_id: Option<String>,
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
    /// Long-polls for up to `max` (≤ [`MAX_BATCH`]) messages.
    fn receive(&self, max: usize) -> impl Future<Output = Result<Vec<Message>, QueueError>> + Send;

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
    /// attribute. The caller deletes the original once this returns `Sent`.
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
