//! `fanout clients`: N real WebSocket clients against a gateway, counting
//! every frame each one receives, with a JSON summary on exit (clients,
//! frames, min/max per client, clients that got nothing or duplicates).
//!
//! Files: [`swarm`] (the clients; the library API tests and the demo use),
//! [`tally`] (per-client counts and the summary, pure).

pub mod swarm;
pub mod tally;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use self::swarm::{Client, Swarm};
pub use self::tally::{ClientEnd, Summary, Tally};

/// File descriptors kept free beside one per client (stdio, the runtime,
/// log files).
const SPARE_FDS: u64 = 64;

/// Options of `fanout clients`.
#[derive(clap::Args, Clone, Debug)]
pub struct ClientsArgs {
    /// The gateway's WebSocket URL, e.g. `ws://127.0.0.1:8080/local`.
    #[arg(long)]
    pub url: String,
    /// How many clients to open.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Open every client in this channel (`?channel=NAME`).
    #[arg(long)]
    pub channel: Option<String>,
    /// Once all are connected, drop this many abruptly (no close frame), as
    /// clients that lose their network do; with `fanout-dev gateway
    /// --keep-stale` their rows go stale.
    #[arg(long, default_value_t = 0)]
    pub drop: usize,
    /// Stop after this long (e.g. `30s`); without it, run until SIGINT or
    /// SIGTERM.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Frames every client that was not dropped should receive, each
    /// payload once: sets the summary's `ok`.
    #[arg(long)]
    pub expect_frames: Option<u64>,
    /// Once all clients are connected (and the drops done), write their ids
    /// here as JSON `{"live":[…],"dropped":[…]}`: scripts wait for it.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Also write the summary to this file.
    #[arg(long)]
    pub summary_file: Option<PathBuf>,
    /// WebSocket handshakes at a time while connecting.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
}

/// Why the clients could not run.
#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    #[error(
        "cannot connect a WebSocket client to {url}: {source} (is `fanout-dev gateway` running there, with that stage?)"
    )]
    Connect {
        url: String,
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    #[error("a client at {url} got no answer to whoami in time (is it a `fanout-dev gateway`?)")]
    Timeout { url: String },
    #[error(
        "a client at {url} was closed before it learnt its id (see the gateway's log: $connect may have failed)"
    )]
    NoId { url: String },
    #[error(
        "{count} clients need {needed} open files but the limit is {limit}: raise it (`ulimit -n`) or open fewer"
    )]
    FileLimit {
        count: usize,
        needed: u64,
        limit: u64,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The ready file's content.
#[derive(Serialize)]
struct Ready<'a> {
    live: Vec<&'a str>,
    dropped: &'a [String],
}

/// Runs `fanout clients`: connect, drop, wait for `shutdown` or the
/// duration, close, print the summary as one JSON line on stdout.
pub async fn run(
    args: ClientsArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, ClientsError> {
    ensure_file_limit(args.count)?;
    let mut swarm = Swarm::connect(
        &args.url,
        args.count,
        args.channel.as_deref(),
        args.connect_concurrency,
    )
    .await?;
    let dropped = swarm.drop_abruptly(args.drop).await;
    tracing::info!(
        url = %args.url,
        clients = args.count,
        dropped = dropped.len(),
        channel = args.channel.as_deref(),
        "clients connected"
    );
    if let Some(path) = &args.ready_file {
        let ids: Vec<String> = swarm.ids();
        let ready = Ready {
            live: ids
                .iter()
                .filter(|id| !dropped.contains(id))
                .map(String::as_str)
                .collect(),
            dropped: &dropped,
        };
        write(path, &serde_json::to_string(&ready).unwrap_or_default())?;
    }

    match args.duration {
        Some(duration) => {
            tokio::select! {
                () = shutdown => {}
                () = tokio::time::sleep(duration) => {}
            }
        }
        None => shutdown.await,
    }

    let summary = swarm.close(args.expect_frames).await;
    let json = serde_json::to_string(&summary).unwrap_or_default();
    println!("{json}");
    if let Some(path) = &args.summary_file {
        write(path, &json)?;
    }
    Ok(summary)
}

/// Raises the soft open-files limit if `count` clients would not fit.
fn ensure_file_limit(count: usize) -> Result<(), ClientsError> {
    let needed = count as u64 + SPARE_FDS;
    let limit = rlimit::increase_nofile_limit(needed).unwrap_or(0);
    if limit != 0 && limit < needed {
        return Err(ClientsError::FileLimit {
            count,
            needed,
            limit,
        });
    }
    Ok(())
}

/// Writes beside the target, then renames: a script polling for the file
/// never reads half of it.
fn write(path: &Path, content: &str) -> Result<(), ClientsError> {
    let error = |source| ClientsError::Write {
        path: path.to_owned(),
        source,
    };
    let partial = path.with_extension("partial");
    std::fs::write(&partial, content).map_err(error)?;
    std::fs::rename(&partial, path).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let a: ClientsArgs = crate::parse_options(&[
            "clients",
            "--url",
            "ws://127.0.0.1:8080/local",
            "--count",
            "1000",
            "--channel",
            "news",
            "--drop",
            "100",
            "--duration",
            "30s",
            "--expect-frames",
            "2",
        ])
        .expect("parses");
        assert_eq!((a.count, a.drop, a.expect_frames), (1000, 100, Some(2)));
        assert_eq!(a.channel.as_deref(), Some("news"));
        assert_eq!(a.duration, Some(Duration::from_secs(30)));
        assert_eq!(a.connect_concurrency, 64);
    }
}
