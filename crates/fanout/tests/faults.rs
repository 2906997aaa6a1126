//! The fault-injection suite: the real `fanout` binary against
//! moto, dynalite, the local gateway and real WebSocket clients, with faults
//! injected one by one and together: gateway 429 bursts, 5 % 500s, latency
//! spikes and dropped connections; DynamoDB throttling and
//! `UnprocessedItems`; SQS receive, delete and visibility errors; SIGKILL
//! and SIGTERM mid-broadcast. Each scenario prints its table of invariants
//! (run with `--nocapture` to see them) and then asserts it. Also: ordering
//! through a FIFO queue, and poison jobs through the redrive policy.

use fanout_testkit::fault_support;
use fanout_testkit::support;

use std::collections::BTreeSet;
use std::time::Duration;

use fanout_dev::clients::Swarm;
use fanout_dev::gateway::GatewayArgs;
use fault_support::invariants::{Expect, Table, check};
use fault_support::proxy::{FaultProxy, Faults};
use fault_support::rig::{Rig, RigSpec, Run, finish, signal};
use futures::StreamExt;
use support::Queues;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// Live clients and stale rows of the one-fault scenarios: small, so the
/// whole file stays within a couple of minutes on two cores.
const LIVE: usize = 60;
const GONE: usize = 40;

/// A scenario's world after its broadcasts ran.
struct Broadcast {
    rig: Rig,
    clients: Swarm,
    gone: BTreeSet<String>,
    jobs: Vec<(String, String)>,
    runs: Vec<Run>,
}

impl Broadcast {
    /// Sets up `live` clients and `gone` stale rows, enqueues `jobs`
    /// broadcasts to everyone.
    async fn prepare(
        scenario: &str,
        spec: RigSpec,
        configure: impl FnOnce(&mut GatewayArgs),
        settings: &[(&str, &str)],
        live: usize,
        gone: usize,
        jobs: usize,
    ) -> Self {
        let mut rig = Rig::new(spec, configure).await;
        for (key, value) in settings {
            rig.set(key, value);
        }
        let clients = rig.connect(live, None).await;
        let gone = rig.stale_rows("gone", gone).await;
        let mut enqueued = Vec::new();
        for n in 0..jobs {
            let id = format!("{scenario}-{n}");
            let payload = format!("{scenario} message {n}");
            rig.enqueue(&["--data", &payload, "--id", &id]).await;
            enqueued.push((id, payload));
        }
        Self {
            rig,
            clients,
            gone,
            jobs: enqueued,
            runs: Vec::new(),
        }
    }

    /// Runs workers until the queue is empty; then, while gone rows are
    /// left (removals that ran out of retries), broadcasts a sweep job, as
    /// the next broadcast in production would find them again.
    async fn drain(&mut self) {
        self.runs.extend(self.rig.run_until_drained().await);
        for sweep in 0..3 {
            let rows = self.rig.rows().await;
            if !self.gone.iter().any(|id| rows.contains(id)) {
                return;
            }
            let id = format!("sweep-{sweep}");
            let payload = format!("sweep {sweep}");
            self.rig.enqueue(&["--data", &payload, "--id", &id]).await;
            self.jobs.push((id, payload));
            self.runs.extend(self.rig.run_until_drained().await);
        }
    }

    /// The duplicates the design allows after these runs: a job run again
    /// (after a failure, a lost delete, an interruption) may repeat its whole
    /// live audience; a POST whose answer was lost or came too late may
    /// be delivered once more.
    fn rerun_bound(&self) -> (u64, String) {
        let runs = self
            .runs
            .iter()
            .map(|r| r.reports.len() as u64)
            .sum::<u64>();
        let reruns = runs.saturating_sub(self.jobs.len() as u64);
        let injected = self.rig.injected();
        let lost_answers = injected.posts_dropped_delivered + injected.posts_spiked;
        (
            reruns * self.live_count() + lost_answers,
            format!("{reruns} re-runs × live + {lost_answers} lost answers"),
        )
    }

    fn live_count(&self) -> u64 {
        self.clients
            .clients()
            .iter()
            .filter(|c| c.end() == fanout_dev::clients::ClientEnd::Live)
            .count() as u64
    }

    async fn check(&self, table: &mut Table, duplicates_at_most: (u64, String)) {
        let jobs: Vec<(&str, &str)> = self
            .jobs
            .iter()
            .map(|(id, p)| (id.as_str(), p.as_str()))
            .collect();
        check(
            &self.rig,
            &self.runs,
            Expect {
                clients: &self.clients,
                gone: &self.gone,
                jobs: &jobs,
                duplicates_at_most,
            },
            table,
        )
        .await;
    }
}

/// Retries generous enough to outlast the injected faults.
const PATIENT_SENDS: &[(&str, &str)] = &[
    ("FANOUT_SEND_ATTEMPTS", "30"),
    ("FANOUT_SEND_RETRY_BASE", "20ms"),
    ("FANOUT_SEND_RETRY_MAX", "500ms"),
];

#[tokio::test]
async fn the_proxy_drops_a_connection_without_answering() {
    // Upstream: a port nothing listens on, so even a forwarded POST ends in
    // a drop.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let proxy = FaultProxy::start(
        &upstream,
        Faults {
            post_drop: 100,
            ..Faults::default()
        },
    )
    .await;
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("connect to the proxy");
        stream
            .write_all(
                b"POST /test/@connections/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
            )
            .await
            .expect("write");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        assert!(
            answer.is_empty(),
            "no answer at all: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    let injected = proxy.injected();
    assert_eq!(
        injected.posts_dropped_unsent + injected.posts_dropped_delivered,
        4,
        "{injected:?}"
    );
}

#[tokio::test]
async fn gateway_429_bursts() {
    let mut b = Broadcast::prepare(
        "429",
        RigSpec::default(),
        |g| g.throttle_rps = std::num::NonZeroU32::new(50),
        PATIENT_SENDS,
        LIVE,
        GONE,
        2,
    )
    .await;
    b.drain().await;
    let mut table = Table::new("1. gateway 429 bursts (throttle 50/s)");
    b.check(&mut table, (0, "a 429 delivers nothing".into()))
        .await;
    table.at_least("429 answers", b.rig.gateway.stats().await.throttled, 1);
    table.print_and_assert();
}

#[tokio::test]
async fn gateway_five_percent_500s() {
    let mut b = Broadcast::prepare(
        "500",
        RigSpec::default(),
        |g| g.fail_percent = 5,
        &[],
        LIVE,
        GONE,
        3,
    )
    .await;
    b.drain().await;
    let mut table = Table::new("2. gateway 5% 500s");
    b.check(&mut table, (0, "a 500 delivers nothing".into()))
        .await;
    table.at_least("500 answers", b.rig.gateway.stats().await.failed, 1);
    table.print_and_assert();
}

#[tokio::test]
async fn gateway_latency_spikes() {
    let mut b = Broadcast::prepare(
        "spikes",
        RigSpec {
            gateway: Some(Faults {
                post_spike: 10,
                spike: Duration::from_millis(3000),
                ..Faults::default()
            }),
            ..RigSpec::default()
        },
        |g| g.latency_ms = 5,
        &[
            ("FANOUT_SEND_TIMEOUT", "2s"),
            ("FANOUT_SEND_RETRY_BASE", "20ms"),
        ],
        LIVE,
        GONE,
        2,
    )
    .await;
    b.drain().await;
    let mut table =
        Table::new("3. gateway latency spikes (10% of POSTs answered after 3 s; send timeout 2 s)");
    let spiked = b.rig.injected().posts_spiked;
    b.check(
        &mut table,
        (
            spiked,
            "a timed-out POST was delivered, its retry too".into(),
        ),
    )
    .await;
    table.at_least("POSTs spiked", spiked, 1);
    table.print_and_assert();
}

#[tokio::test]
async fn gateway_dropped_connections() {
    let mut b = Broadcast::prepare(
        "drops",
        RigSpec {
            gateway: Some(Faults {
                post_drop: 10,
                ..Faults::default()
            }),
            ..RigSpec::default()
        },
        |_| {},
        PATIENT_SENDS,
        LIVE,
        GONE,
        2,
    )
    .await;
    b.drain().await;
    let mut table = Table::new("4. dropped TCP connections to the gateway (10% of POSTs)");
    let delivered_then_dropped = b.rig.injected().posts_dropped_delivered;
    b.check(
        &mut table,
        (
            delivered_then_dropped,
            "POSTs delivered whose answer was dropped".into(),
        ),
    )
    .await;
    let injected = b.rig.injected();
    table.at_least(
        "POSTs dropped",
        injected.posts_dropped_unsent + injected.posts_dropped_delivered,
        1,
    );
    table.print_and_assert();
}

#[tokio::test]
async fn dynamodb_throttling_and_unprocessed_items() {
    let mut b = Broadcast::prepare(
        "ddb",
        RigSpec {
            dynamodb: Some(Faults {
                ddb_throttle: 20,
                ddb_unprocessed: 50,
                ..Faults::default()
            }),
            ..RigSpec::default()
        },
        |_| {},
        &[("FANOUT_PAGE_SIZE", "25")],
        40,
        120,
        2,
    )
    .await;
    b.drain().await;
    let mut table = Table::new(
        "5. DynamoDB throttling (20% of Scan/Query/BatchWriteItem) + UnprocessedItems (50% of items)",
    );
    let bound = b.rerun_bound();
    b.check(&mut table, bound).await;
    let injected = b.rig.injected();
    table.at_least("DynamoDB calls throttled", injected.ddb_throttled, 1);
    table.at_least(
        "items answered unprocessed",
        injected.ddb_unprocessed_items,
        1,
    );
    table.print_and_assert();
}

#[tokio::test]
async fn sqs_receive_delete_and_visibility_errors() {
    let mut b = Broadcast::prepare(
        "sqs",
        RigSpec {
            sqs: Some(Faults {
                sqs_error: 25,
                sqs_drop: 25,
                sqs_receive_lost: 25,
                ..Faults::default()
            }),
            queues: Queues {
                visibility_seconds: Some(2),
                ..Queues::default()
            },
            ..RigSpec::default()
        },
        |g| g.latency_ms = 20,
        // One job at a time and a 1 s heartbeat: many receives, deletes and
        // visibility changes to fail.
        &[
            ("FANOUT_MAX_CONCURRENT_JOBS", "1"),
            ("FANOUT_VISIBILITY_TIMEOUT", "4s"),
            ("FANOUT_HEARTBEAT_INTERVAL", "1s"),
        ],
        LIVE,
        GONE,
        6,
    )
    .await;
    b.drain().await;
    let mut table = Table::new(
        "6. SQS errors (25% 500, 25% dropped: ReceiveMessage, DeleteMessageBatch, ChangeMessageVisibility; 25% of receive answers lost)",
    );
    let bound = b.rerun_bound();
    b.check(&mut table, bound).await;
    let injected = b.rig.injected();
    table.at_least(
        "SQS calls failed",
        injected.sqs_errors + injected.sqs_dropped,
        1,
    );
    table.at_least("receive answers lost", injected.sqs_receives_lost, 1);
    table.print_and_assert();
}

/// A slow broadcast (4 in flight, 50 ms a POST: about 80 POSTs a second) so
/// that a signal lands in its middle.
const SLOW: &[(&str, &str)] = &[
    ("FANOUT_MAX_IN_FLIGHT", "4"),
    ("FANOUT_PAGE_SIZE", "20"),
    ("FANOUT_VISIBILITY_TIMEOUT", "3s"),
    ("FANOUT_HEARTBEAT_INTERVAL", "1s"),
    ("FANOUT_SHUTDOWN_GRACE", "1s"),
];

#[tokio::test]
async fn sigkill_mid_broadcast() {
    let mut b = Broadcast::prepare(
        "kill",
        RigSpec::default(),
        |g| g.latency_ms = 50,
        SLOW,
        120,
        80,
        1,
    )
    .await;
    let worker = b.rig.spawn_worker(false);
    // Past the first heartbeat (1 s), which shortens the visibility to 3 s.
    b.rig.wait_for_deliveries(60, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&worker, "-KILL");
    let killed = finish(worker, Duration::from_secs(10)).await;
    assert!(!killed.status.success(), "SIGKILL ends the worker");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_kill = b.rig.gateway.stats().await.delivered;
    b.runs.push(killed);

    b.rig.wait_until_visible(Duration::from_secs(10)).await;
    b.drain().await;
    let mut table = Table::new("7. SIGKILL mid-broadcast (visibility 3 s, heartbeat 1 s)");
    b.check(
        &mut table,
        (
            before_kill,
            "delivered before the kill: the job restarts from its start".into(),
        ),
    )
    .await;
    table.figure("delivered before the kill", before_kill);
    table.print_and_assert();
}

#[tokio::test]
async fn sigterm_mid_broadcast_resumes_from_the_last_finished_page() {
    let mut b = Broadcast::prepare(
        "term",
        RigSpec::default(),
        |g| g.latency_ms = 50,
        SLOW,
        160,
        40,
        1,
    )
    .await;
    let worker = b.rig.spawn_worker(false);
    b.rig.wait_for_deliveries(30, Duration::from_secs(30)).await;
    signal(&worker, "-TERM");
    let stopped = finish(worker, Duration::from_secs(15)).await;
    assert!(
        stopped.status.success(),
        "exit 0 after SIGTERM: {}",
        stopped.stdout
    );
    let before = b.rig.gateway.stats().await.delivered;
    let continuation = stopped
        .stdout
        .lines()
        .any(|l| l.contains("job continues in a new message"));
    b.runs.push(stopped);

    b.drain().await;
    let mut table = Table::new("8. SIGTERM mid-broadcast (grace 1 s, page 20, 4 in flight)");
    b.check(&mut table, (20 + 4, "one page + in flight".into()))
        .await;
    let interrupted = b
        .runs
        .iter()
        .flat_map(|r| &r.reports)
        .filter(|r| r["status"] == "interrupted")
        .count();
    table.figure("delivered before the job was given up", before);
    table.equal("interrupted runs", interrupted as u64, 1);
    table.equal("continuation enqueued", u64::from(continuation), 1);
    table.print_and_assert();
}

#[tokio::test]
async fn all_faults_together() {
    let mut settings = PATIENT_SENDS.to_vec();
    settings.extend_from_slice(&[
        ("FANOUT_SEND_TIMEOUT", "1s"),
        ("FANOUT_PAGE_SIZE", "20"),
        ("FANOUT_MAX_IN_FLIGHT", "8"),
        ("FANOUT_SHUTDOWN_GRACE", "1s"),
        ("FANOUT_VISIBILITY_TIMEOUT", "5s"),
        ("FANOUT_HEARTBEAT_INTERVAL", "1s"),
    ]);
    let mut b = Broadcast::prepare(
        "all",
        RigSpec {
            sqs: Some(Faults {
                sqs_error: 10,
                sqs_drop: 10,
                ..Faults::default()
            }),
            dynamodb: Some(Faults {
                ddb_throttle: 10,
                ddb_unprocessed: 30,
                ..Faults::default()
            }),
            gateway: Some(Faults {
                post_drop: 5,
                post_spike: 3,
                spike: Duration::from_millis(1500),
                ..Faults::default()
            }),
            ..RigSpec::default()
        },
        |g| {
            g.throttle_rps = std::num::NonZeroU32::new(60);
            g.fail_percent = 5;
            g.latency_ms = 10;
        },
        &settings,
        100,
        100,
        3,
    )
    .await;
    let worker = b.rig.spawn_worker(false);
    b.rig.wait_for_deliveries(50, Duration::from_secs(30)).await;
    signal(&worker, "-TERM");
    let stopped = finish(worker, Duration::from_secs(20)).await;
    assert!(
        stopped.status.success(),
        "exit 0 after SIGTERM: {}",
        stopped.stdout
    );
    b.runs.push(stopped);
    b.drain().await;
    let mut table =
        Table::new("9. all together: 429s, 500s, spikes, drops, DynamoDB and SQS faults, SIGTERM");
    let bound = b.rerun_bound();
    b.check(&mut table, bound).await;
    table.print_and_assert();
}

#[tokio::test]
async fn fifo_broadcasts_to_a_channel_arrive_in_order() {
    let mut rig = Rig::new(
        RigSpec {
            queues: Queues {
                fifo: true,
                ..Queues::default()
            },
            ..RigSpec::default()
        },
        |g| g.latency_ms = 5,
    )
    .await;
    rig.set("FANOUT_MAX_CONCURRENT_JOBS", 4);
    let mut sockets = Vec::new();
    for _ in 0..6 {
        sockets.push(rig.gateway.connect(Some("C")).await);
    }
    // Others in the same channel, for a larger audience per job.
    let _crowd = rig.connect(40, Some("C")).await;
    let messages: Vec<String> = (1..=5).map(|n| format!("ordered {n}")).collect();
    for m in &messages {
        rig.enqueue(&["--data", m, "--channel", "C"]).await;
    }
    let first_run = rig.run_until_idle().await;
    assert!(first_run.status.success(), "{}", first_run.stdout);
    let after_first_run = {
        let (v, h) = support::counts(&rig.sqs, &rig.queue.url).await;
        v + h
    };
    if std::env::var_os("FAULTS_DEBUG").is_some() {
        println!("{}", first_run.stdout);
    }
    let mut runs = vec![first_run];
    if after_first_run > 0 {
        runs.extend(rig.run_until_drained().await);
    }

    let mut in_order = 0u64;
    let mut out_of_order = Vec::new();
    for (socket, _) in &mut sockets {
        let mut got = Vec::new();
        while got.len() < messages.len() {
            match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => got.push(t.to_string()),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(other) => got.push(format!("{other:?}")),
                Err(_) => break,
            }
        }
        if got == messages {
            in_order += 1;
        } else {
            out_of_order.push(got);
        }
    }
    let mut table = Table::new("10. ordering: FIFO queue, 5 broadcasts to channel C, 4 job slots");
    table.equal(
        "clients that got all 5 in order",
        in_order,
        sockets.len() as u64,
    );
    table.equal(
        "clients that got them out of order",
        out_of_order.len() as u64,
        0,
    );
    table.figure(
        "job runs (worker runs)",
        format!(
            "{} ({})",
            runs.iter().map(|r| r.reports.len()).sum::<usize>(),
            runs.len()
        ),
    );
    // Not asserted: `run --exit-when-idle` may leave a FIFO message behind
    // (its last receive overlapped the deletion that unblocked the group;
    // moto's long poll does not wake for it). The faults report has details.
    table.figure(
        "jobs left after the first `run --exit-when-idle`",
        after_first_run,
    );
    if let Some(first) = out_of_order.first() {
        table.figure("first out-of-order sequence", format!("{first:?}"));
    }
    table.equal(
        "jobs left on the queue",
        {
            let (v, h) = support::counts(&rig.sqs, &rig.queue.url).await;
            v + h
        },
        0,
    );
    table.print_and_assert();
}

#[tokio::test]
async fn fifo_order_holds_across_a_sigterm_mid_broadcast() {
    let mut rig = Rig::new(
        RigSpec {
            queues: Queues {
                fifo: true,
                ..Queues::default()
            },
            ..RigSpec::default()
        },
        |g| g.latency_ms = 50,
    )
    .await;
    for (key, value) in SLOW {
        rig.set(key, value);
    }
    // One job at a time: receives return one message, so only the hand-over
    // at SIGTERM can reorder.
    rig.set("FANOUT_MAX_CONCURRENT_JOBS", 1);
    let mut sockets = Vec::new();
    for _ in 0..20 {
        sockets.push(rig.gateway.connect(Some("C")).await);
    }
    let _crowd = rig.connect(100, Some("C")).await;
    let messages = ["before", "after"];
    for m in messages {
        rig.enqueue(&["--data", m, "--channel", "C"]).await;
    }
    let worker = rig.spawn_worker(false);
    rig.wait_for_deliveries(30, Duration::from_secs(30)).await;
    signal(&worker, "-TERM");
    let stopped = finish(worker, Duration::from_secs(15)).await;
    assert!(stopped.status.success(), "{}", stopped.stdout);
    let runs = rig.run_until_drained().await;

    let mut in_order = 0u64;
    let mut reordered = 0u64;
    let mut other = Vec::new();
    for (socket, _) in &mut sockets {
        let mut got = Vec::new();
        while let Ok(Some(Ok(frame))) =
            tokio::time::timeout(Duration::from_secs(2), socket.next()).await
        {
            if let Message::Text(t) = frame {
                got.push(t.to_string());
            }
        }
        // Duplicates of the part delivered before SIGTERM are allowed;
        // order is judged by first arrival.
        let mut first_seen: Vec<&str> = Vec::new();
        for g in &got {
            if !first_seen.contains(&g.as_str()) {
                first_seen.push(g);
            }
        }
        match first_seen.as_slice() {
            ["before", "after"] => in_order += 1,
            ["after", "before"] => reordered += 1,
            _ => other.push(got.clone()),
        }
    }
    let mut table =
        Table::new("10b. ordering across SIGTERM: FIFO, 2 broadcasts to channel C, 1 job slot");
    table.equal(
        "clients that got both in order",
        in_order,
        sockets.len() as u64,
    );
    table.equal("clients that got the second first", reordered, 0);
    table.equal("clients missing one", other.len() as u64, 0);
    table.figure(
        "job runs after the SIGTERM",
        runs.iter().map(|r| r.reports.len()).sum::<usize>(),
    );
    table.figure(
        "continuation enqueued",
        stopped.stdout.contains("job continues in a new message"),
    );
    table.print_and_assert();
}

#[tokio::test]
async fn a_job_that_keeps_failing_moves_to_the_dead_letter_queue_by_redrive() {
    let mut rig = Rig::new(
        RigSpec {
            queues: Queues {
                max_receives: Some(2),
                ..Queues::default()
            },
            gateway: Some(Faults {
                post_forbidden: true,
                ..Faults::default()
            }),
            ..RigSpec::default()
        },
        |_| {},
    )
    .await;
    rig.set("FANOUT_JOB_RETRY_BASE", "1s");
    rig.set("FANOUT_JOB_RETRY_MAX", "1s");
    let clients = rig.connect(10, None).await;
    rig.enqueue(&["--data", "poison", "--id", "poison"]).await;
    // Not --exit-when-idle: between its retries the job is invisible, and an
    // idle worker would leave.
    let worker = rig.spawn_worker(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while support::counts(&rig.sqs, &rig.dlq.url).await.0 == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job never reached the dead-letter queue"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    signal(&worker, "-TERM");
    let run = finish(worker, Duration::from_secs(15)).await;
    assert!(run.status.success(), "{}", run.stdout);

    let dead = support::receive_all(&rig.sqs, &rig.dlq.url).await;
    let forbidden_runs = run
        .stdout
        .lines()
        .filter(|l| l.contains("the job failed; it will be retried") && l.contains("403"))
        .count();
    let mut table = Table::new("11. poison job: every POST answered 403, redrive after 2 receives");
    table.equal("messages in the dead-letter queue", dead.len() as u64, 1);
    table.equal(
        "dead-lettered job is the poison one",
        dead.iter()
            .filter(|m| m.body.contains(r#""id":"poison""#))
            .count() as u64,
        1,
    );
    table.at_least(
        "failed runs logged with the 403 reason",
        forbidden_runs as u64,
        2,
    );
    let (visible, hidden) = support::counts(&rig.sqs, &rig.queue.url).await;
    table.equal("jobs left on the jobs queue", visible + hidden, 0);
    table.equal(
        "frames delivered",
        clients.clients().iter().map(|c| c.tally().frames()).sum(),
        0,
    );
    table.equal(
        "live connections removed",
        10 - rig.rows().await.len() as u64,
        0,
    );
    table.print_and_assert();
}

/// The worker's documented bound after its grace period, and a moment for
/// the process's own exit.
const SETTLE_BOUND: Duration = fanout_core::worker::SHUTDOWN_SETTLE_BOUND;
const EXIT_SLACK: Duration = Duration::from_secs(3);

#[tokio::test]
async fn sigterm_with_dynamodb_throttling_and_a_stalled_sqs_exits_within_the_bound() {
    let mut b = Broadcast::prepare(
        "bound",
        RigSpec {
            sqs: Some(Faults::default()),
            dynamodb: Some(Faults::default()),
            ..RigSpec::default()
        },
        |g| g.latency_ms = 100,
        &[
            ("FANOUT_MAX_IN_FLIGHT", "4"),
            ("FANOUT_PAGE_SIZE", "20"),
            ("FANOUT_VISIBILITY_TIMEOUT", "5s"),
            ("FANOUT_HEARTBEAT_INTERVAL", "1s"),
            ("FANOUT_SHUTDOWN_GRACE", "2s"),
        ],
        160,
        80,
        1,
    )
    .await;
    let worker = b.rig.spawn_worker(false);
    b.rig.wait_for_deliveries(20, Duration::from_secs(30)).await;
    // From now on every DynamoDB call is throttled (removals retry) and no
    // SQS call is ever answered (hand-backs, continuations, deletes and the
    // receive under way hang until their timeouts).
    b.rig
        .dynamodb_proxy
        .as_ref()
        .expect("a proxy")
        .set_faults(Faults {
            ddb_throttle: 100,
            ..Faults::default()
        });
    b.rig
        .sqs_proxy
        .as_ref()
        .expect("a proxy")
        .set_faults(Faults {
            sqs_stall: true,
            ..Faults::default()
        });
    let signalled = tokio::time::Instant::now();
    signal(&worker, "-TERM");
    let stopped = finish(worker, Duration::from_secs(60)).await;
    let took = signalled.elapsed();
    let grace = Duration::from_secs(2);

    let mut table =
        Table::new("12. SIGTERM with DynamoDB throttled and SQS stalled (grace 2 s, bound 10 s)");
    table.figure("seconds from SIGTERM to exit", took.as_secs());
    table.equal("exit code 0", u64::from(stopped.status.success()), 1);
    table.equal(
        "exited within grace + bound",
        u64::from(took <= grace + SETTLE_BOUND + EXIT_SLACK),
        1,
    );
    table.at_least("SQS requests stalled", b.rig.injected().sqs_stalled, 1);
    // Nothing lost: the job's message is still on the queue (hidden until
    // its visibility timeout, then delivered again).
    let (visible, hidden) = support::counts(&b.rig.sqs, &b.rig.queue.url).await;
    table.equal(
        "the job's message is still on the queue",
        visible + hidden,
        1,
    );
    b.runs.push(stopped);
    table.print_and_assert();
}
