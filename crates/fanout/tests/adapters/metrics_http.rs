//! The exporters over real HTTP on 127.0.0.1: `/metrics` carries the
//! counters, `/healthz` follows the receive loop's last poll, and
//! `probe_health` (what `fanout health` runs) turns that into Ok/Err.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fanout::metrics::{MetricsError, MetricsServer, MetricsSettings, probe_health};
use fanout_core::telemetry::Metrics;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), MetricsError>>,
}

async fn start(metrics: Arc<Metrics>, health_max_age: Duration) -> Running {
    let settings = MetricsSettings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        emf_interval: None,
        health_max_age,
        service: "test".to_owned(),
    };
    let server = MetricsServer::bind(settings).await.expect("bind");
    let addr = server.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(metrics, async {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

impl Running {
    async fn stop(self) {
        self.stop.send(()).expect("server running");
        self.task
            .await
            .expect("server task")
            .expect("clean shutdown");
    }
}

/// What `fanout health` says of the exporter at `addr`.
async fn fanout_health(addr: SocketAddr) -> Result<(), MetricsError> {
    probe_health(addr, Duration::from_secs(5)).await
}

async fn get(addr: SocketAddr, path: &str) -> (u16, Option<String>, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri = format!("http://{addr}{path}").parse().expect("uri");
    let response = client.get(uri).await.expect("server answers");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).expect("utf-8"),
    )
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

#[tokio::test]
async fn metrics_endpoint_serves_the_live_counters() {
    let metrics = Arc::new(Metrics::default());
    let server = start(metrics.clone(), Duration::from_secs(60)).await;

    let (status, content_type, text) = get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{content_type:?}"
    );
    assert!(
        text.lines().any(|l| l == "fanout_delivered_total 0"),
        "{text}"
    );

    // Counters read at scrape time, not at start.
    Metrics::add(&metrics.delivered, 41);
    Metrics::incr(&metrics.delivered);
    Metrics::add(&metrics.gone, 7);
    Metrics::incr(&metrics.jobs_in_flight);
    let (_, _, text) = get(server.addr, "/metrics").await;
    for line in [
        "fanout_delivered_total 42",
        "fanout_gone_total 7",
        "fanout_jobs_in_flight 1.0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?}:\n{text}");
    }
    server.stop().await;
}

#[tokio::test]
async fn healthz_is_ok_after_a_recent_poll() {
    let metrics = Arc::new(Metrics::default());
    metrics.mark_poll();
    let server = start(metrics, Duration::from_secs(60)).await;

    let (status, _, body) = get(server.addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    fanout_health(server.addr).await.expect("healthy");
    server.stop().await;
}

#[tokio::test]
async fn healthz_is_ok_before_the_first_poll_within_the_bound() {
    // A worker still starting up has not polled yet; it gets the same
    // bound, counted from the server's start.
    let server = start(Arc::new(Metrics::default()), Duration::from_secs(60)).await;
    let (status, _, body) = get(server.addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn stale_poll_is_503_and_the_probe_fails() {
    let metrics = Arc::new(Metrics::default());
    // The receive loop last polled ten minutes ago: it is stuck.
    metrics
        .last_poll_unix_ms
        .store(unix_ms_now() - 600_000, Ordering::Relaxed);
    let server = start(metrics.clone(), Duration::from_secs(60)).await;

    let (status, _, body) = get(server.addr, "/healthz").await;
    assert_eq!(status, 503);
    assert!(body.starts_with("stalled"), "{body}");
    let probe = fanout_health(server.addr).await;
    assert!(
        matches!(probe, Err(MetricsError::Unhealthy { status: 503, .. })),
        "{probe:?}"
    );

    // Busy with jobs while all job slots are taken: a saturated worker does
    // not poll, and must not be killed mid-broadcast.
    Metrics::incr(&metrics.jobs_in_flight);
    let (status, _, body) = get(server.addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("1 jobs running"), "{body}");
    metrics.jobs_in_flight.store(0, Ordering::Relaxed);
    assert_eq!(get(server.addr, "/healthz").await.0, 503);

    // The loop comes back: healthy again.
    metrics.mark_poll();
    fanout_health(server.addr).await.expect("healthy again");
    server.stop().await;
}

#[tokio::test]
async fn probe_fails_when_nothing_listens() {
    let addr = crate::closed_port().await;
    let probe = fanout_health(addr).await;
    assert!(
        matches!(probe, Err(MetricsError::HealthUnreachable { .. })),
        "{probe:?}"
    );
}

#[tokio::test]
async fn a_taken_port_is_a_bind_error() {
    let first = start(Arc::new(Metrics::default()), Duration::from_secs(60)).await;
    let settings = MetricsSettings {
        listen: first.addr,
        emf_interval: None,
        ..MetricsSettings::default()
    };
    assert!(matches!(
        MetricsServer::bind(settings).await,
        Err(MetricsError::Bind { .. })
    ));
    first.stop().await;
}
