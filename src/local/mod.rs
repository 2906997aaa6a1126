//! Development tools that stand in for AWS on one machine. Never on the
//! worker's path: the worker talks to whatever `FANOUT_GATEWAY_ENDPOINT` names.
//!
//! - [`gateway`]: `fanout gateway`, a local API Gateway WebSocket API: real
//!   WebSocket clients, `$connect`/`$disconnect` rows in DynamoDB, the
//!   `@connections` management API, and fault injection.
//! - [`clients`]: `fanout clients`, N real WebSocket clients that count what
//!   they receive and print a JSON summary.

pub mod clients;
pub mod gateway;
