//! `fanout health`: the container health check, a probe of the worker's
//! `/healthz` on this host.

use std::process::ExitCode;

use fanout::metrics::{self, HealthArgs};

pub async fn health(args: HealthArgs) -> anyhow::Result<ExitCode> {
    metrics::health(&args).await?;
    Ok(ExitCode::SUCCESS)
}
