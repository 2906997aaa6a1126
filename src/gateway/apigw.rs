//! [`Gateway`] on API Gateway's PostToConnection, and the one function that
//! turns its answers into [`PostOutcome`]s.
//!
//! Build the client with [`crate::aws::apigw_client`]: SDK retries off (the
//! engine owns them), the stage in the endpoint URL.

use aws_sdk_apigatewaymanagement::Client;
use aws_sdk_apigatewaymanagement::config::http::HttpResponse;
use aws_sdk_apigatewaymanagement::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_apigatewaymanagement::operation::post_to_connection::{
    PostToConnectionError, PostToConnectionOutput,
};
use aws_sdk_apigatewaymanagement::primitives::Blob;
use bytes::Bytes;

use super::{Gateway, PostOutcome};
use crate::connection::ConnectionId;

/// Sends with the SDK's PostToConnection.
#[derive(Clone, Debug)]
pub struct ApiGatewaySender {
    /// Built by `aws::apigw_client`; cheap to clone, shares one connection pool.
    client: Client,
}

impl ApiGatewaySender {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

impl Gateway for ApiGatewaySender {
    async fn post(&self, id: &ConnectionId, payload: Bytes) -> PostOutcome {
        // Blob owns a Vec: one copy of the payload per send is the SDK's price.
        let result = self
            .client
            .post_to_connection()
            .connection_id(id.as_str())
            .data(Blob::new(payload.to_vec()))
            .send()
            .await;
        classify(result)
    }
}

type PostResult = Result<PostToConnectionOutput, SdkError<PostToConnectionError, HttpResponse>>;

/// What one PostToConnection answer means for the engine.
///
/// The SDK picks the error variant from `x-amzn-ErrorType` (or the body), not
/// from the status: a bare 410 arrives unhandled. So the raw status decides
/// whenever there is a response, and the modeled variants only add to it.
fn classify(result: PostResult) -> PostOutcome {
    let err = match result {
        Ok(_) => return PostOutcome::Delivered,
        Err(err) => err,
    };
    let modeled = match &err {
        SdkError::ServiceError(ctx) => Some(ctx.err()),
        _ => None,
    };
    let status = err.raw_response().map(|raw| raw.status().as_u16());

    if modeled.is_some_and(PostToConnectionError::is_gone_exception) || status == Some(410) {
        return PostOutcome::Gone;
    }
    if modeled.is_some_and(PostToConnectionError::is_limit_exceeded_exception)
        || status == Some(429)
    {
        return PostOutcome::Throttled;
    }
    if modeled.is_some_and(PostToConnectionError::is_forbidden_exception) || status == Some(403) {
        return PostOutcome::Forbidden(format!(
            "{}; check that the endpoint includes the stage \
             (https://{{api-id}}.execute-api.{{region}}.amazonaws.com/{{stage}}) and that the \
             role may execute-api:ManageConnections on it",
            describe(&err)
        ));
    }
    if modeled.is_some_and(PostToConnectionError::is_payload_too_large_exception)
        || status == Some(413)
    {
        return PostOutcome::PayloadTooLarge;
    }
    match (&err, status) {
        (_, Some(400..=499)) => PostOutcome::Rejected(describe(&err)),
        // A request the SDK could not even build will not build next time.
        (SdkError::ConstructionFailure(_), _) => PostOutcome::Rejected(describe(&err)),
        // 5xx, timeouts, dispatch (connect, I/O) and unreadable responses.
        _ => PostOutcome::Transient(describe(&err)),
    }
}

/// A one-line account of a failure for logs and job reports: status and
/// error code when API Gateway answered, the error chain otherwise.
fn describe(err: &SdkError<PostToConnectionError, HttpResponse>) -> String {
    match err {
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().unwrap_or("no error code");
            let message = ctx.err().message().unwrap_or("no message");
            format!(
                "API Gateway answered HTTP {} ({code}: {message})",
                ctx.raw().status().as_u16()
            )
        }
        SdkError::TimeoutError(_) => "PostToConnection timed out".to_owned(),
        other => DisplayErrorContext(other).to_string(),
    }
}
