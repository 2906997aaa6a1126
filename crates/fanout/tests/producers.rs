//! The producers under `examples/`, run as a user runs them against moto
//! (SQS, SNS, EventBridge): Node.js with the AWS SDK v3, Python with boto3,
//! the AWS CLI, an SNS topic feeding the queue with and without raw message
//! delivery, an EventBridge rule with the queue as its target, and a FIFO
//! queue with the channel as the message group. Each job they send is
//! delivered by the `fanout` binary (`run --exit-when-idle`) through the
//! local gateway to real WebSocket clients, once each.
//!
//! The AWS CLI, boto3 and the SDK for JavaScript are pinned and installed
//! into `.local/` by `scripts/emulators.sh install` (`./scripts/test.sh`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fanout_testkit::local_support;
use fanout_testkit::stack::{Queues, Stack};
use fanout_testkit::support::{self, worker};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A jobs queue, its dead-letter queue, a table with a channel index and a
/// gateway over it.
struct Stage(Stack);

fanout_testkit::on_stack!(Stage, 0);

impl Stage {
    async fn new(fifo: bool) -> Self {
        let queues = Queues {
            fifo,
            ..Queues::default()
        };
        Self(Stack::with_queues("producers", queues, |_| {}).await)
    }

    /// Runs an example (a path under `examples/` and its arguments) as a
    /// user would, with the emulators' endpoints and the tools of `.local/`;
    /// returns what it printed.
    async fn producer(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> String {
        let local = root().join(".local");
        let venv_bin = local.join("venv/bin");
        assert!(
            venv_bin.join("aws").exists(),
            "the AWS CLI is not in .local/venv: run ./scripts/test.sh (or ./scripts/emulators.sh install)"
        );
        let path = format!(
            "{}:{}",
            venv_bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // moto serves every service on one port.
        let moto = std::env::var("AWS_ENDPOINT_URL_SQS").expect("run with ./scripts/test.sh");
        let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
        let (program, script) = match Path::new(program).extension().and_then(|e| e.to_str()) {
            Some("js") => ("node".to_owned(), Some(program)),
            Some("py") => (venv_bin.join("python").display().to_string(), Some(program)),
            _ => (
                root().join("examples").join(program).display().to_string(),
                None,
            ),
        };
        let mut command = Command::new(program);
        if let Some(script) = script {
            command.arg(root().join("examples").join(script));
        }
        let output = command
            .args(args)
            .env("PATH", path)
            .env("NODE_PATH", local.join("node-producers/node_modules"))
            // EventBridge's service id names its endpoint variable.
            .env("AWS_ENDPOINT_URL_EVENTBRIDGE", &moto)
            .env("AWS_DEFAULT_REGION", &region)
            .env("FANOUT_QUEUE_URL", &self.queue.url)
            .envs(env.iter().copied())
            .output()
            .await
            .expect("run the example");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{args:?}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// `fanout run --exit-when-idle` over the queue, to its end.
    async fn run_worker(&self) -> worker::Run {
        worker::run_to_end(self.command(&["run", "--exit-when-idle"], [])).await
    }
}

/// An SNS topic with the jobs queue subscribed by `examples/sns/subscribe-queue.sh`.
async fn topic_feeding(stage: &Stage, raw: bool) -> String {
    let topic = support::sns()
        .await
        .create_topic()
        .name(support::unique("producers"))
        .send()
        .await
        .expect("create a topic")
        .topic_arn
        .expect("topic arn");
    let raw = raw.to_string();
    stage
        .producer(
            "sns/subscribe-queue.sh",
            &[],
            &[
                ("TOPIC_ARN", &topic),
                ("QUEUE_ARN", &stage.queue.arn),
                ("RAW", &raw),
            ],
        )
        .await;
    topic
}

#[tokio::test]
async fn each_producer_example_sends_a_job_fanout_delivers() {
    let stage = Stage::new(false).await;
    let everyone = stage.connect(4, None).await;
    let lobby = stage.connect(3, Some("lobby")).await;

    let direct: [(&str, &[&str]); 4] = [
        ("node/send-job.js", &["from node"]),
        ("python/send_job.py", &["from python", "lobby"]),
        ("cli/send-job.sh", &["from the \"cli\"\tas JSON"]),
        ("cli/send-job.sh", &["to the lobby", "lobby"]),
    ];
    for (script, args) in direct {
        stage.producer(script, args, &[]).await;
    }
    for (raw, text) in [(true, "from sns, raw"), (false, "from sns, enveloped")] {
        let topic = topic_feeding(&stage, raw).await;
        stage
            .producer("sns/publish-job.sh", &[text], &[("TOPIC_ARN", &topic)])
            .await;
    }
    let rule = support::unique("producers");
    stage
        .producer(
            "eventbridge/route-to-queue.sh",
            &[],
            &[("QUEUE_ARN", &stage.queue.arn), ("RULE_NAME", &rule)],
        )
        .await;
    stage
        .producer("eventbridge/put-event.sh", &["from eventbridge"], &[])
        .await;

    // What reached the queue is what each producer meant: the enveloped SNS
    // message is the only one in an envelope.
    let received = stage.jobs_on_queue().await;
    let bodies: Vec<String> = received.into_iter().map(|m| m.body).collect();
    assert_eq!(bodies.len(), 7, "{bodies:#?}");
    let enveloped_bodies = bodies
        .iter()
        .filter(|b| {
            serde_json::from_str::<serde_json::Value>(b)
                .is_ok_and(|v| v["Type"] == "Notification" && v.get("data").is_none())
        })
        .count();
    assert_eq!(enveloped_bodies, 1, "{bodies:#?}");

    let run = stage.run_worker().await;
    let for_everyone = [
        "from node",
        "from the \"cli\"\tas JSON",
        "from sns, raw",
        "from sns, enveloped",
        "from eventbridge",
    ];
    let for_lobby = ["from python", "to the lobby"];
    assert!(
        lobby.wait_for_frames(7, Duration::from_secs(10)).await,
        "{}",
        run.stdout
    );
    assert!(everyone.wait_for_frames(5, Duration::from_secs(10)).await);
    for client in everyone.clients() {
        let tally = client.tally();
        for text in for_everyone {
            assert_eq!(tally.text_count(text), 1, "{text:?} to {}", client.id());
        }
        assert_eq!(tally.frames(), 5, "nothing else: {:?}", tally.payloads);
    }
    for client in lobby.clients() {
        let tally = client.tally();
        for text in for_everyone.iter().chain(&for_lobby) {
            assert_eq!(tally.text_count(text), 1, "{text:?} to {}", client.id());
        }
        assert_eq!(tally.frames(), 7, "nothing else: {:?}", tally.payloads);
    }
    let by_id: BTreeMap<String, &serde_json::Value> = run
        .reports
        .iter()
        .map(|r| (r["job_id"].as_str().unwrap_or_default().to_owned(), r))
        .collect();
    assert_eq!(by_id.len(), 7, "one broadcast each: {}", run.stdout);
    for (id, report) in by_id {
        assert_eq!(report["failed"], 0, "{id}: {report}");
    }
    assert_eq!(support::counts(&stage.sqs, &stage.dlq.url).await, (0, 0));
    assert_eq!(support::counts(&stage.sqs, &stage.queue.url).await, (0, 0));
}

#[tokio::test]
async fn the_fifo_example_keeps_each_channels_order() {
    let stage = Stage::new(true).await;
    let mut red = stage.gateway.connect(Some("red")).await.0;
    let mut blue = stage.gateway.connect(Some("blue")).await.0;
    for n in 1..=3 {
        for channel in ["red", "blue"] {
            let text = format!("{channel} {n}");
            stage
                .producer("fifo/send-job.sh", &[channel, &text], &[])
                .await;
        }
    }
    let run = stage.run_worker().await;
    for (socket, channel) in [(&mut red, "red"), (&mut blue, "blue")] {
        for n in 1..=3 {
            let frame = local_support::next_frame(socket).await;
            assert_eq!(
                frame,
                Message::text(format!("{channel} {n}")),
                "{}",
                run.stdout
            );
        }
    }
    assert_eq!(support::counts(&stage.sqs, &stage.dlq.url).await, (0, 0));
}
