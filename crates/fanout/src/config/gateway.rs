//! Sending: the management endpoint and its trust, the send path, and the
//! engine's timeouts, retries and deferred passes.

use std::path::PathBuf;

use fanout_aws::{GatewayTrust, PlainHttp, SendSettings};
use fanout_core::Backoff;
use fanout_core::engine::EngineSettings;

use super::keys::Raw;
use super::validate::Validator;
use super::{Config, ConfigError, WorkerTargets, count};

impl Config {
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
}

impl Validator<'_> {
    /// The management endpoint: a URL, and one fanout can send to, plain
    /// HTTP only to loopback unless `allow_plain_http`.
    pub(super) fn gateway_endpoint(
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
    pub(super) fn gateway_ca_file(
        &self,
        value: Option<PathBuf>,
    ) -> Result<Option<PathBuf>, ConfigError> {
        if let Some(path) = &value {
            if path.as_os_str().is_empty() {
                return Err(self.invalid("gateway_ca_file", "must not be empty"));
            }
            fanout_aws::check_ca_file(path)
                .map_err(|e| self.invalid("gateway_ca_file", e.to_string()))?;
        }
        Ok(value)
    }

    /// The send timeouts and backoff.
    pub(super) fn check_sending(&self, raw: &Raw) -> Result<(), ConfigError> {
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
}
