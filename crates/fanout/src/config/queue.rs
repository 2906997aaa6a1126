//! The queues: the jobs queue, the dead-letter queue, the report
//! destinations, and how the worker consumes the jobs (long poll,
//! visibility, heartbeat, retries, shutdown).

use std::time::Duration;

use fanout_aws::QueueSettings;
use fanout_core::Backoff;
use fanout_core::job::Capabilities;
use fanout_core::limits::{MAX_RECEIVE_WAIT, MAX_VISIBILITY};
use fanout_core::worker::WorkerSettings;

use super::keys::Raw;
use super::validate::Validator;
use super::{Config, ConfigError, count, missing};

impl Config {
    /// The jobs queue, with the dead-letter queue the worker copies poison
    /// jobs to.
    pub fn queue_settings(&self) -> QueueSettings {
        QueueSettings {
            url: self.queue_url.clone(),
            dead_letter_url: self.dead_letter_queue_url.clone(),
            receive_wait: self.receive_wait,
        }
    }

    /// The dead-letter queue as the commands that read it (`dead-letters`,
    /// `redrive`) poll it: briefly, so that an empty queue ends them at once.
    pub fn dead_letter_settings(&self) -> Result<QueueSettings, ConfigError> {
        let url = self
            .dead_letter_queue_url
            .clone()
            .ok_or_else(|| missing("dead_letter_queue_url"))?;
        Ok(short_polls(url))
    }

    /// The jobs queue as `redrive` sees it: polled briefly, like the
    /// dead-letter queue it moves jobs from.
    pub fn jobs_short_polls(&self) -> QueueSettings {
        short_polls(self.queue_url.clone())
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
            clock: std::sync::Arc::default(),
        }
    }
}

/// A queue read with short polls and no dead-letter queue to copy to.
fn short_polls(url: String) -> QueueSettings {
    QueueSettings {
        url,
        dead_letter_url: None,
        receive_wait: Duration::ZERO,
    }
}

impl Validator<'_> {
    /// An SNS topic's ARN (`arn:PARTITION:sns:REGION:ACCOUNT:NAME`).
    pub(super) fn topic_arn(
        &self,
        key: &str,
        value: Option<String>,
    ) -> Result<Option<String>, ConfigError> {
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

    /// The queue's waits: long poll, visibility, retries, grace.
    pub(super) fn check_queue(&self, raw: &Raw) -> Result<(), ConfigError> {
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

    /// How often a running job's visibility is renewed: as set, or a third
    /// of the visibility timeout (at least 1s), which leaves two renewals'
    /// worth of slack before the message would show again. Called after
    /// [`Self::check_queue`] has checked the visibility timeout.
    pub(super) fn heartbeat_interval(&self, raw: &Raw) -> Result<Duration, ConfigError> {
        let Some(heartbeat) = raw.heartbeat_interval else {
            let third = Duration::from_millis(
                u64::try_from(raw.visibility_timeout.as_millis() / 3).unwrap_or(u64::MAX),
            );
            self.derive("heartbeat_interval", "a third of visibility_timeout");
            return Ok(third.max(Duration::from_secs(1)));
        };
        if heartbeat < Duration::from_secs(1) || heartbeat >= raw.visibility_timeout {
            return Err(self.invalid(
                "heartbeat_interval",
                format!(
                    "must be at least 1s and shorter than visibility_timeout ({}), or jobs are redelivered while they run",
                    humantime::format_duration(raw.visibility_timeout)
                ),
            ));
        }
        Ok(heartbeat)
    }
}
