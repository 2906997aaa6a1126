//! Deadlines and cancels against the fakes: what is stopped, when, and
//! what its report and its message become.

use super::*;
use crate::connection::expiry::epoch_ms;
use crate::fakes::FakeRunTable;
use crate::runs::RunRecord;

fn one_at_a_time() -> WorkerSettings {
    WorkerSettings {
        max_concurrent_jobs: 1,
        ..settings()
    }
}

fn now_ms() -> i64 {
    epoch_ms(std::time::SystemTime::now())
}

fn with_deadline(deadline_ms: i64) -> String {
    format!(r#"{{"v":2,"id":"score","data":"1-0","deliver_by":{deadline_ms}}}"#)
}

fn dead_letters(rig: &Rig) -> Vec<(String, String)> {
    rig.queue.dead.as_ref().unwrap().lock().unwrap().clone()
}

/// The reports of runs (not the whole broadcast's).
fn run_reports(rig: &Rig) -> Vec<BroadcastReport> {
    rig.reports
        .reports()
        .into_iter()
        .filter(|r| r.kind == crate::reports::Kind::Run)
        .collect()
}

fn only_report(rig: &Rig) -> BroadcastReport {
    let reports = run_reports(rig);
    let [report] = &reports[..] else {
        panic!("{reports:?}")
    };
    report.clone()
}

/// A run stopped while conn-3's post hung: the message deleted with
/// nothing handed on, a final report whose `unsent` counts every connection
/// not reached: read and not answered, and (counted by reading on) those
/// of the later pages, which waited on that answer.
fn assert_stopped_with_conn_3_unsent(rig: &Rig, status: Status) {
    let delivered = rig.gateway.delivered.lock().unwrap().len() as u64;
    assert!(rig.queue.sent.lock().unwrap().is_empty(), "no continuation");
    assert_eq!(rig.queue.deleted_ids(), ["r0"]);
    let report = only_report(rig);
    assert_eq!((report.status, report.is_final), (status, true));
    assert_eq!(report.delivered, delivered);
    assert!(report.unsent >= 1, "{report:?}");
    assert_eq!(report.unsent, 20 - delivered, "{report:?}");
    assert!(!report.unsent_partial);
    assert!(delivered >= 4 && report.audience < 20, "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn a_job_received_after_its_deadline_is_settled_lapsed_and_sends_nothing() {
    let body = with_deadline(now_ms() - 1);
    let rig = Rig::jobs(&[&body]);
    assert_eq!(
        rig.run(settings(), CancellationToken::new()).await,
        Stopped::Idle
    );
    assert!(rig.gateway.delivered.lock().unwrap().is_empty());
    assert_eq!(rig.queue.deleted_ids(), ["r0"]);
    assert!(dead_letters(&rig).is_empty());
    let report = only_report(&rig);
    assert_eq!((report.status, report.is_final), (Status::Lapsed, true));
    let reason = report.reason.unwrap();
    assert!(reason.contains("after its deadline"), "{reason}");
    assert_eq!(
        (report.unsent, report.unsent_partial),
        (20, false),
        "counted, not sent"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stopped_broadcast_whose_rest_cannot_be_counted_says_so() {
    let mut rig = Rig::jobs(&[&with_deadline(now_ms() - 1)]);
    rig.table = Arc::new(FakeTable {
        fail_after_pages: Some(0),
        ..FakeTable::with(&ids(20), 5)
    });
    rig.run(settings(), CancellationToken::new()).await;
    let report = only_report(&rig);
    assert_eq!(report.status, Status::Lapsed);
    assert_eq!((report.unsent, report.unsent_partial), (0, true));
}

#[tokio::test(start_paused = true)]
async fn a_deadline_too_far_ahead_is_dead_lettered_with_the_reason() {
    let body = with_deadline(now_ms() + 15 * 24 * 3_600_000);
    let rig = Rig::jobs(&[&body]);
    rig.run(settings(), CancellationToken::new()).await;
    assert!(rig.gateway.delivered.lock().unwrap().is_empty());
    let dead = dead_letters(&rig);
    let [(_, reason)] = &dead[..] else {
        panic!("{dead:?}")
    };
    assert!(reason.contains("more than 14 days ahead"), "{reason}");
}

#[tokio::test(start_paused = true)]
async fn a_running_broadcast_stops_at_its_deadline_and_hands_nothing_on() {
    // conn-3 never answers: without the deadline the run would wait on it.
    let rig = Rig::new(
        FakeQueue::with_jobs(&[&with_deadline(now_ms() + 5_000)], true),
        stalling("conn-3"),
    );
    let began = tokio::time::Instant::now();
    assert_eq!(
        rig.run(settings(), CancellationToken::new()).await,
        Stopped::Idle
    );
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(4_900) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert_stopped_with_conn_3_unsent(&rig, Status::Lapsed);
}

#[tokio::test(start_paused = true)]
async fn deferred_connections_past_the_deadline_are_not_handed_on() {
    // conn-3 answers 503 throughout, so the run ends with it deferred. Its
    // deadline is half an hour off when it starts; by its end AWS's clock
    // reads an hour later (the task's clock was found an hour slow).
    let rig = Rig::new(
        FakeQueue::with_jobs(&[&with_deadline(now_ms() + 1_800_000)], true),
        failing("conn-3"),
    );
    let settings = settings();
    let clock = settings.clock.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let local = std::time::SystemTime::now();
        clock.measured(local + Duration::from_secs(3600), local);
    });
    rig.run(settings, CancellationToken::new()).await;
    assert!(rig.queue.sent.lock().unwrap().is_empty(), "no continuation");
    let report = only_report(&rig);
    assert_eq!(report.status, Status::Lapsed);
    assert_eq!((report.delivered, report.unsent), (19, 1));
}

#[tokio::test(start_paused = true)]
async fn a_hand_on_carries_the_deadline_and_format_version_2() {
    let deadline = now_ms() + 3_600_000;
    let rig = Rig::new(
        FakeQueue::with_jobs(&[&with_deadline(deadline)], true),
        failing("conn-3"),
    );
    rig.run(settings(), CancellationToken::new()).await;
    let sent = rig.queue.sent.lock().unwrap().clone();
    let [body] = &sent[..] else {
        panic!("{sent:?}")
    };
    let next: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        (next["v"].as_u64(), next["deliver_by"].as_i64()),
        (Some(2), Some(deadline))
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancel_without_run_records_is_dead_lettered_naming_the_table() {
    let rig = Rig::jobs(&[r#"{"v":2,"cancel":"news"}"#]);
    rig.run(settings(), CancellationToken::new()).await;
    let dead = dead_letters(&rig);
    let [(_, reason)] = &dead[..] else {
        panic!("{dead:?}")
    };
    assert!(reason.contains("checkpoint table"), "{reason}");
}

#[tokio::test(start_paused = true)]
async fn a_cancel_that_overtakes_its_broadcast_stops_it_before_any_post() {
    let rig = Rig::jobs(&[r#"{"v":2,"cancel":"news"}"#, r#"{"id":"news","data":"a"}"#]);
    let runs = Arc::new(FakeRunTable::default());
    let stopped = rig
        .run_with(
            one_at_a_time(),
            CancellationToken::new(),
            Some(ledger(&rig, &runs)),
        )
        .await;
    assert_eq!(stopped, Stopped::Idle);
    assert!(rig.gateway.delivered.lock().unwrap().is_empty());
    assert_eq!(rig.queue.deleted_ids(), ["r0", "r1"]);
    let reports = run_reports(&rig);
    let [cancel, broadcast] = &reports[..] else {
        panic!("{reports:?}")
    };
    assert_eq!(
        (cancel.status, cancel.is_final),
        (Status::CancelRecorded, false)
    );
    let said = cancel.reason.as_deref().unwrap();
    assert!(
        said.contains("no run of the broadcast news is on record yet"),
        "{said}"
    );
    assert_eq!(
        (broadcast.status, broadcast.is_final),
        (Status::Cancelled, true)
    );
    let tombstone = runs.records.lock().unwrap()["cancel:news"].clone();
    let lives = tombstone.expires_at * 1000 - now_ms();
    assert!(
        lives > 28 * 24 * 3_600_000,
        "kept past any dead letter: {lives}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancel_stops_a_running_broadcast_within_a_poll() {
    let rig = Rig::new(
        FakeQueue::with_jobs(&[r#"{"id":"news","data":"a"}"#], true),
        stalling("conn-3"),
    );
    let runs = Arc::new(FakeRunTable::default());
    // Another task records the cancel 3 s into the run.
    let table = runs.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let tombstone = RunRecord {
            key: "cancel:news".into(),
            fingerprint: "cancel".into(),
            owner: "m9".into(),
            message_id: "m9".into(),
            receipt: String::new(),
            lease_until_ms: 0,
            finished_at_ms: Some(now_ms()),
            expires_at: i64::MAX / 1000,
            checkpoint: None,
            version: 1,
        };
        table
            .records
            .lock()
            .unwrap()
            .insert(tombstone.key.clone(), tombstone);
    });
    let began = tokio::time::Instant::now();
    let stopped = rig
        .run_with(
            settings(),
            CancellationToken::new(),
            Some(ledger(&rig, &runs)),
        )
        .await;
    assert_eq!(stopped, Stopped::Idle);
    let took = began.elapsed();
    assert!(
        took < Duration::from_secs(3) + crate::runs::CANCEL_POLL * 2,
        "{took:?}"
    );
    assert_stopped_with_conn_3_unsent(&rig, Status::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_cancel_of_a_broadcast_on_record_says_its_runs_stop() {
    let rig = Rig::jobs(&[r#"{"id":"news","data":"a"}"#, r#"{"v":2,"cancel":"news"}"#]);
    let runs = Arc::new(FakeRunTable::default());
    rig.run_with(
        one_at_a_time(),
        CancellationToken::new(),
        Some(ledger(&rig, &runs)),
    )
    .await;
    let reports = run_reports(&rig);
    let said = reports[1].reason.as_deref().unwrap();
    assert_eq!(reports[1].status, Status::CancelRecorded);
    assert!(said.contains("its runs stop within 1s"), "{said}");
}

#[tokio::test(start_paused = true)]
async fn a_cancel_recorded_by_the_same_task_stops_its_run_without_waiting_for_the_poll() {
    let rig = Rig::new(
        FakeQueue::with_jobs(
            &[r#"{"id":"news","data":"a"}"#, r#"{"v":2,"cancel":"news"}"#],
            true,
        ),
        stalling("conn-3"),
    );
    let runs = Arc::new(FakeRunTable::default());
    let began = tokio::time::Instant::now();
    rig.run_with(
        settings(),
        CancellationToken::new(),
        Some(ledger(&rig, &runs)),
    )
    .await;
    let took = began.elapsed();
    assert!(took < crate::runs::CANCEL_POLL / 2, "{took:?}");
    let reports = run_reports(&rig);
    assert!(
        reports.iter().any(|r| r.status == Status::Cancelled),
        "{reports:?}"
    );
}
