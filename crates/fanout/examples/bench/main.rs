//! The broadcast benchmark (driven by `scripts/bench.sh`).
//!
//! - `bench sink --port P`: the local endpoint (see `sink.rs`).
//! - `bench broadcast --path sdk|lean --connections N --endpoint URL`: one
//!   broadcast through the real engine, send budget and remover, with the
//!   chosen real send path, to an audience generated in process
//!   (`--store generated`, see `audience.rs`) or scanned from a DynamoDB
//!   table on dynalite (`--store dynamo`, see `table.rs`); prints one
//!   `key=value` line: posts/s, CPU µs per post (getrusage of the whole
//!   process over the broadcast), peak RSS (VmHWM), the report.
//!
//! - `bench latency --path sdk|lean --endpoint URL --jobs K`: the real
//!   worker on an SQS queue (moto, `AWS_ENDPOINT_URL_SQS`); K jobs sent while
//!   its long poll waits; prints the time from send to the first post.
//!
//! - `bench jobs --jobs K --audience A`: many small channel broadcasts
//!   through the real worker loop (see `jobs.rs`).
//! - `bench prepare --table T --connections N [--only-gone]` and
//!   `bench prepare --queue Q`: the DynamoDB table and SQS queue that
//!   `scripts/bench.sh` runs the `fanout` binary itself against (prints the
//!   queue URL).
//!
//! Timing lives here, never in the tests.

mod audience;
mod jobs;
mod latency;
mod removals;
mod sink;
mod table;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use aws_credential_types::Credentials;
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use fanout_aws::{DynamoStore, SelectedSender, SendSettings, TableSettings};
use fanout_core::Backoff;
use fanout_core::budget::{RateSettings, SendBudget};
use fanout_core::engine::{Engine, EngineSettings, RunSummary};
use fanout_core::gateway::Gateway;
use fanout_core::job::{Job, Segment, Target};
use fanout_core::store::ConnectionStore;
use fanout_core::telemetry::Metrics;
use tokio_util::sync::CancellationToken;

use audience::GeneratedTable;
use latency::FirstPost;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the local endpoint until killed.
    Sink {
        #[arg(long)]
        port: u16,
        /// Serve TLS with this certificate chain (PEM) and `--tls-key`.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        /// Answer each request this long after reading it.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Many small channel broadcasts through the real worker.
    Jobs(jobs::JobsArgs),
    /// Create (or refill) the table, or create the queue, for `fanout run`.
    Prepare {
        #[arg(long, requires = "connections")]
        table: Option<String>,
        #[arg(long)]
        connections: Option<u64>,
        /// Write only the rows the sink calls gone (after a broadcast
        /// deleted them) into an existing table.
        #[arg(long, requires = "table")]
        only_gone: bool,
        /// A row per (channel, connection), two channels a connection, with
        /// a connection index (`FANOUT_CONNECTION_INDEX=by-connection`).
        #[arg(long, requires = "table")]
        channels: bool,
        #[arg(long)]
        queue: Option<String>,
    },
    /// Run one broadcast and print its figures.
    Broadcast(BroadcastArgs),
    /// What removing a gone row costs, by table layout (dynalite).
    Removals {
        #[arg(long, default_value_t = 4000)]
        rows: u64,
    },
    /// Measure SQS → first delivery through the worker.
    Latency {
        #[arg(long, value_enum)]
        path: SendPath,
        #[arg(long)]
        endpoint: String,
        #[arg(long, default_value_t = 20)]
        jobs: usize,
    },
}

#[derive(Parser)]
struct BroadcastArgs {
    #[arg(long, value_enum)]
    path: SendPath,
    #[arg(long, value_enum, default_value = "generated")]
    store: Store,
    #[arg(long)]
    connections: u64,
    /// The sink's endpoint, stage included: http://127.0.0.1:P/bench
    #[arg(long)]
    endpoint: String,
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Sends per second; 0 for no limit.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Burst above the rate; 0 for the config default (1 % of the rate, at
    /// least 50).
    #[arg(long, default_value_t = 0)]
    burst: u32,
    #[arg(long, default_value_t = 1000)]
    page_size: u64,
    #[arg(long, default_value_t = 128)]
    payload_bytes: usize,
    /// Split the audience into this many segment jobs, run at once (as the
    /// worker runs a split broadcast's shares), to use more than one core.
    #[arg(long, default_value_t = 1)]
    jobs: u32,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Store {
    Generated,
    Dynamo,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SendPath {
    Sdk,
    Lean,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Sink {
            port,
            tls_cert,
            tls_key,
            delay_ms,
        } => {
            let tls = tls_cert
                .as_deref()
                .zip(tls_key.as_deref())
                .map(|(cert, key)| sink::TlsFiles { cert, key });
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(sink::serve(port, tls, Duration::from_millis(delay_ms)))
                .context("the sink stopped")
        }
        Command::Jobs(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(jobs::run(args)),
        Command::Prepare {
            table,
            connections,
            only_gone,
            channels,
            queue,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(prepare(
                table,
                (connections.unwrap_or(0), only_gone, channels),
                queue,
            )),
        // Worker threads follow the CPU affinity (taskset), as in a task.
        Command::Broadcast(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(broadcast(args)),
        Command::Removals { rows } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let config = sdk_config().await;
                removals::run(&fanout_aws::clients::dynamodb_client(&config), rows).await
            }),
        Command::Latency {
            path,
            endpoint,
            jobs,
        } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(latency(path, endpoint, jobs)),
    }
}

async fn prepare(
    table: Option<String>,
    (connections, only_gone, channels): (u64, bool, bool),
    queue: Option<String>,
) -> anyhow::Result<()> {
    let config = sdk_config().await;
    if let Some(name) = table {
        let client = fanout_aws::clients::dynamodb_client(&config);
        match (channels, only_gone) {
            (false, false) => table::create(&client, &name).await?,
            (true, false) => table::create_channels(&client, &name).await?,
            (_, true) => {}
        }
        if channels {
            table::load_channels(&client, &name, connections, only_gone).await?;
        } else {
            table::load(&client, &name, connections, only_gone).await?;
        }
    }
    if let Some(name) = queue {
        let url = fanout_aws::clients::sqs_client(&config, Duration::ZERO)
            .create_queue()
            .queue_name(name)
            .send()
            .await
            .context("create the queue (is moto up and AWS_ENDPOINT_URL_SQS set?)")?
            .queue_url
            .context("CreateQueue answered without a URL")?;
        println!("{url}");
    }
    Ok(())
}

async fn sdk_config() -> aws_config::SdkConfig {
    fanout_aws::clients::config_loader()
        .region("us-east-1")
        .credentials_provider(Credentials::new("test", "test", None, None, "bench"))
        .load()
        .await
}

fn sender(
    config: &aws_config::SdkConfig,
    path: SendPath,
    endpoint: &str,
    max_in_flight: usize,
) -> anyhow::Result<SelectedSender> {
    let settings = SendSettings {
        path: match path {
            SendPath::Sdk => fanout_aws::SendPath::Sdk,
            SendPath::Lean => fanout_aws::SendPath::Lean,
        },
        endpoint: endpoint.to_owned(),
        attempt_timeout: Duration::from_secs(10),
        max_in_flight,
        // The sink's CA comes through SSL_CERT_FILE, as the bench has set it.
        trust: fanout_aws::GatewayTrust::default(),
    };
    Ok(SelectedSender::build(config, &settings)?)
}

fn engine<S: ConnectionStore, G: Gateway>(
    store: Arc<S>,
    gateway: Arc<G>,
    budget: SendBudget,
    max_in_flight: usize,
    metrics: Arc<Metrics>,
) -> Engine<S, G> {
    Engine::new(
        store,
        gateway,
        Arc::new(budget),
        EngineSettings {
            send_backoff: Backoff {
                base: Duration::from_millis(50),
                max: Duration::from_secs(2),
                max_attempts: 4,
            },
            throttle_deadline: Duration::from_secs(60),
            deferred_passes: 3,
            pass_pause: Duration::from_millis(100),
            max_in_flight,
            scan_segments: 1,
            progress_interval: Duration::from_secs(3600),
            connect_window: fanout_core::engine::evidence::CONNECT_WINDOW,
        },
        metrics,
    )
}

async fn latency(path: SendPath, endpoint: String, jobs: usize) -> anyhow::Result<()> {
    let config = sdk_config().await;
    let gateway = Arc::new(FirstPost::new(sender(&config, path, &endpoint, 256)?));
    let store = Arc::new(GeneratedTable::new(100, 100));
    let engine = engine(
        store,
        gateway.clone(),
        SendBudget::new(None, 256),
        256,
        Arc::new(Metrics::default()),
    );
    let mut latencies = latency::measure(&config, engine, gateway, jobs).await?;
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "kind=latency path={path:?} jobs={} min_ms={:.2} median_ms={:.2} max_ms={:.2}",
        latencies.len(),
        ms(latencies[0]),
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() - 1]),
    );
    Ok(())
}

async fn broadcast(args: BroadcastArgs) -> anyhow::Result<()> {
    let config = sdk_config().await;
    let gateway = sender(&config, args.path, &args.endpoint, args.max_in_flight)?;
    match args.store {
        Store::Generated => {
            let table = GeneratedTable::new(args.connections, args.page_size);
            run(table, gateway, &args, None).await
        }
        Store::Dynamo => {
            let client = fanout_aws::clients::dynamodb_client(&config);
            let name = format!("bench-{}-{}", args.connections, std::process::id());
            table::create_and_load(&client, &name, args.connections).await?;
            let store = DynamoStore::connect(
                client.clone(),
                TableSettings {
                    table: name.clone(),
                    key_attribute: table::KEY.into(),
                    channel_index: None,
                    channel_attribute: "channel".into(),
                    audiences: Vec::new(),
                    connection_index: None,
                    page_size: args.page_size.min(1000) as u32,
                    expiry: None,
                },
            )
            .await?;
            // The emulator's own pace bounds a broadcast from it: measured
            // alone, the same scan the engine makes, nothing sent.
            let scan = table::scan_rate(&store).await?;
            let result = run(store, gateway, &args, Some(scan)).await;
            table::delete(&client, &name).await;
            result
        }
    }
}

async fn run<S: ConnectionStore>(
    store: S,
    gateway: SelectedSender,
    args: &BroadcastArgs,
    scan_per_s: Option<f64>,
) -> anyhow::Result<()> {
    let rate = NonZeroU32::new(args.rate).map(|rate| {
        let burst = match args.burst {
            0 => (rate.get() / 100).clamp(50, rate.get()),
            burst => burst,
        };
        RateSettings {
            per_second: rate,
            burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
            // The bench measures the limiter's accuracy; no 429s come.
            adaptive: false,
        }
    });
    let metrics = Arc::new(Metrics::default());
    let engine = engine(
        Arc::new(store),
        Arc::new(gateway),
        SendBudget::new(rate, args.max_in_flight),
        args.max_in_flight,
        metrics.clone(),
    );
    let engine = Arc::new(engine);
    let payload = Bytes::from(vec![b'x'; args.payload_bytes]);
    let total = args.jobs.max(1);
    let jobs = (0..total).map(|index| Job {
        segment: (total > 1).then_some(Segment { index, total }),
        ..Job::new(format!("bench-{index}"), payload.clone(), Target::All)
    });

    let cpu_before = cpu_time()?;
    let started = Instant::now();
    // Each job on a runtime worker, as the worker's jobs run (`block_on`
    // polls on the main thread, which would add a thread hop to every send).
    let runs: Vec<_> = jobs
        .map(|job| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.run(&job, &CancellationToken::new()).await })
        })
        .collect();
    let mut report = RunSummary::default();
    for run in runs {
        let (part, result) = run.await.context("a broadcast task panicked")?;
        result.context("the broadcast failed")?;
        report.delivered += part.delivered;
        report.gone += part.gone;
        report.removed += part.removed;
        report.failed += part.failed;
        report.retries += part.retries;
        report.throttled += part.throttled;
    }
    let wall = started.elapsed();
    let cpu = cpu_time()? - cpu_before;

    let posts = Metrics::get(&metrics.posts);
    println!(
        "path={:?} store={:?} connections={} jobs={total} posts={posts} secs={:.3} \
         posts_per_s={:.0} cpu_us_per_post={:.2} cpu_s={:.3} cores_busy={:.2} \
         peak_rss_mb={:.1} delivered={} gone={} removed={} failed={} retries={} throttled={}{}",
        args.path,
        args.store,
        args.connections,
        wall.as_secs_f64(),
        posts as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / posts.max(1) as f64,
        cpu.as_secs_f64(),
        cpu.as_secs_f64() / wall.as_secs_f64(),
        peak_rss_kb()? as f64 / 1024.0,
        report.delivered,
        report.gone,
        report.removed,
        report.failed,
        report.retries,
        report.throttled,
        scan_per_s.map_or(String::new(), |rate| format!(" scan_per_s={rate:.0}")),
    );
    Ok(())
}

/// User plus system CPU time of the whole process (every thread) so far.
fn cpu_time() -> anyhow::Result<Duration> {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage");
    }
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Ok(Duration::from_micros(
        micros(usage.ru_utime) + micros(usage.ru_stime),
    ))
}

/// The process's peak resident set (VmHWM), in KiB.
fn peak_rss_kb() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")
}
