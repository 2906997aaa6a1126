//! fanout's test kit: the harnesses every integration test shares, in one
//! crate (`publish = false`), so each test uses what it needs and nothing
//! is compiled per test binary with its warnings silenced.
//!
//! # Layout
//!
//! - [`support`]: the emulator environment, raw SDK clients to set up and
//!   inspect queues and tables, unique names, and `fanout` as a child
//!   process (`support::worker`).
//! - [`local_support`]: the local API Gateway stand-in (`fanout-dev`'s
//!   gateway) in process, and real WebSocket clients of it.
//! - [`stack`]: one test's stack in one call (clients, queues, a table,
//!   the local gateway) and `fanout` commands pointed at it.
//! - [`pki`]: a test CA and server certificates, made with the openssl
//!   CLI, for the TLS tests.
//! - [`fault_support`]: the fault-injection proxy, the rig that puts it in
//!   front of SQS, DynamoDB and the gateway, and the invariants every fault
//!   test checks.

pub mod fault_support;
pub mod local_support;
pub mod pki;
pub mod stack;
pub mod support;
