//! The typed configuration: the embedded defaults (`config/default.toml`),
//! overlaid by an optional `--config` file, overridden by `FANOUT_*`
//! environment variables, then validated into [`Config`] before anything is
//! built.
//!
//! Every error names the key and where its value came from (the defaults,
//! the file, or the exact environment variable), because the operator has to
//! find and fix it in an ECS task definition. A `FANOUT_*` variable that
//! names no key is an error too (`FANOUT_DEV_*` aside), and so is a key in
//! the file that is not one. What is left unset and can be derived from
//! other keys is, and [`Config::derived`] says so.
//!
//! # Layout
//!
//! - `keys`: the one declaration of the keys, with who needs each.
//! - `environment`: the check of the `FANOUT_*` variables.
//! - A file per section of `config/default.toml`, each with its keys'
//!   checks and the settings built from them: `queue`, `table`, `gateway`,
//!   `rate`, `telemetry`.
//! - `validate`: the shared checks and the walk that builds [`Config`];
//!   `render`: `check-config`'s output.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Serialize;

use fanout_aws::AudienceIndex;
pub use fanout_aws::SendPath;

mod environment;
mod gateway;
mod keys;
mod queue;
mod rate;
mod render;
mod table;
mod telemetry;
mod validate;

pub use environment::DEV_PREFIX;
use keys::Raw;
pub use keys::{KEYS, Key, Need, keys, required_help, setting_name};
use render::audience_indexes_text;
use validate::{Validator, from_figment};

/// The documented defaults, compiled in so the binary needs no file.
pub const DEFAULTS: &str = include_str!("../../../../config/default.toml");

/// The prefix of the environment overrides.
const ENV_PREFIX: &str = "FANOUT_";

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    pub queue_url: String,
    pub dead_letter_queue_url: Option<String>,
    /// Where broadcast reports go, if anywhere: an SQS queue, an SNS topic,
    /// or both.
    pub report_queue_url: Option<String>,
    pub report_topic_arn: Option<String>,
    /// Required by the worker only; see [`Config::worker_targets`].
    pub table: Option<String>,
    pub key_attribute: String,
    pub channel_index: Option<String>,
    pub channel_attribute: String,
    /// A GSI keyed by the id attribute: what a broadcast to everyone reads
    /// where a connection can have several rows.
    pub connection_index: Option<String>,
    /// How long after its start a connection may answer 410 because it is
    /// still connecting.
    #[serde(with = "humantime_serde")]
    pub connect_window: Duration,
    /// The row attribute holding a connection's start (epoch ms); `None`:
    /// no row is removed by age.
    pub connected_at_attribute: Option<String>,
    /// How far past API Gateway's two hours a row must be to count as
    /// certainly gone.
    #[serde(with = "humantime_serde")]
    pub expired_margin: Duration,
    /// Named audiences for jobs' `to`, in the order configured.
    #[serde(serialize_with = "audience_indexes_text")]
    pub audience_indexes: Vec<AudienceIndex>,
    /// Required by the worker only; see [`Config::worker_targets`].
    pub gateway_endpoint: Option<String>,
    /// Whether the endpoint may be plain `http://` to a host that is not
    /// loopback (anything on the way could answer 410 for every
    /// connection).
    pub gateway_allow_plain_http: bool,
    /// A private CA the gateway client trusts on top of the system's roots;
    /// the AWS clients keep the system's roots alone.
    pub gateway_ca_file: Option<PathBuf>,
    pub send_path: SendPath,
    /// `None`: no rate limit.
    pub rate_per_second: Option<u32>,
    /// The effective burst (the default already applied).
    pub rate_burst: u32,
    /// Whether 429s lower the send rate for a while (AIMD).
    pub adaptive_rate: bool,
    /// The fleet's total rate, shared by its tasks through `fleet_table`;
    /// `None`: each task sends at its own rate alone.
    pub fleet_rate_per_second: Option<u32>,
    pub fleet_table: Option<String>,
    /// This task's rate while the fleet table cannot be reached.
    pub fleet_fallback_rate: Option<u32>,
    /// Where run records are kept; `None`: no deduplication, no leases.
    pub checkpoint_table: Option<String>,
    /// How long a finished broadcast is remembered.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    pub max_in_flight: u32,
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    pub send_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub send_retry_base: Duration,
    #[serde(with = "humantime_serde")]
    pub send_retry_max: Duration,
    /// How long one connection may keep answering 429, from its first.
    #[serde(with = "humantime_serde")]
    pub throttle_deadline: Duration,
    /// Passes over a job's deferred connections before they go on in a
    /// continuation job.
    pub deferred_passes: u32,
    /// Continuations a connection may be deferred across before it is
    /// dead-lettered.
    pub deferred_limit: u32,
    pub page_size: u32,
    pub scan_segments: u32,
    /// Whole-table jobs are split into this many segment jobs (1: never).
    pub split_segments: u32,
    pub max_concurrent_jobs: u32,
    #[serde(with = "humantime_serde")]
    pub receive_wait: Duration,
    #[serde(with = "humantime_serde")]
    pub visibility_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub job_retry_base: Duration,
    #[serde(with = "humantime_serde")]
    pub job_retry_max: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub metrics_listen: std::net::SocketAddr,
    /// `None`: no EMF lines.
    #[serde(with = "humantime_serde")]
    pub emf_interval: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub health_max_age: Duration,
    pub metrics_service: String,
    /// How often a running broadcast logs its progress.
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
    /// The keys left unset whose values were derived from others, in key
    /// order; `check-config` prints how.
    #[serde(skip)]
    pub derived: Vec<Derived>,
}

/// A value the configuration derived because its key was left unset (or 0,
/// for `rate_burst`); a value set explicitly always wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Derived {
    pub key: &'static str,
    /// How, in words: "a third of visibility_timeout".
    pub how: String,
}

/// What the worker needs beyond the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerTargets {
    pub table: String,
    pub gateway_endpoint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: cannot read it: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("config key `{key}` (from {origin}): {reason}")]
    Invalid {
        key: String,
        /// Where the value came from: the defaults, a file, a variable.
        origin: String,
        reason: String,
    },
    #[error("config key `{key}` is required: set {env} or `{key}` in the file given with --config")]
    Missing { key: String, env: String },
    #[error(
        "environment variable {name} is not a fanout setting: did you mean {closest}? (see `fanout --help`; FANOUT_DEV_* is ignored)"
    )]
    UnknownVariable { name: String, closest: String },
}

impl Config {
    /// Loads the defaults, the optional file and the environment, and
    /// validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        environment::check(
            std::env::vars_os().map(|(name, _)| name.to_string_lossy().into_owned()),
        )?;
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if let Some(path) = file {
            // figment silently skips a missing file; an operator who names
            // one means it.
            std::fs::metadata(path).map_err(|e| ConfigError::File {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).only(keys()));
        let raw: Raw = figment.extract().map_err(|e| from_figment(&figment, e))?;
        Validator::new(&figment).validate(raw)
    }

    /// The table and endpoint, which `run` needs and `enqueue` does not.
    pub fn worker_targets(&self) -> Result<WorkerTargets, ConfigError> {
        let table = self.table.clone().ok_or_else(|| missing("table"))?;
        let gateway_endpoint = self
            .gateway_endpoint
            .clone()
            .ok_or_else(|| missing("gateway_endpoint"))?;
        Ok(WorkerTargets {
            table,
            gateway_endpoint,
        })
    }
}

/// A validated count as the code that uses it counts: validation bounds
/// every count far below `usize::MAX`.
fn count(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_uppercase())
}

fn missing(key: &str) -> ConfigError {
    ConfigError::Missing {
        key: key.to_owned(),
        env: env_name(key),
    }
}

#[cfg(test)]
// figment::Jail's closures return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests;
