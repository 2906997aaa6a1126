//! The send path's seam: one message to one connection, and what the
//! answer means.
//!
//! [`Gateway`] is what the engine sends through; the `fanout-aws` crate
//! implements it twice (the SDK's PostToConnection, and the lean signed
//! POST). Both classify HTTP answers with one table ([`status`]), so the
//! engine only ever sees a [`PostOutcome`].

pub mod status;

use std::future::Future;

use bytes::Bytes;

use crate::connection::{ConnectionId, ConnectionState};

/// What one PostToConnection attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostOutcome {
    /// 200: the message is with API Gateway.
    Delivered,
    /// 410 (GoneException, or a bare 410): the client left; remove its row.
    Gone,
    /// 429 LimitExceededException: the account or the client's buffer is
    /// full; slow down and retry.
    Throttled,
    /// 5xx, timeout, dispatch or I/O failure: retry with backoff.
    Transient(String),
    /// 413 PayloadTooLargeException: no connection can take it; the job fails.
    PayloadTooLarge,
    /// 403 ForbiddenException: permissions, wrong endpoint or missing stage;
    /// every send will fail the same way, so the job stops.
    Forbidden(String),
    /// Any other client error (e.g. 400 for a malformed id): this connection
    /// fails, without retry and without removal.
    Rejected(String),
}

/// What one answer means, everywhere it matters: the one table the engine
/// reads (see [`PostOutcome::meaning`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meaning {
    /// What becomes of the connection.
    pub step: Step,
    /// What the answer says about the pace the gateway takes.
    pub pace: Pace,
    /// The process counter it is counted under (retried answers are counted
    /// under `retries` when they are retried).
    pub counter: Option<Counter>,
}

/// What becomes of the connection after one answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Final: delivered (it has the message), gone (the client left; its
    /// row is removed, on evidence) or rejected (this connection cannot
    /// take it; no retry, no removal).
    Final(ConnectionState),
    /// Retried with backoff until the throttle deadline; past it, deferred.
    RetryThrottled,
    /// Retried with backoff for the send attempts; past them, deferred.
    RetryTransient,
    /// The job stops: every other send would fail the same way.
    /// `dead_letter`: running the job again cannot succeed either.
    StopJob { dead_letter: bool },
}

/// What an answer tells the rate limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// The gateway took the request at this pace.
    Accepted,
    /// The gateway's throttle refused it: slow down.
    Throttled,
    /// It passed the throttle but says nothing of the pace.
    NoSignal,
}

/// The per-answer counters of [`crate::telemetry::Metrics`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Delivered,
    Gone,
    /// A connection rejected (a 4xx about it alone); the metric keeps its
    /// published name, `Failed`.
    Rejected,
    Throttled,
}

impl PostOutcome {
    /// The one table of what each answer means.
    pub fn meaning(&self) -> Meaning {
        let (step, pace, counter) = match self {
            Self::Delivered => (
                Step::Final(ConnectionState::Delivered),
                Pace::Accepted,
                Some(Counter::Delivered),
            ),
            Self::Gone => (
                Step::Final(ConnectionState::Gone),
                Pace::Accepted,
                Some(Counter::Gone),
            ),
            Self::Rejected(_) => (
                Step::Final(ConnectionState::Rejected),
                Pace::Accepted,
                Some(Counter::Rejected),
            ),
            Self::Throttled => (
                Step::RetryThrottled,
                Pace::Throttled,
                Some(Counter::Throttled),
            ),
            Self::Transient(_) => (Step::RetryTransient, Pace::NoSignal, None),
            // No connection can take it: the payload goes to the dead-letter
            // queue with the job.
            Self::PayloadTooLarge => (Step::StopJob { dead_letter: true }, Pace::NoSignal, None),
            // Permissions or the endpoint: fixable, so the job is retried.
            Self::Forbidden(_) => (Step::StopJob { dead_letter: false }, Pace::NoSignal, None),
        };
        Meaning {
            step,
            pace,
            counter,
        }
    }

    /// The answer's description, for the outcomes that carry one.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Transient(detail) | Self::Forbidden(detail) | Self::Rejected(detail) => {
                Some(detail)
            }
            _ => None,
        }
    }
}

/// Sends one payload to one connection.
pub trait Gateway: Send + Sync + 'static {
    /// One attempt, no retries: the engine owns retries and backoff.
    /// `payload` is shared by every send of a broadcast (cloning `Bytes` is a
    /// reference-count increment).
    fn post(&self, id: &ConnectionId, payload: Bytes) -> impl Future<Output = PostOutcome> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_final_answers_end_a_connection_and_only_413_dead_letters_the_job() {
        let all = [
            PostOutcome::Delivered,
            PostOutcome::Gone,
            PostOutcome::Rejected("400".into()),
            PostOutcome::Throttled,
            PostOutcome::Transient("503".into()),
            PostOutcome::PayloadTooLarge,
            PostOutcome::Forbidden("403".into()),
        ];
        let steps: Vec<Step> = all.iter().map(|o| o.meaning().step).collect();
        assert_eq!(
            steps,
            [
                Step::Final(ConnectionState::Delivered),
                Step::Final(ConnectionState::Gone),
                Step::Final(ConnectionState::Rejected),
                Step::RetryThrottled,
                Step::RetryTransient,
                Step::StopJob { dead_letter: true },
                Step::StopJob { dead_letter: false },
            ]
        );
        // Only a 429 slows the rate down; only answers the gateway took
        // count as its pace.
        for outcome in &all {
            let pace = outcome.meaning().pace;
            match outcome {
                PostOutcome::Throttled => assert_eq!(pace, Pace::Throttled),
                PostOutcome::Delivered | PostOutcome::Gone | PostOutcome::Rejected(_) => {
                    assert_eq!(pace, Pace::Accepted)
                }
                _ => assert_eq!(pace, Pace::NoSignal, "{outcome:?}"),
            }
        }
    }
}
