//! The send path chosen by configuration (`send_path = "sdk" | "lean"`), as
//! one [`Gateway`] type, so the engine and the worker stay monomorphic over
//! it and main needs no generic wiring.

use std::time::Duration;

use aws_config::SdkConfig;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::apigw::ApiGatewaySender;
use crate::clients::{self, AwsError};
use crate::lean::{LeanError, LeanSender};
use crate::trust::GatewayTrust;
use fanout_core::connection::ConnectionId;
use fanout_core::gateway::{Gateway, PostOutcome};

/// How PostToConnection is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendPath {
    /// The AWS SDK's client: the reference implementation.
    Sdk,
    /// A SigV4-signed POST over keep-alive hyper connections: the same
    /// requests at about a tenth of the CPU (BENCHMARKS.md).
    Lean,
}

/// Everything a sender is built from, as the configuration hands it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendSettings {
    pub path: SendPath,
    /// The management API's endpoint, stage included.
    pub endpoint: String,
    /// One attempt, connect to last byte of the answer.
    pub attempt_timeout: Duration,
    /// Sends in flight at once: the lean path keeps as many idle keep-alive
    /// connections.
    pub max_in_flight: usize,
    /// Plain HTTP beyond loopback, and a private CA, for this client alone.
    pub trust: GatewayTrust,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error(transparent)]
    Sdk(#[from] AwsError),
    #[error(transparent)]
    Lean(#[from] LeanError),
}

/// Either send path; both classify answers by the same table.
#[derive(Clone, Debug)]
pub enum SelectedSender {
    /// The SDK's PostToConnection: the reference implementation.
    Sdk(ApiGatewaySender),
    /// The signed hyper path: the same requests at a fraction of the CPU.
    Lean(LeanSender),
}

impl SelectedSender {
    /// The sender `settings` picks, with the region and credentials of
    /// `config`.
    pub fn build(config: &SdkConfig, settings: &SendSettings) -> Result<Self, SelectError> {
        Ok(match settings.path {
            SendPath::Sdk => Self::Sdk(ApiGatewaySender::new(clients::apigw_client_trusting(
                config,
                &settings.endpoint,
                &settings.trust,
                settings.attempt_timeout,
            )?)),
            SendPath::Lean => Self::Lean(LeanSender::trusting(
                config,
                &settings.endpoint,
                &settings.trust,
                settings.attempt_timeout,
                settings.max_in_flight,
            )?),
        })
    }
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
