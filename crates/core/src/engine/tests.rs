use std::collections::HashSet;
use std::sync::atomic::Ordering;

use std::time::Duration;

use super::*;
use crate::budget::SendBudget;
use crate::connection::ConnectionId;
use crate::fakes::{FakeGateway, FakeTable, ids};
use crate::job::Target;
use crate::store::Cursor;
use bytes::Bytes;

fn engine(
    table: Arc<FakeTable>,
    gateway: Arc<FakeGateway>,
    max_in_flight: usize,
) -> Engine<Arc<FakeTable>, FakeGateway> {
    let settings = crate::fakes::engine_settings(max_in_flight);
    Engine::new(
        Arc::new(table),
        gateway,
        Arc::new(SendBudget::new(None, max_in_flight)),
        settings,
        Arc::new(Metrics::default()),
    )
}

fn job(target: Target) -> Job {
    Job::new("job", Bytes::from_static(b"hello"), target)
}

/// Runs `job` to its end, never asked to stop.
async fn run(
    engine: &Engine<Arc<FakeTable>, FakeGateway>,
    job: &Job,
) -> (RunSummary, Result<(), FanoutError>) {
    engine.run(job, &CancellationToken::new()).await
}

/// One broadcast to the whole table, run to its end.
async fn to_everyone(
    table: &Arc<FakeTable>,
    gateway: &Arc<FakeGateway>,
    max_in_flight: usize,
) -> (RunSummary, Result<(), FanoutError>) {
    run(
        &engine(table.clone(), gateway.clone(), max_in_flight),
        &job(Target::All),
    )
    .await
}

/// A broadcast to `rows` connections in pages of 10, four sends at a
/// time, through a gateway answering from `script`, run to its end: none of
/// these answers fails the job.
async fn completed_answering<'a>(
    rows: usize,
    script: impl IntoIterator<Item = (&'a str, Vec<PostOutcome>)>,
) -> (Arc<FakeTable>, Arc<FakeGateway>, RunSummary) {
    let table = Arc::new(FakeTable::with(&ids(rows), 10));
    let gateway = Arc::new(FakeGateway::answering(script));
    let (report, result) = to_everyone(&table, &gateway, 4).await;
    result.expect("completes");
    (table, gateway, report)
}

/// [`completed_answering`], `id` answering 503 `times` times.
async fn with_503s(
    rows: usize,
    id: &str,
    times: usize,
) -> (Arc<FakeTable>, Arc<FakeGateway>, RunSummary) {
    let answers = vec![PostOutcome::Transient("503".into()); times];
    completed_answering(rows, [(id, answers)]).await
}

/// An adaptive budget of `per_second` with `burst`, so the tests can read
/// back which answers it counted.
fn adaptive_budget(per_second: u32, burst: u32, max_in_flight: usize) -> Arc<SendBudget> {
    use crate::budget::RateSettings;
    use std::num::NonZeroU32;
    Arc::new(SendBudget::new(
        Some(RateSettings {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
            adaptive: true,
        }),
        max_in_flight,
    ))
}

/// A broadcast over 100 rows in pages of 10 whose reader breaks after its
/// third page: the job fails, transiently, having sent no more than it read.
async fn a_broken_reader_fails_the_job_transiently(table: FakeTable, why: &str) {
    let gateway = Arc::new(FakeGateway::default());
    let (report, result) = to_everyone(&Arc::new(table), &gateway, 4).await;
    let err = result.expect_err(why);
    assert!(matches!(err, FanoutError::Audience(_)), "{err}");
    assert!(!err.is_permanent());
    assert!(report.delivered <= 30);
}

/// Runs `job` until `gateway` has delivered `count`, then asks it to stop,
/// and returns what the run came to.
async fn stop_after_deliveries(
    engine: &Engine<Arc<FakeTable>, FakeGateway>,
    job: &Job,
    gateway: &FakeGateway,
    count: usize,
) -> (RunSummary, Result<(), FanoutError>) {
    let stop = CancellationToken::new();
    let run = engine.run(job, &stop);
    tokio::pin!(run);
    loop {
        tokio::select! {
            out = &mut run => break out,
            () = tokio::task::yield_now() => {
                if gateway.delivered.lock().unwrap().len() >= count {
                    stop.cancel();
                }
            }
        }
    }
}

/// Runs `target` over `table`, the send to `stalled` never answering, until
/// `count` have been delivered, then stops it: the run is interrupted.
/// Returns what it came to and the gateway it sent through.
async fn interrupted(
    table: &Arc<FakeTable>,
    target: Target,
    stalled: &str,
    count: usize,
) -> (RunSummary, Arc<FakeGateway>) {
    let gateway = Arc::new(FakeGateway {
        stall_ids: [stalled.to_owned()].into(),
        ..FakeGateway::default()
    });
    let engine = engine(table.clone(), gateway.clone(), 4);
    let (report, result) = stop_after_deliveries(&engine, &job(target), &gateway, count).await;
    assert!(
        matches!(result, Err(FanoutError::Interrupted)),
        "{result:?}"
    );
    (report, gateway)
}

/// An engine over `rows` connections in pages of `page_size`, sending
/// `max_in_flight` at a time, whose gateway answers `id` 429 `times` times.
fn throttling(
    rows: usize,
    page_size: usize,
    id: &str,
    times: usize,
    max_in_flight: usize,
) -> Engine<Arc<FakeTable>, FakeGateway> {
    let table = Arc::new(FakeTable::with(&ids(rows), page_size));
    let script = [(id, vec![PostOutcome::Throttled; times])];
    engine(
        table,
        Arc::new(FakeGateway::answering(script)),
        max_in_flight,
    )
}

/// A gateway at which each of `all` answers `answers` first.
fn answering_all(all: &[String], answers: &[PostOutcome]) -> Arc<FakeGateway> {
    let script = all.iter().map(|id| (id.as_str(), answers.to_vec()));
    Arc::new(FakeGateway::answering(script))
}

/// The one connection the run left deferred, checked to be `id`.
fn the_one_deferred<'a>(report: &'a RunSummary, id: &str) -> &'a Deferred {
    let [d] = &report.deferred[..] else {
        panic!("{:?}", report.deferred)
    };
    assert_eq!(d.connection.id.as_str(), id);
    d
}

/// The ids `gateway` delivered to, in order of id.
fn sorted_deliveries(gateway: &FakeGateway) -> Vec<String> {
    let mut got = gateway.delivered_ids();
    got.sort();
    got
}

#[tokio::test]
async fn every_live_connection_gets_it_once_and_only_gone_rows_go() {
    let all = ids(1000);
    let table = Arc::new(FakeTable::with(&all, 100));
    let gone: HashSet<String> = all.iter().step_by(7).cloned().collect();
    let gateway = Arc::new(FakeGateway {
        gone: gone.clone(),
        ..FakeGateway::default()
    });
    let engine = engine(table.clone(), gateway.clone(), 32);
    let (report, result) = run(&engine, &job(Target::All)).await;
    result.expect("completes");

    let delivered = gateway.delivered.lock().unwrap();
    let unique: HashSet<_> = delivered.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(delivered.len(), unique.len(), "a duplicate delivery");
    assert_eq!(unique.len(), 1000 - gone.len());
    assert!(unique.is_disjoint(&gone));
    assert!(
        delivered
            .iter()
            .all(|(_, p)| p == &Bytes::from_static(b"hello"))
    );

    let left = table.remaining();
    assert!(left.is_disjoint(&gone), "a gone row stayed");
    assert_eq!(left, unique, "a live row was removed");
    assert_eq!(report.audience, 1000);
    assert_eq!(report.delivered as usize, unique.len());
    assert_eq!(report.gone as usize, gone.len());
    assert_eq!(report.removed as usize, gone.len());
    assert_eq!(report.failed, 0);
    assert!(gateway.peak.load(Ordering::SeqCst) <= 32);
}

#[tokio::test]
async fn rows_certainly_gone_by_age_are_removed_without_a_post() {
    let all = ids(300);
    let expired: HashSet<String> = all.iter().take(100).cloned().collect();
    let rewritten: HashSet<String> = all.iter().take(5).cloned().collect();
    let table = Arc::new(FakeTable {
        expired: expired.clone(),
        rewritten: rewritten.clone(),
        ..FakeTable::with(&all, 64)
    });
    let gone: HashSet<String> = all.iter().skip(100).step_by(10).cloned().collect();
    let gateway = Arc::new(FakeGateway {
        gone: gone.clone(),
        ..FakeGateway::default()
    });
    let engine = engine(table.clone(), gateway.clone(), 16);
    let mut job = job(Target::All);
    let excluded = all[10].clone();
    job.exclude.insert(excluded.as_str().into());
    let (report, result) = run(&engine, &job).await;
    result.expect("completes");

    let posted: HashSet<String> = gateway.delivered_ids().into_iter().collect();
    assert!(posted.is_disjoint(&expired), "an expired row was posted to");
    assert_eq!(posted.len(), 200 - gone.len());
    let asked: HashSet<String> = table
        .expired_removals
        .lock()
        .unwrap()
        .iter()
        .cloned()
        .collect();
    assert_eq!(
        asked.len(),
        99,
        "each expired row once, the excluded one left alone"
    );
    assert!(!asked.contains(&excluded));
    let left = table.remaining();
    // Kept: the rewritten rows, the excluded one, and every live row.
    let kept_expired: HashSet<String> = left.intersection(&expired).cloned().collect();
    let mut expect_kept = rewritten.clone();
    expect_kept.insert(excluded);
    assert_eq!(kept_expired, expect_kept);
    assert_eq!(report.audience, 299);
    assert_eq!(report.excluded, 1);
    assert_eq!(report.expired, 99);
    assert_eq!(report.gone as usize, gone.len());
    assert_eq!(report.removed as usize, gone.len() + 99 - rewritten.len());
    assert_eq!(Metrics::get(&engine.metrics.expired), 99);
}

#[tokio::test]
async fn a_checkpoint_passes_pages_whose_open_connections_it_lists_and_a_taker_retries_them() {
    let all = ids(20);
    let table = Arc::new(FakeTable::with(&all, 5));
    let stuck = FakeGateway::answering([(
        "conn-3",
        vec![PostOutcome::Transient("HTTP 503".into()); 1000],
    )]);
    let engine = engine(table.clone(), Arc::new(stuck), 4);
    let (tx, rx) = tokio::sync::watch::channel(Checkpoint::default());
    let (report, result) = engine
        .run_checkpointed(
            &job(Target::All),
            &CancellationToken::new(),
            Some(tx),
            Vec::new(),
        )
        .await;
    result.expect("completes");
    assert!(
        report.resume.is_empty(),
        "the strict point stays before conn-3's page"
    );
    let checkpoint = rx.borrow().clone();
    assert_eq!(checkpoint.resume.len(), 1, "{checkpoint:?}");
    assert_ne!(checkpoint.resume, report.resume, "past every answered page");
    let listed: Vec<_> = checkpoint.deferred.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(listed, ["conn-3"]);

    // The task dies; the run that takes over starts from the checkpoint
    // and retries what it lists.
    let gateway = Arc::new(FakeGateway::default());
    let taker = super::tests::engine(table, gateway.clone(), 4);
    let mut resumed = job(Target::All);
    resumed.resume = Some(checkpoint.resume.clone());
    let carried = checkpoint
        .deferred
        .iter()
        .map(|d| Connection {
            id: d.id.as_str().into(),
            key: d.key.clone(),
            started_ms: None,
        })
        .collect();
    let (report, result) = taker
        .run_checkpointed(&resumed, &CancellationToken::new(), None, carried)
        .await;
    result.expect("completes");
    let delivered: Vec<_> = gateway.delivered_ids().into_iter().collect();
    assert_eq!(delivered, ["conn-3"], "only what the checkpoint left open");
    assert_eq!((report.audience, report.delivered), (1, 1));
}

#[tokio::test]
async fn pages_are_read_ahead_of_the_sends_but_not_all_at_once() {
    let table = Arc::new(FakeTable::with(&ids(100), 10));
    let gateway = Arc::new(FakeGateway {
        stall: true,
        ..FakeGateway::default()
    });
    // Five sends of the first page hang: the engine cannot go on.
    let engine = engine(table.clone(), gateway, 5);
    let job = job(Target::All);
    let stop = CancellationToken::new();
    tokio::select! {
        _ = engine.run(&job, &stop) => panic!("a stalled broadcast ended"),
        () = tokio::time::sleep(Duration::from_millis(100)) => {}
    }
    assert_eq!(
        table.pages_read.load(Ordering::SeqCst),
        1 + READ_AHEAD_PAGES,
        "the page being sent and the read-ahead, no more"
    );
}

#[tokio::test]
async fn throttles_and_5xx_are_retried_until_delivered() {
    let (_, gateway, report) = completed_answering(
        3,
        [
            ("conn-0", vec![PostOutcome::Throttled; 2]),
            ("conn-1", vec![PostOutcome::Transient("500".into())]),
        ],
    )
    .await;
    assert_eq!(
        (report.delivered, report.retries, report.throttled),
        (3, 3, 2)
    );
    assert_eq!(sorted_deliveries(&gateway), ids(3), "each once");
}

#[tokio::test]
async fn a_connection_failing_past_its_attempts_is_deferred_then_delivered_in_a_later_pass() {
    // Four attempts in the first pass, one more in the second.
    let (_, gateway, report) = with_503s(2, "conn-0", 5).await;
    assert_eq!((report.delivered, report.failed), (2, 0));
    assert!(report.deferred.is_empty(), "{:?}", report.deferred);
    assert_eq!((report.passes, report.retries, report.audience), (1, 4, 2));
    assert_eq!(sorted_deliveries(&gateway), ids(2), "each once");
}

#[tokio::test]
async fn still_deferred_after_every_pass_is_reported_with_its_key_not_dropped() {
    // The job completes; one connection is deferred.
    let (table, _, report) = with_503s(3, "conn-1", 100).await;
    assert_eq!((report.delivered, report.failed), (2, 0));
    assert_eq!((report.passes, report.audience), (2, 3));
    let d = the_one_deferred(&report, "conn-1");
    assert!(d.connection.key.is_some(), "the row key travels with it");
    assert_eq!(d.reason, "503");
    assert!(
        table.remaining().contains("conn-1"),
        "a deferred connection is not removed"
    );
    assert!(
        report.resume.is_empty(),
        "the page holding it never counts as finished"
    );
}

#[tokio::test]
async fn a_connection_in_several_channels_gets_it_once_and_all_its_rows_go_if_gone() {
    let mut table = FakeTable::with(&[], 2);
    let members = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    table.channels = [
        ("a".to_owned(), members(&["m1", "m2", "m3", "x"])),
        ("b".to_owned(), members(&["m2", "m4", "x"])),
        ("c".to_owned(), members(&["m1", "m4", "m5", "x"])),
    ]
    .into();
    table.channel_order = crate::store::ChannelOrder::ById;
    let table = Arc::new(table);
    let gateway = Arc::new(FakeGateway::answering_gone(["x"]));
    let target = Target::Channels(vec!["a".into(), "b".into(), "c".into()]);
    let (report, result) = run(&engine(table.clone(), gateway.clone(), 4), &job(target)).await;
    result.expect("completes");
    let got = sorted_deliveries(&gateway);
    assert_eq!(got, ["m1", "m2", "m3", "m4", "m5"], "each member once");
    assert_eq!((report.audience, report.gone), (6, 1), "{report:?}");
    assert_eq!(report.removed, 3, "x's three rows, one per channel");
    let removed_rows: usize = table.remove_calls.lock().unwrap().iter().sum();
    assert_eq!(removed_rows, 3);
}

#[tokio::test]
async fn an_interrupted_merge_of_channels_continues_after_its_last_finished_page() {
    use crate::job::{Capabilities, parse};
    // Three overlapping channels of 60 ids each, in id order; pages of 10.
    let id = |n: usize| format!("m{n:03}");
    let mut table = FakeTable::with(&[], 10);
    table.channels = [
        ("a".to_owned(), (0..120).step_by(2).map(id).collect()),
        ("b".to_owned(), (0..180).step_by(3).map(id).collect()),
        ("c".to_owned(), (60..120).map(id).collect()),
    ]
    .into();
    table.channel_order = crate::store::ChannelOrder::ById;
    let table = Arc::new(table);
    let members: HashSet<String> = table.channels.values().flatten().cloned().collect();
    let target = Target::Channels(vec!["a".into(), "b".into(), "c".into()]);
    // m050 never answers: the merge stops behind it.
    let (report, gateway) = interrupted(&table, target.clone(), "m050", 40).await;
    let [cursor] = &report.resume[..] else {
        panic!("one cursor for the merge: {:?}", report.resume)
    };
    let Some(crate::store::Position::After { after }) = &cursor.position else {
        panic!("{cursor:?}")
    };
    assert!(after.as_str() < "m050", "{after}");

    // The continuation, as the worker puts it on the queue.
    let mut stopped = job(target);
    stopped.id = "j".into();
    let body = serde_json::to_string(&stopped.continuation(report.resume.clone())).unwrap();
    let caps = Capabilities {
        channels: true,
        audiences: Some(Vec::new()),
    };
    let next = parse(&body, "m", &caps).expect("the continuation parses");
    let second = Arc::new(FakeGateway::default());
    let (report, result) = run(&engine(table, second.clone(), 4), &next).await;
    result.expect("completes");
    let before: Vec<String> = gateway.delivered_ids().into_iter().collect();
    let after_ids: Vec<String> = second.delivered_ids().into_iter().collect();
    assert_eq!(report.delivered as usize, after_ids.len());
    assert!(
        after_ids.iter().all(|id| id.as_str() > after.as_str()),
        "the continuation starts after {after}"
    );
    let unique: HashSet<&String> = after_ids.iter().collect();
    assert_eq!(
        unique.len(),
        after_ids.len(),
        "each id once in the continuation"
    );
    let union: HashSet<String> = before.into_iter().chain(after_ids).collect();
    assert_eq!(union, members, "nobody lost");
}

#[tokio::test]
async fn a_live_connection_keeps_every_row_and_disjoint_channels_are_concatenated() {
    let mut table = FakeTable::with(&[], 10);
    table.channels = [
        ("a".to_owned(), vec!["a1".to_owned(), "gone".to_owned()]),
        ("b".to_owned(), vec!["b1".to_owned()]),
    ]
    .into();
    let table = Arc::new(table);
    let gateway = Arc::new(FakeGateway::answering_gone(["gone"]));
    let target = Target::Channels(vec!["a".into(), "b".into()]);
    let (report, result) = run(&engine(table.clone(), gateway.clone(), 4), &job(target)).await;
    result.expect("completes");
    assert_eq!(
        (
            report.audience,
            report.delivered,
            report.gone,
            report.removed
        ),
        (3, 2, 1, 1)
    );
}

#[tokio::test]
async fn a_named_audience_reads_its_index_only() {
    let mut table = FakeTable::with(&ids(20), 5);
    table.audiences.insert(
        "user".into(),
        [(
            "u-42".to_owned(),
            vec!["conn-3".to_owned(), "conn-9".to_owned()],
        )]
        .into(),
    );
    let table = Arc::new(table);
    let gateway = Arc::new(FakeGateway::default());
    let target = Target::Audience {
        name: "user".into(),
        values: vec!["u-42".into()],
    };
    let (report, result) = run(&engine(table, gateway.clone(), 4), &job(target)).await;
    result.expect("completes");
    assert_eq!(report.delivered, 2);
    assert_eq!(sorted_deliveries(&gateway), ["conn-3", "conn-9"]);
}

#[tokio::test]
async fn throttling_is_bounded_by_time_not_by_attempts() {
    // More 429s than the four attempts, well within the deadline.
    let mut engine = throttling(2, 10, "conn-0", 8, 4);
    engine.settings.throttle_deadline = Duration::from_secs(30);
    let (report, result) = run(&engine, &job(Target::All)).await;
    result.expect("completes");
    assert_eq!(report.delivered, 2, "{report:?}");
    assert_eq!(report.passes, 0, "delivered in the first pass");
    assert_eq!(report.throttled, 8);
}

#[tokio::test]
async fn one_connection_that_always_answers_429_is_deferred_and_the_rest_delivered() {
    let mut engine = throttling(200, 50, "conn-7", 100_000, 16);
    let budget = adaptive_budget(1_000_000, 10_000, 16);
    engine.budget = budget.clone();
    let (report, result) = run(&engine, &job(Target::All)).await;
    result.expect("completes");
    assert_eq!(report.delivered, 199);
    let d = the_one_deferred(&report, "conn-7");
    assert!(d.reason.starts_with("throttled (429) for"), "{}", d.reason);
    assert!(
        report.throttled > 4,
        "retried past its attempts: {}",
        report.throttled
    );
    assert_eq!(budget.answers(), (199, report.throttled));
}

#[tokio::test]
async fn one_clients_run_of_429s_defers_it_at_once_from_the_pass_over_the_audience() {
    use crate::budget::CLIENT_STREAK;
    let mut engine = throttling(200, 10, "conn-15", 100_000, 16);
    // Its deadline would hold page 2 unanswered, and page 4 behind it.
    engine.settings.throttle_deadline = Duration::from_secs(3600);
    engine.settings.deferred_passes = 0;
    engine.budget = adaptive_budget(1_000_000, 10_000, 16);
    let (report, result) = run(&engine, &job(Target::All)).await;
    result.expect("completes");
    assert_eq!(report.delivered, 199);
    let d = the_one_deferred(&report, "conn-15");
    assert!(d.reason.ends_with("alone"), "{}", d.reason);
    assert_eq!(report.throttled, u64::from(CLIENT_STREAK));
}

#[tokio::test]
async fn only_answers_the_endpoint_took_count_as_accepted_for_the_rate() {
    let table = Arc::new(FakeTable::with(&ids(3), 10));
    let gateway = Arc::new(FakeGateway::answering([
        ("conn-0", vec![PostOutcome::Transient("500".into()); 3]),
        ("conn-1", vec![PostOutcome::Rejected("400".into())]),
    ]));
    let mut engine = engine(table, gateway, 4);
    let budget = adaptive_budget(100_000, 1000, 4);
    engine.budget = budget.clone();
    let (_, result) = run(&engine, &job(Target::All)).await;
    result.expect("completes");
    // Three 500s were neither accepted nor throttled.
    assert_eq!(budget.answers(), (3, 0));
}

#[tokio::test]
async fn a_deferred_audience_is_exactly_its_connections_from_its_offset() {
    use crate::store::Position;
    let table = Arc::new(FakeTable::with(&ids(10), 10));
    let gateway = Arc::new(FakeGateway::answering_gone(["conn-3"]));
    let listed: Vec<Connection> = ["conn-2", "conn-3", "conn-4"]
        .into_iter()
        .map(|id| Connection {
            id: id.into(),
            key: Some(crate::connection::RowKey(vec![(
                "connectionId".into(),
                crate::connection::KeyValue::S(id.into()),
            )])),
            started_ms: None,
        })
        .collect();
    let mut j = job(Target::Deferred(listed));
    let (report, result) = run(&engine(table.clone(), gateway.clone(), 4), &j).await;
    result.unwrap();
    // A listed connection's start is unknown: it may still be
    // connecting, so its first 410 is rechecked, not acted on.
    assert_eq!(
        (
            report.delivered,
            report.gone,
            report.removed,
            report.rechecking
        ),
        (2, 1, 0, 1)
    );
    assert!(
        table.remaining().contains("conn-3"),
        "kept until its recheck"
    );
    assert_eq!(table.pages_read.load(Ordering::SeqCst), 0, "no table read");
    j.resume = Some(vec![Cursor {
        segment: 0,
        position: Some(Position::Offset(2)),
    }]);
    let (report, _) = run(&engine(table, gateway, 4), &j).await;
    assert_eq!(report.delivered, 1, "only conn-4 after the offset");
}

#[tokio::test]
async fn forbidden_and_too_large_stop_the_job() {
    for (answer, permanent) in [
        (PostOutcome::Forbidden("no".into()), false),
        (PostOutcome::PayloadTooLarge, true),
    ] {
        let table = Arc::new(FakeTable::with(&ids(50), 10));
        let gateway = Arc::new(FakeGateway::answering([("conn-0", vec![answer])]));
        let (report, result) = to_everyone(&table, &gateway, 1).await;
        let err = result.expect_err("stops");
        assert_eq!(err.is_permanent(), permanent, "{err}");
        assert!(report.delivered < 50);
        assert_eq!(table.remaining().len(), 50, "nothing removed");
    }
}

#[tokio::test]
async fn rejected_connections_fail_without_retry_or_removal() {
    let script = [("conn-1", vec![PostOutcome::Rejected("400".into())])];
    let (table, _, report) = completed_answering(2, script).await;
    assert_eq!((report.delivered, report.failed, report.retries), (1, 1, 0));
    assert_eq!(report.rejected, [ConnectionId::new("conn-1")]);
    assert_eq!(table.remaining().len(), 2);
}

#[tokio::test]
async fn the_report_names_the_first_rejected_connections_only() {
    let all = ids(MAX_FAILED_IDS + 20);
    let table = Arc::new(FakeTable::with(&all, 50));
    let gateway = answering_all(&all, &[PostOutcome::Rejected("400".into())]);
    let engine = engine(table, gateway, 8);
    // Proven by an earlier job: a run where every post is refused is
    // otherwise the sign of a wrong endpoint.
    engine.watch().record(&PostOutcome::Delivered);
    let (report, result) = run(&engine, &job(Target::All)).await;
    result.unwrap();
    assert_eq!(report.failed as usize, all.len());
    assert_eq!(report.rejected.len(), MAX_FAILED_IDS);
    let named: HashSet<_> = report.rejected.iter().map(|id| id.to_string()).collect();
    assert_eq!(named.len(), MAX_FAILED_IDS, "no id twice");
    assert!(named.iter().all(|id| all.contains(id)));
}

#[tokio::test]
async fn excluded_and_explicit_audiences() {
    let table = Arc::new(FakeTable::with(&ids(10), 3));
    let gateway = Arc::new(FakeGateway::default());
    let mut j = job(Target::Connections(vec![
        "x".into(),
        "y".into(),
        "z".into(),
    ]));
    j.exclude.insert("y".into());
    let (report, result) = run(&engine(table, gateway.clone(), 4), &j).await;
    result.unwrap();
    assert_eq!(
        (report.audience, report.excluded, report.delivered),
        (2, 1, 2)
    );
    assert_eq!(sorted_deliveries(&gateway), ["x", "z"]);
}

#[tokio::test]
async fn an_audience_read_error_fails_the_job_transiently() {
    let table = FakeTable {
        fail_after_pages: Some(3),
        ..FakeTable::with(&ids(100), 10)
    };
    a_broken_reader_fails_the_job_transiently(table, "fails").await;
}

#[tokio::test]
async fn an_interrupted_broadcast_resumes_after_its_last_finished_page() {
    // Pages of 10; conn-25 never answers, so page 3 never finishes.
    let table = Arc::new(FakeTable::with(&ids(100), 10));
    // Let it work until only the stuck send is left, then stop it.
    let (report, _) = interrupted(&table, Target::All, "conn-25", 23).await;
    let resume = report.resume.clone();
    assert_eq!(
        resume,
        [Cursor {
            segment: 0,
            position: Some(crate::store::Position::Offset(20))
        }],
        "after pages 1 and 2, the last unbroken run of finished pages"
    );

    // The continuation starts at connection 20, not at 0.
    let gateway = Arc::new(FakeGateway::default());
    let mut again = job(Target::All);
    again.resume = Some(resume);
    let (report, result) = run(&engine(table, gateway.clone(), 4), &again).await;
    result.unwrap();
    assert_eq!(report.delivered, 80);
    let delivered = gateway.delivered.lock().unwrap();
    assert!(
        delivered
            .iter()
            .all(|(id, _)| id.as_str() >= "conn-20" || id.len() > 7)
    );
    assert!(
        !delivered
            .iter()
            .any(|(id, _)| id == "conn-5" || id == "conn-19")
    );
}

#[tokio::test]
async fn a_straggler_holds_the_sends_of_the_page_two_after_its_own() {
    // Pages of 10: conn-5 (page 1) answers only when released.
    let table = Arc::new(FakeTable::with(&ids(100), 10));
    let gateway = Arc::new(FakeGateway {
        held_ids: ["conn-5".to_owned()].into(),
        ..FakeGateway::default()
    });
    let engine = engine(table, gateway.clone(), 4);
    let everyone = job(Target::All);
    let stop = CancellationToken::new();
    let run = engine.run(&everyone, &stop);
    tokio::pin!(run);
    let page_of = |id: &str| id["conn-".len()..].parse::<usize>().unwrap() / 10 + 1;
    let pages_reached = |gateway: &FakeGateway| {
        let delivered = gateway.delivered.lock().unwrap();
        delivered.iter().map(|(id, _)| page_of(id)).max()
    };
    // Ample turns for every send that may go to go.
    for _ in 0..2_000 {
        tokio::select! {
            _ = &mut run => panic!("ended with conn-5 unanswered"),
            () = tokio::task::yield_now() => {}
        }
    }
    assert_eq!(
        gateway.delivered.lock().unwrap().len(),
        19,
        "pages 1 and 2 but the straggler"
    );
    assert_eq!(pages_reached(&gateway), Some(2), "page 3 waits for page 1");
    gateway.release();
    let (report, result) = run.await;
    result.expect("completes");
    assert_eq!(report.delivered, 100);
    assert_eq!(pages_reached(&gateway), Some(10));
}

#[tokio::test]
async fn a_panic_of_the_page_reader_fails_the_job_transiently() {
    let table = FakeTable {
        panic_after_pages: Some(3),
        ..FakeTable::with(&ids(100), 10)
    };
    a_broken_reader_fails_the_job_transiently(table, "the rest of the audience was never read")
        .await;
}

#[tokio::test]
async fn an_interrupted_job_counts_the_sends_it_left_unfinished_in_its_audience() {
    let table = Arc::new(FakeTable::with(&ids(3), 10));
    let (report, _) = interrupted(&table, Target::All, "conn-1", 2).await;
    assert_eq!((report.delivered, report.failed, report.gone), (2, 0, 0));
    assert_eq!(
        report.audience, 3,
        "conn-1 was read and sent to, unanswered"
    );
}

#[tokio::test]
async fn cancellation_interrupts() {
    let table = Arc::new(FakeTable::with(&ids(100), 10));
    let gateway = Arc::new(FakeGateway::default());
    let stop = CancellationToken::new();
    stop.cancel();
    let (_, result) = engine(table, gateway, 4)
        .run(&job(Target::All), &stop)
        .await;
    assert!(matches!(result, Err(FanoutError::Interrupted)));
}

/// The property: whatever the answers (410s, refusals, throttles, 5xx,
/// 2xx, in any order per connection) and whatever a job lists and
/// excludes, with or without a proven endpoint, no row is removed whose
/// connection answered 2xx in the same run. Seeded, so a failure
/// repeats.
#[tokio::test(start_paused = true)]
async fn no_answers_and_no_job_fields_remove_a_row_whose_connection_answered_2xx() {
    use rand::{Rng, SeedableRng};
    let answers = [
        PostOutcome::Delivered,
        PostOutcome::Gone,
        PostOutcome::Throttled,
        PostOutcome::Transient("503".into()),
        PostOutcome::Rejected("API Gateway answered HTTP 404 (x)".into()),
    ];
    for seed in 0..200u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let all = ids(rng.random_range(1..40));
        let table = Arc::new(FakeTable::with(&all, rng.random_range(1..8)));
        let gateway = Arc::new(FakeGateway::default());
        for id in &all {
            let script: Vec<PostOutcome> = (0..rng.random_range(0..4))
                .map(|_| answers[rng.random_range(0..answers.len())].clone())
                .collect();
            gateway.script.lock().unwrap().insert(id.clone(), script);
        }
        let target = match rng.random_range(0..3) {
            0 => Target::All,
            1 => Target::Connections(all.iter().map(|i| i.as_str().into()).collect()),
            _ => Target::Deferred(
                all.iter()
                    .map(|id| Connection {
                        // A listed entry may carry any row's key.
                        key: Some(crate::connection::RowKey(vec![(
                            "connectionId".into(),
                            crate::connection::KeyValue::S(
                                all[rng.random_range(0..all.len())].clone(),
                            ),
                        )])),
                        ..Connection::new(id.as_str(), None)
                    })
                    .collect(),
            ),
        };
        let mut j = job(target);
        if rng.random_bool(0.3) {
            j.exclude.insert(all[0].as_str().into());
        }
        let engine = engine(table.clone(), gateway.clone(), 4);
        if rng.random_bool(0.5) {
            engine.watch().record(&PostOutcome::Delivered);
        }
        let _ = run(&engine, &j).await;
        // Past the connect window: the rechecks have posted, and removed.
        tokio::time::sleep(crate::engine::evidence::CONNECT_WINDOW * 3).await;
        let delivered: HashSet<String> = gateway.delivered_ids().into_iter().collect();
        let left = table.remaining();
        for id in &delivered {
            assert!(
                left.contains(id),
                "seed {seed}: {id} answered 2xx and its row went"
            );
        }
    }
}

#[tokio::test]
async fn an_outage_stops_the_run_past_its_deferred_bound_instead_of_listing_everyone() {
    let all = ids(MAX_DEFERRED + 5_000);
    let table = Arc::new(FakeTable::with(&all, 1000));
    let gateway = answering_all(&all, &vec![PostOutcome::Transient("503".into()); 8]);
    let (report, result) = to_everyone(&table, &gateway, 64).await;
    assert!(
        matches!(result, Err(FanoutError::Backlog { deferred }) if deferred == MAX_DEFERRED + 1),
        "{result:?}"
    );
    assert!(!result.as_ref().unwrap_err().is_permanent());
    assert!(
        report.deferred.is_empty(),
        "continued from its pages, not listed"
    );
    assert!(
        report.audience < all.len() as u64,
        "stopped before the end: {}",
        report.audience
    );
}

#[tokio::test]
async fn a_row_whose_id_cannot_be_a_connection_is_rejected_without_a_post() {
    let mut all = ids(5);
    all.extend(["..".to_owned(), "a b".to_owned()]);
    let table = Arc::new(FakeTable::with(&all, 10));
    let gateway = Arc::new(FakeGateway::default());
    let (report, result) = to_everyone(&table, &gateway, 4).await;
    result.unwrap();
    assert_eq!((report.delivered, report.failed), (5, 2), "{report:?}");
    let posted: HashSet<String> = gateway.delivered_ids().into_iter().collect();
    assert!(!posted.contains("..") && !posted.contains("a b"));
    assert_eq!(table.remaining().len(), 7, "rejected, not removed");
}

/// A recheck is the last chance of a client that was connecting. A 429
/// says nothing of the connection, and a few 5xx in a row (5 % of posts
/// failing makes three in a row likely among hundreds of rechecks) are
/// passing: a recheck outlasts both, and its second 410 removes the row.
#[tokio::test(start_paused = true)]
async fn a_recheck_outlasts_a_throttle_or_a_few_5xx_and_removes_the_row() {
    for (what, answer, times) in [
        ("429", PostOutcome::Throttled, 6),
        ("5xx", PostOutcome::Transient("HTTP 500".into()), 4),
    ] {
        let mut table = FakeTable::with(&ids(5), 10);
        table.connecting.insert("conn-2".into());
        let table = Arc::new(table);
        let mut answers = vec![PostOutcome::Gone];
        answers.extend(vec![answer; times]);
        answers.push(PostOutcome::Gone);
        let gateway = Arc::new(FakeGateway::answering([("conn-2", answers)]));
        let engine = engine(table.clone(), gateway.clone(), 4);
        let (report, result) = run(&engine, &job(Target::All)).await;
        result.unwrap();
        assert_eq!((report.delivered, report.rechecking), (4, 1), "{what}");
        while engine.rechecks_pending() > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(
            !table.remaining().contains("conn-2"),
            "{what}: the recheck gave up and left a gone row"
        );
    }
}

/// The connections a stream's next round sends to: a channel of `c-00` to
/// `c-19` read in id order, from after `after` (none: from the start),
/// round the audience (`wrap`) up to `end`.
async fn next_round(after: Option<&str>, wrap: bool, end: &str) -> Vec<String> {
    let padded: Vec<String> = (0..20).map(|i| format!("c-{i:02}")).collect();
    let mut table = FakeTable::with(&padded, 5);
    table.channels.insert("match".into(), padded);
    table.channel_order = crate::store::ChannelOrder::ById;
    let gateway = Arc::new(FakeGateway::default());
    let engine = engine(Arc::new(table), gateway.clone(), 4);
    let mut job = job(Target::Channel("match".into()));
    job.resume = after.map(|id| {
        vec![Cursor {
            segment: 0,
            position: Some(crate::store::Position::After { after: id.into() }),
        }]
    });
    job.wrap = wrap;
    job.round_end = Some(end.into());
    let (_, result) = run(&engine, &job).await;
    result.unwrap();
    sorted_deliveries(&gateway)
}

fn named(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("c-{i:02}")).collect()
}

#[tokio::test]
async fn a_streams_next_round_stops_before_the_first_connection_sent_the_newest_value() {
    // Round the audience from after c-13: c-14 to the end, then the start
    // up to c-05.
    let mut expected = named(0..5);
    expected.extend(named(14..20));
    assert_eq!(next_round(Some("c-13"), true, "c-05").await, expected);
    // An end after the start: within the first part.
    assert_eq!(next_round(Some("c-13"), true, "c-17").await, named(14..17));
    // From the start, as after a round that read from the start.
    assert_eq!(next_round(None, false, "c-05").await, named(0..5));
    // An end gone since: on a read in id order, the next one after it.
    assert_eq!(next_round(Some("c-13"), true, "c-05x").await, {
        let mut e = named(0..6);
        e.extend(named(14..20));
        e
    });
}
