//! Measures adaptive throttling: the real engine and SDK sender against the
//! local gateway with `--throttle-rps`, printing the delivered rate and the
//! share of 429s second by second.
//!
//! ```sh
//! cargo run --release --example adaptive_rate -- [THROTTLE_RPS] [CEILING] [SECONDS]
//! ```
//! Defaults: a 1,000/s throttle, a 2,000/s configured ceiling, 30 s. Needs no
//! emulator: the audience is generated in memory and the gateway's DynamoDB
//! client is never used (no WebSocket client connects).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fanout_aws::ApiGatewaySender;
use fanout_core::Backoff;
use fanout_core::budget::{RateSettings, SendBudget};
use fanout_core::engine::{Engine, EngineSettings};
use fanout_core::fakes::GeneratedTable;
use fanout_core::job::{Job, Target};
use fanout_core::telemetry::Metrics;
use fanout_dev::gateway::{GatewayArgs, serve};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let throttle = args.first().copied().unwrap_or(1000);
    let ceiling = args.get(1).copied().unwrap_or(2000);
    let seconds = args.get(2).copied().unwrap_or(30);

    // The gateway: every id is unknown (410) unless throttled (429) first.
    let sdk = fanout_aws::clients::config_loader()
        .region("us-east-1")
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "test", "test", None, None, "example",
        ))
        .endpoint_url("http://127.0.0.1:9")
        .load()
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let gateway_stop = stop.clone();
    let gateway_args = GatewayArgs {
        listen: addr,
        stage: "bench".into(),
        table: "unused".into(),
        keep_stale: false,
        create_table: false,
        sink: false,
        throttle_rps: NonZeroU32::new(throttle),
        fail_percent: 0,
        latency_ms: 0,
        layout: Default::default(),
        public_channel_prefix: "public.".into(),
        connect_delay_ms: 0,
    };
    tokio::spawn(serve(
        gateway_args,
        aws_sdk_dynamodb::Client::new(&sdk),
        listener,
        gateway_stop.cancelled_owned(),
    ));

    let endpoint = format!("http://{addr}/bench");
    let sender = ApiGatewaySender::new(
        fanout_aws::clients::apigw_client(&sdk, &endpoint, Duration::from_secs(5)).expect("client"),
    );
    let budget = Arc::new(SendBudget::new(
        Some(RateSettings {
            per_second: NonZeroU32::new(ceiling).expect("ceiling > 0"),
            burst: NonZeroU32::new((ceiling / 100).max(50)).expect("burst > 0"),
            adaptive: true,
        }),
        256,
    ));
    let metrics = Arc::new(Metrics::default());
    let engine = Engine::new(
        Arc::new(GeneratedTable::new(u64::from(ceiling * seconds * 2), 1000)),
        Arc::new(sender),
        budget.clone(),
        EngineSettings {
            send_backoff: Backoff {
                base: Duration::from_millis(50),
                max: Duration::from_secs(2),
                max_attempts: 20,
            },
            throttle_deadline: Duration::from_secs(60),
            deferred_passes: 3,
            pass_pause: Duration::from_millis(100),
            max_in_flight: 256,
            scan_segments: 1,
            progress_interval: Duration::from_secs(3600),
            connect_window: fanout_core::engine::evidence::CONNECT_WINDOW,
        },
        metrics.clone(),
    );
    let job = Job::new("adaptive", Bytes::from_static(b"x"), Target::All);

    let started = Instant::now();
    let job_stop = CancellationToken::new();
    let run_stop = job_stop.clone();
    let run = tokio::spawn(async move { engine.run(&job, &run_stop).await });
    println!("throttle {throttle}/s, ceiling {ceiling}/s, {seconds} s");
    println!(
        "{:>4} {:>9} {:>9} {:>8} {:>10}",
        "s", "answered", "throttled", "429 %", "rate limit"
    );
    let (mut last_ok, mut last_throttled) = (0, 0);
    let mut steady = (0u64, 0u64);
    for second in 1..=seconds {
        tokio::time::sleep_until((started + Duration::from_secs(u64::from(second))).into()).await;
        let ok = Metrics::get(&metrics.gone) + Metrics::get(&metrics.delivered);
        let throttled = Metrics::get(&metrics.throttled);
        let (d_ok, d_thr) = (ok - last_ok, throttled - last_throttled);
        (last_ok, last_throttled) = (ok, throttled);
        if second > seconds / 3 {
            steady.0 += d_ok;
            steady.1 += d_thr;
        }
        let share = 100.0 * d_thr as f64 / (d_ok + d_thr).max(1) as f64;
        println!(
            "{second:>4} {d_ok:>9} {d_thr:>9} {share:>7.1}% {:>10.0}",
            budget.current_rate().unwrap_or(0.0)
        );
    }
    job_stop.cancel();
    let _ = run.await;
    stop.cancel();
    let steady_seconds = f64::from(seconds - seconds / 3);
    let rate = steady.0 as f64 / steady_seconds;
    println!(
        "steady state (last {steady_seconds} s): {rate:.0} answered/s = {:.1}% of the throttle; {:.2}% of requests throttled",
        100.0 * rate / f64::from(throttle),
        100.0 * steady.1 as f64 / (steady.0 + steady.1).max(1) as f64
    );
    let all = last_ok + last_throttled;
    println!(
        "whole run: {:.2}% of {all} requests throttled",
        100.0 * last_throttled as f64 / all.max(1) as f64
    );
}
