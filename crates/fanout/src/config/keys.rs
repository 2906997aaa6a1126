//! The keys: [`Raw`], the configuration as read, declares each key once;
//! [`keys`] lists them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use fanout_aws::SendPath;

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

/// The configuration as read, before validation: the one declaration of
/// the keys ([`keys`] reads them from here). Each key's documentation and
/// default are in `config/default.toml`, checked against these fields by
/// the tests below, and its validation is in [`Validator::validate`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    pub(super) queue_url: Option<String>,
    pub(super) dead_letter_queue_url: Option<String>,
    pub(super) report_queue_url: Option<String>,
    pub(super) report_topic_arn: Option<String>,
    pub(super) table: Option<String>,
    pub(super) key_attribute: String,
    pub(super) channel_index: Option<String>,
    pub(super) channel_attribute: String,
    pub(super) connection_index: Option<String>,
    pub(super) connected_at_attribute: Option<String>,
    #[serde(with = "humantime_serde")]
    pub(super) connect_window: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) expired_margin: Duration,
    pub(super) audience_indexes: Option<AudienceIndexes>,
    pub(super) gateway_endpoint: Option<String>,
    pub(super) gateway_allow_plain_http: bool,
    pub(super) gateway_ca_file: Option<PathBuf>,
    pub(super) send_path: SendPath,
    pub(super) rate_per_second: u32,
    pub(super) rate_burst: u32,
    pub(super) adaptive_rate: bool,
    pub(super) fleet_rate_per_second: Option<u32>,
    pub(super) fleet_table: Option<String>,
    pub(super) fleet_fallback_rate: Option<u32>,
    pub(super) checkpoint_table: Option<String>,
    #[serde(with = "humantime_serde")]
    pub(super) dedup_window: Duration,
    pub(super) max_in_flight: u32,
    #[serde(with = "humantime_serde")]
    pub(super) send_timeout: Duration,
    pub(super) send_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub(super) send_retry_base: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) send_retry_max: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) throttle_deadline: Duration,
    pub(super) deferred_passes: u32,
    pub(super) deferred_limit: u32,
    pub(super) page_size: u32,
    pub(super) scan_segments: u32,
    pub(super) split_segments: u32,
    pub(super) max_concurrent_jobs: u32,
    #[serde(with = "humantime_serde")]
    pub(super) receive_wait: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) visibility_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) heartbeat_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) job_retry_base: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) job_retry_max: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) shutdown_grace: Duration,
    pub(super) metrics_listen: std::net::SocketAddr,
    #[serde(with = "humantime_serde")]
    pub(super) emf_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub(super) health_max_age: Duration,
    pub(super) metrics_service: String,
    #[serde(with = "humantime_serde")]
    pub(super) progress_interval: Duration,
}

/// `audience_indexes` as written: `name=index:attribute,…` (TOML or the
/// environment), or a TOML table of `name = "index:attribute"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum AudienceIndexes {
    Text(String),
    Table(std::collections::BTreeMap<String, String>),
}
