//! The WebSocket clients library and `fanout clients`' run loop against a
//! real in-process gateway (and the DynamoDB emulator behind it).

use fanout_testkit::local_support;
use fanout_testkit::support;

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use fanout_dev::clients::{self, ClientEnd, ClientsArgs, Summary, Swarm};
use futures::StreamExt;
use local_support::{TestGateway, eventually};

#[tokio::test]
async fn counts_frames_per_client_and_finds_duplicates() {
    let gw = TestGateway::start(|_| {}).await;
    let swarm = gw.swarm(10).await;
    let ids = swarm.ids();
    assert_eq!(ids.len(), 10);
    for (n, id) in ids.iter().enumerate() {
        gw.post(id, "hello").await;
        if n % 2 == 0 {
            gw.post(id, vec![0xff, n as u8]).await;
        }
    }
    assert!(swarm.wait_for_frames(1, Duration::from_secs(5)).await);
    eventually("every frame arrived", || async {
        swarm.summary(None).frames == 15
    })
    .await;
    let summary = swarm.summary(Some(2));
    assert_eq!((summary.clients, summary.live), (10, 10));
    assert_eq!((summary.text_frames, summary.binary_frames), (10, 5));
    assert_eq!((summary.min_per_client, summary.max_per_client), (1, 2));
    assert_eq!(
        (
            summary.clients_with_nothing,
            summary.clients_with_duplicates
        ),
        (0, 0)
    );
    assert_eq!(
        summary.ok,
        Some(false),
        "odd clients got one frame, not two"
    );
    assert_eq!(summary.payloads[0].preview, "hello");
    assert_eq!(summary.payloads[0].clients, 10);
    let first = &swarm.clients()[0].tally();
    assert_eq!(
        (first.text_count("hello"), first.binary_count(&[0xff, 0])),
        (1, 1)
    );

    gw.post(&ids[3], "hello").await;
    eventually("the duplicate arrived", || async {
        swarm.summary(None).clients_with_duplicates == 1
    })
    .await;
    let summary = swarm.close(None).await;
    assert_eq!(summary.duplicate_ids, [ids[3].clone()]);
    assert_eq!(summary.live, 10);
}

#[tokio::test]
async fn clients_in_a_channel_get_rows_with_that_channel() {
    let gw = TestGateway::start(|_| {}).await;
    let swarm = Swarm::connect(&gw.ws_url(), 3, Some("news"), 3)
        .await
        .expect("connect");
    for id in swarm.ids() {
        let row = gw.row(&id).await.expect("row");
        assert_eq!(row["channel"], AttributeValue::S("news".into()));
    }
    let summary = swarm.close(None).await;
    assert_eq!(
        (
            summary.clients,
            summary.frames,
            summary.clients_with_nothing
        ),
        (3, 0, 3)
    );
}

#[tokio::test]
async fn an_abrupt_drop_leaves_a_stale_row_with_keep_stale() {
    let gw = TestGateway::start(|a| a.keep_stale = true).await;
    let mut swarm = gw.swarm(5).await;
    let dropped = swarm.drop_abruptly(2).await;
    assert_eq!(dropped.len(), 2);
    for id in &dropped {
        eventually("the dropped client is gone", || gw.answers_gone(id)).await;
        assert!(gw.row(id).await.is_some(), "its row went stale");
    }
    let live: Vec<String> = swarm
        .ids()
        .into_iter()
        .filter(|id| !dropped.contains(id))
        .collect();
    for id in &live {
        gw.post(id, "still here").await;
    }
    assert!(swarm.wait_for_frames(1, Duration::from_secs(5)).await);
    let ends: Vec<ClientEnd> = swarm.clients().iter().map(|c| c.end()).collect();
    assert_eq!(ends.iter().filter(|f| **f == ClientEnd::Dropped).count(), 2);
    let summary = swarm.close(Some(1)).await;
    assert_eq!(
        (summary.live, summary.dropped, summary.ok),
        (3, 2, Some(true))
    );
}

#[tokio::test]
async fn an_abrupt_drop_without_keep_stale_removes_the_row() {
    let gw = TestGateway::start(|_| {}).await;
    let mut swarm = gw.swarm(2).await;
    let dropped = swarm.drop_abruptly(1).await;
    eventually("the row is removed", || async {
        gw.row(&dropped[0]).await.is_none()
    })
    .await;
    let kept = swarm
        .ids()
        .into_iter()
        .find(|id| *id != dropped[0])
        .expect("one left");
    assert!(gw.row(&kept).await.is_some());
}

#[tokio::test]
async fn a_client_closed_by_the_gateway_is_counted_as_such() {
    let gw = TestGateway::start(|_| {}).await;
    let swarm = gw.swarm(2).await;
    let ids = swarm.ids();
    gw.apigw
        .delete_connection()
        .connection_id(&ids[0])
        .send()
        .await
        .expect("delete");
    eventually("the client saw the close", || async {
        swarm.clients()[0].end() == ClientEnd::ClosedByPeer
    })
    .await;
    let summary = swarm.close(None).await;
    assert_eq!((summary.live, summary.closed_by_peer), (1, 1));
}

#[tokio::test]
async fn the_cli_loop_writes_ready_and_summary_files() {
    let gw = TestGateway::start(|a| a.keep_stale = true).await;
    let dir = std::env::temp_dir().join(support::unique("fanout-clients"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ready = dir.join("ready.json");
    let summary_file = dir.join("summary.json");
    let args = ClientsArgs {
        url: gw.ws_url(),
        count: 6,
        channel: Some("sports".into()),
        drop: 2,
        duration: Some(Duration::from_secs(30)),
        expect_frames: Some(1),
        ready_file: Some(ready.clone()),
        summary_file: Some(summary_file.clone()),
        connect_concurrency: 3,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(clients::run(args, async {
        let _ = stopped.await;
    }));
    eventually("the ready file", || async { ready.exists() }).await;
    let ids: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).expect("read")).expect("JSON");
    let live: Vec<String> = serde_json::from_value(ids["live"].clone()).expect("live ids");
    let dropped: Vec<String> = serde_json::from_value(ids["dropped"].clone()).expect("dropped ids");
    assert_eq!((live.len(), dropped.len()), (4, 2));
    for id in &live {
        gw.post(id, "to the live ones").await;
        assert_eq!(
            gw.row(id).await.expect("row")["channel"],
            AttributeValue::S("sports".into())
        );
    }
    // Give the frames time to land before the summary is taken.
    eventually("all delivered", || async {
        gw.stats().await.delivered == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).expect("stop the clients");
    let summary = run.await.expect("task").expect("clients run");
    let written: Summary =
        serde_json::from_str(&std::fs::read_to_string(&summary_file).expect("read")).expect("JSON");
    assert_eq!(written, summary);
    assert_eq!((summary.clients, summary.live, summary.dropped), (6, 4, 2));
    assert_eq!(summary.ok, Some(true));
    let _ = std::fs::remove_dir_all(&dir);
}

/// 1,000 real clients, 5 POSTs each from the SDK client, 64 at a time:
/// every client gets every payload exactly once, and the timings go to the
/// test output (`--nocapture`) for the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_each_get_every_post_exactly_once() {
    const CLIENTS: usize = 1000;
    const POSTS: usize = 5;
    let gw = TestGateway::start(|_| {}).await;
    let started = Instant::now();
    let swarm = Swarm::connect(&gw.ws_url(), CLIENTS, None, 64)
        .await
        .expect("connect");
    let connected = started.elapsed();
    let ids = swarm.ids();
    let started = Instant::now();
    let sends = futures::stream::iter(ids.iter().flat_map(|id| (0..POSTS).map(move |n| (id, n))))
        .map(|(id, n)| gw.post(id, format!("message {n}")))
        .buffer_unordered(64)
        .count()
        .await;
    assert_eq!(sends, CLIENTS * POSTS);
    assert!(
        swarm
            .wait_for_frames(POSTS as u64, Duration::from_secs(30))
            .await
    );
    let sent = started.elapsed();
    let summary = swarm.close(Some(POSTS as u64)).await;
    println!(
        "{CLIENTS} clients connected in {connected:?}; {sends} POSTs delivered in {sent:?} ({:.0}/s)",
        sends as f64 / sent.as_secs_f64()
    );
    assert_eq!(summary.ok, Some(true), "{summary:?}");
    assert_eq!(
        (summary.min_per_client, summary.max_per_client),
        (POSTS as u64, POSTS as u64)
    );
    assert_eq!(summary.payloads.len(), POSTS);
    assert!(summary.payloads.iter().all(|p| p.clients == CLIENTS));
}
