//! The lean path's keep-alive connections: HTTP/1.1 connections made with
//! hyper's connection-level client, each driven by the send that holds it.
//!
//! hyper-util's pooled client spawns a task per connection and hands every
//! request to it through channels: two tasks and a cross-task wake-up per
//! send, and futures big enough that moving them showed in profiles. Here a
//! send checks a connection out, polls the request and the connection
//! together in its own task, and checks it back in once the answer is read.
//! The sends in flight are bounded by the send budget, so the connections
//! open are too: at most one per send in flight, plus idle ones up to the
//! same bound.
//!
//! A send that finds no idle connection starts connecting, and takes
//! whichever comes first: its new connection, or one another send checks
//! back in (as hyper-util's pooled client does). A server that accepts
//! slowly (a small listen backlog, a TLS handshake in its accept loop) then
//! delays only the connections being added, not every send that arrives
//! while they are: the connect goes on in the background, and its connection
//! joins the idle ones.
//!
//! A kept connection whose driver has finished is dropped at checkout. One
//! the other side closed since its last use, the close not yet read, is
//! taken: the exchange's first poll reads the close before anything is
//! written and hands the request back unsent, as it does when the other
//! side closes while the request is being written, and the send is tried
//! again on another connection, as hyper-util's client does. Polling every
//! connection at checkout to find such closes earlier cost about a
//! thousand instructions a send, for what the exchange finds anyway.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Context;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::Notify;
use tower_service::Service;

use super::error_chain;
use super::flatten::Flattened;
use crate::clients::CONNECT_TIMEOUT;

type Body = Full<Bytes>;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connecting to the endpoint failed: {0}")]
    Connect(String),
    #[error("the HTTP exchange failed: {0}")]
    Http(String),
}

/// An answer, its body read (up to the limit given to [`Pool::send`]).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Keep-alive connections to one origin.
#[derive(Debug)]
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// What the connector connects to: `scheme://host[:port]`.
    origin: Uri,
    /// Shared with the connects that finish in the background.
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Most recently used last: sends take the warmest connection, and the
    /// coldest age out at the front.
    idle: Mutex<VecDeque<Idle>>,
    /// A connection was checked in: a send waiting for one may take it.
    checked_in: Notify,
    /// Connections in use by a send now: while some are, a send whose own
    /// connect failed can still be served by one of them.
    in_use: AtomicUsize,
    /// Connects in flight, up to [`MAX_CONNECTING`].
    connecting: AtomicUsize,
    /// Header maps of answers read, emptied, for the next requests: hyper
    /// parses an answer's headers into the map its request was sent with,
    /// so a map handed back serves request after request without
    /// allocating. At most `max_idle` are kept.
    spare_headers: Mutex<Vec<HeaderMap>>,
    max_idle: usize,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    connection: Connection,
    since: Instant,
}

/// One HTTP/1.1 connection: the handle requests go through, and the state
/// machine that reads and writes the socket, polled by whoever sends.
struct Connection {
    sender: http1::SendRequest<Body>,
    /// `None` once it has finished: the connection is closed. Dropping it
    /// is what tells `sender` (a finished driver still holds the request
    /// queue, and a request waiting to go out would wait forever).
    driver: Option<Pin<Box<Driver>>>,
    /// Served a request before: the other side may have closed it since.
    reused: bool,
}

type Driver = http1::Connection<Flattened, Body>;

/// How many times a request that a fresh connection closed on before it was
/// written goes out on another fresh connection.
const FRESH_RETRIES: usize = 1;

/// Connects in flight at most: enough to add connections quickly (each
/// takes a round trip or two, and a TLS handshake), few enough for a
/// server's listen backlog.
const MAX_CONNECTING: usize = 8;

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("open", &self.driver.is_some())
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

/// Why an exchange did not produce an answer.
enum Failure {
    /// The connection closed before the request was written: it can go
    /// out on another connection without risk of a second delivery.
    NotSent(Box<Request<Body>>),
    Http(String),
}

impl Pool {
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        origin: Uri,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            connector,
            origin,
            shared: Arc::new(Shared {
                idle: Mutex::new(VecDeque::new()),
                checked_in: Notify::new(),
                in_use: AtomicUsize::new(0),
                connecting: AtomicUsize::new(0),
                spare_headers: Mutex::new(Vec::new()),
                max_idle: max_idle.max(1),
                idle_timeout,
            }),
        }
    }

    /// Sends `request` (its URI in origin form, its `host` header set) and
    /// reads the answer, the body up to `max_body` bytes.
    pub async fn send(
        &self,
        mut request: Request<Body>,
        max_body: usize,
    ) -> Result<Answer, PoolError> {
        let mut fresh_closed = 0;
        loop {
            let mut connection = match self.shared.checkout() {
                Some(connection) => connection,
                // Boxed: connecting is rare, and its future would make
                // every send's bigger.
                None => Box::pin(self.connection()).await?,
            };
            // Read before the exchange, which marks the connection used.
            let fresh = !connection.reused;
            let in_use = InUse::new(&self.shared);
            let exchanged = connection.exchange(request, max_body).await;
            drop(in_use);
            match exchanged {
                Ok(answer) => {
                    self.shared.checkin(connection);
                    return Ok(answer);
                }
                // A kept connection may have been closed while idle: the
                // idle ones are bounded, so this loop is too.
                Err(Failure::NotSent(unsent)) if !fresh => request = *unsent,
                // A fresh one closed at once may be a peer restarting; a
                // peer that keeps doing it must not turn one send into a
                // connect storm.
                Err(Failure::NotSent(unsent)) if fresh_closed < FRESH_RETRIES => {
                    fresh_closed += 1;
                    request = *unsent;
                }
                Err(Failure::NotSent(_)) => {
                    return Err(PoolError::Http(
                        "the endpoint closed new connections before the request was sent".into(),
                    ));
                }
                Err(Failure::Http(e)) => return Err(PoolError::Http(e)),
            }
        }
    }

    /// An empty header map for a request: one an answer handed back with
    /// [`Pool::recycle`], if any.
    pub fn header_map(&self) -> HeaderMap {
        self.shared
            .spare_headers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default()
    }

    /// Takes back an answer's header map, emptied, for a later request.
    pub fn recycle(&self, mut headers: HeaderMap) {
        headers.clear();
        let mut spare = self
            .shared
            .spare_headers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if spare.len() < self.shared.max_idle {
            spare.push(headers);
        }
    }

    /// Connections kept open for the next sends.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.shared.lock().len()
    }

    /// A connection for a send that found none idle: a new one, or one
    /// checked in meanwhile, whichever comes first. A connect that loses
    /// the race finishes in the background and its connection is kept.
    /// Connects in flight are capped: a burst of sends on a cold pool would
    /// otherwise open one each at once and overflow a small listen backlog,
    /// and a connection the server has not accepted yet holds its request
    /// for as long as TCP's retransmissions take.
    async fn connection(&self) -> Result<Connection, PoolError> {
        let shared = &self.shared;
        let mut connect = None;
        let mut connect_error = None;
        loop {
            let mut checked_in = pin!(shared.checked_in.notified());
            checked_in.as_mut().enable();
            if let Some(connection) = shared.checkout() {
                if let Some(connect) = connect.take() {
                    self.finish_in_background(connect);
                }
                return Ok(connection);
            }
            if connect.is_none()
                && connect_error.is_none()
                && let Some(slot) = Connecting::try_new(shared)
            {
                connect = Some(Box::pin(connect_in(
                    slot,
                    self.connector.clone(),
                    self.origin.clone(),
                )));
            }
            if connect.is_none()
                && !shared.busy()
                && let Some(e) = connect_error.take()
            {
                return Err(e);
            }
            tokio::select! {
                biased;
                connected = async { connect.as_mut().expect("guarded").await }, if connect.is_some() => {
                    connect = None;
                    match connected {
                        Ok(connection) => return Ok(connection),
                        // Connections in use or being made may come back:
                        // wait for one (the send's timeout bounds the wait).
                        Err(e) if shared.busy() => {
                            tracing::debug!(error = %e, "connecting failed; waiting for another connection");
                            connect_error = Some(e);
                        }
                        Err(e) => return Err(e),
                    }
                }
                () = &mut checked_in => {}
            }
        }
    }

    fn finish_in_background(
        &self,
        connect: Pin<Box<impl Future<Output = Result<Connection, PoolError>> + Send + 'static>>,
    ) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            match connect.await {
                Ok(connection) => shared.checkin(connection),
                Err(e) => tracing::debug!(error = %e, "a connect no send waited for failed"),
            }
        });
    }

    #[cfg(test)]
    async fn connect(&self) -> Result<Connection, PoolError> {
        connect(self.connector.clone(), self.origin.clone()).await
    }
}

/// One of the [`MAX_CONNECTING`] connects in flight, for as long as it lives.
struct Connecting(Arc<Shared>);

impl Connecting {
    fn try_new(shared: &Arc<Shared>) -> Option<Self> {
        shared
            .connecting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONNECTING).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(shared.clone()))
    }
}

impl Drop for Connecting {
    fn drop(&mut self) {
        self.0.connecting.fetch_sub(1, Ordering::AcqRel);
        // A send waiting for a slot may start its own connect now, or learn
        // that nothing is left to wait for.
        self.0.checked_in.notify_one();
    }
}

/// [`connect`], holding a connect slot until it ends.
async fn connect_in(
    slot: Connecting,
    connector: HttpsConnector<HttpConnector>,
    origin: Uri,
) -> Result<Connection, PoolError> {
    let connected = connect(connector, origin).await;
    drop(slot);
    connected
}

/// Counts a connection in use for as long as it lives (a send dropped by its
/// timeout included).
struct InUse<'a>(&'a Shared);

impl<'a> InUse<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.in_use.fetch_add(1, Ordering::AcqRel);
        Self(shared)
    }
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        // The last one: a send whose connect failed waits for no more, and
        // learns it here if the connection is not checked back in.
        if self.0.in_use.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.checked_in.notify_waiters();
        }
    }
}

impl Shared {
    /// Whether a connection may still come back or be made.
    fn busy(&self) -> bool {
        self.in_use.load(Ordering::Acquire) > 0 || self.connecting.load(Ordering::Acquire) > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The warmest idle connection still open, if any.
    fn checkout(&self) -> Option<Connection> {
        let mut idle = self.lock();
        while let Some(Idle { connection, since }) = idle.pop_back() {
            if since.elapsed() >= self.idle_timeout {
                // The warmest is too old, so are all the others.
                idle.clear();
                return None;
            }
            if connection.is_open() {
                return Some(connection);
            }
        }
        None
    }

    fn checkin(&self, connection: Connection) {
        if connection.driver.is_none() || connection.sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock();
        while idle.front().is_some_and(|oldest| {
            idle.len() >= self.max_idle || now.duration_since(oldest.since) >= self.idle_timeout
        }) {
            idle.pop_front();
        }
        idle.push_back(Idle {
            connection,
            since: now,
        });
        drop(idle);
        self.checked_in.notify_one();
    }
}

/// A new connection to `origin`: TCP, TLS and HTTP/1.1's start within
/// [`CONNECT_TIMEOUT`]. The send's own timeout bounds a connect it waits
/// for, but not one that goes on in the background after another
/// connection served it: without this bound, a peer that accepts and never
/// answers the TLS handshake would hold a connect slot for ever, and a few
/// such connects would leave the pool unable to connect at all.
async fn connect(
    connector: HttpsConnector<HttpConnector>,
    origin: Uri,
) -> Result<Connection, PoolError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connect_unbounded(connector, origin)).await {
        Ok(connected) => connected,
        Err(_) => Err(PoolError::Connect(format!(
            "timed out after {CONNECT_TIMEOUT:?} (TCP connect and TLS handshake)"
        ))),
    }
}

async fn connect_unbounded(
    mut connector: HttpsConnector<HttpConnector>,
    origin: Uri,
) -> Result<Connection, PoolError> {
    let connect_failed =
        |e: Box<dyn std::error::Error + Send + Sync>| PoolError::Connect(error_chain(e.as_ref()));
    poll_fn(|cx| connector.poll_ready(cx))
        .await
        .map_err(connect_failed)?;
    let stream = connector.call(origin).await.map_err(connect_failed)?;
    let (sender, driver) = http1::Builder::new()
        .handshake(Flattened::new(stream))
        .await
        .map_err(|e| PoolError::Connect(error_chain(&e)))?;
    Ok(Connection {
        sender,
        driver: Some(Box::pin(driver)),
        reused: false,
    })
}

impl Connection {
    /// Whether the connection may serve another request: its driver has
    /// not finished. A close that arrived while it was idle is read by the
    /// exchange (see the module's doc).
    fn is_open(&self) -> bool {
        self.driver.is_some() && !self.sender.is_closed()
    }

    /// One request and its answer, the driver polled alongside so that the
    /// socket is read and written from this task.
    async fn exchange(
        &mut self,
        request: Request<Body>,
        max_body: usize,
    ) -> Result<Answer, Failure> {
        let Self {
            sender,
            driver,
            reused,
        } = self;
        *reused = true;
        let call = async move {
            if poll_fn(|cx| sender.poll_ready(cx)).await.is_err() {
                // Closed before anything was written.
                return Err(Failure::NotSent(Box::new(request)));
            }
            let response = match sender.try_send_request(request).await {
                Ok(response) => response,
                Err(mut e) => {
                    return Err(match e.take_message() {
                        Some(request) => Failure::NotSent(Box::new(request)),
                        None => Failure::Http(error_chain(e.error())),
                    });
                }
            };
            let (parts, body) = response.into_parts();
            // The status already says what happened; a body cut short or
            // over the limit only leaves the connection unfit for reuse.
            let body = Limited::new(body, max_body).collect().await;
            let whole = body.is_ok();
            let answer = Answer {
                status: parts.status,
                headers: parts.headers,
                body: body.map(|b| b.to_bytes()).unwrap_or_default(),
            };
            Ok((answer, whole))
        };
        let mut call = pin!(call);
        let (answer, whole) = poll_fn(|cx| {
            poll_driver(driver, cx);
            call.as_mut().poll(cx)
        })
        .await?;
        if !whole {
            *driver = None;
        }
        Ok(answer)
    }
}

/// Polls the driver, dropping it once it has finished: whether it ended in
/// an error or not, a request in flight learns of it through its own
/// future.
fn poll_driver(driver: &mut Option<Pin<Box<Driver>>>, cx: &mut Context<'_>) {
    if let Some(running) = driver
        && running.as_mut().poll(cx).is_ready()
    {
        *driver = None;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// What the test endpoint saw.
    #[derive(Default)]
    struct Seen {
        connections: AtomicUsize,
        requests: AtomicUsize,
    }

    /// A local HTTP/1.1 endpoint answering 200 to every POST. After
    /// `per_connection` answers on a connection it closes it: silently, or
    /// announced with `connection: close` on the last answer.
    async fn endpoint(per_connection: usize, announce_close: bool) -> (Uri, Arc<Seen>) {
        let (listener, origin) = bind().await;
        let seen = Arc::new(Seen::default());
        let counts = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counts.connections.fetch_add(1, Ordering::SeqCst);
                let counts = counts.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for served in 1..=per_connection {
                        if !read_request(&mut socket, &mut buf).await {
                            return;
                        }
                        counts.requests.fetch_add(1, Ordering::SeqCst);
                        let last = served == per_connection;
                        let answer = if last && announce_close {
                            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        } else {
                            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
                        };
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (origin, seen)
    }

    /// A listener on a free local port, and its origin.
    async fn bind() -> (TcpListener, Uri) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        (listener, origin.parse().unwrap())
    }

    /// Reads one request (head and `content-length` body) off `socket`;
    /// false at the end of the stream.
    async fn read_request(socket: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + length {
                    buf.drain(..end + 4 + length);
                    return true;
                }
            }
            let mut chunk = [0u8; 4096];
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn pool(origin: Uri, max_idle: usize, idle_timeout: Duration) -> Pool {
        let connector = super::super::connector(false, None).unwrap();
        Pool::new(connector, origin, max_idle, idle_timeout)
    }

    fn post(origin: &Uri) -> Request<Body> {
        Request::post("/stage/@connections/a")
            .header(http::header::HOST, origin.authority().unwrap().as_str())
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap()
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn sends_one_after_another_share_one_connection() {
        let (origin, seen) = endpoint(usize::MAX, false).await;
        let pool = pool(origin.clone(), 8, MINUTE);
        for _ in 0..5 {
            let answer = pool.send(post(&origin), 1024).await.unwrap();
            assert_eq!(answer.status, StatusCode::OK);
        }
        assert_eq!(seen.requests.load(Ordering::SeqCst), 5);
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn an_answers_header_map_serves_the_next_request() {
        let (origin, _) = endpoint(usize::MAX, false).await;
        let pool = pool(origin.clone(), 1, MINUTE);
        let answer = pool.send(post(&origin), 1024).await.unwrap();
        let kept = answer.headers.capacity();
        assert!(kept > 0, "the answer's headers came in the request's map");
        pool.recycle(answer.headers);
        let headers = pool.header_map();
        assert!(headers.is_empty());
        assert_eq!(headers.capacity(), kept);
        // Beyond the bound, maps are dropped.
        pool.recycle(headers);
        pool.recycle(HeaderMap::with_capacity(4));
        assert_eq!(pool.shared.spare_headers.lock().unwrap().len(), 1);
        assert_eq!(pool.header_map().capacity(), kept);
        assert_eq!(pool.header_map().capacity(), 0);
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced_without_a_second_request() {
        for pause in [Duration::ZERO, Duration::from_millis(50)] {
            let (origin, seen) = endpoint(1, false).await;
            let pool = pool(origin.clone(), 8, MINUTE);
            for _ in 0..10 {
                let answer = pool.send(post(&origin), 1024).await;
                assert_eq!(answer.unwrap().status, StatusCode::OK, "after {pause:?}");
                tokio::time::sleep(pause).await;
            }
            // Each request reached the endpoint once, each on its own
            // connection, whether the close was seen at checkout or when the
            // request found the connection closed.
            assert_eq!(seen.requests.load(Ordering::SeqCst), 10, "after {pause:?}");
            assert_eq!(seen.connections.load(Ordering::SeqCst), 10);
        }
    }

    #[tokio::test]
    async fn a_request_on_a_kept_connection_closed_since_comes_back_unsent() {
        let (origin, seen) = endpoint(1, false).await;
        let pool = pool(origin.clone(), 8, MINUTE);
        let mut connection = pool.connect().await.unwrap();
        assert!(connection.exchange(post(&origin), 1024).await.is_ok());
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Skipping checkout's look: the request itself finds it closed.
        match connection.exchange(post(&origin), 1024).await {
            Err(Failure::NotSent(request)) => {
                assert_eq!(request.uri().path(), "/stage/@connections/a");
            }
            Err(Failure::Http(e)) => panic!("not handed back: {e}"),
            Ok(answer) => panic!("answered {}", answer.status),
        }
        assert_eq!(seen.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_announced_close_is_not_kept() {
        let (origin, seen) = endpoint(1, true).await;
        let pool = pool(origin.clone(), 8, MINUTE);
        for _ in 0..3 {
            pool.send(post(&origin), 1024).await.unwrap();
            assert_eq!(pool.idle(), 0);
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn idle_connections_are_bounded_and_age_out() {
        let (origin, seen) = endpoint(usize::MAX, false).await;
        let pool = Arc::new(pool(origin.clone(), 4, Duration::from_millis(200)));
        let sends = (0..16).map(|_| {
            let pool = pool.clone();
            let origin = origin.clone();
            tokio::spawn(async move { pool.send(post(&origin), 1024).await.map(|a| a.status) })
        });
        for send in futures::future::join_all(sends).await {
            assert_eq!(send.unwrap().unwrap(), StatusCode::OK);
        }
        assert!(pool.idle() <= 4, "{} idle", pool.idle());
        let opened = seen.connections.load(Ordering::SeqCst);

        tokio::time::sleep(Duration::from_millis(300)).await;
        pool.send(post(&origin), 1024).await.unwrap();
        assert_eq!(
            seen.connections.load(Ordering::SeqCst),
            opened + 1,
            "an aged-out connection was used"
        );
        assert_eq!(pool.idle(), 1);
    }

    /// A peer that accepts and closes the first `closing` connections
    /// before reading a byte, then answers 200 on the rest.
    async fn closes_before_reading(closing: usize) -> (Uri, Arc<Seen>) {
        let (listener, origin) = bind().await;
        let seen = Arc::new(Seen::default());
        let counts = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let n = counts.connections.fetch_add(1, Ordering::SeqCst) + 1;
                if n <= closing {
                    drop(socket);
                    continue;
                }
                let counts = counts.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while read_request(&mut socket, &mut buf).await {
                        counts.requests.fetch_add(1, Ordering::SeqCst);
                        let answer = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (origin, seen)
    }

    #[tokio::test]
    async fn a_peer_closing_fresh_connections_gets_one_retry_not_a_connect_storm() {
        // The peer would answer from its 21st connection on: a send that
        // kept opening fresh connections would reach it and succeed.
        let (origin, seen) = closes_before_reading(20).await;
        let pool = pool(origin.clone(), 8, MINUTE);
        let result = pool.send(post(&origin), 1024).await;
        let opened = seen.connections.load(Ordering::SeqCst);
        assert!(opened <= 2, "one send opened {opened} connections");
        assert!(result.is_err(), "answered after {opened} connections");
        assert_eq!(seen.requests.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_fresh_connection_closed_once_is_retried_once() {
        let (origin, seen) = closes_before_reading(1).await;
        let pool = pool(origin.clone(), 8, MINUTE);
        let answer = pool.send(post(&origin), 1024).await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
        assert_eq!(seen.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_a_connect_error() {
        let (listener, origin) = bind().await;
        drop(listener);
        let err = pool(origin.clone(), 8, MINUTE)
            .send(post(&origin), 1024)
            .await
            .unwrap_err();
        assert!(matches!(err, PoolError::Connect(_)), "{err}");
    }

    /// A peer that accepts TCP and never answers the TLS handshake: a
    /// connect, the ones that finish in the background included, gives up
    /// within the connect timeout instead of holding its slot for ever.
    #[tokio::test]
    async fn a_tls_handshake_that_never_answers_fails_within_the_connect_timeout() {
        let (listener, origin) = bind().await;
        let held = Arc::new(Mutex::new(Vec::new()));
        let holding = held.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                holding.lock().unwrap().push(socket);
            }
        });
        let origin: Uri = format!("https://{}", origin.authority().unwrap())
            .parse()
            .unwrap();
        let connector = super::super::connector(true, None).unwrap();
        let pool = Pool::new(connector, origin.clone(), 8, MINUTE);
        let started = Instant::now();
        let sent = tokio::time::timeout(
            CONNECT_TIMEOUT + Duration::from_secs(5),
            pool.send(post(&origin), 1024),
        )
        .await
        .expect("the send gave up within the connect timeout");
        let err = sent.unwrap_err();
        assert!(matches!(err, PoolError::Connect(_)), "{err}");
        assert!(err.to_string().contains("timed out"), "{err}");
        assert!(
            started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(held.lock().unwrap().len(), 1, "the peer saw the connect");
        assert_eq!(pool.shared.connecting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn error_bodies_are_read_up_to_the_limit() {
        let (listener, origin) = bind().await;
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            while read_request(&mut socket, &mut buf).await {
                let body = r#"{"message":"Forbidden"}"#;
                let answer = format!(
                    "HTTP/1.1 403 Forbidden\r\nx-amzn-errortype: ForbiddenException\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let pool = pool(origin.clone(), 8, MINUTE);
        let answer = pool.send(post(&origin), 1024).await.unwrap();
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        assert_eq!(answer.body, r#"{"message":"Forbidden"}"#);
        assert_eq!(answer.headers["x-amzn-errortype"], "ForbiddenException");
        assert_eq!(pool.idle(), 1);
        // Over the limit: the status still comes, the connection is not kept.
        let answer = pool.send(post(&origin), 8).await.unwrap();
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        assert!(answer.body.is_empty());
        assert_eq!(pool.idle(), 0);
    }
}
