//! The numbers fanout is bounded by, each defined once: AWS's quotas (with
//! where AWS states them) and fanout's own bounds (with why); and, in
//! [`setting`], the settings that change them, which the core's messages
//! point at by the names the binary gives them.

use std::time::Duration;

pub mod setting;

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

/// The longest partition key value: 2,048 bytes ("Quotas in Amazon
/// DynamoDB", partition key length). A channel or audience value is the
/// partition key of the index a job reads.
pub const MAX_PARTITION_KEY_BYTES: usize = 2048;

/// The longest sort key value: 1,024 bytes ("Quotas in Amazon DynamoDB",
/// sort key length). A connection id is the sort key of a `channel` +
/// `connectionId` table.
pub const MAX_SORT_KEY_BYTES: usize = 1024;

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

/// The most channels one job may name in `channels`. Each channel is read
/// as its own Query: the merge of a table keyed `channel` + `connectionId`
/// holds one page per channel (up to `page_size` rows each), and a
/// continuation carries one cursor per channel (with a channel value of up
/// to 2 KB in it). At 100 both stay small: 100 pages in memory, and cursors
/// that fit one SQS message. An audience wider than that is better served
/// by a named audience (`to`) or the whole table.
pub const MAX_CHANNELS: usize = 100;

/// The most bytes of payload a `split` may copy: `split` × the payload.
/// Each share of a split broadcast is a job on the queue carrying the whole
/// payload, written by one worker before any post, and SQS bills a message
/// per 64 KB. 16 MiB lets a 1,024-way split carry a 16 KiB message, or a
/// full 128 KiB message split 128 ways (a 128-way split already spreads the
/// largest table over more workers than a fleet runs), and bounds what one
/// job can write back to the queue to 256 billed requests.
pub const MAX_SPLIT_BYTES: usize = 16 * 1024 * 1024;

/// Room left in an SQS message for a continuation's attributes and JSON
/// framing.
pub const CONTINUATION_HEADROOM: usize = 4096;

/// The furthest ahead a job's `deliver_by` may be: SQS keeps a message at
/// most 14 days, so a later deadline can never bind. Further is refused as
/// a likely unit error (epoch microseconds for milliseconds, say).
pub const MAX_DEADLINE_AHEAD: Duration = Duration::from_secs(14 * 24 * 60 * 60);

/// How long a cancel's tombstone is kept: longer than any piece of its
/// broadcast can come back. A dead letter lives at most 14 days on the
/// dead-letter queue (SQS's longest retention), and a copy `redrive` puts
/// back on the jobs queue at most 14 more, so a day past both.
pub const TOMBSTONE_LIFETIME: Duration = Duration::from_secs(29 * 24 * 60 * 60);

/// The longest broadcast key a cancel may name: a run record's key is the
/// broadcast key behind a short prefix, within DynamoDB's key size.
pub const MAX_BROADCAST_KEY_BYTES: usize = MAX_PARTITION_KEY_BYTES - 48;

/// The most keys one `to` list may name. Each key is read as its own Query
/// (one after another), and the report names every key none of whose
/// connections was reached: at 100 keys of [`MAX_AUDIENCE_KEY_BYTES`] that
/// list stays within 52 KB, so a report never needs cutting to fit SQS's
/// and SNS's 256 KiB.
pub const MAX_AUDIENCE_KEYS: usize = 100;

/// The longest key in a `to` list (a single `to` key may take DynamoDB's
/// whole 2,048): user and device ids are far shorter, and a deferred
/// continuation carries the list beside its connections.
pub const MAX_AUDIENCE_KEY_BYTES: usize = 512;
