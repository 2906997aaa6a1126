//! Health and metrics: where `/metrics` and `/healthz` listen, the EMF
//! lines, the health bound and the progress lines' pace.

use std::time::Duration;

use crate::metrics::MetricsSettings;

use super::keys::Raw;
use super::validate::Validator;
use super::{Config, ConfigError};

impl Config {
    /// Where and how the metrics are served.
    pub fn metrics_settings(&self) -> MetricsSettings {
        MetricsSettings {
            listen: self.metrics_listen,
            emf_interval: self.emf_interval,
            health_max_age: self.health_max_age,
            service: self.metrics_service.clone(),
        }
    }
}

impl Validator<'_> {
    /// The health check against the poll it watches, and the progress
    /// lines' pace.
    pub(super) fn check_telemetry(&self, raw: &Raw) -> Result<(), ConfigError> {
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
