//! `fanout check-config`: loads and validates the configuration and prints
//! the effective values.

use std::process::ExitCode;

use fanout::config::Config;

use super::ConfigArg;

pub fn check_config(arg: ConfigArg) -> anyhow::Result<ExitCode> {
    let config = Config::load(arg.file.as_deref())?;
    config.worker_targets()?;
    print!("{}", config.to_redacted_toml());
    Ok(ExitCode::SUCCESS)
}
