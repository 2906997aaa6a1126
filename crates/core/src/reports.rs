//! Broadcast reports: when a job's message is settled, one JSON document
//! saying what the run came to goes to each configured destination (an SQS
//! queue, an SNS topic), so a producer can wait for its broadcast instead of
//! reading logs.
//!
//! [`ReportSink`] is the seam (`fanout-aws` implements it on SQS and SNS);
//! [`Reporter`] sends one report to every sink at once, each bounded by a
//! timeout. A report that cannot be sent is logged and counted
//! (`reports_failed`) and changes nothing else: the message was settled
//! before the report was built, and reports are at least once (a message
//! received twice reports twice).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::{BoxFuture, join_all};
use serde::{Deserialize, Serialize};

use crate::engine::summary::{KeyReceipts, MAX_FAILED_IDS, RunSummary};
use crate::job::keys::RunKey;
use crate::job::{Job, Segment};
use crate::runs::{BroadcastTally, Piece, Totals};
use crate::telemetry::Metrics;

/// How long one destination may take to take a report. Settling waits for
/// it, so a hung destination must not hold the worker's job slot long.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// What became of a job's message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every connection reached a final state: the message was deleted.
    Done,
    /// Part of the audience goes on in new jobs (the deferred connections,
    /// or the rest after a shutdown): they report under the same `id` with
    /// a higher `continuation`.
    Continued,
    /// A whole-table job became `segments_total` segment jobs, each of
    /// which reports.
    Split,
    /// Stopped by shutdown before any page was finished: the message was
    /// handed back as it is and runs again (the same run key).
    Interrupted,
    /// A passing failure (the table or the queue unavailable, a failed
    /// hand-on): the message runs again after a backoff.
    Retrying,
    /// The job can never run (or connections were deferred too often): it
    /// went to the dead-letter queue, or, without one, is left for the
    /// queue's redrive policy.
    DeadLettered,
    /// Its deadline (`deliver_by`) passed: received after it, nothing was
    /// sent; stopped at it, what was sent is counted and `unsent` counts
    /// the connections read but not reached. Nothing of it goes on.
    Lapsed,
    /// A cancel stopped it: what was sent is counted, `unsent` counts the
    /// connections read but not reached. Nothing of it goes on.
    Cancelled,
    /// A newer update of its stream (`latest`) owns the stream: not sent,
    /// or stopped where the newer one took over. Nothing of it goes on.
    Superseded,
    /// The report of a cancel job itself: its tombstone is recorded, and
    /// `reason` says whether a run of the broadcast was on record yet.
    CancelRecorded,
}

impl Status {
    /// Whether nothing of this run goes on: no new job and no new run of
    /// this message.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Done | Self::DeadLettered | Self::Lapsed | Self::Cancelled | Self::Superseded
        )
    }
}

/// What a report is about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// One settled message: a run of the broadcast.
    #[default]
    Run,
    /// The whole broadcast, once its last piece settled: every run's
    /// counts added up.
    Broadcast,
}

/// The report of one settled message, or of a whole broadcast (the
/// "Broadcast reports" section of docs/jobs.md documents every field).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BroadcastReport {
    /// `run` for a settled message's report, `broadcast` for the whole
    /// broadcast's.
    #[serde(default)]
    pub kind: Kind,
    /// The broadcast key (see [`crate::job::keys`]).
    pub id: String,
    /// The run key as logs show it.
    pub run: String,
    /// The scan segment of a split broadcast's segment job.
    pub segment: Option<u32>,
    /// How many segment jobs the broadcast was split into.
    pub segments_total: Option<u32>,
    pub continuation: u32,
    pub part: u32,
    /// The SQS message the run came from.
    pub message_id: String,
    /// Nothing of this run goes on (see [`Status::is_final`]).
    #[serde(rename = "final")]
    pub is_final: bool,
    pub status: Status,
    /// Why, for `dead_lettered` and `retrying`.
    pub reason: Option<String>,
    pub audience: u64,
    pub delivered: u64,
    pub gone: u64,
    pub expired: u64,
    pub removed: u64,
    /// Connections in state `rejected`.
    pub failed: u64,
    /// Connections still `deferred` when the run ended.
    pub deferred: u64,
    /// For a run stopped by its deadline or a cancel: connections of its
    /// audience that got no final answer (never posted to, in flight, or
    /// deferred), those it never read counted by reading on without
    /// sending.
    #[serde(default)]
    pub unsent: u64,
    /// The part of the audience a stopped run never read could not be
    /// counted in time: `unsent` counts only what it had read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsent_partial: bool,
    /// 410s posted to again after the connect window (their rows are
    /// removed only on a second 410).
    #[serde(default)]
    pub rechecking: u64,
    /// 410s that removed nothing for want of evidence: their rows stay.
    #[serde(default)]
    pub kept: u64,
    /// How the endpoint looked when it stopped the run: `misdirected`
    /// (every post 410), `refusing` (every post the same error) or
    /// `unproven` (nothing delivered, nothing proved it); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub throttled: u64,
    pub retries: u64,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub ended_at: String,
    /// The first [`MAX_FAILED_IDS`] rejected connections.
    pub failed_ids: Vec<String>,
    /// More connections were rejected than `failed_ids` names.
    pub failed_ids_truncated: bool,
    /// On a `to` broadcast: how many of its keys had a connection accept
    /// the message (a 2xx).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reached: Option<u64>,
    /// On a `to` broadcast: the keys none of whose connections accepted it,
    /// with nothing of them left to try (no connection, or each gone,
    /// expired or rejected; every key not reached once the broadcast is
    /// `lapsed` or `cancelled`). At most 100 keys of 512 bytes: no cut is
    /// needed to fit SQS's and SNS's 256 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreached: Option<Vec<String>>,
    /// On a broadcast's report: the runs it added up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<u64>,
}

impl BroadcastReport {
    /// Its counts, as a broadcast adds them up.
    fn counts(&self) -> Totals {
        Totals {
            audience: self.audience,
            delivered: self.delivered,
            gone: self.gone,
            expired: self.expired,
            removed: self.removed,
            failed: self.failed,
            unsent: self.unsent,
            throttled: self.throttled,
            retries: self.retries,
            ..Totals::default()
        }
    }

    fn set_counts(&mut self, t: &Totals) {
        self.audience = t.audience;
        self.delivered = t.delivered;
        self.gone = t.gone;
        self.expired = t.expired;
        self.removed = t.removed;
        self.failed = t.failed;
        self.unsent = t.unsent;
        self.throttled = t.throttled;
        self.retries = t.retries;
    }
}

/// A report before its message is settled: everything but the status and
/// the end, and a `to` broadcast's keys, which the status decides on.
#[derive(Clone, Debug)]
pub struct Draft(BroadcastReport, Option<KeyReceipts>);

impl Draft {
    /// A job's run, from the engine's report.
    pub fn of_run(job: &Job, message_id: &str, report: &RunSummary, started: SystemTime) -> Self {
        let mut draft = Self::of_job(job, message_id, started);
        let r = &mut draft.0;
        r.set_counts(&Totals {
            audience: report.audience,
            delivered: report.delivered,
            gone: report.gone,
            expired: report.expired,
            removed: report.removed,
            failed: report.failed,
            throttled: report.throttled,
            retries: report.retries,
            ..Totals::default()
        });
        r.deferred = report.deferred.len() as u64;
        r.rechecking = report.rechecking;
        r.kept = report.kept;
        r.failed_ids = report
            .rejected
            .iter()
            .take(MAX_FAILED_IDS)
            .map(|id| id.as_str().to_owned())
            .collect();
        r.failed_ids_truncated = report.failed > r.failed_ids.len() as u64;
        draft.1 = report.receipts.clone();
        draft
    }

    /// A job that sent nothing (one split into segment jobs, say).
    pub fn of_job(job: &Job, message_id: &str, started: SystemTime) -> Self {
        let key = RunKey::of(job);
        let mut draft = Self::of_message(&job.id, message_id, started);
        draft.0.run = key.to_string();
        draft.0.segment = key.segment.map(|s| s.index);
        draft.0.segments_total = key.segment.map(|s| s.total);
        draft.0.continuation = key.continuation;
        draft.0.part = key.part;
        // A job that sends nothing leaves each of its keys unreached.
        draft.1 = job.receipts.as_ref().map(|r| KeyReceipts {
            keys: r.keys.clone(),
            reached: vec![false; r.keys.len()],
            pending: vec![false; r.keys.len()],
            read: vec![false; r.keys.len()],
            earlier: vec![false; r.keys.len()],
            deferred_of: Default::default(),
        });
        draft
    }

    /// A cancel job, keyed by the broadcast it stops.
    pub fn of_cancel(broadcast: &str, message_id: &str, started: SystemTime) -> Self {
        let mut draft = Self::of_message(broadcast, message_id, started);
        draft.0.run = format!("cancel {broadcast}");
        draft
    }

    /// A message that is no job (it does not parse): keyed by the `id` its
    /// body names, if it names one, so its producer still finds it.
    pub fn of_unparsed(body: &str, message_id: &str, started: SystemTime) -> Self {
        let named = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("id")?.as_str().map(str::to_owned));
        Self::of_message(named.as_deref().unwrap_or(message_id), message_id, started)
    }

    fn of_message(id: &str, message_id: &str, started: SystemTime) -> Self {
        let report = BroadcastReport {
            kind: Kind::Run,
            id: id.to_owned(),
            run: id.to_owned(),
            segment: None,
            segments_total: None,
            continuation: 0,
            part: 0,
            message_id: message_id.to_owned(),
            is_final: false,
            status: Status::Retrying,
            reason: None,
            audience: 0,
            delivered: 0,
            gone: 0,
            expired: 0,
            removed: 0,
            failed: 0,
            deferred: 0,
            unsent: 0,
            unsent_partial: false,
            rechecking: 0,
            kept: 0,
            endpoint: None,
            throttled: 0,
            retries: 0,
            started_at: rfc3339(started),
            ended_at: rfc3339(started),
            failed_ids: Vec::new(),
            failed_ids_truncated: false,
            reached: None,
            unreached: None,
            runs: None,
        };
        Self(report, None)
    }

    /// The split a whole-table job became.
    pub fn split_into(mut self, total: u32) -> Self {
        self.0.segments_total = Some(total);
        self
    }

    /// How the endpoint looked, for a run its answers stopped.
    pub fn endpoint(mut self, status: Option<&str>) -> Self {
        self.0.endpoint = status.map(str::to_owned);
        self
    }

    /// A run stopped before its end: the connections read that got no
    /// final answer.
    pub fn stopped(mut self) -> Self {
        let r = &mut self.0;
        let answered = r.delivered + r.gone + r.expired + r.failed;
        r.unsent = r.audience.saturating_sub(answered);
        self
    }

    /// A stopped run's never-read connections, when they could be counted.
    pub fn unread(mut self, count: Option<u64>) -> Self {
        match count {
            Some(count) => self.0.unsent += count,
            None => self.0.unsent_partial = true,
        }
        self
    }

    /// No receipts: a stream's update sent by the stream's running
    /// update, whose report has them.
    pub fn without_receipts(mut self) -> Self {
        self.1 = None;
        self
    }

    pub fn because(mut self, reason: impl Into<String>) -> Self {
        self.0.reason = Some(reason.into());
        self
    }

    /// The run key this report is about.
    pub fn run_key(&self) -> RunKey {
        let r = &self.0;
        RunKey {
            broadcast: r.id.clone(),
            segment: r
                .segment
                .zip(r.segments_total)
                .map(|(index, total)| Segment { index, total }),
            continuation: r.continuation,
            part: r.part,
        }
    }

    /// What this run adds to its broadcast's record, once settled with
    /// `status`; `expects`: the run keys the broadcast waits for because of
    /// it.
    pub fn piece(&self, status: Status, expects: Vec<String>) -> Piece {
        let r = &self.0;
        let receipts = self.1.as_ref();
        let stopped = matches!(
            status,
            Status::Lapsed | Status::Cancelled | Status::Superseded
        );
        Piece {
            run: self.run_key().storage_key(),
            expects,
            totals: Totals {
                lapsed: u64::from(status == Status::Lapsed),
                superseded: u64::from(status == Status::Superseded),
                cancelled: u64::from(status == Status::Cancelled),
                dead_lettered: u64::from(status == Status::DeadLettered),
                unsent_partial: u64::from(r.unsent_partial),
                ..r.counts()
            },
            reached: receipts.map(KeyReceipts::reached_keys).unwrap_or_default(),
            unreached: receipts.map(|k| k.unreached(stopped)).unwrap_or_default(),
            started_ms: parse_ms(&r.started_at),
        }
    }

    /// The whole broadcast's report, from its record once its last piece
    /// (this one) settled.
    pub fn of_broadcast(&self, tally: &BroadcastTally, ended: SystemTime) -> BroadcastReport {
        let t = &tally.totals;
        let status = ending(t);
        let mut report = Self::of_message(&self.0.id, &self.0.message_id, SystemTime::now()).0;
        report.kind = Kind::Broadcast;
        report.status = status;
        report.is_final = true;
        report.set_counts(t);
        report.unsent_partial = t.unsent_partial > 0;
        report.started_at = crate::runs::rfc3339(tally.started_ms);
        report.ended_at = rfc3339(ended);
        report.runs = Some(tally.settled.len() as u64);
        if self.1.is_some() {
            report.reached = Some(tally.reached.len() as u64);
            report.unreached = Some(tally.unreached());
        }
        report
    }

    /// The report, once the message is settled.
    pub fn settled(self, status: Status, ended: SystemTime) -> BroadcastReport {
        let mut report = self.0;
        if let Some(keys) = self.1 {
            let stopped = matches!(
                status,
                Status::Lapsed | Status::Cancelled | Status::Superseded
            );
            report.reached = Some(keys.reached_count());
            report.unreached = Some(keys.unreached(stopped));
        }
        report.status = status;
        report.is_final = status.is_final();
        report.ended_at = rfc3339(ended);
        report
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// How a whole broadcast ended: cancelled if any piece was, else lapsed,
/// else superseded, else dead-lettered, else done.
fn ending(totals: &Totals) -> Status {
    if totals.cancelled > 0 {
        Status::Cancelled
    } else if totals.lapsed > 0 {
        Status::Lapsed
    } else if totals.superseded > 0 {
        Status::Superseded
    } else if totals.dead_lettered > 0 {
        Status::DeadLettered
    } else {
        Status::Done
    }
}

/// Epoch ms of an RFC 3339 time this module wrote.
fn parse_ms(text: &str) -> i64 {
    humantime::parse_rfc3339(text)
        .map(crate::connection::expiry::epoch_ms)
        .unwrap_or(0)
}

/// Why a destination did not take a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("the report destination refused it: {0}")]
    Refused(String),
    #[error("the report destination cannot be reached: {0}")]
    Unavailable(String),
    #[error("the report destination did not answer within {0:?}")]
    TimedOut(Duration),
}

/// Where reports go. One call per report; the sink does its own retries,
/// within [`REPORT_TIMEOUT`].
pub trait ReportSink: Send + Sync {
    /// The destination, for logs (a queue URL, a topic ARN).
    fn destination(&self) -> &str;

    /// Sends one report's JSON text.
    fn send<'a>(&'a self, body: &'a str) -> BoxFuture<'a, Result<(), ReportError>>;
}

/// Sends each report to every configured sink.
#[derive(Clone, Default)]
pub struct Reporter {
    sinks: Vec<Arc<dyn ReportSink>>,
    timeout: Option<Duration>,
}

impl Reporter {
    /// No destination: reports are not built.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn new(sinks: Vec<Arc<dyn ReportSink>>) -> Self {
        Self {
            sinks,
            timeout: None,
        }
    }

    /// Another bound than [`REPORT_TIMEOUT`] (for tests).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// Sends `report` to every sink at once; failures are logged and
    /// counted, never returned.
    pub async fn send(&self, report: &BroadcastReport, metrics: &Metrics) {
        if self.sinks.is_empty() {
            return;
        }
        let body = match serde_json::to_string(report) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(job_id = %report.id, error = %e, "cannot encode the broadcast report");
                Metrics::add(&metrics.reports_failed, self.sinks.len() as u64);
                return;
            }
        };
        let timeout = self.timeout.unwrap_or(REPORT_TIMEOUT);
        let sends = self.sinks.iter().map(|sink| {
            let body = &body;
            async move {
                let sent = match tokio::time::timeout(timeout, sink.send(body)).await {
                    Ok(sent) => sent,
                    Err(_) => Err(ReportError::TimedOut(timeout)),
                };
                (sink.destination(), sent)
            }
        });
        for (destination, sent) in join_all(sends).await {
            match sent {
                Ok(()) => Metrics::incr(&metrics.reports_sent),
                Err(e) => {
                    Metrics::incr(&metrics.reports_failed);
                    tracing::warn!(
                        job_id = %report.id,
                        run = %report.run,
                        status = ?report.status,
                        destination,
                        error = %e,
                        "the broadcast report was not sent"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::ConnectionId;
    use crate::fakes::FakeReports;
    use crate::job::{Capabilities, parse};

    fn job(body: &str) -> Job {
        parse(
            body,
            "msg-1",
            &Capabilities {
                channels: true,
                audiences: None,
            },
        )
        .unwrap()
    }

    fn counts() -> RunSummary {
        RunSummary {
            audience: 10,
            delivered: 6,
            gone: 1,
            expired: 1,
            removed: 2,
            failed: 2,
            rejected: vec![ConnectionId::new("c-4"), ConnectionId::new("c-5")],
            throttled: 3,
            retries: 4,
            ..RunSummary::default()
        }
    }

    #[test]
    fn every_status_has_its_name_and_only_the_ends_are_final() {
        let cases = [
            (Status::Done, "done", true),
            (Status::Continued, "continued", false),
            (Status::Split, "split", false),
            (Status::Interrupted, "interrupted", false),
            (Status::Retrying, "retrying", false),
            (Status::DeadLettered, "dead_lettered", true),
        ];
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for (status, name, is_final) in cases {
            let report = Draft::of_run(&job(r#"{"id":"b","data":"x"}"#), "m", &counts(), started)
                .settled(status, started + Duration::from_millis(1500));
            let v = serde_json::to_value(&report).unwrap();
            assert_eq!(v["status"], name);
            assert_eq!(v["final"], is_final, "{name}");
            assert_eq!(v["id"], "b");
            assert_eq!(v["started_at"], "2023-11-14T22:13:20.000Z");
            assert_eq!(v["ended_at"], "2023-11-14T22:13:21.500Z");
            for (field, n) in [
                ("audience", 10),
                ("delivered", 6),
                ("gone", 1),
                ("expired", 1),
                ("removed", 2),
                ("failed", 2),
                ("throttled", 3),
                ("retries", 4),
                ("deferred", 0),
            ] {
                assert_eq!(v[field], n, "{field}");
            }
            assert_eq!(v["failed_ids"], serde_json::json!(["c-4", "c-5"]));
            assert_eq!(v["failed_ids_truncated"], false);
        }
    }

    #[test]
    fn segments_and_continuations_carry_their_run_key() {
        let share = job(r#"{"id":"b","data":"x","segment":{"index":1,"total":3}}"#);
        let r =
            Draft::of_job(&share, "m", SystemTime::now()).settled(Status::Done, SystemTime::now());
        assert_eq!(
            (r.segment, r.segments_total, r.continuation, r.run.as_str()),
            (Some(1), Some(3), 0, "b segment 1/3")
        );
        let next = job(&serde_json::to_string(&share.continuation(vec![])).unwrap());
        let r =
            Draft::of_job(&next, "m2", SystemTime::now()).settled(Status::Done, SystemTime::now());
        assert_eq!(
            (r.id.as_str(), r.continuation, r.segment),
            ("b", 1, Some(1))
        );
        let whole = job(r#"{"id":"b","data":"x"}"#);
        let r = Draft::of_job(&whole, "m", SystemTime::now())
            .split_into(4)
            .settled(Status::Split, SystemTime::now());
        assert_eq!(
            (r.segment, r.segments_total, r.is_final),
            (None, Some(4), false)
        );
    }

    #[test]
    fn a_body_that_is_no_job_is_keyed_by_its_id_if_it_names_one() {
        let now = SystemTime::now();
        let named = Draft::of_unparsed(r#"{"id":"mine","data":1,"bogus":true}"#, "m", now)
            .because("bad")
            .settled(Status::DeadLettered, now);
        assert_eq!(
            (named.id.as_str(), named.reason.as_deref()),
            ("mine", Some("bad"))
        );
        let garbage = Draft::of_unparsed("not json", "m-7", now).settled(Status::DeadLettered, now);
        assert_eq!(
            (garbage.id.as_str(), garbage.message_id.as_str()),
            ("m-7", "m-7")
        );
    }

    #[test]
    fn the_failed_ids_are_capped_and_the_cap_is_flagged() {
        let mut report = counts();
        report.failed = 250;
        report.rejected = (0..MAX_FAILED_IDS)
            .map(|n| ConnectionId::new(format!("c-{n}")))
            .collect();
        let r = Draft::of_run(
            &job(r#"{"id":"b","data":"x"}"#),
            "m",
            &report,
            SystemTime::now(),
        )
        .settled(Status::Done, SystemTime::now());
        assert_eq!(r.failed_ids.len(), MAX_FAILED_IDS);
        assert!(r.failed_ids_truncated);
        assert_eq!(r.failed, 250);
    }

    #[tokio::test]
    async fn each_sink_gets_the_report_and_a_failing_one_is_only_counted() {
        let good = Arc::new(FakeReports::default());
        let bad = Arc::new(FakeReports::failing());
        let slow = Arc::new(FakeReports::hanging());
        let reporter = Reporter::new(vec![good.clone(), bad.clone(), slow.clone()])
            .with_timeout(Duration::from_millis(20));
        let metrics = Metrics::default();
        let report = Draft::of_job(&job(r#"{"id":"b","data":"x"}"#), "m", SystemTime::now())
            .settled(Status::Done, SystemTime::now());
        reporter.send(&report, &metrics).await;
        assert_eq!(good.reports(), [report]);
        assert!(bad.reports().is_empty() && slow.reports().is_empty());
        assert_eq!(Metrics::get(&metrics.reports_sent), 1);
        assert_eq!(Metrics::get(&metrics.reports_failed), 2);
    }
}
