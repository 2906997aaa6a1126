//! `fanout health`: the container health check's probe of `/healthz`
//! (distroless images have no curl).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

use super::{MetricsError, MetricsSettings};

/// `fanout health`'s arguments. Read from flags or the task's environment,
/// not from the full config: a health check must not fail on an unrelated
/// config error.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    /// The worker's metrics address (its `metrics_listen`); a wildcard
    /// address is probed on loopback.
    #[arg(long, env = "FANOUT_METRICS_LISTEN", default_value_t = MetricsSettings::DEFAULT_LISTEN)]
    pub addr: SocketAddr,
    /// How long to wait for the answer; keep it under the health check's own
    /// timeout (5 s in the image and the template).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Runs `fanout health`: `Ok` → exit 0, `Err` → print it and exit 1.
pub async fn health(args: &HealthArgs) -> Result<(), MetricsError> {
    probe_health(args.addr, args.timeout).await
}

/// `fanout health`: GETs `/healthz` on the worker listening at `listen`
/// (an unspecified address such as `0.0.0.0` is probed on loopback).
/// `Ok` means exit 0 for the container health check.
pub async fn probe_health(listen: SocketAddr, timeout: Duration) -> Result<(), MetricsError> {
    let addr = probe_target(listen);
    let unreachable = |reason: String| MetricsError::HealthUnreachable { addr, reason };
    let uri: hyper::Uri = format!("http://{addr}/healthz")
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| unreachable(e.to_string()))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let exchange = async {
        let response = client
            .get(uri)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok::<_, MetricsError>((status, body))
    };
    let (status, body) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout:?}")))??;
    if status.is_success() {
        Ok(())
    } else {
        Err(MetricsError::Unhealthy {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// The address to probe for a listen address: a wildcard listener is
/// reachable on loopback.
pub fn probe_target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        }
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}
