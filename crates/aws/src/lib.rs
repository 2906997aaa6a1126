//! fanout's AWS adapters: the only crate that speaks the AWS SDK or HTTP.
//! Each adapter implements one of `fanout-core`'s seams and keeps every SDK
//! type inside its own file.
//!
//! # Layout
//!
//! - [`clients`]: builds the SDK clients (one HTTP stack, retry and timeout
//!   policy, endpoints).
//! - [`sqs`]: [`sqs::SqsQueue`], the `JobQueue` on SQS.
//! - [`dynamo`]: [`dynamo::DynamoStore`], the `ConnectionStore` on a DynamoDB
//!   table (Scan and Query pages, BatchWriteItem removals).
//! - [`endpoint`]: which management API endpoints are accepted.
//! - [`apigw`]: [`apigw::ApiGatewaySender`], PostToConnection through the SDK
//!   (the reference path).
//! - [`lean`]: [`lean::LeanSender`], the same call as a signed POST on a
//!   keep-alive pool (the default path).
//! - [`select`]: [`select::SelectedSender`], whichever of the two the
//!   configuration picks.

pub mod apigw;
pub mod clients;
pub mod dynamo;
pub mod endpoint;
pub mod lean;
pub mod select;
pub mod sqs;
