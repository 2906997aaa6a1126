//! The broadcast reports' destinations: [`SqsReports`] sends each report as
//! an SQS message (SendMessage), [`SnsReports`] publishes it to an SNS topic
//! (Publish). Both implement `fanout-core`'s `ReportSink`; what a failed call
//! means is decided here, beside the call.

use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use futures::future::BoxFuture;

use fanout_core::reports::{ReportError, ReportSink};

use crate::SdkConfig;
use crate::clients;

/// Reports as messages on an SQS queue.
pub struct SqsReports {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsReports {
    pub fn connect(config: &SdkConfig, queue_url: &str) -> Self {
        Self {
            client: clients::report_sqs_client(config),
            queue_url: queue_url.to_owned(),
        }
    }
}

impl ReportSink for SqsReports {
    fn destination(&self) -> &str {
        &self.queue_url
    }

    fn send<'a>(&'a self, body: &'a str) -> BoxFuture<'a, Result<(), ReportError>> {
        Box::pin(async move {
            let mut request = self
                .client
                .send_message()
                .queue_url(&self.queue_url)
                .message_body(body);
            if fanout_core::queue::is_fifo(&self.queue_url) {
                // One group keeps the reports in the order they were settled;
                // the body's hash deduplicates a resend of the same report.
                request = request
                    .message_group_id("fanout-reports")
                    .message_deduplication_id(dedup_id(body));
            }
            request.send().await.map(drop).map_err(classify)
        })
    }
}

/// Reports published to an SNS topic.
pub struct SnsReports {
    client: aws_sdk_sns::Client,
    topic_arn: String,
}

impl SnsReports {
    pub fn connect(config: &SdkConfig, topic_arn: &str) -> Self {
        Self {
            client: clients::report_sns_client(config),
            topic_arn: topic_arn.to_owned(),
        }
    }
}

impl ReportSink for SnsReports {
    fn destination(&self) -> &str {
        &self.topic_arn
    }

    fn send<'a>(&'a self, body: &'a str) -> BoxFuture<'a, Result<(), ReportError>> {
        Box::pin(async move {
            let mut request = self
                .client
                .publish()
                .topic_arn(&self.topic_arn)
                .message(body);
            if self.topic_arn.ends_with(".fifo") {
                request = request
                    .message_group_id("fanout-reports")
                    .message_deduplication_id(dedup_id(body));
            }
            request.send().await.map(drop).map_err(classify)
        })
    }
}

/// A FIFO destination's deduplication id: the body's SHA-256 (at most 128
/// characters are allowed; 64 hex digits fit).
fn dedup_id(body: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(body.as_bytes()))
}

/// An answer is a refusal (bad destination, no permission, too large); no
/// answer is the destination being unreachable.
fn classify<E, R>(err: SdkError<E, R>) -> ReportError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match &err {
        SdkError::ServiceError(ctx) => ReportError::Refused(format!(
            "{}: {}",
            ctx.err().code().unwrap_or("unknown error"),
            ctx.err().message().unwrap_or_default()
        )),
        _ => ReportError::Unavailable(
            aws_smithy_types::error::display::DisplayErrorContext(&err).to_string(),
        ),
    }
}
