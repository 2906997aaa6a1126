//! One connection's send: posted under the budget, and retried by the
//! retry policy ([`decide`], a pure function of the answer and the tries so
//! far) until it is final, deferred, or stops the job.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::tally::Tally;
use super::{Deferred, Engine, EngineSettings, FanoutError};
use crate::connection::{Connection, ConnectionId, ConnectionState};
use crate::gateway::{Gateway, Pace, PostOutcome, Step};
use crate::store::ConnectionStore;
use crate::telemetry::Metrics;

/// What happened to one connection.
pub(super) enum Delivery {
    Delivered,
    Gone(Connection),
    Rejected(ConnectionId),
    Deferred(Deferred),
    /// The whole job must stop.
    Abort(FanoutError),
}

/// Which pass a send belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pass {
    /// The pass over the audience.
    Audience,
    /// A pass over the connections deferred so far.
    Deferred,
}

/// One connection's tries so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tries {
    /// Posts that used up an attempt (5xx, timeouts), from 1.
    pub attempt: u32,
    /// 429s in a row.
    pub streak: u32,
    /// Whether the budget found the streak to be this one client's.
    pub one_client: bool,
    /// Since the connection's first 429.
    pub throttled_for: Duration,
}

impl Default for Tries {
    fn default() -> Self {
        Self {
            attempt: 1,
            streak: 0,
            one_client: false,
            throttled_for: Duration::ZERO,
        }
    }
}

/// What the retry policy makes of one answer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// Delivered, gone or rejected.
    Final(ConnectionState),
    /// The answer stops the job.
    Stop,
    /// Post again after the backoff's delay for retry number `retry`, and
    /// no later than `within`.
    Retry {
        retry: u32,
        within: Option<Duration>,
    },
    /// Left for a later pass, with the reason the report gives.
    Defer(String),
}

/// The retry policy: 5xx and timeouts are retried up to the connection's
/// attempts, 429s until the throttle deadline. In the pass over the
/// audience, a run of 429s that is one client's alone is deferred at once:
/// waiting out its deadline there would hold its page unanswered, and with
/// it the sends of the page two after (see `ResumePoints::may_start`).
pub(super) fn decide(
    step: Step,
    tries: &mut Tries,
    pass: Pass,
    settings: &EngineSettings,
    detail: Option<&str>,
) -> Decision {
    match step {
        Step::Final(state) => Decision::Final(state),
        Step::StopJob { .. } => Decision::Stop,
        Step::RetryThrottled => {
            if tries.one_client && pass == Pass::Audience {
                return Decision::Defer(format!(
                    "throttled (429) {} times in a row, alone",
                    tries.streak
                ));
            }
            let left = settings
                .throttle_deadline
                .saturating_sub(tries.throttled_for);
            if left.is_zero() {
                return Decision::Defer(format!(
                    "throttled (429) for {}",
                    humantime::format_duration(settings.throttle_deadline)
                ));
            }
            Decision::Retry {
                retry: tries.streak - 1,
                within: Some(left),
            }
        }
        Step::RetryTransient => {
            if !settings.send_backoff.allows_another(tries.attempt) {
                return Decision::Defer(detail.unwrap_or_default().to_owned());
            }
            tries.attempt += 1;
            Decision::Retry {
                retry: tries.attempt - 2,
                within: None,
            }
        }
    }
}

impl<S: ConnectionStore, G: Gateway> Engine<S, G> {
    /// Sends to one connection until the retry policy ([`decide`]) settles it.
    pub(super) async fn deliver(
        &self,
        connection: Connection,
        payload: Bytes,
        counts: &Tally,
        pass: Pass,
    ) -> Delivery {
        // A row's id outside API Gateway's alphabet cannot be a connection,
        // and posting it (`.`, `..`) would name another resource: rejected
        // without a post, so one bad row cannot stop a broadcast.
        if let Err(bad) = crate::connection::check_id(connection.id.as_str()) {
            tracing::warn!(connection = ?connection.id, reason = %bad, "not a connection id; rejected without a post");
            counts.answer(crate::gateway::Counter::Rejected);
            return Delivery::Rejected(connection.id);
        }
        let mut tries = Tries::default();
        let mut throttled_since: Option<Instant> = None;
        loop {
            // The quota is the account's: no post while the endpoint
            // answers like another API's.
            if let Err(verdict) = self.watch.gate() {
                return Delivery::Abort(FanoutError::Endpoint(verdict));
            }
            let outcome = self.post_once(&connection.id, &payload, &mut tries).await;
            let meaning = outcome.meaning();
            if let Some(counter) = meaning.counter {
                counts.answer(counter);
            }
            if meaning.step == Step::RetryThrottled {
                tries.throttled_for = throttled_since.get_or_insert_with(Instant::now).elapsed();
            }
            let delay = match decide(
                meaning.step,
                &mut tries,
                pass,
                &self.settings,
                outcome.detail(),
            ) {
                Decision::Final(ConnectionState::Gone) => return Delivery::Gone(connection),
                Decision::Final(ConnectionState::Rejected) => {
                    let reason = outcome.detail().unwrap_or_default();
                    tracing::warn!(connection = %connection.id, %reason, "send rejected");
                    return Delivery::Rejected(connection.id);
                }
                Decision::Final(ConnectionState::Delivered) => return Delivery::Delivered,
                // No answer means either; kept for a later pass, never lost.
                Decision::Final(state @ (ConnectionState::Expired | ConnectionState::Deferred)) => {
                    return deferred(connection, format!("answered as {}", state.as_str()));
                }
                Decision::Stop => return Delivery::Abort(FanoutError::Refused(outcome)),
                Decision::Defer(reason) => return deferred(connection, reason),
                Decision::Retry { retry, within } => {
                    let delay = self.settings.send_backoff.delay(retry);
                    within.map_or(delay, |left| delay.min(left))
                }
            };
            tokio::time::sleep(delay).await;
            counts.retry();
        }
    }

    /// One post under the budget, with what its answer says of the pace
    /// told to the budget and kept in `tries`.
    async fn post_once(
        &self,
        id: &ConnectionId,
        payload: &Bytes,
        tries: &mut Tries,
    ) -> PostOutcome {
        let (outcome, sent) = {
            let _slot = self.budget.acquire_counted(&self.metrics).await;
            let sent = Instant::now();
            (self.gateway.post(id, payload.clone()).await, sent)
        };
        Metrics::incr(&self.metrics.posts);
        self.watch.record(&outcome);
        match outcome.meaning().pace {
            Pace::Throttled => {
                tries.streak += 1;
                tries.one_client = self.budget.throttled(sent, tries.streak);
            }
            Pace::Accepted => {
                tries.streak = 0;
                self.budget.succeeded();
            }
            Pace::NoSignal => {
                tries.streak = 0;
                self.budget.passed();
            }
        }
        outcome
    }
}

fn deferred(connection: Connection, reason: String) -> Delivery {
    tracing::debug!(connection = %connection.id, %reason, "send deferred");
    Delivery::Deferred(Deferred { connection, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::Backoff;

    fn settings() -> EngineSettings {
        EngineSettings {
            send_backoff: Backoff {
                base: Duration::from_millis(10),
                max: Duration::from_secs(1),
                max_attempts: 3,
            },
            throttle_deadline: Duration::from_secs(30),
            ..crate::fakes::engine_settings(8)
        }
    }

    fn tries(attempt: u32, streak: u32, one_client: bool, throttled_for: u64) -> Tries {
        Tries {
            attempt,
            streak,
            one_client,
            throttled_for: Duration::from_secs(throttled_for),
        }
    }

    #[test]
    fn the_retry_policy_by_answer_and_tries() {
        use ConnectionState::{Delivered, Gone, Rejected};
        use Decision::{Defer, Final, Retry, Stop};
        use Pass::{Audience, Deferred as Later};
        let final_ = Step::Final;
        let retry_within = |retry, secs| Retry {
            retry,
            within: Some(Duration::from_secs(secs)),
        };
        let retry = |retry| Retry {
            retry,
            within: None,
        };
        let defer = |why: &str| Defer(why.into());
        // One row a line: the answer's step, the tries before it and the
        // pass, then the decision and the attempt count after it.
        macro_rules! rows {
            ($($step:expr, $tries:expr, $pass:expr => $decision:expr, $attempt:expr;)*) => {
                vec![$(($step, $tries, $pass, $decision, $attempt)),*]
            };
        }
        let rows: Vec<(Step, Tries, Pass, Decision, u32)> = rows![
            // Final answers end the tries, whatever came before.
            final_(Delivered), tries(1, 0, false, 0), Audience => Final(Delivered), 1;
            final_(Gone), tries(2, 0, false, 0), Later => Final(Gone), 2;
            final_(Rejected), tries(1, 0, false, 0), Audience => Final(Rejected), 1;
            Step::StopJob { dead_letter: true }, tries(1, 0, false, 0), Audience => Stop, 1;
            // 5xx and timeouts use up attempts: the third is the last.
            Step::RetryTransient, tries(1, 0, false, 0), Audience => retry(0), 2;
            Step::RetryTransient, tries(2, 0, false, 0), Later => retry(1), 3;
            Step::RetryTransient, tries(3, 0, false, 0), Audience => defer("HTTP 503"), 3;
            // 429s use no attempt, and wait no longer than the deadline.
            Step::RetryThrottled, tries(3, 1, false, 0), Audience => retry_within(0, 30), 3;
            Step::RetryThrottled, tries(1, 5, false, 25), Later => retry_within(4, 5), 1;
            Step::RetryThrottled, tries(1, 9, false, 30), Later => defer("throttled (429) for 30s"), 1;
            // One client's own 429s: deferred at once from the pass over
            // the audience, retried to the deadline in a later pass.
            Step::RetryThrottled, tries(1, 4, true, 1), Audience
                => defer("throttled (429) 4 times in a row, alone"), 1;
            Step::RetryThrottled, tries(1, 4, true, 1), Later => retry_within(3, 29), 1;
        ];
        for (step, mut before, pass, expected, attempt_after) in rows {
            let row = format!("{step:?} {before:?} {pass:?}");
            assert_eq!(
                decide(step, &mut before, pass, &settings(), Some("HTTP 503")),
                expected,
                "{row}"
            );
            assert_eq!(before.attempt, attempt_after, "{row}");
        }
    }
}
