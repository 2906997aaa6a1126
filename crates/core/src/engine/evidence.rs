//! Evidence for a removal. A 410 proves a connection gone only when two
//! things hold:
//!
//! - **The endpoint is the one the table belongs to.** An endpoint pointed
//!   at another API or stage answers 410 for every connection, and one with
//!   a wrong base path answers 404 for every connection: neither says
//!   anything about this table's rows. [`EndpointWatch`] judges that once
//!   per process, from every answer of every job: a 2xx proves the endpoint
//!   for [`PROOF_TTL`]; [`JUDGE_ANSWERS`] answers in a row with no 2xx, all
//!   alike, make a verdict that stops sending for [`COOL_DOWN`].
//! - **The connection had time to be established.** API Gateway answers
//!   410 until `$connect` completes, and the row is written during
//!   `$connect`. A connection whose start is unknown or more recent than
//!   [`CONNECT_WINDOW`] is posted to again after the window, and only a
//!   second 410 removes it (see [`crate::engine::rechecks`]).
//!
//! What a producer writes never widens this: the evidence is the answer
//! for the id that was posted to, and the stores delete by that id.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::connection::Connection;
use crate::connection::expiry::MAX_CLOCK_SKEW;
use crate::gateway::PostOutcome;

/// API Gateway's integration timeout, which bounds how long a `$connect`
/// integration (and so the connecting state) can last: 29 s.
pub const CONNECT_INTEGRATION_TIMEOUT: Duration = Duration::from_secs(29);

/// A Lambda authorizer on `$connect` runs before the integration, within
/// its own 29 s.
pub const AUTHORIZER_TIMEOUT: Duration = Duration::from_secs(29);

/// How long after its start a connection may still answer 410 because it
/// is not established yet: the `$connect` integration's timeout, an
/// authorizer's, and the clock skew the age rule tolerates between the
/// worker and the writer of the start (rounded up to two minutes).
pub const CONNECT_WINDOW: Duration = Duration::from_secs(120);

const _: () = assert!(
    CONNECT_WINDOW.as_secs()
        >= CONNECT_INTEGRATION_TIMEOUT.as_secs()
            + AUTHORIZER_TIMEOUT.as_secs()
            + MAX_CLOCK_SKEW.as_secs()
);

/// How long one 2xx proves the endpoint. Long enough that a steady stream
/// of jobs keeps it proven between broadcasts, short enough that a process
/// that has been idle for a while asks for fresh proof.
pub const PROOF_TTL: Duration = Duration::from_secs(15 * 60);

/// Answers in a row, with no 2xx among them and none for [`PROOF_TTL`],
/// that make a verdict. With a healthy endpoint, `JUDGE_ANSWERS` 410s in a
/// row need that many gone rows read back to back: at 90 % of a table gone
/// that happens with probability 0.9^100 ≈ 3·10⁻⁵, at 95 % 0.6 %. Even
/// then nothing is removed wrongly: the verdict only stops sending.
pub const JUDGE_ANSWERS: u64 = 100;

/// How long a verdict stops sending before the endpoint is tried again
/// (fixing it means a new deploy, so this only bounds the posts a wrong
/// verdict wastes: [`JUDGE_ANSWERS`] per cool-down).
pub const COOL_DOWN: Duration = Duration::from_secs(60);

/// What the process knows of its endpoint now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// A 2xx within [`PROOF_TTL`]: its 410s are evidence.
    Proven,
    /// No 2xx lately, and too few answers to judge: its 410s are kept as
    /// suspicions, never acted on alone.
    Unproven,
    /// It answers like an endpoint that is not this table's: no sending,
    /// no removals.
    Suspect(Verdict),
}

/// Why the endpoint looks wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `410` (every connection gone: another API or stage) or the refusal
    /// every post got, such as `HTTP 404`.
    pub answer: String,
    /// Answers in a row that were all this, with no 2xx.
    pub answers: u64,
    /// The endpoint as configured, named in the reason.
    pub endpoint: String,
}

impl Verdict {
    /// The status a broadcast report and the metrics give it.
    pub fn status(&self) -> &'static str {
        if self.answer == "410" {
            "misdirected"
        } else {
            "refusing"
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.answer == "410" {
            write!(
                f,
                "the API Gateway endpoint looks misdirected: {} posts in a row answered 410 and \
                 none was delivered, as when {} points at another API or stage; no row was \
                 removed",
                self.answers, self.endpoint
            )
        } else {
            write!(
                f,
                "the API Gateway endpoint refuses every post: {} posts in a row answered {} and \
                 none was delivered; check the base path and stage of {}; no row was removed",
                self.answers, self.answer, self.endpoint
            )
        }
    }
}

/// Answers since the last 2xx.
#[derive(Debug, Default)]
struct Tally {
    gone: u64,
    refusals: HashMap<String, u64>,
    verdict: Option<(Instant, Verdict)>,
}

/// The process-wide judgement of the endpoint (see the module docs).
///
/// The hot path (a 2xx while proven, a post with no verdict) reads and
/// writes atomics only; the tally's lock is taken for 410s and refusals.
#[derive(Debug)]
pub struct EndpointWatch {
    /// How the reasons name the endpoint until [`EndpointWatch::name`]
    /// names it.
    fallback: String,
    named: OnceLock<String>,
    origin: Instant,
    /// Milliseconds from `origin` to the last 2xx, plus one; 0: never.
    last_delivery: AtomicU64,
    /// Whether the tally holds anything a 2xx must clear.
    dirty: AtomicBool,
    /// Whether a verdict stands (the gate's fast path).
    suspect: AtomicBool,
    tally: Mutex<Tally>,
}

impl EndpointWatch {
    /// `endpoint` names the setting and its value, for the reasons.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            fallback: endpoint.into(),
            named: OnceLock::new(),
            origin: Instant::now(),
            last_delivery: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            suspect: AtomicBool::new(false),
            tally: Mutex::new(Tally::default()),
        }
    }

    /// Counts one answer.
    pub fn record(&self, outcome: &PostOutcome) {
        match outcome {
            PostOutcome::Delivered => {
                let now = self.origin.elapsed().as_millis() as u64 + 1;
                self.last_delivery.store(now, Ordering::Relaxed);
                if self.dirty.load(Ordering::Relaxed) {
                    let mut tally = self.lock();
                    *tally = Tally::default();
                    self.dirty.store(false, Ordering::Relaxed);
                    self.suspect.store(false, Ordering::Relaxed);
                }
            }
            PostOutcome::Gone => self.count(None),
            PostOutcome::Rejected(detail) => self.count(Some(answer_of(detail))),
            _ => {}
        }
    }

    fn count(&self, refusal: Option<String>) {
        let mut tally = self.lock();
        self.dirty.store(true, Ordering::Relaxed);
        match refusal {
            None => tally.gone += 1,
            Some(answer) => *tally.refusals.entry(answer).or_default() += 1,
        }
        if tally.verdict.is_some() || self.proven() {
            return;
        }
        let refused: u64 = tally.refusals.values().sum();
        let answers = tally.gone + refused;
        if answers < JUDGE_ANSWERS {
            return;
        }
        let (answer, most) = tally
            .refusals
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(a, n)| (a.clone(), *n))
            .filter(|(_, n)| *n > tally.gone)
            .unwrap_or_else(|| ("410".to_owned(), tally.gone));
        let verdict = Verdict {
            answer,
            answers: most,
            endpoint: self.endpoint().to_owned(),
        };
        tracing::error!(
            endpoint = %self.endpoint(),
            answer = %verdict.answer,
            answers,
            "{verdict}; sending stops for {}",
            humantime::format_duration(COOL_DOWN)
        );
        tally.verdict = Some((Instant::now(), verdict));
        self.suspect.store(true, Ordering::Relaxed);
    }

    /// Names the endpoint in the reasons (the binary passes its setting
    /// and value); the first name given stays.
    pub fn name(&self, endpoint: impl Into<String>) {
        let _ = self.named.set(endpoint.into());
    }

    /// The endpoint as named in the reasons.
    pub fn endpoint(&self) -> &str {
        self.named.get().unwrap_or(&self.fallback)
    }

    /// Whether a 2xx came within [`PROOF_TTL`].
    pub fn proven(&self) -> bool {
        match self.last_delivery.load(Ordering::Relaxed) {
            0 => false,
            at => {
                let now = self.origin.elapsed().as_millis() as u64 + 1;
                now.saturating_sub(at) <= PROOF_TTL.as_millis() as u64
            }
        }
    }

    /// What the endpoint's answers say now.
    pub fn standing(&self) -> Standing {
        if self.suspect.load(Ordering::Relaxed)
            && let Some((_, verdict)) = &self.lock().verdict
        {
            return Standing::Suspect(verdict.clone());
        }
        if self.proven() {
            Standing::Proven
        } else {
            Standing::Unproven
        }
    }

    /// Whether a post may go out: not while a verdict stands. Once the
    /// cool-down has passed, the tally starts over, so the endpoint is
    /// judged afresh (a fixed endpoint, or a wrong verdict, recovers).
    pub fn gate(&self) -> Result<(), Verdict> {
        if !self.suspect.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut tally = self.lock();
        match &tally.verdict {
            Some((since, verdict)) if since.elapsed() < COOL_DOWN => Err(verdict.clone()),
            _ => {
                *tally = Tally::default();
                self.suspect.store(false, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// The verdict standing now, if any (the gauge).
    pub fn is_suspect(&self) -> bool {
        self.suspect.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The status a refusal's detail names (`API Gateway answered HTTP 404
/// (…)` → `HTTP 404`), so refusals that differ only in their message are
/// alike; otherwise the detail itself, shortened.
fn answer_of(detail: &str) -> String {
    if let Some(at) = detail.find("HTTP ") {
        let code: String = detail[at + 5..].chars().take(3).collect();
        if code.len() == 3 && code.chars().all(|c| c.is_ascii_digit()) {
            return format!("HTTP {code}");
        }
    }
    detail.chars().take(60).collect()
}

/// What a 410 is evidence of, for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoneEvidence {
    /// Established long enough ago, from a proven endpoint: remove the row.
    Remove,
    /// Established long enough ago, endpoint not proven yet: hold the row
    /// until a 2xx proves it (or recheck it after the window).
    Hold,
    /// May still be connecting: post again after this long; a second 410
    /// removes it.
    Recheck { after: Duration },
    /// The endpoint looks wrong: the row stays.
    Keep,
}

/// The evidence one 410 gives, for a connection read at `now_ms`.
pub fn judge_gone(
    connection: &Connection,
    standing: &Standing,
    now_ms: i64,
    window: Duration,
) -> GoneEvidence {
    if matches!(standing, Standing::Suspect(_)) {
        return GoneEvidence::Keep;
    }
    let window_ms = window.as_millis() as i64;
    match connection.started_ms {
        Some(started) if now_ms - started >= window_ms => match standing {
            Standing::Proven => GoneEvidence::Remove,
            _ => GoneEvidence::Hold,
        },
        Some(started) => GoneEvidence::Recheck {
            after: Duration::from_millis((started + window_ms - now_ms).clamp(0, window_ms) as u64),
        },
        None => GoneEvidence::Recheck { after: window },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn conn(started: Option<i64>) -> Connection {
        Connection {
            started_ms: started,
            ..Connection::new("c", None)
        }
    }

    fn suspect() -> Standing {
        Standing::Suspect(Verdict {
            answer: "410".into(),
            answers: 100,
            endpoint: "e".into(),
        })
    }

    #[test]
    fn a_410_removes_only_an_established_connection_from_a_proven_endpoint() {
        let old = conn(Some(NOW - 10 * 60_000));
        let young = conn(Some(NOW - 5_000));
        let unknown = conn(None);
        let cases = [
            (&old, Standing::Proven, GoneEvidence::Remove),
            (&old, Standing::Unproven, GoneEvidence::Hold),
            (&old, suspect(), GoneEvidence::Keep),
            (
                &young,
                Standing::Proven,
                GoneEvidence::Recheck {
                    after: CONNECT_WINDOW - Duration::from_secs(5),
                },
            ),
            (&young, suspect(), GoneEvidence::Keep),
            (
                &unknown,
                Standing::Proven,
                GoneEvidence::Recheck {
                    after: CONNECT_WINDOW,
                },
            ),
            (
                &unknown,
                Standing::Unproven,
                GoneEvidence::Recheck {
                    after: CONNECT_WINDOW,
                },
            ),
        ];
        for (connection, standing, expected) in cases {
            assert_eq!(
                judge_gone(connection, &standing, NOW, CONNECT_WINDOW),
                expected,
                "{connection:?} {standing:?}"
            );
        }
        // A start in the future (a skewed writer) is at most a window away.
        assert_eq!(
            judge_gone(
                &conn(Some(NOW + 3_600_000)),
                &Standing::Proven,
                NOW,
                CONNECT_WINDOW
            ),
            GoneEvidence::Recheck {
                after: CONNECT_WINDOW
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_answer_410_with_nothing_delivered_is_a_verdict_that_stops_sending_a_while() {
        let watch = EndpointWatch::new("FANOUT_GATEWAY_ENDPOINT=https://x/prod");
        assert_eq!(watch.standing(), Standing::Unproven);
        for _ in 0..JUDGE_ANSWERS - 1 {
            watch.record(&PostOutcome::Gone);
        }
        assert_eq!(watch.standing(), Standing::Unproven, "too few to judge");
        assert!(watch.gate().is_ok());
        watch.record(&PostOutcome::Gone);
        let Standing::Suspect(verdict) = watch.standing() else {
            panic!("a verdict after {JUDGE_ANSWERS} answers");
        };
        assert_eq!(verdict.status(), "misdirected");
        assert!(verdict.to_string().contains("FANOUT_GATEWAY_ENDPOINT"));
        assert!(watch.gate().is_err());
        tokio::time::advance(COOL_DOWN).await;
        assert!(watch.gate().is_ok(), "tried again after the cool-down");
        assert_eq!(watch.standing(), Standing::Unproven, "judged afresh");
    }

    #[tokio::test(start_paused = true)]
    async fn one_delivery_proves_the_endpoint_and_clears_the_tally() {
        let watch = EndpointWatch::new("e");
        for _ in 0..JUDGE_ANSWERS - 1 {
            watch.record(&PostOutcome::Gone);
        }
        watch.record(&PostOutcome::Delivered);
        assert_eq!(watch.standing(), Standing::Proven);
        // A mostly gone table is not a verdict while proven.
        for _ in 0..10 * JUDGE_ANSWERS {
            watch.record(&PostOutcome::Gone);
        }
        assert_eq!(watch.standing(), Standing::Proven);
        tokio::time::advance(PROOF_TTL + Duration::from_secs(1)).await;
        assert_eq!(watch.standing(), Standing::Unproven, "proof lapses");
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_refusal_for_every_post_is_a_verdict_naming_the_status() {
        let watch = EndpointWatch::new("FANOUT_GATEWAY_ENDPOINT=https://x/wrong");
        for n in 0..JUDGE_ANSWERS {
            watch.record(&PostOutcome::Rejected(format!(
                "API Gateway answered HTTP 404 (no error code: request {n})"
            )));
        }
        let Standing::Suspect(verdict) = watch.standing() else {
            panic!("a verdict");
        };
        assert_eq!(verdict.answer, "HTTP 404");
        assert_eq!(verdict.status(), "refusing");
        assert!(verdict.to_string().contains("HTTP 404"));
    }

    #[test]
    fn refusals_are_alike_by_status() {
        assert_eq!(
            answer_of("API Gateway answered HTTP 405 (x: y)"),
            "HTTP 405"
        );
        assert_eq!(answer_of("weird"), "weird");
    }
}
