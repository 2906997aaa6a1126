//! The typed configuration: the embedded defaults (`config/default.toml`),
//! overlaid by an optional `--config` file, overridden by `FANOUT_*`
//! environment variables, then validated into [`Config`] before anything is
//! built.
//!
//! Every error names the key and where its value came from (the defaults,
//! the file, or the exact environment variable), because the operator has to
//! find and fix it in an ECS task definition.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

pub use fanout_aws::SendPath;
use std::sync::Arc;

use fanout_aws::{
    AgeSettings, AudienceIndex, GatewayTrust, PlainHttp, QueueSettings, SendSettings, TableSettings,
};
use fanout_core::Backoff;
use fanout_core::budget::RateSettings;
use fanout_core::connection::expiry::{self, ExpiryRule};
use fanout_core::engine::EngineSettings;
use fanout_core::fleet::FleetSettings;
use fanout_core::job::Capabilities;
use fanout_core::worker::WorkerSettings;

use crate::metrics::MetricsSettings;

/// The documented defaults, compiled in so the binary needs no file.
pub const DEFAULTS: &str = include_str!("../../../config/default.toml");

/// The prefix of the environment overrides.
const ENV_PREFIX: &str = "FANOUT_";

/// Every key, as it appears in TOML (`FANOUT_` + upper case in the
/// environment): the fields of [`Raw`], where each key is declared once.
/// Other `FANOUT_*` variables (scripts use some) are ignored.
pub fn keys() -> &'static [&'static str] {
    static KEYS: std::sync::OnceLock<&'static [&'static str]> = std::sync::OnceLock::new();
    KEYS.get_or_init(field_names::<Raw>)
}

/// The field names serde's derive gives `T`, read by asking it to
/// deserialize from a deserializer that only records them.
fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Names(Option<&'static [&'static str]>);

    #[derive(Debug)]
    struct Recorded;
    impl std::fmt::Display for Recorded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names recorded")
        }
    }
    impl std::error::Error for Recorded {}
    impl serde::de::Error for Recorded {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Recorded
        }
    }

    impl<'de> serde::Deserializer<'de> for &mut Names {
        type Error = Recorded;

        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Recorded> {
            Err(Recorded)
        }

        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Recorded> {
            self.0 = Some(fields);
            Err(Recorded)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }

    let mut names = Names(None);
    let _ = T::deserialize(&mut names);
    names.0.expect("a struct with named fields")
}

use fanout_core::limits::{MAX_PAGE_SIZE, MAX_RECEIVE_WAIT, MAX_SCAN_SEGMENTS, MAX_VISIBILITY};

/// The configuration as read, before validation: the one declaration of
/// the keys ([`keys`] reads them from here). Each key's documentation and
/// default are in `config/default.toml`, checked against these fields by
/// the tests below, and its validation is in [`Validator::validate`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    queue_url: Option<String>,
    dead_letter_queue_url: Option<String>,
    report_queue_url: Option<String>,
    report_topic_arn: Option<String>,
    table: Option<String>,
    key_attribute: String,
    channel_index: Option<String>,
    channel_attribute: String,
    connection_index: Option<String>,
    connected_at_attribute: Option<String>,
    #[serde(with = "humantime_serde")]
    connect_window: Duration,
    #[serde(with = "humantime_serde")]
    expired_margin: Duration,
    audience_indexes: Option<AudienceIndexes>,
    gateway_endpoint: Option<String>,
    gateway_allow_plain_http: bool,
    gateway_ca_file: Option<PathBuf>,
    send_path: SendPath,
    rate_per_second: u32,
    rate_burst: u32,
    adaptive_rate: bool,
    fleet_rate_per_second: Option<u32>,
    fleet_table: Option<String>,
    fleet_fallback_rate: Option<u32>,
    checkpoint_table: Option<String>,
    #[serde(with = "humantime_serde")]
    dedup_window: Duration,
    max_in_flight: u32,
    #[serde(with = "humantime_serde")]
    send_timeout: Duration,
    send_attempts: u32,
    #[serde(with = "humantime_serde")]
    send_retry_base: Duration,
    #[serde(with = "humantime_serde")]
    send_retry_max: Duration,
    #[serde(with = "humantime_serde")]
    throttle_deadline: Duration,
    deferred_passes: u32,
    deferred_limit: u32,
    page_size: u32,
    scan_segments: u32,
    split_segments: u32,
    max_concurrent_jobs: u32,
    #[serde(with = "humantime_serde")]
    receive_wait: Duration,
    #[serde(with = "humantime_serde")]
    visibility_timeout: Duration,
    #[serde(with = "humantime_serde")]
    heartbeat_interval: Duration,
    #[serde(with = "humantime_serde")]
    job_retry_base: Duration,
    #[serde(with = "humantime_serde")]
    job_retry_max: Duration,
    #[serde(with = "humantime_serde")]
    shutdown_grace: Duration,
    metrics_listen: std::net::SocketAddr,
    #[serde(with = "humantime_serde")]
    emf_interval: Duration,
    #[serde(with = "humantime_serde")]
    health_max_age: Duration,
    metrics_service: String,
    #[serde(with = "humantime_serde")]
    progress_interval: Duration,
}

/// `audience_indexes` as written: `name=index:attribute,…` (TOML or the
/// environment), or a TOML table of `name = "index:attribute"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AudienceIndexes {
    Text(String),
    Table(std::collections::BTreeMap<String, String>),
}

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
}

/// The fleet keys, validated together.
struct FleetKeys {
    rate: u32,
    table: String,
    fallback: u32,
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
}

impl Config {
    /// Loads the defaults, the optional file and the environment, and
    /// validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
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
        Validator { figment: &figment }.validate(raw)
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

    /// The send budget's rate; `None` without a limit (a rate of 0, or a
    /// burst of 0).
    pub fn rate_settings(&self) -> Option<RateSettings> {
        Some(RateSettings {
            per_second: NonZeroU32::new(self.rate_per_second?)?,
            burst: NonZeroU32::new(self.rate_burst)?,
            adaptive: self.adaptive_rate,
        })
    }

    /// The jobs queue, with the dead-letter queue the worker copies poison
    /// jobs to.
    pub fn queue_settings(&self) -> QueueSettings {
        QueueSettings {
            url: self.queue_url.clone(),
            dead_letter_url: self.dead_letter_queue_url.clone(),
            receive_wait: self.receive_wait,
        }
    }

    /// How PostToConnection is sent to the worker's endpoint.
    pub fn send_settings(&self, targets: &WorkerTargets) -> SendSettings {
        SendSettings {
            path: self.send_path,
            endpoint: targets.gateway_endpoint.clone(),
            attempt_timeout: self.send_timeout,
            max_in_flight: count(self.max_in_flight),
            trust: GatewayTrust {
                allow_plain_http: self.gateway_allow_plain_http,
                ca_file: self.gateway_ca_file.clone(),
            },
        }
    }

    /// How this task takes part in a fleet's budget (`None` without one),
    /// with `task` its key in the fleet table.
    pub fn fleet_settings(&self, task: String) -> Option<(String, FleetSettings)> {
        let rate = NonZeroU32::new(self.fleet_rate_per_second?)?;
        let fallback = NonZeroU32::new(self.fleet_fallback_rate?)?;
        Some((
            self.fleet_table.clone()?,
            FleetSettings {
                rate,
                fallback,
                task,
            },
        ))
    }

    /// The configuration's advice that is not an error: settings that work
    /// but not as the operator likely means.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let (Some(fleet), Some(rate)) = (self.fleet_rate_per_second, self.rate_per_second)
            && rate < fleet
        {
            warnings.push(format!(
                "rate_per_second ({rate}) is under fleet_rate_per_second ({fleet}): a task alone cannot use the whole fleet rate"
            ));
        }
        warnings
    }

    /// How the engine sends, as the worker and the benchmarks run it.
    pub fn engine_settings(&self) -> EngineSettings {
        EngineSettings {
            send_backoff: Backoff {
                base: self.send_retry_base,
                max: self.send_retry_max,
                max_attempts: self.send_attempts,
            },
            throttle_deadline: self.throttle_deadline,
            deferred_passes: self.deferred_passes,
            pass_pause: self.send_retry_max,
            max_in_flight: count(self.max_in_flight),
            scan_segments: self.scan_segments,
            progress_interval: self.progress_interval,
            connect_window: self.connect_window,
        }
    }

    /// How the worker consumes the queue.
    pub fn worker_settings(&self, exit_when_idle: bool) -> WorkerSettings {
        WorkerSettings {
            max_concurrent_jobs: count(self.max_concurrent_jobs),
            visibility_timeout: self.visibility_timeout,
            heartbeat_interval: self.heartbeat_interval,
            job_retry: Backoff {
                base: self.job_retry_base,
                max: self.job_retry_max,
                max_attempts: 1,
            },
            shutdown_grace: self.shutdown_grace,
            exit_when_idle,
            deferred_limit: self.deferred_limit,
            capabilities: Capabilities {
                channels: self.channel_index.is_some(),
                audiences: Some(
                    self.audience_indexes
                        .iter()
                        .map(|a| a.name.clone())
                        .collect(),
                ),
            },
            split_segments: self.split_segments,
        }
    }

    /// How the connections table `table` is read.
    pub fn table_settings(&self, table: &str) -> TableSettings {
        TableSettings {
            table: table.to_owned(),
            key_attribute: self.key_attribute.clone(),
            channel_index: self.channel_index.clone(),
            channel_attribute: self.channel_attribute.clone(),
            audiences: self.audience_indexes.clone(),
            connection_index: self.connection_index.clone(),
            page_size: self.page_size,
            expiry: self
                .connected_at_attribute
                .as_ref()
                .map(|attribute| AgeSettings {
                    attribute: attribute.clone(),
                    rule: Arc::new(ExpiryRule::new(self.expired_margin)),
                }),
        }
    }

    /// Where and how the metrics are served.
    pub fn metrics_settings(&self) -> MetricsSettings {
        MetricsSettings {
            listen: self.metrics_listen,
            emf_interval: self.emf_interval,
            health_max_age: self.health_max_age,
            service: self.metrics_service.clone(),
        }
    }

    /// The configuration as TOML for `check-config`, with any credentials
    /// embedded in URLs redacted.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        for url in [
            Some(&mut shown.queue_url),
            shown.dead_letter_queue_url.as_mut(),
            shown.report_queue_url.as_mut(),
            shown.gateway_endpoint.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            *url = redact_url(url);
        }
        let mut out = toml_lines(&shown);
        if shown.rate_per_second.is_none() {
            out.push_str("rate_per_second = 0 # no limit\n");
        }
        out
    }
}

/// Renders a flat struct as `key = value` lines (figment reads TOML; writing
/// it needs no more than this).
fn toml_lines(config: &Config) -> String {
    let value = serde_json::to_value(config).unwrap_or_default();
    let mut out = String::new();
    if let serde_json::Value::Object(map) = value {
        for key in keys() {
            match map.get(*key) {
                Some(serde_json::Value::Null) | None => {}
                Some(v) => out.push_str(&format!("{key} = {v}\n")),
            }
        }
    }
    out
}

fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) if !url.username().is_empty() || url.password().is_some() => {
            let _ = url.set_username("REDACTED");
            let _ = url.set_password(None);
            url.to_string()
        }
        _ => raw.to_owned(),
    }
}

/// `audience_indexes` as it is written in the environment; absent when
/// none is configured.
fn audience_indexes_text<S: serde::Serializer>(
    indexes: &[AudienceIndex],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    if indexes.is_empty() {
        return serializer.serialize_none();
    }
    let text = indexes
        .iter()
        .map(|a| format!("{}={}:{}", a.name, a.index, a.attribute))
        .collect::<Vec<_>>()
        .join(",");
    serializer.serialize_str(&text)
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

/// Names where `key`'s value came from.
fn source_of(figment: &Figment, key: &str) -> String {
    match figment.find_metadata(key) {
        Some(meta) => describe_source(meta, key),
        None => "nowhere".to_owned(),
    }
}

fn describe_source(meta: &figment::Metadata, key: &str) -> String {
    use figment::Source;
    match &meta.source {
        Some(Source::File(path)) => format!("file {}", path.display()),
        Some(Source::Code(_)) | None if meta.name.contains("environment") => {
            format!("environment variable {}", env_name(key))
        }
        Some(Source::Custom(name)) => name.clone(),
        _ if meta.name.contains("environment") => {
            format!("environment variable {}", env_name(key))
        }
        _ if meta.name.contains("TOML source string") => "the built-in defaults".to_owned(),
        _ => meta.name.to_string(),
    }
}

fn from_figment(figment: &Figment, error: figment::Error) -> ConfigError {
    // Report the first error: one clear line beats a list.
    let error = error
        .into_iter()
        .next()
        .expect("a figment error has at least one entry");
    let key = error.path.join(".");
    let source = match &error.metadata {
        Some(meta) => describe_source(meta, &key),
        None if !key.is_empty() => source_of(figment, &key),
        None => "the configuration".to_owned(),
    };
    let key = if key.is_empty() {
        unknown_key(&error.kind).unwrap_or_else(|| "(top level)".to_owned())
    } else {
        key
    };
    ConfigError::Invalid {
        key,
        origin: source,
        reason: error.kind.to_string(),
    }
}

fn unknown_key(kind: &figment::error::Kind) -> Option<String> {
    match kind {
        figment::error::Kind::UnknownField(field, _) => Some(field.clone()),
        figment::error::Kind::MissingField(field) => Some(field.to_string()),
        _ => None,
    }
}

struct Validator<'a> {
    figment: &'a Figment,
}

impl Validator<'_> {
    fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_owned(),
            origin: source_of(self.figment, key),
            reason: reason.into(),
        }
    }

    fn url(&self, key: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
        let Some(value) = value else { return Ok(None) };
        let url = url::Url::parse(&value)
            .map_err(|e| self.invalid(key, format!("`{value}` is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(self.invalid(key, format!("`{value}` is not an http(s) URL")));
        }
        Ok(Some(value))
    }

    fn non_empty(&self, key: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
        match value {
            Some(v) if v.trim().is_empty() => Err(self.invalid(key, "must not be empty")),
            other => Ok(other),
        }
    }

    fn range(&self, key: &str, value: u32, min: u32, max: u32) -> Result<u32, ConfigError> {
        if (min..=max).contains(&value) {
            Ok(value)
        } else {
            Err(self.invalid(key, format!("{value} is outside {min}..={max}")))
        }
    }

    /// Checks every key, section by section, and builds the [`Config`].
    /// A failure names the first bad key and where its value came from.
    fn validate(&self, raw: Raw) -> Result<Config, ConfigError> {
        let queue_url = self
            .url("queue_url", raw.queue_url.clone())?
            .ok_or_else(|| missing("queue_url"))?;
        let (rate_per_second, rate_burst) = self.rate(&raw)?;
        let fleet = self.fleet(&raw, rate_per_second)?;
        self.check_sending(&raw)?;
        self.check_queue(&raw)?;
        self.check_telemetry(&raw)?;
        Ok(Config {
            queue_url,
            dead_letter_queue_url: self.url("dead_letter_queue_url", raw.dead_letter_queue_url)?,
            report_queue_url: self.url("report_queue_url", raw.report_queue_url)?,
            report_topic_arn: self.topic_arn("report_topic_arn", raw.report_topic_arn)?,
            table: self.non_empty("table", raw.table)?,
            key_attribute: self.required_text("key_attribute", raw.key_attribute)?,
            channel_index: self.non_empty("channel_index", raw.channel_index)?,
            channel_attribute: self.required_text("channel_attribute", raw.channel_attribute)?,
            connection_index: self.non_empty("connection_index", raw.connection_index)?,
            connect_window: self.connect_window(raw.connect_window)?,
            connected_at_attribute: self
                .non_empty("connected_at_attribute", raw.connected_at_attribute)?,
            expired_margin: self.expired_margin(raw.expired_margin)?,
            audience_indexes: self.audience_indexes(raw.audience_indexes)?,
            gateway_endpoint: self
                .gateway_endpoint(raw.gateway_endpoint, raw.gateway_allow_plain_http)?,
            gateway_allow_plain_http: raw.gateway_allow_plain_http,
            gateway_ca_file: self.gateway_ca_file(raw.gateway_ca_file)?,
            send_path: raw.send_path,
            rate_per_second,
            rate_burst,
            adaptive_rate: raw.adaptive_rate,
            fleet_rate_per_second: fleet.as_ref().map(|f| f.rate),
            fleet_table: fleet.as_ref().map(|f| f.table.clone()),
            fleet_fallback_rate: fleet.as_ref().map(|f| f.fallback),
            checkpoint_table: self.non_empty("checkpoint_table", raw.checkpoint_table)?,
            dedup_window: self.dedup_window(raw.dedup_window)?,
            max_in_flight: self.range("max_in_flight", raw.max_in_flight, 1, 100_000)?,
            send_timeout: raw.send_timeout,
            send_attempts: self.range("send_attempts", raw.send_attempts, 1, 100)?,
            throttle_deadline: raw.throttle_deadline,
            deferred_passes: self.range("deferred_passes", raw.deferred_passes, 0, 100)?,
            deferred_limit: self.range("deferred_limit", raw.deferred_limit, 0, 1000)?,
            send_retry_base: raw.send_retry_base,
            send_retry_max: raw.send_retry_max,
            page_size: self.range("page_size", raw.page_size, 1, MAX_PAGE_SIZE)?,
            scan_segments: self.range("scan_segments", raw.scan_segments, 1, MAX_SCAN_SEGMENTS)?,
            split_segments: self.range(
                "split_segments",
                raw.split_segments,
                1,
                MAX_SCAN_SEGMENTS,
            )?,
            max_concurrent_jobs: self.range(
                "max_concurrent_jobs",
                raw.max_concurrent_jobs,
                1,
                1000,
            )?,
            receive_wait: raw.receive_wait,
            visibility_timeout: raw.visibility_timeout,
            heartbeat_interval: raw.heartbeat_interval,
            job_retry_base: raw.job_retry_base,
            job_retry_max: raw.job_retry_max,
            shutdown_grace: raw.shutdown_grace,
            metrics_listen: raw.metrics_listen,
            emf_interval: (!raw.emf_interval.is_zero()).then_some(raw.emf_interval),
            health_max_age: raw.health_max_age,
            metrics_service: self.required_text("metrics_service", raw.metrics_service)?,
            progress_interval: raw.progress_interval,
        })
    }

    /// Between a second and ten minutes. Under the default, a first 410
    /// from a connection still connecting could remove its row: allowed for
    /// local tests, warned about.
    fn connect_window(&self, window: Duration) -> Result<Duration, ConfigError> {
        if window < Duration::from_secs(1) || window > Duration::from_secs(600) {
            return Err(self.invalid(
                "connect_window",
                format!(
                    "{} is outside 1s to 10m",
                    humantime::format_duration(window)
                ),
            ));
        }
        if window < fanout_core::engine::evidence::CONNECT_WINDOW {
            tracing::warn!(
                connect_window = %humantime::format_duration(window),
                "connect_window is under API Gateway's $connect timeouts plus clock skew (2m): a connection still connecting may be removed"
            );
        }
        Ok(window)
    }

    /// At least [`expiry::MIN_MARGIN`]: less would let a clock error the
    /// check lets through reach a live connection.
    fn expired_margin(&self, margin: Duration) -> Result<Duration, ConfigError> {
        if margin < expiry::MIN_MARGIN {
            return Err(self.invalid(
                "expired_margin",
                format!(
                    "{} is under the least margin, {}",
                    humantime::format_duration(margin),
                    humantime::format_duration(expiry::MIN_MARGIN)
                ),
            ));
        }
        Ok(margin)
    }

    /// A finished broadcast is remembered for at least a minute: a shorter
    /// window would not even cover a producer's retry after a timeout.
    fn dedup_window(&self, window: Duration) -> Result<Duration, ConfigError> {
        if window < Duration::from_secs(60) {
            return Err(self.invalid("dedup_window", "must be at least 1m"));
        }
        Ok(window)
    }

    /// An SNS topic's ARN (`arn:PARTITION:sns:REGION:ACCOUNT:NAME`).
    fn topic_arn(&self, key: &str, value: Option<String>) -> Result<Option<String>, ConfigError> {
        let Some(value) = value else { return Ok(None) };
        let parts: Vec<&str> = value.split(':').collect();
        let well_formed = parts.len() == 6
            && parts[0] == "arn"
            && parts[2] == "sns"
            && parts.iter().all(|p| !p.is_empty());
        if !well_formed {
            return Err(self.invalid(
                key,
                format!("`{value}` is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)"),
            ));
        }
        Ok(Some(value))
    }

    /// The named audiences: each a name, a GSI and its partition key, the
    /// names distinct.
    fn audience_indexes(
        &self,
        value: Option<AudienceIndexes>,
    ) -> Result<Vec<AudienceIndex>, ConfigError> {
        const KEY: &str = "audience_indexes";
        const SHAPE: &str = "name=index:attribute, e.g. user=by-user:userId";
        let entries: Vec<(String, String)> = match value {
            None => return Ok(Vec::new()),
            Some(AudienceIndexes::Table(table)) => table.into_iter().collect(),
            Some(AudienceIndexes::Text(text)) => text
                .split(',')
                .map(|entry| match entry.split_once('=') {
                    Some((name, rest)) => Ok((name.to_owned(), rest.to_owned())),
                    None => Err(self.invalid(KEY, format!("`{}` is not {SHAPE}", entry.trim()))),
                })
                .collect::<Result<_, _>>()?,
        };
        let mut indexes: Vec<AudienceIndex> = Vec::with_capacity(entries.len());
        for (name, rest) in entries {
            let name = name.trim();
            let Some((index, attribute)) = rest.split_once(':') else {
                return Err(self.invalid(KEY, format!("`{name}={}` is not {SHAPE}", rest.trim())));
            };
            let (index, attribute) = (index.trim(), attribute.trim());
            if name.is_empty() || index.is_empty() || attribute.is_empty() {
                return Err(self.invalid(
                    KEY,
                    format!("`{name}={index}:{attribute}` has an empty part; write {SHAPE}"),
                ));
            }
            if indexes.iter().any(|a| a.name == name) {
                return Err(self.invalid(KEY, format!("the audience `{name}` is named twice")));
            }
            indexes.push(AudienceIndex {
                name: name.to_owned(),
                index: index.to_owned(),
                attribute: attribute.to_owned(),
            });
        }
        Ok(indexes)
    }

    /// A text key that must not be empty.
    fn required_text(&self, key: &str, value: String) -> Result<String, ConfigError> {
        Ok(self.non_empty(key, Some(value))?.unwrap_or_default())
    }

    /// The management endpoint: a URL, and one fanout can send to, plain
    /// HTTP only to loopback unless `allow_plain_http`.
    fn gateway_endpoint(
        &self,
        value: Option<String>,
        allow_plain_http: bool,
    ) -> Result<Option<String>, ConfigError> {
        let endpoint = self.url("gateway_endpoint", value)?;
        let plain_http = if allow_plain_http {
            PlainHttp::Allowed
        } else {
            PlainHttp::LoopbackOnly
        };
        if let Some(endpoint) = &endpoint {
            fanout_aws::parse_endpoint(endpoint, plain_http)
                .map_err(|e| self.invalid("gateway_endpoint", e.to_string()))?;
        }
        Ok(endpoint)
    }

    /// The gateway's private CA: a readable PEM file of certificates that
    /// can be roots, checked now rather than at the first send.
    fn gateway_ca_file(&self, value: Option<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
        if let Some(path) = &value {
            if path.as_os_str().is_empty() {
                return Err(self.invalid("gateway_ca_file", "must not be empty"));
            }
            fanout_aws::check_ca_file(path)
                .map_err(|e| self.invalid("gateway_ca_file", e.to_string()))?;
        }
        Ok(value)
    }

    /// The rate (`None`: no limit) and its effective burst.
    fn rate(&self, raw: &Raw) -> Result<(Option<u32>, u32), ConfigError> {
        let rate_per_second = (raw.rate_per_second > 0).then_some(raw.rate_per_second);
        let rate_burst = match (rate_per_second, raw.rate_burst) {
            (None, _) => 0,
            (Some(rate), 0) => (rate / 100).max(50).min(rate),
            (Some(rate), burst) if burst > rate => {
                return Err(self.invalid(
                    "rate_burst",
                    format!("{burst} exceeds rate_per_second ({rate})"),
                ));
            }
            (Some(_), burst) => burst,
        };
        Ok((rate_per_second, rate_burst))
    }

    /// The fleet budget: all three keys or none, a per-task rate to cap, and
    /// a fallback within the fleet's rate.
    fn fleet(&self, raw: &Raw, rate: Option<u32>) -> Result<Option<FleetKeys>, ConfigError> {
        let table = self.non_empty("fleet_table", raw.fleet_table.clone())?;
        let Some(fleet_rate) = raw.fleet_rate_per_second else {
            for (key, set) in [
                ("fleet_table", table.is_some()),
                ("fleet_fallback_rate", raw.fleet_fallback_rate.is_some()),
            ] {
                if set {
                    return Err(self.invalid(key, "needs fleet_rate_per_second"));
                }
            }
            return Ok(None);
        };
        let fleet_rate = self.range("fleet_rate_per_second", fleet_rate, 1, 1_000_000)?;
        let table = table.ok_or_else(|| missing("fleet_table"))?;
        let fallback = raw
            .fleet_fallback_rate
            .ok_or_else(|| missing("fleet_fallback_rate"))?;
        let fallback = self.range("fleet_fallback_rate", fallback, 1, fleet_rate)?;
        if rate.is_none() {
            return Err(self.invalid(
                "rate_per_second",
                "must be more than 0 with fleet_rate_per_second: the fleet's share caps the task's rate",
            ));
        }
        Ok(Some(FleetKeys {
            rate: fleet_rate,
            table,
            fallback,
        }))
    }

    /// The send timeouts and backoff.
    fn check_sending(&self, raw: &Raw) -> Result<(), ConfigError> {
        if raw.throttle_deadline.is_zero() {
            return Err(self.invalid("throttle_deadline", "must be more than zero"));
        }
        if raw.send_timeout.is_zero() {
            return Err(self.invalid("send_timeout", "must be more than zero"));
        }
        if raw.send_retry_base > raw.send_retry_max {
            return Err(self.invalid(
                "send_retry_base",
                "must not exceed send_retry_max".to_owned(),
            ));
        }
        Ok(())
    }

    /// The queue's waits: long poll, visibility, heartbeat, retries, grace.
    fn check_queue(&self, raw: &Raw) -> Result<(), ConfigError> {
        if raw.receive_wait > MAX_RECEIVE_WAIT || raw.receive_wait.subsec_nanos() != 0 {
            return Err(self.invalid(
                "receive_wait",
                "must be whole seconds, at most 20s (SQS's long-poll limit)",
            ));
        }
        if raw.visibility_timeout < Duration::from_secs(2)
            || raw.visibility_timeout > MAX_VISIBILITY
        {
            return Err(self.invalid("visibility_timeout", "must be between 2s and 12h"));
        }
        if raw.heartbeat_interval < Duration::from_secs(1)
            || raw.heartbeat_interval >= raw.visibility_timeout
        {
            return Err(self.invalid(
                "heartbeat_interval",
                format!(
                    "must be at least 1s and shorter than visibility_timeout ({}), or jobs are redelivered while they run",
                    humantime::format_duration(raw.visibility_timeout)
                ),
            ));
        }
        if raw.job_retry_base > raw.job_retry_max || raw.job_retry_max > MAX_VISIBILITY {
            return Err(self.invalid(
                "job_retry_max",
                "must be at least job_retry_base and at most 12h",
            ));
        }
        if raw.shutdown_grace.is_zero() {
            return Err(self.invalid("shutdown_grace", "must be more than zero"));
        }
        Ok(())
    }

    /// The health check against the poll it watches, and the progress
    /// lines' pace.
    fn check_telemetry(&self, raw: &Raw) -> Result<(), ConfigError> {
        if raw.progress_interval < Duration::from_secs(1) {
            return Err(self.invalid(
                "progress_interval",
                "must be at least 1s: a line per broadcast that often is plenty",
            ));
        }
        if raw.health_max_age <= raw.receive_wait {
            return Err(self.invalid(
                "health_max_age",
                "must be longer than receive_wait, or an idle worker looks dead between polls",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
// figment::Jail's closures return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    const QUEUE: &str = "http://127.0.0.1:5320/000000000000/jobs";

    fn load_err(jail: &mut Jail, file: Option<&str>) -> String {
        let path = file.map(|f| jail.directory().join(f));
        Config::load(path.as_deref()).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_documented_and_valid() {
        Jail::expect_with(|jail| {
            jail.set_env("FANOUT_QUEUE_URL", QUEUE);
            let config = Config::load(None).expect("defaults load");
            assert_eq!(config.key_attribute, "connectionId");
            assert_eq!(config.channel_attribute, "channel");
            assert_eq!(config.rate_per_second, Some(1000));
            assert_eq!(config.rate_burst, 50);
            assert_eq!(config.max_in_flight, 256);
            assert_eq!(config.max_concurrent_jobs, 64);
            assert_eq!(config.shutdown_grace, Duration::from_secs(25));
            assert_eq!(config.receive_wait, Duration::from_secs(20));
            assert_eq!(config.dead_letter_queue_url, None);
            // Every key is written in the defaults file, set or commented.
            // The defaults file documents exactly the declared keys, each
            // set or commented out, none stale.
            let documented: std::collections::BTreeSet<&str> = DEFAULTS
                .lines()
                .filter_map(|line| {
                    let line = line.strip_prefix("# ").unwrap_or(line);
                    let (key, _) = line.split_once(" = ")?;
                    key.chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_')
                        .then_some(key)
                })
                .collect();
            let declared: std::collections::BTreeSet<&str> = keys().iter().copied().collect();
            assert_eq!(documented, declared);
            Ok(())
        });
    }

    #[test]
    fn the_configuration_doc_has_a_row_per_key_with_its_default() {
        const DOC: &str = include_str!("../../../docs/configuration.md");
        let defaults: std::collections::BTreeMap<String, figment::value::Value> =
            Figment::from(Toml::string(DEFAULTS))
                .extract()
                .expect("the defaults parse");
        for key in keys() {
            // A row names one variable, or a few that go together.
            let variable = format!("`{}`", env_name(key));
            let row = DOC
                .lines()
                .find(|line| {
                    line.starts_with("| `FANOUT_")
                        && line.split('|').nth(1).is_some_and(|names| {
                            names.split(',').any(|name| name.trim() == variable)
                        })
                })
                .unwrap_or_else(|| panic!("docs/configuration.md has no row for {variable}"));
            let default_cell = row.trim_end_matches('|').rsplit('|').next().unwrap();
            if let Some(value) = defaults.get(*key) {
                let text = match value {
                    figment::value::Value::String(_, s) => s.clone(),
                    other => other
                        .to_num()
                        .and_then(|n| n.to_i128())
                        .map(|n| n.to_string())
                        .or_else(|| other.to_bool().map(|b| b.to_string()))
                        .unwrap_or_default(),
                };
                assert!(
                    default_cell.contains(&text),
                    "docs/configuration.md gives {key}'s default as {default_cell:?}; config/default.toml has {text:?}"
                );
            }
        }
    }

    #[test]
    fn the_environment_overrides_the_file_which_overrides_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "fanout.toml",
                &format!("queue_url = \"{QUEUE}\"\nrate_per_second = 200\nmax_in_flight = 8\n"),
            )?;
            jail.set_env("FANOUT_MAX_IN_FLIGHT", "16");
            jail.set_env("FANOUT_TABLE", "connections");
            jail.set_env("FANOUT_GATEWAY_ENDPOINT", "http://127.0.0.1:9/dev");
            jail.set_env("FANOUT_SHUTDOWN_GRACE", "10s");
            // Unrelated FANOUT_* variables (the scripts' own) are ignored.
            jail.set_env("FANOUT_EMU_SQS_PORT", "5330");
            let path = jail.directory().join("fanout.toml");
            let config = Config::load(Some(&path)).expect("loads");
            assert_eq!(config.rate_per_second, Some(200));
            assert_eq!(config.rate_burst, 50);
            assert_eq!(config.max_in_flight, 16);
            assert_eq!(config.shutdown_grace, Duration::from_secs(10));
            let targets = config.worker_targets().expect("targets");
            assert_eq!(targets.table, "connections");
            Ok(())
        });
    }

    #[test]
    fn audience_indexes_come_as_text_or_a_table_and_bad_ones_name_the_key() {
        let index = |name: &str, index: &str, attribute: &str| AudienceIndex {
            name: name.into(),
            index: index.into(),
            attribute: attribute.into(),
        };
        Jail::expect_with(|jail| {
            jail.set_env("FANOUT_QUEUE_URL", QUEUE);
            let config = Config::load(None).expect("loads");
            assert!(config.audience_indexes.is_empty());
            assert_eq!(
                config.worker_settings(false).capabilities.audiences,
                Some(vec![])
            );
            jail.set_env(
                "FANOUT_AUDIENCE_INDEXES",
                "user=by-user:userId, tenant=by-tenant:tenantId",
            );
            let config = Config::load(None).expect("loads");
            assert_eq!(
                config.audience_indexes,
                [
                    index("user", "by-user", "userId"),
                    index("tenant", "by-tenant", "tenantId")
                ]
            );
            assert_eq!(
                config.worker_settings(false).capabilities.audiences,
                Some(vec!["user".to_owned(), "tenant".to_owned()])
            );
            assert!(
                config.to_redacted_toml().contains(
                    r#"audience_indexes = "user=by-user:userId,tenant=by-tenant:tenantId""#
                ),
                "check-config shows it as it is written"
            );
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("FANOUT_QUEUE_URL", QUEUE);
            jail.create_file(
                "fanout.toml",
                "[audience_indexes]\nuser = \"by-user:userId\"\n",
            )?;
            let path = jail.directory().join("fanout.toml");
            let config = Config::load(Some(&path)).expect("loads");
            assert_eq!(
                config.audience_indexes,
                [index("user", "by-user", "userId")]
            );
            Ok(())
        });
        for (value, says) in [
            ("user", "is not name=index:attribute"),
            ("user=by-user", "is not name=index:attribute"),
            ("user=by-user:", "empty part"),
            ("=by-user:userId", "empty part"),
            ("user=by-user:userId,", "is not name=index:attribute"),
            ("user=a:b,user=c:d", "named twice"),
        ] {
            Jail::expect_with(|jail| {
                jail.set_env("FANOUT_QUEUE_URL", QUEUE);
                jail.set_env("FANOUT_AUDIENCE_INDEXES", value);
                let err = load_err(jail, None);
                assert!(err.contains("audience_indexes"), "{value}: {err}");
                assert!(err.contains("FANOUT_AUDIENCE_INDEXES"), "{value}: {err}");
                assert!(err.contains(says), "{value}: {err}");
                Ok(())
            });
        }
    }

    #[test]
    fn a_missing_queue_url_names_the_variable() {
        Jail::expect_with(|jail| {
            let err = load_err(jail, None);
            assert!(err.contains("`queue_url` is required"), "{err}");
            assert!(err.contains("FANOUT_QUEUE_URL"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn report_destinations_are_optional_and_checked_and_progress_has_a_floor() {
        Jail::expect_with(|jail| {
            jail.set_env("FANOUT_QUEUE_URL", QUEUE);
            let config = Config::load(None).expect("loads");
            assert_eq!(
                (config.report_queue_url, config.report_topic_arn),
                (None, None)
            );
            assert_eq!(config.progress_interval, Duration::from_secs(10));
            jail.set_env(
                "FANOUT_REPORT_QUEUE_URL",
                "http://127.0.0.1:5320/000000000000/reports",
            );
            jail.set_env(
                "FANOUT_REPORT_TOPIC_ARN",
                "arn:aws:sns:eu-west-1:123456789012:reports",
            );
            jail.set_env("FANOUT_PROGRESS_INTERVAL", "5s");
            let config = Config::load(None).expect("loads");
            assert_eq!(
                config.engine_settings().progress_interval,
                Duration::from_secs(5)
            );
            assert!(config.report_queue_url.unwrap().ends_with("/reports"));
            assert!(config.report_topic_arn.unwrap().ends_with(":reports"));
            jail.set_env("FANOUT_REPORT_TOPIC_ARN", "reports");
            let err = load_err(jail, None);
            assert!(err.contains("FANOUT_REPORT_TOPIC_ARN"), "{err}");
            assert!(err.contains("not an SNS topic ARN"), "{err}");
            jail.set_env(
                "FANOUT_REPORT_TOPIC_ARN",
                "arn:aws:sqs:eu-west-1:123456789012:q",
            );
            assert!(load_err(jail, None).contains("not an SNS topic ARN"));
            jail.set_env(
                "FANOUT_REPORT_TOPIC_ARN",
                "arn:aws:sns:eu-west-1:123456789012:reports",
            );
            jail.set_env("FANOUT_REPORT_QUEUE_URL", "reports");
            assert!(load_err(jail, None).contains("FANOUT_REPORT_QUEUE_URL"));
            jail.set_env(
                "FANOUT_REPORT_QUEUE_URL",
                "http://127.0.0.1:5320/000000000000/reports",
            );
            jail.set_env("FANOUT_PROGRESS_INTERVAL", "0s");
            let err = load_err(jail, None);
            assert!(
                err.contains("FANOUT_PROGRESS_INTERVAL") && err.contains("at least 1s"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn the_worker_needs_a_table_and_an_endpoint() {
        Jail::expect_with(|jail| {
            jail.set_env("FANOUT_QUEUE_URL", QUEUE);
            let config = Config::load(None).expect("enough for enqueue");
            let err = config.worker_targets().unwrap_err().to_string();
            assert!(err.contains("FANOUT_TABLE"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_bad_env_value_names_the_variable() {
        Jail::expect_with(|jail| {
            jail.set_env("FANOUT_QUEUE_URL", QUEUE);
            jail.set_env("FANOUT_RATE_PER_SECOND", "fast");
            let err = load_err(jail, None);
            assert!(err.contains("rate_per_second"), "{err}");
            assert!(err.contains("FANOUT_RATE_PER_SECOND"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn an_unknown_file_key_is_refused_with_the_file_named() {
        Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "rate_per_secnd = 5\n")?;
            jail.set_env("FANOUT_QUEUE_URL", QUEUE);
            let err = load_err(jail, Some("bad.toml"));
            assert!(err.contains("rate_per_secnd"), "{err}");
            assert!(err.contains("bad.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        Jail::expect_with(|jail| {
            let err = load_err(jail, Some("nope.toml"));
            assert!(err.contains("nope.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_fleet_keys_go_together_and_name_what_is_missing() {
        let fleet = [
            ("FANOUT_FLEET_RATE_PER_SECOND", "2000"),
            ("FANOUT_FLEET_TABLE", "fleet"),
            ("FANOUT_FLEET_FALLBACK_RATE", "500"),
            ("FANOUT_RATE_PER_SECOND", "2000"),
        ];
        let with = |jail: &mut Jail, skip: &str, extra: &[(&str, &str)]| {
            jail.set_env("FANOUT_QUEUE_URL", QUEUE);
            for (var, value) in fleet.iter().chain(extra) {
                if *var != skip {
                    jail.set_env(var, value);
                }
            }
        };
        Jail::expect_with(|jail| {
            with(jail, "", &[]);
            let config = Config::load(None).expect("a full fleet config");
            let (table, settings) = config.fleet_settings("t-1".into()).expect("a fleet");
            assert_eq!(table, "fleet");
            assert_eq!((settings.rate.get(), settings.fallback.get()), (2000, 500));
            assert!(config.warnings().is_empty(), "{:?}", config.warnings());
            Ok(())
        });
        // (a key left out, keys set differently, what the error says)
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("FANOUT_FLEET_TABLE", &[], "FANOUT_FLEET_TABLE"),
            (
                "FANOUT_FLEET_FALLBACK_RATE",
                &[],
                "FANOUT_FLEET_FALLBACK_RATE",
            ),
            (
                "",
                &[("FANOUT_FLEET_FALLBACK_RATE", "3000")],
                "outside 1..=2000",
            ),
            (
                "",
                &[("FANOUT_RATE_PER_SECOND", "0")],
                "must be more than 0",
            ),
            (
                "FANOUT_FLEET_RATE_PER_SECOND",
                &[],
                "needs fleet_rate_per_second",
            ),
        ];
        for (skip, extra, expected) in cases {
            Jail::expect_with(|jail| {
                with(jail, skip, extra);
                let err = load_err(jail, None);
                assert!(
                    err.contains(expected),
                    "without {skip}, with {extra:?}: {err}"
                );
                Ok(())
            });
        }
        Jail::expect_with(|jail| {
            with(jail, "", &[("FANOUT_RATE_PER_SECOND", "1000")]);
            let config = Config::load(None).expect("a low ceiling is allowed");
            let warnings = config.warnings();
            assert!(
                warnings.len() == 1 && warnings[0].contains("cannot use the whole fleet rate"),
                "{warnings:?}"
            );
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("FANOUT_QUEUE_URL", QUEUE);
            let config = Config::load(None).expect("the defaults");
            assert!(
                config.fleet_settings("t".into()).is_none(),
                "no fleet by default"
            );
            Ok(())
        });
    }

    #[test]
    fn cross_field_checks_name_the_key_and_source() {
        let cases: &[(&str, &str, &str)] = &[
            ("FANOUT_HEARTBEAT_INTERVAL", "60s", "heartbeat_interval"),
            ("FANOUT_RECEIVE_WAIT", "21s", "receive_wait"),
            ("FANOUT_PAGE_SIZE", "5000", "page_size"),
            ("FANOUT_MAX_IN_FLIGHT", "0", "max_in_flight"),
            ("FANOUT_RATE_BURST", "5000", "rate_burst"),
            (
                "FANOUT_GATEWAY_ENDPOINT",
                "https://abc.execute-api.eu-west-1.amazonaws.com",
                "has no stage",
            ),
            ("FANOUT_GATEWAY_ENDPOINT", "abc", "not a URL"),
            (
                "FANOUT_DEAD_LETTER_QUEUE_URL",
                "ftp://x/y",
                "not an http(s) URL",
            ),
            ("FANOUT_SEND_RETRY_BASE", "1m", "send_retry_base"),
            ("FANOUT_TABLE", " ", "must not be empty"),
            ("FANOUT_METRICS_LISTEN", "localhost", "metrics_listen"),
            ("FANOUT_HEALTH_MAX_AGE", "5s", "health_max_age"),
            ("FANOUT_SEND_PATH", "fast", "send_path"),
        ];
        for (var, value, expected) in cases {
            Jail::expect_with(|jail| {
                jail.set_env("FANOUT_QUEUE_URL", QUEUE);
                jail.set_env(var, value);
                let err = load_err(jail, None);
                assert!(err.contains(expected), "{var}={value}: {err}");
                assert!(err.contains(var), "{var}={value}: source not named: {err}");
                Ok(())
            });
        }
    }

    #[test]
    fn stage_less_endpoints_outside_execute_api_are_accepted() {
        for endpoint in ["http://127.0.0.1:3001", "https://ws.example.com"] {
            Jail::expect_with(|jail| {
                jail.set_env("FANOUT_QUEUE_URL", QUEUE);
                jail.set_env("FANOUT_GATEWAY_ENDPOINT", endpoint);
                let config = Config::load(None).expect("loads");
                assert_eq!(config.gateway_endpoint.as_deref(), Some(endpoint));
                Ok(())
            });
        }
    }

    #[test]
    fn plain_http_beyond_loopback_needs_its_own_key() {
        Jail::expect_with(|jail| {
            jail.set_env("FANOUT_QUEUE_URL", QUEUE);
            jail.set_env("FANOUT_GATEWAY_ENDPOINT", "http://ws.internal:8080/prod");
            let err = load_err(jail, None);
            assert!(err.contains("config key `gateway_endpoint`"), "{err}");
            assert!(err.contains("FANOUT_GATEWAY_ENDPOINT"), "{err}");
            assert!(err.contains("FANOUT_GATEWAY_ALLOW_PLAIN_HTTP"), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
            jail.set_env("FANOUT_GATEWAY_ALLOW_PLAIN_HTTP", "true");
            jail.set_env("FANOUT_TABLE", "connections");
            let config = Config::load(None).expect("allowed");
            assert!(config.gateway_allow_plain_http);
            let targets = config.worker_targets().unwrap();
            assert!(config.send_settings(&targets).trust.allow_plain_http);
            Ok(())
        });
        for local in [
            "http://127.0.0.1:3001",
            "http://[::1]:3001/local",
            "http://localhost:8080/local",
        ] {
            Jail::expect_with(|jail| {
                jail.set_env("FANOUT_QUEUE_URL", QUEUE);
                jail.set_env("FANOUT_GATEWAY_ENDPOINT", local);
                let config = Config::load(None).expect("loopback needs no key");
                assert!(!config.gateway_allow_plain_http);
                Ok(())
            });
        }
    }

    #[test]
    fn the_gateway_ca_file_is_checked_at_startup_and_reaches_the_gateway_alone() {
        Jail::expect_with(|jail| {
            jail.set_env("FANOUT_QUEUE_URL", QUEUE);
            jail.set_env("FANOUT_TABLE", "connections");
            jail.set_env("FANOUT_GATEWAY_ENDPOINT", "https://ws.example.com");
            jail.set_env("FANOUT_GATEWAY_CA_FILE", "missing.pem");
            let err = load_err(jail, None);
            assert!(err.contains("config key `gateway_ca_file`"), "{err}");
            assert!(err.contains("FANOUT_GATEWAY_CA_FILE"), "{err}");
            jail.create_file("not-a-ca.pem", "hello\n")?;
            jail.set_env("FANOUT_GATEWAY_CA_FILE", "not-a-ca.pem");
            let err = load_err(jail, None);
            assert!(err.contains("holds no PEM certificate"), "{err}");
            let ca = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../aws/testdata/unit-test-ca.pem"
            );
            jail.set_env("FANOUT_GATEWAY_CA_FILE", ca);
            let config = Config::load(None).expect("a CA file");
            let targets = config.worker_targets().unwrap();
            let trust = config.send_settings(&targets).trust;
            assert_eq!(trust.ca_file.as_deref(), Some(Path::new(ca)));
            assert!(!trust.allow_plain_http);
            Ok(())
        });
    }

    #[test]
    fn zero_rate_means_no_limit() {
        Jail::expect_with(|jail| {
            jail.set_env("FANOUT_QUEUE_URL", QUEUE);
            jail.set_env("FANOUT_RATE_PER_SECOND", "0");
            let config = Config::load(None).expect("loads");
            assert_eq!(config.rate_per_second, None);
            Ok(())
        });
    }

    #[test]
    fn redaction_hides_credentials_in_urls() {
        Jail::expect_with(|jail| {
            jail.set_env(
                "FANOUT_QUEUE_URL",
                "https://user:secret@sqs.example.com/1/q",
            );
            let config = Config::load(None).expect("loads");
            let shown = config.to_redacted_toml();
            assert!(!shown.contains("secret"), "{shown}");
            assert!(
                shown.contains("queue_url = \"https://REDACTED@sqs.example.com/1/q\""),
                "{shown}"
            );
            assert!(shown.contains("max_in_flight = 256"), "{shown}");
            Ok(())
        });
    }
}
