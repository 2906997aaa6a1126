//! The exporters' HTTP server: `GET /metrics` and `GET /healthz`, with the
//! EMF task beside it, and the liveness judgement `/healthz` answers from.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use fanout_core::telemetry::Metrics;

use super::{MetricsError, MetricsSettings, emit_emf, render_prometheus, unix_ms_now};

/// The media type Prometheus asks for and prometheus-client writes.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long ago the receive loop was last alive. Before the first poll the
/// clock runs from `started_ms`, so a worker that never gets to poll turns
/// unhealthy too, after the same bound.
pub fn poll_age(now_ms: u64, last_poll_ms: u64, started_ms: u64) -> Duration {
    let since = if last_poll_ms == 0 {
        started_ms
    } else {
        last_poll_ms
    };
    Duration::from_millis(now_ms.saturating_sub(since))
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health_max_age: Duration,
    started_ms: u64,
}

/// The exporters' routes: `/metrics` and `/healthz`.
fn router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health_handler))
        .with_state(state)
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        render_prometheus(&state.metrics),
    )
}

async fn health_handler(State(state): State<AppState>) -> impl IntoResponse {
    let last = Metrics::get(&state.metrics.last_poll_unix_ms);
    let age = poll_age(unix_ms_now(), last, state.started_ms);
    let jobs = Metrics::get(&state.metrics.jobs_in_flight);
    let health = judge(age, state.health_max_age, jobs);
    let status = match health {
        Health::Polling | Health::Busy => StatusCode::OK,
        Health::Stalled => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = match health {
        Health::Polling => format!("ok: last poll {} ms ago", age.as_millis()),
        Health::Busy => format!(
            "ok: {jobs} jobs running, last poll {} ms ago",
            age.as_millis()
        ),
        Health::Stalled => format!(
            "stalled: no poll for {} ms (bound {} ms) and no job running",
            age.as_millis(),
            state.health_max_age.as_millis()
        ),
    };
    (status, body)
}

/// What `/healthz` concludes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The receive loop polled within the bound.
    Polling,
    /// No recent poll, but jobs are running: a worker whose job slots are
    /// all taken does not poll until one frees, and killing it would cut
    /// its broadcasts halfway. Once they end, a stuck loop shows as
    /// `Stalled`.
    Busy,
    /// No recent poll and nothing running: the loop is stuck.
    Stalled,
}

/// Judges liveness from the poll age and the jobs running.
pub fn judge(poll_age: Duration, max_age: Duration, jobs_in_flight: u64) -> Health {
    if poll_age <= max_age {
        Health::Polling
    } else if jobs_in_flight > 0 {
        Health::Busy
    } else {
        Health::Stalled
    }
}

/// The exporters' listener, bound but not yet serving: binding first lets
/// a caller learn the port (tests bind port 0) and fail early on a taken
/// address.
pub struct MetricsServer {
    listener: TcpListener,
    settings: MetricsSettings,
}

impl MetricsServer {
    pub async fn bind(settings: MetricsSettings) -> Result<Self, MetricsError> {
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| MetricsError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        Ok(Self { listener, settings })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, MetricsError> {
        self.listener.local_addr().map_err(MetricsError::Serve)
    }

    /// Serves `/metrics` and `/healthz`, and prints EMF lines to stdout when
    /// enabled, until `shutdown`; then prints a last EMF line and returns.
    pub async fn run(
        self,
        metrics: Arc<Metrics>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), MetricsError> {
        let state = AppState {
            metrics: Arc::clone(&metrics),
            health_max_age: self.settings.health_max_age,
            started_ms: unix_ms_now(),
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let emf = self.settings.emf_interval.map(|interval| {
            tokio::spawn(emit_emf(
                metrics,
                interval,
                self.settings.service.clone(),
                std::io::stdout(),
                stop.clone().cancelled_owned(),
            ))
        });
        let served = axum::serve(self.listener, router(state))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(MetricsError::Serve);
        stop.cancel();
        if let Some(emf) = emf {
            let _ = emf.await;
        }
        served
    }
}
