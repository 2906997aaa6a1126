//! The mixed fleet: three workers share one fleet rate while a producer
//! keeps small jobs flowing (20 a second, 5 connections each, taken by all
//! three) and one unsplit broadcast to the whole audience runs meanwhile.
//! A task busy with small jobs claims what they send, so the broadcast gets
//! nearly all of the fleet's rate, not a third of it.
//!
//! Each connection id's prefix names its job (`c-…` the broadcast, `sK-…`
//! small job K), so the gateway's sink groups give the broadcast's span and
//! each small job's first delivery.
//!
//! `cargo test` runs it at the fleet test's rate and audience (2,000/s,
//! 24,000 connections); the benchmark sets `FANOUT_DEV_MIXED=3000:30000`
//! for a fleet rate of 3,000/s and a table of its own of 30,000.

use std::time::Duration;

use fanout_dev::gateway::faults::SinkGroup;
use fanout_dev::gateway::registry::now_ms;
use fanout_testkit::support::worker::{Run, finish, signal_pid, start};

use super::{AUDIENCE, FLEET_RATE, Fleet, audience_of};

/// Small jobs a second, and connections in each.
const SMALL_PER_SECOND: u64 = 20;
const SMALL_SIZE: usize = 5;
/// Small jobs flow this long before the broadcast is sent: every worker has
/// joined and its claim has come down to what it sends.
const BEFORE_BROADCAST: Duration = Duration::from_secs(6);
/// The broadcast's rate against the fleet's rate less the small jobs', at
/// least: under `cargo test` on a loaded machine (a third of it is what
/// claiming the ceiling gave), and in the benchmark.
const AT_LEAST: f64 = 0.55;
const AT_LEAST_TIMED: f64 = 0.85;

/// The fleet's rate and the audience: `FANOUT_DEV_MIXED=rate:rows`, or
/// the fleet test's.
fn scale() -> (u64, usize) {
    let Ok(scale) = std::env::var("FANOUT_DEV_MIXED") else {
        return (FLEET_RATE, AUDIENCE);
    };
    let (rate, rows) = scale.split_once(':').expect("FANOUT_DEV_MIXED=rate:rows");
    (
        rate.parse().expect("a rate per second"),
        rows.parse().expect("a row count"),
    )
}

/// Small job `k`'s body: its own five connection ids.
fn small_job(k: u64) -> String {
    let ids: Vec<String> = (0..SMALL_SIZE).map(|i| format!("s{k}-{i}")).collect();
    serde_json::json!({"id": format!("small-{k}"), "connections": ids, "data": "x"}).to_string()
}

/// Sends small jobs at [`SMALL_PER_SECOND`] until `stop`; returns when each
/// was sent (ms since the Unix epoch), by job number.
async fn produce(fleet: &Fleet, stop: tokio::sync::watch::Receiver<bool>) -> Vec<u64> {
    let mut sent = Vec::new();
    let mut ticks = tokio::time::interval(Duration::from_millis(1000 / SMALL_PER_SECOND));
    while !*stop.borrow() {
        ticks.tick().await;
        let at = now_ms();
        fleet
            .sqs
            .send_message()
            .queue_url(&fleet.queue.url)
            .message_body(small_job(sent.len() as u64))
            .send()
            .await
            .expect("enqueue a small job");
        sent.push(at);
    }
    sent
}

/// The sink group of the broadcast once all `rows` connections have had it.
async fn broadcast_done(fleet: &Fleet, rows: usize) -> SinkGroup {
    for _ in 0..240 {
        let stats = fleet.gateway.stats().await;
        if let Some(group) = stats.sink_groups.iter().find(|g| g.prefix == "c")
            && group.ids == rows as u64
        {
            return group.clone();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the broadcast did not reach every connection within 2 minutes");
}

/// POSTs at the gateway in each second of the broadcast, comma-separated.
fn per_second(stats: &fanout_dev::gateway::faults::StatsSnapshot, group: &SinkGroup) -> String {
    let seconds = group.first_ms / 1000..=group.last_ms / 1000;
    stats
        .posts_per_second
        .iter()
        .filter(|(second, _)| seconds.contains(second))
        .map(|(_, n)| n.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The SQS → first delivery, in ms, sorted, of each small job sent within
/// `during` (ms since the Unix epoch).
fn small_latencies(
    groups: &[SinkGroup],
    sent: &[u64],
    during: std::ops::RangeInclusive<u64>,
) -> Vec<u64> {
    let mut latencies: Vec<u64> = groups
        .iter()
        .filter_map(|g| {
            let k: usize = g.prefix.strip_prefix('s')?.parse().ok()?;
            during
                .contains(&sent[k])
                .then(|| g.first_ms.saturating_sub(sent[k]))
        })
        .collect();
    latencies.sort_unstable();
    latencies
}

/// The median and the most of sorted `latencies`.
fn median_max(latencies: &[u64]) -> (u64, u64) {
    let median = latencies.get(latencies.len() / 2).copied().unwrap_or(0);
    (median, latencies.last().copied().unwrap_or(0))
}

pub(super) async fn a_broadcast_beside_small_jobs_gets_nearly_the_whole_rate(table: &str) {
    let (rate, rows) = scale();
    let own_table;
    let table = if rows == AUDIENCE {
        table
    } else {
        own_table = audience_of(rows).await;
        own_table.as_str()
    };
    let mut fleet = Fleet::new(table).await;
    fleet.rate = rate;
    let workers: Vec<(u32, tokio::task::JoinHandle<Run>)> = (0..3)
        .map(|_| {
            let child = start(fleet.worker_command(&["run"], "64"));
            let pid = child.id().expect("a running worker");
            (pid, tokio::spawn(finish(child, Duration::from_secs(300))))
        })
        .collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let producing = produce(&fleet, stopped);
    let broadcasting = async {
        tokio::time::sleep(BEFORE_BROADCAST).await;
        let body = serde_json::json!({"id": "everyone", "data": "hi"}).to_string();
        let sent_ms = now_ms();
        fleet
            .sqs
            .send_message()
            .queue_url(&fleet.queue.url)
            .message_body(body)
            .send()
            .await
            .expect("enqueue the broadcast");
        let group = broadcast_done(&fleet, rows).await;
        // The small jobs flow a little longer, then the workers drain.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.send(true).expect("the producer listens");
        (sent_ms, group)
    };
    let (sent, (broadcast_sent_ms, group)) = tokio::join!(producing, broadcasting);
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (pid, _) in &workers {
        signal_pid(*pid, "-TERM");
    }
    for (_, worker) in workers {
        let run = worker.await.expect("the worker's output");
        assert!(run.status.success(), "a worker failed:\n{}", run.stdout);
    }
    let stats = fleet.gateway.stats().await;
    judge(&stats, (rate, rows), &sent, broadcast_sent_ms, &group);
    fleet.gateway.shutdown().await;
}

fn judge(
    stats: &fanout_dev::gateway::faults::StatsSnapshot,
    (fleet_rate, rows): (u64, usize),
    sent: &[u64],
    broadcast_sent_ms: u64,
    group: &SinkGroup,
) {
    let span_s = group.last_ms.saturating_sub(group.first_ms) as f64 / 1000.0;
    let rate = rows as f64 / span_s.max(0.001);
    let small_rate = (SMALL_PER_SECOND * SMALL_SIZE as u64) as f64;
    let room = fleet_rate as f64 - small_rate;
    let ideal_s = rows as f64 / room;
    let latencies = small_latencies(&stats.sink_groups, sent, 0..=u64::MAX);
    let (median, max) = median_max(&latencies);
    // Those sent while the broadcast ran: what it costs the small jobs.
    let beside = small_latencies(&stats.sink_groups, sent, group.first_ms..=group.last_ms);
    let (beside_median, beside_max) = median_max(&beside);
    let start_ms = group.first_ms.saturating_sub(broadcast_sent_ms);
    // One line of key=value pairs: `scripts/bench.sh --cases fleet` reads it.
    println!(
        "kind=fleet_mixed workers=3 fleet_rate={fleet_rate} connections={rows} \
         small_per_s={small_rate:.0} broadcast_per_s={rate:.0} of_room={:.3} span_s={span_s:.2} ideal_s={ideal_s:.2} \
         broadcast_first_ms={start_ms} small_jobs={} small_first_median_ms={median} \
         small_first_max_ms={max} beside_jobs={} beside_first_median_ms={beside_median} \
         beside_first_max_ms={beside_max} again={} per_second={}",
        rate / room,
        latencies.len(),
        beside.len(),
        stats.sink_duplicates,
        per_second(stats, group),
    );
    assert_eq!(
        latencies.len(),
        sent.len(),
        "every small job reached its clients"
    );
    assert_eq!(stats.sink_duplicates, 0, "each connection once");
    let least = if fanout_testkit::support::timing_targets() {
        AT_LEAST_TIMED
    } else {
        AT_LEAST
    };
    assert!(
        rate >= least * room,
        "the broadcast ran at {rate:.0}/s beside the small jobs, under {least} × {room:.0}"
    );
}
