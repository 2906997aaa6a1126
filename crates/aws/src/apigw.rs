//! [`Gateway`] on API Gateway's PostToConnection, and the one function that
//! turns its answers into [`PostOutcome`]s.
//!
//! Build the client with [`crate::clients::apigw_client`]: SDK retries off (the
//! engine owns them), the stage in the endpoint URL.

use aws_sdk_apigatewaymanagement::Client;
use aws_sdk_apigatewaymanagement::config::http::HttpResponse;
use aws_sdk_apigatewaymanagement::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_apigatewaymanagement::operation::post_to_connection::{
    PostToConnectionError, PostToConnectionOutput,
};
use aws_sdk_apigatewaymanagement::primitives::Blob;
use bytes::Bytes;

use fanout_core::connection::ConnectionId;
use fanout_core::gateway::{Gateway, PostOutcome, status};

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
/// from the status: a bare 410 arrives unhandled. So a modeled variant stands
/// for its status, and otherwise the raw status decides, by the table both
/// send paths share ([`status::outcome`]).
fn classify(result: PostResult) -> PostOutcome {
    let err = match result {
        Ok(_) => return PostOutcome::Delivered,
        Err(err) => err,
    };
    let modeled = match &err {
        SdkError::ServiceError(ctx) => modeled_status(ctx.err()),
        _ => None,
    };
    let code = modeled.or_else(|| err.raw_response().map(|raw| raw.status().as_u16()));
    match (&err, code) {
        (_, Some(code)) => status::outcome(code, || describe(&err)),
        // A request the SDK could not even build will not build next time.
        (SdkError::ConstructionFailure(_), None) => PostOutcome::Rejected(describe(&err)),
        // Timeouts, dispatch (connect, I/O) failures.
        (_, None) => PostOutcome::Transient(describe(&err)),
    }
}

/// The status a modeled error stands for.
fn modeled_status(err: &PostToConnectionError) -> Option<u16> {
    if err.is_gone_exception() {
        Some(410)
    } else if err.is_limit_exceeded_exception() {
        Some(429)
    } else if err.is_forbidden_exception() {
        Some(403)
    } else if err.is_payload_too_large_exception() {
        Some(413)
    } else {
        None
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
