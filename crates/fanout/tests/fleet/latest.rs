//! Newer value wins, across a fleet: a producer sends updates to one
//! stream key (a score) every 100 ms to a channel of the whole audience,
//! and three `fanout run` processes (run records in the fleet table, as
//! the template deploys them) deliver them to the local gateway's sink.
//!
//! Two modes, each on a fresh queue, fleet table and gateway:
//! - `latest`: each job carries `"latest": {"key", "seq"}`: an older update
//!   is settled unsent, a newer one is handed to the stream's running
//!   update, which goes on with it from where its posts are. Measured until every connection has the last update (at
//!   most [`LATEST_WITHIN`] after its send).
//! - `plain`: the same jobs without it, each a broadcast of its own,
//!   stopped (SIGTERM) as long after the last send as the updates flowed.
//!
//! Each update's payload is `{"seq": N, …}`: the sink records when each
//! connection's highest `seq` rose, and [`Staleness`] judges that against
//! when each update was sent: how many connections ever went more than
//! 5 s without the then-newest value, how many got no update at all, and
//! the time from the last update's send to the moment every connection had
//! it. The workers are stopped after the measurement's end; nothing they
//! post later counts.
//!
//! `cargo test` runs 2,000 connections, 5 s of updates and a fleet rate of
//! 3,000/s, and checks only what holds on a loaded machine: with `latest`
//! every connection ends with the last update. The benchmark sets
//! `FANOUT_DEV_LATEST=20000:30:6000` (rows:seconds:rate); three workers,
//! the task count the fleet's other benchmarks use (the template scales
//! between MinTasks 1 and MaxTasks 10 on the backlog).

use std::time::Duration;

use fanout_dev::gateway::registry::now_ms;
use fanout_dev::gateway::seqs::Staleness;
use fanout_testkit::support::worker::{Run, finish, signal_pid, start};
use fanout_testkit::support::{self, IndexSpec};

use super::{Fleet, SETTLED_AFTER};

/// The channel every row is in, and the stream key of its updates.
const CHANNEL: &str = "match-42";
const STREAM_KEY: &str = "score-match-42";
/// 10 updates a second.
const EVERY: Duration = Duration::from_millis(100);
const WORKERS: usize = 3;
/// The template's MaxConcurrentJobs.
const JOBS_AT_ONCE: &str = "64";
/// A connection without the newest value for longer is counted.
const STALE_OVER_MS: u64 = 5_000;
/// With `latest`, how long after the last send every connection may take
/// to have it before the measurement ends anyway.
const LATEST_WITHIN: Duration = Duration::from_secs(60);

/// The bench's size, or the test's.
#[derive(Clone, Copy, Debug)]
struct Scale {
    rows: usize,
    /// How long updates are sent.
    seconds: u64,
    /// The fleet's rate, and each task's ceiling.
    rate: u64,
}

/// `FANOUT_DEV_LATEST=rows:seconds:rate`, or a small stream for `cargo test`.
fn scale() -> Scale {
    let Ok(scale) = std::env::var("FANOUT_DEV_LATEST") else {
        return Scale {
            rows: 2_000,
            seconds: 5,
            rate: 3_000,
        };
    };
    let parts: Vec<u64> = scale
        .split(':')
        .map(|p| p.parse().expect("FANOUT_DEV_LATEST=rows:seconds:rate"))
        .collect();
    let [rows, seconds, rate] = parts[..] else {
        panic!("FANOUT_DEV_LATEST=rows:seconds:rate, got {scale}");
    };
    Scale {
        rows: rows as usize,
        seconds,
        rate,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Latest,
    Plain,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Latest => "latest",
            Self::Plain => "plain",
        }
    }
}

/// Update `seq` as a job: version 2 with `latest`, or the plain job.
fn job(mode: Mode, seq: u64) -> String {
    let data = serde_json::json!({"seq": seq, "score": format!("{}-{}", seq / 2, seq / 3)});
    let id = format!("score-42-{seq}");
    match mode {
        Mode::Latest => serde_json::json!({
            "v": 2,
            "id": id,
            "channel": CHANNEL,
            "data": data,
            "latest": {"key": STREAM_KEY, "seq": seq},
        }),
        Mode::Plain => serde_json::json!({"id": id, "channel": CHANNEL, "data": data}),
    }
    .to_string()
}

/// A table of `rows` connections, `c-00000` on, all in [`CHANNEL`], with
/// the channel index the template's own WebSocket API has: `channel`, then
/// `connectionId`. (An index on `channel` alone loses rows in dynalite: it
/// keys an index entry by the index key and 24 bits of a hash of the
/// table key, so two ids whose hashes share them hold one entry, about 12
/// of 20,000 ids.)
async fn channel_of(rows: usize) -> (String, Vec<String>) {
    let dynamo = support::dynamodb().await;
    let table = support::create_table_with_indexes(
        &dynamo,
        "latest-audience",
        (support::ID, None),
        &[IndexSpec {
            name: support::CHANNEL_INDEX,
            partition: support::CHANNEL,
            sort: Some(support::ID),
        }],
    )
    .await;
    let ids = support::ids("c", rows);
    support::put_connections(&dynamo, &table, &ids, Some(CHANNEL)).await;
    (table, ids)
}

/// What one mode measured.
struct Measured {
    mode: Mode,
    staleness: Staleness,
    /// Each update's seq and send time, oldest first.
    sent: Vec<(u64, u64)>,
    /// From the first send to the measurement's end.
    span_ms: u64,
    /// POSTs at the gateway per whole second while updates were sent, on
    /// average, and in each second from the first send to the end.
    posts_per_s: f64,
    per_second: Vec<u64>,
    /// Up to ten connections without the last update at the end, each with
    /// the highest `seq` it had (0: none) and the posts it got.
    missing: Vec<(String, u64, u32)>,
    /// Each broadcast report's status, and how many had it.
    statuses: std::collections::BTreeMap<String, usize>,
}

/// Sends updates 1, 2, … every [`EVERY`] for `seconds`; returns each one's
/// seq and the moment its SendMessage was made.
async fn produce(fleet: &Fleet, mode: Mode, seconds: u64) -> Vec<(u64, u64)> {
    let updates = seconds * 1000 / EVERY.as_millis() as u64;
    let mut ticks = tokio::time::interval(EVERY);
    let mut sent = Vec::with_capacity(updates as usize);
    for seq in 1..=updates {
        ticks.tick().await;
        let at = now_ms();
        support::send_body(&fleet.sqs, &fleet.queue.url, &job(mode, seq)).await;
        sent.push((seq, at));
    }
    sent
}

/// With `latest`: waits until every connection holds the last update, or
/// [`LATEST_WITHIN`] has passed since its send. Plain: waits as long after
/// the last send as the updates flowed.
async fn until_the_end(fleet: &Fleet, mode: Mode, scale: Scale, last: (u64, u64)) {
    let (last_seq, last_sent) = last;
    match mode {
        Mode::Latest => {
            let bound = last_sent + LATEST_WITHIN.as_millis() as u64;
            while now_ms() < bound {
                let stats = fleet.gateway.stats().await;
                if stats.sink_seq_newest >= last_seq
                    && stats.sink_seq_holding_newest >= scale.rows as u64
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Mode::Plain => {
            let stop = last_sent + scale.seconds * 1000;
            tokio::time::sleep(Duration::from_millis(stop.saturating_sub(now_ms()))).await;
        }
    }
}

/// One mode: fresh fleet, workers, updates, the wait, the figures.
async fn measure(mode: Mode, table: &str, ids: &[String], scale: Scale) -> Measured {
    let mut fleet = Fleet::new(table).await;
    fleet.rate = scale.rate;
    let workers: Vec<(u32, tokio::task::JoinHandle<Run>)> = (0..WORKERS)
        .map(|_| {
            let mut command = fleet.worker_command(&["run"], JOBS_AT_ONCE);
            command
                .env("FANOUT_CHECKPOINT_TABLE", &fleet.leases)
                // The measurement ends at the stop: what a worker posts in
                // its grace does not count, and plain mode's hundreds of
                // running broadcasts would each hold their 25 s.
                .env("FANOUT_SHUTDOWN_GRACE", "2s");
            let child = start(command);
            let pid = child.id().expect("a running worker");
            (pid, tokio::spawn(finish(child, Duration::from_secs(300))))
        })
        .collect();
    // Every worker has joined the fleet and has its share.
    tokio::time::sleep(Duration::from_secs(SETTLED_AFTER)).await;
    let sent = produce(&fleet, mode, scale.seconds).await;
    let first_sent = sent.first().expect("updates").1;
    let last = *sent.last().expect("updates");
    until_the_end(&fleet, mode, scale, last).await;
    let end_ms = now_ms();
    let seqs = fleet.gateway.seqs().await;
    for (pid, _) in &workers {
        signal_pid(*pid, "-TERM");
    }
    let mut statuses = std::collections::BTreeMap::new();
    for (_, worker) in workers {
        let run = worker.await.expect("the worker's output");
        assert!(run.status.success(), "a worker failed:\n{}", run.stdout);
        for report in &run.reports {
            let status = report["status"].as_str().unwrap_or("none").to_owned();
            *statuses.entry(status).or_default() += 1;
        }
    }
    let stats = fleet.gateway.stats().await;
    fleet.gateway.shutdown().await;
    let posts = |from_ms: u64, until_ms: u64| -> Vec<u64> {
        (from_ms / 1000..=until_ms / 1000)
            .map(|second| {
                stats
                    .posts_per_second
                    .iter()
                    .find(|&&(s, _)| s == second)
                    .map_or(0, |&(_, n)| n)
            })
            .collect()
    };
    // Whole seconds only: the first and the last are partial.
    let streaming = posts(first_sent, last.1);
    let whole = &streaming[1.min(streaming.len())..streaming.len().saturating_sub(1)];
    let missing = ids
        .iter()
        .filter_map(|id| {
            let held = seqs.ids.get(id);
            let top = held
                .and_then(|h| h.raised.iter().rfind(|&&(_, at)| at <= end_ms))
                .map_or(0, |&(seq, _)| seq);
            (top < last.0).then(|| (id.clone(), top, held.map_or(0, |h| h.received)))
        })
        .take(10)
        .collect();
    let staleness = Staleness::measure(
        &sent,
        ids.iter().map(String::as_str),
        &seqs,
        end_ms,
        STALE_OVER_MS,
    );
    Measured {
        mode,
        staleness,
        span_ms: end_ms - first_sent,
        posts_per_s: whole.iter().sum::<u64>() as f64 / whole.len().max(1) as f64,
        per_second: posts(first_sent, end_ms),
        missing,
        sent,
        statuses,
    }
}

/// One line of key=value pairs: `scripts/bench.sh --cases latest` reads it.
fn print(m: &Measured, scale: Scale) {
    let s = &m.staleness;
    let statuses = m
        .statuses
        .iter()
        .map(|(status, n)| format!("{status}:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "kind=latest mode={} connections={} updates={} every_ms={} fleet_rate={} workers={WORKERS} \
         stale_over_5s={} no_update={} last_to_all_ms={} behind_over_5s={} have_last={} \
         stale_median_ms={} stale_max_ms={} behind_median_ms={} behind_max_ms={} \
         updates_median={} kept_up_span={} posts_per_s={:.0} span_s={:.1} statuses={statuses} \
         per_second={}",
        m.mode.name(),
        s.connections,
        m.sent.len(),
        EVERY.as_millis(),
        scale.rate,
        s.stale_over,
        s.no_update,
        s.last_to_all_ms
            .map_or_else(|| "never".to_owned(), |ms| ms.to_string()),
        s.behind_over,
        s.have_last,
        s.stale_median_ms,
        s.stale_max_ms,
        s.behind_median_ms,
        s.behind_max_ms,
        s.updates_median,
        s.kept_up_span
            .map_or_else(|| "none".to_owned(), |(a, b)| format!("{a}..{b}")),
        m.posts_per_s,
        m.span_ms as f64 / 1000.0,
        m.per_second
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    if !m.missing.is_empty() {
        println!(
            "kind=latest_missing mode={} first_ten={}",
            m.mode.name(),
            m.missing
                .iter()
                .map(|(id, seq, posts)| format!("{id}:seq{seq}:posts{posts}"))
                .collect::<Vec<_>>()
                .join(",")
        );
    }
}

pub(super) async fn the_newest_value_reaches_every_connection() {
    let scale = scale();
    let (table, ids) = channel_of(scale.rows).await;
    let latest = measure(Mode::Latest, &table, &ids, scale).await;
    print(&latest, scale);
    let plain = measure(Mode::Plain, &table, &ids, scale).await;
    print(&plain, scale);

    // What holds on any machine, and fails if `latest` did nothing: a
    // plain stream at these sizes leaves most connections without the
    // last update (the updates ask 10 × rows posts a second of a rate a
    // few times rows).
    let s = &latest.staleness;
    assert_eq!(
        s.have_last, scale.rows as u64,
        "with latest, every connection has the last update within {LATEST_WITHIN:?} of its send"
    );
    assert_eq!(
        s.no_update, 0,
        "with latest, every connection had an update"
    );
    // An older update's pass ends when the stream's running update takes
    // a newer one ("newer"), or when a newer one claims the stream.
    let replaced = ["newer", "superseded"]
        .iter()
        .filter_map(|status| latest.statuses.get(*status))
        .sum::<usize>();
    assert!(
        replaced > 0,
        "with latest, newer updates replace older ones: {:?}",
        latest.statuses
    );
    super::drop_audience_table(&table).await;
}
