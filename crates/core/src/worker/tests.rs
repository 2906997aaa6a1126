//! The worker against the in-process fakes, in paused time.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::budget::SendBudget;
use crate::engine::EngineSettings;
use crate::fakes::{FakeGateway, FakeQueue, FakeReports, FakeTable, ids};
use crate::job::Target;
use crate::queue::Receipt;
use crate::reports::{BroadcastReport, Status};
use crate::store::Cursor;

/// A shutdown token cancelled after `delay` (paused time runs it at once).
fn shutdown_after(delay: Duration) -> CancellationToken {
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        trigger.cancel();
    });
    shutdown
}

fn settings() -> WorkerSettings {
    WorkerSettings {
        max_concurrent_jobs: 2,
        visibility_timeout: Duration::from_secs(30),
        heartbeat_interval: Duration::from_secs(10),
        job_retry: Backoff {
            base: Duration::from_secs(5),
            max: Duration::from_secs(60),
            max_attempts: 1,
        },
        shutdown_grace: Duration::from_secs(5),
        exit_when_idle: true,
        capabilities: Capabilities {
            channels: false,
            audiences: Some(Vec::new()),
        },
        split_segments: 1,
        deferred_limit: 2,
        clock: std::sync::Arc::default(),
    }
}

struct Rig {
    queue: Arc<FakeQueue>,
    table: Arc<FakeTable>,
    gateway: Arc<FakeGateway>,
    metrics: Arc<Metrics>,
    reports: Arc<FakeReports>,
}

impl Rig {
    fn new(queue: FakeQueue, gateway: FakeGateway) -> Self {
        Self {
            queue: Arc::new(queue),
            table: Arc::new(FakeTable::with(&ids(20), 5)),
            gateway: Arc::new(gateway),
            metrics: Arc::new(Metrics::default()),
            reports: Arc::new(FakeReports::default()),
        }
    }

    /// A rig whose queue holds `bodies`, with a dead-letter queue, in front
    /// of a gateway that delivers everything.
    fn jobs(bodies: &[&str]) -> Self {
        Self::new(FakeQueue::with_jobs(bodies, true), FakeGateway::default())
    }

    /// Runs a worker that stays up (not `exit_when_idle`) until shutdown
    /// is asked after `after`.
    async fn run_until_shut_down(&self, after: Duration) -> Stopped {
        let mut s = settings();
        s.exit_when_idle = false;
        self.run(s, shutdown_after(after)).await
    }

    /// What each report said, in the order sent.
    fn statuses(&self) -> Vec<(String, Status, bool)> {
        self.reports
            .reports()
            .into_iter()
            .map(|r: BroadcastReport| (r.id, r.status, r.is_final))
            .collect()
    }

    /// The engine every test runs: quick retries, one pass.
    fn engine(&self) -> Arc<Engine<Arc<FakeTable>, FakeGateway>> {
        Arc::new(Engine::new(
            Arc::new(self.table.clone()),
            self.gateway.clone(),
            Arc::new(SendBudget::new(None, 8)),
            EngineSettings {
                send_backoff: Backoff {
                    base: Duration::from_millis(1),
                    max: Duration::from_millis(1),
                    max_attempts: 2,
                },
                throttle_deadline: Duration::from_millis(20),
                deferred_passes: 1,
                ..crate::fakes::engine_settings(8)
            },
            self.metrics.clone(),
        ))
    }

    async fn run(&self, settings: WorkerSettings, shutdown: CancellationToken) -> Stopped {
        self.run_with(settings, shutdown, None).await
    }

    /// [`Rig::run`], with run records in `ledger`.
    async fn run_with(
        &self,
        settings: WorkerSettings,
        shutdown: CancellationToken,
        ledger: Option<Arc<Ledger>>,
    ) -> Stopped {
        run(
            self.queue.clone(),
            self.engine(),
            settings,
            self.metrics.clone(),
            Reporter::new(vec![self.reports.clone()]),
            shutdown,
            ledger,
        )
        .await
    }
}

/// Run records in `runs`, for a rig's worker.
fn ledger(rig: &Rig, runs: &Arc<crate::fakes::FakeRunTable>) -> Arc<Ledger> {
    let windows = crate::runs::Windows {
        dedup: Duration::from_secs(24 * 3600),
        lease: Duration::from_secs(30),
    };
    Arc::new(Ledger::new(runs.clone(), windows, rig.metrics.clone()))
}

/// A gateway on which posts to `id` never answer.
fn stalling(id: &str) -> FakeGateway {
    FakeGateway {
        stall_ids: [id.to_owned()].into(),
        ..FakeGateway::default()
    }
}

fn failing(id: &str) -> FakeGateway {
    let gateway = FakeGateway::default();
    gateway.script.lock().unwrap().insert(
        id.into(),
        vec![crate::gateway::PostOutcome::Transient("HTTP 503".into()); 1000],
    );
    gateway
}

#[tokio::test]
async fn deferred_connections_go_on_in_a_delayed_continuation_then_the_message_goes() {
    let rig = Rig::new(
        FakeQueue::with_jobs(&[r#"{"id":"j","data":"a"}"#], true),
        failing("conn-3"),
    );
    assert_eq!(
        rig.run(settings(), CancellationToken::new()).await,
        Stopped::Idle
    );
    assert_eq!(rig.gateway.delivered.lock().unwrap().len(), 19);
    let sent = rig.queue.sent.lock().unwrap().clone();
    let [body] = &sent[..] else {
        panic!("{sent:?}")
    };
    let next = job::parse(body, "m", &settings().capabilities).expect("parses");
    assert_eq!(next.id, "j");
    assert_eq!(next.deferrals, 1);
    let Target::Deferred(listed) = next.target else {
        panic!("{:?}", next.target)
    };
    let ids: Vec<_> = listed.iter().map(|c| c.id.to_string()).collect();
    assert_eq!(ids, ["conn-3"], "exactly the deferred one");
    assert!(listed[0].key.is_some(), "with its row key");
    assert_eq!(rig.queue.deleted_ids(), ["r0"], "handed on, then deleted");
    let [report] = &rig.reports.reports()[..] else {
        panic!("one report")
    };
    assert_eq!((report.status, report.is_final), (Status::Continued, false));
    assert_eq!(
        (report.delivered, report.deferred, report.audience),
        (19, 1, 20)
    );
    // Still to be reached: counted as deferred at the run's end, not as
    // never reached.
    assert_eq!(Metrics::get(&rig.metrics.deferred_at_end), 1);
    assert_eq!(Metrics::get(&rig.metrics.unreached), 0);
}

#[tokio::test]
async fn a_connection_deferred_across_the_limit_is_dead_lettered_alone() {
    let body =
        r#"{"id":"j","data":"a","deferrals":2,"deferred":[{"id":"conn-3"},{"id":"conn-4"}]}"#;
    let rig = Rig::new(FakeQueue::with_jobs(&[body], true), failing("conn-3"));
    assert_eq!(
        rig.run(settings(), CancellationToken::new()).await,
        Stopped::Idle
    );
    assert_eq!(rig.gateway.delivered.lock().unwrap().len(), 1, "conn-4");
    assert!(rig.queue.sent.lock().unwrap().is_empty(), "no continuation");
    let dead = rig.queue.dead.as_ref().unwrap().lock().unwrap().clone();
    let [(id, reason)] = &dead[..] else {
        panic!("{dead:?}")
    };
    assert_eq!(id, "m0/conn-3");
    assert!(
        reason.contains("HTTP 503") && reason.contains("conn-3"),
        "{reason}"
    );
    assert_eq!(rig.queue.deleted_ids(), ["r0"]);
    assert_eq!(rig.statuses(), [("j".into(), Status::DeadLettered, true)]);
    // The final count of connections that never got the message, which the
    // failure alarm reads.
    assert_eq!(Metrics::get(&rig.metrics.unreached), 1);
    assert_eq!(Metrics::get(&rig.metrics.deferred_at_end), 0);
}

#[tokio::test]
async fn without_a_dead_letter_queue_a_connection_deferred_too_often_keeps_its_job() {
    let body = r#"{"data":"a","deferrals":2,"deferred":[{"id":"conn-3"}]}"#;
    let rig = Rig::new(FakeQueue::with_jobs(&[body], false), failing("conn-3"));
    assert_eq!(
        rig.run(settings(), CancellationToken::new()).await,
        Stopped::Idle
    );
    assert!(rig.queue.deleted_ids().is_empty(), "nothing dropped");
}

#[tokio::test]
async fn on_a_fifo_queue_deferred_connections_fail_the_job_in_its_place() {
    let mut queue = FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true);
    queue.visible.get_mut().unwrap()[0].group_id = Some("news".into());
    let rig = Rig::new(queue, failing("conn-3"));
    assert_eq!(
        rig.run(settings(), CancellationToken::new()).await,
        Stopped::Idle
    );
    assert!(rig.queue.sent.lock().unwrap().is_empty(), "no new message");
    assert!(rig.queue.deleted_ids().is_empty(), "kept in its place");
    assert_eq!(rig.statuses(), [("m0".into(), Status::Retrying, false)]);
    let visibility = rig.queue.visibility.lock().unwrap().clone();
    assert!(
        visibility
            .iter()
            .any(|(r, after)| r.0 == "r0" && !after.is_zero()),
        "retried later: {visibility:?}"
    );
}

#[tokio::test]
async fn good_jobs_are_delivered_then_deleted_and_bad_ones_dead_lettered() {
    let rig = Rig::jobs(&[
        r#"{"data":"a"}"#,
        "{not json",
        r#"{"data":"b"}"#,
        r#"{"data":"x","channel":"c"}"#,
    ]);
    let stopped = rig.run(settings(), CancellationToken::new()).await;
    assert_eq!(stopped, Stopped::Idle);
    assert_eq!(
        rig.gateway.delivered.lock().unwrap().len(),
        40,
        "two jobs × 20"
    );
    assert_eq!(rig.queue.deleted_ids(), ["r0", "r1", "r2", "r3"]);
    let dead = rig.queue.dead.as_ref().unwrap().lock().unwrap().clone();
    assert_eq!(dead.len(), 2);
    assert!(
        dead.iter()
            .any(|(id, why)| id == "m1" && why.contains("not a valid job")),
        "{dead:?}"
    );
    assert!(
        dead.iter().any(|(id, why)| id == "m3"
            && why.contains(&crate::limits::setting::Setting::ChannelIndex.to_string())),
        "{dead:?}"
    );
    assert_eq!(Metrics::get(&rig.metrics.jobs_completed), 2);
    assert_eq!(Metrics::get(&rig.metrics.jobs_in_flight), 0);
    let mut reports = rig.reports.reports();
    reports.sort_by(|a, b| a.message_id.cmp(&b.message_id));
    let seen: Vec<_> = reports
        .iter()
        .map(|r| (r.message_id.as_str(), r.status, r.delivered))
        .collect();
    assert_eq!(
        seen,
        [
            ("m0", Status::Done, 20),
            ("m1", Status::DeadLettered, 0),
            ("m2", Status::Done, 20),
            ("m3", Status::DeadLettered, 0)
        ]
    );
    assert!(
        reports[1]
            .reason
            .as_deref()
            .unwrap()
            .contains("not a valid job")
    );
    assert_eq!(Metrics::get(&rig.metrics.reports_sent), 4);
}

#[tokio::test(start_paused = true)]
async fn a_report_destination_that_never_answers_holds_settling_for_its_timeout_only() {
    let mut rig = Rig::jobs(&[r#"{"data":"a"}"#, r#"{"data":"b"}"#]);
    rig.reports = Arc::new(FakeReports::hanging());
    let started = tokio::time::Instant::now();
    assert_eq!(
        rig.run(settings(), CancellationToken::new()).await,
        Stopped::Idle
    );
    assert_eq!(rig.queue.deleted_ids(), ["r0", "r1"], "both done");
    assert_eq!(Metrics::get(&rig.metrics.reports_failed), 2);
    // The two jobs run side by side: their reports time out together.
    assert!(
        started.elapsed() < crate::reports::REPORT_TIMEOUT * 2,
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_report_destination_that_fails_changes_nothing_but_its_count() {
    let mut rig = Rig::jobs(&[r#"{"data":"a"}"#, "{not json"]);
    rig.reports = Arc::new(FakeReports::failing());
    assert_eq!(
        rig.run(settings(), CancellationToken::new()).await,
        Stopped::Idle
    );
    assert_eq!(rig.gateway.delivered.lock().unwrap().len(), 20);
    assert_eq!(rig.queue.deleted_ids(), ["r0", "r1"]);
    assert_eq!(rig.queue.dead.as_ref().unwrap().lock().unwrap().len(), 1);
    assert_eq!(Metrics::get(&rig.metrics.jobs_completed), 1);
    assert_eq!(Metrics::get(&rig.metrics.reports_failed), 2);
    assert_eq!(Metrics::get(&rig.metrics.reports_sent), 0);
}

#[tokio::test]
async fn without_a_dead_letter_queue_a_bad_job_is_left_for_redrive() {
    let rig = Rig::new(FakeQueue::with_jobs(&["[]"], false), FakeGateway::default());
    rig.run(settings(), CancellationToken::new()).await;
    assert!(
        rig.queue.deleted_ids().is_empty(),
        "a bad job must not be deleted without a DLQ"
    );
    assert!(rig.queue.visibility.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_permanent_send_failure_dead_letters_and_a_passing_one_retries_later() {
    let gateway = FakeGateway::default();
    gateway.script.lock().unwrap().insert(
        "conn-0".into(),
        vec![crate::gateway::PostOutcome::PayloadTooLarge],
    );
    let rig = Rig::new(FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true), gateway);
    rig.run(settings(), CancellationToken::new()).await;
    assert_eq!(rig.queue.deleted_ids(), ["r0"]);
    let dead = rig.queue.dead.as_ref().unwrap().lock().unwrap().clone();
    assert!(dead[0].1.contains("too large"), "{dead:?}");
    assert_eq!(rig.statuses(), [("m0".into(), Status::DeadLettered, true)]);

    let gateway = FakeGateway::default();
    gateway.script.lock().unwrap().insert(
        "conn-0".into(),
        vec![crate::gateway::PostOutcome::Forbidden("403".into())],
    );
    let mut queue = FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true);
    queue.visible.get_mut().unwrap()[0].receive_count = 3;
    let rig = Rig::new(queue, gateway);
    rig.run(settings(), CancellationToken::new()).await;
    assert!(
        rig.queue.deleted_ids().is_empty(),
        "a retried job is not deleted"
    );
    let visibility = rig.queue.visibility.lock().unwrap().clone();
    // Third receive: base 5 s doubled twice.
    assert_eq!(
        visibility,
        [(Receipt("r0".into()), Duration::from_secs(20))]
    );
    let [report] = &rig.reports.reports()[..] else {
        panic!("one report")
    };
    assert_eq!((report.status, report.is_final), (Status::Retrying, false));
    assert!(
        report.reason.as_deref().unwrap().contains("403"),
        "{report:?}"
    );
    assert_eq!(Metrics::get(&rig.metrics.jobs_retried), 1);
}

#[tokio::test(start_paused = true)]
async fn a_running_job_keeps_its_message_hidden_and_shutdown_hands_it_back() {
    let rig = Rig::new(
        FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true),
        FakeGateway {
            stall: true,
            ..FakeGateway::default()
        },
    );
    let stopped = rig.run_until_shut_down(Duration::from_secs(31)).await;
    assert_eq!(stopped, Stopped::Shutdown);
    let visibility = rig.queue.visibility.lock().unwrap().clone();
    let heartbeats = visibility
        .iter()
        .filter(|(_, t)| *t == Duration::from_secs(30))
        .count();
    assert_eq!(
        heartbeats, 3,
        "heartbeats at 10, 20, 30 s; shutdown at 31 s, grace over at 36 s: {visibility:?}"
    );
    assert_eq!(
        visibility.last().unwrap(),
        &(Receipt("r0".into()), Duration::ZERO),
        "handed back at once"
    );
    assert!(
        rig.queue.sent.lock().unwrap().is_empty(),
        "no page finished: no continuation"
    );
    assert!(rig.queue.deleted_ids().is_empty());
    assert_eq!(rig.statuses(), [("m0".into(), Status::Interrupted, false)]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_within_grace_and_bound_when_the_queue_hangs() {
    // The job never ends by itself, and nothing the worker asks of the
    // queue after receiving is ever answered.
    let rig = Rig::new(
        FakeQueue {
            stall_settles: true,
            ..FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true)
        },
        FakeGateway {
            stall: true,
            ..FakeGateway::default()
        },
    );
    let mut s = settings();
    s.exit_when_idle = false;
    let started = tokio::time::Instant::now();
    let shutdown = shutdown_after(Duration::from_secs(1));
    let bound = Duration::from_secs(1) + s.shutdown_grace + SHUTDOWN_SETTLE_BOUND;
    let stopped = tokio::time::timeout(Duration::from_secs(3600), rig.run(s, shutdown))
        .await
        .expect("the worker must stop despite a hung queue");
    assert_eq!(stopped, Stopped::Shutdown);
    assert!(started.elapsed() <= bound, "{:?}", started.elapsed());
    assert!(rig.queue.deleted_ids().is_empty(), "nothing settled");
}

#[tokio::test(start_paused = true)]
async fn nothing_of_a_stopped_worker_runs_on_not_even_a_fifo_chains_waiting_heartbeats() {
    // Two jobs of one group: the second waits, hidden by a heartbeat,
    // behind the first, which never ends; the queue hangs at shutdown.
    let mut queue = fifo(&[r#"{"data":"1"}"#, r#"{"data":"2"}"#], "g");
    queue.stall_settles = true;
    let rig = Rig::new(
        queue,
        FakeGateway {
            stall: true,
            ..FakeGateway::default()
        },
    );
    let mut s = settings();
    s.exit_when_idle = false;
    s.max_concurrent_jobs = 4;
    let stopped = rig.run(s, shutdown_after(Duration::from_secs(1))).await;
    assert_eq!(stopped, Stopped::Shutdown);
    // Aborted tasks let go of what they hold once the runtime drops them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        Arc::strong_count(&rig.queue),
        1,
        "a task of the stopped worker still holds the queue"
    );
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_job_with_finished_pages_continues_in_a_new_message() {
    // Pages of 5; conn-12 never answers: pages 1 and 2 finish, page 3 not.
    let rig = Rig::new(
        FakeQueue::with_jobs(&[r#"{"id":"big","data":"a"}"#], true),
        stalling("conn-12"),
    );
    rig.run_until_shut_down(Duration::from_secs(1)).await;
    let sent = rig.queue.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "one continuation");
    let next = job::parse(
        &sent[0],
        "m9",
        &Capabilities {
            channels: false,
            audiences: Some(Vec::new()),
        },
    )
    .expect("parses");
    assert_eq!(next.id, "big");
    let after_two_pages = Cursor {
        segment: 0,
        position: Some(crate::store::Position::Offset(10)),
    };
    assert_eq!(next.resume, Some(vec![after_two_pages]));
    assert_eq!(rig.queue.deleted_ids(), ["r0"], "the original is replaced");
    let [report] = &rig.reports.reports()[..] else {
        panic!("one report")
    };
    assert_eq!(
        (report.id.as_str(), report.status, report.is_final),
        ("big", Status::Continued, false)
    );
    assert!(report.delivered >= 10, "{report:?}");
    let visibility = rig.queue.visibility.lock().unwrap().clone();
    assert!(
        visibility.iter().all(|(_, t)| !t.is_zero()),
        "{visibility:?}"
    );
}

#[tokio::test]
async fn receives_hide_messages_for_the_workers_visibility_timeout() {
    let rig = Rig::jobs(&[r#"{"data":"a"}"#]);
    rig.run(settings(), CancellationToken::new()).await;
    let asked = rig.queue.receive_visibility.lock().unwrap().clone();
    assert!(!asked.is_empty());
    assert!(
        asked.iter().all(|t| *t == Duration::from_secs(30)),
        "{asked:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_job_that_panics_stops_its_heartbeat() {
    let rig = Rig::new(
        FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true),
        FakeGateway {
            panic_ids: ["conn-3".to_owned()].into(),
            ..FakeGateway::default()
        },
    );
    let stopped = rig.run(settings(), CancellationToken::new()).await;
    assert_eq!(stopped, Stopped::Idle);
    // Long after the job is over, nothing keeps its message hidden.
    tokio::time::sleep(Duration::from_secs(120)).await;
    let visibility = rig.queue.visibility.lock().unwrap().clone();
    assert_eq!(
        visibility,
        [(Receipt("r0".into()), Duration::from_secs(5))],
        "handed back for a retry, then no heartbeat: {visibility:?}"
    );
    assert!(rig.queue.deleted_ids().is_empty());
}

#[tokio::test]
async fn a_panic_of_the_page_reader_retries_the_job_instead_of_deleting_it() {
    let mut table = FakeTable::with(&ids(20), 5);
    table.panic_after_pages = Some(2);
    let rig = Rig {
        table: Arc::new(table),
        ..Rig::jobs(&[r#"{"data":"a"}"#])
    };
    rig.run(settings(), CancellationToken::new()).await;
    assert!(
        rig.queue.deleted_ids().is_empty(),
        "half the audience unsent"
    );
    assert_eq!(
        rig.queue.visibility.lock().unwrap().clone(),
        [(Receipt("r0".into()), Duration::from_secs(5))]
    );
    assert_eq!(Metrics::get(&rig.metrics.jobs_completed), 0);
    assert_eq!(Metrics::get(&rig.metrics.jobs_retried), 1);
}

#[tokio::test]
async fn a_dead_letter_that_fails_counts_as_a_retry_only() {
    let queue = FakeQueue::with_jobs(&["{not json"], true);
    queue.failing_dead_letters.store(1, Ordering::SeqCst);
    let rig = Rig::new(queue, FakeGateway::default());
    rig.run(settings(), CancellationToken::new()).await;
    assert!(rig.queue.deleted_ids().is_empty());
    assert_eq!(Metrics::get(&rig.metrics.jobs_dead_lettered), 0);
    assert_eq!(Metrics::get(&rig.metrics.jobs_retried), 1);

    let rig = Rig::jobs(&["{not json"]);
    rig.run(settings(), CancellationToken::new()).await;
    assert_eq!(Metrics::get(&rig.metrics.jobs_dead_lettered), 1);
    assert_eq!(Metrics::get(&rig.metrics.jobs_retried), 0);
}

#[tokio::test(start_paused = true)]
async fn splitting_keeps_the_message_hidden_while_it_sends_segments() {
    // Four sends of 15 s each outlast the 30 s visibility timeout.
    let rig = Rig::new(
        FakeQueue {
            send_wait: Duration::from_secs(15),
            ..FakeQueue::with_jobs(&[r#"{"id":"big","data":"s","split":4}"#], true)
        },
        FakeGateway::default(),
    );
    rig.run(settings(), CancellationToken::new()).await;
    assert_eq!(rig.queue.sent.lock().unwrap().len(), 4);
    assert_eq!(rig.queue.deleted_ids(), ["r0"]);
    let visibility = rig.queue.visibility.lock().unwrap().clone();
    assert!(
        visibility.len() >= 5
            && visibility
                .iter()
                .all(|v| v == &(Receipt("r0".into()), Duration::from_secs(30))),
        "a heartbeat every 10 s of the 60 s split: {visibility:?}"
    );
    assert_eq!(
        Metrics::get(&rig.metrics.jobs_completed),
        0,
        "a split is not a completed broadcast"
    );
    assert_eq!(Metrics::get(&rig.metrics.jobs_split), 1);
}

#[tokio::test]
async fn a_split_job_becomes_segment_jobs_that_cover_the_table_once() {
    let rig = Rig::jobs(&[r#"{"id":"big","data":"s","split":3}"#]);
    rig.run(settings(), CancellationToken::new()).await;
    assert_eq!(rig.queue.deleted_ids(), ["r0"], "the whole job is replaced");
    assert!(
        rig.gateway.delivered.lock().unwrap().is_empty(),
        "nothing sent yet"
    );
    let parts = rig.queue.sent.lock().unwrap().clone();
    assert_eq!(parts.len(), 3);
    let [split] = &rig.reports.reports()[..] else {
        panic!("one report")
    };
    assert_eq!(
        (split.status, split.is_final, split.segments_total),
        (Status::Split, false, Some(3))
    );

    // Run the shares as other workers would.
    let bodies: Vec<&str> = parts.iter().map(String::as_str).collect();
    let rig2 = Rig::new(FakeQueue::with_jobs(&bodies, true), FakeGateway::default());
    rig2.run(settings(), CancellationToken::new()).await;
    let delivered = rig2.gateway.delivered.lock().unwrap();
    let unique: std::collections::HashSet<_> = delivered.iter().map(|(id, _)| id).collect();
    assert_eq!(delivered.len(), 20, "every row once");
    assert_eq!(unique.len(), 20);
    assert!(
        rig2.queue.sent.lock().unwrap().is_empty(),
        "shares are not split again"
    );
    // A producer knows the broadcast is over once every segment reported.
    let mut segments: Vec<_> = rig2
        .reports
        .reports()
        .into_iter()
        .filter(|r| r.is_final && r.status == Status::Done)
        .map(|r| (r.id, r.segment, r.segments_total, r.delivered))
        .collect();
    segments.sort();
    assert_eq!(segments.len(), 3);
    assert!(
        segments
            .iter()
            .all(|(id, _, total, _)| id == "big" && *total == Some(3))
    );
    let covered: Vec<_> = segments.iter().map(|s| s.1).collect();
    assert_eq!(covered, [Some(0), Some(1), Some(2)]);
    assert_eq!(segments.iter().map(|s| s.3).sum::<u64>(), 20);
}

#[tokio::test(start_paused = true)]
async fn fifo_jobs_are_neither_continued_nor_split_so_order_holds() {
    let mut queue = FakeQueue::with_jobs(&[r#"{"id":"f","data":"a","split":4}"#], true);
    queue.visible.get_mut().unwrap()[0].group_id = Some("news".into());
    let rig = Rig::new(queue, stalling("conn-12"));
    rig.run_until_shut_down(Duration::from_secs(1)).await;
    assert!(rig.queue.sent.lock().unwrap().is_empty(), "no new message");
    assert!(
        rig.queue.deleted_ids().is_empty(),
        "the original keeps its place"
    );
    let visibility = rig.queue.visibility.lock().unwrap().clone();
    assert_eq!(
        visibility.last(),
        Some(&(Receipt("r0".into()), Duration::ZERO))
    );
    assert!(
        rig.gateway.delivered.lock().unwrap().len() >= 10,
        "it ran, unsplit"
    );
}

fn fifo(bodies: &[&str], group: &str) -> FakeQueue {
    let mut queue = FakeQueue::with_jobs(bodies, true);
    for message in queue.visible.get_mut().unwrap() {
        message.group_id = Some(group.into());
    }
    queue
}

#[tokio::test]
async fn messages_of_one_fifo_group_received_together_run_in_order() {
    let rig = Rig::new(
        fifo(
            &[r#"{"data":"1"}"#, r#"{"data":"2"}"#, r#"{"data":"3"}"#],
            "g",
        ),
        FakeGateway::default(),
    );
    let mut s = settings();
    s.max_concurrent_jobs = 4;
    rig.run(s, CancellationToken::new()).await;
    assert_eq!(rig.queue.deleted_ids(), ["r0", "r1", "r2"]);
    let delivered = rig.gateway.delivered.lock().unwrap();
    let to_first: Vec<_> = delivered
        .iter()
        .filter(|(id, _)| id == "conn-0")
        .map(|(_, payload)| payload.clone())
        .collect();
    assert_eq!(to_first, ["1", "2", "3"]);
}

#[tokio::test]
async fn a_fifo_job_that_stays_on_the_queue_keeps_its_group_mates_behind_it() {
    let gateway = FakeGateway::default();
    gateway.script.lock().unwrap().insert(
        "conn-0".into(),
        vec![crate::gateway::PostOutcome::Forbidden("403".into())],
    );
    let rig = Rig::new(fifo(&[r#"{"data":"1"}"#, r#"{"data":"2"}"#], "g"), gateway);
    let mut s = settings();
    s.max_concurrent_jobs = 4;
    rig.run(s, CancellationToken::new()).await;
    assert!(rig.queue.deleted_ids().is_empty());
    let visibility = rig.queue.visibility.lock().unwrap().clone();
    assert!(
        visibility.contains(&(Receipt("r1".into()), Duration::ZERO)),
        "{visibility:?}"
    );
    let delivered = rig.gateway.delivered.lock().unwrap();
    assert!(
        delivered.iter().all(|(_, payload)| payload == "1"),
        "the second job must not overtake the first"
    );
}

#[tokio::test]
async fn the_configured_split_applies_to_whole_table_jobs_only() {
    let rig = Rig::new(
        FakeQueue::with_jobs(
            &[
                r#"{"data":"a"}"#,
                r#"{"data":"b","connections":["conn-1"]}"#,
            ],
            true,
        ),
        FakeGateway::default(),
    );
    let mut s = settings();
    s.split_segments = 4;
    rig.run(s, CancellationToken::new()).await;
    assert_eq!(rig.queue.sent.lock().unwrap().len(), 4);
    assert_eq!(
        rig.gateway.delivered.lock().unwrap().len(),
        1,
        "the list job ran"
    );
}

#[tokio::test(start_paused = true)]
async fn what_a_long_poll_brings_after_shutdown_is_handed_back_at_once() {
    let rig = Rig::new(
        FakeQueue {
            poll_wait: Duration::from_secs(2),
            ..FakeQueue::default()
        },
        FakeGateway::default(),
    );
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    let queue = rig.queue.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        trigger.cancel();
        // A message arrives while the abandoned poll still waits.
        tokio::time::sleep(Duration::from_millis(400)).await;
        queue.visible.lock().unwrap().extend(
            FakeQueue::with_jobs(&[r#"{"data":"late"}"#], true)
                .visible
                .into_inner()
                .unwrap(),
        );
    });
    let mut s = settings();
    s.exit_when_idle = false;
    let stopped = rig.run(s, shutdown).await;
    assert_eq!(stopped, Stopped::Shutdown);
    let visibility = rig.queue.visibility.lock().unwrap().clone();
    assert_eq!(visibility, [(Receipt("r0".into()), Duration::ZERO)]);
    assert!(rig.gateway.delivered.lock().unwrap().is_empty(), "not run");
}

#[tokio::test(start_paused = true)]
async fn receive_errors_back_off_and_the_worker_goes_on() {
    let queue = FakeQueue::with_jobs(&[r#"{"data":"a"}"#], true);
    queue.failing_receives.store(5, Ordering::SeqCst);
    let rig = Rig::new(queue, FakeGateway::default());
    rig.run(settings(), CancellationToken::new()).await;
    assert_eq!(rig.queue.deleted_ids(), ["r0"]);
    assert!(rig.queue.receives.load(Ordering::SeqCst) >= 7);
}

#[tokio::test]
async fn a_missing_queue_stops_the_worker_with_the_reason() {
    let queue = FakeQueue {
        missing: true,
        ..FakeQueue::default()
    };
    let rig = Rig::new(queue, FakeGateway::default());
    let stopped = rig.run(settings(), CancellationToken::new()).await;
    assert!(
        matches!(&stopped, Stopped::Failed(why) if why.contains("does not exist")),
        "{stopped:?}"
    );
}

#[tokio::test]
async fn no_more_jobs_run_at_once_than_allowed() {
    let bodies: Vec<String> = (0..7).map(|i| format!(r#"{{"data":"{i}"}}"#)).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    let rig = Rig::new(FakeQueue::with_jobs(&refs, true), FakeGateway::default());
    rig.run(settings(), CancellationToken::new()).await;
    assert_eq!(rig.queue.deleted_ids().len(), 7);
    assert_eq!(rig.gateway.delivered.lock().unwrap().len(), 140);
}

/// A 410 for a row read with no start is rechecked after the connect
/// window; the second 410 removes the row. A batch run (and a stopping
/// task) ends only after that removal, retries and all: the removal is
/// decided, and leaving it to the next broadcast would leave a gone row.
#[tokio::test(start_paused = true)]
async fn a_run_ends_only_after_the_removals_its_rechecks_decided() {
    for stop in [None, Some(Duration::from_millis(120_100))] {
        let mut table = FakeTable::with(&ids(20), 5);
        table.connecting.insert("conn-7".into());
        // The removal's first three tries leave the row unprocessed, as
        // BatchWriteItem does under load.
        table.unprocessed_removals = AtomicUsize::new(3);
        let gateway = FakeGateway::default();
        gateway
            .script
            .lock()
            .unwrap()
            .insert("conn-7".into(), vec![crate::gateway::PostOutcome::Gone; 10]);
        let rig = Rig {
            table: Arc::new(table),
            ..Rig::new(
                FakeQueue::with_jobs(&[r#"{"id":"j","data":"a"}"#], true),
                gateway,
            )
        };
        let (settings, shutdown) = match stop {
            None => (settings(), CancellationToken::new()),
            // A long-running task asked to stop once the recheck has
            // posted (the connect window is 120 s) but not yet removed.
            Some(at) => (
                WorkerSettings {
                    exit_when_idle: false,
                    ..settings()
                },
                shutdown_after(at),
            ),
        };
        rig.run(settings, shutdown).await;
        assert!(
            !rig.table.remaining().contains("conn-7"),
            "{stop:?}: the gone row whose removal was decided is left"
        );
        assert_eq!(rig.table.remaining().len(), 19, "{stop:?}");
    }
}

mod halts;
mod latest;
mod receipts;
mod whole;

mod durable {
    use super::*;
    use crate::fakes::FakeRunTable;
    use crate::job::keys::{RunKey, fingerprint};
    use crate::runs::{Ledger, RunRecord, Windows};

    fn windows() -> Windows {
        Windows {
            dedup: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(30),
        }
    }

    impl Rig {
        async fn run_recorded(
            &self,
            settings: WorkerSettings,
            runs: &Arc<FakeRunTable>,
        ) -> Stopped {
            let ledger = Ledger::new(runs.clone(), windows(), self.metrics.clone());
            self.run_with(settings, CancellationToken::new(), Some(Arc::new(ledger)))
                .await
        }
    }

    const TWICE: [&str; 2] = [r#"{"id":"news","data":"a"}"#, r#"{"id":"news","data":"a"}"#];

    #[tokio::test]
    async fn a_broadcast_sent_again_after_it_finished_is_deleted_unsent() {
        let rig = Rig::new(FakeQueue::with_jobs(&TWICE, true), FakeGateway::default());
        let runs = Arc::new(FakeRunTable::default());
        let one_at_a_time = WorkerSettings {
            max_concurrent_jobs: 1,
            ..settings()
        };
        assert_eq!(rig.run_recorded(one_at_a_time, &runs).await, Stopped::Idle);
        assert_eq!(rig.gateway.delivered.lock().unwrap().len(), 20, "once");
        assert_eq!(rig.queue.deleted.lock().unwrap().len(), 2);
        assert_eq!(Metrics::get(&rig.metrics.jobs_duplicate), 1);
        assert_eq!(Metrics::get(&rig.metrics.jobs_completed), 1);
        let records = runs.records.lock().unwrap();
        let record = records.values().next().expect("a record");
        assert!(record.finished_at_ms.is_some(), "{record:?}");
    }

    #[tokio::test]
    async fn two_copies_at_once_run_once() {
        let rig = Rig::new(FakeQueue::with_jobs(&TWICE, true), FakeGateway::default());
        let runs = Arc::new(FakeRunTable::default());
        assert_eq!(rig.run_recorded(settings(), &runs).await, Stopped::Idle);
        assert_eq!(rig.gateway.delivered.lock().unwrap().len(), 20, "once");
        assert_eq!(rig.queue.deleted.lock().unwrap().len(), 2, "both copies go");
        assert_eq!(Metrics::get(&rig.metrics.jobs_duplicate), 1);
    }

    #[tokio::test]
    async fn a_known_key_with_another_body_is_dead_lettered_with_that_reason() {
        let rig = Rig::jobs(&[r#"{"id":"news","data":"a"}"#, r#"{"id":"news","data":"b"}"#]);
        let runs = Arc::new(FakeRunTable::default());
        let one_at_a_time = WorkerSettings {
            max_concurrent_jobs: 1,
            ..settings()
        };
        rig.run_recorded(one_at_a_time, &runs).await;
        assert_eq!(rig.gateway.delivered.lock().unwrap().len(), 20);
        let dead = rig.queue.dead.as_ref().unwrap().lock().unwrap().clone();
        let [(id, reason)] = &dead[..] else {
            panic!("{dead:?}")
        };
        assert_eq!(id, "m1");
        assert!(reason.contains("used for another body"), "{reason}");
    }

    #[tokio::test]
    async fn a_throttled_table_delays_nothing_and_is_counted() {
        let rig = Rig::new(FakeQueue::with_jobs(&TWICE, true), FakeGateway::default());
        let runs = Arc::new(FakeRunTable::default());
        runs.throttle.store(true, Ordering::SeqCst);
        assert_eq!(rig.run_recorded(settings(), &runs).await, Stopped::Idle);
        // At-least-once: without the table both copies are broadcast.
        assert_eq!(rig.gateway.delivered.lock().unwrap().len(), 40);
        assert_eq!(rig.queue.deleted.lock().unwrap().len(), 2);
        assert!(Metrics::get(&rig.metrics.checkpoint_failures) >= 2);
    }

    #[tokio::test]
    async fn its_own_message_back_while_it_runs_elsewhere_is_left_hidden_for_the_holder() {
        let body = r#"{"id":"news","data":"a"}"#;
        let rig = Rig::jobs(&[body]);
        let job = job::parse(body, "m0", &settings().capabilities).unwrap();
        let key = RunKey::of(&job).storage_key();
        let runs = Arc::new(FakeRunTable::default());
        let now = crate::connection::expiry::epoch_ms(std::time::SystemTime::now());
        runs.records.lock().unwrap().insert(
            key.clone(),
            RunRecord {
                key: key.clone(),
                fingerprint: fingerprint(&job),
                owner: "another-task".into(),
                message_id: "m0".into(),
                receipt: "an-older-receipt".into(),
                lease_until_ms: now + 3_600_000,
                finished_at_ms: None,
                expires_at: 0,
                checkpoint: None,
                version: 7,
            },
        );
        let settings = WorkerSettings {
            exit_when_idle: false,
            ..settings()
        };
        let ctx_run = rig.run_recorded(settings, &runs);
        // The worker never ends on its own here: the message stays hidden.
        let stopped = tokio::time::timeout(Duration::from_secs(2), ctx_run).await;
        assert!(stopped.is_err(), "still waiting for work");
        assert!(rig.gateway.delivered.lock().unwrap().is_empty(), "not run");
        assert!(rig.queue.deleted.lock().unwrap().is_empty(), "not deleted");
        assert!(
            rig.queue.visibility.lock().unwrap().is_empty(),
            "left as it is"
        );
        let record = runs.records.lock().unwrap()[&key].clone();
        assert_eq!(record.owner, "another-task");
        assert_eq!(
            record.receipt, "r0",
            "the holder renews and deletes with it"
        );
        assert_eq!(Metrics::get(&rig.metrics.jobs_duplicate), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_batch_run_does_not_end_on_a_receive_that_began_while_a_job_ran() {
    // The job is handed back after the receive chose what to hand out but
    // before its answer came back: that empty answer says nothing about
    // the job's message.
    let gateway = FakeGateway {
        held_ids: ["conn-0".to_owned()].into(),
        ..FakeGateway::default()
    };
    gateway.script.lock().unwrap().insert(
        "conn-0".into(),
        vec![crate::gateway::PostOutcome::Forbidden("403".into())],
    );
    let queue = FakeQueue {
        answer_delay: Duration::from_millis(10),
        redeliver: true,
        ..FakeQueue::with_jobs(&[r#"{"id":"j","data":"a","connections":["conn-0"]}"#], true)
    };
    let rig = Rig::new(queue, gateway);
    let mut s = settings();
    s.job_retry.base = Duration::ZERO;
    s.job_retry.max = Duration::ZERO;
    let gateway = rig.gateway.clone();
    tokio::spawn(async move {
        // The second receive chose at 10 ms + the 5 ms long poll, and
        // answers at 25 ms.
        tokio::time::sleep(Duration::from_millis(17)).await;
        gateway.release();
    });
    assert_eq!(rig.run(s, CancellationToken::new()).await, Stopped::Idle);
    assert_eq!(
        rig.gateway.delivered_ids(),
        ["conn-0"],
        "retried, then delivered"
    );
    assert_eq!(rig.queue.deleted_ids(), ["r0"]);
    assert!(rig.queue.visible.lock().unwrap().is_empty());
}
