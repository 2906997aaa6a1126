//! Streams of updates (`latest`) against the fakes: an older update is not
//! sent; a newer one is handed to the stream's live run, which goes on with
//! it round from where its posts are; without one it claims the stream and
//! takes over round from where the older one was.

use super::*;
use crate::fakes::FakeRunTable;
use crate::runs::RunRecord;

/// A rig whose 20 connections are all in channel `match`, pages of 5.
fn channel(bodies: &[&str], gateway: FakeGateway) -> Rig {
    let mut table = FakeTable::with(&ids(20), 5);
    table.channels.insert("match".into(), ids(20));
    let mut rig = Rig::new(FakeQueue::with_jobs(bodies, true), gateway);
    rig.table = Arc::new(table);
    rig
}

fn channel_settings() -> WorkerSettings {
    WorkerSettings {
        max_concurrent_jobs: 1,
        capabilities: Capabilities {
            channels: true,
            audiences: Some(Vec::new()),
        },
        ..settings()
    }
}

fn update(id: &str, seq: u64) -> String {
    format!(
        r#"{{"v":2,"id":"{id}","data":"{id}","channel":"match","latest":{{"key":"score","seq":{seq}}}}}"#
    )
}

fn runs_of(rig: &Rig) -> Vec<BroadcastReport> {
    rig.reports
        .reports()
        .into_iter()
        .filter(|r| r.kind == crate::reports::Kind::Run)
        .collect()
}

/// Runs `rig`'s worker to its end, with the run records `runs`.
async fn run_stream(rig: &Rig, runs: &Arc<FakeRunTable>) {
    rig.run_with(
        channel_settings(),
        CancellationToken::new(),
        Some(ledger(rig, runs)),
    )
    .await;
}

/// The ids the gateway delivered to, in order.
fn delivered_ids(rig: &Rig) -> Vec<String> {
    rig.gateway
        .delivered
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect()
}

/// The stream's record, as the older update `score-1` (seq 1) left it
/// when it claimed the stream.
fn score_1_owns_the_stream() -> RunRecord {
    let owner =
        r#"{"seq":1,"id":"score-1","run":"s-.c0.0:score-1","audience":"channel match","from":[]}"#;
    record("latest:score", owner, true)
}

/// A record in the run table, as another task would have written it.
fn record(key: &str, checkpoint: &str, finished: bool) -> RunRecord {
    RunRecord {
        key: key.into(),
        fingerprint: "f".into(),
        owner: "another-task".into(),
        message_id: "m9".into(),
        receipt: String::new(),
        lease_until_ms: i64::MAX / 2,
        finished_at_ms: finished.then_some(1),
        expires_at: i64::MAX / 1000,
        checkpoint: Some(checkpoint.into()),
        version: 1,
    }
}

#[tokio::test(start_paused = true)]
async fn an_update_older_than_one_started_is_settled_superseded_unsent() {
    let (five, three) = (update("score-5", 5), update("score-3", 3));
    let rig = channel(&[&five, &three], FakeGateway::default());
    let runs = Arc::new(FakeRunTable::default());
    run_stream(&rig, &runs).await;
    let delivered = rig.gateway.delivered.lock().unwrap().clone();
    assert_eq!(delivered.len(), 20, "the newer one, once to each");
    assert!(delivered.iter().all(|(_, payload)| payload == "score-5"));
    let reports = runs_of(&rig);
    assert_eq!(reports[1].status, Status::Superseded);
    assert!(reports[1].is_final);
    let said = reports[1].reason.as_deref().unwrap();
    assert!(said.contains("superseded by update 5"), "{said}");
    assert_eq!(rig.queue.deleted_ids(), ["r0", "r1"]);
}

#[tokio::test(start_paused = true)]
async fn a_newer_update_takes_over_where_the_older_one_is_and_goes_round() {
    let rig = channel(&[&update("score-2", 2)], FakeGateway::default());
    let runs = Arc::new(FakeRunTable::default());
    {
        // The older update owns the stream and, by its checkpoint, has
        // answered the first two pages; its task died (the lease lapsed),
        // so there is no runner to hand the newer one to.
        let mut records = runs.records.lock().unwrap();
        records.insert("latest:score".into(), score_1_owns_the_stream());
        let mut older = record(
            "s-.c0.0:score-1",
            r#"{"resume":[{"segment":0,"position":10}]}"#,
            false,
        );
        older.lease_until_ms = 0;
        records.insert(older.key.clone(), older);
    }
    run_stream(&rig, &runs).await;
    let delivered = delivered_ids(&rig);
    assert_eq!(delivered.len(), 20, "each connection once: {delivered:?}");
    let mut once = delivered.clone();
    once.sort();
    once.dedup();
    assert_eq!(once.len(), 20, "{delivered:?}");
    // The sends run concurrently, so the first page's answers come in any
    // order: the first eight are from where the older one was on.
    let from_ten: Vec<String> = (10..20).map(|i| format!("conn-{i}")).collect();
    assert!(
        delivered[..8].iter().all(|id| from_ten.contains(id)),
        "from where the older one was: {delivered:?}"
    );
    let [report] = &runs_of(&rig)[..] else {
        panic!("one run")
    };
    assert_eq!((report.status, report.delivered), (Status::Done, 20));
}

#[tokio::test(start_paused = true)]
async fn a_running_update_stops_when_a_newer_one_owns_the_stream() {
    // conn-3 never answers: the older update would wait on it.
    let rig = channel(&[&update("score-1", 1)], stalling("conn-3"));
    let runs = Arc::new(FakeRunTable::default());
    let table = runs.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let owner = r#"{"seq":9,"id":"score-9","run":"s-.c0.0:score-9","audience":"channel match","from":[]}"#;
        let mut records = table.records.lock().unwrap();
        let version = records["latest:score"].version;
        let mut newer = record("latest:score", owner, true);
        newer.version = version + 1;
        records.insert(newer.key.clone(), newer);
    });
    let began = tokio::time::Instant::now();
    run_stream(&rig, &runs).await;
    let took = began.elapsed();
    assert!(
        took < Duration::from_secs(2) + crate::runs::LATEST_POLL * 2,
        "{took:?}"
    );
    assert!(rig.queue.sent.lock().unwrap().is_empty(), "no continuation");
    let [report] = &runs_of(&rig)[..] else {
        panic!("one run")
    };
    assert_eq!((report.status, report.is_final), (Status::Superseded, true));
}

#[tokio::test(start_paused = true)]
async fn a_stream_without_run_records_or_with_another_audience_is_refused_with_the_reason() {
    let rig = channel(&[&update("score-1", 1)], FakeGateway::default());
    rig.run(channel_settings(), CancellationToken::new()).await;
    let dead = rig.queue.dead.as_ref().unwrap().lock().unwrap().clone();
    assert!(dead[0].1.contains("checkpoint table"), "{dead:?}");

    let other =
        r#"{"v":2,"id":"s-2","data":"x","to":{"user":"u-1"},"latest":{"key":"score","seq":2}}"#;
    let mut rig = channel(&[&update("score-1", 1), other], FakeGateway::default());
    rig.table = Arc::new({
        let mut table = FakeTable::with(&ids(20), 5);
        table.channels.insert("match".into(), ids(20));
        table.audiences.insert("user".into(), Default::default());
        table
    });
    let runs = Arc::new(FakeRunTable::default());
    let settings = WorkerSettings {
        capabilities: Capabilities {
            channels: true,
            audiences: Some(vec!["user".into()]),
        },
        ..channel_settings()
    };
    rig.run_with(
        settings,
        CancellationToken::new(),
        Some(ledger(&rig, &runs)),
    )
    .await;
    let dead = rig.queue.dead.as_ref().unwrap().lock().unwrap().clone();
    let [(_, reason)] = &dead[..] else {
        panic!("{dead:?}")
    };
    assert!(reason.contains("one stream, one audience"), "{reason}");
}

/// 20 connections `c-00`…`c-19` in channel `match`, read in id order (as
/// a channel index sorted by id reads them), pages of 5.
fn by_id(bodies: &[&str], gateway: FakeGateway) -> Rig {
    let padded: Vec<String> = (0..20).map(|i| format!("c-{i:02}")).collect();
    let mut table = FakeTable::with(&padded, 5);
    table.channels.insert("match".into(), padded);
    table.channel_order = crate::store::ChannelOrder::ById;
    let mut rig = Rig::new(FakeQueue::with_jobs(bodies, true), gateway);
    rig.table = Arc::new(table);
    rig
}

#[tokio::test(start_paused = true)]
async fn a_newer_update_starts_after_the_place_the_older_one_keeps() {
    let rig = by_id(&[&update("score-2", 2)], FakeGateway::default());
    let runs = Arc::new(FakeRunTable::default());
    {
        // The older update owns the stream; it had answered up to c-13
        // (its place, kept while it sent), though no page was finished.
        let mut records = runs.records.lock().unwrap();
        records.insert("latest:score".into(), score_1_owns_the_stream());
        let place = r#"{"segment":0,"position":{"after":"c-13"}}"#;
        let kept = record("latest-at:1:score", place, true);
        records.insert(kept.key.clone(), kept);
    }
    run_stream(&rig, &runs).await;
    let delivered = delivered_ids(&rig);
    let mut once = delivered.clone();
    once.sort();
    once.dedup();
    assert_eq!(once.len(), 20, "each once: {delivered:?}");
    // From after c-13: those are read first. The round from the start
    // is another segment of the read, whose sends may overlap the last
    // page's; c-10 to c-13, which the older one reached, come last.
    let after: Vec<String> = (14..20).map(|i| format!("c-{i:02}")).collect();
    assert!(
        after.iter().all(|id| delivered[..12].contains(id)),
        "from after c-13: {delivered:?}"
    );
    let reached: Vec<String> = (10..14).map(|i| format!("c-{i:02}")).collect();
    assert!(
        reached.iter().all(|id| delivered[16..].contains(id)),
        "{delivered:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_running_update_keeps_its_place_for_a_newer_one() {
    // A channel read in id order; c-07 never answers, so the run stays.
    let rig = by_id(&[&update("score-1", 1)], stalling("c-07"));
    let runs = Arc::new(FakeRunTable::default());
    let settings = WorkerSettings {
        exit_when_idle: false,
        ..channel_settings()
    };
    let worker = rig.run_with(
        settings,
        CancellationToken::new(),
        Some(ledger(&rig, &runs)),
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), worker).await;
    let records = runs.records.lock().unwrap();
    let place = records
        .get("latest-at:1:score")
        .and_then(|r| r.checkpoint.clone())
        .expect("a place kept");
    let place: Cursor = serde_json::from_str(&place).unwrap();
    assert!(
        matches!(place.position, Some(crate::store::Position::After { .. })),
        "{place:?}"
    );
}

/// Task A's worker runs at once, task B's a second later, both on the run
/// records `runs`; A's held posts are released after two seconds.
async fn two_tasks((a, b): (&Rig, &Rig), settings: WorkerSettings, runs: &Arc<FakeRunTable>) {
    two_tasks_beside((a, b), settings, runs, Duration::from_secs(2), async {}).await;
}

/// [`two_tasks`], A's held posts released after `release_after`, with
/// `beside` running alongside.
async fn two_tasks_beside(
    (a, b): (&Rig, &Rig),
    settings: WorkerSettings,
    runs: &Arc<FakeRunTable>,
    release_after: Duration,
    beside: impl std::future::Future<Output = ()>,
) {
    let task_a = a.run_with(
        settings.clone(),
        CancellationToken::new(),
        Some(ledger(a, runs)),
    );
    let task_b = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        b.run_with(
            settings.clone(),
            CancellationToken::new(),
            Some(ledger(b, runs)),
        )
        .await
    };
    let release = async {
        tokio::time::sleep(release_after).await;
        a.gateway.release();
    };
    tokio::join!(task_a, task_b, release, beside);
}

#[tokio::test(start_paused = true)]
async fn a_newer_update_received_on_another_task_is_sent_by_the_running_one() {
    // Task A runs update 1; c-10's post hangs until released, so A is
    // still sending when task B receives update 2.
    let held = FakeGateway {
        held_ids: ["c-10".to_owned()].into(),
        ..FakeGateway::default()
    };
    let a = by_id(&[&update("score-1", 1)], held);
    let b = by_id(&[&update("score-2", 2)], FakeGateway::default());
    let runs = Arc::new(FakeRunTable::default());
    let began = tokio::time::Instant::now();
    two_tasks((&a, &b), channel_settings(), &runs).await;

    assert!(delivered_ids(&b).is_empty(), "task B sent nothing itself");
    let got_2: std::collections::BTreeSet<String> = a
        .gateway
        .delivered
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, payload)| payload == "score-2")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(got_2.len(), 20, "task A sent update 2 round: {got_2:?}");
    let [report] = &runs_of(&b)[..] else {
        panic!("one run report from B")
    };
    assert_eq!(report.status, Status::Done);
    let said = report.reason.as_deref().unwrap();
    assert!(
        said.contains("by the stream's running update score-1"),
        "{said}"
    );
    assert_eq!(b.queue.deleted_ids(), ["r0"]);
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancel_of_an_update_the_runner_took_stops_its_value_within_a_poll() {
    // Task A runs update 1; c-10…c-17 hold its 8 posts in flight until
    // 4 s, so c-18 and c-19 wait. Task B receives update 2 at 1 s and
    // hands it to A, which takes it; update 2 is cancelled at 1.5 s.
    let held = FakeGateway {
        held_ids: (10..20).map(|i| format!("c-{i:02}")).collect(),
        ..FakeGateway::default()
    };
    let a = by_id(&[&update("score-1", 1)], held);
    let b = by_id(&[&update("score-2", 2)], FakeGateway::default());
    let runs = Arc::new(FakeRunTable::default());
    let canceller = ledger(&a, &runs);
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        canceller.cancel("score-2", "m-cancel").await.unwrap();
    };
    let release_after = Duration::from_secs(4);
    two_tasks_beside((&a, &b), channel_settings(), &runs, release_after, cancel).await;

    let sent_2: Vec<String> = [&a, &b]
        .iter()
        .flat_map(|rig| rig.gateway.delivered.lock().unwrap().clone())
        .filter(|(_, payload)| payload == "score-2")
        .map(|(id, _)| id)
        .collect();
    assert!(sent_2.is_empty(), "the cancelled update went to {sent_2:?}");
    assert!(!delivered_ids(&a).contains(&"c-18".to_owned()));
    let [report] = &runs_of(&b)[..] else {
        panic!("one run report from B")
    };
    assert_eq!(report.status, Status::Cancelled, "{report:?}");
    let [runner] = &runs_of(&a)[..] else {
        panic!("one run report from A")
    };
    assert_eq!(runner.status, Status::Superseded, "{runner:?}");
}

#[tokio::test(start_paused = true)]
async fn a_handed_update_is_run_by_its_receiver_once_the_runner_ends_without_it() {
    // The runner is a task of the version before: it never takes a handed
    // update, and its run ends after a second.
    let rig = by_id(&[&update("score-2", 2)], FakeGateway::default());
    let runs = Arc::new(FakeRunTable::default());
    {
        let mut records = runs.records.lock().unwrap();
        records.insert("latest:score".into(), score_1_owns_the_stream());
        let live = record("s-.c0.0:score-1", "{}", false);
        records.insert(live.key.clone(), live);
    }
    let table = runs.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut records = table.records.lock().unwrap();
        let older = records.get_mut("s-.c0.0:score-1").unwrap();
        older.finished_at_ms = Some(1);
        older.version += 1;
    });
    let began = tokio::time::Instant::now();
    run_stream(&rig, &runs).await;
    assert!(
        began.elapsed() >= Duration::from_secs(1),
        "it waited for the runner"
    );
    let delivered = rig.gateway.delivered.lock().unwrap().clone();
    assert_eq!(delivered.len(), 20, "then sent it itself: {delivered:?}");
    assert!(delivered.iter().all(|(_, payload)| payload == "score-2"));
    let [report] = &runs_of(&rig)[..] else {
        panic!("one run")
    };
    assert_eq!((report.status, report.delivered), (Status::Done, 20));
}

#[tokio::test(start_paused = true)]
async fn a_runner_that_died_after_taking_a_newer_update_leaves_it_to_its_receiver() {
    // Update 1's task took update 2 and died: its message comes back, and
    // so does update 2's (its receiver had kept it while it waited).
    let rig = by_id(
        &[&update("score-1", 1), &update("score-2", 2)],
        FakeGateway::default(),
    );
    let runs = Arc::new(FakeRunTable::default());
    {
        let took = r#"{"seq":2,"id":"score-1","run":"s-.c0.0:score-1","audience":"channel match","from":[],"sending":"score-2"}"#;
        let mut records = runs.records.lock().unwrap();
        records.insert("latest:score".into(), record("latest:score", took, true));
        let mut died = record("s-.c0.0:score-1", "{}", false);
        died.lease_until_ms = 0;
        records.insert(died.key.clone(), died);
    }
    run_stream(&rig, &runs).await;
    let delivered = rig.gateway.delivered.lock().unwrap().clone();
    assert_eq!(delivered.len(), 20, "{delivered:?}");
    assert!(delivered.iter().all(|(_, payload)| payload == "score-2"));
    let statuses: Vec<(String, Status)> = runs_of(&rig)
        .into_iter()
        .map(|r| (r.id, r.status))
        .collect();
    assert_eq!(
        statuses,
        [
            ("score-1".to_owned(), Status::Superseded),
            ("score-2".to_owned(), Status::Done)
        ]
    );
}

/// A rig whose 20 connections are all user `u-1`'s (an audience `to`
/// reads), pages of 5.
fn to_user(bodies: &[&str], gateway: FakeGateway) -> Rig {
    let mut table = FakeTable::with(&ids(20), 5);
    table.audiences.insert(
        "user".into(),
        [("u-1".to_owned(), ids(20))].into_iter().collect(),
    );
    let mut rig = Rig::new(FakeQueue::with_jobs(bodies, true), gateway);
    rig.table = Arc::new(table);
    rig
}

fn user_update(id: &str, seq: u64) -> String {
    format!(
        r#"{{"v":2,"id":"{id}","data":"{id}","to":{{"user":"u-1"}},"latest":{{"key":"score","seq":{seq}}}}}"#
    )
}

#[tokio::test(start_paused = true)]
async fn an_update_sent_round_by_the_runner_leaves_its_receipts_to_the_runners_report() {
    let settings = WorkerSettings {
        capabilities: Capabilities {
            channels: true,
            audiences: Some(vec!["user".into()]),
        },
        ..channel_settings()
    };
    let held = FakeGateway {
        held_ids: ["conn-10".to_owned()].into(),
        ..FakeGateway::default()
    };
    let a = to_user(&[&user_update("score-1", 1)], held);
    let b = to_user(&[&user_update("score-2", 2)], FakeGateway::default());
    let runs = Arc::new(FakeRunTable::default());
    two_tasks((&a, &b), settings, &runs).await;

    assert!(delivered_ids(&b).is_empty(), "task B sent nothing itself");
    let [received] = &runs_of(&b)[..] else {
        panic!("one run report from B")
    };
    assert_eq!(received.status, Status::Done);
    assert_eq!(
        (received.reached, received.unreached.clone()),
        (None, None),
        "no receipts of its own: the runner reached `u-1`"
    );
    let [runner] = &runs_of(&a)[..] else {
        panic!("one run report from A")
    };
    assert_eq!(
        (runner.reached, runner.unreached.clone()),
        (Some(1), Some(vec![]))
    );
}
