//! The keys, each declared once, by [`declare_keys!`]: its name, its type
//! as read ([`Raw`]) and who needs it set ([`Need`]). The key list
//! ([`KEYS`]) and the struct serde reads cannot drift apart, and
//! `--help`, the environment check and the configuration doc's tests all
//! read the list.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use fanout_aws::SendPath;
use fanout_core::limits::setting::Setting;

/// Who needs a key set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Every command that reads the configuration.
    Always,
    /// `fanout run` (and `check-config`, which checks what `run` needs).
    Run,
    /// Most deployments set it; the default is a start.
    Common,
    /// Tuning and special cases: the default fits most deployments.
    Advanced,
}

/// One key: its TOML name (`FANOUT_` + upper case in the environment) and
/// who needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    pub need: Need,
}

/// Declares [`Raw`] with `deny_unknown_fields`, so a mistyped key in a file
/// is an error naming it, and [`KEYS`], in the same order.
macro_rules! declare_keys {
    ($($(#[$attr:meta])* $name:ident: $ty:ty => $need:ident,)*) => {
        /// The configuration as read, before validation. Each key's
        /// documentation and default are in `config/default.toml` (the
        /// tests check that file against [`KEYS`]); its checks are in the
        /// section that uses it.
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct Raw {
            $($(#[$attr])* pub(super) $name: $ty,)*
        }

        /// Every key, in the order of `config/default.toml`.
        pub const KEYS: &[Key] = &[$(Key { name: stringify!($name), need: Need::$need },)*];

        const NAMES: &[&str] = &[$(stringify!($name),)*];
    };
}

declare_keys! {
    queue_url: Option<String> => Always,
    dead_letter_queue_url: Option<String> => Common,
    report_queue_url: Option<String> => Advanced,
    report_topic_arn: Option<String> => Advanced,
    table: Option<String> => Run,
    key_attribute: String => Common,
    channel_index: Option<String> => Common,
    channel_attribute: String => Common,
    connection_index: Option<String> => Advanced,
    connected_at_attribute: Option<String> => Common,
    #[serde(with = "humantime_serde")]
    connect_window: Duration => Advanced,
    #[serde(with = "humantime_serde")]
    expired_margin: Duration => Advanced,
    audience_indexes: Option<AudienceIndexes> => Advanced,
    gateway_endpoint: Option<String> => Run,
    gateway_allow_plain_http: bool => Advanced,
    gateway_ca_file: Option<PathBuf> => Advanced,
    send_path: SendPath => Advanced,
    rate_per_second: u32 => Common,
    rate_burst: u32 => Advanced,
    adaptive_rate: bool => Advanced,
    fleet_rate_per_second: Option<u32> => Advanced,
    fleet_table: Option<String> => Advanced,
    fleet_fallback_rate: Option<u32> => Advanced,
    checkpoint_table: Option<String> => Common,
    #[serde(with = "humantime_serde")]
    dedup_window: Duration => Advanced,
    max_in_flight: u32 => Advanced,
    #[serde(with = "humantime_serde")]
    send_timeout: Duration => Advanced,
    send_attempts: u32 => Advanced,
    #[serde(with = "humantime_serde")]
    send_retry_base: Duration => Advanced,
    #[serde(with = "humantime_serde")]
    send_retry_max: Duration => Advanced,
    #[serde(with = "humantime_serde")]
    throttle_deadline: Duration => Advanced,
    deferred_passes: u32 => Advanced,
    deferred_limit: u32 => Advanced,
    page_size: u32 => Advanced,
    scan_segments: u32 => Advanced,
    split_segments: u32 => Advanced,
    max_concurrent_jobs: u32 => Advanced,
    #[serde(with = "humantime_serde")]
    receive_wait: Duration => Advanced,
    #[serde(with = "humantime_serde")]
    visibility_timeout: Duration => Advanced,
    #[serde(default, with = "humantime_serde")]
    heartbeat_interval: Option<Duration> => Advanced,
    #[serde(with = "humantime_serde")]
    job_retry_base: Duration => Advanced,
    #[serde(with = "humantime_serde")]
    job_retry_max: Duration => Advanced,
    #[serde(with = "humantime_serde")]
    shutdown_grace: Duration => Advanced,
    metrics_listen: std::net::SocketAddr => Advanced,
    #[serde(with = "humantime_serde")]
    emf_interval: Duration => Advanced,
    #[serde(with = "humantime_serde")]
    health_max_age: Duration => Advanced,
    metrics_service: String => Advanced,
    #[serde(with = "humantime_serde")]
    progress_interval: Duration => Advanced,
}

/// `--help`'s list of the settings without a default, generated from
/// [`KEYS`] so it cannot drift from them.
pub fn required_help() -> String {
    let mut help =
        String::from("Required settings (environment variables, or keys of the --config file):\n");
    for key in KEYS {
        let needed_by = match key.need {
            Need::Always => "every command but health",
            Need::Run => "run and check-config",
            Need::Common | Need::Advanced => continue,
        };
        let variable = format!("FANOUT_{}", key.name.to_uppercase());
        help.push_str(&format!("  {variable:<26} {needed_by}\n"));
    }
    help.push_str(
        "Every setting, with its default: docs/configuration.md; `fanout check-config` prints the effective values.",
    );
    help
}

/// Every key's name, as it appears in TOML.
pub fn keys() -> &'static [&'static str] {
    NAMES
}

/// `audience_indexes` as written: `name=index:attribute,…` (TOML or the
/// environment), or a TOML table of `name = "index:attribute"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum AudienceIndexes {
    Text(String),
    Table(std::collections::BTreeMap<String, String>),
}

/// The environment name of the key behind each setting the core's
/// messages point at (see [`fanout_core::limits::setting`]): the names
/// producers read in dead-letter reasons and operators in errors.
pub fn setting_name(setting: Setting) -> &'static str {
    match setting {
        Setting::Table => "FANOUT_TABLE",
        Setting::ChannelIndex => "FANOUT_CHANNEL_INDEX",
        Setting::AudienceIndexes => "FANOUT_AUDIENCE_INDEXES",
        Setting::ConnectedAtAttribute => "FANOUT_CONNECTED_AT_ATTRIBUTE",
        Setting::CheckpointTable => "FANOUT_CHECKPOINT_TABLE",
        Setting::RatePerSecond => "FANOUT_RATE_PER_SECOND",
        Setting::FleetRatePerSecond => "FANOUT_FLEET_RATE_PER_SECOND",
        Setting::FleetTable => "FANOUT_FLEET_TABLE",
    }
}
