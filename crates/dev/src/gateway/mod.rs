//! `fanout-dev gateway`: a local stand-in for an API Gateway WebSocket API.
//!
//! One listener serves both sides, as API Gateway does:
//! - WebSocket clients at `ws://ADDR/{stage}` (optionally `?channel=NAME`);
//!   `$connect` writes the connection's row to the table, `$disconnect`
//!   removes it (unless `--keep-stale`);
//! - the management API at `http://ADDR/{stage}/@connections/{id}`
//!   (POST, GET, DELETE), the endpoint fanout's worker sends to;
//! - `GET /{stage}/@stats`: counters (POSTs, most in flight at once) that
//!   tests use to check a sender from the receiving side;
//!   `GET /{stage}/@stats/seqs`: with `--sink`, when each id's newest
//!   `seq` arrived ([`seqs`]), for how stale a stream of updates left it.
//!
//! Files: [`registry`] (live connections), [`socket`] (the WebSocket side),
//! [`subscriptions`] (the client's messages and who may join what),
//! [`management`] (`@connections`), [`faults`] (injection and counters),
//! [`seqs`] (versioned payloads at the sink), [`rows`] (the table and its
//! layouts; the only SDK use).

pub mod faults;
pub mod management;
pub mod registry;
pub mod rows;
pub mod seqs;
pub mod socket;
pub mod subscriptions;

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::faults::{Faults, Stats};
use self::registry::Registry;
use self::rows::{Layout, Rows};

/// How long open sockets get to close (and remove their rows) at shutdown.
const SOCKET_CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Bodies up to this size are read, so an oversize POST gets API Gateway's
/// 413 `PayloadTooLargeException` rather than a bare one from the framework.
const BODY_READ_LIMIT: usize = 4 * management::MAX_PAYLOAD_BYTES;

/// Options of `fanout-dev gateway`. The names are a contract: scripts drive them.
/// The DynamoDB endpoint and credentials come from the standard AWS
/// variables (e.g. `AWS_ENDPOINT_URL_DYNAMODB`), as for the worker.
#[derive(clap::Args, Clone, Debug)]
pub struct GatewayArgs {
    /// Address for WebSocket clients and the management API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The stage: clients connect at `/{stage}`, and the worker's endpoint is
    /// `http://ADDR/{stage}`.
    #[arg(long, default_value = "local")]
    pub stage: String,
    /// The connections table that `$connect` writes to (key `connectionId`).
    #[arg(long, env = "FANOUT_TABLE")]
    pub table: String,
    /// Keep rows of clients that leave, as if `$disconnect` were lost: their
    /// ids then answer 410 and the worker must remove them.
    #[arg(long)]
    pub keep_stale: bool,
    /// Accept POSTs to ids that are not connected (200, nothing sent) and
    /// count deliveries per id, so `@stats` reports ids reached twice: a
    /// sink for measuring duplicates at scale without a socket per id.
    /// Payloads that are JSON objects with a numeric `seq` are versions of
    /// a value: `@stats/seqs` gives when each id's newest one arrived.
    #[arg(long)]
    pub sink: bool,
    /// Create the table if it does not exist (key `connectionId`, GSI
    /// `by-channel` on `channel`), for local development.
    #[arg(long)]
    pub create_table: bool,
    /// Answer 429 `LimitExceededException` to POSTs past N per second.
    #[arg(long)]
    pub throttle_rps: Option<NonZeroU32>,
    /// Answer 500 to this share of POSTs (0–100), delivering nothing.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub fail_percent: u8,
    /// Milliseconds added to each POST before it is answered.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// How rows are kept: `one-row` (a row per connection, keyed by
    /// `connectionId`) or `memberships`, the rows of the template's own
    /// WebSocket API (`CreateWebSocketApi`): key `connectionId` + `sk`, a
    /// base row and a row per channel joined with
    /// `{"action":"subscribe","channel":NAME}`.
    #[arg(long, value_enum, default_value_t = Layout::OneRow)]
    pub layout: Layout,
    /// Memberships layout: channels any client may join (the template's
    /// `PublicChannelPrefix`); `?channelPrefix=` on the connect URL plays
    /// the authorizer's, and `?user=` its `principalId`.
    #[arg(long, default_value = "public.")]
    pub public_channel_prefix: String,
    /// Milliseconds between writing a connection's row and accepting posts
    /// to it (410 meanwhile), as API Gateway answers 410 until `$connect`
    /// completes.
    #[arg(long, default_value_t = 0)]
    pub connect_delay_ms: u64,
}

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid --stage {0:?}: use a non-empty name without '/', '?' or '@'")]
    Stage(String),
    #[error("the gateway's listener failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error(transparent)]
    Table(#[from] rows::RowError),
}

/// State shared by every handler and socket task.
#[derive(Debug)]
pub struct App {
    registry: Registry,
    rows: Rows,
    faults: Faults,
    stats: Stats,
    keep_stale: bool,
    /// `--public-channel-prefix`.
    public_prefix: String,
    /// `--connect-delay-ms`.
    connect_delay: Duration,
    /// `--sink`: per id that has no socket, its deliveries and when the
    /// first came (ms since the Unix epoch).
    sink: Option<dashmap::DashMap<String, (u32, u64)>>,
    /// `--sink`: per id, the rises of the highest `seq` it was posted.
    sink_seqs: Option<seqs::SeqLog>,
    /// Cancelled at shutdown: every socket sends a close frame and ends.
    shutdown: CancellationToken,
    /// Socket tasks, so shutdown can wait for their `$disconnect` writes.
    tasks: TaskTracker,
}

/// Binds `args.listen`, then serves until `shutdown` completes.
pub async fn run(
    args: GatewayArgs,
    dynamo: aws_sdk_dynamodb::Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: args.listen,
            source,
        })?;
    serve(args, dynamo, listener, shutdown).await
}

/// Serves on an already bound listener (tests bind port 0 and read the
/// address) until `shutdown` completes; then closes every socket and waits
/// briefly for their `$disconnect` row removals. `args.listen` is ignored.
pub async fn serve(
    args: GatewayArgs,
    dynamo: aws_sdk_dynamodb::Client,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    validate_stage(&args.stage)?;
    let rows = Rows::new(dynamo, &args.table, args.layout);
    if args.create_table {
        rows.create_table_if_missing().await?;
    }
    let app = Arc::new(App {
        registry: Registry::default(),
        rows,
        faults: Faults::new(args.throttle_rps, args.fail_percent, args.latency_ms),
        sink: args.sink.then(dashmap::DashMap::new),
        sink_seqs: args.sink.then(seqs::SeqLog::default),
        stats: Stats::default(),
        keep_stale: args.keep_stale,
        public_prefix: args.public_channel_prefix.clone(),
        connect_delay: Duration::from_millis(args.connect_delay_ms),
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
    });
    let addr = listener.local_addr().map_err(GatewayError::Serve)?;
    tracing::info!(
        websocket = %format!("ws://{addr}/{}", args.stage),
        endpoint = %format!("http://{addr}/{}", args.stage),
        table = %args.table,
        keep_stale = args.keep_stale,
        throttle_rps = args.throttle_rps.map(NonZeroU32::get),
        fail_percent = args.fail_percent,
        latency_ms = args.latency_ms,
        "gateway listening"
    );

    let stop = app.shutdown.clone();
    let served = axum::serve(
        listener,
        router(&args.stage, app.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        stop.cancel();
    })
    .await;

    // Upgraded sockets outlive the HTTP server: close them ourselves.
    app.shutdown.cancel();
    app.tasks.close();
    if tokio::time::timeout(SOCKET_CLOSE_GRACE, app.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some sockets did not close in time; their rows may remain");
    }
    served.map_err(GatewayError::Serve)
}

fn router(stage: &str, app: Arc<App>) -> Router {
    Router::new()
        .route(&format!("/{stage}"), get(socket::connect))
        .route(
            &format!("/{stage}/@connections/{{id}}"),
            get(management::get)
                .post(management::post)
                .delete(management::delete),
        )
        .route(&format!("/{stage}/@stats"), get(management::stats))
        .route(&format!("/{stage}/@stats/seqs"), get(management::seqs))
        .layer(DefaultBodyLimit::max(BODY_READ_LIMIT))
        .with_state(app)
}

fn validate_stage(stage: &str) -> Result<(), GatewayError> {
    let bad = stage.is_empty() || stage.contains(['/', '?', '@', '{', '}', '#']);
    if bad {
        return Err(GatewayError::Stage(stage.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_names_are_the_documented_contract() {
        let parse = crate::parse_options::<GatewayArgs>;
        let a = parse(&[
            "gateway",
            "--listen",
            "127.0.0.1:9000",
            "--stage",
            "dev",
            "--table",
            "connections",
            "--keep-stale",
            "--throttle-rps",
            "100",
            "--fail-percent",
            "20",
            "--latency-ms",
            "5",
            "--layout",
            "memberships",
            "--public-channel-prefix",
            "open/",
            "--connect-delay-ms",
            "250",
        ])
        .expect("parses");
        assert_eq!(a.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!((a.stage.as_str(), a.table.as_str()), ("dev", "connections"));
        assert!(a.keep_stale);
        assert_eq!(a.throttle_rps, NonZeroU32::new(100));
        assert_eq!((a.fail_percent, a.latency_ms), (20, 5));
        assert_eq!(a.layout, Layout::Memberships);
        assert_eq!(
            (a.public_channel_prefix.as_str(), a.connect_delay_ms),
            ("open/", 250)
        );
        let defaults = parse(&["gateway", "--table", "t"]).expect("parses");
        assert_eq!(defaults.layout, Layout::OneRow);
        assert!(parse(&["gateway", "--table", "t", "--fail-percent", "101"]).is_err());
    }

    #[test]
    fn stage_names_are_one_path_segment() {
        assert!(validate_stage("local").is_ok());
        assert!(validate_stage("prod-1").is_ok());
        for bad in ["", "a/b", "a?b", "@connections", "{x}"] {
            assert!(validate_stage(bad).is_err(), "{bad}");
        }
    }
}
