//! Rows certainly gone by age, against real peers: the `fanout` binary,
//! dynalite and moto, the local API Gateway stand-in (which writes
//! `connectedAt` in epoch ms into the rows of the clients it accepts, as a
//! `$connect` handler copying `requestContext.connectedAt` would), and real
//! WebSocket clients.
//!
//! Rows started three hours ago are deleted without a post; rows of an hour
//! ago, and rows whose start cannot be trusted, are posted to as usual; and
//! a worker whose clock disagrees with DynamoDB's turns the rule off.

use fanout_testkit::fault_support::proxy::{FaultProxy, Faults};
use fanout_testkit::stack::Stack;
use fanout_testkit::support;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;
use support::worker::{Run, count, run_to_end};

const HOUR_MS: i64 = 60 * 60 * 1000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

struct Setup(Stack);

fanout_testkit::on_stack!(Setup, 0);

impl Setup {
    async fn new() -> Self {
        Self(Stack::new("age", |_| {}).await)
    }

    /// Writes one row with `connectedAt` as given (`None`: without it).
    async fn put(&self, id: &str, connected_at: Option<AttributeValue>) {
        let mut put = self
            .dynamo
            .put_item()
            .table_name(&self.table)
            .item("connectionId", AttributeValue::S(id.to_owned()));
        if let Some(value) = connected_at {
            put = put.item("connectedAt", value);
        }
        put.send().await.expect("put a row");
    }

    async fn started(&self, id: &str, ms: i64) {
        self.put(id, Some(AttributeValue::N(ms.to_string()))).await;
    }

    async fn job(&self, id: &str) {
        self.send_raw(&format!(r#"{{"id":"{id}","data":"hello {id}"}}"#))
            .await;
    }

    async fn run(&self, extra: &[(&str, &str)]) -> Run {
        let env = [
            ("FANOUT_CONNECTED_AT_ATTRIBUTE", "connectedAt"),
            ("FANOUT_RATE_PER_SECOND", "0"),
        ];
        let command = self.command(
            &["run", "--exit-when-idle"],
            env.into_iter().chain(extra.iter().copied()),
        );
        let run = run_to_end(command).await;
        assert!(run.status.success(), "{}", run.stdout);
        run
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_three_hours_ago_are_removed_with_no_post_and_the_rest_posted_to() {
    support::require_emulators();
    let s = Setup::new().await;
    let clients = s.connect(100, None).await;
    let live: BTreeSet<String> = clients.ids().into_iter().collect();
    // Half the live clients connected an hour ago: well within the limit.
    for id in live.iter().take(50) {
        s.started(id, now_ms() - HOUR_MS).await;
    }
    let expired = support::ids("old", 100);
    for id in &expired {
        s.started(id, now_ms() - 3 * HOUR_MS).await;
    }
    // Starts that cannot be trusted: posted to (and, having no client,
    // found gone by their 410).
    let three_hours_ago_in_seconds = (now_ms() - 3 * HOUR_MS) / 1000;
    let unknown = [
        (
            "in-seconds",
            Some(AttributeValue::N(three_hours_ago_in_seconds.to_string())),
        ),
        (
            "in-future",
            Some(AttributeValue::N((now_ms() + HOUR_MS).to_string())),
        ),
        ("too-early", Some(AttributeValue::N("1000".into()))),
        ("a-string", Some(AttributeValue::S("yesterday".into()))),
        ("missing", None),
    ];
    for (id, value) in unknown.clone() {
        s.put(id, value).await;
    }
    let before = s.gateway.stats().await.posts;

    s.job("aged").await;
    let run = s.run(&[]).await;

    let report = run.report("aged");
    assert_eq!(count(report, "audience"), 205, "{report}");
    assert_eq!(count(report, "expired"), 100, "{report}");
    assert_eq!(count(report, "delivered"), 100, "{report}");
    assert_eq!(count(report, "gone"), 5, "the untrusted starts: {report}");
    // The expired rows in the run; the untrusted starts may be connections
    // still connecting, so their rows go on a second 410, after the run.
    assert_eq!(count(report, "removed"), 100, "{report}");
    assert_eq!(count(report, "rechecking"), 5, "{report}");
    assert_eq!(count(report, "unknown_age"), 5, "{report}");
    let problem = report["age_problem"].as_str().expect("the problem named");
    assert!(problem.starts_with("5 row(s)"), "{problem}");
    // No retries, nothing failed: every post is one connection's one post,
    // so the expired rows had none.
    let posts = s.gateway.stats().await.posts - before;
    assert_eq!(
        posts, 110,
        "posts: 100 live + 5 untrusted and their rechecks, none expired"
    );
    assert!(clients.wait_for_frames(1, Duration::from_secs(10)).await);
    for client in clients.clients() {
        assert_eq!(
            client.tally().text_count("hello aged"),
            1,
            "{}",
            client.id()
        );
    }
    assert_eq!(s.rows().await, live, "exactly the live rows remain");
    assert!(
        run.stdout.contains("removed without a post"),
        "{}",
        run.stdout
    );
    s.0.close(clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_clock_off_by_minutes_posts_to_every_row() {
    support::require_emulators();
    let s = Setup::new().await;
    let clients = s.connect(10, None).await;
    let old = support::ids("old", 20);
    for id in &old {
        s.started(id, now_ms() - 3 * HOUR_MS).await;
    }
    // DynamoDB, through a proxy, says it is five minutes earlier.
    let dynamodb = std::env::var("AWS_ENDPOINT_URL_DYNAMODB").expect("the emulators' env");
    let proxy = FaultProxy::start(
        &dynamodb,
        Faults {
            date_offset_secs: -300,
            ..Faults::default()
        },
    )
    .await;
    let proxied = proxy.url();

    s.job("skewed").await;
    let run = s
        .run(&[("AWS_ENDPOINT_URL_DYNAMODB", proxied.as_str())])
        .await;

    let report = run.report("skewed");
    assert_eq!(count(report, "expired"), 0, "{report}");
    assert_eq!(count(report, "delivered"), 10, "{report}");
    assert_eq!(count(report, "gone"), 20, "posted to, found gone: {report}");
    assert!(
        run.stdout.contains("clock differs from AWS's"),
        "the rule is turned off, and says so: {}",
        run.stdout
    );
    s.0.close(clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_margin_under_ten_minutes_is_refused_naming_the_key() {
    let out = support::worker::command(
        &["check-config"],
        "http://127.0.0.1:9/queue/q",
        "http://127.0.0.1:9/queue/dlq",
        "t",
        [
            ("FANOUT_GATEWAY_ENDPOINT", "http://127.0.0.1:9/dev"),
            ("FANOUT_EXPIRED_MARGIN", "5m"),
        ],
    )
    .output()
    .await
    .expect("run fanout check-config");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FANOUT_EXPIRED_MARGIN"), "{err}");
}
