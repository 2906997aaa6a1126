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

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use fanout_core::telemetry::{Metrics, Snapshot};

/// The CloudWatch namespace of the EMF metrics; the template's alarms read it.
pub const EMF_NAMESPACE: &str = "fanout";
/// The one EMF dimension; its value tells services apart in one account.
pub const EMF_DIMENSION: &str = "Service";
/// The media type Prometheus asks for and prometheus-client writes.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Where the exporters listen and how often they speak. `main.rs` maps these
/// to config keys; [`Default`] gives the documented defaults.
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
fn in_fleet(s: &Snapshot) -> bool {
    s.fleet_tasks > 0 || s.fleet_on_fallback > 0 || s.fleet_renewals_failed > 0
}

/// Renders one EMF line (no trailing newline) for the counts in `delta`,
/// stamped `timestamp_ms`. `JobDuration` is the mean of the jobs that
/// finished in the interval and is left out when none did, so CloudWatch
/// does not average in zeros.
pub fn render_emf(delta: &Snapshot, service: &str, timestamp_ms: u64) -> String {
    let mut root = Map::new();
    let mut declared = Vec::new();
    for (name, _, _, value) in delta.counters() {
        let unit = if name.ends_with("Ms") {
            "Milliseconds"
        } else {
            "Count"
        };
        declared.push(json!({ "Name": name, "Unit": unit }));
        root.insert(name.to_owned(), Value::from(value));
    }
    declared.push(json!({ "Name": "JobsInFlight", "Unit": "Count" }));
    root.insert("JobsInFlight".to_owned(), Value::from(delta.jobs_in_flight));
    // The running broadcasts' progress, as their last progress lines said.
    for (name, unit, value) in [
        ("ProgressDelivered", "Count", delta.progress_delivered),
        ("ProgressGone", "Count", delta.progress_gone),
        (
            "ProgressRate",
            "Count/Second",
            delta.progress_rate_per_second,
        ),
        (
            "ProgressSharePercent",
            "Percent",
            delta.progress_share_percent,
        ),
        ("ProgressEtaSeconds", "Seconds", delta.progress_eta_seconds),
    ] {
        declared.push(json!({ "Name": name, "Unit": unit }));
        root.insert(name.to_owned(), Value::from(value));
    }
    // Only a task in a fleet has these: the others pay for no extra metrics.
    if in_fleet(delta) {
        for (name, unit, value) in [
            ("FleetShare", "Count/Second", delta.fleet_share_per_second),
            ("FleetTasks", "Count", delta.fleet_tasks),
            ("FleetOnFallback", "Count", delta.fleet_on_fallback),
        ] {
            declared.push(json!({ "Name": name, "Unit": unit }));
            root.insert(name.to_owned(), Value::from(value));
        }
    }
    if delta.job_duration_count > 0 {
        let mean = delta.job_duration_ms_sum as f64 / delta.job_duration_count as f64;
        declared.push(json!({ "Name": "JobDuration", "Unit": "Milliseconds" }));
        root.insert("JobDuration".to_owned(), Value::from(mean));
    }
    root.insert(EMF_DIMENSION.to_owned(), Value::from(service));
    root.insert(
        "_aws".to_owned(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": EMF_NAMESPACE,
                "Dimensions": [[EMF_DIMENSION]],
                "Metrics": declared,
            }],
        }),
    );
    Value::Object(root).to_string()
}

/// Prints an EMF line to `out` every `interval` until `shutdown`, then one
/// last line with what happened since, so a stopping task loses no counts.
pub async fn emit_emf<W: std::io::Write>(
    metrics: Arc<Metrics>,
    interval: Duration,
    service: String,
    mut out: W,
    shutdown: impl Future<Output = ()>,
) {
    let mut previous = Snapshot::default();
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let last = tokio::select! {
            () = &mut shutdown => true,
            _ = ticks.tick() => false,
        };
        let now = Snapshot::read(&metrics);
        let line = render_emf(&now.since(&previous), &service, unix_ms_now());
        previous = now;
        // One write per line: the log lines written by tracing to the same
        // stdout then never interleave with it.
        if let Err(error) = out.write_all(format!("{line}\n").as_bytes()) {
            tracing::warn!(%error, "could not write an EMF metrics line");
        }
        let _ = out.flush();
        if last {
            return;
        }
    }
}

/// Renders the Prometheus/OpenMetrics text exposition of `metrics`.
pub fn render_prometheus(metrics: &Arc<Metrics>) -> String {
    let mut registry = Registry::with_prefix("fanout");
    registry.register_collector(Box::new(Exporter(Arc::clone(metrics))));
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// Reads the shared counters at scrape time.
#[derive(Debug)]
struct Exporter(Arc<Metrics>);

impl Collector for Exporter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = Snapshot::read(&self.0);
        for (_, name, help, value) in s.counters() {
            encode_counter(&mut encoder, name, help, value)?;
        }
        let counters: [(&str, &str, f64); 2] = [
            (
                "job_duration_seconds",
                "Summed duration of finished jobs",
                s.job_duration_ms_sum as f64 / 1000.0,
            ),
            (
                "jobs_finished",
                "Finished jobs counted in job_duration_seconds",
                s.job_duration_count as f64,
            ),
        ];
        for (name, help, value) in counters {
            encode_counter(&mut encoder, name, help, value)?;
        }
        let gauges: [(&str, &str, f64); 7] = [
            (
                "jobs_in_flight",
                "Jobs running now",
                s.jobs_in_flight as f64,
            ),
            (
                "last_poll_timestamp_seconds",
                "When the receive loop last finished a poll (Unix time)",
                s.last_poll_unix_ms as f64 / 1000.0,
            ),
            (
                "progress_delivered",
                "Delivered so far by the broadcasts running now",
                s.progress_delivered as f64,
            ),
            (
                "progress_gone",
                "Gone so far in the broadcasts running now",
                s.progress_gone as f64,
            ),
            (
                "progress_rate_per_second",
                "Deliveries per second of the running broadcasts over their last progress interval",
                s.progress_rate_per_second as f64,
            ),
            (
                "progress_share_percent",
                "The least done running broadcast whose share is known, in percent (0: none known)",
                s.progress_share_percent as f64,
            ),
            (
                "progress_eta_seconds",
                "The longest estimated time left of the running broadcasts (0: none known)",
                s.progress_eta_seconds as f64,
            ),
        ];
        let fleet: [(&str, &str, f64); 3] = [
            (
                "fleet_share_per_second",
                "This task's share of the fleet's send rate, per second",
                s.fleet_share_per_second as f64,
            ),
            (
                "fleet_tasks",
                "Live tasks in the fleet table, this one among them",
                s.fleet_tasks as f64,
            ),
            (
                "fleet_on_fallback",
                "1 while the fleet table cannot be reached (the fallback rate)",
                s.fleet_on_fallback as f64,
            ),
        ];
        let fleet = if in_fleet(&s) { &fleet[..] } else { &[] };
        for &(name, help, value) in gauges.iter().chain(fleet) {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// One counter of the exposition (integer counts and fractional seconds
/// alike).
fn encode_counter<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> Result<(), std::fmt::Error>
where
    ConstCounter<N>: EncodeMetric,
{
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

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

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    fn sample() -> Metrics {
        let m = Metrics::default();
        Metrics::add(&m.posts, 12);
        Metrics::add(&m.delivered, 9);
        Metrics::add(&m.gone, 2);
        Metrics::add(&m.removed, 2);
        Metrics::add(&m.failed, 1);
        Metrics::add(&m.throttled, 3);
        Metrics::add(&m.retries, 3);
        Metrics::add(&m.jobs_in_flight, 2);
        m.record_job_duration(Duration::from_millis(1500));
        m.record_job_duration(Duration::from_millis(500));
        m
    }

    #[test]
    fn deltas_subtract_counters_and_keep_gauges() {
        let m = sample();
        let first = Snapshot::read(&m);
        Metrics::add(&m.posts, 5);
        Metrics::add(&m.jobs_in_flight, 1);
        let second = Snapshot::read(&m);
        let d = second.since(&first);
        assert_eq!(d.posts, 5);
        assert_eq!(d.delivered, 0);
        assert_eq!(d.job_duration_count, 0);
        assert_eq!(d.jobs_in_flight, 3);
    }

    #[test]
    fn the_progress_gauges_and_report_counts_are_in_both_exports() {
        let m = Arc::new(sample());
        let key = m.running.enter();
        m.running.update(
            key,
            fanout_core::telemetry::Figures {
                delivered: 700,
                gone: 3,
                rate_per_second: 99.6,
                share: Some(0.7),
                eta: Some(Duration::from_secs(12)),
            },
        );
        Metrics::add(&m.reports_sent, 4);
        Metrics::incr(&m.reports_failed);
        let line = render_emf(&Snapshot::read(&m), "fanout", 0);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (
                &v["ProgressDelivered"],
                &v["ProgressGone"],
                &v["ProgressRate"],
                &v["ProgressSharePercent"],
                &v["ProgressEtaSeconds"]
            ),
            (&json!(700), &json!(3), &json!(100), &json!(70), &json!(12))
        );
        assert_eq!(
            (&v["ReportsSent"], &v["ReportsFailed"]),
            (&json!(4), &json!(1))
        );
        let text = render_prometheus(&m);
        for expected in [
            "fanout_progress_delivered 700",
            "fanout_progress_rate_per_second 100",
            "fanout_progress_eta_seconds 12",
            "fanout_reports_failed_total 1",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
        m.running.leave(key);
        assert!(render_prometheus(&m).contains("fanout_progress_delivered 0"));
    }

    #[test]
    fn emf_line_declares_every_metric_it_carries() {
        let delta = Snapshot::read(&sample());
        let line = render_emf(&delta, "fanout-prod", 1_700_000_000_000);
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(v["Service"], "fanout-prod");
        assert_eq!(v["Posts"], 12);
        assert_eq!(v["Delivered"], 9);
        assert_eq!(v["Failed"], 1);
        assert_eq!(v["JobsInFlight"], 2);
        assert_eq!(v["JobDuration"], 1000.0);
        let aws = &v["_aws"];
        assert_eq!(aws["Timestamp"], 1_700_000_000_000u64);
        let directive = &aws["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "fanout");
        assert_eq!(directive["Dimensions"], json!([["Service"]]));
        let declared = directive["Metrics"].as_array().expect("array");
        for metric in declared {
            let name = metric["Name"].as_str().expect("name");
            assert!(v[name].is_number(), "{name} declared but missing");
        }
        let names: Vec<_> = declared.iter().map(|m| m["Name"].as_str()).collect();
        for expected in [
            "Posts",
            "Delivered",
            "Gone",
            "Removed",
            "Failed",
            "Throttled",
            "Retries",
            "JobDuration",
            "JobsInFlight",
        ] {
            assert!(names.contains(&Some(expected)), "{expected} not declared");
        }
    }

    #[test]
    fn the_fleet_gauges_appear_only_for_a_task_in_a_fleet() {
        let alone = sample();
        let line = render_emf(&Snapshot::read(&alone), "fanout", 1);
        assert!(!line.contains("FleetShare"), "{line}");
        assert!(
            line.contains(r#"{"Name":"BudgetWaitMs","Unit":"Milliseconds"}"#),
            "{line}"
        );
        let text = render_prometheus(&Arc::new(sample()));
        assert!(!text.contains("fanout_fleet_share_per_second"), "{text}");

        let fleet = sample();
        fleet.fleet_share_per_second.store(500, Ordering::Relaxed);
        fleet.fleet_tasks.store(4, Ordering::Relaxed);
        let v: Value =
            serde_json::from_str(&render_emf(&Snapshot::read(&fleet), "fanout", 1)).unwrap();
        assert_eq!(v["FleetShare"], 500);
        assert_eq!(v["FleetTasks"], 4);
        assert_eq!(v["FleetOnFallback"], 0);
        let text = render_prometheus(&Arc::new(fleet));
        for line in [
            "fanout_fleet_share_per_second 500.0",
            "fanout_fleet_tasks 4.0",
            "fanout_fleet_on_fallback 0.0",
            "# TYPE fanout_fleet_tasks gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn emf_leaves_out_job_duration_when_no_job_finished() {
        let line = render_emf(&Snapshot::default(), "fanout", 1);
        let v: Value = serde_json::from_str(&line).expect("valid JSON");
        assert!(v.get("JobDuration").is_none());
        assert!(!line.contains("\"JobDuration\""));
        assert_eq!(v["Posts"], 0);
    }

    #[test]
    fn prometheus_text_carries_every_counter() {
        let text = render_prometheus(&Arc::new(sample()));
        for line in [
            "fanout_posts_total 12",
            "fanout_delivered_total 9",
            "fanout_gone_total 2",
            "fanout_removed_total 2",
            "fanout_failed_total 1",
            "fanout_throttled_total 3",
            "fanout_retries_total 3",
            "fanout_job_duration_seconds_total 2.0",
            "fanout_jobs_finished_total 2.0",
            "fanout_jobs_in_flight 2.0",
            "# TYPE fanout_posts counter",
            "# TYPE fanout_jobs_in_flight gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn poll_age_runs_from_start_until_the_first_poll() {
        assert_eq!(poll_age(10_000, 0, 4_000), Duration::from_secs(6));
        assert_eq!(poll_age(10_000, 9_000, 4_000), Duration::from_secs(1));
        // A clock step backwards reads as fresh, not as a panic.
        assert_eq!(poll_age(10_000, 12_000, 4_000), Duration::ZERO);
    }

    #[test]
    fn liveness_needs_a_recent_poll_or_a_running_job() {
        let bound = Duration::from_secs(60);
        let fresh = Duration::from_secs(59);
        let stale = Duration::from_secs(61);
        assert_eq!(judge(fresh, bound, 0), Health::Polling);
        assert_eq!(judge(fresh, bound, 3), Health::Polling);
        assert_eq!(judge(bound, bound, 0), Health::Polling);
        assert_eq!(judge(stale, bound, 2), Health::Busy);
        assert_eq!(judge(stale, bound, 0), Health::Stalled);
    }

    #[test]
    fn wildcard_listeners_are_probed_on_loopback() {
        let probe = |s: &str| probe_target(s.parse().expect("addr")).to_string();
        assert_eq!(probe("0.0.0.0:9102"), "127.0.0.1:9102");
        assert_eq!(probe("[::]:9102"), "[::1]:9102");
        assert_eq!(probe("10.1.2.3:80"), "10.1.2.3:80");
    }

    #[test]
    fn health_args_default_to_the_default_listener() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            health: HealthArgs,
        }
        let cli = Cli::try_parse_from(["fanout", "--timeout", "2s"]).expect("parses");
        // FANOUT_METRICS_LISTEN is not set in tests.
        assert_eq!(cli.health.addr, MetricsSettings::DEFAULT_LISTEN);
        assert_eq!(cli.health.timeout, Duration::from_secs(2));
        let cli = Cli::try_parse_from(["fanout", "--addr", "0.0.0.0:9200"]).expect("parses");
        assert_eq!(cli.health.addr.port(), 9200);
    }

    #[tokio::test]
    async fn emf_task_prints_a_last_line_on_shutdown() {
        let metrics = Arc::new(sample());
        let mut out = Vec::new();
        // Shutdown at once: the hour-long interval never ticks, so the one
        // line printed is the final flush.
        emit_emf(
            metrics,
            Duration::from_secs(3600),
            "svc".to_owned(),
            &mut out,
            std::future::ready(()),
        )
        .await;
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 1);
        let v: Value = serde_json::from_str(lines[0]).expect("valid JSON");
        assert_eq!(v["Posts"], 12);
    }
}
