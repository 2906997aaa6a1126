//! fanout's AWS adapters: the only crate that speaks the AWS SDK or HTTP.
//! Each adapter implements one of `fanout-core`'s seams and keeps every SDK
//! type inside its own file.
//!
//! # Layout
//!
//! - [`clients`]: builds the SDK clients (one HTTP stack, retry and timeout
//!   policy, endpoints).
//! - `sqs`: [`SqsQueue`], the `JobQueue` on SQS.
//! - `dynamo`: [`DynamoStore`], the `ConnectionStore` on a DynamoDB table
//!   (Scan and Query pages, BatchWriteItem removals).
//! - `fleet`: [`DynamoLeaseTable`], the fleet budget's `LeaseTable` on a
//!   DynamoDB table (one item per task, read with one consistent Query).
//! - `clock`: [`ClockCheck`], AWS's clock (a DynamoDB answer's `Date`)
//!   against this worker's, for the age rule.
//! - `runs`: [`DynamoRunTable`], durable runs' `RunTable` on the checkpoint
//!   table (one item per run key, conditional writes).
//! - `pk_sk`: the `pk` + `sk` table layout the fleet and run tables share,
//!   and the startup check of a table's key.
//! - `dynamo_errors`: what a failed DynamoDB call means, for every table.
//! - `endpoint`: which management API endpoints are accepted
//!   ([`parse_endpoint`]), plain HTTP only to loopback unless allowed.
//! - `trust`: what the gateway client trusts ([`GatewayTrust`]): a private
//!   CA added to the system's roots for it alone.
//! - `apigw`: [`ApiGatewaySender`], PostToConnection through the SDK (the
//!   reference path).
//! - `lean`: [`LeanSender`], the same call as a signed POST on a keep-alive
//!   pool (the default path).
//! - `reports`: [`SqsReports`] and [`SnsReports`], where broadcast reports
//!   go (the `ReportSink` on an SQS queue and on an SNS topic).
//! - `select`: [`SelectedSender`], whichever of the two [`SendSettings`]
//!   picks.
//!
//! The modules are private: each is one adapter, and what others use is
//! re-exported here, so a module can be split or renamed without touching
//! the binary or the tests.

mod apigw;
pub mod clients;
mod clock;
mod dynamo;
mod dynamo_errors;
mod endpoint;
mod fleet;
mod lean;
mod pk_sk;
mod reports;
mod runs;
mod select;
mod sqs;
mod trust;

pub use apigw::ApiGatewaySender;
/// What every client is built from (region, credentials, endpoints): the
/// binary loads it once with [`clients::load_sdk_config`] and hands it back.
pub use aws_config::SdkConfig;
pub use clients::AwsError;
pub use clock::ClockCheck;
pub use dynamo::{AgeSettings, AudienceIndex, DynamoStore, TableSettings};
pub use endpoint::{BadEndpoint, PlainHttp, parse_endpoint};
pub use fleet::DynamoLeaseTable;
pub use lean::{LeanError, LeanSender};
pub use reports::{SnsReports, SqsReports};
pub use runs::DynamoRunTable;
pub use select::{SelectError, SelectedSender, SendPath, SendSettings};
pub use sqs::{QueueSettings, REASON_ATTRIBUTE, SOURCE_MESSAGE_ATTRIBUTE, SqsQueue};
pub use trust::{BadCaFile, GatewayTrust, check_ca_file};
