//! The `fanout-dev` binary: the local API Gateway stand-in and the WebSocket
//! clients, for demos and tests on one machine. Not in the container image.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use fanout_aws::clients;

#[derive(Parser)]
#[command(
    version,
    about = "Development tools for fanout: a local API Gateway WebSocket API and WebSocket clients"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A local stand-in for an API Gateway WebSocket API (development, demos).
    Gateway(fanout_dev::gateway::GatewayArgs),
    /// Opens N WebSocket clients; on exit prints what they received as JSON.
    Clients(fanout_dev::clients::ClientsArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    match dispatch(Cli::parse().command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fanout-dev: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    // Text logs on stderr: these tools are watched by a person, and the
    // clients print their JSON summary on stdout.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let stop = CancellationToken::new();
    tokio::spawn(fanout_core::worker::cancel_on_signal(stop.clone()));
    match command {
        Command::Gateway(args) => {
            let sdk = clients::load_sdk_config().await;
            fanout_dev::gateway::run(args, clients::dynamodb_client(&sdk), stop.cancelled_owned())
                .await
                .context("the local gateway stopped")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Clients(args) => {
            let summary = fanout_dev::clients::run(args, stop.cancelled_owned()).await?;
            Ok(if summary.ok == Some(false) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
