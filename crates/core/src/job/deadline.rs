//! A job's deadline (`deliver_by`, format version 2): the instant after
//! which none of its broadcast is sent. Read here from RFC 3339 text or
//! epoch milliseconds; checked against AWS's clock by the worker (see
//! [`crate::connection::expiry::ExpiryRule::aws_now_ms`]).
//!
//! The word is "lapsed", never "expired": expired already names rows
//! certainly gone by age.

use std::time::Duration;

use super::JobError;
use crate::connection::expiry;
use crate::limits::MAX_DEADLINE_AHEAD;

/// Epoch milliseconds below this are taken for epoch seconds sent by
/// mistake (1973-03-03 in milliseconds, 5138 AD in seconds).
const SECONDS_NOT_MILLIS: i64 = 100_000_000_000;

/// Reads `deliver_by` as epoch milliseconds.
pub fn read(value: &serde_json::Value) -> Result<i64, JobError> {
    let bad = |reason: String| JobError::BadDeadline { reason };
    match value {
        serde_json::Value::Number(n) => {
            let Some(ms) = n.as_i64().filter(|ms| *ms >= 0) else {
                return Err(bad(format!(
                    "{n} is not a whole number of epoch milliseconds"
                )));
            };
            if ms < SECONDS_NOT_MILLIS {
                return Err(bad(format!(
                    "{ms} reads as {} in epoch milliseconds; send milliseconds, not seconds",
                    expiry::rfc3339(ms)
                )));
            }
            Ok(ms)
        }
        serde_json::Value::String(text) => parse_rfc3339(text).ok_or_else(|| {
            bad(format!(
                "{text:?} is not an RFC 3339 time such as 2026-12-06T18:30:00Z or \
                 2026-12-06T19:30:00.250+01:00"
            ))
        }),
        other => Err(bad(format!(
            "{other} is neither RFC 3339 text nor epoch milliseconds"
        ))),
    }
}

/// RFC 3339 with `Z` or a numeric offset, as epoch milliseconds.
fn parse_rfc3339(text: &str) -> Option<i64> {
    let (local, offset_ms) = if let Some(local) = text.strip_suffix(['Z', 'z']) {
        (local, 0)
    } else {
        let at = text.len().checked_sub(6)?;
        let (local, offset) = text.split_at_checked(at)?;
        let sign = match offset.as_bytes()[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let (hours, minutes) = offset[1..].split_once(':')?;
        let hours: i64 = hours.parse().ok().filter(|h| (0..24).contains(h))?;
        let minutes: i64 = minutes.parse().ok().filter(|m| (0..60).contains(m))?;
        (local, sign * (hours * 60 + minutes) * 60_000)
    };
    // humantime reads the UTC form; the offset is applied after.
    let utc = humantime::parse_rfc3339(&format!("{local}Z")).ok()?;
    let ms = utc.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(ms).ok().map(|ms| ms - offset_ms)
}

/// Where a deadline stands at `now_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Time is left: this much.
    In(Duration),
    /// The deadline has passed: nothing more is sent.
    Lapsed,
}

/// Where `deadline_ms` stands at `now_ms`; one further ahead than
/// [`MAX_DEADLINE_AHEAD`] is refused.
pub fn due(deadline_ms: i64, now_ms: i64) -> Result<Due, JobError> {
    let left = deadline_ms - now_ms;
    if left <= 0 {
        return Ok(Due::Lapsed);
    }
    let left = Duration::from_millis(left as u64);
    if left > MAX_DEADLINE_AHEAD {
        return Err(JobError::DeadlineTooFar {
            deadline: expiry::rfc3339(deadline_ms),
        });
    }
    Ok(Due::In(left))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rfc3339_text_with_z_or_an_offset_and_epoch_millis_read_the_same_instant() {
        let at = 1_796_581_800_000; // 2026-12-06T18:30:00Z
        assert_eq!(read(&json!("2026-12-06T18:30:00Z")), Ok(at));
        assert_eq!(read(&json!("2026-12-06T19:30:00+01:00")), Ok(at));
        assert_eq!(read(&json!("2026-12-06T13:30:00-05:00")), Ok(at));
        assert_eq!(read(&json!("2026-12-06T18:30:00.250Z")), Ok(at + 250));
        assert_eq!(read(&json!(at)), Ok(at));
    }

    #[test]
    fn a_deadline_that_is_no_instant_is_refused_naming_the_problem() {
        for (value, says) in [
            (json!("tomorrow"), "not an RFC 3339 time"),
            (json!("2026-12-06T18:30:00"), "not an RFC 3339 time"),
            (json!("2026-12-06T18:30:00+25:00"), "not an RFC 3339 time"),
            (json!(1_796_574_600), "not seconds"),
            (json!(-5), "not a whole number"),
            (json!(1.5e12), "not a whole number"),
            (json!(true), "neither"),
        ] {
            let e = read(&value).unwrap_err().to_string();
            assert!(e.contains(says), "{value}: {e}");
            assert!(e.contains("deliver_by"), "{e}");
        }
    }

    #[test]
    fn a_deadline_is_due_lapsed_or_too_far_ahead() {
        let now = 1_796_581_800_000;
        assert_eq!(
            due(now + 1500, now),
            Ok(Due::In(Duration::from_millis(1500)))
        );
        assert_eq!(due(now, now), Ok(Due::Lapsed));
        assert_eq!(due(now - 1, now), Ok(Due::Lapsed));
        let furthest = now + MAX_DEADLINE_AHEAD.as_millis() as i64;
        assert!(matches!(due(furthest, now), Ok(Due::In(_))));
        let e = due(furthest + 1, now).unwrap_err().to_string();
        assert!(e.contains("14 days"), "{e}");
    }
}
