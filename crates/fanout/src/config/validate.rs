//! The checks every section shares, the walk over the sections that builds
//! [`Config`], and the figment errors turned into errors that name the key
//! and where its value came from.

use std::cell::RefCell;

use figment::Figment;

use fanout_core::limits::{MAX_PAGE_SIZE, MAX_SCAN_SEGMENTS};

use super::keys::Raw;
use super::{Config, ConfigError, Derived, env_name, missing};

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

pub(super) fn from_figment(figment: &Figment, error: figment::Error) -> ConfigError {
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

pub(super) struct Validator<'a> {
    figment: &'a Figment,
    /// What the sections derived, in the order they did.
    derived: RefCell<Vec<Derived>>,
}

impl<'a> Validator<'a> {
    pub(super) fn new(figment: &'a Figment) -> Self {
        Self {
            figment,
            derived: RefCell::new(Vec::new()),
        }
    }

    /// Notes that `key` was left unset and derived as `how` says.
    pub(super) fn derive(&self, key: &'static str, how: impl Into<String>) {
        self.derived.borrow_mut().push(Derived {
            key,
            how: how.into(),
        });
    }
    pub(super) fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_owned(),
            origin: source_of(self.figment, key),
            reason: reason.into(),
        }
    }

    pub(super) fn url(
        &self,
        key: &str,
        value: Option<String>,
    ) -> Result<Option<String>, ConfigError> {
        let Some(value) = value else { return Ok(None) };
        let url = url::Url::parse(&value)
            .map_err(|e| self.invalid(key, format!("`{value}` is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(self.invalid(key, format!("`{value}` is not an http(s) URL")));
        }
        Ok(Some(value))
    }

    pub(super) fn non_empty(
        &self,
        key: &str,
        value: Option<String>,
    ) -> Result<Option<String>, ConfigError> {
        match value {
            Some(v) if v.trim().is_empty() => Err(self.invalid(key, "must not be empty")),
            other => Ok(other),
        }
    }

    pub(super) fn range(
        &self,
        key: &str,
        value: u32,
        min: u32,
        max: u32,
    ) -> Result<u32, ConfigError> {
        if (min..=max).contains(&value) {
            Ok(value)
        } else {
            Err(self.invalid(key, format!("{value} is outside {min}..={max}")))
        }
    }

    /// A text key that must not be empty.
    pub(super) fn required_text(&self, key: &str, value: String) -> Result<String, ConfigError> {
        Ok(self.non_empty(key, Some(value))?.unwrap_or_default())
    }

    /// Checks every key, section by section, and builds the [`Config`].
    /// A failure names the first bad key and where its value came from.
    pub(super) fn validate(&self, raw: Raw) -> Result<Config, ConfigError> {
        let queue_url = self
            .url("queue_url", raw.queue_url.clone())?
            .ok_or_else(|| missing("queue_url"))?;
        let (rate_per_second, rate_burst) = self.rate(&raw)?;
        let fleet = self.fleet(&raw, rate_per_second)?;
        self.check_sending(&raw)?;
        self.check_queue(&raw)?;
        let heartbeat_interval = self.heartbeat_interval(&raw)?;
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
            heartbeat_interval,
            job_retry_base: raw.job_retry_base,
            job_retry_max: raw.job_retry_max,
            shutdown_grace: raw.shutdown_grace,
            metrics_listen: raw.metrics_listen,
            emf_interval: (!raw.emf_interval.is_zero()).then_some(raw.emf_interval),
            health_max_age: raw.health_max_age,
            metrics_service: self.required_text("metrics_service", raw.metrics_service)?,
            progress_interval: raw.progress_interval,
            derived: self.derived.take(),
        })
    }
}
