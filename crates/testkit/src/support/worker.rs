//! Running the `fanout` binary in tests: wait for it with a deadline, keep
//! its output, pick out the per-job `broadcast` report lines, signal it.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Child;

/// What one worker run printed and how it ended.
pub struct Run {
    pub status: std::process::ExitStatus,
    /// Every `broadcast` log line, in order.
    pub reports: Vec<serde_json::Value>,
    /// Standard output and standard error, for assertion messages.
    pub stdout: String,
}

impl Run {
    /// The report of the job with this id (panics, showing the output, if
    /// there is none).
    pub fn report(&self, job_id: &str) -> &serde_json::Value {
        self.reports
            .iter()
            .rev()
            .find(|r| r["job_id"] == job_id)
            .unwrap_or_else(|| panic!("no report for job {job_id}:\n{}", self.stdout))
    }

    /// The JSON log lines with this message, in order.
    pub fn logged(&self, message: &str) -> Vec<serde_json::Value> {
        log_lines(&self.stdout, message)
    }
}

fn log_lines(out: &str, message: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

/// A count in a report line (panics, showing the line, if it has none).
pub fn count(report: &serde_json::Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {report}"))
}

/// The `fanout` binary under test: beside the test executable's directory
/// (`target/<profile>/deps/<test>` → `target/<profile>/fanout`), where Cargo
/// builds it for every integration test of the `fanout` package.
///
/// `FANOUT_DEV_TEST_BINARY` names another binary instead: to run a test
/// against an earlier build and see it fail there.
pub fn fanout_binary() -> std::path::PathBuf {
    if let Some(binary) = std::env::var_os("FANOUT_DEV_TEST_BINARY") {
        return binary.into();
    }
    let test = std::env::current_exe().expect("the test executable's path");
    let profile_dir = test
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from target/<profile>/deps");
    let binary = profile_dir.join("fanout");
    assert!(
        binary.exists(),
        "{} not found: run the tests with `cargo test -p fanout` (or ./scripts/test.sh)",
        binary.display()
    );
    binary
}

/// `fanout ARGS` against a test's jobs queue, dead-letter queue and table
/// (channel index included), polling briefly and serving metrics on any free
/// port (tests run workers side by side). `env` is applied after, in order,
/// so a harness's defaults come first and a test's own settings win.
pub fn command<'a>(
    args: &[&str],
    queue_url: &str,
    dead_letter_queue_url: &str,
    table: &str,
    env: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(fanout_binary());
    command
        .args(args)
        .env("FANOUT_QUEUE_URL", queue_url)
        .env("FANOUT_DEAD_LETTER_QUEUE_URL", dead_letter_queue_url)
        .env("FANOUT_TABLE", table)
        .env("FANOUT_CHANNEL_INDEX", super::CHANNEL_INDEX)
        .env("FANOUT_RECEIVE_WAIT", "1s")
        // A first 410 from a row whose start is unknown is posted to again
        // after the connect window: a second here, not two minutes.
        .env("FANOUT_CONNECT_WINDOW", "1s")
        .env("FANOUT_METRICS_LISTEN", "127.0.0.1:0")
        .envs(env)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs a short `fanout` command (e.g. `enqueue`) that must succeed; returns
/// its trimmed standard output.
pub async fn run_ok(mut command: tokio::process::Command, what: &str) -> String {
    let out = command.output().await.expect("run fanout");
    assert!(
        out.status.success(),
        "fanout {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// Runs `command` (a `fanout run --exit-when-idle`) to its end within a
/// minute, its output captured, and asserts that it exited 0.
pub async fn run_to_end(command: tokio::process::Command) -> Run {
    let child = start(command);
    let run = finish(child, Duration::from_secs(60)).await;
    assert!(run.status.success(), "{}", run.stdout);
    run
}

/// Starts a `fanout run` with its output captured, for [`finish`].
pub fn start(mut command: tokio::process::Command) -> Child {
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start fanout run")
}

/// Sends `signal` (e.g. "-TERM", "-KILL") to a worker by its pid.
pub fn signal(child: &Child, signal: &str) {
    signal_pid(child.id().expect("a running worker"), signal);
}

/// As [`signal`], to a worker whose `Child` another task holds (one that
/// drains its output meanwhile), by the pid read at its start.
pub fn signal_pid(pid: u32, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill {signal} {pid}");
}

/// Waits for a worker to exit (killing it past `limit`) and collects its
/// output.
pub async fn finish(mut child: Child, limit: Duration) -> Run {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let mut out = String::new();
    let mut err = String::new();
    let waited = tokio::time::timeout(limit, async {
        let (_, _, status) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err),
            child.wait()
        );
        status
    })
    .await;
    let status = match waited {
        Ok(status) => status.expect("wait for fanout"),
        Err(_) => {
            let _ = child.kill().await;
            panic!("fanout run did not finish in {limit:?}\nstdout:\n{out}\nstderr:\n{err}");
        }
    };
    Run {
        status,
        reports: log_lines(&out, "broadcast"),
        stdout: format!("{out}\n--- stderr ---\n{err}"),
    }
}
