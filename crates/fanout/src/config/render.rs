//! `check-config`'s output: the effective configuration as TOML, with any
//! credentials in URLs redacted and each derived value marked with how it
//! was derived.

use fanout_aws::AudienceIndex;

use super::Config;
use super::keys::keys;

impl Config {
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
                Some(v) => match config.derived.iter().find(|d| d.key == *key) {
                    Some(derived) => {
                        out.push_str(&format!("{key} = {v} # derived: {}\n", derived.how));
                    }
                    None => out.push_str(&format!("{key} = {v}\n")),
                },
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
pub(super) fn audience_indexes_text<S: serde::Serializer>(
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
