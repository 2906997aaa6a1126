//! One report for the whole broadcast, against the fakes: a split, a
//! continuation of deferred connections, a piece run twice.

use super::*;
use crate::fakes::FakeRunTable;
use crate::reports::Kind;
use crate::runs::{Piece, RunTable, Totals};

fn of_kind(rig: &Rig, kind: Kind) -> Vec<BroadcastReport> {
    rig.reports
        .reports()
        .into_iter()
        .filter(|r| r.kind == kind)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_split_broadcast_reports_once_when_its_last_segment_settles() {
    let splitter = Rig::jobs(&[r#"{"id":"launch","data":"live","split":3}"#]);
    let runs = Arc::new(FakeRunTable::default());
    let ledger = ledger(&splitter, &runs);
    splitter
        .run_with(settings(), CancellationToken::new(), Some(ledger.clone()))
        .await;
    assert!(of_kind(&splitter, Kind::Broadcast).is_empty());
    // The segment jobs, as the queue hands them to the fleet.
    let segments = splitter.queue.sent.lock().unwrap().clone();
    let bodies: Vec<&str> = segments.iter().map(String::as_str).collect();
    let rig = Rig::jobs(&bodies);
    rig.run_with(settings(), CancellationToken::new(), Some(ledger))
        .await;
    assert_eq!(of_kind(&rig, Kind::Run).len(), 3, "the 3 segments");
    let whole = of_kind(&rig, Kind::Broadcast);
    let [whole] = &whole[..] else {
        panic!("one broadcast report: {whole:?}")
    };
    assert_eq!((whole.status, whole.is_final), (Status::Done, true));
    assert_eq!(
        (whole.delivered, whole.audience, whole.runs),
        (20, 20, Some(4))
    );
    // It came after every run's report.
    let last = rig.reports.reports().pop().unwrap();
    assert_eq!(last.kind, Kind::Broadcast);
}

#[tokio::test(start_paused = true)]
async fn a_broadcast_with_a_continuation_reports_its_totals_after_the_continuation() {
    // conn-3 answers 503 throughout the first run; its continuation, run
    // on a gateway that delivers, reaches it.
    let rig = Rig::new(
        FakeQueue::with_jobs(&[r#"{"id":"j","data":"a"}"#], true),
        failing("conn-3"),
    );
    let runs = Arc::new(FakeRunTable::default());
    let ledger = ledger(&rig, &runs);
    rig.run_with(settings(), CancellationToken::new(), Some(ledger.clone()))
        .await;
    let first = of_kind(&rig, Kind::Run);
    assert_eq!(first[0].status, Status::Continued);
    assert!(
        of_kind(&rig, Kind::Broadcast).is_empty(),
        "a piece is still out"
    );
    // The continuation, as the queue hands it back.
    let sent = rig.queue.sent.lock().unwrap().clone();
    let again = Rig::jobs(&[&sent[0]]);
    again
        .run_with(settings(), CancellationToken::new(), Some(ledger))
        .await;
    let whole = of_kind(&again, Kind::Broadcast);
    let [whole] = &whole[..] else {
        panic!("{whole:?}")
    };
    assert_eq!(
        (whole.status, whole.delivered, whole.runs),
        (Status::Done, 20, Some(2))
    );
}

#[tokio::test]
async fn a_piece_added_twice_counts_once_and_a_child_first_ends_nothing() {
    let runs = FakeRunTable::default();
    let piece = |run: &str, expects: &[&str], delivered| Piece {
        run: run.into(),
        expects: expects.iter().map(|s| s.to_string()).collect(),
        totals: Totals {
            delivered,
            ..Totals::default()
        },
        ..Piece::default()
    };
    let child = runs.tally("b", &piece("s-.c1.0:b", &[], 5)).await.unwrap();
    assert!(child.counted && !child.tally.is_over(), "before its parent");
    let root = piece("s-.c0.0:b", &["s-.c1.0:b", "s-.c0.0:b"], 7);
    let parent = runs.tally("b", &root).await.unwrap();
    assert!(parent.tally.is_over());
    assert_eq!(parent.tally.totals.delivered, 12);
    let again = runs.tally("b", &root).await.unwrap();
    assert!(!again.counted, "a run again counts once");
    assert_eq!(again.tally.totals.delivered, 12);
    assert!(again.tally.is_over(), "and still says it is over");
}
