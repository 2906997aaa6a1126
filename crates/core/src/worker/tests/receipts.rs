//! Receipts of `to` broadcasts against the fakes: which keys the report
//! calls reached and unreached, through deferrals, continuations, a
//! deadline and a takeover.

use std::collections::HashMap;

use super::*;
use crate::gateway::PostOutcome;

/// A rig whose table has users: u-1 (conn-1, conn-2), u-2 (conn-3),
/// u-3 (conn-4), u-4 (no connection); `gateway` answers the posts.
fn users(bodies: &[&str], gateway: FakeGateway) -> Rig {
    let mut table = FakeTable::with(&ids(20), 5);
    let users: HashMap<String, Vec<String>> = [
        ("u-1", vec!["conn-1", "conn-2"]),
        ("u-2", vec!["conn-3"]),
        ("u-3", vec!["conn-4"]),
    ]
    .into_iter()
    .map(|(user, conns)| {
        (
            user.to_owned(),
            conns.into_iter().map(String::from).collect(),
        )
    })
    .collect();
    table.audiences.insert("user".into(), users);
    let mut rig = Rig::new(FakeQueue::with_jobs(bodies, true), gateway);
    rig.table = Arc::new(table);
    rig
}

fn user_settings() -> WorkerSettings {
    WorkerSettings {
        capabilities: Capabilities {
            channels: false,
            audiences: Some(vec!["user".into()]),
        },
        ..settings()
    }
}

const FOUR_USERS: &str = r#"{"v":2,"id":"n","data":"x","to":{"user":["u-1","u-2","u-3","u-4"]}}"#;

fn gone(ids: &[&str]) -> FakeGateway {
    FakeGateway {
        gone: ids.iter().map(|id| id.to_string()).collect(),
        ..FakeGateway::default()
    }
}

#[tokio::test(start_paused = true)]
async fn the_report_names_the_keys_no_connection_of_which_accepted_it() {
    // u-1: one gone, one delivered (reached); u-2: gone; u-3: rejected;
    // u-4: no connection.
    let gateway = gone(&["conn-1", "conn-3"]);
    gateway.script.lock().unwrap().insert(
        "conn-4".into(),
        vec![PostOutcome::Rejected("HTTP 400".into())],
    );
    let rig = users(&[FOUR_USERS], gateway);
    rig.run(user_settings(), CancellationToken::new()).await;
    let [report] = &rig.reports.reports()[..] else {
        panic!("one report")
    };
    assert_eq!(report.status, Status::Done);
    assert_eq!(report.reached, Some(1));
    assert_eq!(
        report.unreached.as_deref(),
        Some(&["u-2".to_owned(), "u-3".into(), "u-4".into()][..])
    );
}

#[tokio::test(start_paused = true)]
async fn a_single_key_reports_reached_or_not() {
    let rig = users(
        &[
            r#"{"id":"a","data":"x","to":{"user":"u-2"}}"#,
            r#"{"id":"b","data":"x","to":{"user":"u-4"}}"#,
        ],
        FakeGateway::default(),
    );
    rig.run(user_settings(), CancellationToken::new()).await;
    let reports = rig.reports.reports();
    let by_id = |id: &str| reports.iter().find(|r| r.id == id).unwrap().clone();
    assert_eq!(
        (by_id("a").reached, by_id("a").unreached),
        (Some(1), Some(vec![]))
    );
    assert_eq!(
        (by_id("b").reached, by_id("b").unreached),
        (Some(0), Some(vec!["u-4".to_owned()]))
    );
}

#[tokio::test(start_paused = true)]
async fn a_key_whose_connection_is_deferred_is_decided_by_the_continuation() {
    // u-2's only connection answers 503 throughout: deferred, so u-2 is
    // neither reached nor unreached yet, and its continuation says which.
    let rig = users(&[FOUR_USERS], failing("conn-3"));
    rig.run(user_settings(), CancellationToken::new()).await;
    let reports = rig.reports.reports();
    let first = &reports[0];
    assert_eq!(first.status, Status::Continued);
    assert_eq!(first.reached, Some(2), "u-1 and u-3");
    assert_eq!(first.unreached.as_deref(), Some(&["u-4".to_owned()][..]));
    let sent = rig.queue.sent.lock().unwrap().clone();
    let [body] = &sent[..] else {
        panic!("{sent:?}")
    };
    let next: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(next["v"], 2);
    assert_eq!(next["to"]["user"][1], "u-2", "the keys go on");
    assert_eq!(next["deferred"][0]["of"], 1, "conn-3 was read for u-2");
    // The continuation runs on a gateway that now delivers.
    let again = users(&[body], FakeGateway::default());
    again.run(user_settings(), CancellationToken::new()).await;
    let [last] = &again.reports.reports()[..] else {
        panic!("one report")
    };
    assert_eq!((last.status, last.reached), (Status::Done, Some(1)));
    assert_eq!(last.unreached.as_deref(), Some(&[][..]));
}

#[tokio::test(start_paused = true)]
async fn a_lapsed_to_broadcast_leaves_every_key_not_reached_unreached() {
    let past = crate::connection::expiry::epoch_ms(std::time::SystemTime::now()) - 1;
    let body = format!(r#"{{"v":2,"data":"x","deliver_by":{past},"to":{{"user":["u-1","u-2"]}}}}"#);
    let rig = users(&[&body], FakeGateway::default());
    rig.run(user_settings(), CancellationToken::new()).await;
    let [report] = &rig.reports.reports()[..] else {
        panic!("one report")
    };
    assert_eq!((report.status, report.reached), (Status::Lapsed, Some(0)));
    assert_eq!(
        report.unreached.as_deref(),
        Some(&["u-1".to_owned(), "u-2".into()][..])
    );
}

#[tokio::test(start_paused = true)]
async fn keys_reached_before_a_takeover_stay_reached() {
    use crate::fakes::FakeRunTable;
    use crate::job::keys::{RunKey, fingerprint};
    use crate::runs::{Checkpoint, RunRecord};
    // A task that stopped had reached u-1 and deferred conn-3 (u-2); its
    // lease has lapsed, and its checkpoint says so.
    let rig = users(&[FOUR_USERS], gone(&["conn-1", "conn-2"]));
    let job = job::parse(FOUR_USERS, "m0", &user_settings().capabilities).unwrap();
    let key = RunKey::of(&job).storage_key();
    let checkpoint = Checkpoint {
        resume: vec![
            Cursor {
                segment: 0,
                position: None,
            },
            Cursor {
                segment: 1,
                position: None,
            },
        ],
        deferred: vec![crate::job::DeferredSpec {
            id: "conn-3".into(),
            key: None,
            of: Some(1),
        }],
        reached: vec![0],
    };
    let runs = Arc::new(FakeRunTable::default());
    runs.records.lock().unwrap().insert(
        key.clone(),
        RunRecord {
            key,
            fingerprint: fingerprint(&job),
            owner: "a-stopped-task".into(),
            message_id: "m0".into(),
            receipt: "r0".into(),
            lease_until_ms: 0,
            finished_at_ms: None,
            expires_at: i64::MAX / 1000,
            checkpoint: Some(serde_json::to_string(&checkpoint).unwrap()),
            version: 3,
        },
    );
    let ledger = super::ledger(&rig, &runs);
    rig.run_with(user_settings(), CancellationToken::new(), Some(ledger))
        .await;
    let reports = rig.reports.reports();
    let [report, whole] = &reports[..] else {
        panic!("one report")
    };
    // u-1 stays reached though its rows answer 410 now (they were read
    // before the takeover, and are not read again); u-2's conn-3 is
    // delivered; u-3 is read and delivered; u-4 has no connection.
    assert_eq!(report.reached, Some(3), "{report:?}");
    assert_eq!(report.unreached.as_deref(), Some(&["u-4".to_owned()][..]));
    // The whole broadcast is this one run: its report says the same.
    assert_eq!(whole.kind, crate::reports::Kind::Broadcast);
    assert_eq!((whole.reached, whole.runs), (Some(3), Some(1)));
    assert_eq!(whole.unreached, report.unreached);
}
