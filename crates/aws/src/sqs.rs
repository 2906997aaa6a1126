//! [`JobQueue`] on Amazon SQS: long-poll receive, visibility changes, batch
//! delete, and copies to a dead-letter queue that carry the reason.
//!
//! Build the client with [`crate::clients::sqs_client`]: its attempt timeout sits
//! above the long-poll wait.

use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName,
    MessageSystemAttributeNameForSends, MessageSystemAttributeValue,
};

use fanout_core::queue::{
    Attribute, AttributeValue, Attributes, DeadLettered, JobQueue, MAX_BATCH, Message, QueueError,
    Receipt, SendOptions, dead_letter_attributes, is_fifo,
};
pub use fanout_core::queue::{REASON_ATTRIBUTE, SOURCE_MESSAGE_ATTRIBUTE};

/// ReceiveMessage's name for "every message attribute".
const ALL_MESSAGE_ATTRIBUTES: &str = "All";

use fanout_core::limits::{MAX_RECEIVE_WAIT, MAX_VISIBILITY};

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

/// One queue as the configuration names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSettings {
    pub url: String,
    /// Where poison jobs are copied with their reason; `None` leaves them
    /// to the queue's redrive policy.
    pub dead_letter_url: Option<String>,
    /// The long-poll wait of each receive; zero for short polls.
    pub receive_wait: Duration,
}

impl SqsQueue {
    /// The queue `settings` names, with a client sized for its long poll.
    pub fn connect(config: &aws_config::SdkConfig, settings: QueueSettings) -> Self {
        Self::new(
            crate::clients::sqs_client(config, settings.receive_wait),
            settings.url,
            settings.dead_letter_url,
            settings.receive_wait,
        )
    }

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
    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Message>, QueueError> {
        let max = max.clamp(1, MAX_BATCH) as i32;
        let wait = self.receive_wait.min(MAX_RECEIVE_WAIT).as_secs() as i32;
        let output = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(max)
            .wait_time_seconds(wait)
            .visibility_timeout(visibility_seconds(visibility))
            .message_attribute_names(ALL_MESSAGE_ATTRIBUTES)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .message_system_attribute_names(MessageSystemAttributeName::AwsTraceHeader)
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
            let system = |name| {
                message
                    .attributes()
                    .and_then(|attrs| attrs.get(&name))
                    .cloned()
            };
            messages.push(Message {
                id: id.to_owned(),
                body: message.body().unwrap_or_default().to_owned(),
                receipt: Receipt(receipt.to_owned()),
                receive_count,
                group_id: system(MessageSystemAttributeName::MessageGroupId),
                attributes: message
                    .message_attributes()
                    .into_iter()
                    .flatten()
                    .filter_map(|(name, value)| Some((name.clone(), from_sdk(value)?)))
                    .collect(),
                trace_header: system(MessageSystemAttributeName::AwsTraceHeader),
            });
        }
        Ok(messages)
    }

    async fn set_visibility(&self, receipt: &Receipt, timeout: Duration) -> Result<(), QueueError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.queue_url)
            .receipt_handle(&receipt.0)
            .visibility_timeout(visibility_seconds(timeout))
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
            .set_message_attributes(Some(to_sdk(&dead_letter_attributes(message, reason))?))
            .set_message_system_attributes(trace_header(message.trace_header.as_deref())?);
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
            .set_message_attributes(
                (!options.attributes.is_empty())
                    .then(|| to_sdk(&options.attributes))
                    .transpose()?,
            )
            .set_message_system_attributes(trace_header(options.trace_header.as_deref())?)
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

fn visibility_seconds(timeout: Duration) -> i32 {
    timeout.min(MAX_VISIBILITY).as_secs() as i32
}

/// A received attribute in the crate's terms; list types (reserved by SQS,
/// never accepted on a send) are left out.
fn from_sdk(value: &MessageAttributeValue) -> Option<Attribute> {
    let value_of = match (value.string_value(), value.binary_value()) {
        (Some(text), _) => AttributeValue::Text(text.to_owned()),
        (None, Some(blob)) => AttributeValue::Binary(blob.as_ref().to_vec().into()),
        (None, None) => return None,
    };
    Some(Attribute {
        data_type: value.data_type().to_owned(),
        value: value_of,
    })
}

fn to_sdk(
    attributes: &Attributes,
) -> Result<std::collections::HashMap<String, MessageAttributeValue>, QueueError> {
    attributes
        .iter()
        .map(|(name, attribute)| {
            let builder = MessageAttributeValue::builder().data_type(&attribute.data_type);
            let builder = match &attribute.value {
                AttributeValue::Text(text) => builder.string_value(text),
                AttributeValue::Binary(bytes) => builder.binary_value(Blob::new(bytes.to_vec())),
            };
            let value = builder
                .build()
                .map_err(|err| QueueError::Rejected(err.to_string()))?;
            Ok((name.clone(), value))
        })
        .collect()
}

type SystemAttributes =
    std::collections::HashMap<MessageSystemAttributeNameForSends, MessageSystemAttributeValue>;

/// The `AWSTraceHeader` system attribute for a send, if there is one.
fn trace_header(value: Option<&str>) -> Result<Option<SystemAttributes>, QueueError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let value = MessageSystemAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|err| QueueError::Rejected(err.to_string()))?;
    Ok(Some(
        [(MessageSystemAttributeNameForSends::AwsTraceHeader, value)].into(),
    ))
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
}
