//! fanout against serverless-offline, the local WebSocket stand-in many
//! Serverless Framework users develop with: a stage-less endpoint
//! (`POST /@connections/{id}` at the root) that answers a closed client with
//! a bare 410. The `fanout` binary runs as operators run it, with moto and
//! dynalite, and real WebSocket clients connect to serverless-offline.
//!
//! serverless-offline is installed by `scripts/emulators.sh install` into
//! `.local/node-sls` (`./scripts/test.sh` does it); the service it runs is
//! `tests/peers/serverless-offline`, whose `$connect` handler records each
//! connection id so the test can write the table rows fanout reads.

use fanout_testkit::local_support::{Socket, next_frame_within};
use fanout_testkit::support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use support::worker::Run;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

/// serverless-offline prints its banner in about 5 s; a cold start on a
/// busy machine takes longer.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// A serverless-offline process serving the peer service, stopped (by its
/// pid) on drop.
struct Offline {
    child: Child,
    /// WebSocket and `@connections` port.
    port: u16,
    dir: PathBuf,
}

impl Offline {
    /// Starts it on `port` (WebSocket), `port + 1` (HTTP) and `port + 2`
    /// (Lambda), all on 127.0.0.1.
    async fn start(port: u16) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let modules = root.join("../../.local/node-sls/node_modules");
        let cli = modules.join("serverless/bin/serverless.js");
        assert!(
            cli.exists() && modules.join("serverless-offline").exists(),
            "serverless-offline is not installed in {}: run ./scripts/emulators.sh install",
            modules.display()
        );
        // A service directory of its own: the peer project plus the pinned
        // packages, so serverless resolves the plugin there.
        let dir = std::env::temp_dir().join(support::unique("fanout-sls"));
        std::fs::create_dir_all(&dir).expect("create the service directory");
        for file in ["serverless.yml", "handler.js"] {
            std::fs::copy(
                root.join("tests/peers/serverless-offline").join(file),
                dir.join(file),
            )
            .expect("copy the peer service");
        }
        std::os::unix::fs::symlink(&modules, dir.join("node_modules")).expect("link node_modules");
        std::fs::write(dir.join("ids"), "").expect("create the ids file");
        let log = std::fs::File::create(dir.join("offline.log")).expect("create the log");
        let child = Command::new("node")
            .arg(&cli)
            .args(["offline", "start", "--host", "127.0.0.1"])
            .args(["--websocketPort", &port.to_string()])
            .args(["--httpPort", &(port + 1).to_string()])
            .args(["--lambdaPort", &(port + 2).to_string()])
            .current_dir(&dir)
            .env("FANOUT_DEV_PEER_IDS", dir.join("ids"))
            .env("SLS_TELEMETRY_DISABLED", "1")
            .env("SLS_NOTIFICATIONS_MODE", "off")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start serverless-offline");
        let offline = Self { child, port, dir };
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        while !offline
            .log()
            .contains(&format!("listening on ws://127.0.0.1:{port}"))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "serverless-offline did not come up on {port}:\n{}",
                offline.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        offline
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("offline.log")).unwrap_or_default()
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Opens `n` clients and waits for their ids from the `$connect` handler.
    async fn connect(&self, n: usize) -> (Vec<Socket>, Vec<String>) {
        let before = self.ids().len();
        let mut sockets = Vec::new();
        for _ in 0..n {
            let (socket, _) =
                tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}", self.port))
                    .await
                    .expect("connect to serverless-offline");
            sockets.push(socket);
        }
        for _ in 0..100 {
            let ids = self.ids();
            if ids.len() >= before + n {
                return (sockets, ids[before..].to_vec());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the $connect handler recorded no ids:\n{}", self.log());
    }

    fn ids(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("ids"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Offline {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A queue, a table with rows for `ids`, one job on the queue; then
/// `fanout run --exit-when-idle` against the stage-less endpoint.
async fn broadcast(
    offline: &Offline,
    ids: &[String],
    body: &str,
) -> (Run, String, aws_sdk_dynamodb::Client) {
    let job = support::one_job("sls", ids, body).await;
    let endpoint = offline.endpoint();
    let run = support::worker::run_to_end(support::worker::command(
        &["run", "--exit-when-idle"],
        &job.queue.url,
        &job.dlq.url,
        &job.table,
        [("FANOUT_GATEWAY_ENDPOINT", endpoint.as_str())],
    ))
    .await;
    let (visible, hidden) = support::counts(&job.sqs, &job.queue.url).await;
    assert_eq!((visible, hidden), (0, 0), "the job's message is deleted");
    (run, job.table, job.dynamo)
}

async fn next_text(socket: &mut Socket) -> String {
    match next_frame_within(socket, Duration::from_secs(10)).await {
        Message::Text(text) => text.to_string(),
        other => panic!("unexpected frame {other:?}"),
    }
}

#[tokio::test]
async fn clients_of_serverless_offline_receive_a_broadcast_from_fanout_run() {
    let offline = Offline::start(5400).await;
    let (mut sockets, ids) = offline.connect(3).await;
    let (run, table, dynamo) = broadcast(
        &offline,
        &ids,
        r#"{"id":"sls-hello","data":"hello from fanout"}"#,
    )
    .await;
    for socket in &mut sockets {
        assert_eq!(next_text(socket).await, "hello from fanout");
    }
    let report = run.report("sls-hello");
    assert_eq!(report["delivered"], 3, "{}", run.stdout);
    assert_eq!(report["status"], "done");
    assert_eq!(support::remaining_ids(&dynamo, &table).await.len(), 3);
}

#[tokio::test]
async fn a_closed_clients_row_is_removed_after_serverless_offlines_bare_410() {
    let offline = Offline::start(5410).await;
    let (mut sockets, ids) = offline.connect(2).await;
    let mut closed = sockets.remove(0);
    closed.close(None).await.expect("close the first client");
    drop(closed);
    // serverless-offline forgets the connection once the close completes.
    for _ in 0..50 {
        if post_status(offline.port, &ids[0]).await == 410 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (run, table, dynamo) =
        broadcast(&offline, &ids, r#"{"id":"sls-gone","data":"still here?"}"#).await;
    assert_eq!(next_text(&mut sockets[0]).await, "still here?");
    let report = run.report("sls-gone");
    // Its row has no start the worker reads, so the first 410 may be a
    // connection still connecting: posted to again after the connect
    // window, the row removed on the second.
    assert_eq!(
        (&report["delivered"], &report["gone"], &report["rechecking"]),
        (&1.into(), &1.into(), &1.into()),
        "{}",
        run.stdout
    );
    let left = support::remaining_ids(&dynamo, &table).await;
    assert_eq!(left.into_iter().collect::<Vec<_>>(), [ids[1].clone()]);
}

/// The status of a bare `POST /@connections/{id}` (0 if there is no
/// answer), to learn when serverless-offline has let a closed client go.
async fn post_status(port: u16, id: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return 0;
    };
    let request = format!(
        "POST /@connections/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nConnection: close\r\n\r\n."
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
