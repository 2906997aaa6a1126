//! One module per `fanout` command. Each takes its parsed arguments, loads
//! what it needs and returns the process's exit code; `main.rs` only parses
//! the command line and dispatches.

use std::path::PathBuf;

use clap::Args;

pub mod check_config;
pub mod dead_letters;
pub mod enqueue;
pub mod health;
pub mod redrive;
pub mod run;

#[derive(Args)]
pub struct ConfigArg {
    /// A TOML file overlaying the built-in defaults (config/default.toml).
    #[arg(long = "config", id = "config", value_name = "FILE")]
    pub file: Option<PathBuf>,
}
