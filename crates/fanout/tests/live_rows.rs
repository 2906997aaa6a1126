//! A live connection's row is never removed, and a broadcast nobody got is
//! never settled "done": `fanout run` as a process, moto's SQS, dynalite's
//! tables, and a scripted `@connections` endpoint on Python's http.server
//! (not the project's own stand-in) that answers 410, 404 or 410-then-200
//! as each test says.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;
use fanout_testkit::support;
use support::worker::{Run, command, run_to_end};
use support::{IndexSpec, TestQueue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The scripted endpoint, stopped by its pid when dropped.
struct Scripted {
    child: Child,
    port: u16,
}

impl Scripted {
    fn start(script: serde_json::Value) -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/scripted_gateway.py");
        let mut child = Command::new("python3")
            .arg(path)
            .arg(script.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("the endpoint says its port");
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        Self { child, port }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/prod", self.port)
    }

    /// Every id posted to, with the statuses it was answered.
    async fn posts(&self) -> BTreeMap<String, Vec<u16>> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("reach the endpoint");
        stream
            .write_all(b"GET /_posts HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("{}");
        serde_json::from_str(body).expect("the posts as JSON")
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A start ten minutes ago: established.
fn established() -> String {
    (now_ms() - 10 * 60 * 1000).to_string()
}

struct Rig {
    sqs: aws_sdk_sqs::Client,
    ddb: aws_sdk_dynamodb::Client,
    queue: TestQueue,
    dlq: TestQueue,
}

impl Rig {
    async fn new(prefix: &str) -> Self {
        support::require_emulators();
        let sqs = support::sqs().await;
        let ddb = support::dynamodb().await;
        let (queue, dlq) = support::create_queue_with_dlq(&sqs, prefix, false, None).await;
        Self {
            sqs,
            ddb,
            queue,
            dlq,
        }
    }

    /// `fanout run --exit-when-idle` with the endpoint and a one-second
    /// connect window (the production window is two minutes), reading
    /// starts from `connectedAt`, and a failed job visible again at once.
    async fn run(&self, table: &str, endpoint: &str, env: &[(&str, &str)]) -> Run {
        let mut settings = vec![
            ("FANOUT_GATEWAY_ENDPOINT", endpoint),
            ("FANOUT_CONNECTED_AT_ATTRIBUTE", "connectedAt"),
            ("FANOUT_CONNECT_WINDOW", "1s"),
            ("FANOUT_JOB_RETRY_BASE", "0s"),
            ("FANOUT_JOB_RETRY_MAX", "0s"),
        ];
        settings.extend_from_slice(env);
        let mut worker = command(
            &["run", "--exit-when-idle"],
            &self.queue.url,
            &self.dlq.url,
            table,
            settings,
        );
        // These tables have no channel index.
        worker.env_remove("FANOUT_CHANNEL_INDEX");
        run_to_end(worker).await
    }

    /// Runs workers one after another until the queue is empty (a job
    /// retried after a failure may come back after a worker went idle);
    /// returns every run's output.
    async fn run_until_empty(&self, table: &str, endpoint: &str) -> String {
        let mut out = String::new();
        for _ in 0..8 {
            out.push_str(&self.run(table, endpoint, &[]).await.stdout);
            if self.left_on_queue().await == 0 {
                break;
            }
        }
        out
    }

    async fn send(&self, body: &str) {
        support::send_body(&self.sqs, &self.queue.url, body).await;
    }

    /// The reasons of the dead letters, which must be `count` (with the
    /// worker's output `out` to show if not).
    async fn dead_letter_reasons(&self, count: usize, out: &str) -> Vec<String> {
        let dead = self.dead_letters().await;
        assert_eq!(dead.len(), count, "dead-lettered, not done: {out}");
        dead.into_iter().map(|d| d.reason().to_owned()).collect()
    }

    async fn dead_letters(&self) -> Vec<support::Received> {
        support::receive_all(&self.sqs, &self.dlq.url).await
    }

    async fn left_on_queue(&self) -> u64 {
        let (visible, hidden) = support::counts(&self.sqs, &self.queue.url).await;
        visible + hidden
    }
}

/// A table keyed by `connectionId`, rows established ten minutes ago.
async fn id_table(ddb: &aws_sdk_dynamodb::Client, ids: &[String]) -> String {
    let table = support::create_table_with_indexes(ddb, "live", ("connectionId", None), &[]).await;
    let rows: Vec<Vec<(&str, String)>> = ids
        .iter()
        .map(|id| vec![("connectionId", id.clone())])
        .collect();
    support::put_rows(ddb, &table, &rows).await;
    for id in ids {
        set_started(ddb, &table, &[("connectionId", id)], &established()).await;
    }
    table
}

/// Sets a row's `connectedAt` (a number, as API Gateway gives it).
async fn set_started(ddb: &aws_sdk_dynamodb::Client, table: &str, key: &[(&str, &str)], ms: &str) {
    let mut update = ddb
        .update_item()
        .table_name(table)
        .update_expression("SET connectedAt = :s")
        .expression_attribute_values(":s", AttributeValue::N(ms.to_owned()));
    for (name, value) in key {
        update = update.key(*name, AttributeValue::S((*value).to_owned()));
    }
    update.send().await.expect("set connectedAt");
}

async fn ids_left(
    ddb: &aws_sdk_dynamodb::Client,
    table: &str,
    attribute: &str,
) -> BTreeSet<String> {
    let items = ddb
        .scan()
        .table_name(table)
        .send()
        .await
        .expect("scan")
        .items
        .unwrap_or_default();
    items
        .iter()
        .filter_map(|item| match item.get(attribute) {
            Some(AttributeValue::S(s)) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_producers_deferred_entry_with_another_connections_key_removes_nothing() {
    let rig = Rig::new("live-deferred").await;
    let live = support::ids("live", 3);
    let table = id_table(&rig.ddb, &live).await;
    let endpoint = Scripted::start(serde_json::json!({
        "default": 200,
        "ids": {"made-up": [410]}
    }));
    // fanout's own hand-on field, written by a producer: an id the endpoint
    // answers 410 for, with the row key of a live connection.
    rig.send(
        &serde_json::json!({
            "id": "forged",
            "data": "x",
            "deferred": [{"id": "made-up", "key": [["connectionId", {"S": live[0]}]]}]
        })
        .to_string(),
    )
    .await;
    // A broadcast to everyone proves the endpoint meanwhile.
    rig.send(r#"{"id":"everyone","data":"y"}"#).await;
    let run = rig.run(&table, &endpoint.endpoint(), &[]).await;
    assert_eq!(
        ids_left(&rig.ddb, &table, "connectionId").await,
        live.iter().cloned().collect(),
        "no live row removed: {}",
        run.stdout
    );
    let posts = endpoint.posts().await;
    // Posted, then rechecked after the window (a job that delivered nothing
    // before the endpoint proved itself is retried, and rechecks again).
    let answers = &posts["made-up"];
    assert!(
        answers.len() >= 2 && answers.iter().all(|s| *s == 410),
        "{answers:?}: {}",
        run.stdout
    );
}

#[tokio::test]
async fn a_connection_in_three_channels_gets_a_broadcast_to_everyone_once() {
    let rig = Rig::new("live-channels").await;
    let table = support::create_table_with_indexes(
        &rig.ddb,
        "live-ch",
        ("channel", Some("connectionId")),
        &[IndexSpec {
            name: "by-connection",
            partition: "connectionId",
            sort: Some("channel"),
        }],
    )
    .await;
    let mut rows = Vec::new();
    for channel in ["a", "b", "c"] {
        rows.push(vec![
            ("channel", channel.to_owned()),
            ("connectionId", "everywhere".to_owned()),
        ]);
        for n in 0..20 {
            rows.push(vec![
                ("channel", channel.to_owned()),
                ("connectionId", format!("{channel}-{n:02}")),
            ]);
        }
    }
    support::put_rows(&rig.ddb, &table, &rows).await;
    let endpoint = Scripted::start(serde_json::json!({"default": 200}));
    rig.send(r#"{"id":"everyone","data":"x"}"#).await;
    // A small page splits one connection's rows over pages too.
    let run = rig
        .run(
            &table,
            &endpoint.endpoint(),
            &[
                ("FANOUT_CONNECTION_INDEX", "by-connection"),
                ("FANOUT_PAGE_SIZE", "2"),
            ],
        )
        .await;
    let posts = endpoint.posts().await;
    assert_eq!(posts.len(), 61, "every connection: {}", run.stdout);
    assert!(
        posts.values().all(|answers| answers.len() == 1),
        "each connection once: {posts:?}"
    );
    assert_eq!(run.report("everyone")["delivered"], 61);

    // Without the index, a broadcast to everyone is refused with the reason.
    rig.send(r#"{"id":"refused","data":"x"}"#).await;
    let run = rig.run(&table, &endpoint.endpoint(), &[]).await;
    let reasons = rig.dead_letter_reasons(1, &run.stdout).await;
    assert!(
        reasons[0].contains("FANOUT_CONNECTION_INDEX"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn an_endpoint_of_another_api_answering_410_for_everyone_removes_no_row() {
    let rig = Rig::new("live-misdirected").await;
    let live = support::ids("live", 400);
    let table = id_table(&rig.ddb, &live).await;
    let endpoint = Scripted::start(serde_json::json!({"default": 410}));
    rig.send(r#"{"id":"everyone","data":"x"}"#).await;
    let out = rig.run_until_empty(&table, &endpoint.endpoint()).await;
    assert_eq!(
        ids_left(&rig.ddb, &table, "connectionId").await.len(),
        400,
        "every row kept: {out}"
    );
    assert!(out.contains("looks misdirected"), "{out}");
    assert!(out.contains(r#""endpoint_status":"misdirected""#) || out.contains("misdirected"));
    // Retried, then dead-lettered with a reason that names the setting.
    let reasons = rig.dead_letter_reasons(1, &out).await;
    assert!(
        reasons[0].contains("FANOUT_GATEWAY_ENDPOINT"),
        "{reasons:?}"
    );
    assert_eq!(rig.left_on_queue().await, 0);
    // Each worker stopped posting at its verdict, not after the whole
    // audience.
    let posts: usize = endpoint.posts().await.values().map(Vec::len).sum();
    assert!(posts <= 4 * 120, "{posts} posts");
}

#[tokio::test]
async fn many_small_jobs_to_a_misdirected_endpoint_remove_no_row() {
    let rig = Rig::new("live-small").await;
    let live = support::ids("live", 150);
    let table = id_table(&rig.ddb, &live).await;
    let endpoint = Scripted::start(serde_json::json!({"default": 410}));
    for (n, chunk) in live.chunks(5).enumerate() {
        rig.send(
            &serde_json::json!({"id": format!("chat-{n}"), "data": "x", "connections": chunk})
                .to_string(),
        )
        .await;
    }
    let run = rig.run(&table, &endpoint.endpoint(), &[]).await;
    assert_eq!(
        ids_left(&rig.ddb, &table, "connectionId").await.len(),
        150,
        "every row kept: {}",
        run.stdout
    );
    // None settled as done: each retried, then dead-lettered with why.
    let reasons = rig.dead_letter_reasons(30, &run.stdout).await;
    assert!(
        reasons
            .iter()
            .all(|r| r.contains("FANOUT_GATEWAY_ENDPOINT")),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn a_wrong_base_path_answering_404_settles_nothing_as_done() {
    let rig = Rig::new("live-404").await;
    let live = support::ids("live", 120);
    let table = id_table(&rig.ddb, &live).await;
    let endpoint = Scripted::start(serde_json::json!({"default": 404, "html": true}));
    rig.send(r#"{"id":"everyone","data":"x"}"#).await;
    let out = rig.run_until_empty(&table, &endpoint.endpoint()).await;
    let reasons = rig.dead_letter_reasons(1, &out).await;
    assert!(reasons[0].contains("404"), "{reasons:?}");
    assert!(reasons[0].contains(&endpoint.endpoint()), "{reasons:?}");
    assert_eq!(ids_left(&rig.ddb, &table, "connectionId").await.len(), 120);
}

#[tokio::test]
async fn a_connection_still_connecting_is_posted_again_and_keeps_its_row() {
    let rig = Rig::new("live-connecting").await;
    let live = support::ids("live", 5);
    let table = id_table(&rig.ddb, &live).await;
    // `$connect` wrote the row just now; API Gateway answers 410 until it
    // completes.
    support::put_rows(
        &rig.ddb,
        &table,
        &[vec![("connectionId", "connecting".to_owned())]],
    )
    .await;
    set_started(
        &rig.ddb,
        &table,
        &[("connectionId", "connecting")],
        &now_ms().to_string(),
    )
    .await;
    // A row without a start that is really gone: removed on a second 410.
    support::put_rows(
        &rig.ddb,
        &table,
        &[vec![("connectionId", "left".to_owned())]],
    )
    .await;
    let endpoint = Scripted::start(serde_json::json!({
        "default": 200,
        "ids": {"connecting": [410, 200], "left": [410]}
    }));
    rig.send(r#"{"id":"everyone","data":"x"}"#).await;
    let run = rig.run(&table, &endpoint.endpoint(), &[]).await;
    let posts = endpoint.posts().await;
    assert_eq!(
        posts["connecting"],
        [410, 200],
        "it got the message: {}",
        run.stdout
    );
    assert_eq!(posts["left"], [410, 410]);
    let left = ids_left(&rig.ddb, &table, "connectionId").await;
    assert!(left.contains("connecting"), "{left:?}");
    assert!(!left.contains("left"), "{left:?}");
    let report = run.report("everyone");
    assert_eq!(report["rechecking"], 2, "{report}");
}

#[tokio::test]
async fn a_table_keyed_by_user_deletes_only_on_condition_that_the_row_holds_the_id() {
    let rig = Rig::new("live-user").await;
    let table =
        support::create_table_with_indexes(&rig.ddb, "live-user", ("userId", None), &[]).await;
    let rows = vec![
        vec![
            ("userId", "u-live".to_owned()),
            ("connectionId", "c-live".to_owned()),
        ],
        vec![
            ("userId", "u-gone".to_owned()),
            ("connectionId", "c-gone".to_owned()),
        ],
    ];
    support::put_rows(&rig.ddb, &table, &rows).await;
    for user in ["u-live", "u-gone"] {
        set_started(&rig.ddb, &table, &[("userId", user)], &established()).await;
    }
    let endpoint = Scripted::start(serde_json::json!({
        "default": 200,
        "ids": {"c-gone": [410], "made-up": [410]}
    }));
    rig.send(r#"{"id":"everyone","data":"x"}"#).await;
    // A producer's forged hand-on: a made-up id with the live user's key.
    rig.send(
        &serde_json::json!({
            "id": "forged",
            "data": "x",
            "deferred": [{"id": "made-up", "key": [["userId", {"S": "u-live"}]]}]
        })
        .to_string(),
    )
    .await;
    let run = rig.run(&table, &endpoint.endpoint(), &[]).await;
    let left = ids_left(&rig.ddb, &table, "userId").await;
    assert_eq!(
        left,
        BTreeSet::from(["u-live".to_owned()]),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn a_job_for_a_newer_task_is_handed_back_not_dead_lettered() {
    let rig = Rig::new("live-newer").await;
    let table = id_table(&rig.ddb, &support::ids("live", 2)).await;
    let endpoint = Scripted::start(serde_json::json!({"default": 200}));
    // What a newer task writes during a rolling deploy: a field this build
    // does not know, under a format version it does not read.
    rig.send(r#"{"v":3,"id":"newer","data":"x","newest":{"key":"k","seq":1}}"#)
        .await;
    // Handed back after the retry delay, as on a deployment: with none, a
    // batch run would receive it again and again and never be idle.
    let delay = [
        ("FANOUT_JOB_RETRY_BASE", "30s"),
        ("FANOUT_JOB_RETRY_MAX", "30s"),
    ];
    let run = rig.run(&table, &endpoint.endpoint(), &delay).await;
    assert!(rig.dead_letters().await.is_empty(), "{}", run.stdout);
    assert_eq!(rig.left_on_queue().await, 1, "{}", run.stdout);
    assert!(
        run.stdout.contains("a job for a newer fanout"),
        "{}",
        run.stdout
    );
}
