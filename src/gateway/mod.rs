//! The send path: one message to one connection, and what the answer means.
//!
//! [`Gateway`] is the seam the engine sends through; `apigw` implements it
//! with the SDK's PostToConnection (the reference), `lean` with a signed POST
//! over a tuned hyper client. Classification of HTTP answers happens beside
//! the call, by one table ([`status`]), so the engine only ever sees a
//! [`PostOutcome`]. [`select::SelectedSender`] is whichever of the two the
//! configuration picks.

pub mod apigw;
pub mod lean;
pub mod select;
pub mod status;

use std::future::Future;

use bytes::Bytes;

use crate::connection::ConnectionId;

/// What one PostToConnection attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostOutcome {
    /// 200: the message is with API Gateway.
    Delivered,
    /// 410 (GoneException, or a bare 410): the client left; remove its row.
    Gone,
    /// 429 LimitExceededException: the account or the client's buffer is
    /// full; slow down and retry.
    Throttled,
    /// 5xx, timeout, dispatch or I/O failure: retry with backoff.
    Transient(String),
    /// 413 PayloadTooLargeException: no connection can take it; the job fails.
    PayloadTooLarge,
    /// 403 ForbiddenException: permissions, wrong endpoint or missing stage;
    /// every send will fail the same way, so the job stops.
    Forbidden(String),
    /// Any other client error (e.g. 400 for a malformed id): this connection
    /// fails, without retry and without removal.
    Rejected(String),
}

/// An endpoint that is not `http(s)://host[:port]/stage`: the stage is what
/// people forget, and AWS answers that mistake with a misleading 403.
#[derive(Debug, thiserror::Error)]
#[error(
    "the API Gateway endpoint {endpoint:?} is not a URL like \
     https://{{api-id}}.execute-api.{{region}}.amazonaws.com/{{stage}}; \
     set it with the stage included"
)]
pub struct BadEndpoint {
    pub endpoint: String,
}

/// Parses a management API endpoint, checking the scheme, the host and the
/// stage (a path that is not empty), with no query.
pub fn parse_endpoint(endpoint: &str) -> Result<url::Url, BadEndpoint> {
    let bad = || BadEndpoint {
        endpoint: endpoint.to_owned(),
    };
    let url = url::Url::parse(endpoint).map_err(|_| bad())?;
    let usable = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|h| !h.is_empty())
        && url.query().is_none()
        && !url.path().trim_matches('/').is_empty();
    if usable { Ok(url) } else { Err(bad()) }
}

/// Sends one payload to one connection.
pub trait Gateway: Send + Sync + 'static {
    /// One attempt, no retries: the engine owns retries and backoff.
    /// `payload` is shared by every send of a broadcast (cloning `Bytes` is a
    /// reference-count increment).
    fn post(&self, id: &ConnectionId, payload: Bytes) -> impl Future<Output = PostOutcome> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn endpoints_need_a_scheme_a_host_and_a_stage() {
        for good in [
            "https://abc123.execute-api.eu-west-1.amazonaws.com/prod",
            "https://abc123.execute-api.eu-west-1.amazonaws.com/prod/",
            "http://127.0.0.1:5322/local",
        ] {
            assert!(parse_endpoint(good).is_ok(), "{good}");
        }
        for bad in [
            "https://abc123.execute-api.eu-west-1.amazonaws.com",
            "https://abc123.execute-api.eu-west-1.amazonaws.com/",
            "abc123.execute-api.eu-west-1.amazonaws.com/prod",
            "https:///prod",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }
}
