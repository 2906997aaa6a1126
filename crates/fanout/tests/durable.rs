//! Idempotent broadcasts and one task per run, against real peers: the
//! `fanout` binary with `FANOUT_CHECKPOINT_TABLE`, moto (SQS), dynalite
//! (the connections and checkpoint tables), the local API Gateway and real
//! WebSocket clients, which count what they receive.

use fanout_testkit::fault_support::proxy::{FaultProxy, Faults};
use fanout_testkit::local_support::TestGateway;
use fanout_testkit::stack::Stack;
use fanout_testkit::support;

use std::time::Duration;

use fanout_dev::clients::Swarm;
use support::TableKey;
use support::worker::{Run, finish, start};

/// A stack (queues, connections table, gateway) and a checkpoint table.
struct Setup {
    stack: Stack,
    runs: String,
}

fanout_testkit::on_stack!(Setup, stack);

impl Setup {
    async fn new() -> Self {
        let stack = Stack::new("runs", |_| {}).await;
        let runs = support::create_lease_table(&stack.dynamo, "checkpoints").await;
        Self { stack, runs }
    }

    /// The setup with `count` clients connected, in no channel.
    async fn with_clients(count: usize) -> (Self, Swarm) {
        let s = Self::new().await;
        let clients = s.connect(count, None).await;
        (s, clients)
    }

    /// Checks that every client got `text` exactly once and that the jobs
    /// queue is empty (`why`), then closes the clients and the gateway.
    async fn end_delivered_once(self, clients: Swarm, text: &str, why: &str) {
        each_once(&clients, text).await;
        assert_eq!(
            support::counts(&self.sqs, &self.queue.url).await,
            (0, 0),
            "{why}"
        );
        self.stack.close(clients).await;
    }

    fn worker(&self, checkpoint_table: &str) -> tokio::process::Child {
        self.worker_with(checkpoint_table, &[], true)
    }

    /// `fanout run` with run records in `checkpoint_table`, at 200/s
    /// unless `extra` says otherwise.
    fn worker_with(
        &self,
        checkpoint_table: &str,
        extra: &[(&str, &str)],
        exit_when_idle: bool,
    ) -> tokio::process::Child {
        let args: &[&str] = if exit_when_idle {
            &["run", "--exit-when-idle"]
        } else {
            &["run"]
        };
        let settings = [
            ("FANOUT_CHECKPOINT_TABLE", checkpoint_table),
            ("FANOUT_RATE_PER_SECOND", "200"),
        ];
        start(self.command(args, settings.into_iter().chain(extra.iter().copied())))
    }

    async fn run(&self) -> Run {
        let run = finish(self.worker(&self.runs), Duration::from_secs(60)).await;
        assert!(run.status.success(), "{}", run.stdout);
        run
    }
}

/// Every client got `text` exactly once.
async fn each_once(clients: &Swarm, text: &str) {
    assert!(clients.wait_for_frames(1, Duration::from_secs(10)).await);
    // Late duplicates would arrive within this.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for client in clients.clients() {
        assert_eq!(client.tally().text_count(text), 1, "{}", client.id());
    }
}

const JOB: &str = r#"{"id":"match-42","data":"goal"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_job_id_sent_again_after_it_finished_reaches_each_client_once() {
    let (s, clients) = Setup::with_clients(50).await;
    s.send_raw(JOB).await;
    let first = s.run().await;
    assert_eq!(first.report("match-42")["delivered"], 50);
    // A producer that timed out sends it again.
    s.send_raw(JOB).await;
    let second = s.run().await;
    assert!(
        second.reports.is_empty(),
        "not broadcast again: {}",
        second.stdout
    );
    assert!(
        second
            .stdout
            .contains("a duplicate of a broadcast finished at"),
        "{}",
        second.stdout
    );
    s.end_delivered_once(clients, "goal", "deleted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_job_id_twice_at_once_with_two_workers_reaches_each_client_once() {
    let (s, clients) = Setup::with_clients(200).await;
    // A second apart at 200/s: the first copy's broadcast is under way
    // when the second worker receives the second.
    s.send_raw(JOB).await;
    s.send_raw(JOB).await;
    let a = s.worker(&s.runs);
    let b = s.worker(&s.runs);
    let (a, b) = tokio::join!(
        finish(a, Duration::from_secs(60)),
        finish(b, Duration::from_secs(60))
    );
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        a.stdout,
        b.stdout
    );
    let broadcasts = a.reports.len() + b.reports.len();
    assert_eq!(broadcasts, 1, "one run: {}\n{}", a.stdout, b.stdout);
    s.end_delivered_once(clients, "goal", "both copies gone")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_job_id_with_another_body_is_dead_lettered_with_that_reason() {
    let (s, clients) = Setup::with_clients(10).await;
    s.send_raw(JOB).await;
    s.run().await;
    s.send_raw(r#"{"id":"match-42","data":"own goal"}"#).await;
    let second = s.run().await;
    assert!(second.reports.is_empty(), "{}", second.stdout);
    let dead = support::receive_all(&s.sqs, &s.dlq.url).await;
    let [letter] = &dead[..] else {
        panic!("{} dead letters", dead.len())
    };
    let reason = letter.reason();
    assert!(
        reason.contains("match-42") && reason.contains("another body"),
        "{reason}"
    );
    each_once(&clients, "goal").await;
    for client in clients.clients() {
        assert_eq!(client.tally().text_count("own goal"), 0);
    }
    s.stack.close(clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_checkpoint_table_stops_the_worker_naming_the_key() {
    let s = Setup::new().await;
    let run = finish(s.worker("no-such-table"), Duration::from_secs(30)).await;
    assert!(!run.status.success());
    assert!(
        run.stdout.contains("FANOUT_CHECKPOINT_TABLE"),
        "{}",
        run.stdout
    );
    s.stack.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_visibility_lapses_mid_broadcast_is_not_run_twice_at_once() {
    let (s, clients) = Setup::with_clients(300).await;
    // Worker A's heartbeat cannot keep the message hidden: its SQS goes
    // through a proxy that fails every ChangeMessageVisibility.
    let sqs = std::env::var("AWS_ENDPOINT_URL_SQS").expect("the emulators' env");
    let proxy = FaultProxy::start(
        &sqs,
        Faults {
            sqs_block_visibility: true,
            ..Faults::default()
        },
    )
    .await;
    let proxied = proxy.url();
    let short = [
        ("FANOUT_VISIBILITY_TIMEOUT", "3s"),
        ("FANOUT_HEARTBEAT_INTERVAL", "1s"),
        ("FANOUT_RATE_PER_SECOND", "50"),
    ];
    let mut a_env = short.to_vec();
    a_env.push(("AWS_ENDPOINT_URL_SQS", proxied.as_str()));
    s.send_raw(JOB).await;
    let a = s.worker_with(&s.runs, &a_env, true);
    // B starts once A has the message: 300 clients at 50/s take 6 s, and
    // the message comes back every 3 s. B runs until A is done.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = s.worker_with(&s.runs, &short, false);
    let a = finish(a, Duration::from_secs(60)).await;
    support::worker::signal(&b, "-TERM");
    let b = finish(b, Duration::from_secs(30)).await;
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        a.stdout,
        b.stdout
    );
    assert_eq!(a.report("match-42")["delivered"], 300, "{}", a.stdout);
    assert!(b.reports.is_empty(), "B never ran it: {}", b.stdout);
    // Whichever worker received it again (A's own next receive, or B's)
    // left it to the run's holder.
    let redelivered = "came back while its broadcast runs on another task";
    assert!(
        a.stdout.contains(redelivered) || b.stdout.contains(redelivered),
        "a redelivery was seen: {}\nB: {}",
        a.stdout,
        b.stdout
    );
    assert!(proxy.injected().sqs_errors > 0, "the heartbeat was blocked");
    // A deleted it with the newest receipt, B's.
    s.end_delivered_once(clients, "goal", "deleted").await;
}

/// The kill test's broadcast: pages of 1,000, 64 in flight, one segment.
const KILLED_AUDIENCE: usize = 20_000;
const PAGE: usize = 1000;
const IN_FLIGHT: usize = 64;

/// One kill: a broadcast of `table` SIGKILLed once `kill_after` posts
/// reached the endpoint, then a new worker, which must say it resumed from
/// the checkpoint. Returns (posts before the kill, clients reached twice).
async fn killed_once(table: &str, kill_after: u64) -> (u64, u64) {
    let sqs = support::sqs().await;
    let dynamo = support::dynamodb().await;
    let (queue, dlq) = support::create_queue_with_dlq(&sqs, "kill", false, None).await;
    let runs = support::create_lease_table(&dynamo, "kill-runs").await;
    let gateway = TestGateway::on_table(table, |args| args.sink = true).await;
    let endpoint = format!("http://{}/{}", gateway.addr, gateway.stage);
    let page = PAGE.to_string();
    let in_flight = IN_FLIGHT.to_string();
    let worker = |idle: bool| {
        let args: &[&str] = if idle {
            &["run", "--exit-when-idle"]
        } else {
            &["run"]
        };
        start(support::worker::command(
            args,
            &queue.url,
            &dlq.url,
            table,
            [
                ("FANOUT_GATEWAY_ENDPOINT", endpoint.as_str()),
                ("FANOUT_CHECKPOINT_TABLE", runs.as_str()),
                ("FANOUT_PAGE_SIZE", page.as_str()),
                ("FANOUT_MAX_IN_FLIGHT", in_flight.as_str()),
                ("FANOUT_SCAN_SEGMENTS", "1"),
                ("FANOUT_RATE_PER_SECOND", "2000"),
                ("FANOUT_MAX_CONCURRENT_JOBS", "1"),
                // The killed run's message and lease come back soon.
                ("FANOUT_VISIBILITY_TIMEOUT", "4s"),
                ("FANOUT_HEARTBEAT_INTERVAL", "1s"),
            ],
        ))
    };
    sqs.send_message()
        .queue_url(&queue.url)
        .message_body(r#"{"id":"everyone","data":"hi"}"#)
        .send()
        .await
        .expect("enqueue");
    let first = worker(true);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let killed_at = loop {
        let posts = gateway.stats().await.posts;
        if posts >= kill_after {
            support::worker::signal(&first, "-KILL");
            break posts;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the broadcast stalled at {posts}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = finish(first, Duration::from_secs(10)).await;
    // The new worker takes the run over once its lease expires.
    let second = worker(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let stats = gateway.stats().await;
        if stats.sink_ids == KILLED_AUDIENCE as u64
            && support::counts(&sqs, &queue.url).await == (0, 0)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every client was reached: {} of {KILLED_AUDIENCE}",
            stats.sink_ids
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    support::worker::signal(&second, "-TERM");
    let second = finish(second, Duration::from_secs(30)).await;
    let stats = gateway.stats().await;
    gateway.shutdown().await;
    eprintln!(
        "killed after {killed_at} posts: {} clients reached twice",
        stats.sink_duplicates
    );
    assert!(
        second.stdout.contains("resuming from its checkpoint"),
        "the new worker resumed: {}",
        second.stdout
    );
    (killed_at, stats.sink_duplicates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_broadcast_resumes_from_its_checkpoint_within_the_bound() {
    support::require_emulators();
    let dynamo = support::dynamodb().await;
    let table = support::create_table(&dynamo, "kill-audience", TableKey::Id, true).await;
    support::put_connections(&dynamo, &table, &support::ids("c", KILLED_AUDIENCE), None).await;
    // At most two pages partly done (the one being finished and the one
    // read ahead) plus what was in flight.
    let bound = (2 * PAGE + IN_FLIGHT) as u64;
    let mut figures = Vec::new();
    for _ in 0..3 {
        // A random moment between the second page and the last few.
        let kill_after = rand::random_range(2_000..17_000);
        figures.push(killed_once(&table, kill_after).await);
    }
    for (killed_at, twice) in &figures {
        assert!(
            *twice <= bound,
            "killed after {killed_at} posts, {twice} reached twice; the bound is {bound}: {figures:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_table_throttled_mid_job_loses_nothing() {
    let (s, clients) = Setup::with_clients(300).await;
    let dynamodb = std::env::var("AWS_ENDPOINT_URL_DYNAMODB").expect("the emulators' env");
    let proxy = FaultProxy::start(&dynamodb, Faults::default()).await;
    let proxied = proxy.url();
    s.send_raw(JOB).await;
    // 300 clients at 100/s: the table throttles from the first second on,
    // checkpoints and the finish record alike.
    let worker = s.worker_with(
        &s.runs,
        &[
            ("AWS_ENDPOINT_URL_DYNAMODB", proxied.as_str()),
            ("FANOUT_RATE_PER_SECOND", "100"),
            ("FANOUT_PAGE_SIZE", "25"),
            ("FANOUT_METRICS_LISTEN", "127.0.0.1:0"),
        ],
        true,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set_faults(Faults {
        ddb_throttle_items: true,
        ..Faults::default()
    });
    let run = finish(worker, Duration::from_secs(90)).await;
    assert!(run.status.success(), "{}", run.stdout);
    assert_eq!(run.report("match-42")["delivered"], 300, "{}", run.stdout);
    assert!(
        proxy.injected().ddb_throttled > 0,
        "the table was throttled"
    );
    assert!(
        run.stdout.contains("the checkpoint table failed to"),
        "the failures are logged: {}",
        run.stdout
    );
    let failures = run
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|l| l["CheckpointFailures"].as_u64())
        .sum::<u64>();
    assert!(failures > 0, "and counted: {}", run.stdout);
    s.end_delivered_once(clients, "goal", "settled").await;
}
