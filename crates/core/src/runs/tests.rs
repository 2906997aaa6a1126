use std::sync::Arc;
use std::time::Duration;

use super::admission::*;
use super::*;
use crate::job::Job;
use crate::job::keys::RunKey;
use crate::queue::{Message, Receipt};
use crate::telemetry::Metrics;

const NOW: i64 = 1_780_000_000_000;

fn windows() -> Windows {
    Windows {
        dedup: Duration::from_secs(24 * 3600),
        lease: Duration::from_secs(60),
    }
}

fn request<'a>(fingerprint: &'a str, message_id: &'a str) -> Request<'a> {
    Request {
        key: "s-.c0.0:news",
        fingerprint,
        owner: "task-b",
        message_id,
        receipt: "receipt-2",
    }
}

fn record() -> RunRecord {
    RunRecord {
        key: "s-.c0.0:news".into(),
        fingerprint: "f1".into(),
        owner: "task-a".into(),
        message_id: "m1".into(),
        receipt: "receipt-1".into(),
        lease_until_ms: NOW + 30_000,
        finished_at_ms: None,
        expires_at: 0,
        checkpoint: None,
        version: 3,
    }
}

#[test]
fn a_new_run_is_claimed_with_a_lease_and_a_ttl_past_the_window() {
    let Ruling::Claim { record, read } = admit(None, &request("f1", "m1"), NOW, windows()) else {
        panic!("claimed")
    };
    assert_eq!(read, None);
    assert_eq!(record.owner, "task-b");
    assert_eq!(record.lease_until_ms, NOW + 60_000);
    assert_eq!(record.expires_at, (NOW + 60_000) / 1000 + 24 * 3600);
    assert_eq!(record.version, 1);
}

#[test]
fn a_finished_run_is_a_duplicate_for_its_body_and_a_conflict_for_another() {
    let finished = RunRecord {
        finished_at_ms: Some(NOW - 1000),
        ..record()
    };
    assert_eq!(
        admit(Some(&finished), &request("f1", "m2"), NOW, windows()),
        Ruling::Duplicate {
            finished_at_ms: NOW - 1000
        }
    );
    assert_eq!(
        admit(Some(&finished), &request("f2", "m2"), NOW, windows()),
        Ruling::Conflict {
            finished_at_ms: Some(NOW - 1000)
        }
    );
    // Past the window it is a new broadcast, whatever its body.
    let old = RunRecord {
        finished_at_ms: Some(NOW - 25 * 3600 * 1000),
        ..record()
    };
    assert!(matches!(
        admit(Some(&old), &request("f2", "m2"), NOW, windows()),
        Ruling::Claim { read: Some(3), .. }
    ));
}

#[test]
fn a_live_run_is_adopted_by_its_own_redelivery_and_twinned_by_a_copy() {
    let live = record();
    let Ruling::Adopt { record, read } = admit(Some(&live), &request("f1", "m1"), NOW, windows())
    else {
        panic!("adopted")
    };
    assert_eq!(
        (record.owner.as_str(), read),
        ("task-a", 3),
        "the holder keeps it"
    );
    assert_eq!(record.receipt, "receipt-2", "with the newest receipt");
    assert_eq!(
        admit(Some(&live), &request("f1", "m2"), NOW, windows()),
        Ruling::Twin {
            lease_until_ms: NOW + 30_000
        }
    );
    assert_eq!(
        admit(Some(&live), &request("f2", "m2"), NOW, windows()),
        Ruling::Conflict {
            finished_at_ms: None
        }
    );
}

#[test]
fn a_lapsed_lease_is_taken_over_from_its_checkpoint() {
    let lapsed = RunRecord {
        lease_until_ms: NOW,
        checkpoint: Some("[]".into()),
        ..record()
    };
    let Ruling::Claim { record, read } = admit(Some(&lapsed), &request("f1", "m1"), NOW, windows())
    else {
        panic!("taken over")
    };
    assert_eq!((record.owner.as_str(), read), ("task-b", Some(3)));
    assert_eq!(
        record.checkpoint.as_deref(),
        Some("[]"),
        "kept for the next taker"
    );
    // A finished run's checkpoint is not a new broadcast's.
    let finished = RunRecord {
        finished_at_ms: Some(NOW - 25 * 3600 * 1000),
        ..lapsed
    };
    let Ruling::Claim { record, .. } = admit(Some(&finished), &request("f1", "m1"), NOW, windows())
    else {
        panic!("claimed")
    };
    assert_eq!(record.checkpoint, None);
}

#[tokio::test]
async fn renewals_keep_the_run_until_another_owner_takes_it() {
    let table = crate::fakes::FakeRunTable::default();
    let Ruling::Claim { record, read } = admit(None, &request("f1", "m1"), NOW, windows()) else {
        panic!()
    };
    assert!(table.store(&record, read).await.unwrap());
    let key = record.key.clone();
    // The writes the ledger makes: each a change, made only by the owner.
    let renewed = update_from(
        &table,
        &key,
        "task-b",
        None,
        renewal(NOW + 20_000, windows()),
    );
    assert_eq!(
        held(renewed.await.unwrap().as_ref()),
        Renewed::Held {
            receipt: "receipt-2".into()
        }
    );
    assert_eq!(
        table.load(&key).await.unwrap().unwrap().lease_until_ms,
        NOW + 80_000
    );
    let renewed = update_from(&table, &key, "task-z", None, renewal(NOW, windows()));
    assert_eq!(held(renewed.await.unwrap().as_ref()), Renewed::Lost);
    let released = update_from(&table, &key, "task-b", None, releasing);
    assert!(released.await.unwrap().is_some());
    assert_eq!(table.load(&key).await.unwrap().unwrap().lease_until_ms, 0);
    let finished = update_from(&table, &key, "task-b", None, finishing(NOW, windows()));
    assert!(finished.await.unwrap().is_some());
    let done = table.load(&key).await.unwrap().unwrap();
    assert_eq!(done.finished_at_ms, Some(NOW));
    assert_eq!(done.version, 4);
}

fn message(id: &str, receipt: &str) -> Message {
    Message {
        id: id.into(),
        body: String::new(),
        receipt: Receipt(receipt.into()),
        receive_count: 1,
        group_id: None,
        attributes: Default::default(),
        trace_header: None,
    }
}

fn news() -> Job {
    let caps = crate::job::Capabilities {
        channels: false,
        audiences: None,
    };
    crate::job::parse(r#"{"id":"news","data":"x"}"#, "m1", &caps).unwrap()
}

fn ledger(table: &Arc<crate::fakes::FakeRunTable>) -> Ledger {
    Ledger::new(table.clone(), windows(), Arc::new(Metrics::default()))
}

fn calls(table: &crate::fakes::FakeRunTable) -> u64 {
    table.calls.load(std::sync::atomic::Ordering::SeqCst)
}

/// A small broadcast's run costs its job two table round trips, not
/// four: a chat service's many small jobs each wait for them.
#[tokio::test]
async fn a_new_run_is_claimed_and_finished_in_one_write_each() {
    let table = Arc::new(crate::fakes::FakeRunTable::default());
    let ledger = ledger(&table);
    let Admission::Run(lease, None) = ledger.admit(&message("m1", "r1"), &news()).await else {
        panic!("claimed")
    };
    assert_eq!(calls(&table), 1, "claimed with one conditional write");
    assert!(ledger.renew(&lease).await);
    ledger
        .save(
            &lease,
            &Checkpoint {
                resume: Vec::new(),
                deferred: Vec::new(),
                reached: Vec::new(),
            },
        )
        .await;
    ledger.close(lease, true).await;
    assert_eq!(calls(&table), 4, "each later write without a read");
    let record = table
        .load(&RunKey::of(&news()).storage_key())
        .await
        .unwrap()
        .unwrap();
    assert!(record.finished_at_ms.is_some());
    assert_eq!(
        (record.version, record.checkpoint.as_deref()),
        (4, Some(r#"{"resume":[]}"#))
    );
    // A producer's retry reads the record its claim found there.
    let before = calls(&table);
    assert!(matches!(
        ledger.admit(&message("m2", "r2"), &news()).await,
        Admission::Duplicate { .. }
    ));
    assert_eq!(
        calls(&table) - before,
        2,
        "a write that lost, then the read"
    );
}

/// Another task's write between two of the holder's (a redelivery's
/// adoption) makes the holder's next write lose; it reads, and writes
/// again on what it read, keeping the adopted receipt.
#[tokio::test]
async fn a_write_that_another_came_before_reads_and_tries_again() {
    let table = Arc::new(crate::fakes::FakeRunTable::default());
    let ledger = ledger(&table);
    let first = message("m1", "r1");
    let Admission::Run(lease, None) = ledger.admit(&first, &news()).await else {
        panic!("claimed")
    };
    let redelivered = Message {
        receive_count: 2,
        ..message("m1", "r1-newer")
    };
    assert!(matches!(
        ledger.admit(&redelivered, &news()).await,
        Admission::Adopted
    ));
    assert!(ledger.renew(&lease).await);
    assert_eq!(lease.receipt(), Receipt("r1-newer".into()));
    ledger.close(lease, true).await;
    let record = table
        .load(&RunKey::of(&news()).storage_key())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.receipt, "r1-newer");
    assert!(record.finished_at_ms.is_some());
}

#[tokio::test]
async fn a_stale_write_loses() {
    let table = crate::fakes::FakeRunTable::default();
    let r = record();
    assert!(table.store(&r, None).await.unwrap());
    assert!(!table.store(&r, None).await.unwrap(), "exists already");
    assert!(!table.store(&r, Some(2)).await.unwrap(), "version moved");
    assert!(table.store(&r, Some(3)).await.unwrap());
}
