//! Idempotent broadcasts and one task per run, against real peers: the
//! `fanout` binary with `FANOUT_CHECKPOINT_TABLE`, moto (SQS), dynalite
//! (the connections and checkpoint tables), the local API Gateway and real
//! WebSocket clients, which count what they receive.

use fanout_testkit::local_support::TestGateway;
use fanout_testkit::support;

use std::process::Stdio;
use std::time::Duration;

use fanout_dev::clients::Swarm;
use support::worker::{Run, finish};
use support::{TableKey, TestQueue};

struct Setup {
    sqs: aws_sdk_sqs::Client,
    queue: TestQueue,
    dlq: TestQueue,
    table: String,
    runs: String,
    gateway: TestGateway,
}

impl Setup {
    async fn new() -> Self {
        support::require_emulators();
        let sqs = support::sqs().await;
        let dynamo = support::dynamodb().await;
        let (queue, dlq) = support::create_queue_with_dlq(&sqs, "runs", false, None).await;
        let table = support::create_table(&dynamo, "runs", TableKey::Id, true).await;
        let runs = support::create_lease_table(&dynamo, "checkpoints").await;
        let gateway = TestGateway::on_table(&table, |_| {}).await;
        Self {
            sqs,
            queue,
            dlq,
            table,
            runs,
            gateway,
        }
    }

    async fn send(&self, body: &str) {
        self.sqs
            .send_message()
            .queue_url(&self.queue.url)
            .message_body(body)
            .send()
            .await
            .expect("enqueue a job");
    }

    fn worker(&self, checkpoint_table: &str) -> tokio::process::Child {
        let endpoint = format!("http://{}/{}", self.gateway.addr, self.gateway.stage);
        support::worker::command(
            &["run", "--exit-when-idle"],
            &self.queue.url,
            &self.dlq.url,
            &self.table,
            [
                ("FANOUT_GATEWAY_ENDPOINT", endpoint.as_str()),
                ("FANOUT_CHECKPOINT_TABLE", checkpoint_table),
                ("FANOUT_RATE_PER_SECOND", "200"),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fanout run")
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
    let s = Setup::new().await;
    let clients = Swarm::connect(&s.gateway.ws_url(), 50, None, 25)
        .await
        .expect("clients");
    s.send(JOB).await;
    let first = s.run().await;
    assert_eq!(first.report("match-42")["delivered"], 50);
    // A producer that timed out sends it again.
    s.send(JOB).await;
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
    each_once(&clients, "goal").await;
    assert_eq!(
        support::counts(&s.sqs, &s.queue.url).await,
        (0, 0),
        "deleted"
    );
    clients.close(None).await;
    s.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_job_id_twice_at_once_with_two_workers_reaches_each_client_once() {
    let s = Setup::new().await;
    let clients = Swarm::connect(&s.gateway.ws_url(), 200, None, 25)
        .await
        .expect("clients");
    // A second apart at 200/s: the first copy's broadcast is under way
    // when the second worker receives the second.
    s.send(JOB).await;
    s.send(JOB).await;
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
    each_once(&clients, "goal").await;
    assert_eq!(
        support::counts(&s.sqs, &s.queue.url).await,
        (0, 0),
        "both copies gone"
    );
    clients.close(None).await;
    s.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_job_id_with_another_body_is_dead_lettered_with_that_reason() {
    let s = Setup::new().await;
    let clients = Swarm::connect(&s.gateway.ws_url(), 10, None, 10)
        .await
        .expect("clients");
    s.send(JOB).await;
    s.run().await;
    s.send(r#"{"id":"match-42","data":"own goal"}"#).await;
    let second = s.run().await;
    assert!(second.reports.is_empty(), "{}", second.stdout);
    let dead = support::receive_all(&s.sqs, &s.dlq.url).await;
    let [letter] = &dead[..] else {
        panic!("{} dead letters", dead.len())
    };
    let reason = &letter.attributes["fanout.reason"];
    assert!(
        reason.contains("match-42") && reason.contains("another body"),
        "{reason}"
    );
    each_once(&clients, "goal").await;
    for client in clients.clients() {
        assert_eq!(client.tally().text_count("own goal"), 0);
    }
    clients.close(None).await;
    s.gateway.shutdown().await;
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
    s.gateway.shutdown().await;
}
