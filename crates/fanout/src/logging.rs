//! JSON logs on stdout, one object per event, for CloudWatch Logs.

use tracing_subscriber::EnvFilter;

/// Installs the JSON log subscriber on stdout. `RUST_LOG` filters it
/// (default `info`).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .init();
}
