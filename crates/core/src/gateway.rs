//! The send path's seam: one message to one connection, and what the
//! answer means.
//!
//! [`Gateway`] is what the engine sends through; the `fanout-aws` crate
//! implements it twice (the SDK's PostToConnection, and the lean signed
//! POST). Both classify HTTP answers with one table ([`status`]), so the
//! engine only ever sees a [`PostOutcome`].

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

/// Sends one payload to one connection.
pub trait Gateway: Send + Sync + 'static {
    /// One attempt, no retries: the engine owns retries and backoff.
    /// `payload` is shared by every send of a broadcast (cloning `Bytes` is a
    /// reference-count increment).
    fn post(&self, id: &ConnectionId, payload: Bytes) -> impl Future<Output = PostOutcome> + Send;
}
