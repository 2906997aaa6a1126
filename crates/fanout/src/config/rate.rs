//! The send rate: the task's ceiling, its burst, the adaptive rate, and
//! the fleet budget shared through the fleet table.

use std::num::NonZeroU32;

use fanout_core::budget::RateSettings;
use fanout_core::fleet::FleetSettings;

use super::keys::Raw;
use super::validate::Validator;
use super::{Config, ConfigError, missing};

/// The fleet size an unset `fleet_fallback_rate` is derived for: the
/// template's default most tasks. Every task on its fallback at once then
/// stays within the fleet's rate.
const FALLBACK_TASKS: u32 = 10;

/// The fleet keys, validated together.
pub(super) struct FleetKeys {
    pub(super) rate: u32,
    pub(super) table: String,
    pub(super) fallback: u32,
}

impl Config {
    /// The send budget's rate; `None` without a limit (a rate of 0, or a
    /// burst of 0).
    pub fn rate_settings(&self) -> Option<RateSettings> {
        Some(RateSettings {
            per_second: NonZeroU32::new(self.rate_per_second?)?,
            burst: NonZeroU32::new(self.rate_burst)?,
            adaptive: self.adaptive_rate,
        })
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
}

impl Validator<'_> {
    /// The rate (`None`: no limit) and its effective burst.
    pub(super) fn rate(&self, raw: &Raw) -> Result<(Option<u32>, u32), ConfigError> {
        let rate_per_second = (raw.rate_per_second > 0).then_some(raw.rate_per_second);
        let rate_burst = match (rate_per_second, raw.rate_burst) {
            (None, _) => 0,
            (Some(rate), 0) => {
                self.derive("rate_burst", "1% of rate_per_second, at least 50");
                (rate / 100).max(50).min(rate)
            }
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
    pub(super) fn fleet(
        &self,
        raw: &Raw,
        rate: Option<u32>,
    ) -> Result<Option<FleetKeys>, ConfigError> {
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
        let fallback = match raw.fleet_fallback_rate {
            Some(fallback) => self.range("fleet_fallback_rate", fallback, 1, fleet_rate)?,
            None => {
                self.derive(
                    "fleet_fallback_rate",
                    format!(
                        "fleet_rate_per_second ÷ {FALLBACK_TASKS}: within the fleet rate for up to {FALLBACK_TASKS} tasks; set it for more"
                    ),
                );
                (fleet_rate / FALLBACK_TASKS).max(1)
            }
        };
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
}
