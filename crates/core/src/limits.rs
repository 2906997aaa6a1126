//! The numbers fanout is bounded by, each defined once: AWS's quotas (with
//! where AWS states them) and fanout's own bounds (with why).

use std::time::Duration;

// AWS's quotas.

/// The largest message API Gateway delivers to a WebSocket client: 128 KB
/// ("Amazon API Gateway quotas for WebSocket APIs", message payload size).
pub const MAX_PAYLOAD_BYTES: usize = 131_072;

/// The largest SQS message body plus attributes: 256 KiB ("Amazon SQS
/// message quotas", message size).
pub const MAX_SQS_MESSAGE_BYTES: usize = 262_144;

/// Messages per ReceiveMessage and entries per SendMessageBatch or
/// DeleteMessageBatch: 10 (SQS API reference, `MaxNumberOfMessages`, and
/// "Amazon SQS message quotas").
pub const MAX_SQS_BATCH: usize = 10;

/// Message attributes per SQS message: 10 ("Amazon SQS message quotas").
pub const MAX_MESSAGE_ATTRIBUTES: usize = 10;

/// The longest SQS long poll: 20 s (ReceiveMessage `WaitTimeSeconds`).
pub const MAX_RECEIVE_WAIT: Duration = Duration::from_secs(20);

/// The longest SQS visibility timeout: 12 hours (ChangeMessageVisibility
/// `VisibilityTimeout`).
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);

/// The longest SQS message delay: 15 minutes (SendMessage `DelaySeconds`).
pub const MAX_SEND_DELAY: Duration = Duration::from_secs(900);

/// Items per DynamoDB BatchWriteItem: 25 (DynamoDB API reference).
pub const MAX_BATCH_WRITE: usize = 25;

// fanout's own bounds.

/// The most rows asked of one Scan or Query page. DynamoDB stops a page at
/// 1 MB whatever the limit; 1,000 key-only rows stay far below it and keep
/// a page's sends a small, resumable unit.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// The most parallel Scan segments per job. DynamoDB allows up to 1,000,000;
/// past a few hundred every segment returns tiny pages and the send budget,
/// not the scan, is the limit.
pub const MAX_SCAN_SEGMENTS: u32 = 1024;

/// The most jobs one broadcast may be split into (`split_segments`), for the
/// same reason.
pub const MAX_SPLIT: u32 = 1024;

/// Room left in an SQS message for a continuation's attributes and JSON
/// framing.
pub const CONTINUATION_HEADROOM: usize = 4096;
