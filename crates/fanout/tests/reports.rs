//! Broadcast reports and progress lines with real peers: the `fanout`
//! binary, SQS and SNS (moto), DynamoDB (dynalite), the local API Gateway
//! stand-in and real WebSocket clients. Every settled message reports once
//! to each destination, with counts that match what the clients and the
//! gateway saw; an unreachable destination changes nothing but a count; a
//! long broadcast logs its progress.

use fanout_testkit::stack::Stack;
use fanout_testkit::support;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use fanout_dev::gateway::GatewayArgs;
use serde_json::Value;
use support::TestQueue;
use support::worker::count;

/// A jobs queue, its dead-letter queue, a table, a gateway over it, and the
/// report destinations: a queue, and a topic read through a subscribed
/// queue.
struct Rig {
    stack: Stack,
    reports: TestQueue,
    topic: String,
    topic_reader: TestQueue,
}

fanout_testkit::on_stack!(Rig, stack);

impl Rig {
    /// A stack whose `fanout` commands report to a queue and to a topic.
    async fn new(configure: impl FnOnce(&mut GatewayArgs)) -> Self {
        let mut stack = Stack::new("rep", configure).await;
        let sns = support::sns().await;
        let reports =
            support::create_queue(&stack.sqs, "rep-reports", &support::QueueSpec::default()).await;
        let (topic, topic_reader) = support::topic_with_queue(&stack.sqs, &sns, "rep-topic").await;
        stack.set("FANOUT_REPORT_QUEUE_URL", &reports.url);
        stack.set("FANOUT_REPORT_TOPIC_ARN", &topic);
        Self {
            stack,
            reports,
            topic,
            topic_reader,
        }
    }

    /// The reports a destination got, by broadcast key, in the order sent.
    async fn reports_in(&self, queue: &TestQueue) -> BTreeMap<String, Vec<Value>> {
        let mut by_id: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for message in support::receive_all(&self.sqs, &queue.url).await {
            let report: Value = serde_json::from_str(&message.body)
                .unwrap_or_else(|e| panic!("a report is JSON ({e}): {}", message.body));
            let id = report["id"]
                .as_str()
                .expect("a report names its id")
                .to_owned();
            by_id.entry(id).or_default().push(report);
        }
        for reports in by_id.values_mut() {
            reports.sort_by_key(|r| r["continuation"].as_u64());
        }
        by_id
    }
}

fn at(report: &Value, key: &str) -> SystemTime {
    let text = report[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {report}"));
    assert!(text.ends_with('Z'), "UTC: {text}");
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{key} {text}: {e}"))
}

/// Every field docs/jobs.md documents for the run of a broadcast that is
/// not a `to` one, and no other.
const FIELDS: &[&str] = &[
    "kind",
    "id",
    "run",
    "segment",
    "segments_total",
    "continuation",
    "part",
    "message_id",
    "final",
    "status",
    "reason",
    "audience",
    "delivered",
    "gone",
    "expired",
    "removed",
    "failed",
    "deferred",
    "unsent",
    "rechecking",
    "kept",
    "throttled",
    "retries",
    "started_at",
    "ended_at",
    "failed_ids",
    "failed_ids_truncated",
];

#[tokio::test]
async fn every_outcome_reports_once_to_each_destination_with_the_clients_counts() {
    let rig = Rig::new(|_| {}).await;
    let clients = rig.connect(20, None).await;
    let stale = support::ids("stale", 5);
    support::put_connections(&rig.dynamo, &rig.table, &stale, None).await;

    rig.enqueue(&["--data", "reported", "--id", "done"]).await;
    // Dead-lettered at parsing: a typo'd key; and a payload API Gateway
    // would refuse.
    rig.send_raw(r#"{"id":"typo","data":"x","chanel":"news"}"#)
        .await;
    let oversize = std::env::temp_dir().join(support::unique("payload"));
    std::fs::write(&oversize, "a".repeat(131_073)).expect("write the payload");
    rig.enqueue(&[
        "--file",
        oversize.to_str().unwrap(),
        "--unchecked",
        "--id",
        "oversize",
    ])
    .await;
    let before = SystemTime::now();
    let run = rig.run_until_idle().await;

    assert!(clients.wait_for_frames(1, Duration::from_secs(10)).await);
    let received: u64 = clients
        .clients()
        .iter()
        .map(|c| u64::from(c.tally().text_count("reported")))
        .sum();
    assert_eq!(received, 20, "every client once");
    let stats = rig.gateway.stats().await;

    let by_queue = rig.reports_in(&rig.reports).await;
    let by_topic = rig.reports_in(&rig.topic_reader).await;
    assert_eq!(by_queue, by_topic, "both destinations get the same reports");
    assert_eq!(
        by_queue.keys().collect::<Vec<_>>(),
        ["done", "oversize", "typo"]
    );
    for (id, reports) in &by_queue {
        assert_eq!(reports.len(), 1, "one report per message: {id} {reports:?}");
        let fields: Vec<_> = reports[0].as_object().unwrap().keys().cloned().collect();
        assert_eq!(fields.len(), FIELDS.len(), "{fields:?}");
        assert!(
            FIELDS.iter().all(|f| fields.contains(&(*f).to_owned())),
            "{fields:?}"
        );
        assert!(at(&reports[0], "started_at") >= before - Duration::from_secs(1));
        assert!(at(&reports[0], "ended_at") >= at(&reports[0], "started_at"));
        assert_eq!(reports[0]["final"], true, "{id}");
    }

    let done = &by_queue["done"][0];
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(count(done, "delivered"), received, "the clients' own tally");
    assert_eq!(
        count(done, "delivered"),
        stats.delivered,
        "the gateway's tally"
    );
    // Rows without a start the worker reads: each 410 is posted to again
    // after the connect window, and the row goes on the second.
    assert_eq!(
        (count(done, "gone"), count(done, "rechecking")),
        (5, 5),
        "{done}"
    );
    assert_eq!(2 * count(done, "gone"), stats.gone);
    assert_eq!(
        (
            count(done, "audience"),
            count(done, "failed"),
            count(done, "deferred")
        ),
        (25, 0, 0)
    );
    assert_eq!(done["failed_ids"], serde_json::json!([]));
    assert_eq!(done["failed_ids_truncated"], false);
    assert_eq!(
        (done["segment"].clone(), count(done, "continuation")),
        (Value::Null, 0)
    );
    // The log line and the report agree.
    assert_eq!(
        count(run.report("done"), "delivered"),
        count(done, "delivered")
    );

    let typo = &by_queue["typo"][0];
    assert_eq!(typo["status"], "dead_lettered");
    assert!(
        typo["reason"].as_str().unwrap().contains("chanel"),
        "{typo}"
    );
    assert_eq!(count(typo, "audience"), 0);
    let oversize = &by_queue["oversize"][0];
    assert_eq!(oversize["status"], "dead_lettered");
    assert!(
        oversize["reason"]
            .as_str()
            .unwrap()
            .contains("131073 bytes"),
        "{oversize}"
    );
    assert_eq!(support::counts(&rig.sqs, &rig.dlq.url).await.0, 2);
    assert!(run.stdout.contains("\"ReportsSent\":6"), "{}", run.stdout);
}

#[tokio::test]
async fn an_interrupted_broadcast_reports_it_goes_on_and_its_continuation_reports_the_end() {
    let mut rig = Rig::new(|args| {
        args.latency_ms = 40;
        args.keep_stale = true;
    })
    .await;
    rig.slow_to_cut();
    let clients = rig.connect(30, None).await;
    let stale = support::ids("gone", 300);
    support::put_connections(&rig.dynamo, &rig.table, &stale, None).await;
    rig.enqueue(&["--data", "interrupted", "--id", "long"])
        .await;

    Stack::stop(rig.worker_under_way(100).await).await;
    let reports = rig.reports_in(&rig.reports).await;
    let [cut] = &reports["long"][..] else {
        panic!("one report after SIGTERM: {reports:?}")
    };
    assert_eq!(cut["final"], false, "{cut}");
    assert_eq!(cut["status"], "continued", "finished pages go on: {cut}");
    assert!(count(cut, "delivered") + count(cut, "gone") >= 90, "{cut}");

    // The continuation replaced the message; it runs to the end.
    assert_eq!(rig.jobs_on_queue().await.len(), 1);
    rig.run_until_idle().await;
    assert!(clients.wait_for_frames(1, Duration::from_secs(10)).await);
    let reports = rig.reports_in(&rig.reports).await;
    let [end] = &reports["long"][..] else {
        panic!("one more report: {reports:?}")
    };
    assert_eq!(
        (end["status"].clone(), end["final"].clone()),
        ("done".into(), true.into())
    );
    assert_eq!(count(end, "continuation"), 1, "{end}");
    assert_eq!(end["run"], "long continuation 1");

    // What the two runs reported is what the clients and the gateway saw
    // (a resumed page may be sent twice: both sides count it), but for the
    // sends in flight when the first run stopped, whose answers it never
    // read: at most FANOUT_MAX_IN_FLIGHT.
    let frames: u64 = clients
        .clients()
        .iter()
        .map(|c| u64::from(c.tally().text_count("interrupted")))
        .sum();
    let stats = rig.gateway.stats().await;
    assert_eq!(frames, stats.delivered, "the clients and the gateway agree");
    let answered = |key| count(cut, key) + count(end, key);
    let (delivered, gone) = (answered("delivered"), answered("gone"));
    // A first 410 from a row without a start is posted to again after the
    // connect window: the gateway counts those 410s too (the interrupted
    // worker's rechecks went with it).
    let rechecked = answered("rechecking");
    assert!(
        delivered <= frames && frames <= delivered + 4,
        "{delivered} vs {frames}"
    );
    assert!(
        gone <= stats.gone && stats.gone + delivered <= gone + rechecked + frames + 4,
        "{gone} vs {}",
        stats.gone
    );
    // Each gone row found is rechecked (no start is read here); the
    // continuation's go before its worker ends, the interrupted worker's
    // may have gone with it: a row left, never a live one removed.
    assert_eq!(gone, rechecked, "each 410 rechecked");
    let left = support::remaining_ids(&rig.dynamo, &rig.table).await;
    assert!(
        clients.ids().iter().all(|id| left.contains(id)),
        "no live row removed"
    );
    assert_eq!(
        left.iter().filter(|id| !id.starts_with("gone-")).count(),
        30
    );
}

#[tokio::test]
async fn unreachable_report_destinations_are_logged_and_counted_and_the_job_is_done() {
    let mut rig = Rig::new(|_| {}).await;
    // A queue that does not exist (SQS refuses), and an SNS endpoint where
    // nothing listens.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let missing = rig.reports.url.replace("rep-reports", "no-such-queue");
    rig.set("FANOUT_REPORT_QUEUE_URL", &missing);
    rig.set("AWS_ENDPOINT_URL_SNS", &dead);
    let clients = rig.connect(5, None).await;
    rig.enqueue(&["--data", "still delivered", "--id", "unreported"])
        .await;
    let run = rig.run_until_idle().await;

    assert!(clients.wait_for_frames(1, Duration::from_secs(10)).await);
    for c in clients.clients() {
        assert_eq!(c.tally().text_count("still delivered"), 1);
    }
    let report = run.report("unreported");
    assert_eq!(report["status"], "done");
    assert_eq!(
        support::counts(&rig.sqs, &rig.queue.url).await,
        (0, 0),
        "deleted"
    );
    let failures = run.logged("the broadcast report was not sent");
    assert_eq!(failures.len(), 2, "{}", run.stdout);
    let destinations: Vec<_> = failures
        .iter()
        .map(|f| f["destination"].as_str().unwrap())
        .collect();
    assert!(destinations.contains(&missing.as_str()), "{destinations:?}");
    assert!(
        destinations.contains(&rig.topic.as_str()),
        "{destinations:?}"
    );
    assert!(run.stdout.contains("\"ReportsFailed\":2"), "{}", run.stdout);
    // Neither the real topic nor the real report queue got anything.
    assert!(rig.reports_in(&rig.topic_reader).await.is_empty());
}

#[tokio::test]
async fn a_thirty_second_broadcast_logs_progress_at_the_default_interval() {
    let mut rig = Rig::new(|args| args.sink = true).await;
    // 3,000 connections at 100/s: a 30 s broadcast, progress every 10 s.
    rig.set("FANOUT_RATE_PER_SECOND", 100);
    rig.set("FANOUT_ADAPTIVE_RATE", false);
    let ids: Vec<String> = support::ids("listed", 3000);
    let body = serde_json::json!({"id": "progress", "data": "slow", "connections": ids});
    rig.send_raw(&body.to_string()).await;
    let run = rig.run_until_idle().await;

    let lines = run.logged("broadcast progress");
    assert!(
        lines.len() >= 2,
        "at least two progress lines: {}",
        run.stdout
    );
    let mut last_delivered = 0;
    let mut last_share = 0.0;
    for line in &lines {
        assert_eq!(line["job_id"], "progress");
        let delivered = count(line, "delivered");
        assert!(delivered > last_delivered, "grows: {lines:?}");
        last_delivered = delivered;
        let rate = count(line, "rate_per_second");
        assert!((50..=150).contains(&rate), "about 100/s: {line}");
        let share = line["share_done"]
            .as_f64()
            .expect("an explicit list has a share");
        assert!(share > last_share && share < 1.0, "{line}");
        last_share = share;
        // At about 100/s what is left takes about its count / 100 s.
        let left = (3000 - delivered) as f64 / 100.0;
        let eta = count(line, "eta_seconds") as f64;
        assert!(
            (eta - left).abs() <= left * 0.5 + 2.0,
            "eta {eta} for {left}: {line}"
        );
    }
    let first = count(&lines[0], "delivered");
    assert!((600..=1400).contains(&first), "about 10 s in: {}", lines[0]);
    assert_eq!(count(run.report("progress"), "delivered"), 3000);
    let reports = rig.reports_in(&rig.reports).await;
    assert_eq!(count(&reports["progress"][0], "delivered"), 3000);
}
