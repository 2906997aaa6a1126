//! Helpers for the local gateway and clients tests: an in-process gateway on
//! a free port over a fresh table in the DynamoDB emulator, the SDK's own
//! management client pointed at it, and a raw WebSocket client.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB` (dynalite): `./scripts/test.sh` sets it.
//! A test binary that uses it also declares `mod support;`.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use crate::support::TableKey;
use aws_sdk_dynamodb::types::AttributeValue;
use fanout_dev::gateway::faults::StatsSnapshot;
use fanout_dev::gateway::seqs::SeqSnapshot;
use fanout_dev::gateway::{GatewayArgs, serve};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The user agent test sockets send, checked in `get_connection`.
pub const USER_AGENT: &str = "fanout-tests/1";

/// The SDK's management client for a gateway, built as the worker builds
/// its own (retries off: the tests count every answer).
pub async fn apigw(endpoint: &str) -> aws_sdk_apigatewaymanagement::Client {
    let config = crate::support::sdk_config().await;
    fanout_aws::clients::apigw_client(&config, endpoint, Duration::from_secs(10))
        .expect("a gateway endpoint with a stage")
}

/// A gateway running in this process until dropped.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub stage: String,
    pub table: String,
    pub dynamo: aws_sdk_dynamodb::Client,
    pub apigw: aws_sdk_apigatewaymanagement::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestGateway {
    /// Starts a gateway whose `$connect` rows go to `table` (the worker's
    /// table in a pipeline test); `configure` adjusts the rest.
    pub async fn on_table(table: &str, configure: impl FnOnce(&mut GatewayArgs)) -> Self {
        let table = table.to_owned();
        Self::start(move |args| {
            args.table = table;
            configure(args);
        })
        .await
    }

    /// Starts a gateway; `configure` adjusts the defaults (no faults, rows
    /// removed on disconnect, a fresh table keyed by `connectionId`).
    pub async fn start(configure: impl FnOnce(&mut GatewayArgs)) -> Self {
        let dynamo = crate::support::dynamodb().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("bound address");
        let mut args = GatewayArgs {
            listen: addr,
            stage: "test".into(),
            table: String::new(),
            keep_stale: false,
            create_table: false,
            sink: false,
            throttle_rps: None,
            fail_percent: 0,
            latency_ms: 0,
            layout: Default::default(),
            public_channel_prefix: "public.".into(),
            connect_delay_ms: 0,
        };
        configure(&mut args);
        // A fresh table unless the test brought its own.
        if args.table.is_empty() {
            args.table =
                crate::support::create_table(&dynamo, "local-gw", TableKey::Id, false).await;
        }
        let table = args.table.clone();
        let stage = args.stage.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let server_dynamo = dynamo.clone();
        let task = tokio::spawn(async move {
            serve(args, server_dynamo, listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("gateway serves");
        });
        Self {
            addr,
            apigw: apigw(&format!("http://{addr}/{stage}")).await,
            stage,
            table,
            dynamo,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/{}", self.addr, self.stage)
    }

    /// Opens a raw WebSocket client (optionally in a channel) and learns
    /// its id.
    pub async fn connect(&self, channel: Option<&str>) -> (Socket, String) {
        connect_url(&fanout_dev::clients::swarm::with_channel(
            &self.ws_url(),
            channel,
        ))
        .await
    }

    /// `count` WebSocket clients of this gateway, in no channel.
    pub async fn swarm(&self, count: usize) -> fanout_dev::clients::Swarm {
        fanout_dev::clients::Swarm::connect(&self.ws_url(), count, None, 32)
            .await
            .expect("open WebSocket clients")
    }

    /// Posts `data` to `id`, which must be accepted.
    pub async fn post(&self, id: &str, data: impl Into<Vec<u8>>) {
        self.send(id, data.into())
            .await
            .unwrap_or_else(|e| panic!("post to {id}: {e:?}"));
    }

    /// Whether a post to `id` is answered 410 GoneException.
    pub async fn answers_gone(&self, id: &str) -> bool {
        let sent = self.send(id, b"x".to_vec()).await;
        sent.is_err_and(|e| e.into_service_error().is_gone_exception())
    }

    /// One `PostToConnection` through the SDK's own client.
    async fn send(
        &self,
        id: &str,
        data: Vec<u8>,
    ) -> Result<
        aws_sdk_apigatewaymanagement::operation::post_to_connection::PostToConnectionOutput,
        aws_sdk_apigatewaymanagement::error::SdkError<
            aws_sdk_apigatewaymanagement::operation::post_to_connection::PostToConnectionError,
        >,
    > {
        self.apigw
            .post_to_connection()
            .connection_id(id)
            .data(aws_sdk_apigatewaymanagement::primitives::Blob::new(data))
            .send()
            .await
    }

    /// The table's row for `id`, if any.
    pub async fn row(&self, id: &str) -> Option<std::collections::HashMap<String, AttributeValue>> {
        self.dynamo
            .get_item()
            .table_name(&self.table)
            .key("connectionId", AttributeValue::S(id.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .expect("get_item")
            .item
    }

    /// `GET /{stage}/@stats`.
    pub async fn stats(&self) -> StatsSnapshot {
        let (status, _, body) = raw_http(
            self.addr,
            "GET",
            &format!("/{}/@stats", self.stage),
            &[],
            b"",
        )
        .await;
        assert_eq!(status, 200, "stats answer: {body}");
        serde_json::from_str(&body).expect("stats JSON")
    }

    /// `GET /{stage}/@stats/seqs`: a sink's per-id record of versioned
    /// payloads.
    pub async fn seqs(&self) -> SeqSnapshot {
        let (status, _, body) = raw_http(
            self.addr,
            "GET",
            &format!("/{}/@stats/seqs", self.stage),
            &[],
            b"",
        )
        .await;
        assert_eq!(status, 200, "seqs answer: {body}");
        serde_json::from_str(&body).expect("seqs JSON")
    }

    /// Stops the gateway and waits until it has closed every socket.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("gateway task");
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The next data or close frame, within 5 s.
pub async fn next_frame(socket: &mut Socket) -> Message {
    next_frame_within(socket, Duration::from_secs(5)).await
}

/// The next data or close frame, within `limit`.
pub async fn next_frame_within(socket: &mut Socket, limit: Duration) -> Message {
    loop {
        let frame = tokio::time::timeout(limit, socket.next())
            .await
            .unwrap_or_else(|_| panic!("a frame within {limit:?}"))
            .expect("socket still open")
            .expect("frame");
        if !matches!(frame, Message::Ping(_) | Message::Pong(_)) {
            return frame;
        }
    }
}

/// Polls `check` until it holds, for up to 5 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One HTTP/1.1 request over a fresh TCP connection, without any signing:
/// (status, lower-cased headers, body).
pub async fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write body");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// A WebSocket client of the local gateway at `url` (the stage URL, with
/// any query string), its connection id learned with `whoami`.
pub async fn connect_url(url: &str) -> (Socket, String) {
    let mut request = url.into_client_request().expect("ws request");
    request
        .headers_mut()
        .insert("user-agent", USER_AGENT.parse().expect("header value"));
    let (mut socket, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(connected) => connected,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => panic!(
            "WebSocket connect refused: {} {}",
            response.status(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
        ),
        Err(other) => panic!("WebSocket connect: {other}"),
    };
    socket
        .send(Message::text(r#"{"action":"whoami"}"#))
        .await
        .expect("send whoami");
    let answer = next_frame(&mut socket).await;
    let Message::Text(answer) = answer else {
        panic!("whoami answer should be text, got {answer:?}")
    };
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("whoami JSON");
    let id = answer["connectionId"]
        .as_str()
        .expect("connectionId")
        .to_owned();
    (socket, id)
}
