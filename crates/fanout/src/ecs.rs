//! ECS task scale-in protection: while a broadcast runs, the task asks its
//! ECS agent not to be chosen when the service scales in, so a scale-in
//! never stops a job halfway.
//!
//! The agent listens at `$ECS_AGENT_URI` inside every ECS task;
//! `PUT {ECS_AGENT_URI}/task-protection/v1/state` with
//! `{"ProtectionEnabled":true,"ExpiresInMinutes":N}` turns protection on.
//! Outside ECS the variable is unset and there is nothing to do.
//!
//! Protection is an optimisation, never a precondition: every failure is
//! logged and the worker carries on (SIGTERM handling still hands unfinished
//! jobs back to the queue).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::Mutex;

use fanout_core::telemetry::Metrics;

/// The variable ECS sets in every task (agent 1.43+, Fargate 1.4+).
pub const AGENT_URI_VAR: &str = "ECS_AGENT_URI";

/// The agent accepts 1 to 2880 minutes (48 h).
const EXPIRES_RANGE: std::ops::RangeInclusive<u32> = 1..=2880;

/// A job longer than this keeps its protection by renewal (see
/// [`TaskProtection::set`]); a task that dies without turning it off is
/// stuck protected at most this long.
pub const DEFAULT_EXPIRES_IN_MINUTES: u32 = 60;

/// How long one call to the agent may take. The agent is local: seconds
/// mean it is unwell, and the worker must not wait on it.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Failures talking to the ECS agent. Logged by [`TaskProtection::set`],
/// never fatal.
#[derive(Debug, thiserror::Error)]
pub enum EcsError {
    #[error(
        "{AGENT_URI_VAR} is not a usable URL ({uri:?}): {reason}; it is set by the ECS agent, so unset it outside ECS"
    )]
    BadAgentUri { uri: String, reason: String },
    #[error(
        "task protection expiry of {0} minutes is outside 1..=2880; pick a value in that range"
    )]
    BadExpiry(u32),
    #[error(
        "the ECS agent could not be reached ({0}); check that the task runs on a platform with task protection (Fargate 1.4+, agent 1.43+)"
    )]
    Unreachable(String),
    #[error("the ECS agent did not answer within {AGENT_TIMEOUT:?}")]
    Timeout,
    #[error(
        "the ECS agent refused task protection (HTTP {status}): {body}; only tasks of an ECS service can be protected, not standalone tasks"
    )]
    Refused { status: u16, body: String },
}

/// The request body the agent expects.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct ProtectionRequest {
    protection_enabled: bool,
    /// Only sent when enabling: the agent ignores it otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in_minutes: Option<u32>,
}

/// What the agent last accepted, so unchanged states cost nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Accepted {
    enabled: bool,
    /// When it was accepted: enabled protection is renewed at half its
    /// expiry, so a long broadcast stays protected.
    at: Instant,
}

/// A handle on the task's scale-in protection. Cheap to share behind an
/// `Arc`; calls are serialised so the agent sees them in order.
#[derive(Debug)]
pub struct TaskProtection {
    /// `{ECS_AGENT_URI}/task-protection/v1/state`.
    endpoint: Uri,
    expires_in_minutes: u32,
    client: Client<HttpConnector, Full<Bytes>>,
    /// `None` until the agent accepted a state, and again after a failure,
    /// so the next `set` tries again whatever it asks for.
    accepted: Mutex<Option<Accepted>>,
}

impl TaskProtection {
    /// The task's protection when running on ECS (`ECS_AGENT_URI` set),
    /// `None` elsewhere. A malformed variable is logged and treated as unset:
    /// protection must never stop the worker from starting.
    pub fn from_env(expires_in_minutes: u32) -> Option<Self> {
        let uri = std::env::var(AGENT_URI_VAR).ok()?;
        match Self::new(&uri, expires_in_minutes) {
            Ok(protection) => Some(protection),
            Err(error) => {
                tracing::warn!(%error, "task scale-in protection disabled");
                None
            }
        }
    }

    /// Protection through the agent at `agent_uri` (the value of
    /// `ECS_AGENT_URI`), lasting `expires_in_minutes` unless renewed.
    pub fn new(agent_uri: &str, expires_in_minutes: u32) -> Result<Self, EcsError> {
        if !EXPIRES_RANGE.contains(&expires_in_minutes) {
            return Err(EcsError::BadExpiry(expires_in_minutes));
        }
        let bad = |reason: String| EcsError::BadAgentUri {
            uri: agent_uri.to_owned(),
            reason,
        };
        let endpoint: Uri = format!(
            "{}/task-protection/v1/state",
            agent_uri.trim_end_matches('/')
        )
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| bad(e.to_string()))?;
        if endpoint.scheme_str() != Some("http") {
            // The agent speaks plain HTTP on a link-local address; this
            // client carries no TLS.
            return Err(bad("expected an http:// URL".to_owned()));
        }
        let client = Client::builder(TokioExecutor::new()).build_http();
        Ok(Self {
            endpoint,
            expires_in_minutes,
            client,
            accepted: Mutex::new(None),
        })
    }

    /// Turns protection on or off, calling the agent only when the state
    /// changes (or enabled protection is due for renewal). Failures are
    /// logged and forgotten; the next call tries again.
    pub async fn set(&self, enabled: bool) {
        if let Err(error) = self.try_set(enabled).await {
            tracing::warn!(%error, enabled, "task scale-in protection not updated");
        }
    }

    /// Like [`set`](Self::set), but returns the failure. `Ok(true)` when the
    /// agent was called, `Ok(false)` when nothing needed doing.
    pub async fn try_set(&self, enabled: bool) -> Result<bool, EcsError> {
        let mut accepted = self.accepted.lock().await;
        if !self.needs_call(*accepted, enabled, Instant::now()) {
            return Ok(false);
        }
        // Forget the old state first: if this call fails, the agent's state
        // is unknown and the next call must go through.
        *accepted = None;
        self.put(enabled).await?;
        *accepted = Some(Accepted {
            enabled,
            at: Instant::now(),
        });
        if enabled {
            tracing::info!(
                expires_in_minutes = self.expires_in_minutes,
                "task scale-in protection on"
            );
        } else {
            tracing::info!("task scale-in protection off");
        }
        Ok(true)
    }

    /// Keeps protection in step with the jobs running: every `every`, on
    /// while `jobs_in_flight > 0`, off otherwise, and renewed while a long
    /// job runs. Ends when `shutdown` resolves. The worker never calls the
    /// agent itself: a job that starts between two checks is unprotected for
    /// at most `every` (1 s in `fanout run`), far less than a scale-in takes.
    pub async fn watch(
        self: Arc<Self>,
        metrics: Arc<Metrics>,
        every: Duration,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = ticks.tick() => {
                    self.set(Metrics::get(&metrics.jobs_in_flight) > 0).await;
                }
            }
        }
    }

    /// Whether the agent must be called to reach `enabled` at `now`.
    fn needs_call(&self, accepted: Option<Accepted>, enabled: bool, now: Instant) -> bool {
        match accepted {
            None => true,
            Some(state) if state.enabled != enabled => true,
            Some(state) => enabled && now.duration_since(state.at) >= self.renew_after(),
        }
    }

    /// Renew at half the expiry: a missed renewal still leaves time for the
    /// next one.
    fn renew_after(&self) -> Duration {
        Duration::from_secs(u64::from(self.expires_in_minutes) * 60 / 2)
    }

    async fn put(&self, enabled: bool) -> Result<(), EcsError> {
        let body = ProtectionRequest {
            protection_enabled: enabled,
            expires_in_minutes: enabled.then_some(self.expires_in_minutes),
        };
        // Serialising two plain fields cannot fail.
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let request = Request::builder()
            .method(Method::PUT)
            .uri(self.endpoint.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| EcsError::Unreachable(e.to_string()))?;

        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| EcsError::Unreachable(e.to_string()))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| EcsError::Unreachable(e.to_string()))?
                .to_bytes();
            Ok::<_, EcsError>((status, body))
        };
        let (status, body) = tokio::time::timeout(AGENT_TIMEOUT, exchange)
            .await
            .map_err(|_| EcsError::Timeout)??;
        check_answer(status.as_u16(), &body)
    }
}

/// The agent answers `{"protection":{…}}` on success, and `{"failure":{…}}`
/// or `{"error":{…}}` otherwise; a failure can come with HTTP 200, so the
/// body decides as much as the status.
fn check_answer(status: u16, body: &[u8]) -> Result<(), EcsError> {
    let refused = || EcsError::Refused {
        status,
        body: String::from_utf8_lossy(body).chars().take(500).collect(),
    };
    if !(200..300).contains(&status) {
        return Err(refused());
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) if value.get("failure").is_some() || value.get("error").is_some() => {
            Err(refused())
        }
        // An empty or non-JSON 2xx body: the agent took the request.
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protection(minutes: u32) -> TaskProtection {
        TaskProtection::new("http://169.254.170.2/api/task-id", minutes).expect("valid uri")
    }

    #[test]
    fn endpoint_is_built_from_the_agent_uri() {
        let p = TaskProtection::new("http://169.254.170.2/api/abc/", 60).expect("valid uri");
        assert_eq!(
            p.endpoint.to_string(),
            "http://169.254.170.2/api/abc/task-protection/v1/state"
        );
    }

    #[test]
    fn rejects_bad_uris_and_expiries() {
        assert!(matches!(
            TaskProtection::new("https://agent/api", 60),
            Err(EcsError::BadAgentUri { .. })
        ));
        assert!(matches!(
            TaskProtection::new("not a uri", 60),
            Err(EcsError::BadAgentUri { .. })
        ));
        assert!(matches!(
            TaskProtection::new("http://a", 0),
            Err(EcsError::BadExpiry(0))
        ));
        assert!(matches!(
            TaskProtection::new("http://a", 2881),
            Err(EcsError::BadExpiry(2881))
        ));
        assert!(TaskProtection::new("http://a", 2880).is_ok());
    }

    #[test]
    fn request_body_matches_the_agent_api() {
        let on = ProtectionRequest {
            protection_enabled: true,
            expires_in_minutes: Some(30),
        };
        let off = ProtectionRequest {
            protection_enabled: false,
            expires_in_minutes: None,
        };
        assert_eq!(
            serde_json::to_string(&on).expect("serialises"),
            r#"{"ProtectionEnabled":true,"ExpiresInMinutes":30}"#
        );
        assert_eq!(
            serde_json::to_string(&off).expect("serialises"),
            r#"{"ProtectionEnabled":false}"#
        );
    }

    #[test]
    fn calls_only_on_change_or_renewal() {
        let p = protection(10);
        let t0 = Instant::now();
        let on = Some(Accepted {
            enabled: true,
            at: t0,
        });
        let off = Some(Accepted {
            enabled: false,
            at: t0,
        });
        assert!(p.needs_call(None, true, t0));
        assert!(p.needs_call(None, false, t0));
        assert!(!p.needs_call(on, true, t0 + Duration::from_secs(60)));
        assert!(p.needs_call(on, false, t0));
        assert!(p.needs_call(off, true, t0));
        // Off never needs renewing; on is renewed at half of 10 minutes.
        assert!(!p.needs_call(off, false, t0 + Duration::from_secs(3600)));
        assert!(!p.needs_call(on, true, t0 + Duration::from_secs(299)));
        assert!(p.needs_call(on, true, t0 + Duration::from_secs(300)));
    }

    #[test]
    fn answers_are_judged_by_status_and_body() {
        assert!(check_answer(200, br#"{"protection":{"ProtectionEnabled":true}}"#).is_ok());
        assert!(check_answer(200, b"").is_ok());
        assert!(matches!(
            check_answer(200, br#"{"failure":{"Reason":"TASK_NOT_VALID"}}"#),
            Err(EcsError::Refused { status: 200, .. })
        ));
        assert!(matches!(
            check_answer(400, br#"{"error":{"Code":"InvalidParameterException"}}"#),
            Err(EcsError::Refused { status: 400, .. })
        ));
        assert!(matches!(
            check_answer(500, b"oops"),
            Err(EcsError::Refused { status: 500, .. })
        ));
    }
}
