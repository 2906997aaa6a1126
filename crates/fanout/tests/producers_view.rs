//! What a producer sees and controls, with real peers: deadlines, cancels,
//! and one report for the whole broadcast. The `fanout` binary, SQS (moto)
//! for the jobs, their dead letters and the reports, DynamoDB (dynalite)
//! for the connections and the checkpoint table (tombstones, broadcast
//! records), the local API Gateway stand-in, and real WebSocket clients,
//! which count what they receive.

use fanout_testkit::stack::Stack;
use fanout_testkit::support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fanout_dev::clients::Swarm;
use serde_json::Value;
use support::TestQueue;
use support::worker::{Run, finish, start};

/// A stack with a checkpoint table and a report queue.
struct Setup {
    stack: Stack,
    runs: String,
    reports: TestQueue,
}

fanout_testkit::on_stack!(Setup, stack);

impl Setup {
    async fn new() -> Self {
        let mut stack = Stack::new("stop", |_| {}).await;
        let runs = support::create_lease_table(&stack.dynamo, "checkpoints").await;
        let reports =
            support::create_queue(&stack.sqs, "stop-reports", &support::QueueSpec::default()).await;
        stack.set("FANOUT_REPORT_QUEUE_URL", &reports.url);
        Self {
            stack,
            runs,
            reports,
        }
    }

    /// `fanout run --exit-when-idle` at `rate` posts a second, with run
    /// records unless `records` is false.
    fn worker(&self, rate: &str, records: bool) -> tokio::process::Child {
        let mut settings = vec![("FANOUT_RATE_PER_SECOND", rate)];
        if records {
            settings.push(("FANOUT_CHECKPOINT_TABLE", self.runs.as_str()));
        }
        start(self.command(&["run", "--exit-when-idle"], settings))
    }

    /// Every report on the report queue, in the order received.
    async fn reports(&self) -> Vec<Value> {
        support::receive_all(&self.sqs, &self.reports.url)
            .await
            .into_iter()
            .map(|m| serde_json::from_str(&m.body).expect("a report is JSON"))
            .collect()
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Frames the clients received, all told.
fn received(clients: &Swarm) -> u64 {
    clients.clients().iter().map(|c| c.tally().frames()).sum()
}

async fn ended(child: tokio::process::Child) -> Run {
    let run = finish(child, Duration::from_secs(60)).await;
    assert!(run.status.success(), "{}", run.stdout);
    run
}

/// The reports of runs (not of the whole broadcast) with this status.
/// A stopped run's `delivered` and `unsent`, checked against what the
/// clients got: posts in flight at the stop may land without their answer,
/// counted unsent and received all the same.
fn stopped_between(report: &Value, got: u64) -> (u64, u64) {
    let delivered = report["delivered"].as_u64().unwrap();
    let unsent = report["unsent"].as_u64().unwrap();
    assert!(
        delivered <= got && got <= delivered + unsent,
        "{got} received: {report}"
    );
    (delivered, unsent)
}

fn with_status<'a>(reports: &'a [Value], status: &str) -> Vec<&'a Value> {
    reports
        .iter()
        .filter(|r| r["status"] == status && r["kind"] == "run")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_a_running_broadcast_and_the_clients_get_no_more() {
    let s = Setup::new().await;
    let clients = s.connect(400, None).await;
    // 400 connections at 50/s: eight seconds of sending.
    s.send_raw(r#"{"id":"launch","data":"we are live"}"#).await;
    let worker = s.worker("50", true);
    assert!(
        wait_until(|| received(&clients) >= 50, Duration::from_secs(20)).await,
        "the broadcast got under way"
    );
    s.enqueue_cancel("launch").await;
    let run = ended(worker).await;
    let at_end = received(&clients);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(received(&clients), at_end, "nothing after the stop");
    assert!(at_end < 400, "stopped part-way: {at_end} of 400");

    let reports = s.reports().await;
    let [stopped] = &with_status(&reports, "cancelled")[..] else {
        panic!("one cancelled run: {reports:?}\n{}", run.stdout)
    };
    assert_eq!(stopped["final"], true);
    let (delivered, unsent) = stopped_between(stopped, at_end);
    assert!(unsent > 0, "{stopped}");
    assert_eq!(delivered + unsent, 400, "the rest counted: {stopped}");
    let [recorded] = &with_status(&reports, "cancel_recorded")[..] else {
        panic!("{reports:?}")
    };
    assert_eq!(recorded["id"], "launch");
    let said = recorded["reason"].as_str().unwrap();
    assert!(said.contains("its runs stop within"), "{said}");
    assert_eq!(support::counts(&s.sqs, &s.queue.url).await, (0, 0));
    s.stack.close(clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_comes_first_stops_its_broadcast_before_any_post() {
    let s = Setup::new().await;
    let clients = s.connect(20, None).await;
    s.enqueue_cancel("news-7").await;
    // One job at a time: the cancel is received before the broadcast.
    let first = s.command(
        &["run", "--exit-when-idle"],
        [
            ("FANOUT_CHECKPOINT_TABLE", s.runs.as_str()),
            ("FANOUT_MAX_CONCURRENT_JOBS", "1"),
        ],
    );
    ended(start(first)).await;
    s.send_raw(r#"{"id":"news-7","data":"too late"}"#).await;
    ended(s.worker("200", true)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(received(&clients), 0);
    let reports = s.reports().await;
    let recorded = &with_status(&reports, "cancel_recorded")[0];
    let said = recorded["reason"].as_str().unwrap();
    assert!(
        said.contains("no run of the broadcast news-7 is on record yet"),
        "{said}"
    );
    let [stopped] = &with_status(&reports, "cancelled")[..] else {
        panic!("{reports:?}")
    };
    assert_eq!(
        (stopped["delivered"].as_u64(), stopped["final"].as_bool()),
        (Some(0), Some(true))
    );
    s.stack.close(clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_without_run_records_is_dead_lettered_with_the_reason() {
    let s = Setup::new().await;
    s.send_raw(r#"{"v":2,"cancel":"launch"}"#).await;
    ended(s.worker("200", false)).await;
    let dead = support::receive_all(&s.sqs, &s.dlq.url).await;
    let [letter] = &dead[..] else {
        panic!("{} dead letters", dead.len())
    };
    assert!(
        letter.reason().contains("FANOUT_CHECKPOINT_TABLE"),
        "{}",
        letter.reason()
    );
    s.stack.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_received_after_its_deadline_sends_nothing_and_reports_lapsed() {
    let s = Setup::new().await;
    let clients = s.connect(20, None).await;
    let past = now_ms() - 1_000;
    s.send_raw(&format!(
        r#"{{"v":2,"id":"price-1","data":"1.0871","deliver_by":{past}}}"#
    ))
    .await;
    ended(s.worker("200", false)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(received(&clients), 0);
    let reports = s.reports().await;
    let [lapsed] = &reports[..] else {
        panic!("{reports:?}")
    };
    assert_eq!(
        (lapsed["status"].as_str(), lapsed["final"].as_bool()),
        (Some("lapsed"), Some(true))
    );
    assert_eq!(lapsed["unsent"], 20, "counted, not sent: {lapsed}");
    assert_eq!(support::counts(&s.sqs, &s.queue.url).await, (0, 0));
    assert!(support::receive_all(&s.sqs, &s.dlq.url).await.is_empty());
    s.stack.close(clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_broadcast_stops_at_its_deadline_and_hands_nothing_on() {
    let s = Setup::new().await;
    let clients = s.connect(300, None).await;
    // 300 connections at 50/s take six seconds; the deadline is in three.
    let deadline = now_ms() + 3_000;
    s.send_raw(&format!(
        r#"{{"v":2,"id":"score-3","data":"2-1","deliver_by":{deadline}}}"#
    ))
    .await;
    let run = ended(s.worker("50", true)).await;
    let ended_at = now_ms();
    let at_end = received(&clients);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(received(&clients), at_end, "nothing after the deadline");
    assert!(at_end > 0 && at_end < 300, "{at_end}\n{}", run.stdout);
    assert!(ended_at >= deadline, "not before the deadline");
    let reports = s.reports().await;
    let [lapsed, whole] = &reports[..] else {
        panic!("no continuation: one run, and the whole: {reports:?}")
    };
    assert_eq!(
        (&lapsed["kind"], &whole["kind"]),
        (&"run".into(), &"broadcast".into())
    );
    for report in [lapsed, whole] {
        assert_eq!(report["status"], "lapsed");
        stopped_between(report, at_end);
    }
    assert_eq!(support::counts(&s.sqs, &s.queue.url).await, (0, 0));
    s.stack.close(clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_refuses_a_deadline_that_has_passed_or_lies_too_far_ahead() {
    let s = Setup::new().await;
    for (when, says) in [
        ("2020-01-01T00:00:00Z", "has passed already"),
        ("2099-01-01T00:00:00Z", "more than 14 days ahead"),
        ("1796574600", "not seconds"),
    ] {
        let out = s
            .command(&["enqueue", "--data", "x", "--deliver-by", when], [])
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{when}: {stderr}"
        );
    }
    assert_eq!(
        support::counts(&s.sqs, &s.queue.url).await,
        (0, 0),
        "nothing sent"
    );
    s.stack.gateway.shutdown().await;
}

impl Setup {
    /// `fanout cancel ID`, which must succeed.
    async fn enqueue_cancel(&self, id: &str) {
        support::worker::run_ok(self.command(&["cancel", id], []), "fanout cancel").await;
    }
}

/// Polls `done` every 20 ms until it holds or `limit` passes.
async fn wait_until(done: impl Fn() -> bool, limit: Duration) -> bool {
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

fn of_kind<'a>(reports: &'a [Value], kind: &str) -> Vec<&'a Value> {
    reports.iter().filter(|r| r["kind"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_broadcast_sends_one_report_for_the_whole_after_its_runs() {
    let s = Setup::new().await;
    let clients = s.connect(60, None).await;
    s.send_raw(r#"{"id":"launch-2","data":"we are live","split":3}"#)
        .await;
    // Two workers share the segments.
    let (a, b) = tokio::join!(ended(s.worker("200", true)), ended(s.worker("200", true)));
    let reports = s.reports().await;
    let runs = of_kind(&reports, "run");
    assert_eq!(runs.len(), 4, "the split and 3 segments: {reports:?}");
    let whole = of_kind(&reports, "broadcast");
    let [whole] = &whole[..] else {
        panic!(
            "one broadcast report: {reports:?}\n{}\n{}",
            a.stdout, b.stdout
        )
    };
    assert_eq!(
        (whole["status"].as_str(), whole["final"].as_bool()),
        (Some("done"), Some(true))
    );
    assert_eq!(
        (whole["delivered"].as_u64(), whole["runs"].as_u64()),
        (Some(60), Some(4))
    );
    let delivered: u64 = runs.iter().map(|r| r["delivered"].as_u64().unwrap()).sum();
    assert_eq!(delivered, 60, "the runs add up to the whole");
    assert!(clients.wait_for_frames(1, Duration::from_secs(10)).await);
    s.stack.close(clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_split_broadcast_reports_cancelled_as_a_whole() {
    let s = Setup::new().await;
    let clients = s.connect(300, None).await;
    s.send_raw(r#"{"id":"launch-3","data":"we are live","split":3}"#)
        .await;
    let worker = s.worker("40", true);
    assert!(
        wait_until(|| received(&clients) >= 20, Duration::from_secs(20)).await,
        "under way"
    );
    s.enqueue_cancel("launch-3").await;
    ended(worker).await;
    let reports = s.reports().await;
    let whole = of_kind(&reports, "broadcast");
    let [whole] = &whole[..] else {
        panic!("one broadcast report: {reports:?}")
    };
    assert_eq!(whole["status"], "cancelled", "{whole}");
    let (delivered, unsent) = stopped_between(whole, received(&clients));
    assert_eq!(
        delivered + unsent,
        300,
        "every segment's rest counted: {whole}"
    );
    s.stack.close(clients).await;
}

fn update(id: &str, seq: u64) -> String {
    format!(
        r#"{{"v":2,"id":"{id}","data":"{id}","channel":"match","latest":{{"key":"score-match","seq":{seq}}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_update_stops_the_older_one_and_every_client_ends_with_it() {
    let mut s = Setup::new().await;
    // Pages of 20: the newer update goes on from where the older one's
    // posts are, not from a page's end.
    s.set("FANOUT_PAGE_SIZE", "20");
    let clients = s.connect(300, Some("match")).await;
    // 300 connections at 50/s: six seconds for one update.
    s.send_raw(&update("score-1", 1)).await;
    let worker = s.worker("50", true);
    assert!(
        wait_until(|| received(&clients) >= 60, Duration::from_secs(20)).await,
        "the first update got under way"
    );
    s.send_raw(&update("score-2", 2)).await;
    let run = ended(worker).await;
    // An update older than the newest started is not sent.
    s.send_raw(&update("score-0", 0)).await;
    ended(s.worker("50", true)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut older = 0;
    for client in clients.clients() {
        let tally = client.tally();
        assert_eq!(
            tally.text_count("score-2"),
            1,
            "{}\n{}",
            client.id(),
            run.stdout
        );
        assert_eq!(tally.text_count("score-0"), 0, "{}", client.id());
        older += u64::from(tally.text_count("score-1"));
    }
    assert!(older < 300, "the first update stopped part-way: {older}");
    assert!(
        run.stdout
            .contains("took a newer update of the stream; sending it from here on"),
        "handed to the running update, which went on with it: {}",
        run.stdout
    );
    let reports = s.reports().await;
    let status = |id: &str| {
        reports
            .iter()
            .find(|r| r["id"] == id && r["kind"] == "run")
            .map(|r| r["status"].as_str().unwrap().to_owned())
    };
    assert_eq!(
        status("score-1").as_deref(),
        Some("superseded"),
        "{reports:?}"
    );
    assert_eq!(status("score-2").as_deref(), Some("done"));
    assert_eq!(status("score-0").as_deref(), Some("superseded"));
    s.stack.close(clients).await;
}
