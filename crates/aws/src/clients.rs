//! Builds the AWS SDK clients: one HTTP/TLS stack, and the retry and timeout
//! policy each peer needs.
//!
//! Endpoints, region and credentials come only from the standard AWS
//! variables and files that aws-config honours (`AWS_ENDPOINT_URL_SQS`,
//! `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_SNS`, `AWS_REGION`, …), so the same binary runs
//! against AWS and against the local emulators.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, ConfigLoader, SdkConfig};
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};

use crate::endpoint::PlainHttp;
use crate::trust::{BadCaFile, GatewayTrust, PrivateCa};

/// How long to wait for a TCP connection and its TLS handshake, together.
/// An endpoint that does not accept within this is down, and failing fast
/// lets the caller back off. (The SDK's connect timeout wraps its TLS
/// connector, so it bounds the handshake too; the lean path bounds its
/// whole connect with it.)
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Headroom over SQS's long-poll wait before a receive attempt counts as hung
/// (aws-sdk-rust #1094: a receive can hang past its wait time otherwise).
const RECEIVE_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

/// Ceiling for one DynamoDB or SQS attempt that is not a long poll. A Scan
/// page of 1 MB answers in well under a second; a minute means the peer hangs.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error(transparent)]
    BadEndpoint(#[from] crate::endpoint::BadEndpoint),
    #[error(transparent)]
    BadCaFile(#[from] BadCaFile),
}

/// The config loader every client starts from, with the one HTTP stack this
/// crate compiles in. The SDK's default features are off (see Cargo.toml), so
/// without `.http_client(…)` every call would fail at run time with "No HTTP
/// client was available".
///
/// Tests use it to add a fixed region and credentials; the binary calls
/// [`load_sdk_config`].
pub fn config_loader() -> ConfigLoader {
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(https_client(None))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        )
}

/// Loads region, credentials and endpoint overrides from the environment.
pub async fn load_sdk_config() -> SdkConfig {
    config_loader().load().await
}

/// The SQS client: standard retries, and an attempt timeout above the
/// long-poll wait so a hung receive is abandoned and retried.
pub fn sqs_client(config: &SdkConfig, receive_wait: Duration) -> aws_sdk_sqs::Client {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(receive_wait.max(ATTEMPT_TIMEOUT) + RECEIVE_TIMEOUT_MARGIN)
        .build();
    let sqs = aws_sdk_sqs::config::Builder::from(config)
        .timeout_config(timeouts)
        .build();
    aws_sdk_sqs::Client::from_conf(sqs)
}

/// The DynamoDB client: standard retries (throttling included) and the
/// shared timeouts.
pub fn dynamodb_client(config: &SdkConfig) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(config)
}

/// The longest one call to the fleet table may take, retry included. The
/// coordinator gives a whole round (a PutItem, then a Query) 500 ms and
/// counts a slower one as failed; a call that gives up first reports why
/// (refused, throttled, 5xx) instead of a bare timeout. A call within a
/// region answers in milliseconds.
pub const FLEET_OPERATION_TIMEOUT: Duration = Duration::from_millis(400);

/// The pause before the one retry of a fleet-table call. The SDK's default
/// (up to 1 s) would outlast [`FLEET_OPERATION_TIMEOUT`]; a short pause
/// leaves a fast failure (a refused connection, a 5xx, a throttle) one more
/// try within the round.
const FLEET_RETRY_BACKOFF: Duration = Duration::from_millis(20);

/// The DynamoDB client of the fleet's lease table: every call bounded by
/// [`FLEET_OPERATION_TIMEOUT`], with at most one quick retry. The
/// coordinator tries again every half second, so failing fast and falling back
/// beats waiting on a slow table.
pub fn fleet_dynamodb_client(config: &SdkConfig) -> aws_sdk_dynamodb::Client {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT.min(FLEET_OPERATION_TIMEOUT))
        .operation_attempt_timeout(FLEET_OPERATION_TIMEOUT)
        .operation_timeout(FLEET_OPERATION_TIMEOUT)
        .build();
    let retries = RetryConfig::standard()
        .with_max_attempts(2)
        .with_initial_backoff(FLEET_RETRY_BACKOFF)
        .with_max_backoff(FLEET_RETRY_BACKOFF);
    let dynamodb = aws_sdk_dynamodb::config::Builder::from(config)
        .retry_config(retries)
        .timeout_config(timeouts)
        .build();
    aws_sdk_dynamodb::Client::from_conf(dynamodb)
}

/// The longest one report may take to send, retry included, as the worker
/// bounds it: settling waits for it.
const REPORT_OPERATION_TIMEOUT: std::time::Duration = fanout_core::reports::REPORT_TIMEOUT;

/// The shared config bounded by the report timeout, which the report queue's
/// and topic's clients are built from.
fn report_config(config: &SdkConfig) -> SdkConfig {
    let mut timeouts = TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT.min(REPORT_OPERATION_TIMEOUT))
        .operation_timeout(REPORT_OPERATION_TIMEOUT)
        .build();
    // What it leaves unset (the attempt timeout) stays the shared config's,
    // as a client's own timeout config would have it.
    if let Some(shared) = config.timeout_config() {
        timeouts.take_defaults_from(shared);
    }
    // One quick retry fits the bound; the SDK's default backoff would not.
    let retries = RetryConfig::standard()
        .with_max_attempts(2)
        .with_initial_backoff(Duration::from_millis(50))
        .with_max_backoff(Duration::from_millis(50));
    config
        .to_builder()
        .timeout_config(timeouts)
        .retry_config(retries)
        .build()
}

/// The SQS client of the report queue: bounded by the report timeout.
pub fn report_sqs_client(config: &SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&report_config(config))
}

/// The SNS client of the report topic (`AWS_ENDPOINT_URL_SNS` points it
/// elsewhere): bounded by the report timeout.
pub fn report_sns_client(config: &SdkConfig) -> aws_sdk_sns::Client {
    aws_sdk_sns::Client::new(&report_config(config))
}

/// The one HTTP stack: rustls with ring, trusting the system's roots, and
/// a private CA's on top when one is given (the gateway's client alone).
fn https_client(ca: Option<&PrivateCa>) -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    let mut builder = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring));
    if let Some(ca) = ca {
        // The default store holds the system's roots; the CA adds to them.
        let trust = TrustStore::default().with_pem_certificate(ca.pem.clone());
        builder = builder.tls_context(
            TlsContext::builder()
                .with_trust_store(trust)
                .build()
                .expect("a TLS context with a trust store always builds"),
        );
    }
    builder.build_https()
}

/// The API Gateway Management API client for one WebSocket stage, plain
/// HTTP only to a loopback host, the system's roots only.
///
/// `endpoint` must include the stage (`https://…/prod`): without it every
/// PostToConnection answers 403. SDK retries are off: the engine owns retries
/// and the rate budget, and the SDK would otherwise retry 429s on its own.
pub fn apigw_client(
    config: &SdkConfig,
    endpoint: &str,
    attempt_timeout: Duration,
) -> Result<aws_sdk_apigatewaymanagement::Client, AwsError> {
    apigw_client_trusting(config, endpoint, &GatewayTrust::default(), attempt_timeout)
}

/// As [`apigw_client`], reaching the endpoint as `trust` allows: its own
/// HTTP client when a private CA is added, so no other client trusts it.
pub fn apigw_client_trusting(
    config: &SdkConfig,
    endpoint: &str,
    trust: &GatewayTrust,
    attempt_timeout: Duration,
) -> Result<aws_sdk_apigatewaymanagement::Client, AwsError> {
    let plain_http = if trust.allow_plain_http {
        PlainHttp::Allowed
    } else {
        PlainHttp::LoopbackOnly
    };
    crate::endpoint::parse_endpoint(endpoint, plain_http)?;
    let ca = trust.ca_file.as_deref().map(PrivateCa::load).transpose()?;
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT.min(attempt_timeout))
        .operation_attempt_timeout(attempt_timeout)
        .operation_timeout(attempt_timeout)
        .build();
    let mut apigw = aws_sdk_apigatewaymanagement::config::Builder::from(config)
        .endpoint_url(endpoint)
        .retry_config(RetryConfig::disabled())
        .timeout_config(timeouts);
    if let Some(ca) = &ca {
        apigw = apigw.http_client(https_client(Some(ca)));
    }
    let apigw = apigw.build();
    Ok(aws_sdk_apigatewaymanagement::Client::from_conf(apigw))
}
