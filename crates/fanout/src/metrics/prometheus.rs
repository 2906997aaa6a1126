//! The Prometheus/OpenMetrics text exposition, read from the shared
//! counters at scrape time.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use fanout_core::telemetry::{Metrics, Snapshot};

use super::in_fleet;

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
        for (name, help, value) in gauges(&s) {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// The gauges of a snapshot; the fleet's only for a task in a fleet.
fn gauges(s: &Snapshot) -> Vec<(&'static str, &'static str, f64)> {
    let gauges: [(&'static str, &'static str, f64); 7] = [
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
    let fleet: [(&'static str, &'static str, f64); 3] = [
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
    let fleet = if in_fleet(s) { &fleet[..] } else { &[] };
    gauges.iter().chain(fleet).copied().collect()
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
