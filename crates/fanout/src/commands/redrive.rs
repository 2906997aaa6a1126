//! `fanout redrive`: moves dead-lettered jobs back to the jobs queue.

use std::process::ExitCode;

use fanout::config::Config;
use fanout_aws::{SqsQueue, clients};
use fanout_core::queue;

use super::ConfigArg;

pub async fn redrive(arg: ConfigArg, max: u64) -> anyhow::Result<ExitCode> {
    let config = Config::load(arg.file.as_deref())?;
    let dead_letters = config.dead_letter_settings()?;
    let sdk = clients::load_sdk_config().await;
    let dead_letters = SqsQueue::connect(&sdk, dead_letters);
    let jobs = SqsQueue::connect(&sdk, config.jobs_short_polls());
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
