//! Certainly gone by age: API Gateway closes every WebSocket connection
//! after two hours at most, so a row whose connection started longer ago
//! than that, plus a margin, is a connection that no longer exists. Such a
//! row is deleted without a post, saving a throttled call whose only answer
//! could be 410.
//!
//! The rule must never remove a live connection, so everything that could
//! make an age wrong turns it into *unknown*, and an unknown connection is
//! posted to as usual:
//! - a start that is not epoch milliseconds (before 2015, more than a minute
//!   in the future, or in seconds, which reads as January 1970);
//! - a row read without the attribute (an index that does not project it);
//! - a worker clock that disagrees with AWS's by more than a minute: the
//!   whole rule is off until the clocks agree again ([`ExpiryRule::clock`]).
//!
//! The delete is conditional on the start that was read, so a row rewritten
//! since (a reconnect that reused the id) is kept.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::connection::{Connection, ConnectionId};

/// API Gateway's maximum connection duration for WebSocket APIs.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(2 * 60 * 60);

/// The default margin past [`MAX_CONNECTION_AGE`].
pub const DEFAULT_MARGIN: Duration = Duration::from_secs(15 * 60);

/// The least margin accepted: less would let a clock error of a few minutes,
/// within what [`MAX_CLOCK_SKEW`] lets through, reach a live connection.
pub const MIN_MARGIN: Duration = Duration::from_secs(10 * 60);

/// How far the worker's clock may differ from AWS's before the rule is
/// turned off, and how far in the future a start may be before it is
/// treated as wrong.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// How often the clock is compared again after startup.
pub const CLOCK_CHECK_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// 2015-01-01T00:00:00Z in epoch milliseconds: API Gateway WebSocket APIs
/// came out in 2018, so an earlier start is not a real one.
const EARLIEST_START_MS: i64 = 1_420_070_400_000;

/// Why a row's start cannot be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AgeProblem {
    /// The row was read without the attribute.
    Missing,
    /// Not a whole number.
    NotANumber,
    /// Before 2015.
    TooEarly,
    /// In epoch seconds, not milliseconds.
    InSeconds,
    /// More than [`MAX_CLOCK_SKEW`] in the future.
    InTheFuture,
}

impl fmt::Display for AgeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Missing => "missing",
            Self::NotANumber => "not a whole number of epoch milliseconds",
            Self::TooEarly => "before 2015",
            Self::InSeconds => "in epoch seconds, not milliseconds",
            Self::InTheFuture => "more than a minute in the future",
        })
    }
}

/// What a row's start says about its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Age {
    /// Started longer ago than the limit plus the margin, at this instant
    /// (epoch milliseconds, as read).
    Expired { started_ms: i64 },
    /// Young enough to be live.
    Live,
    /// Cannot say: posted to as usual.
    Unknown(AgeProblem),
}

/// The start of a connection as its row holds it: DynamoDB numbers are
/// decimal text.
pub fn classify(started: Option<&str>, now_ms: i64, margin: Duration) -> Age {
    let Some(text) = started else {
        return Age::Unknown(AgeProblem::Missing);
    };
    let Ok(started_ms) = text.trim().parse::<i64>() else {
        return Age::Unknown(AgeProblem::NotANumber);
    };
    if started_ms < EARLIEST_START_MS {
        // A start in seconds is about 1,000 times too small: 1.7e9 is
        // January 1970 in milliseconds.
        let in_seconds = (EARLIEST_START_MS / 1000..=now_ms / 1000 + 60).contains(&started_ms);
        return Age::Unknown(if in_seconds {
            AgeProblem::InSeconds
        } else {
            AgeProblem::TooEarly
        });
    }
    if started_ms > now_ms + millis(MAX_CLOCK_SKEW) {
        return Age::Unknown(AgeProblem::InTheFuture);
    }
    if now_ms - started_ms > millis(MAX_CONNECTION_AGE + margin) {
        Age::Expired { started_ms }
    } else {
        Age::Live
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The instant as epoch milliseconds.
pub fn epoch_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Epoch ms as RFC 3339, for log lines and reasons.
pub fn rfc3339(at_ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(at_ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

/// The rule as configured, shared by the store that applies it and the
/// clock check that can turn it off.
#[derive(Debug)]
pub struct ExpiryRule {
    margin: Duration,
    /// Off while the worker's clock and AWS's disagree.
    on: AtomicBool,
}

/// What a clock comparison found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockVerdict {
    /// Within [`MAX_CLOCK_SKEW`]: the rule applies.
    Agrees,
    /// By this much (AWS's clock minus the worker's, in whole seconds):
    /// the rule is off.
    Differs { skew_secs: i64 },
}

impl ExpiryRule {
    /// On from the start: the store reads nothing before the startup check
    /// has had its say (see the binary's wiring), and a check that cannot
    /// be made leaves the rule as it was.
    pub fn new(margin: Duration) -> Self {
        Self {
            margin,
            on: AtomicBool::new(true),
        }
    }

    pub fn margin(&self) -> Duration {
        self.margin
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Compares the worker's clock (`local`, when the answer came) with
    /// AWS's (`server`, an answer's `Date` header), turns the rule off or
    /// on again, and says so when that changes it.
    pub fn clock(&self, server: SystemTime, local: SystemTime) -> ClockVerdict {
        let skew_ms = epoch_ms(server) - epoch_ms(local);
        // The Date header has whole seconds: allow for its truncation.
        let verdict = if skew_ms.unsigned_abs() > MAX_CLOCK_SKEW.as_millis() as u64 + 1000 {
            ClockVerdict::Differs {
                skew_secs: skew_ms / 1000,
            }
        } else {
            ClockVerdict::Agrees
        };
        let on = verdict == ClockVerdict::Agrees;
        let was = self.on.swap(on, Ordering::Relaxed);
        match (was, verdict) {
            (true, ClockVerdict::Differs { skew_secs }) => tracing::warn!(
                skew_secs,
                "this worker's clock differs from AWS's by more than a minute; rows are no \
                 longer removed by age ({}) until the clocks agree",
                crate::limits::setting::Setting::ConnectedAtAttribute
            ),
            (false, ClockVerdict::Agrees) => {
                tracing::info!("this worker's clock agrees with AWS's again; removal by age is on")
            }
            _ => {}
        }
        verdict
    }
}

/// AWS's time, as this worker last measured it against its own clock
/// (the `Date` of a DynamoDB answer, whole seconds). Deadlines are read
/// against it, so a task whose clock is off neither sends late nor stops
/// early by more than about a second.
#[derive(Debug, Default)]
pub struct AwsClock {
    /// AWS's clock minus the worker's, in ms: 0 while within the header's
    /// one-second resolution.
    skew_ms: AtomicI64,
}

impl AwsClock {
    /// Takes a reading: AWS's clock said `server` when the worker's said
    /// `local`.
    pub fn measured(&self, server: SystemTime, local: SystemTime) {
        let skew_ms = epoch_ms(server) - epoch_ms(local);
        // The header's whole seconds cut up to a second off: a difference
        // within that is no difference.
        let skew_ms = if skew_ms.abs() > 1000 { skew_ms } else { 0 };
        self.skew_ms.store(skew_ms, Ordering::Relaxed);
    }

    /// AWS's time now, as epoch ms.
    pub fn now_ms(&self) -> i64 {
        epoch_ms(SystemTime::now()) + self.skew_ms.load(Ordering::Relaxed)
    }
}

/// A row certainly gone by age, with the start it was read with: its delete
/// is conditional on that value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    pub connection: Connection,
    pub started_ms: i64,
}

/// The rows of a page whose start could not be trusted: how many, and the
/// first, so the job's log line can name the problem once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgeProblems {
    pub count: u64,
    pub first: Option<(ConnectionId, AgeProblem)>,
}

impl AgeProblems {
    pub fn add(&mut self, id: &ConnectionId, problem: AgeProblem) {
        self.count += 1;
        self.first.get_or_insert_with(|| (id.clone(), problem));
    }

    pub fn merge(&mut self, other: &AgeProblems) {
        self.count += other.count;
        if self.first.is_none() {
            self.first.clone_from(&other.first);
        }
    }

    /// One line for a log: `3 rows, e.g. abc=: in epoch seconds, …`.
    pub fn describe(&self) -> Option<String> {
        let (id, problem) = self.first.as_ref()?;
        Some(format!(
            "{} row(s) with an unusable start, posted to as usual; e.g. {id}: {problem}",
            self.count
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_780_000_000_000; // 2026
    const MIN: i64 = 60_000;
    const HOUR: i64 = 60 * MIN;

    fn at(ms: i64) -> Age {
        classify(Some(&ms.to_string()), NOW, DEFAULT_MARGIN)
    }

    #[test]
    fn past_two_hours_and_the_margin_is_expired_and_not_before() {
        assert_eq!(
            at(NOW - 3 * HOUR),
            Age::Expired {
                started_ms: NOW - 3 * HOUR
            }
        );
        assert_eq!(at(NOW - HOUR), Age::Live);
        // 2 h 14 min: inside the 15-minute margin.
        assert_eq!(at(NOW - 2 * HOUR - 14 * MIN), Age::Live);
        assert!(matches!(at(NOW - 2 * HOUR - 16 * MIN), Age::Expired { .. }));
        assert_eq!(at(NOW), Age::Live);
    }

    #[test]
    fn values_that_cannot_be_epoch_milliseconds_are_unknown() {
        let unknown = |s: &str| classify(Some(s), NOW, DEFAULT_MARGIN);
        assert_eq!(
            unknown(&((NOW - 3 * HOUR) / 1000).to_string()),
            Age::Unknown(AgeProblem::InSeconds)
        );
        assert_eq!(unknown("1000"), Age::Unknown(AgeProblem::TooEarly));
        assert_eq!(
            unknown(&(EARLIEST_START_MS - 1).to_string()),
            Age::Unknown(AgeProblem::TooEarly)
        );
        assert_eq!(
            unknown(&(NOW + 2 * MIN).to_string()),
            Age::Unknown(AgeProblem::InTheFuture)
        );
        assert_eq!(at(NOW + MIN / 2), Age::Live);
        assert_eq!(unknown("1.7e12"), Age::Unknown(AgeProblem::NotANumber));
        assert_eq!(unknown("soon"), Age::Unknown(AgeProblem::NotANumber));
        assert_eq!(
            classify(None, NOW, DEFAULT_MARGIN),
            Age::Unknown(AgeProblem::Missing)
        );
    }

    #[test]
    fn a_larger_margin_keeps_more() {
        let age = (NOW - 2 * HOUR - 20 * MIN).to_string();
        assert!(matches!(
            classify(Some(&age), NOW, DEFAULT_MARGIN),
            Age::Expired { .. }
        ));
        assert_eq!(
            classify(Some(&age), NOW, Duration::from_secs(30 * 60)),
            Age::Live
        );
    }

    #[test]
    fn a_clock_a_minute_off_turns_the_rule_off_until_it_agrees() {
        let rule = ExpiryRule::new(DEFAULT_MARGIN);
        let local = SystemTime::now();
        assert_eq!(rule.clock(local, local), ClockVerdict::Agrees);
        assert!(rule.is_on());
        // Whole seconds in the header: 59.9 s is within, 2 min is not.
        assert_eq!(
            rule.clock(local + Duration::from_millis(59_900), local),
            ClockVerdict::Agrees
        );
        assert_eq!(
            rule.clock(local - Duration::from_secs(120), local),
            ClockVerdict::Differs { skew_secs: -120 }
        );
        assert!(!rule.is_on(), "off: the store classifies no row");
        rule.clock(local, local);
        assert!(rule.is_on());
    }

    #[test]
    fn aws_time_is_the_workers_moved_by_a_difference_past_the_headers_second() {
        let clock = AwsClock::default();
        let local = SystemTime::now();
        clock.measured(local + Duration::from_millis(900), local);
        assert!((clock.now_ms() - epoch_ms(SystemTime::now())).abs() < 100);
        clock.measured(local + Duration::from_secs(90), local);
        let ahead = clock.now_ms() - epoch_ms(SystemTime::now());
        assert!((89_900..=90_000).contains(&ahead), "{ahead}");
        clock.measured(local - Duration::from_secs(5), local);
        let behind = clock.now_ms() - epoch_ms(SystemTime::now());
        assert!((-5_000..=-4_900).contains(&behind), "{behind}");
    }

    #[test]
    fn problems_count_all_and_name_the_first() {
        let mut problems = AgeProblems::default();
        assert_eq!(problems.describe(), None);
        problems.add(&"a".into(), AgeProblem::InSeconds);
        let mut more = AgeProblems::default();
        more.add(&"b".into(), AgeProblem::Missing);
        problems.merge(&more);
        assert_eq!(problems.count, 2);
        let line = problems.describe().unwrap();
        assert!(
            line.starts_with("2 row(s)") && line.contains("a: in epoch seconds"),
            "{line}"
        );
    }
}
