//! Many real WebSocket clients: connect, learn each one's id (whoami),
//! count what each receives, and close or drop chosen ones.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{SinkExt, StreamExt, stream};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use super::ClientsError;
use super::tally::{ClientEnd, Summary, Tally, summarise};

/// How long one client may take to connect and learn its id.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a graceful close waits for the peer's close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a client is told to stop.
#[derive(Debug)]
enum Stop {
    /// Close frame, then wait for the peer's.
    Close,
    /// Drop the TCP connection without a close frame, as a client that
    /// loses its network does: the gateway's row may go stale.
    Drop,
}

/// What a client task shares with its handle.
#[derive(Debug, Default)]
struct Shared {
    tally: Tally,
    /// Set when the other side closed the connection or it failed.
    closed_by_peer: bool,
}

/// One connected client.
#[derive(Debug)]
pub struct Client {
    id: String,
    shared: Arc<Mutex<Shared>>,
    stop: Option<oneshot::Sender<Stop>>,
    task: Option<JoinHandle<()>>,
    dropped: bool,
}

impl Client {
    /// The id the gateway gave this connection.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A copy of what it has received so far.
    pub fn tally(&self) -> Tally {
        self.lock().tally.clone()
    }

    pub fn end(&self) -> ClientEnd {
        if self.dropped {
            ClientEnd::Dropped
        } else if self.lock().closed_by_peer {
            ClientEnd::ClosedByPeer
        } else {
            ClientEnd::Live
        }
    }

    fn frames(&self) -> u64 {
        self.lock().tally.frames()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panic elsewhere cannot leave a tally half-written: use it anyway.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn stop(&mut self, how: Stop) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(how);
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// A set of clients connected to one gateway URL.
#[derive(Debug)]
pub struct Swarm {
    clients: Vec<Client>,
}

impl Swarm {
    /// Opens `count` clients at `url` (e.g. `ws://127.0.0.1:8080/local`),
    /// `concurrency` handshakes at a time, each in `channel` if given, and
    /// learns each one's id. Fails if any client cannot connect.
    pub async fn connect(
        url: &str,
        count: usize,
        channel: Option<&str>,
        concurrency: usize,
    ) -> Result<Self, ClientsError> {
        let url = with_channel(url, channel);
        let clients: Vec<Result<Client, ClientsError>> = stream::iter(0..count)
            .map(|_| connect_one(&url))
            .buffered(concurrency.max(1))
            .collect()
            .await;
        let clients = clients.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(Self { clients })
    }

    pub fn clients(&self) -> &[Client] {
        &self.clients
    }

    pub fn ids(&self) -> Vec<String> {
        self.clients.iter().map(|c| c.id.clone()).collect()
    }

    /// Adds the clients of another swarm (e.g. one opened in a channel).
    pub fn extend(&mut self, other: Swarm) {
        self.clients.extend(other.clients);
    }

    /// Drops the first `n` clients that are still open, abruptly (no close
    /// frame); returns their ids.
    pub async fn drop_abruptly(&mut self, n: usize) -> Vec<String> {
        let mut dropped = Vec::with_capacity(n);
        for client in self.clients.iter_mut().filter(|c| c.stop.is_some()).take(n) {
            client.stop(Stop::Drop).await;
            client.dropped = true;
            dropped.push(client.id.clone());
        }
        dropped
    }

    /// Drops the clients with these ids abruptly (no close frame).
    pub async fn drop_ids(&mut self, ids: &[String]) {
        for client in self.clients.iter_mut().filter(|c| ids.contains(&c.id)) {
            client.stop(Stop::Drop).await;
            client.dropped = true;
        }
    }

    /// Waits until every client that was not dropped has received at least
    /// `frames` frames; false if `timeout` passed first.
    pub async fn wait_for_frames(&self, frames: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let done = self
                .clients
                .iter()
                .filter(|c| !c.dropped)
                .all(|c| c.frames() >= frames);
            if done {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The summary of what every client received so far.
    pub fn summary(&self, expect_frames: Option<u64>) -> Summary {
        let tallies: Vec<(&str, ClientEnd, Tally)> = self
            .clients
            .iter()
            .map(|c| (c.id(), c.end(), c.tally()))
            .collect();
        summarise(tallies.iter().map(|(id, f, t)| (*id, *f, t)), expect_frames)
    }

    /// Closes every open client gracefully; returns the final summary.
    pub async fn close(mut self, expect_frames: Option<u64>) -> Summary {
        let closes = self.clients.iter_mut().map(|c| c.stop(Stop::Close));
        futures::future::join_all(closes).await;
        self.summary(expect_frames)
    }
}

/// Adds `?channel=NAME` (percent-encoded) to a connect URL.
pub fn with_channel(url: &str, channel: Option<&str>) -> String {
    match channel {
        None => url.to_owned(),
        Some(channel) => {
            let separator = if url.contains('?') { '&' } else { '?' };
            let channel = utf8_percent_encode(channel, NON_ALPHANUMERIC);
            format!("{url}{separator}channel={channel}")
        }
    }
}

async fn connect_one(url: &str) -> Result<Client, ClientsError> {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let (socket, id) = tokio::time::timeout(CONNECT_TIMEOUT, handshake(url, &shared))
        .await
        .map_err(|_| ClientsError::Timeout {
            url: url.to_owned(),
        })??;
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(receive(socket, shared.clone(), stopped));
    Ok(Client {
        id,
        shared,
        stop: Some(stop),
        task: Some(task),
        dropped: false,
    })
}

/// Connects and asks for the id. Frames that arrive before the answer are
/// counted like any other.
async fn handshake(url: &str, shared: &Mutex<Shared>) -> Result<(Socket, String), ClientsError> {
    let connect_error = |source| ClientsError::Connect {
        url: url.to_owned(),
        source: Box::new(source),
    };
    let (mut socket, _) = connect_async(url).await.map_err(connect_error)?;
    socket
        .send(Message::text(r#"{"action":"whoami"}"#))
        .await
        .map_err(connect_error)?;
    while let Some(frame) = socket.next().await {
        match frame.map_err(connect_error)? {
            Message::Text(text) => match whoami_answer(&text) {
                Some(id) => return Ok((socket, id)),
                None => record(shared, false, text.as_bytes()),
            },
            Message::Binary(bytes) => record(shared, true, &bytes),
            Message::Close(_) => break,
            _ => {}
        }
    }
    Err(ClientsError::NoId {
        url: url.to_owned(),
    })
}

/// The id in a whoami answer, `{"connectionId":"…"}` and nothing else.
fn whoami_answer(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Answer {
        connection_id: String,
    }
    serde_json::from_str::<Answer>(text)
        .ok()
        .map(|a| a.connection_id)
}

fn record(shared: &Mutex<Shared>, binary: bool, payload: &[u8]) {
    let mut shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
    shared.tally.record(binary, payload);
}

/// Counts frames until told to stop or the peer closes.
async fn receive(
    mut socket: Socket,
    shared: Arc<Mutex<Shared>>,
    mut stop: oneshot::Receiver<Stop>,
) {
    loop {
        tokio::select! {
            how = &mut stop => {
                match how {
                    // Dropping the stream closes the TCP socket, no close frame.
                    Ok(Stop::Drop) => drop(socket),
                    Ok(Stop::Close) | Err(_) => close(socket, &shared).await,
                }
                return;
            }
            frame = socket.next() => match frame {
                Some(Ok(Message::Text(text))) => record(&shared, false, text.as_bytes()),
                Some(Ok(Message::Binary(bytes))) => record(&shared, true, &bytes),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    shared.lock().unwrap_or_else(PoisonError::into_inner).closed_by_peer = true;
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Sends a close frame and reads until the peer's, counting late frames.
async fn close(mut socket: Socket, shared: &Mutex<Shared>) {
    let _ = socket.close(None).await;
    let drain = async {
        while let Some(Ok(frame)) = socket.next().await {
            match frame {
                Message::Text(text) => record(shared, false, text.as_bytes()),
                Message::Binary(bytes) => record(shared, true, &bytes),
                _ => {}
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_is_added_percent_encoded() {
        assert_eq!(with_channel("ws://h/s", None), "ws://h/s");
        assert_eq!(
            with_channel("ws://h/s", Some("news")),
            "ws://h/s?channel=news"
        );
        assert_eq!(
            with_channel("ws://h/s?x=1", Some("a b&c")),
            "ws://h/s?x=1&channel=a%20b%26c"
        );
    }

    #[test]
    fn whoami_answer_is_exactly_the_id_object() {
        assert_eq!(
            whoami_answer(r#"{"connectionId":"L0SM9cOFvHcCIhw="}"#).as_deref(),
            Some("L0SM9cOFvHcCIhw=")
        );
        assert_eq!(whoami_answer(r#"{"connectionId":"a","data":1}"#), None);
        assert_eq!(whoami_answer("hello"), None);
    }
}
