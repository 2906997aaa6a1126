//! The adapters, in process, against their real peers: the SQS and DynamoDB
//! adapters on moto and dynalite, the fleet's lease table, both send paths
//! against a stock HTTP server and the local API Gateway stand-in, the
//! gateway client's trust and timeouts, and the metrics exporters over HTTP.
//!
//! One test binary for the layer: `./scripts/test.sh --test adapters` runs
//! it, `./scripts/test.sh --test adapters sqs_adapter::` one file's tests.

mod classify;
mod dynamo_adapter;
mod fleet_table;
mod gateway_trust;
mod lean_gateway;
mod metrics_http;
mod sqs_adapter;

use std::net::SocketAddr;

use fanout_testkit::support::loopback_listener;

/// Serves `app` on a free port of 127.0.0.1 for the rest of the test.
async fn serve_on_loopback(app: axum::Router) -> SocketAddr {
    let (listener, addr) = loopback_listener().await;
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A port of 127.0.0.1 nothing listens on.
async fn closed_port() -> SocketAddr {
    loopback_listener().await.1
}
