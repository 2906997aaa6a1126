//! The connections table and what is read from it: the key and channel
//! attributes, the indexes, the named audiences, the age rule, and the run
//! records' table.

use std::sync::Arc;
use std::time::Duration;

use fanout_aws::{AgeSettings, AudienceIndex, TableSettings};
use fanout_core::connection::expiry::{self, ExpiryRule};

use super::keys::AudienceIndexes;
use super::validate::Validator;
use super::{Config, ConfigError};

impl Config {
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
}

impl Validator<'_> {
    /// Between a second and ten minutes. Under the default, a first 410
    /// from a connection still connecting could remove its row: allowed for
    /// local tests, warned about.
    pub(super) fn connect_window(&self, window: Duration) -> Result<Duration, ConfigError> {
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
    pub(super) fn expired_margin(&self, margin: Duration) -> Result<Duration, ConfigError> {
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
    pub(super) fn dedup_window(&self, window: Duration) -> Result<Duration, ConfigError> {
        if window < Duration::from_secs(60) {
            return Err(self.invalid("dedup_window", "must be at least 1m"));
        }
        Ok(window)
    }

    /// The named audiences: each a name, a GSI and its partition key, the
    /// names distinct.
    pub(super) fn audience_indexes(
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
}
