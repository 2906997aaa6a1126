//! fanout's core: what a broadcast is and how it is delivered, with no AWS
//! SDK and no HTTP stack. The adapters (crate `fanout-aws`) and the fakes in
//! tests plug in behind four traits, so this crate compiles and tests
//! alone.
//!
//! # Layout
//!
//! The seams:
//! - [`queue`]: [`queue::JobQueue`], where jobs come from and go back to.
//! - [`store`]: [`store::ConnectionStore`], the audience in pages, and batch
//!   removal.
//! - [`gateway`]: [`gateway::Gateway`], one send, and [`gateway::PostOutcome`],
//!   what its answer means ([`gateway::status`] maps HTTP answers to it).
//! - [`report`]: [`report::ReportSink`], where broadcast reports go, and the
//!   [`report::Reporter`] that sends each to every destination.
//! - [`fleet`]: [`fleet::LeaseTable`], where the tasks of a fleet keep their
//!   leases on the fleet's send rate, and the [`fleet::Coordinator`] that
//!   takes this task's share of it.
//!
//! What runs behind them:
//! - [`job`]: the broadcast job schema producers send, and its pure parser.
//! - [`keys`]: the broadcast and run keys, and a connection's final states.
//! - [`limits`]: AWS's quotas and fanout's own bounds, each defined once.
//! - [`connection`]: connection ids and the table row keys they were read with.
//! - [`expiry`]: rows certainly gone by age, removed without a post.
//! - [`evidence`]: when a 410 proves a connection gone: the endpoint's
//!   standing, judged per process, and the `$connect` window.
//! - `rechecks`: the process-wide queue of 410s posted to again after the
//!   `$connect` window, removed only on a second 410.
//! - [`backoff`]: exponential backoff with full jitter, shared by every retry.
//! - [`limiter`]: the process-wide send budget (rate and requests in flight),
//!   capped by the fleet share.
//! - `live`: a running broadcast's progress line and gauges.
//! - [`progress`]: which audience pages a broadcast finished, for resuming.
//! - [`channels`]: several channels as one audience, each connection once.
//! - `counts`: one job's counts, bumped with the process-wide counters.
//! - [`remover`]: batches gone connections into removals while sending goes on.
//! - [`durable`]: run records in the checkpoint table: idempotent
//!   broadcasts, and one task at a time per run.
//! - [`engine`]: audience pages → rate-limited concurrent sends → report.
//! - [`worker`]: receive → fan out → settle the message; heartbeat; shutdown.
//! - [`redrive`]: moves dead-lettered jobs back to the jobs queue.
//! - [`shutdown`]: SIGTERM or Ctrl-C as a cancellation.
//! - [`telemetry`]: the process-wide counters.

// The seams and the vocabulary every crate speaks.
pub mod channels;
pub mod connection;
pub mod evidence;
pub mod expiry;
pub mod fleet;
pub mod gateway;
pub mod job;
pub mod keys;
pub mod limits;
pub mod queue;
pub mod report;
pub mod store;
pub mod telemetry;

// What runs behind them: the engine and the worker, and the parts they are
// built from.
mod backoff;
mod counts;
pub mod durable;
pub mod engine;
mod limiter;
mod live;
mod progress;
mod rechecks;
mod redrive;
mod remover;
mod shutdown;
#[cfg(any(test, feature = "fakes"))]
pub mod testing;
pub mod worker;

pub use backoff::Backoff;
pub use limiter::{RateSettings, SendBudget};
pub use redrive::{Redriven, redrive};
pub use shutdown::cancel_on_signal;
