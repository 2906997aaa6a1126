//! `fanout enqueue`: builds a valid job from flags and sends it to the jobs
//! queue, with the worker's own checks, so a bad job fails here rather than
//! in the dead-letter queue.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use base64::Engine as _;
use clap::Args;

use fanout::config::Config;
use fanout_aws::{SqsQueue, clients};
use fanout_core::connection::expiry;
use fanout_core::job::{self, AudienceKeys, Capabilities, JobSpec, Order, deadline};
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
    /// `user=u-42`. Repeated with the same name, a list of keys (job
    /// format 2, at most 100), each reported reached or unreached.
    #[arg(long, value_name = "NAME=VALUE")]
    to: Vec<String>,
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
    /// Deliver nothing after this instant: RFC 3339 (2026-12-06T18:30:00Z)
    /// or epoch milliseconds, at most 14 days ahead. A job received later is
    /// settled `lapsed`, unsent; a broadcast running then stops. Needs every
    /// task on a version that reads job format 2.
    #[arg(long, value_name = "TIME")]
    deliver_by: Option<String>,
    /// Send even if the job breaks a limit (to test dead-lettering).
    #[arg(long)]
    unchecked: bool,
}

pub async fn enqueue(args: EnqueueArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(args.config.file.as_deref())?;
    let to = audience(&args.to)?;
    let mut spec = JobSpec {
        id: args.id,
        channel: args.channel,
        channels: (!args.channels.is_empty()).then_some(args.channels),
        to,
        connections: (!args.connections.is_empty()).then_some(args.connections),
        exclude: args.exclude,
        ..JobSpec::default()
    };
    if matches!(
        spec.to.as_ref().and_then(|to| to.values().next()),
        Some(AudienceKeys::Many(_))
    ) {
        spec.v = Some(2);
    }
    if let Some(time) = args.deliver_by {
        // Epoch milliseconds are a number in the job, RFC 3339 a string.
        spec.deliver_by = Some(match time.parse::<i64>() {
            Ok(ms) => serde_json::Value::from(ms),
            Err(_) => serde_json::Value::String(time),
        });
        spec.v = Some(2);
    }
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
        let job = job::validate(spec.clone(), "enqueue", &caps)
            .and_then(Order::into_job)
            .context("the job is not valid (--unchecked sends it anyway)")?;
        if let Some(deadline) = job.deliver_by {
            let now = expiry::epoch_ms(std::time::SystemTime::now());
            if deadline::due(deadline, now).context("--deliver-by")? == deadline::Due::Lapsed {
                anyhow::bail!(
                    "--deliver-by {} has passed already; the job would be settled lapsed, unsent",
                    fanout_core::runs::rfc3339(deadline)
                );
            }
        }
    }
    let options = fifo_options(&config.queue_url, spec.channel.as_deref());
    send(&config, &spec, options).await
}

/// `--to NAME=VALUE`, once (a key) or repeated with one name (a list).
fn audience(given: &[String]) -> anyhow::Result<Option<BTreeMap<String, AudienceKeys>>> {
    let mut name = None;
    let mut keys = Vec::new();
    for to in given {
        let Some((n, key)) = to.split_once('=') else {
            anyhow::bail!("--to takes NAME=VALUE, e.g. --to user=u-42");
        };
        if name.get_or_insert(n) != &n {
            anyhow::bail!("--to names one audience; repeat it with the same name for a list");
        }
        keys.push(key.to_owned());
    }
    let Some(name) = name else {
        return Ok(None);
    };
    let keys = match <[String; 1]>::try_from(keys) {
        Ok([one]) => AudienceKeys::One(one),
        Err(several) => AudienceKeys::Many(several),
    };
    Ok(Some(BTreeMap::from([(name.to_owned(), keys)])))
}

/// The arguments of `fanout cancel`.
#[derive(Args)]
pub struct CancelArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The broadcast key (the job's `id`) of the broadcast to stop.
    id: String,
}

/// `fanout cancel`: sends a cancel job for a broadcast key. On a FIFO queue
/// it goes in a group of its own, so it does not wait behind the broadcast.
pub async fn cancel(args: CancelArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(args.config.file.as_deref())?;
    let spec = JobSpec {
        v: Some(2),
        cancel: Some(args.id),
        ..JobSpec::default()
    };
    let caps = Capabilities {
        channels: true,
        audiences: None,
    };
    job::validate(spec.clone(), "cancel", &caps).context("the cancel is not valid")?;
    let options = fifo_options(&config.queue_url, Some(CANCEL_GROUP));
    send(&config, &spec, options).await
}

/// The FIFO message group `fanout cancel` uses: not a broadcast's own, in
/// which the cancel would wait until the broadcast is done.
pub const CANCEL_GROUP: &str = "fanout-cancel";

/// Sends `spec` and prints its message id.
async fn send(config: &Config, spec: &JobSpec, options: SendOptions) -> anyhow::Result<ExitCode> {
    let body = serde_json::to_string(spec).context("cannot encode the job")?;
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
