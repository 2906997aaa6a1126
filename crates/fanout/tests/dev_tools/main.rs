//! The development tools against real peers: `fanout-dev gateway` with the
//! SDK's own client and real WebSocket clients, the clients library and its
//! run loop, and fanout against serverless-offline, the stand-in many
//! Serverless Framework users develop with.
//!
//! One test binary for the layer: `./scripts/test.sh --test dev_tools`.

mod local_clients;
mod local_gateway;
mod serverless_offline;
mod sink_seqs;
