//! What a failed DynamoDB call means, decided once for both adapters on
//! DynamoDB (the connections table and the fleet's lease table); each maps
//! the answer into its own seam's error.

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// A DynamoDB failure, by what the caller can do about it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The table does not exist: a configuration error.
    NoSuchTable,
    /// Throttled: try again later, as an outage.
    Throttled(String),
    /// No answer, or a 5xx: try again.
    Unavailable(String),
    /// AccessDenied, Validation and the like: the same call fails again
    /// until someone fixes the role or the table.
    Rejected(String),
}

/// What `err` means.
pub(crate) fn classify<E>(err: &SdkError<E, HttpResponse>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match err {
        SdkError::ServiceError(ctx) => answer(
            ctx.raw().status().as_u16(),
            ctx.err().code().unwrap_or_default(),
            ctx.err().message().unwrap_or_default(),
        ),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Failure::Unavailable(DisplayErrorContext(err).to_string())
        }
        _ => Failure::Rejected(DisplayErrorContext(err).to_string()),
    }
}

/// A conditional write's answer: `Ok(false)` when its condition failed
/// (the item changed since it was read, and is left as it is), the
/// failure otherwise.
pub(crate) fn written<O, E>(result: Result<O, SdkError<E, HttpResponse>>) -> Result<bool, Failure>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match result {
        Ok(_) => Ok(true),
        Err(err) if err.code() == Some("ConditionalCheckFailedException") => Ok(false),
        Err(err) => Err(classify(&err)),
    }
}

/// What an error answer means, by its code and status.
pub(crate) fn answer(status: u16, code: &str, message: &str) -> Failure {
    let detail = format!("DynamoDB answered HTTP {status} ({code}: {message})");
    match code {
        "ResourceNotFoundException" => Failure::NoSuchTable,
        "ProvisionedThroughputExceededException"
        | "RequestLimitExceeded"
        | "ThrottlingException" => Failure::Throttled(detail),
        _ if status >= 500 => Failure::Unavailable(detail),
        _ => Failure::Rejected(detail),
    }
}
