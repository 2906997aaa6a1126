//! fanout's core: what a broadcast is and how it is delivered, with no AWS
//! SDK and no HTTP stack. The adapters (crate `fanout-aws`) and the fakes in
//! tests plug in behind four traits, so this crate compiles and tests
//! alone.
//!
//! # Layout
//!
//! The seams:
//! - [`queue`]: [`queue::JobQueue`], where jobs come from and go back to,
//!   and the redrive of dead-lettered jobs.
//! - [`store`]: [`store::ConnectionStore`], the audience in pages, batch
//!   removal, and several channels read as one audience.
//! - [`gateway`]: [`gateway::Gateway`], one send, and [`gateway::PostOutcome`],
//!   what its answer means ([`gateway::status`] maps HTTP answers to it).
//! - [`reports`]: [`reports::ReportSink`], where broadcast reports go, and the
//!   [`reports::Reporter`] that sends each to every destination.
//! - [`fleet`]: [`fleet::LeaseTable`], where the tasks of a fleet keep their
//!   leases on the fleet's send rate, and the [`fleet::Coordinator`] that
//!   takes this task's share of it.
//! - [`runs`]: [`runs::RunTable`], durable run records: idempotent
//!   broadcasts, one task at a time per run, checkpoints.
//!
//! What runs behind them:
//! - [`job`]: the broadcast job producers send (the wire format, its
//!   validation, the hand-ons fanout writes), and the broadcast and run keys.
//! - [`engine`]: one run, top-down: audience pages → rate-limited concurrent
//!   sends under the retry policy → the run's summary; the removal of gone
//!   rows, on evidence, beside it.
//! - [`budget`]: the process-wide send budget (rate and requests in flight)
//!   and the adaptive rate under it, capped by the fleet share.
//! - [`worker`]: receive → fan out → settle the message; heartbeat; shutdown.
//!
//! Small pure parts every layer shares:
//! - [`connection`]: connection ids, the row keys they were read with, the
//!   final states a connection reaches in a broadcast, and rows certainly
//!   gone by age.
//! - [`limits`]: AWS's quotas and fanout's own bounds, each defined once,
//!   and the settings a message points at ([`limits::setting`]), named by
//!   the binary.
//! - [`Backoff`]: exponential backoff with full jitter, shared by every retry.
//! - [`telemetry`]: the process-wide counters.
//! - `fakes`: in-process stand-ins behind every seam, one a module, for
//!   tests (feature `fakes`).

pub mod budget;
pub mod connection;
pub mod engine;
pub mod fleet;
pub mod gateway;
pub mod job;
pub mod limits;
pub mod queue;
pub mod reports;
pub mod runs;
pub mod store;
pub mod telemetry;
pub mod worker;

mod backoff;
#[cfg(any(test, feature = "fakes"))]
pub mod fakes;

pub use backoff::Backoff;
