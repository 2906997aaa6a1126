//! Metrics exporters and liveness over [`telemetry::Metrics`](fanout_core::telemetry::Metrics):
//!
//! - CloudWatch Embedded Metric Format: one JSON line on stdout every
//!   interval with the deltas since the previous line. CloudWatch Logs turns
//!   it into metrics in the namespace `fanout`, with no agent in the task.
//! - Prometheus/OpenMetrics text at `GET /metrics`, for those who scrape.
//! - `GET /healthz`: 200 while the receive loop polled recently or jobs are
//!   running, 503 when it stalled with nothing running. `fanout health`
//!   ([`health`]) calls it for the container health check (distroless images
//!   have no curl).
//!
//! # Layout
//!
//! - `emf`: the EMF lines and the task that prints them.
//! - `prometheus`: the OpenMetrics text.
//! - `server`: `/metrics` and `/healthz`, and the liveness judgement.
//! - `probe`: `fanout health`.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fanout_core::telemetry::Snapshot;

mod emf;
mod probe;
mod prometheus;
mod server;

pub use emf::{emit_emf, render_emf};
pub use probe::{HealthArgs, health, probe_health, probe_target};
pub use prometheus::render_prometheus;
pub use server::{Health, MetricsServer, judge, poll_age};

/// The CloudWatch namespace of the EMF metrics; the template's alarms read it.
pub const EMF_NAMESPACE: &str = "fanout";

/// The one EMF dimension; its value tells services apart in one account.
pub const EMF_DIMENSION: &str = "Service";

/// Where the exporters listen and how often they speak. The configuration's
/// telemetry section maps these to its keys; [`Default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Address of `/metrics` and `/healthz`. Loopback by default: the
    /// container health check runs inside the task. Use `0.0.0.0:9102` to
    /// let a Prometheus outside the task scrape it.
    pub listen: SocketAddr,
    /// How often an EMF line is printed; `None` turns EMF off (local runs).
    pub emf_interval: Option<Duration>,
    /// `/healthz` fails when the receive loop has not finished a poll for
    /// this long and no job is running. Three long-poll waits (3 × 20 s) tolerate a slow receive
    /// or two without flapping.
    pub health_max_age: Duration,
    /// The value of the EMF `Service` dimension.
    pub service: String,
}

impl MetricsSettings {
    pub const DEFAULT_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9102);
    pub const DEFAULT_EMF_INTERVAL: Duration = Duration::from_secs(60);
    pub const DEFAULT_HEALTH_MAX_AGE: Duration = Duration::from_secs(60);
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            emf_interval: Some(Self::DEFAULT_EMF_INTERVAL),
            health_max_age: Self::DEFAULT_HEALTH_MAX_AGE,
            service: "fanout".to_owned(),
        }
    }
}

/// Failures of the exporters and of the health probe.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen on {addr} for /metrics and /healthz: {source}; pick another address or free the port"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the metrics server stopped: {0}")]
    Serve(std::io::Error),
    #[error(
        "no answer from http://{addr}/healthz: {reason}; is `fanout run` up and listening there?"
    )]
    HealthUnreachable { addr: SocketAddr, reason: String },
    #[error("unhealthy: /healthz answered HTTP {status}: {body}")]
    Unhealthy { status: u16, body: String },
}

/// Whether the task takes part in a fleet's budget: it has seen the fleet
/// table or falls back for want of it.
pub(crate) fn in_fleet(s: &Snapshot) -> bool {
    s.fleet_tasks > 0 || s.fleet_on_fallback > 0 || s.fleet_renewals_failed > 0
}

pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[cfg(test)]
mod tests;
