//! Named audiences (`to`) and several channels (`channels`) end to end: the
//! `fanout` binary, SQS (moto) and DynamoDB (dynalite) emulators, the local
//! API Gateway stand-in and real WebSocket clients, on tables with the
//! indexes these audiences read.

use fanout_testkit::stack::Stack;
use fanout_testkit::support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use fanout_aws::{DynamoStore, TableSettings};
use fanout_core::connection::ConnectionId;
use fanout_core::store::{AudienceQuery, ChannelOrder, ConnectionStore, Cursor, Position};
use futures::StreamExt;

use support::worker::count;
use support::{CHANNEL, CHANNEL_INDEX, ID, IndexSpec};

const USER_INDEX: &str = "by-user";
const USER: &str = "userId";
const AUDIENCES: &str = "user=by-user:userId";

/// A queue, its dead-letter queue, a table and a gateway over it.
struct Rig(Stack);

fanout_testkit::on_stack!(Rig, 0);

/// A channel index (sorted by `channel_sort`, if given) and a user index.
fn indexes(channel_sort: Option<&'static str>) -> [IndexSpec<'static>; 2] {
    [
        IndexSpec {
            name: CHANNEL_INDEX,
            partition: CHANNEL,
            sort: channel_sort,
        },
        IndexSpec {
            name: USER_INDEX,
            partition: USER,
            sort: None,
        },
    ]
}

impl Rig {
    async fn new(key: (&str, Option<&str>), indexes: &[IndexSpec<'_>], keep_stale: bool) -> Self {
        Self::with_gateway(key, indexes, |a| a.keep_stale = keep_stale).await
    }

    async fn with_gateway(
        key: (&str, Option<&str>),
        indexes: &[IndexSpec<'_>],
        configure: impl FnOnce(&mut fanout_dev::gateway::GatewayArgs),
    ) -> Self {
        let table = async |dynamo: &aws_sdk_dynamodb::Client, name: &str| {
            support::create_table_with_indexes(dynamo, name, key, indexes).await
        };
        let mut stack = Stack::with_table("aud", table, configure).await;
        stack.set("FANOUT_AUDIENCE_INDEXES", AUDIENCES);
        Self(stack)
    }

    /// Writes `userId` on a connection's row, as a `$connect` handler that
    /// knows its user would.
    async fn set_user(&self, id: &str, user: &str) {
        self.dynamo
            .update_item()
            .table_name(&self.table)
            .key(ID, AttributeValue::S(id.to_owned()))
            .update_expression("SET #u = :u")
            .expression_attribute_names("#u", USER)
            .expression_attribute_values(":u", AttributeValue::S(user.to_owned()))
            .send()
            .await
            .expect("set a row's user");
    }
}

#[tokio::test]
async fn a_user_with_three_connections_among_a_thousand_gets_it_on_all_three_and_nobody_else() {
    let rig = Rig::new((ID, None), &indexes(None), false).await;
    let clients = rig.connect(1000, None).await;
    let ids = clients.ids();
    assert_eq!(ids.len(), 1000);
    // Three of u-42's connections, spread over the table, and another
    // user's two.
    let theirs: BTreeSet<String> = [17, 503, 988].iter().map(|&n| ids[n].clone()).collect();
    for id in &theirs {
        rig.set_user(id, "u-42").await;
    }
    for n in [18, 504] {
        rig.set_user(&ids[n], "u-7").await;
    }

    rig.send_raw(r#"{"id":"for-u-42","data":"for you","to":{"user":"u-42"}}"#)
        .await;
    let run = rig.run_until_idle().await;

    let report = run.report("for-u-42");
    assert_eq!(report["status"], "done", "{report}");
    assert_eq!(report["selector"], "to user=u-42", "{report}");
    assert_eq!(
        (count(report, "audience"), count(report, "delivered")),
        (3, 3),
        "{report}"
    );
    let theirs_clients: Vec<_> = clients
        .clients()
        .iter()
        .filter(|c| theirs.contains(c.id()))
        .collect();
    assert_eq!(theirs_clients.len(), 3);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while theirs_clients.iter().any(|c| c.tally().frames() == 0)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for client in &theirs_clients {
        assert_eq!(client.tally().text_count("for you"), 1, "{}", client.id());
        assert_eq!(client.tally().frames(), 1, "{}", client.id());
    }
    // Whatever was sent has arrived by now; give a stray frame time anyway.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let others_with_frames: Vec<&str> = clients
        .clients()
        .iter()
        .filter(|c| !theirs.contains(c.id()) && c.tally().frames() > 0)
        .map(|c| c.id())
        .collect();
    assert!(others_with_frames.is_empty(), "{others_with_frames:?}");
    let posts = rig.gateway.stats().await.posts;
    assert_eq!(posts, 3, "the gateway saw three posts");
    assert_eq!(support::counts(&rig.sqs, &rig.dlq.url).await, (0, 0));
}

#[tokio::test]
async fn three_overlapping_channels_each_member_gets_it_once_and_gone_rows_are_removed_once() {
    // One row per (connection, channel); the channel index sorted by id.
    let rig = Rig::new((ID, Some(CHANNEL)), &indexes(Some(ID)), true).await;
    let mut a = rig.connect(12, Some("a")).await;
    let b = rig.connect(12, Some("b")).await;
    let c = rig.connect(12, Some("c")).await;
    let d = rig.connect(6, Some("d")).await;
    let (a_ids, b_ids, c_ids, d_ids) = (a.ids(), b.ids(), c.ids(), d.ids());
    // Extra memberships: rows the gateway's `$connect` did not write.
    let mut extra: Vec<(String, &str)> = Vec::new();
    for id in &a_ids[..6] {
        extra.push((id.clone(), "b"));
    }
    for id in &a_ids[3..9] {
        extra.push((id.clone(), "c"));
    }
    for id in &b_ids[..4] {
        extra.push((id.clone(), "c"));
    }
    for id in &c_ids[..3] {
        extra.push((id.clone(), "a"));
        extra.push((id.clone(), "d"));
    }
    for id in &d_ids[..2] {
        extra.push((id.clone(), "a"));
    }
    // Connections long gone, in all three channels and one not listed.
    let stale = support::ids("stale", 5);
    for id in &stale {
        for channel in ["a", "b", "c", "d"] {
            extra.push((id.clone(), channel));
        }
    }
    let rows: Vec<Vec<(&str, String)>> = extra
        .iter()
        .map(|(id, channel)| vec![(ID, id.clone()), (CHANNEL, (*channel).to_owned())])
        .collect();
    support::put_rows(&rig.dynamo, &rig.table, &rows).await;
    // Two members of three channels leave without `$disconnect`.
    let dropped = vec![a_ids[4].clone(), a_ids[5].clone()];
    a.drop_ids(&dropped).await;

    let before = support::remaining_rows(&rig.dynamo, &rig.table).await;
    let mut channels_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (channel, id) in &before {
        channels_of
            .entry(id.clone())
            .or_default()
            .insert(channel.clone().expect("a channel"));
    }
    let listed = |id: &String| {
        channels_of[id]
            .iter()
            .any(|ch| ["a", "b", "c"].contains(&ch.as_str()))
    };
    let members: BTreeSet<String> = channels_of
        .keys()
        .filter(|id| listed(id))
        .cloned()
        .collect();
    let gone: BTreeSet<String> = stale.iter().chain(&dropped).cloned().collect();
    assert!(gone.iter().all(|id| members.contains(id)));
    let gone_rows: BTreeSet<(Option<String>, String)> = before
        .iter()
        .filter(|(ch, id)| gone.contains(id) && ch.as_deref() != Some("d"))
        .cloned()
        .collect();
    assert_eq!(
        gone_rows.len(),
        5 * 3 + 2 * 3,
        "each gone one is in a, b and c"
    );

    // Small pages: the merge crosses page boundaries in every channel.
    let mut rig = rig;
    rig.env.push(("FANOUT_PAGE_SIZE".into(), "4".into()));
    rig.send_raw(r#"{"id":"abc","data":"to a, b and c","channels":["a","b","c"]}"#)
        .await;
    let run = rig.run_until_idle().await;

    let report = run.report("abc");
    assert_eq!(report["status"], "done", "{report}");
    assert_eq!(report["selector"], "channels a,b,c", "{report}");
    let live: BTreeSet<&String> = members.iter().filter(|id| !gone.contains(*id)).collect();
    assert_eq!(count(report, "audience"), members.len() as u64, "{report}");
    assert_eq!(count(report, "delivered"), live.len() as u64, "{report}");
    assert_eq!(count(report, "gone"), gone.len() as u64, "{report}");
    // The rows carry no start this worker reads, so each first 410 may be
    // a connection still connecting: posted to again after the connect
    // window, and removed (all its rows) on the second 410, before the
    // worker ends.
    assert_eq!(count(report, "rechecking"), gone.len() as u64, "{report}");
    assert_eq!(
        rig.gateway.stats().await.posts,
        (members.len() + gone.len()) as u64,
        "one post each, and a recheck for each gone one"
    );

    let all: Vec<&fanout_dev::clients::Client> = a
        .clients()
        .iter()
        .chain(b.clients())
        .chain(c.clients())
        .chain(d.clients())
        .filter(|client| !dropped.contains(&client.id().to_owned()))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while all
        .iter()
        .any(|cl| live.contains(&cl.id().to_owned()) && cl.tally().frames() == 0)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for client in &all {
        let expected = u32::from(live.contains(&client.id().to_owned()));
        assert_eq!(
            client.tally().text_count("to a, b and c"),
            expected,
            "{} in {:?}",
            client.id(),
            channels_of[client.id()]
        );
    }
    assert_eq!(
        all.iter().filter(|cl| cl.tally().frames() == 1).count(),
        live.len()
    );

    let after = support::remaining_rows(&rig.dynamo, &rig.table).await;
    let expected: BTreeSet<_> = before.difference(&gone_rows).cloned().collect();
    assert_eq!(
        after, expected,
        "exactly the gone ones' rows in a, b and c went"
    );
    for id in &stale {
        assert!(
            after.contains(&(Some("d".to_owned()), id.clone())),
            "{id}'s row in d, a channel not listed, stays"
        );
    }
}

#[tokio::test]
async fn an_unknown_audience_and_two_selectors_are_dead_lettered_with_their_reason() {
    let rig = Rig::new((ID, None), &indexes(None), false).await;
    let clients = rig.connect(3, Some("a")).await;
    rig.enqueue(&["--data", "x", "--to", "team=blue"]).await;
    rig.send_raw(r#"{"data":"x","channel":"a","to":{"user":"u-1"}}"#)
        .await;
    rig.send_raw(r#"{"data":"x","channels":["a","b"],"connections":["c1"]}"#)
        .await;
    rig.send_raw(r#"{"data":"x","to":{"user":"u-1","team":"blue"}}"#)
        .await;
    rig.enqueue(&["--data", "good", "--id", "good", "--channels", "a,b"])
        .await;
    let run = rig.run_until_idle().await;

    assert!(clients.wait_for_frames(1, Duration::from_secs(10)).await);
    for client in clients.clients() {
        assert_eq!(client.tally().frames(), 1, "only the good job was sent");
    }
    assert_eq!(count(run.report("good"), "delivered"), 3);
    let dead = support::receive_all(&rig.sqs, &rig.dlq.url).await;
    let reasons: Vec<&str> = dead.iter().map(support::Received::reason).collect();
    assert_eq!(dead.len(), 4, "{reasons:?}");
    for expected in [
        "the audience `team` is not configured here; FANOUT_AUDIENCE_INDEXES names user",
        "`channel` and `to` cannot be combined",
        "`channels` and `connections` cannot be combined",
        "`to` must name exactly one audience",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "{expected:?} in {reasons:?}"
        );
    }
    assert_eq!(support::counts(&rig.sqs, &rig.queue.url).await, (0, 0));
}

#[tokio::test]
async fn an_audience_index_missing_from_the_table_stops_the_worker_naming_the_key() {
    let rig = Rig::new(
        (ID, None),
        &[IndexSpec {
            name: CHANNEL_INDEX,
            partition: CHANNEL,
            sort: None,
        }],
        false,
    )
    .await;
    let out = rig
        .command(&["run", "--exit-when-idle"], [])
        .output()
        .await
        .expect("run fanout");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stderr.contains("no global secondary index by-user")
            && stderr.contains("FANOUT_AUDIENCE_INDEXES"),
        "{stderr}{stdout}"
    );
}

#[tokio::test]
async fn a_channel_index_sorted_by_id_is_merged_and_resumes_after_an_id() {
    let dynamo = support::dynamodb().await;
    let table = support::create_table_with_indexes(
        &dynamo,
        "aud-store",
        (ID, Some(CHANNEL)),
        &[IndexSpec {
            name: CHANNEL_INDEX,
            partition: CHANNEL,
            sort: Some(ID),
        }],
    )
    .await;
    let ids = support::ids("m", 30);
    let rows: Vec<Vec<(&str, String)>> = ids
        .iter()
        .map(|id| vec![(ID, id.clone()), (CHANNEL, "news".to_owned())])
        .collect();
    support::put_rows(&dynamo, &table, &rows).await;
    let settings = |index: &str| TableSettings {
        table: table.clone(),
        key_attribute: ID.to_owned(),
        channel_index: Some(index.to_owned()),
        channel_attribute: CHANNEL.to_owned(),
        audiences: Vec::new(),
        connection_index: None,
        page_size: 7,
        expiry: None,
    };
    let store = DynamoStore::connect(dynamo.clone(), settings(CHANNEL_INDEX))
        .await
        .expect("connect");
    assert_eq!(store.channel_order(), ChannelOrder::ById);
    assert_eq!(
        news_after(&store, &ids[11]).await,
        ids[12..],
        "in id order, after the cursor's id"
    );

    // A table keyed by channel, then id, is read itself, in id order.
    let keyed =
        support::create_table(&dynamo, "aud-keyed", support::TableKey::ChannelAndId, true).await;
    support::put_rows(&dynamo, &keyed, &rows).await;
    let mut keyed_settings = settings(CHANNEL_INDEX);
    keyed_settings.table = keyed;
    let store = DynamoStore::connect(dynamo.clone(), keyed_settings)
        .await
        .expect("connect");
    assert_eq!(store.channel_order(), ChannelOrder::ById);
    assert_eq!(news_after(&store, &ids[24]).await, ids[25..]);

    // A table of one row per connection is disjoint by construction.
    let plain = support::create_table(&dynamo, "aud-plain", support::TableKey::Id, true).await;
    let mut plain_settings = settings(CHANNEL_INDEX);
    plain_settings.table = plain;
    let store = DynamoStore::connect(dynamo, plain_settings)
        .await
        .expect("connect");
    assert_eq!(store.channel_order(), ChannelOrder::Disjoint);
}

/// The ids of channel "news" that `store` reads when resumed after `id`.
async fn news_after(store: &DynamoStore, id: &str) -> Vec<String> {
    let from = vec![Cursor {
        segment: 0,
        position: Some(Position::After {
            after: ConnectionId::from(id),
        }),
    }];
    store
        .pages(&AudienceQuery::Channel("news".into()), Some(from))
        .map(|page| page.expect("a page").connections)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .flatten()
        .map(|c| c.id.to_string())
        .collect()
}

#[tokio::test]
async fn sigterm_mid_merge_hands_on_a_continuation_that_resumes_after_an_id() {
    let mut rig = Rig::with_gateway((ID, Some(CHANNEL)), &indexes(Some(ID)), |a| {
        a.latency_ms = 40;
        a.keep_stale = true;
    })
    .await;
    rig.slow_to_cut();
    let clients = rig.connect(30, Some("a")).await;
    let live: BTreeSet<String> = clients.ids().into_iter().collect();
    // Half the clients are in b too; 300 long-gone connections in a, b and c.
    let mut rows: Vec<Vec<(&str, String)>> = live
        .iter()
        .step_by(2)
        .map(|id| vec![(ID, id.clone()), (CHANNEL, "b".to_owned())])
        .collect();
    for id in support::ids("gone", 300) {
        for channel in ["a", "b", "c"] {
            rows.push(vec![(ID, id.clone()), (CHANNEL, channel.to_owned())]);
        }
    }
    support::put_rows(&rig.dynamo, &rig.table, &rows).await;
    rig.send_raw(r#"{"id":"long","data":"merged","channels":["a","b","c"]}"#)
        .await;

    Stack::interrupt(rig.worker_under_way(100).await, "long").await;

    let body = rig.the_job_back().await;
    assert_eq!(
        body["channels"],
        serde_json::json!(["a", "b", "c"]),
        "{body}"
    );
    let after = body["resume"][0]["position"]["after"]
        .as_str()
        .unwrap_or_else(|| panic!("a continuation after an id: {body}"))
        .to_owned();
    // What is left after the cursor may be gone rows only: a new worker
    // whose every answer is 410 cannot tell that from an endpoint of
    // another API, so it retries the job until another job's delivery has
    // proven the endpoint.
    let one_live = live.iter().next().unwrap().clone();
    rig.send_raw(
        &serde_json::json!({"id": "proof", "data": "p", "connections": [one_live]}).to_string(),
    )
    .await;
    rig.env.push(("FANOUT_JOB_RETRY_BASE".into(), "0s".into()));
    rig.env.push(("FANOUT_JOB_RETRY_MAX".into(), "0s".into()));
    let mut run = rig.run_until_idle().await;
    for _ in 0..4 {
        if support::counts(&rig.sqs, &rig.queue.url).await == (0, 0) {
            break;
        }
        run = rig.run_until_idle().await;
    }
    let report = run.report("long");
    assert_eq!(report["status"], "done", "{report}");
    let members = 30 + 300;
    let posts = rig.gateway.stats().await.posts;
    assert!(
        posts >= members,
        "every member posted to: {posts} posts for {members}"
    );
    // The continuation read only ids after its cursor, each once.
    assert!(
        count(report, "audience") < members,
        "resumed after {after}: {report}"
    );
    assert!(clients.wait_for_frames(1, Duration::from_secs(10)).await);
    let duplicates = clients
        .clients()
        .iter()
        .filter(|c| c.tally().frames() > 1 + u64::from(c.id() == one_live))
        .count();
    // At most the pages a resumed run repeats (two per segment) plus what
    // was in flight; the merge is one segment.
    assert!(
        duplicates <= 2 * 20 + 4,
        "{duplicates} clients got it twice"
    );
    let remaining = support::remaining_rows(&rig.dynamo, &rig.table).await;
    let remaining_ids: BTreeSet<String> = remaining.iter().map(|(_, id)| id.clone()).collect();
    // No live row removed. The continuation's gone rows are removed on their
    // rechecks; those the interrupted worker found gone are left, their
    // rechecks gone with it (a row left, never a live one removed), for a
    // later broadcast.
    assert!(live.is_subset(&remaining_ids), "no live row removed");
    let left_gone = remaining_ids.difference(&live).count();
    assert!(
        remaining_ids
            .difference(&live)
            .all(|id| id.starts_with("gone-"))
            && left_gone < 300,
        "{left_gone} gone rows left"
    );
    let live_rows = remaining.iter().filter(|(_, id)| live.contains(id)).count();
    assert_eq!(live_rows, 30 + 15, "the live ones' rows in a and b");
    assert_eq!(support::counts(&rig.sqs, &rig.queue.url).await, (0, 0));
}

#[tokio::test]
async fn a_list_of_users_reports_which_were_reached_and_the_producer_can_fall_back_for_the_rest() {
    let mut rig = Rig::new((ID, None), &indexes(None), true).await;
    let reports =
        support::create_queue(&rig.sqs, "aud-reports", &support::QueueSpec::default()).await;
    rig.set("FANOUT_REPORT_QUEUE_URL", &reports.url);
    // A gone connection is final at once: no recheck after the window.
    rig.set("FANOUT_CONNECT_WINDOW", "1s");
    let mut clients = rig.connect(20, None).await;
    let ids = clients.ids();
    // u-1 has two live connections; u-2 one that dropped (its row stays,
    // the endpoint answers 410); u-3 none; u-4 a live one.
    for (n, user) in [(3, "u-1"), (11, "u-1"), (5, "u-2"), (8, "u-4")] {
        rig.set_user(&ids[n], user).await;
    }
    clients.drop_ids(&[ids[5].clone()]).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    rig.send_raw(
        r#"{"v":2,"id":"order-77-shipped","data":"shipped","to":{"user":["u-1","u-2","u-3","u-4"]}}"#,
    )
    .await;
    let run = rig.run_until_idle().await;
    assert_eq!(count(run.report("order-77-shipped"), "delivered"), 3);
    let received = support::receive_all(&rig.sqs, &reports.url).await;
    let [report] = &received[..] else {
        panic!("one report: {}", run.stdout)
    };
    let report: serde_json::Value = serde_json::from_str(&report.body).unwrap();
    assert_eq!(report["status"], "done", "{report}");
    assert_eq!(report["reached"], 2, "{report}");
    assert_eq!(
        report["unreached"],
        serde_json::json!(["u-2", "u-3"]),
        "{report}"
    );
    for n in [3, 11, 8] {
        let client = &clients.clients()[n];
        assert_eq!(client.tally().text_count("shipped"), 1, "{}", client.id());
    }
    rig.0.close(clients).await;
}
