//! [`JobQueue`] on Amazon SQS: long-poll receive, visibility changes, batch
//! delete, and copies to a dead-letter queue that carry the reason.
//!
//! Build the client with [`crate::aws::sqs_client`]: its attempt timeout sits
//! above the long-poll wait.

use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName,
};

use super::{DeadLettered, JobQueue, MAX_BATCH, Message, QueueError, Receipt, SendOptions};

/// The message attribute that says why a job was dead-lettered.
pub const REASON_ATTRIBUTE: &str = "fanout.reason";
/// The message attribute naming the jobs-queue message a dead letter copies.
pub const SOURCE_MESSAGE_ATTRIBUTE: &str = "fanout.source-message-id";

/// Reasons are error chains; a few hundred characters say what went wrong
/// without eating into the 256 KiB message budget the body needs.
const MAX_REASON_CHARS: usize = 1024;

/// SQS caps a long poll at 20 s.
const MAX_WAIT_SECONDS: u64 = 20;

/// SQS caps a visibility timeout at 12 hours.
const MAX_VISIBILITY_SECONDS: u64 = 12 * 60 * 60;

/// Error codes SQS uses for a missing queue: the JSON protocol's and the
/// query-compatible one the SDK prefers when the header carries it.
const NO_SUCH_QUEUE_CODES: &[&str] = &[
    "QueueDoesNotExist",
    "AWS.SimpleQueueService.NonExistentQueue",
];

/// Error codes for a receipt that no longer settles its message.
const STALE_RECEIPT_CODES: &[&str] = &[
    "ReceiptHandleIsInvalid",
    "MessageNotInflight",
    "AWS.SimpleQueueService.MessageNotInflight",
];

/// Error codes for throttling: passing, like an outage.
const THROTTLED_CODES: &[&str] = &["RequestThrottled", "ThrottlingException"];

/// The jobs queue and its optional dead-letter queue.
#[derive(Clone, Debug)]
pub struct SqsQueue {
    client: Client,
    queue_url: String,
    /// Where `dead_letter` copies jobs; `None` leaves poison messages to the
    /// queue's own redrive policy.
    dead_letter_url: Option<String>,
    /// The long-poll wait of each receive (capped at SQS's 20 s).
    receive_wait: Duration,
}

impl SqsQueue {
    pub fn new(
        client: Client,
        queue_url: impl Into<String>,
        dead_letter_url: Option<String>,
        receive_wait: Duration,
    ) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
            dead_letter_url,
            receive_wait,
        }
    }

    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }
}

impl JobQueue for SqsQueue {
    async fn receive(&self, max: usize) -> Result<Vec<Message>, QueueError> {
        let max = max.clamp(1, MAX_BATCH) as i32;
        let wait = self.receive_wait.as_secs().min(MAX_WAIT_SECONDS) as i32;
        let output = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(max)
            .wait_time_seconds(wait)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .send()
            .await
            .map_err(|err| map_error(&self.queue_url, err))?;

        let mut messages = Vec::with_capacity(output.messages().len());
        for message in output.messages() {
            let (Some(id), Some(receipt)) = (message.message_id(), message.receipt_handle()) else {
                tracing::warn!(queue = %self.queue_url, "SQS returned a message without an id or receipt handle; skipped");
                continue;
            };
            let receive_count = message
                .attributes()
                .and_then(|attrs| attrs.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|count| count.parse().ok())
                .unwrap_or(1);
            let group_id = message
                .attributes()
                .and_then(|attrs| attrs.get(&MessageSystemAttributeName::MessageGroupId))
                .cloned();
            messages.push(Message {
                id: id.to_owned(),
                body: message.body().unwrap_or_default().to_owned(),
                receipt: Receipt(receipt.to_owned()),
                receive_count,
                group_id,
            });
        }
        Ok(messages)
    }

    async fn set_visibility(&self, receipt: &Receipt, timeout: Duration) -> Result<(), QueueError> {
        let seconds = timeout.as_secs().min(MAX_VISIBILITY_SECONDS) as i32;
        self.client
            .change_message_visibility()
            .queue_url(&self.queue_url)
            .receipt_handle(&receipt.0)
            .visibility_timeout(seconds)
            .send()
            .await
            .map_err(|err| map_error(&self.queue_url, err))?;
        Ok(())
    }

    async fn delete(&self, receipts: &[Receipt]) -> Result<Vec<Receipt>, QueueError> {
        let mut failed = Vec::new();
        for chunk in receipts.chunks(MAX_BATCH) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(index, receipt)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(index.to_string())
                        .receipt_handle(&receipt.0)
                        .build()
                        .map_err(|err| QueueError::Rejected(err.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let output = self
                .client
                .delete_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|err| map_error(&self.queue_url, err))?;
            for entry in output.failed() {
                // Ids are the indexes this call sent, so they map straight back.
                match entry.id().parse::<usize>().ok().and_then(|i| chunk.get(i)) {
                    Some(receipt) => {
                        tracing::warn!(
                            queue = %self.queue_url,
                            code = entry.code(),
                            message = entry.message().unwrap_or_default(),
                            "SQS did not delete a message; it will be retried"
                        );
                        failed.push(receipt.clone());
                    }
                    None => {
                        return Err(QueueError::Rejected(format!(
                            "DeleteMessageBatch reported a failure for an entry it was not sent ({})",
                            entry.id()
                        )));
                    }
                }
            }
        }
        Ok(failed)
    }

    async fn dead_letter(
        &self,
        message: &Message,
        reason: &str,
    ) -> Result<DeadLettered, QueueError> {
        let Some(url) = &self.dead_letter_url else {
            return Ok(DeadLettered::NotConfigured);
        };
        let mut request = self
            .client
            .send_message()
            .queue_url(url)
            .message_body(&message.body)
            .message_attributes(
                REASON_ATTRIBUTE,
                string_attribute(truncate(reason, MAX_REASON_CHARS))?,
            )
            .message_attributes(SOURCE_MESSAGE_ATTRIBUTE, string_attribute(&message.id)?);
        if is_fifo(url) {
            // No order among dead letters matters; deduplicating on the source
            // id keeps a job that is dead-lettered twice (its delete failed)
            // from appearing twice.
            request = request
                .message_group_id(&message.id)
                .message_deduplication_id(&message.id);
        }
        request.send().await.map_err(|err| map_error(url, err))?;
        Ok(DeadLettered::Sent)
    }

    async fn send(&self, body: &str, options: &SendOptions) -> Result<String, QueueError> {
        let output = self
            .client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .set_message_group_id(options.group_id.clone())
            .set_message_deduplication_id(options.deduplication_id.clone())
            .set_delay_seconds(
                options
                    .delay
                    .map(|d| d.as_secs().min(900) as i32)
                    .filter(|&d| d > 0),
            )
            .send()
            .await
            .map_err(|err| map_error(&self.queue_url, err))?;
        output
            .message_id()
            .map(str::to_owned)
            .ok_or_else(|| QueueError::Rejected("SendMessage returned no message id".to_owned()))
    }
}

fn is_fifo(url: &str) -> bool {
    url.trim_end_matches('/').ends_with(".fifo")
}

fn string_attribute(value: &str) -> Result<MessageAttributeValue, QueueError> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|err| QueueError::Rejected(err.to_string()))
}

/// The longest prefix of `text` with at most `max` characters.
fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// One place that turns SDK failures into [`QueueError`]s.
fn map_error<E>(url: &str, err: SdkError<E, HttpResponse>) -> QueueError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(ctx) => service_error(
            url,
            ctx.raw().status().as_u16(),
            ctx.err().code().unwrap_or_default(),
            ctx.err().message().unwrap_or_default(),
        ),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            QueueError::Unavailable(DisplayErrorContext(&err).to_string())
        }
        _ => QueueError::Rejected(DisplayErrorContext(&err).to_string()),
    }
}

/// What an error answer from SQS means, by its code and status.
fn service_error(url: &str, status: u16, code: &str, message: &str) -> QueueError {
    let detail = || format!("SQS answered HTTP {status} ({code}: {message})");
    if NO_SUCH_QUEUE_CODES.contains(&code) {
        QueueError::NoSuchQueue {
            url: url.to_owned(),
        }
    } else if STALE_RECEIPT_CODES.contains(&code)
        // AWS reports an expired receipt as a bad parameter value.
        || (code == "InvalidParameterValue" && message.contains("ReceiptHandle"))
    {
        QueueError::StaleReceipt
    } else if status >= 500 || THROTTLED_CODES.contains(&code) {
        QueueError::Unavailable(detail())
    } else {
        QueueError::Rejected(detail())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("héllo", 2), "hé");
        assert_eq!(truncate("héllo", 5), "héllo");
        assert_eq!(truncate("héllo", 50), "héllo");
        assert_eq!(truncate("", 3), "");
    }

    #[test]
    fn error_answers_map_by_code_then_status() {
        let url = "http://127.0.0.1:5320/000000000000/jobs";
        let map = |status, code, message| service_error(url, status, code, message);
        assert!(matches!(
            map(400, "AWS.SimpleQueueService.NonExistentQueue", ""),
            QueueError::NoSuchQueue { url: u } if u == url
        ));
        assert!(matches!(
            map(400, "QueueDoesNotExist", ""),
            QueueError::NoSuchQueue { .. }
        ));
        assert!(matches!(
            map(400, "ReceiptHandleIsInvalid", ""),
            QueueError::StaleReceipt
        ));
        assert!(matches!(
            map(
                400,
                "InvalidParameterValue",
                "Value abc for parameter ReceiptHandle is invalid. Reason: The receipt handle has expired."
            ),
            QueueError::StaleReceipt
        ));
        assert!(matches!(
            map(
                400,
                "InvalidParameterValue",
                "MaxNumberOfMessages must be 1 to 10"
            ),
            QueueError::Rejected(_)
        ));
        assert!(matches!(
            map(400, "RequestThrottled", ""),
            QueueError::Unavailable(_)
        ));
        assert!(matches!(
            map(503, "ServiceUnavailable", ""),
            QueueError::Unavailable(_)
        ));
        assert!(matches!(map(500, "", ""), QueueError::Unavailable(_)));
        assert!(matches!(
            map(403, "AccessDenied", ""),
            QueueError::Rejected(_)
        ));
    }

    #[test]
    fn fifo_queues_are_told_by_their_url() {
        assert!(is_fifo("http://127.0.0.1:5320/000000000000/jobs-dlq.fifo"));
        assert!(!is_fifo("http://127.0.0.1:5320/000000000000/jobs-dlq"));
    }
}
