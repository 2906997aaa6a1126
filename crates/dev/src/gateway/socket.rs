//! The WebSocket side: `$connect` (a row, an id), the client's frames
//! (`{"action":"whoami"}`, and in the memberships layout subscribe and
//! unsubscribe), delivery of queued frames, and `$disconnect`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::App;
use super::registry::{Connection, OUTBOX_CAPACITY, now_ms};
use super::rows::{Joined, Layout};
use super::subscriptions::{self, Action};

/// Frames written to the socket before one flush, so a busy client costs
/// one write per batch rather than one per frame.
const FLUSH_EVERY: usize = 64;

/// The query string of the connect URL.
#[derive(Debug, Deserialize)]
pub struct ConnectQuery {
    /// The channel this connection listens to, written to its row.
    channel: Option<String>,
    /// Memberships layout: the authorizer's `principalId`, written to the
    /// base row as `userId` (the stand-in has no authorizer).
    user: Option<String>,
    /// Memberships layout: the authorizer's `channelPrefix`, channels this
    /// connection may join beyond the public ones.
    #[serde(rename = "channelPrefix")]
    channel_prefix: Option<String>,
}

/// What the routes after `$connect` know of a connection (API Gateway's
/// `$context`).
#[derive(Clone, Debug)]
struct Session {
    connected_at_ms: u64,
    channel_prefix: Option<String>,
}

/// A new id shaped like API Gateway's: 11 random bytes in standard base64,
/// e.g. `L0SM9cOFvHcCIhw=` (16 characters; may hold `+`, `/` and `=`, which
/// is why ids are percent-encoded in management URLs).
pub fn new_connection_id() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 11]>())
}

/// `GET /{stage}` with an upgrade: the `$connect` route.
///
/// The connection is registered and its row written *before* the handshake
/// completes, as API Gateway runs `$connect` first: a sender that reads the
/// row can reach the connection at once, and is never told it is gone.
/// With `--connect-delay-ms`, the row is written first and the connection
/// registered only after the delay: posts in between answer 410, as API
/// Gateway's do until `$connect` returns.
pub async fn connect(
    State(app): State<Arc<App>>,
    Query(query): Query<ConnectQuery>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let id: Arc<str> = new_connection_id().into();
    let connected_at_ms = now_ms();
    let channel = query.channel.filter(|c| !c.is_empty());
    let memberships = app.rows.layout() == Layout::Memberships;
    let session = Session {
        connected_at_ms,
        channel_prefix: query.channel_prefix.filter(|_| memberships),
    };
    // The template's $connect writes no row for a channel the rule does
    // not open; the stand-in refuses such a connection.
    if memberships
        && channel.as_deref().is_some_and(|c| {
            !subscriptions::opens(c, &app.public_prefix, session.channel_prefix.as_deref())
        })
    {
        return (
            StatusCode::FORBIDDEN,
            "that channel is not open to this connection",
        )
            .into_response();
    }
    let (outbox, inbox) = mpsc::channel(OUTBOX_CAPACITY);
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let connection = Connection {
        outbox,
        connected_at_ms,
        last_active_ms: AtomicU64::new(connected_at_ms),
        source_ip: peer.ip(),
        user_agent,
    };
    let joined = Joined {
        channel: channel.as_deref(),
        user: query
            .user
            .as_deref()
            .filter(|u| memberships && !u.is_empty()),
    };
    let delayed = !app.connect_delay.is_zero();
    let mut connection = Some(connection);
    if !delayed {
        app.registry
            .insert(id.clone(), connection.take().expect("not yet inserted"));
    }
    if let Err(error) = app.rows.connect(&id, &joined, connected_at_ms).await {
        app.registry.remove(&id);
        tracing::error!(%error, "$connect failed");
        return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response();
    }
    if let Some(connection) = connection {
        tokio::time::sleep(app.connect_delay).await;
        app.registry.insert(id.clone(), connection);
    }
    tracing::debug!(connection_id = %id, channel = channel.as_deref(), "$connect");

    let failed_app = app.clone();
    let failed_id = id.clone();
    let token = app.tasks.token();
    upgrade
        .on_failed_upgrade(move |error| {
            tracing::warn!(%error, connection_id = %failed_id, "WebSocket upgrade failed");
            tokio::spawn(async move { disconnect(&failed_app, &failed_id).await });
        })
        .on_upgrade(move |socket| async move {
            let _token = token;
            serve_socket(&app, &id, &session, socket, inbox).await;
            disconnect(&app, &id).await;
        })
}

/// Moves frames between the socket and the connection's outbox until the
/// client leaves, the management API deletes the connection, or the
/// gateway shuts down.
async fn serve_socket(
    app: &App,
    id: &str,
    session: &Session,
    socket: WebSocket,
    mut inbox: mpsc::Receiver<Message>,
) {
    let (mut sink, mut stream) = socket.split();
    loop {
        tokio::select! {
            () = app.shutdown.cancelled() => {
                let _ = sink.send(Message::Close(None)).await;
                return;
            }
            queued = inbox.recv() => {
                let Some(first) = queued else {
                    // DELETE @connections/{id} dropped the outbox.
                    let _ = sink.send(Message::Close(None)).await;
                    return;
                };
                if sink.feed(first).await.is_err() {
                    return;
                }
                for _ in 1..FLUSH_EVERY {
                    let Ok(next) = inbox.try_recv() else { break };
                    if sink.feed(next).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    app.registry.touch(id);
                    match subscriptions::action(&text) {
                        Action::Whoami => {
                            let reply = serde_json::json!({ "connectionId": id }).to_string();
                            if sink.send(Message::text(reply)).await.is_err() {
                                return;
                            }
                        }
                        Action::Subscribe(channel) => subscribe(app, id, session, &channel).await,
                        Action::Unsubscribe(channel) => unsubscribe(app, id, &channel).await,
                        Action::Other => {}
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                // Binary frames have no route here; pings are answered by
                // the WebSocket layer itself.
                Some(Ok(_)) => app.registry.touch(id),
            },
        }
    }
}

/// The `$disconnect` route: forget the connection, remove its row unless
/// `--keep-stale` asks to reproduce a lost `$disconnect`.
async fn disconnect(app: &App, id: &str) {
    app.registry.remove(id);
    if app.keep_stale {
        tracing::debug!(connection_id = %id, "$disconnect (row kept: --keep-stale)");
        return;
    }
    match app.rows.delete(id).await {
        Ok(()) => tracing::debug!(connection_id = %id, "$disconnect"),
        Err(error) => tracing::warn!(%error, connection_id = %id, "$disconnect failed"),
    }
}

/// The subscribe route: a membership row, if the rule opens the channel.
/// Like the template's API, it answers nothing either way.
async fn subscribe(app: &App, id: &str, session: &Session, channel: &str) {
    if app.rows.layout() != Layout::Memberships {
        return;
    }
    if !subscriptions::opens(
        channel,
        &app.public_prefix,
        session.channel_prefix.as_deref(),
    ) {
        tracing::debug!(connection_id = %id, "subscribe refused: the channel is not open to it");
        return;
    }
    if let Err(error) = app
        .rows
        .subscribe(id, channel, session.connected_at_ms)
        .await
    {
        tracing::warn!(%error, connection_id = %id, "subscribe failed");
    }
}

/// The unsubscribe route: the connection's own membership row.
async fn unsubscribe(app: &App, id: &str, channel: &str) {
    if app.rows.layout() != Layout::Memberships || !subscriptions::fits(channel) {
        return;
    }
    if let Err(error) = app.rows.unsubscribe(id, channel).await {
        tracing::warn!(%error, connection_id = %id, "unsubscribe failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_look_like_api_gateway_ids() {
        let id = new_connection_id();
        assert_eq!(id.len(), 16);
        assert!(id.ends_with('='));
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&id)
            .unwrap();
        assert_eq!(decoded.len(), 11);
        assert_ne!(id, new_connection_id());
    }
}
