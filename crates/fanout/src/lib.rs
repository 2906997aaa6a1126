//! The `fanout` service's own parts, beside the engine (`fanout-core`) and
//! the AWS adapters (`fanout-aws`): what the binary needs to run as an ECS
//! service.
//!
//! # Layout
//!
//! - [`config`]: the typed configuration: embedded defaults, file, `FANOUT_*`
//!   environment overrides, validation, in a file per section.
//! - [`logging`]: JSON logs on stdout.
//! - [`metrics`]: the counters as CloudWatch EMF lines and Prometheus text,
//!   `/metrics` and `/healthz`, and the `fanout health` probe.
//! - [`ecs`]: ECS task scale-in protection while jobs run.
//!
//! The binary (`main.rs` and its `commands/`, one module per command)
//! parses the command line and wires these to the worker.

pub mod config;
pub mod ecs;
pub mod logging;
pub mod metrics;
