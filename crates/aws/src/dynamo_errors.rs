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

/// Gives an adapter on a DynamoDB table its `from_failure(table, failure)`
/// and `map_error(table, err)`, into its seam's error `$error`, whose
/// variants are named as the failures are (`NoSuchTable { table }`,
/// `Throttled`, `Unavailable`, `Rejected`): the mapping is the same for
/// every table, and is written once, with its test.
macro_rules! table_errors {
    ($vis:vis $error:ident) => {
        $vis fn from_failure(table: &str, failure: $crate::dynamo_errors::Failure) -> $error {
            use $crate::dynamo_errors::Failure;
            match failure {
                Failure::NoSuchTable => $error::NoSuchTable {
                    table: table.to_owned(),
                },
                Failure::Throttled(detail) => $error::Throttled(detail),
                Failure::Unavailable(detail) => $error::Unavailable(detail),
                Failure::Rejected(detail) => $error::Rejected(detail),
            }
        }

        /// One place that turns SDK failures into the seam's errors.
        $vis fn map_error<E>(
            table: &str,
            err: aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
        ) -> $error
        where
            E: aws_sdk_dynamodb::error::ProvideErrorMetadata
                + std::error::Error
                + Send
                + Sync
                + 'static,
        {
            from_failure(table, $crate::dynamo_errors::classify(&err))
        }

        #[cfg(test)]
        mod table_error_tests {
            use super::*;

            #[test]
            fn error_answers_map_by_code_then_status() {
                let map = |status, code| {
                    let answer = $crate::dynamo_errors::answer(status, code, "message");
                    from_failure("the-table", answer)
                };
                assert!(matches!(
                    map(400, "ResourceNotFoundException"),
                    $error::NoSuchTable { table } if table == "the-table"
                ));
                for code in [
                    "ProvisionedThroughputExceededException",
                    "RequestLimitExceeded",
                    "ThrottlingException",
                ] {
                    let err = map(400, code);
                    assert!(matches!(err, $error::Throttled(_)), "{code}: {err:?}");
                    assert!(err.is_transient());
                }
                for (status, code) in [(500, "InternalServerError"), (503, "")] {
                    let err = map(status, code);
                    assert!(matches!(err, $error::Unavailable(_)), "{status}: {err:?}");
                    assert!(err.is_transient());
                }
                for code in ["AccessDeniedException", "ValidationException"] {
                    let err = map(400, code);
                    assert!(matches!(err, $error::Rejected(_)), "{code}: {err:?}");
                    assert!(!err.is_transient());
                }
            }
        }
    };
}
pub(crate) use table_errors;
