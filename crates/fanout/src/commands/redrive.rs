//! `fanout redrive`: moves dead-lettered jobs back to the jobs queue.

use std::process::ExitCode;
use std::time::Duration;

use fanout::config::{Config, ConfigError};
use fanout_aws::{QueueSettings, SqsQueue, clients};
use fanout_core::queue;

use super::ConfigArg;

pub async fn redrive(arg: ConfigArg, max: u64) -> anyhow::Result<ExitCode> {
    let config = Config::load(arg.file.as_deref())?;
    let Some(dead_letters_url) = config.dead_letter_queue_url.clone() else {
        return Err(ConfigError::Missing {
            key: "dead_letter_queue_url".into(),
            env: "FANOUT_DEAD_LETTER_QUEUE_URL".into(),
        }
        .into());
    };
    let sdk = clients::load_sdk_config().await;
    // Short polls: an empty dead-letter queue ends the command at once.
    let short_polls = |url: String| QueueSettings {
        url,
        dead_letter_url: None,
        receive_wait: Duration::ZERO,
    };
    let dead_letters = SqsQueue::connect(&sdk, short_polls(dead_letters_url));
    let jobs = SqsQueue::connect(&sdk, short_polls(config.queue_url.clone()));
    let fifo_group = queue::is_fifo(&config.queue_url).then_some("redriven");
    let done = fanout_core::queue::redrive(&dead_letters, &jobs, max, fifo_group).await?;
    println!("moved {} job(s) back to the jobs queue", done.moved);
    if done.left_behind > 0 {
        println!(
            "{} job(s) were sent again but are also still in the dead-letter queue",
            done.left_behind
        );
    }
    Ok(ExitCode::SUCCESS)
}
