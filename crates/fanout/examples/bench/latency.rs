//! SQS → first delivery: the real worker long-polls a queue on moto; a job
//! is sent while the poll waits, and the time from sending it to the first
//! PostToConnection leaving the engine is measured, job after job.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use fanout_aws::SqsQueue;
use fanout_core::Backoff;
use fanout_core::connection::ConnectionId;
use fanout_core::engine::Engine;
use fanout_core::gateway::{Gateway, PostOutcome};
use fanout_core::job::Capabilities;
use fanout_core::telemetry::Metrics;
use fanout_core::worker::{self, WorkerSettings};
use tokio_util::sync::CancellationToken;

/// Records when the first post after [`FirstPost::arm`] starts.
pub struct FirstPost<G> {
    inner: G,
    first: Mutex<Option<Instant>>,
}

impl<G> FirstPost<G> {
    pub fn new(inner: G) -> Self {
        Self {
            inner,
            first: Mutex::new(None),
        }
    }

    fn arm(&self) {
        *self.first.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn first(&self) -> Option<Instant> {
        *self.first.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<G: Gateway> Gateway for FirstPost<G> {
    async fn post(&self, id: &ConnectionId, payload: Bytes) -> PostOutcome {
        self.first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(Instant::now);
        self.inner.post(id, payload).await
    }
}

/// Sends `jobs` jobs one by one to a worker running `engine`, whose gateway
/// is `gateway`; returns each one's latency.
pub async fn measure<S, G>(
    config: &aws_config::SdkConfig,
    engine: Engine<S, FirstPost<G>>,
    gateway: Arc<FirstPost<G>>,
    jobs: usize,
) -> anyhow::Result<Vec<Duration>>
where
    S: fanout_core::store::ConnectionStore,
    G: Gateway,
{
    let wait = Duration::from_secs(20);
    let sqs = fanout_aws::clients::sqs_client(config, wait);
    let name = format!("bench-latency-{}", std::process::id());
    let url = sqs
        .create_queue()
        .queue_name(&name)
        .send()
        .await
        .context("create the benchmark queue (is moto up and AWS_ENDPOINT_URL_SQS set?)")?
        .queue_url()
        .context("no queue URL")?
        .to_owned();
    let engine = Arc::new(engine);
    let queue = Arc::new(SqsQueue::new(sqs.clone(), url.clone(), None, wait));
    let settings = WorkerSettings {
        max_concurrent_jobs: 4,
        visibility_timeout: Duration::from_secs(60),
        heartbeat_interval: Duration::from_secs(20),
        job_retry: Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(10),
            max_attempts: 1,
        },
        shutdown_grace: Duration::from_secs(5),
        exit_when_idle: false,
        capabilities: Capabilities {
            channels: false,
            audiences: Some(Vec::new()),
        },
        split_segments: 1,
        deferred_limit: 5,
        clock: std::sync::Arc::default(),
    };
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(worker::run(
        queue,
        engine,
        settings,
        Arc::new(Metrics::default()),
        fanout_core::reports::Reporter::none(),
        shutdown.clone(),
        None,
    ));

    let mut latencies = Vec::with_capacity(jobs);
    for n in 0..jobs {
        // Let the previous job finish and the next long poll start waiting.
        tokio::time::sleep(Duration::from_millis(500)).await;
        gateway.arm();
        let sent = Instant::now();
        sqs.send_message()
            .queue_url(&url)
            .message_body(format!(r#"{{"id":"latency-{n}","data":"ping"}}"#))
            .send()
            .await
            .context("send a job")?;
        let deadline = sent + Duration::from_secs(30);
        let first = loop {
            if let Some(first) = gateway.first() {
                break first;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "job {n} was not delivered in 30 s"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        latencies.push(first.saturating_duration_since(sent));
    }
    shutdown.cancel();
    let _ = worker.await;
    let _ = sqs.delete_queue().queue_url(&url).send().await;
    Ok(latencies)
}
