//! CloudWatch Embedded Metric Format: one JSON line on stdout every
//! interval with the deltas since the previous line.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use fanout_core::telemetry::{Metrics, Snapshot};

use super::{EMF_DIMENSION, EMF_NAMESPACE, in_fleet, unix_ms_now};

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
