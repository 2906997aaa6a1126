//! The send path chosen by configuration (`send_path = "sdk" | "lean"`), as
//! one [`Gateway`] type, so the engine and the worker stay monomorphic over
//! it and main needs no generic wiring.

use bytes::Bytes;

use crate::apigw::ApiGatewaySender;
use crate::lean::LeanSender;
use fanout_core::connection::ConnectionId;
use fanout_core::gateway::{Gateway, PostOutcome};

/// Either send path; both classify answers by the same table.
#[derive(Clone, Debug)]
pub enum SelectedSender {
    /// The SDK's PostToConnection: the reference implementation.
    Sdk(ApiGatewaySender),
    /// The signed hyper path: the same requests at a fraction of the CPU.
    Lean(LeanSender),
}

impl Gateway for SelectedSender {
    async fn post(&self, id: &ConnectionId, payload: Bytes) -> PostOutcome {
        match self {
            // The SDK's future is kilobytes; boxed, it does not make every
            // send's future (moved as the engine queues it) that big.
            Self::Sdk(sender) => Box::pin(sender.post(id, payload)).await,
            Self::Lean(sender) => sender.post(id, payload).await,
        }
    }
}
