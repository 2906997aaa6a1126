//! fanout delivers broadcast jobs from an SQS queue to every live WebSocket
//! client of an API Gateway WebSocket API, and removes the connections that
//! API Gateway reports gone.
//!
//! # Layout
//!
//! The engine and the worker speak only this crate's types; every AWS SDK
//! type stays inside the adapter that uses it (`*/sqs.rs`, `*/dynamo.rs`,
//! `*/apigw.rs`, `aws.rs`).
//!
//! - [`config`]: the typed configuration: embedded defaults, file, `FANOUT_*`
//!   environment overrides, validation.
//! - [`job`]: the broadcast job schema producers send, and its pure parser.
//! - [`connection`]: connection ids and the table row keys they were read with.
//! - [`queue`]: the [`queue::JobQueue`] seam; `queue::sqs` implements it.
//! - [`store`]: the [`store::ConnectionStore`] seam (audience pages, batch
//!   removal); `store::dynamo` implements it.
//! - [`gateway`]: the [`gateway::Gateway`] seam and [`gateway::PostOutcome`];
//!   `gateway::apigw` implements it with PostToConnection.
//! - [`aws`]: builds the SDK clients (one HTTP stack, retry and timeout policy).
//! - [`backoff`]: exponential backoff with full jitter, shared by every retry.
//! - [`limiter`]: the process-wide send budget (rate and requests in flight).
//! - [`progress`]: which audience pages a broadcast finished, for resuming.
//! - [`remover`]: batches gone connections into 25-item removals while
//!   sending goes on.
//! - [`fanout`]: the engine: audience pages → rate-limited concurrent sends →
//!   report.
//! - [`redrive`]: moves dead-lettered jobs back to the jobs queue.
//! - [`worker`]: receive → fan out → settle the message; heartbeat; shutdown.
//! - [`telemetry`]: JSON logs and process-wide counters.
//! - [`metrics`]: the counters as CloudWatch EMF lines and Prometheus text,
//!   `/metrics` and `/healthz`, and the `fanout health` probe.
//! - [`ecs`]: ECS task scale-in protection while jobs run.
//! - [`local`]: development tools: a local API Gateway WebSocket stand-in and
//!   a WebSocket load client. Never on the worker's path.

pub mod aws;
pub mod backoff;
pub mod config;
pub mod connection;
pub mod ecs;
pub mod fanout;
pub mod gateway;
pub mod job;
pub mod limiter;
pub mod local;
pub mod metrics;
pub mod progress;
pub mod queue;
pub mod redrive;
pub mod remover;
pub mod store;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod worker;
