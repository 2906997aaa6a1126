//! `fanout dead-letters`: what is on the dead-letter queue, grouped by the
//! reason fanout gave each job (its `fanout.reason` attribute).
//!
//! SQS has no peek. The command receives messages with a short visibility
//! (hidden from other readers meanwhile), counts each message id once,
//! stops at `--max` messages or once receives bring nothing new, then makes
//! what it received visible again. The counts are a sample, approximate on
//! a large or busy queue, and each message seen has its receive count
//! raised by one.

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use fanout::config::Config;
use fanout_aws::{SqsQueue, clients};
use fanout_core::queue::{
    AttributeValue, JobQueue, MAX_BATCH, Message, QueueError, REASON_ATTRIBUTE,
};

use super::ConfigArg;

/// How long a sampled message stays hidden if it cannot be made visible
/// again at the end: long enough that the sample does not see it twice.
const SAMPLE_VISIBILITY: Duration = Duration::from_secs(30);

/// Receives in a row that bring no new message before the sample ends
/// (short polls may answer empty while messages wait).
const FRUITLESS_RECEIVES_TO_STOP: u32 = 3;

/// The group of messages that carry no reason: SQS's own redrive policy
/// moved them (a job received too often), not fanout.
const NO_REASON: &str = "(no fanout.reason: moved by the queue's redrive policy)";

#[derive(Args)]
pub struct DeadLettersArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Look at no more than this many messages.
    #[arg(long, default_value_t = 1000)]
    max: usize,
}

/// One reason's messages in the sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub count: usize,
    /// One message id with this reason, to look it up.
    pub example: String,
}

/// What a sample saw: distinct messages by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    pub seen: usize,
    pub groups: BTreeMap<String, Group>,
}

pub async fn dead_letters(args: DeadLettersArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(args.config.file.as_deref())?;
    let dead_letters = config.dead_letter_settings()?;
    let sdk = clients::load_sdk_config().await;
    let queue = SqsQueue::connect(&sdk, dead_letters);
    let sample = sample(&queue, args.max).await?;
    print!("{}", render(&sample, args.max));
    Ok(ExitCode::SUCCESS)
}

/// Receives up to `max` distinct messages, groups them by reason, and makes
/// them visible again.
pub async fn sample<Q: JobQueue>(queue: &Q, max: usize) -> Result<Sample, QueueError> {
    let mut seen = HashSet::new();
    let mut received = Vec::new();
    let mut sample = Sample::default();
    let mut fruitless = 0;
    while seen.len() < max && fruitless < FRUITLESS_RECEIVES_TO_STOP {
        let room = (max - seen.len()).min(MAX_BATCH);
        let batch = queue.receive(room, SAMPLE_VISIBILITY).await?;
        let before = seen.len();
        for message in batch {
            if seen.insert(message.id.clone()) {
                let group = sample
                    .groups
                    .entry(reason(&message))
                    .or_insert_with(|| Group {
                        count: 0,
                        example: message.id.clone(),
                    });
                group.count += 1;
            }
            received.push(message.receipt);
        }
        fruitless = if seen.len() == before {
            fruitless + 1
        } else {
            0
        };
    }
    sample.seen = seen.len();
    for receipt in &received {
        if let Err(error) = queue.set_visibility(receipt, Duration::ZERO).await {
            tracing::warn!(%error, "a sampled message shows again after its visibility timeout");
        }
    }
    Ok(sample)
}

fn reason(message: &Message) -> String {
    match message.attributes.get(REASON_ATTRIBUTE).map(|a| &a.value) {
        Some(AttributeValue::Text(reason)) => reason.clone(),
        _ => NO_REASON.to_owned(),
    }
}

/// The sample as text: the most frequent reason first.
pub fn render(sample: &Sample, max: usize) -> String {
    let mut groups: Vec<(&String, &Group)> = sample.groups.iter().collect();
    groups.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    let mut out = format!(
        "{} dead-lettered job(s) sampled{} (approximate: SQS has no peek)\n",
        sample.seen,
        if sample.seen >= max {
            format!(", stopped at --max {max}")
        } else {
            String::new()
        }
    );
    for (reason, group) in groups {
        out.push_str(&format!(
            "{:>6}  {reason}  (e.g. message {})\n",
            group.count, group.example
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(count: usize, example: &str) -> Group {
        Group {
            count,
            example: example.to_owned(),
        }
    }

    #[test]
    fn the_most_frequent_reason_comes_first_and_the_cap_is_said() {
        let sample = Sample {
            seen: 3,
            groups: [
                ("a rare one".to_owned(), group(1, "m-3")),
                ("not a valid job".to_owned(), group(2, "m-1")),
            ]
            .into(),
        };
        let text = render(&sample, 1000);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("3 dead-lettered job(s) sampled (approximate"),
            "{text}"
        );
        assert!(
            lines[1].contains("2  not a valid job  (e.g. message m-1)"),
            "{text}"
        );
        assert!(lines[2].contains("1  a rare one"), "{text}");
        assert!(render(&sample, 3).contains("stopped at --max 3"));
    }
}
