//! The template's own WebSocket API (`CreateWebSocketApi`) without AWS: its
//! request templates rendered by a Velocity engine (airspeed, through
//! `scripts/ws_templates.py`), each rendered request sent as the real
//! DynamoDB call to dynalite, and the `fanout` binary reaching the
//! connections those rows describe (real WebSocket clients of the local
//! gateway) in broadcasts to everyone, to channels and to users. Also: the
//! local gateway's memberships layout writes exactly the templates' rows, and
//! a broadcast that runs while clients connect reaches each of them and
//! removes none of their rows.
//!
//! Needs the emulators and the emulators' venv (`./scripts/test.sh`
//! installs both).

use fanout_testkit::local_support;
use fanout_testkit::support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use fanout_dev::gateway::GatewayArgs;
use fanout_dev::gateway::registry::now_ms;
use fanout_dev::gateway::rows::{Layout, Rows};
use futures::{SinkExt, StreamExt};
use local_support::{Socket, TestGateway};
use support::TestQueue;
use support::worker::{Run, finish};
use tokio_tungstenite::tungstenite::Message;

type Item = HashMap<String, AttributeValue>;

/// What the template's task definition sets for its own API's table
/// (checked against the stack in scripts/stack_test.py).
const STACK_ENV: [(&str, &str); 4] = [
    ("FANOUT_CHANNEL_INDEX", "by-channel"),
    ("FANOUT_CHANNEL_ATTRIBUTE", "channel"),
    ("FANOUT_AUDIENCE_INDEXES", "user=by-user:userId"),
    ("FANOUT_CONNECTED_AT_ATTRIBUTE", "connectedAt"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The emulators' venv, where `scripts/emulators.sh install` pins airspeed.
fn python() -> PathBuf {
    let python = root().join(".local/venv/bin/python");
    assert!(
        python.exists(),
        "{} not found: run ./scripts/emulators.sh install (./scripts/test.sh does)",
        python.display()
    );
    python
}

fn dynamodb_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL_DYNAMODB")
        .expect("AWS_ENDPOINT_URL_DYNAMODB (./scripts/test.sh)")
}

/// A table as the template's `WebSocketTable` (and the gateway's
/// memberships layout) makes it.
async fn stack_table(dynamo: &aws_sdk_dynamodb::Client, prefix: &str) -> String {
    let name = support::unique(prefix);
    Rows::new(dynamo.clone(), &name, Layout::Memberships)
        .create_table_if_missing()
        .await
        .expect("create the stack's table");
    name
}

/// What the authorizer's context and the client's request hold for one
/// rendering.
#[derive(Default, Clone)]
struct Request<'a> {
    body: Option<&'a str>,
    channel_query: Option<&'a str>,
    principal: Option<&'a str>,
    channel_prefix: Option<&'a str>,
}

/// Renders a route's request template and sends it to DynamoDB as API
/// Gateway's integration would: the script's JSON answer (`rendered`,
/// `json`, `status`, `answer`).
async fn render_and_send(
    route: &str,
    table: &str,
    id: &str,
    connected_at: u64,
    request: &Request<'_>,
) -> serde_json::Value {
    let mut command = tokio::process::Command::new(python());
    command
        .arg(root().join("scripts/ws_templates.py"))
        .args(["render", route, "--table", table, "--connection-id", id])
        .args(["--connected-at", &connected_at.to_string()])
        .args(["--endpoint", &dynamodb_endpoint()]);
    if let Some(body) = request.body {
        command.args(["--body", body]);
    }
    if let Some(channel) = request.channel_query {
        command.arg("--query").arg(format!("channel={channel}"));
    }
    if let Some(principal) = request.principal {
        command.args(["--principal", principal]);
    }
    if let Some(prefix) = request.channel_prefix {
        command.args(["--channel-prefix", prefix]);
    }
    let out = command.output().await.expect("run ws_templates.py");
    assert!(
        out.status.success(),
        "ws_templates.py render {route}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON out");
    assert_eq!(
        answer["json"], true,
        "the rendered request is JSON: {answer}"
    );
    answer
}

/// Every row of one connection, by sort key.
async fn rows_of(
    dynamo: &aws_sdk_dynamodb::Client,
    table: &str,
    id: &str,
) -> BTreeMap<String, Item> {
    support::first_page_of_partition(dynamo, table, "connectionId", id)
        .await
        .items()
        .iter()
        .map(|item| {
            let sk = item["sk"].as_s().expect("sk is a string").clone();
            (sk, item.clone())
        })
        .collect()
}

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// The item a template promises: the key, the start and the TTL (epoch
/// seconds, 3 h past the start), and the rest.
fn expected(id: &str, sk: &str, connected_at: u64, rest: &[(&str, &str)]) -> Item {
    let mut item: Item = [
        ("connectionId".to_owned(), s(id)),
        ("sk".to_owned(), s(sk)),
        ("connectedAt".to_owned(), n(connected_at)),
        ("expiresAt".to_owned(), n(connected_at / 1000 + 3 * 3600)),
    ]
    .into_iter()
    .collect();
    for (name, value) in rest {
        item.insert((*name).to_owned(), s(value));
    }
    item
}

/// A WebSocket client of the local gateway, its id learned with `whoami`.
/// `query` is appended to the connect URL as it is (already encoded).
async fn connect(gateway: &TestGateway, query: &str) -> (Socket, String) {
    let url = if query.is_empty() {
        gateway.ws_url()
    } else {
        format!("{}?{query}", gateway.ws_url())
    };
    local_support::connect_url(&url).await
}

fn encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The text frames a socket gets until it has been quiet for `quiet`.
async fn frames(socket: &mut Socket, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while let Ok(Some(frame)) = tokio::time::timeout(quiet, socket.next()).await {
        if let Ok(Message::Text(text)) = frame {
            got.push(text.to_string());
        }
    }
    got
}

/// A jobs queue and its dead-letter queue, and `fanout run` against them.
struct Worker {
    sqs: aws_sdk_sqs::Client,
    queue: TestQueue,
    dlq: TestQueue,
}

impl Worker {
    async fn new(prefix: &str) -> Self {
        let sqs = support::sqs().await;
        let (queue, dlq) = support::create_queue_with_dlq(&sqs, prefix, false, None).await;
        Self { sqs, queue, dlq }
    }

    async fn send(&self, body: &str) {
        support::send_body(&self.sqs, &self.queue.url, body).await;
    }

    fn command(
        &self,
        table: &str,
        gateway: &TestGateway,
        env: &[(&str, &str)],
    ) -> tokio::process::Command {
        let endpoint = format!("http://{}/{}", gateway.addr, gateway.stage);
        let mut settings = vec![("FANOUT_GATEWAY_ENDPOINT", endpoint.as_str())];
        settings.extend(STACK_ENV);
        settings.extend_from_slice(env);
        let mut command = support::worker::command(
            &["run", "--exit-when-idle"],
            &self.queue.url,
            &self.dlq.url,
            table,
            settings,
        );
        command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        command
    }

    async fn run(&self, table: &str, gateway: &TestGateway, env: &[(&str, &str)]) -> Run {
        let child = self
            .command(table, gateway, env)
            .spawn()
            .expect("start fanout run");
        let run = finish(child, Duration::from_secs(90)).await;
        assert!(run.status.success(), "{}", run.stdout);
        run
    }
}

#[tokio::test]
async fn hostile_channel_names_and_user_ids_give_a_valid_item_or_a_refused_request() {
    support::require_emulators();
    let dynamo = support::dynamodb().await;
    let table = stack_table(&dynamo, "ws-hostile").await;
    let out = tokio::process::Command::new(python())
        .arg(root().join("scripts/ws_templates.py"))
        .args([
            "hostile",
            "--table",
            &table,
            "--endpoint",
            &dynamodb_endpoint(),
        ])
        .output()
        .await
        .expect("run ws_templates.py hostile");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(" 0 failed"), "{text}");
}

#[tokio::test]
async fn rows_the_templates_write_reach_their_connections_in_every_audience() {
    support::require_emulators();
    let dynamo = support::dynamodb().await;
    let table = stack_table(&dynamo, "ws-rendered").await;
    // The gateway only holds the sockets; the rows that count are the ones
    // the rendered templates write to `table`.
    let gateway = TestGateway::start(|_| {}).await;
    let quote_user = "o'brien \"ö\" \\ 🙂";
    let odd_channel = "public.it's \"x\" \\ é";

    // a: a user (with quotes), joined public.lobby on connect.
    let (mut a, a_id) = connect(&gateway, "").await;
    // b: no user; subscribes to public.match-42 and to an odd name.
    let (mut b, b_id) = connect(&gateway, "").await;
    // c: alice, whose authorizer opens user.alice.; her own inbox, not bob's.
    let (mut c, c_id) = connect(&gateway, "").await;
    // d: nothing but its connection.
    let (mut d, d_id) = connect(&gateway, "").await;
    // e: subscribes to public.match-42, then unsubscribes.
    let (mut e, e_id) = connect(&gateway, "").await;

    let at = now_ms();
    let connect_as = |principal: Option<&'static str>,
                      channel_query: Option<&'static str>,
                      channel_prefix: Option<&'static str>| Request {
        principal,
        channel_query,
        channel_prefix,
        ..Request::default()
    };
    let sub =
        |channel: &str| serde_json::json!({"action": "subscribe", "channel": channel}).to_string();
    let unsub = |channel: &str| {
        serde_json::json!({"action": "unsubscribe", "channel": channel}).to_string()
    };

    let answer = render_and_send(
        "connect",
        &table,
        &a_id,
        at,
        &connect_as(Some(quote_user), Some("public.lobby"), None),
    )
    .await;
    assert_eq!(answer["status"], 200, "{answer}");
    for id in [&b_id, &d_id, &e_id] {
        let answer = render_and_send("connect", &table, id, at, &Request::default()).await;
        assert_eq!(answer["status"], 200, "{answer}");
    }
    let alice = connect_as(Some("alice"), None, Some("user.alice."));
    let answer = render_and_send("connect", &table, &c_id, at, &alice).await;
    assert_eq!(answer["status"], 200, "{answer}");
    for (id, channel, ok) in [
        (&b_id, "public.match-42", true),
        (&b_id, odd_channel, true),
        (&e_id, "public.match-42", true),
        (&c_id, "user.alice.inbox", true),
        (&c_id, "user.bob.inbox", false),
        (&d_id, "admin", false),
    ] {
        let body = sub(channel);
        let request = Request {
            body: Some(&body),
            channel_prefix: (id == &c_id).then_some("user.alice."),
            ..Request::default()
        };
        let answer = render_and_send("subscribe", &table, id, at, &request).await;
        assert_eq!(answer["status"] == 200, ok, "subscribe {channel}: {answer}");
    }
    let body = unsub("public.match-42");
    let request = Request {
        body: Some(&body),
        ..Request::default()
    };
    let answer = render_and_send("unsubscribe", &table, &e_id, at, &request).await;
    assert_eq!(answer["status"], 200, "{answer}");

    // The items that landed, attribute by attribute.
    let base = |id: &str, rest: &[(&str, &str)]| expected(id, "#conn", at, rest);
    let member = |id: &str, channel: &str| {
        expected(id, &format!("ch#{channel}"), at, &[("channel", channel)])
    };
    let want: BTreeMap<&str, BTreeMap<String, Item>> = [
        (
            a_id.as_str(),
            vec![base(
                &a_id,
                &[("userId", quote_user), ("channel", "public.lobby")],
            )],
        ),
        (
            b_id.as_str(),
            vec![
                base(&b_id, &[]),
                member(&b_id, "public.match-42"),
                member(&b_id, odd_channel),
            ],
        ),
        (
            c_id.as_str(),
            vec![
                base(&c_id, &[("userId", "alice")]),
                member(&c_id, "user.alice.inbox"),
            ],
        ),
        (d_id.as_str(), vec![base(&d_id, &[])]),
        (e_id.as_str(), vec![base(&e_id, &[])]),
    ]
    .into_iter()
    .map(|(id, items)| {
        let by_sk = items
            .into_iter()
            .map(|item| (item["sk"].as_s().expect("sk").clone(), item))
            .collect();
        (id, by_sk)
    })
    .collect();
    for (id, items) in &want {
        assert_eq!(
            &rows_of(&dynamo, &table, id).await,
            items,
            "the rows of {id}"
        );
    }

    let worker = Worker::new("ws-rendered").await;
    let jobs = [
        r#"{"id":"everyone","data":"to everyone"}"#.to_owned(),
        r#"{"id":"match","data":"to match-42","channel":"public.match-42"}"#.to_owned(),
        serde_json::json!({"id": "odd", "data": "to the odd channel", "channel": odd_channel}).to_string(),
        r#"{"id":"lobby","data":"to the lobby","channel":"public.lobby"}"#.to_owned(),
        r#"{"id":"two","data":"to two channels","channels":["public.match-42","user.alice.inbox"]}"#.to_owned(),
        serde_json::json!({"id": "quote-user", "data": "to o'brien", "to": {"user": quote_user}}).to_string(),
        r#"{"id":"alice","data":"to alice","to":{"user":"alice"}}"#.to_owned(),
        r#"{"id":"bob","data":"to bob's inbox","channel":"user.bob.inbox"}"#.to_owned(),
    ];
    for job in &jobs {
        worker.send(job).await;
    }
    // Pages of two rows: a connection's rows straddle pages.
    let run = worker
        .run(&table, &gateway, &[("FANOUT_PAGE_SIZE", "2")])
        .await;

    let quiet = Duration::from_millis(500);
    let mut got = BTreeMap::new();
    for (id, socket) in [
        (&a_id, &mut a),
        (&b_id, &mut b),
        (&c_id, &mut c),
        (&d_id, &mut d),
        (&e_id, &mut e),
    ] {
        let mut frames = frames(socket, quiet).await;
        frames.sort();
        got.insert(id.as_str(), frames);
    }
    let sorted = |v: &[&str]| {
        let mut v: Vec<String> = v.iter().map(|s| (*s).to_owned()).collect();
        v.sort();
        v
    };
    let expect: BTreeMap<&str, Vec<String>> = [
        (
            a_id.as_str(),
            sorted(&["to everyone", "to the lobby", "to o'brien"]),
        ),
        (
            b_id.as_str(),
            sorted(&[
                "to everyone",
                "to match-42",
                "to the odd channel",
                "to two channels",
            ]),
        ),
        (
            c_id.as_str(),
            sorted(&["to everyone", "to two channels", "to alice"]),
        ),
        (d_id.as_str(), sorted(&["to everyone"])),
        (e_id.as_str(), sorted(&["to everyone"])),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        got, expect,
        "each connection, each of its messages once:\n{}",
        run.stdout
    );
    assert_eq!(run.report("everyone")["delivered"], 5, "{}", run.stdout);
    // Nothing was removed: every connection answered.
    for (id, items) in &want {
        assert_eq!(
            &rows_of(&dynamo, &table, id).await,
            items,
            "the rows of {id} after"
        );
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn the_local_gateway_writes_the_rows_the_templates_write() {
    support::require_emulators();
    let dynamo = support::dynamodb().await;
    let gateway_table = support::unique("ws-gw");
    let rendered_table = stack_table(&dynamo, "ws-rendered").await;
    let gateway = TestGateway::start(|args: &mut GatewayArgs| {
        args.table = gateway_table.clone();
        args.create_table = true;
        args.layout = Layout::Memberships;
    })
    .await;
    let user = "o'brien \"ö\" \\ 🙂";
    let prefix = "user.ob.";
    let odd = "public.it's \"q\" \\ é 🙂 \n";
    let query = format!(
        "channel={}&user={}&channelPrefix={}",
        encode("public.lobby"),
        encode(user),
        encode(prefix)
    );
    let (mut socket, id) = connect(&gateway, &query).await;
    let messages = [
        serde_json::json!({"action": "subscribe", "channel": "public.a"}),
        serde_json::json!({"action": "subscribe", "channel": odd}),
        serde_json::json!({"action": "subscribe", "channel": "user.ob.inbox"}),
        serde_json::json!({"action": "subscribe", "channel": "admin"}),
        serde_json::json!({"action": "subscribe", "channel": 42}),
        serde_json::json!({"action": "subscribe", "channel": "public.b"}),
        serde_json::json!({"action": "unsubscribe", "channel": "public.b"}),
    ];
    for message in &messages {
        socket
            .send(Message::text(message.to_string()))
            .await
            .expect("send");
    }
    // The gateway handles a socket's frames in order: once public.b has
    // come and gone, every row is written.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut saw_b = false;
    let gateway_rows = loop {
        let rows = rows_of(&dynamo, &gateway_table, &id).await;
        saw_b |= rows.contains_key("ch#public.b");
        if rows.len() == 4
            && !rows.contains_key("ch#public.b")
            && (saw_b || Instant::now() > deadline)
        {
            break rows;
        }
        assert!(Instant::now() < deadline, "the gateway's rows: {rows:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let connected_at: u64 = gateway_rows["#conn"]["connectedAt"]
        .as_n()
        .expect("a number")
        .parse()
        .expect("epoch ms");

    // The same requests through the templates, with the gateway's id and
    // start and its stand-in authorizer's values.
    let connect_request = Request {
        channel_query: Some("public.lobby"),
        principal: Some(user),
        channel_prefix: Some(prefix),
        ..Request::default()
    };
    render_and_send(
        "connect",
        &rendered_table,
        &id,
        connected_at,
        &connect_request,
    )
    .await;
    for message in &messages {
        let body = message.to_string();
        let route = message["action"].as_str().expect("an action");
        let request = Request {
            body: Some(&body),
            channel_prefix: Some(prefix),
            ..Request::default()
        };
        render_and_send(route, &rendered_table, &id, connected_at, &request).await;
    }
    let rendered_rows = rows_of(&dynamo, &rendered_table, &id).await;
    assert_eq!(
        gateway_rows.keys().collect::<Vec<_>>(),
        [
            "#conn",
            "ch#public.a",
            &format!("ch#{odd}"),
            "ch#user.ob.inbox"
        ],
        "the rows the rule opens"
    );
    assert_eq!(
        gateway_rows, rendered_rows,
        "same attributes, types and values"
    );

    // $disconnect: the base row goes, the memberships stay, in both.
    socket.close(None).await.expect("close");
    local_support::eventually("the gateway's $disconnect", || async {
        !rows_of(&dynamo, &gateway_table, &id)
            .await
            .contains_key("#conn")
    })
    .await;
    render_and_send(
        "disconnect",
        &rendered_table,
        &id,
        connected_at,
        &Request::default(),
    )
    .await;
    let gateway_rows = rows_of(&dynamo, &gateway_table, &id).await;
    assert_eq!(gateway_rows.len(), 3, "{gateway_rows:?}");
    assert_eq!(gateway_rows, rows_of(&dynamo, &rendered_table, &id).await);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_broadcast_while_clients_connect_reaches_each_connected_client_and_removes_none_of_their_rows()
 {
    support::require_emulators();
    let dynamo = support::dynamodb().await;
    let table = support::unique("ws-race");
    // Rows are written this long before their connection takes posts (410
    // until then), as API Gateway's $connect integration runs before the
    // connection is established.
    let delay = Duration::from_secs(3);
    let gateway = TestGateway::start(|args: &mut GatewayArgs| {
        args.table = table.clone();
        args.create_table = true;
        args.layout = Layout::Memberships;
        args.connect_delay_ms = delay.as_millis() as u64;
    })
    .await;
    let worker = Worker::new("ws-race").await;

    // Connected before the broadcast (each connect takes the delay).
    let early: Vec<_> =
        futures::future::join_all((0..10).map(|_| connect(&gateway, "channel=public.race"))).await;
    // Clients start connecting, the jobs come, the worker starts: their
    // rows are read while their connections still answer 410.
    let connecting = tokio::spawn({
        let url = format!("{}?channel=public.race", gateway.ws_url());
        async move { futures::future::join_all((0..10).map(|_| local_support::connect_url(&url))).await }
    });
    // Their rows are in the table before the jobs are sent.
    local_support::eventually("the connecting clients' rows", || async {
        let out = dynamo.scan().table_name(&table).send().await.expect("scan");
        out.count() >= 20
    })
    .await;
    worker
        .send(r#"{"id":"everyone","data":"to everyone"}"#)
        .await;
    worker
        .send(r#"{"id":"race","data":"to the race","channel":"public.race"}"#)
        .await;
    let child = worker
        .command(&table, &gateway, &[("FANOUT_CONNECT_WINDOW", "8s")])
        .spawn()
        .expect("start fanout run");
    let late = connecting.await.expect("clients connect");
    let run = finish(child, Duration::from_secs(90)).await;
    assert!(run.status.success(), "{}", run.stdout);

    let stats = gateway.stats().await;
    assert!(
        stats.gone > 0,
        "posts met connections still connecting: {stats:?}\n{}",
        run.stdout
    );
    let mut all = early;
    all.extend(late);
    let mut ids = Vec::new();
    for (socket, id) in &mut all {
        let mut got = frames(socket, Duration::from_millis(500)).await;
        got.sort();
        assert_eq!(
            got,
            ["to everyone", "to the race"],
            "{id}: {stats:?}\n{}",
            run.stdout
        );
        ids.push(id.clone());
    }
    for id in &ids {
        let rows = rows_of(&dynamo, &table, id).await;
        assert!(
            rows.contains_key("#conn"),
            "{id} keeps its row: {rows:?}\n{}",
            run.stdout
        );
    }
    let everyone = run.report("everyone");
    assert_eq!(everyone["removed"], 0, "{everyone}");
    assert!(
        everyone["rechecking"].as_u64().unwrap_or(0) > 0,
        "{everyone}"
    );
    gateway.shutdown().await;
}
