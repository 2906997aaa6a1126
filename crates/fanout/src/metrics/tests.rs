//! The exporters' tests: both renderings, the EMF task, liveness and the
//! probe's arguments.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use fanout_core::telemetry::Metrics;

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
    let v: Value = serde_json::from_str(&render_emf(&Snapshot::read(&fleet), "fanout", 1)).unwrap();
    assert_eq!(v["FleetShare"], 500);
    assert_eq!(v["FleetTasks"], 4);
    assert_eq!(v["FleetOnFallback"], 0);
    let text = render_prometheus(&Arc::new(fleet));
    has_lines(
        &text,
        &[
            "fanout_fleet_share_per_second 500.0",
            "fanout_fleet_tasks 4.0",
            "fanout_fleet_on_fallback 0.0",
            "# TYPE fanout_fleet_tasks gauge",
        ],
    );
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
    has_lines(
        &text,
        &[
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
        ],
    );
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

/// Asserts that `text` holds each of `lines` as a whole line.
fn has_lines(text: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            text.lines().any(|l| l == *line),
            "missing {line:?} in:\n{text}"
        );
    }
}
