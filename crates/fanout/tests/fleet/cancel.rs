//! Cancel across a fleet: three `fanout run` processes with the template's
//! settings (run records in the fleet table, 64 jobs at once, 20 s long
//! polls, a 60 s visibility timeout, the fallback rate a tenth of the fleet
//! rate) share one whole-table broadcast split into 3 segment jobs. Once a
//! third of the audience has been posted, `fanout cancel` (the binary)
//! stops it.
//!
//! Measured from just before `fanout cancel` starts to the last post the
//! gateway's sink saw for the broadcast: sending the cancel job, a worker
//! receiving it and writing the tombstone, each running segment reading
//! the tombstone at its next poll (at most a second), and the posts in
//! flight then. The cancel job's own report (`cancel_recorded`) splits
//! that time in two: up to the tombstone, and from it to the last post.
//!
//! `cargo test` runs 3,000 connections at a fleet rate of 300/s (ten
//! seconds of sending) and checks what holds on a loaded machine: every
//! segment's run ends `cancelled` and final, nothing is posted once they
//! have reported, and the posts stop within 10 s. The benchmark sets
//! `FANOUT_DEV_CANCEL=100000` for 100,000 connections at the template's
//! fleet rate (2,000/s), and `FANOUT_DEV_TIMING_TARGETS=1` for the target:
//! the last post within 3 s of the cancel's send.

use std::time::Duration;

use fanout_dev::gateway::faults::{SinkGroup, StatsSnapshot};
use fanout_dev::gateway::registry::now_ms;
use fanout_testkit::support::worker::{Run, finish, run_ok, signal_pid, start};
use fanout_testkit::support::{self, QueueSpec, TestQueue};
use serde_json::Value;

use super::{Fleet, audience_of};

/// The template's defaults (config/cloudformation.yaml): its fleet rate
/// (FleetRatePerSecond), the per-task ceiling being the same (RatePerSecond
/// empty), and the fallback rate as a tenth of it (FleetFallbackRate, the
/// fleet rate over MaxTasks).
const TEMPLATE_FLEET_RATE: u64 = 2000;
const TEMPLATE_MAX_TASKS: u64 = 10;
/// MaxConcurrentJobs.
const TEMPLATE_JOBS: &str = "64";
/// What the task definition sets, and the configuration's own default for
/// the long poll, which the test harness shortens.
const TEMPLATE_ENV: [(&str, &str); 4] = [
    ("FANOUT_VISIBILITY_TIMEOUT", "60s"),
    ("FANOUT_HEARTBEAT_INTERVAL", "20s"),
    ("FANOUT_SHUTDOWN_GRACE", "25s"),
    ("FANOUT_RECEIVE_WAIT", "20s"),
];

/// Under `cargo test`: ten seconds of sending, so the cancel comes with
/// most of the broadcast still to go on a slow machine too.
const TEST_ROWS: usize = 3000;
const TEST_RATE: u64 = 300;

/// The workers, and the segment jobs the broadcast is split into.
const WORKERS: usize = 3;
const SEGMENTS: u64 = 3;
/// Posts in flight per process: the template's MaxInFlight, the
/// configuration's default.
const MAX_IN_FLIGHT: u64 = 256;
/// The broadcast's id, which the cancel names.
const BROADCAST: &str = "launch";
/// The cancel's send to the last post, at most: on any machine, and the
/// benchmark's target (a second's poll, plus receiving the cancel job and
/// the posts in flight).
const STOPS_WITHIN_MS: u64 = 10_000;
const STOPS_WITHIN_TIMED_MS: u64 = 3_000;

/// The audience and the fleet's rate: `FANOUT_DEV_CANCEL=rows` at the
/// template's rate, or the test's small broadcast.
fn scale() -> (usize, u64) {
    match std::env::var("FANOUT_DEV_CANCEL") {
        Ok(rows) => (
            rows.parse().expect("FANOUT_DEV_CANCEL=rows"),
            TEMPLATE_FLEET_RATE,
        ),
        Err(_) => (TEST_ROWS, TEST_RATE),
    }
}

/// A `fanout run` with the template's settings on `fleet`, its run records
/// in the fleet table, its reports to `reports`. (The template also sets
/// `FANOUT_CONNECTED_AT_ATTRIBUTE`: the test rows' start is a fixed time
/// years ago, which would make every row expired, so it stays unset.)
fn worker(fleet: &Fleet, reports: &TestQueue) -> tokio::process::Child {
    let fallback = (fleet.rate / TEMPLATE_MAX_TASKS).max(1).to_string();
    let mut command = fleet.worker_command(&["run"], TEMPLATE_JOBS);
    command
        .envs(TEMPLATE_ENV)
        .env("FANOUT_FLEET_FALLBACK_RATE", fallback)
        .env("FANOUT_CHECKPOINT_TABLE", &fleet.leases)
        .env("FANOUT_REPORT_QUEUE_URL", &reports.url);
    start(command)
}

/// The broadcast's sink group (its ids are `c-…`), if anything reached it.
fn broadcast_group(stats: &StatsSnapshot) -> Option<&SinkGroup> {
    stats.sink_groups.iter().find(|g| g.prefix == "c")
}

/// The gateway's counters once `at_least` of the broadcast's connections
/// have had it.
async fn posted(fleet: &Fleet, at_least: u64) -> StatsSnapshot {
    for _ in 0..1200 {
        let stats = fleet.gateway.stats().await;
        if broadcast_group(&stats).is_some_and(|g| g.ids >= at_least) {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the broadcast did not reach {at_least} connections within 2 minutes");
}

/// Reports from the report queue until every segment's is there (a final
/// one each); returns them all and when the last came (ms since the Unix
/// epoch).
async fn until_segments_report(sqs: &aws_sdk_sqs::Client, url: &str) -> (Vec<Value>, u64) {
    let mut reports: Vec<Value> = Vec::new();
    for _ in 0..60 {
        for message in support::receive_all(sqs, url).await {
            reports.push(serde_json::from_str(&message.body).expect("a report is JSON"));
        }
        if segment_reports(&reports).len() as u64 >= SEGMENTS {
            return (reports, now_ms());
        }
    }
    panic!("not every segment reported within a minute: {reports:?}");
}

/// The reports of the broadcast's segment runs, by segment.
fn segment_reports(reports: &[Value]) -> Vec<&Value> {
    let mut segments: Vec<&Value> = reports
        .iter()
        .filter(|r| r["id"] == BROADCAST && r["segment"].is_u64())
        .collect();
    segments.sort_by_key(|r| r["segment"].as_u64());
    segments
}

/// Milliseconds since the Unix epoch of a report's RFC 3339 time.
fn report_ms(report: &Value, field: &str) -> u64 {
    let stamp = report[field].as_str().expect("a report time");
    humantime::parse_rfc3339_weak(stamp)
        .expect("an RFC 3339 time")
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// The segments each worker's log says it stopped, comma-separated: how
/// the split spread over the tasks.
fn stopped_per_task(runs: &[Run]) -> String {
    runs.iter()
        .map(|run| {
            run.reports
                .iter()
                .filter(|r| r["job_id"] == BROADCAST && r["status"] == "cancelled")
                .count()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What one cancel came to, read once the workers have exited.
struct Outcome {
    rows: usize,
    rate: u64,
    /// The gateway's counters just before the cancel was sent, once every
    /// segment had reported, and once the workers had exited.
    before: StatsSnapshot,
    at_reports: StatsSnapshot,
    after: StatsSnapshot,
    /// When `fanout cancel` started, when it returned, and when the last
    /// segment's report was read (ms since the Unix epoch).
    cancel_ms: u64,
    cancel_sent_ms: u64,
    reported_ms: u64,
    reports: Vec<Value>,
    runs: Vec<Run>,
}

pub(super) async fn a_cancel_stops_a_split_broadcast_on_every_task() {
    let (rows, rate) = scale();
    let table = audience_of(rows).await;
    let mut fleet = Fleet::new(&table).await;
    fleet.rate = rate;
    let reports = support::create_queue(&fleet.sqs, "cancel-reports", &QueueSpec::default()).await;
    let workers: Vec<(u32, tokio::task::JoinHandle<Run>)> = (0..WORKERS)
        .map(|_| {
            let child = worker(&fleet, &reports);
            let pid = child.id().expect("a running worker");
            (pid, tokio::spawn(finish(child, Duration::from_secs(300))))
        })
        .collect();
    let body = serde_json::json!({"id": BROADCAST, "data": "hi", "split": SEGMENTS});
    fleet
        .sqs
        .send_message()
        .queue_url(&fleet.queue.url)
        .message_body(body.to_string())
        .send()
        .await
        .expect("enqueue the broadcast");

    let before = posted(&fleet, rows as u64 / 3).await;
    let cancel_ms = now_ms();
    run_ok(
        fleet.worker_command(&["cancel", BROADCAST], TEMPLATE_JOBS),
        "cancel",
    )
    .await;
    let cancel_sent_ms = now_ms();
    let (all_reports, reported_ms) = until_segments_report(&fleet.sqs, &reports.url).await;
    let at_reports = fleet.gateway.stats().await;
    // Nothing may come once every segment has reported, up to the workers'
    // exit: each finishes the long poll it has open first (up to 20 s).
    for (pid, _) in &workers {
        signal_pid(*pid, "-TERM");
    }
    let mut runs = Vec::new();
    for (_, worker) in workers {
        let run = worker.await.expect("the worker's output");
        assert!(run.status.success(), "a worker failed:\n{}", run.stdout);
        runs.push(run);
    }
    let after = fleet.gateway.stats().await;
    judge(&Outcome {
        rows,
        rate,
        before,
        at_reports,
        after,
        cancel_ms,
        cancel_sent_ms,
        reported_ms,
        reports: all_reports,
        runs,
    });
    fleet.gateway.shutdown().await;
    super::drop_audience_table(&table).await;
}

/// A report field of each segment, comma-separated.
fn each_segment(segments: &[&Value], key: &str) -> String {
    segments
        .iter()
        .map(|r| match &r[key] {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn judge(o: &Outcome) {
    let (rows, rate) = (o.rows, o.rate);
    let group = broadcast_group(&o.after).expect("the broadcast reached some");
    let segments = segment_reports(&o.reports);
    let recorded = o
        .reports
        .iter()
        .find(|r| r["status"] == "cancel_recorded")
        .unwrap_or_else(|| panic!("the cancel's own report: {:?}", o.reports));
    let recorded_ms = report_ms(recorded, "ended_at");
    let stop_ms = group.last_ms.saturating_sub(o.cancel_ms);
    let sum = |key: &str| -> u64 { segments.iter().filter_map(|r| r[key].as_u64()).sum() };
    let (delivered, unsent) = (sum("delivered"), sum("unsent"));
    let landed_unreported = group.ids.saturating_sub(delivered);
    // One line of key=value pairs: `scripts/bench.sh --cases cancel` reads it.
    println!(
        "kind=cancel workers={WORKERS} segments={SEGMENTS} fleet_rate={rate} rate_per_task={rate} \
         fallback_rate={} max_concurrent_jobs={TEMPLATE_JOBS} max_in_flight={MAX_IN_FLIGHT} \
         receive_wait=20s visibility_timeout=60s connections={rows} cancel_at={} \
         cancel_cmd_ms={} cancel_recorded_ms={} recorded_to_last_post_ms={} \
         cancel_to_last_post_ms={stop_ms} posts_after_cancel={} posts={} reached={} \
         delivered={delivered} unsent={unsent} landed_unreported={landed_unreported} again={} \
         statuses={} final={} per_segment_delivered={} stopped_per_task={} reports_ms={}",
        (rate / TEMPLATE_MAX_TASKS).max(1),
        broadcast_group(&o.before).map_or(0, |g| g.ids),
        o.cancel_sent_ms - o.cancel_ms,
        recorded_ms.saturating_sub(o.cancel_ms),
        group.last_ms.saturating_sub(recorded_ms),
        o.after.posts - o.before.posts,
        o.after.posts,
        group.ids,
        o.after.sink_duplicates,
        each_segment(&segments, "status"),
        each_segment(&segments, "final"),
        each_segment(&segments, "delivered"),
        stopped_per_task(&o.runs),
        o.reported_ms - o.cancel_ms,
    );

    assert_eq!(
        segments.len() as u64,
        SEGMENTS,
        "one report per segment: {:?}",
        o.reports
    );
    for report in &segments {
        assert_eq!(report["status"], "cancelled", "{report}");
        assert_eq!(report["final"], true, "{report}");
    }
    let said = recorded["reason"].as_str().unwrap_or_default();
    assert!(said.contains("its runs stop within"), "{said}");
    assert!(
        group.ids < rows as u64,
        "stopped part-way: {} of {rows}",
        group.ids
    );
    assert_eq!(o.after.sink_duplicates, 0, "each connection at most once");
    // A stopped run drops the posts in flight: those that landed count as
    // `unsent` in its report, not `delivered`: at most each process's
    // in-flight bound.
    assert!(
        delivered <= group.ids && landed_unreported <= unsent,
        "the reports count {delivered} delivered and {unsent} unsent, the endpoint saw {}",
        group.ids
    );
    assert!(
        landed_unreported <= WORKERS as u64 * MAX_IN_FLIGHT,
        "{landed_unreported} posts landed that the reports do not count as delivered"
    );
    assert!(
        group.last_ms <= o.reported_ms,
        "a post after every segment had reported"
    );
    assert_eq!(
        o.after.posts, o.at_reports.posts,
        "posts after every segment had reported, up to the workers' exit"
    );
    let within = if support::timing_targets() {
        STOPS_WITHIN_TIMED_MS
    } else {
        STOPS_WITHIN_MS
    };
    assert!(
        stop_ms <= within,
        "the last post came {stop_ms} ms after the cancel was sent, over {within} ms"
    );
}
