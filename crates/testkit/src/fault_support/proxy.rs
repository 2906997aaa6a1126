//! A fault-injecting HTTP proxy in front of one peer (the SQS or DynamoDB
//! emulator, or the local API Gateway): it forwards every request to its
//! upstream except those its [`Faults`] pick, which it answers with an error,
//! answers in part, delays, or drops without an answer. The operation comes
//! from the `X-Amz-Target` header (DynamoDB and SQS's JSON protocol) or, for
//! the gateway, from the method and path.
//!
//! It is served with hyper's connection API rather than `axum::serve`: a
//! dropped connection must close the socket *without any answer*, which
//! hyper does when the service returns an error, while an axum handler must
//! always answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, HOST, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Which faults a proxy injects, as shares in percent (0–100) of the
/// requests each applies to. Decisions are random, as real faults are: the
/// SDK's own retries then sometimes run out and the worker's retries are
/// exercised as well.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// DynamoDB Scan, Query and BatchWriteItem answered 400
    /// `ProvisionedThroughputExceededException`, not forwarded.
    pub ddb_throttle: u8,
    /// Share of the delete/put requests of each forwarded BatchWriteItem held
    /// back and answered as `UnprocessedItems`.
    pub ddb_unprocessed: u8,
    /// SQS ReceiveMessage, DeleteMessageBatch and ChangeMessageVisibility
    /// answered 500 `InternalError`, not forwarded.
    pub sqs_error: u8,
    /// The same SQS operations dropped without an answer, not forwarded.
    pub sqs_drop: u8,
    /// Every SQS request (any operation) held without an answer until the
    /// proxy stops: a peer that hangs, bounded only by the caller's timeouts.
    pub sqs_stall: bool,
    /// ReceiveMessage forwarded, then its answer dropped: the messages it
    /// took stay hidden for their visibility timeout, then come back.
    /// Spread evenly (exactly this share of each 100 receives that got past
    /// the other faults): there are few receives, and chance alone would
    /// often inject none.
    pub sqs_receive_lost: u8,
    /// Gateway POSTs whose connection is closed without an answer: half
    /// before forwarding (not delivered), half after (delivered, answer
    /// lost: the sender cannot tell, and a retry is a duplicate).
    pub post_drop: u8,
    /// Gateway POSTs forwarded, then answered only after `spike` (the
    /// delivery happened; a sender that timed out retries: a duplicate).
    pub post_spike: u8,
    pub spike: Duration,
    /// Every gateway POST answered 403 `ForbiddenException`.
    pub post_forbidden: bool,
    /// DynamoDB GetItem and PutItem answered 400
    /// `ProvisionedThroughputExceededException`: a throttled checkpoint
    /// table (the connections table is read with Scan and Query).
    pub ddb_throttle_items: bool,
    /// Every ChangeMessageVisibility answered 500 `InternalError`: a
    /// heartbeat that cannot keep its message hidden.
    pub sqs_block_visibility: bool,
    /// Seconds added to the `Date` header of every forwarded answer: an
    /// upstream whose clock (or this worker's) is off.
    pub date_offset_secs: i64,
}

/// The proxy's counters, each named once: `Counters`, the atomics the
/// proxy bumps; `Injected`, what they held when read; and the sum of
/// several proxies' `Injected`.
macro_rules! injected_counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// What a proxy injected so far.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Injected {
            $($(#[$doc])* pub $name: u64,)*
        }

        #[derive(Debug, Default)]
        struct Counters {
            $($name: AtomicU64,)*
            /// Receives seen by the `sqs_receive_lost` rule.
            receive_tickets: AtomicU64,
        }

        impl Counters {
            fn read(&self) -> Injected {
                Injected {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        impl std::ops::AddAssign for Injected {
            fn add_assign(&mut self, other: Self) {
                $(self.$name += other.$name;)*
            }
        }
    };
}

injected_counters! {
    forwarded,
    ddb_throttled,
    /// BatchWriteItem calls answered in part, and the items held back.
    ddb_partial_batches,
    ddb_unprocessed_items,
    sqs_errors,
    sqs_dropped,
    /// SQS requests held unanswered.
    sqs_stalled,
    /// ReceiveMessage answers lost after SQS handed messages out.
    sqs_receives_lost,
    /// Gateway POSTs dropped before reaching the gateway.
    posts_dropped_unsent,
    /// Gateway POSTs delivered whose answer was dropped.
    posts_dropped_delivered,
    posts_spiked,
    posts_forbidden,
}

impl Injected {
    /// Every fault injected, whatever its kind.
    pub fn total(&self) -> u64 {
        self.ddb_throttled
            + self.ddb_partial_batches
            + self.sqs_errors
            + self.sqs_dropped
            + self.sqs_stalled
            + self.sqs_receives_lost
            + self.posts_dropped_unsent
            + self.posts_dropped_delivered
            + self.posts_spiked
            + self.posts_forbidden
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The error a service returns to make hyper close the connection unanswered.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by fault injection")
    }
}

impl std::error::Error for Dropped {}

type Answer = Result<Response<Full<Bytes>>, Dropped>;

struct Shared {
    upstream: hyper::Uri,
    /// Changed while the proxy runs by [`FaultProxy::set_faults`].
    faults: std::sync::RwLock<Faults>,
    counters: Counters,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A running proxy; it stops when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream`
    /// (`http://host:port`, any path is ignored).
    pub async fn start(upstream: &str, faults: Faults) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let upstream: hyper::Uri = upstream.parse().expect("upstream URL");
        let shared = Arc::new(Shared {
            upstream,
            faults: std::sync::RwLock::new(faults),
            counters: Counters::default(),
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(5))
                .build_http(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        Self { addr, shared, stop }
    }

    /// Injects `faults` from now on (requests already held stay held).
    pub fn set_faults(&self, faults: Faults) {
        *self
            .shared
            .faults
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = faults;
    }

    /// The proxy's base URL, for `AWS_ENDPOINT_URL_*`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn injected(&self) -> Injected {
        self.shared.counters.read()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors or similar: the peer retries.
                Err(_) => continue,
            },
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let shared = shared.clone();
                async move { handle(&shared, request).await }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                () = stop.cancelled() => {}
                // An error here is the injected drop, or the peer hanging up.
                _ = connection => {}
            }
        });
    }
}

/// Whether a fault with this share (percent) hits this request.
fn hits(percent: u8) -> bool {
    percent > 0 && rand::random_range(0..100u8) < percent
}

/// True for exactly `percent` of every 100 consecutive tickets, spread out.
fn spread(ticket: u64, percent: u8) -> bool {
    let p = u64::from(percent);
    (ticket + 1) * p / 100 > ticket * p / 100
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Answer {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return Err(Dropped),
    };
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let operation = target.rsplit('.').next().unwrap_or_default();
    let faults = shared
        .faults
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let faults = &faults;
    let counters = &shared.counters;
    if faults.sqs_stall && target.starts_with("AmazonSQS.") {
        bump(&counters.sqs_stalled);
        // Held until the connection is dropped: by the caller's timeout or
        // when the proxy stops.
        return std::future::pending().await;
    }
    let is_post =
        parts.method == hyper::Method::POST && parts.uri.path().contains("/@connections/");

    match operation {
        "Scan" | "Query" | "BatchWriteItem" if hits(faults.ddb_throttle) => {
            bump(&counters.ddb_throttled);
            return Ok(json_answer(
                StatusCode::BAD_REQUEST,
                None,
                r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"Injected: the level of configured provisioned throughput for the table was exceeded"}"#,
            ));
        }
        "GetItem" | "PutItem" if faults.ddb_throttle_items => {
            bump(&counters.ddb_throttled);
            return Ok(json_answer(
                StatusCode::BAD_REQUEST,
                None,
                r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"Injected: the level of configured provisioned throughput for the table was exceeded"}"#,
            ));
        }
        "ReceiveMessage" | "DeleteMessageBatch" | "ChangeMessageVisibility" => {
            if operation == "ChangeMessageVisibility" && faults.sqs_block_visibility {
                bump(&counters.sqs_errors);
                return Ok(json_answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    None,
                    r#"{"__type":"com.amazonaws.sqs#InternalError","message":"Injected: visibility changes fail"}"#,
                ));
            }
            if hits(faults.sqs_drop) {
                bump(&counters.sqs_dropped);
                return Err(Dropped);
            }
            if hits(faults.sqs_error) {
                bump(&counters.sqs_errors);
                return Ok(json_answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    None,
                    r#"{"__type":"com.amazonaws.sqs#InternalError","message":"Injected: we encountered an internal error, please try again"}"#,
                ));
            }
        }
        _ => {}
    }
    match operation {
        "ReceiveMessage"
            if spread(
                counters.receive_tickets.fetch_add(1, Ordering::Relaxed),
                faults.sqs_receive_lost,
            ) =>
        {
            let _ = forward(shared, parts, body).await;
            bump(&counters.sqs_receives_lost);
            return Err(Dropped);
        }
        "BatchWriteItem" if faults.ddb_unprocessed > 0 => {
            return partial_batch(shared, faults.ddb_unprocessed, parts, &body).await;
        }
        _ => {}
    }
    if is_post && faults.post_forbidden {
        bump(&counters.posts_forbidden);
        return Ok(json_answer(
            StatusCode::FORBIDDEN,
            Some("ForbiddenException"),
            r#"{"message":"Forbidden (injected)"}"#,
        ));
    }
    if is_post && hits(faults.post_drop) {
        if rand::random::<bool>() {
            bump(&counters.posts_dropped_unsent);
            return Err(Dropped);
        }
        // Delivered, then the answer is lost.
        let _ = forward(shared, parts, body).await;
        bump(&counters.posts_dropped_delivered);
        return Err(Dropped);
    }
    let spike = is_post && hits(faults.post_spike);
    let answer = forward(shared, parts, body).await;
    if spike {
        bump(&counters.posts_spiked);
        tokio::time::sleep(faults.spike).await;
    }
    answer
}

/// BatchWriteItem answered in part: a share of the items is held back and
/// returned as `UnprocessedItems`, the rest is forwarded.
async fn partial_batch(
    shared: &Shared,
    unprocessed: u8,
    parts: hyper::http::request::Parts,
    body: &Bytes,
) -> Answer {
    let Ok(mut request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return forward(shared, parts, body.clone()).await;
    };
    let mut held = serde_json::Map::new();
    let mut held_count = 0u64;
    if let Some(tables) = request["RequestItems"].as_object_mut() {
        for (table, writes) in tables.iter_mut() {
            let Some(list) = writes.as_array_mut() else {
                continue;
            };
            let (keep, hold): (Vec<_>, Vec<_>) = std::mem::take(list)
                .into_iter()
                .partition(|_| !hits(unprocessed));
            *list = keep;
            if !hold.is_empty() {
                held_count += hold.len() as u64;
                held.insert(table.clone(), serde_json::Value::Array(hold));
            }
        }
        tables.retain(|_, writes| writes.as_array().is_some_and(|l| !l.is_empty()));
    }
    if held_count == 0 {
        return forward(shared, parts, body.clone()).await;
    }
    bump(&shared.counters.ddb_partial_batches);
    shared
        .counters
        .ddb_unprocessed_items
        .fetch_add(held_count, Ordering::Relaxed);
    let forwarded_any = request["RequestItems"]
        .as_object()
        .is_some_and(|t| !t.is_empty());
    if !forwarded_any {
        let answer = serde_json::json!({ "UnprocessedItems": held }).to_string();
        return Ok(json_answer(StatusCode::OK, None, &answer));
    }
    let new_body = Bytes::from(request.to_string());
    let response = forward(shared, parts, new_body).await?;
    if response.status() != StatusCode::OK {
        return Ok(response);
    }
    let (mut parts, upstream_body) = response.into_parts();
    let upstream_body = upstream_body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut answer: serde_json::Value =
        serde_json::from_slice(&upstream_body).unwrap_or_else(|_| serde_json::json!({}));
    let unprocessed = answer["UnprocessedItems"]
        .as_object_mut()
        .map(std::mem::take)
        .unwrap_or_default();
    let mut merged = unprocessed;
    for (table, hold) in held {
        let entry = merged
            .entry(table)
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let (Some(list), serde_json::Value::Array(hold)) = (entry.as_array_mut(), hold) {
            list.extend(hold);
        }
    }
    answer["UnprocessedItems"] = serde_json::Value::Object(merged);
    let body = Bytes::from(answer.to_string());
    // The SDK checks DynamoDB answers against x-amz-crc32: the body changed.
    parts.headers.remove("x-amz-crc32");
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    Ok(Response::from_parts(parts, Full::new(body)))
}

/// Sends the request on to the upstream and returns its answer; a failure
/// to reach the upstream is passed on as a dropped connection.
async fn forward(shared: &Shared, mut parts: hyper::http::request::Parts, body: Bytes) -> Answer {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    let mut uri = hyper::http::uri::Parts::from(shared.upstream.clone());
    uri.path_and_query = Some(path.parse().map_err(|_| Dropped)?);
    parts.uri = hyper::Uri::from_parts(uri).map_err(|_| Dropped)?;
    // The client sets Host from the URI; the signature is not checked by the
    // emulators or the local gateway.
    parts.headers.remove(HOST);
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    let request = Request::from_parts(parts, Full::new(body));
    let response = shared.client.request(request).await.map_err(|_| Dropped)?;
    bump(&shared.counters.forwarded);
    let (mut parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|_| Dropped)?.to_bytes();
    let offset = shared
        .faults
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .date_offset_secs;
    if offset != 0 {
        use aws_sdk_dynamodb::primitives::{DateTime, DateTimeFormat};
        let now = DateTime::from(std::time::SystemTime::now());
        let shifted = DateTime::from_secs(now.secs() + offset);
        if let Ok(text) = shifted.fmt(DateTimeFormat::HttpDate)
            && let Ok(value) = HeaderValue::from_str(&text)
        {
            parts.headers.insert(hyper::header::DATE, value);
        }
    }
    Ok(Response::from_parts(parts, Full::new(body)))
}

fn json_answer(status: StatusCode, error_type: Option<&str>, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.0")
        .header(CONTENT_LENGTH, body.len());
    if let Some(kind) = error_type {
        response = response.header("x-amzn-errortype", kind);
    }
    response
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("a valid response")
}
