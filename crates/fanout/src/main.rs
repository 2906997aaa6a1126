//! The `fanout` binary: parses the command line and hands it to its command
//! in [`commands`]. No logic of its own.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use fanout::config::ConfigError;

mod commands;

use commands::ConfigArg;
use commands::enqueue::EnqueueArgs;

/// `fanout --version`: the package's version and the commit it was built
/// from (build.rs; "unknown" when neither git nor the image build named it).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("FANOUT_DEV_BUILD_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    version = VERSION,
    about = "Broadcasts SQS jobs to every live WebSocket client of an API Gateway WebSocket API",
    after_help = fanout::config::required_help()
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the worker: receive jobs, broadcast, remove gone connections.
    #[command(after_help = fanout::config::required_help())]
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Exit 0 once the queue is empty and no job is running.
        #[arg(long)]
        exit_when_idle: bool,
    },
    /// Builds a valid job and sends it to the jobs queue; prints its message id.
    Enqueue(Box<EnqueueArgs>),
    /// Sends a cancel job: stops the broadcast with this id on every task,
    /// now and whenever a piece of it comes later. Needs run records
    /// (FANOUT_CHECKPOINT_TABLE) on the workers; prints its message id.
    Cancel(commands::enqueue::CancelArgs),
    /// Loads and validates the configuration and prints the effective values.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Moves dead-lettered jobs back to the jobs queue (after fixing what
    /// failed them); prints how many moved.
    Redrive {
        #[command(flatten)]
        config: ConfigArg,
        /// Move at most this many.
        #[arg(long, default_value_t = u64::MAX, hide_default_value = true)]
        max: u64,
    },
    /// Lists the dead-letter queue's jobs grouped by the reason fanout gave.
    ///
    /// SQS has no peek: this receives messages with a short visibility,
    /// counts each message id once, stops at --max or when receives bring
    /// nothing new, then makes them visible again. The counts are an
    /// approximate sample, and each message's receive count goes up by one.
    DeadLetters(commands::dead_letters::DeadLettersArgs),
    /// Exits 0 if the worker on this host answers healthy (container health
    /// check).
    Health(fanout::metrics::HealthArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The core's errors and dead-letter reasons point at settings by the
    // names this binary reads them under.
    fanout_core::limits::setting::name_settings(fanout::config::setting_name);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fanout: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            // Bad configuration is the operator's to fix: exit 2, one line.
            if let Some(config_error) = e.downcast_ref::<ConfigError>() {
                eprintln!("fanout: {config_error}");
                return ExitCode::from(2);
            }
            eprintln!("fanout: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            config,
            exit_when_idle,
        } => commands::run::run(config, exit_when_idle).await,
        Command::Enqueue(args) => commands::enqueue::enqueue(*args).await,
        Command::Cancel(args) => commands::enqueue::cancel(args).await,
        Command::CheckConfig { config } => commands::check_config::check_config(config),
        Command::Redrive { config, max } => commands::redrive::redrive(config, max).await,
        Command::DeadLetters(args) => commands::dead_letters::dead_letters(args).await,
        Command::Health(args) => commands::health::health(args).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use fanout::config::Need;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_lists_the_required_settings_from_the_key_list() {
        let required: Vec<String> = fanout::config::KEYS
            .iter()
            .filter(|key| matches!(key.need, Need::Always | Need::Run))
            .map(|key| format!("FANOUT_{}", key.name.to_uppercase()))
            .collect();
        assert_eq!(
            required,
            [
                "FANOUT_QUEUE_URL",
                "FANOUT_TABLE",
                "FANOUT_GATEWAY_ENDPOINT"
            ]
        );
        let mut cli = Cli::command();
        let top = cli.render_long_help().to_string();
        let run = cli
            .find_subcommand_mut("run")
            .expect("a run command")
            .render_long_help()
            .to_string();
        for help in [&top, &run] {
            for variable in &required {
                assert!(help.contains(variable.as_str()), "{variable}: {help}");
            }
            assert!(help.contains("docs/configuration.md"), "{help}");
        }
    }

    #[test]
    fn the_version_names_the_package_version_and_a_commit() {
        let version = Cli::command().render_version().to_string();
        let commit = version
            .strip_prefix(&format!("fanout {} (commit ", env!("CARGO_PKG_VERSION")))
            .and_then(|rest| rest.trim_end().strip_suffix(')'))
            .unwrap_or_else(|| panic!("{version}"));
        assert!(
            commit == "unknown"
                || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())),
            "{version}"
        );
    }

    #[test]
    fn enqueue_takes_exactly_one_payload_source() {
        assert!(Cli::try_parse_from(["fanout", "enqueue"]).is_err());
        assert!(Cli::try_parse_from(["fanout", "enqueue", "--data", "a", "--json", "1"]).is_err());
        assert!(Cli::try_parse_from(["fanout", "enqueue", "-"]).is_ok());
        assert!(
            Cli::try_parse_from(["fanout", "enqueue", "--config", "f.toml", "--file", "p.bin"])
                .is_ok()
        );
    }
}
