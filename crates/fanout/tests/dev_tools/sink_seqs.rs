//! `fanout-dev gateway --sink` with versioned payloads, through the SDK's
//! own client: `@stats/seqs` lists when each id's newest `seq` arrived and
//! `@stats` sums it up, so a test can judge how stale a stream of updates
//! left an audience.

use fanout_testkit::local_support::TestGateway;

#[tokio::test]
async fn the_sink_records_when_each_ids_newest_seq_arrived() {
    let gw = TestGateway::start(|args| args.sink = true).await;
    let before = fanout_dev::gateway::registry::now_ms();
    for (id, seq) in [("a", 1), ("a", 3), ("a", 2), ("b", 2), ("a", 3)] {
        gw.post(id, format!(r#"{{"seq": {seq}, "score": "2-1"}}"#))
            .await;
    }
    gw.post("a", "not a version").await;
    gw.post("c", r#"{"score": "2-1"}"#).await;
    let after = fanout_dev::gateway::registry::now_ms();

    let seqs = gw.seqs().await;
    assert_eq!(
        seqs.ids.keys().collect::<Vec<_>>(),
        ["a", "b"],
        "only ids that had a seq"
    );
    let a = &seqs.ids["a"];
    assert_eq!(a.received, 4, "every post with a seq, older ones too");
    assert_eq!(
        a.raised.iter().map(|&(seq, _)| seq).collect::<Vec<_>>(),
        [1, 3],
        "only the rises"
    );
    assert!(
        a.raised
            .iter()
            .all(|&(_, at)| (before..=after).contains(&at))
    );
    let stats = gw.stats().await;
    assert_eq!(
        (
            stats.sink_seq_ids,
            stats.sink_seq_newest,
            stats.sink_seq_holding_newest
        ),
        (2, 3, 1)
    );
    assert_eq!(stats.sink_ids, 3, "the sink's other counters as before");
    gw.shutdown().await;
}

#[tokio::test]
async fn without_the_sink_nothing_is_recorded() {
    let gw = TestGateway::start(|_| {}).await;
    assert!(gw.answers_gone("a").await);
    assert!(gw.seqs().await.ids.is_empty());
    gw.shutdown().await;
}
