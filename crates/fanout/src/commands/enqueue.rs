//! `fanout enqueue`: builds a valid job from flags and sends it to the jobs
//! queue, with the worker's own checks, so a bad job fails here rather than
//! in the dead-letter queue.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use base64::Engine as _;
use clap::Args;

use fanout::config::Config;
use fanout_aws::{SqsQueue, clients};
use fanout_core::job::{self, Capabilities, JobSpec};
use fanout_core::queue::{self, JobQueue, SendOptions};

use super::ConfigArg;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("payload").required(true)))]
pub struct EnqueueArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The message, sent as this text.
    #[arg(long, group = "payload")]
    data: Option<String>,
    /// The message, a JSON value sent as its compact JSON text.
    #[arg(long, group = "payload", value_name = "JSON")]
    json: Option<String>,
    /// The message, read from a file (text if UTF-8, else binary).
    #[arg(long, group = "payload", value_name = "PATH")]
    file: Option<PathBuf>,
    /// The message, read from standard input (text if UTF-8, else binary).
    #[arg(id = "stdin", value_name = "-", group = "payload", value_parser = clap::builder::PossibleValuesParser::new(["-"]))]
    stdin: Option<String>,
    /// Only connections in this channel.
    #[arg(long)]
    channel: Option<String>,
    /// Only connections in any of these channels, each once (comma
    /// separated or repeated).
    #[arg(long, value_name = "CHANNEL", value_delimiter = ',')]
    channels: Vec<String>,
    /// One named audience of FANOUT_AUDIENCE_INDEXES and its key, e.g.
    /// `user=u-42`.
    #[arg(long, value_name = "NAME=VALUE")]
    to: Option<String>,
    /// Only these connections (repeatable).
    #[arg(long = "connection", value_name = "ID")]
    connections: Vec<String>,
    /// Skip these connections (repeatable).
    #[arg(long, value_name = "ID")]
    exclude: Vec<String>,
    /// The broadcast's idempotency key: unique per broadcast. Under run
    /// records (FANOUT_CHECKPOINT_TABLE), a job whose id was broadcast within
    /// FANOUT_DEDUP_WINDOW (24 h) is dropped (same body) or dead-lettered
    /// (another body); a retry of the same broadcast keeps its id. Logs and
    /// reports name the broadcast by it. Default: the SQS message id.
    #[arg(long)]
    id: Option<String>,
    /// Send even if the job breaks a limit (to test dead-lettering).
    #[arg(long)]
    unchecked: bool,
}

pub async fn enqueue(args: EnqueueArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(args.config.file.as_deref())?;
    let to = match args.to.as_deref().map(|to| to.split_once('=')) {
        None => None,
        Some(Some((name, value))) => Some([(name.to_owned(), value.to_owned())].into()),
        Some(None) => anyhow::bail!("--to takes NAME=VALUE, e.g. --to user=u-42"),
    };
    let mut spec = JobSpec {
        id: args.id,
        channel: args.channel,
        channels: (!args.channels.is_empty()).then_some(args.channels),
        to,
        connections: (!args.connections.is_empty()).then_some(args.connections),
        exclude: args.exclude,
        ..JobSpec::default()
    };
    if let Some(text) = args.data {
        spec.data = Some(serde_json::Value::String(text));
    } else if let Some(json) = args.json {
        let value: serde_json::Value =
            serde_json::from_str(&json).context("--json is not valid JSON")?;
        spec.data = Some(value);
    } else {
        let bytes = match args.file {
            Some(path) => {
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?
            }
            None => {
                let mut bytes = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut bytes)
                    .context("cannot read standard input")?;
                bytes
            }
        };
        match String::from_utf8(bytes) {
            Ok(text) => spec.data = Some(serde_json::Value::String(text)),
            Err(e) => {
                spec.data_base64 =
                    Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
            }
        }
    }
    if !args.unchecked {
        // The same checks the worker makes, so a bad job fails here, not in
        // the dead-letter queue.
        // Channels and audience names are not checked: a producer's environment need not know
        // the worker's index; the worker dead-letters such a job itself.
        let caps = Capabilities {
            channels: true,
            audiences: None,
        };
        job::validate(spec.clone(), "enqueue", &caps)
            .context("the job is not valid (--unchecked sends it anyway)")?;
    }
    let body = serde_json::to_string(&spec).context("cannot encode the job")?;
    let options = fifo_options(&config.queue_url, spec.channel.as_deref());
    let sdk = clients::load_sdk_config().await;
    let queue = SqsQueue::connect(&sdk, config.queue_settings());
    let message_id = queue
        .send(&body, &options)
        .await
        .context("cannot send the job")?;
    println!("{message_id}");
    Ok(ExitCode::SUCCESS)
}

/// FIFO queues order per message group: one group per channel keeps a
/// channel's broadcasts in order.
fn fifo_options(queue_url: &str, channel: Option<&str>) -> SendOptions {
    if !queue::is_fifo(queue_url) {
        return SendOptions::default();
    }
    SendOptions {
        group_id: Some(channel.unwrap_or("all").to_owned()),
        deduplication_id: Some(format!("{:032x}", rand::random::<u128>())),
        ..SendOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_queues_get_a_group_per_channel() {
        let std = fifo_options("https://sqs/1/jobs", Some("c"));
        assert!(std.group_id.is_none() && std.deduplication_id.is_none());
        let fifo = fifo_options("https://sqs/1/jobs.fifo", Some("c"));
        assert_eq!(fifo.group_id.as_deref(), Some("c"));
        assert!(fifo.deduplication_id.is_some());
        assert_eq!(
            fifo_options("https://sqs/1/jobs.fifo", None)
                .group_id
                .as_deref(),
            Some("all")
        );
        let slashed = fifo_options("https://sqs/1/jobs.fifo/", Some("c"));
        assert_eq!(slashed.group_id.as_deref(), Some("c"), "a trailing slash");
    }
}
