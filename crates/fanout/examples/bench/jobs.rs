//! Many small broadcasts (`bench jobs`): the real worker loop and engine,
//! with the configuration `fanout run` would load (defaults, overridden by
//! `FANOUT_*` variables), run K channel jobs of a few connections each, as a
//! chat service makes them.
//!
//! The queue is in process, behind the `JobQueue` seam (the kit's
//! `FakeQueue`): moto's ReceiveMessage takes 200–350 ms a call on this
//! machine, which would measure moto. The channel audiences are in process
//! too, behind `ConnectionStore` (the kit's `GeneratedTable`). Both wait `--latency-ms` on every call (receive,
//! delete, visibility, Query, BatchWriteItem), as AWS calls take time; the
//! sink adds the same to each PostToConnection (`bench sink --delay-ms`).
//! The sends go through the configured send path (lean by default) to the
//! sink. With `FANOUT_CHECKPOINT_TABLE` set, as the template sets it, every
//! job's run is recorded as `fanout run` records it (claim, checkpoints,
//! finish), in an in-process run table behind `RunTable` (the kit's
//! `FakeRunTable`) that waits the same latency on every call.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use fanout::config::Config;
use fanout_aws::SelectedSender;
use fanout_core::budget::SendBudget;
use fanout_core::engine::Engine;
use fanout_core::fakes::{FakeQueue, FakeRunTable, GeneratedTable};
use fanout_core::job::Capabilities;
use fanout_core::queue::{Message, Receipt};
use fanout_core::runs::{Ledger, Windows};
use fanout_core::telemetry::Metrics;
use fanout_core::worker::{self, Stopped};
use tokio_util::sync::CancellationToken;

#[derive(clap::Parser)]
pub struct JobsArgs {
    /// Channel jobs to run.
    #[arg(long, default_value_t = 1000)]
    jobs: u64,
    /// Connections per channel.
    #[arg(long, default_value_t = 5)]
    audience: u64,
    /// Added to every queue and table call (the sink adds its own).
    #[arg(long, default_value_t = 10)]
    latency_ms: u64,
    #[arg(long, default_value_t = 128)]
    payload_bytes: usize,
    /// Also one whole-table broadcast to this many connections, first in
    /// the queue: the small jobs run beside it, and it must keep the rate.
    #[arg(long, default_value_t = 0)]
    huge: u64,
}

pub async fn run(args: JobsArgs) -> anyhow::Result<()> {
    let config = Config::load(None).context("the worker's configuration (FANOUT_* variables)")?;
    let targets = config.worker_targets()?;
    let latency = Duration::from_millis(args.latency_ms);
    let data = "x".repeat(args.payload_bytes);
    let message = |n: u64, body: serde_json::Value| Message {
        id: format!("m-{n}"),
        body: body.to_string(),
        receipt: Receipt(format!("r-{n}")),
        receive_count: 1,
        group_id: None,
        attributes: Default::default(),
        trace_header: None,
    };
    let huge = (args.huge > 0)
        .then(|| message(args.jobs, serde_json::json!({"id": "huge", "data": data})));
    let total = args.jobs + u64::from(huge.is_some());
    let queue = Arc::new(FakeQueue {
        latency,
        visible: Mutex::new(
            huge.into_iter()
                .chain((0..args.jobs).map(|n| {
                    let room = format!("room-{n}");
                    message(
                        n,
                        serde_json::json!({"id": room, "data": data, "channel": room}),
                    )
                }))
                .collect(),
        ),
        ..FakeQueue::default()
    });
    let store = Arc::new(GeneratedTable {
        channel_size: args.audience,
        latency,
        ..GeneratedTable::new(args.huge, u64::from(config.page_size))
    });

    let sdk = crate::sdk_config().await;
    let gateway = SelectedSender::build(&sdk, &config.send_settings(&targets))?;
    let metrics = Arc::new(Metrics::default());
    let engine_settings = config.engine_settings();
    let engine = Engine::new(
        store.clone(),
        Arc::new(gateway),
        Arc::new(SendBudget::new(
            config.rate_settings(),
            engine_settings.max_in_flight,
        )),
        engine_settings,
        metrics.clone(),
    );
    let mut settings = config.worker_settings(true);
    // The in-process table answers channel queries whatever the config says.
    settings.capabilities = Capabilities {
        channels: true,
        audiences: Some(Vec::new()),
    };

    let runs = Arc::new(FakeRunTable {
        latency,
        ..FakeRunTable::default()
    });
    let ledger = config.checkpoint_table.is_some().then(|| {
        let windows = Windows {
            dedup: config.dedup_window,
            lease: config.visibility_timeout,
        };
        Arc::new(Ledger::new(runs.clone(), windows, metrics.clone()))
    });
    let durable = ledger.is_some();

    let cpu_before = crate::cpu_time()?;
    let started = Instant::now();
    let stopped = worker::run(
        queue.clone(),
        Arc::new(engine),
        settings,
        metrics.clone(),
        fanout_core::reports::Reporter::none(),
        CancellationToken::new(),
        ledger,
    )
    .await;
    let wall = started.elapsed();
    let cpu = crate::cpu_time()? - cpu_before;
    anyhow::ensure!(stopped == Stopped::Idle, "the worker stopped: {stopped:?}");
    let done = Metrics::get(&metrics.jobs_completed);
    let deleted = queue.deleted.lock().expect("queue lock").len() as u64;
    anyhow::ensure!(
        done == total && deleted == total,
        "{done} jobs completed and {deleted} deleted of {total}"
    );
    let posts = Metrics::get(&metrics.posts);
    println!(
        "kind=jobs jobs={done} audience={} latency_ms={} max_concurrent_jobs={} rate={} \
         posts={posts} secs={:.3} jobs_per_s={:.0} posts_per_s={:.0} cpu_us_per_job={:.1} \
         cpu_s={:.3} peak_rss_mb={:.1} removed={} huge={} durable={} run_table_calls={}",
        args.audience,
        args.latency_ms,
        config.max_concurrent_jobs,
        config.rate_per_second.unwrap_or(0),
        wall.as_secs_f64(),
        args.jobs as f64 / wall.as_secs_f64(),
        posts as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / args.jobs.max(1) as f64,
        cpu.as_secs_f64(),
        crate::peak_rss_kb()? as f64 / 1024.0,
        store.removed.load(Ordering::Relaxed),
        args.huge,
        u8::from(durable),
        runs.calls.load(Ordering::Relaxed),
    );
    Ok(())
}
