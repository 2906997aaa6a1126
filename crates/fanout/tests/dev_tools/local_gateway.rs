//! `fanout-dev gateway` against its real peers: the SDK's own
//! apigatewaymanagement client, real WebSocket clients, and the DynamoDB
//! emulator for the `$connect`/`$disconnect` rows.

use fanout_testkit::local_support;
use fanout_testkit::support;

use std::time::{Duration, Instant};

use aws_sdk_apigatewaymanagement::error::SdkError;
use aws_sdk_apigatewaymanagement::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use futures::SinkExt;
use local_support::{TestGateway, USER_AGENT, eventually, next_frame, raw_http};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn unknown_and_closed_ids_are_typed_gone_exceptions() {
    let gw = TestGateway::start(|_| {}).await;
    assert!(gw.answers_gone("L0SM9cOFvHcCIhw=").await, "unknown id");

    let (mut socket, id) = gw.connect(None).await;
    socket.close(None).await.expect("close");
    drop(socket);
    eventually("a closed connection answers 410", || gw.answers_gone(&id)).await;
    let err = gw
        .apigw
        .get_connection()
        .connection_id(&id)
        .send()
        .await
        .expect_err("gone");
    assert!(err.into_service_error().is_gone_exception());
    assert_delete_is_gone(&gw, &id).await;
}

#[tokio::test]
async fn get_connection_is_parsed_by_the_sdk() {
    let gw = TestGateway::start(|_| {}).await;
    let before = std::time::SystemTime::now();
    let (_socket, id) = gw.connect(None).await;
    let got = gw
        .apigw
        .get_connection()
        .connection_id(&id)
        .send()
        .await
        .expect("get_connection");
    let connected = got.connected_at().expect("ConnectedAt");
    let last_active = got.last_active_at().expect("LastActiveAt");
    let before_ms = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(connected.to_millis().unwrap() >= before_ms - 1);
    assert!(last_active >= connected);
    let identity = got.identity().expect("Identity");
    assert_eq!(identity.source_ip(), Some("127.0.0.1"));
    assert_eq!(identity.user_agent(), Some(USER_AGENT));
}

#[tokio::test]
async fn posts_arrive_as_text_or_binary_frames_whatever_the_id_holds() {
    let gw = TestGateway::start(|_| {}).await;
    // Ids may hold '+', '/' and '=': twenty clients make it near certain
    // that the SDK's percent-encoding of them is exercised.
    for n in 0..20 {
        let (mut socket, id) = gw.connect(None).await;
        let text = format!("héllo {n}");
        gw.post(&id, text.clone()).await;
        assert_eq!(next_frame(&mut socket).await, Message::text(text));
        let binary = vec![0xff, 0x00, n as u8, 0xfe];
        gw.post(&id, binary.clone()).await;
        assert_eq!(next_frame(&mut socket).await, Message::binary(binary));
    }
}

#[tokio::test]
async fn payloads_over_128_kib_are_refused_with_413() {
    let gw = TestGateway::start(|_| {}).await;
    let (mut socket, id) = gw.connect(None).await;
    let post_bytes = |size: usize| {
        gw.apigw
            .post_to_connection()
            .connection_id(&id)
            .data(Blob::new(vec![b'a'; size]))
            .send()
    };
    let err = post_bytes(131_073).await.expect_err("oversize");
    assert!(err.into_service_error().is_payload_too_large_exception());
    post_bytes(131_072)
        .await
        .expect("exactly the limit is fine");
    let Message::Text(text) = next_frame(&mut socket).await else {
        panic!("text frame expected")
    };
    assert_eq!(text.len(), 131_072);
}

#[tokio::test]
async fn requests_without_sigv4_for_execute_api_are_forbidden() {
    let gw = TestGateway::start(|_| {}).await;
    let (_socket, id) = gw.connect(None).await;
    let path = format!(
        "/{}/@connections/{}",
        gw.stage,
        percent_encoding::utf8_percent_encode(&id, percent_encoding::NON_ALPHANUMERIC)
    );
    for method in ["POST", "GET", "DELETE"] {
        let (status, headers, body) = raw_http(gw.addr, method, &path, &[], b"x").await;
        assert_eq!(status, 403, "{method}: {body}");
        assert!(headers.contains(&("x-amzn-errortype".into(), "ForbiddenException".into())));
        let wrong_service = "AWS4-HMAC-SHA256 Credential=test/20261127/us-east-1/dynamodb/aws4_request, SignedHeaders=host, Signature=0";
        let (status, _, _) = raw_http(
            gw.addr,
            method,
            &path,
            &[("Authorization", wrong_service)],
            b"x",
        )
        .await;
        assert_eq!(status, 403, "{method} signed for another service");
    }
    // The connection is untouched.
    gw.apigw
        .get_connection()
        .connection_id(&id)
        .send()
        .await
        .expect("still there");
    // Only POSTs are counted: the unsigned one and the one for dynamodb.
    assert_eq!(gw.stats().await.forbidden, 2);
}

#[tokio::test]
async fn delete_closes_the_socket_and_removes_the_row() {
    let gw = TestGateway::start(|_| {}).await;
    let (mut socket, id) = gw.connect(None).await;
    assert!(gw.row(&id).await.is_some());
    gw.apigw
        .delete_connection()
        .connection_id(&id)
        .send()
        .await
        .expect("delete");
    assert!(matches!(next_frame(&mut socket).await, Message::Close(_)));
    eventually("the row is removed", || async {
        gw.row(&id).await.is_none()
    })
    .await;
    assert_delete_is_gone(&gw, &id).await;
}

#[tokio::test]
async fn connect_writes_the_row_with_its_channel_and_disconnect_removes_it() {
    let gw = TestGateway::start(|_| {}).await;
    let (socket, id) = gw.connect(Some("sports news")).await;
    let row = gw
        .row(&id)
        .await
        .expect("row written before the id is known");
    assert_eq!(row["connectionId"], AttributeValue::S(id.clone()));
    assert_eq!(row["channel"], AttributeValue::S("sports news".into()));
    let AttributeValue::N(at) = &row["connectedAt"] else {
        panic!("connectedAt should be a number")
    };
    assert!(at.parse::<u64>().expect("epoch ms") > 1_700_000_000_000);

    let (_plain, plain_id) = gw.connect(None).await;
    assert!(
        !gw.row(&plain_id)
            .await
            .expect("row")
            .contains_key("channel")
    );

    drop(socket); // abrupt: no close frame
    eventually("the row is removed", || async {
        gw.row(&id).await.is_none()
    })
    .await;
    assert!(gw.row(&plain_id).await.is_some());
}

#[tokio::test]
async fn keep_stale_leaves_rows_of_gone_connections() {
    let gw = TestGateway::start(|a| a.keep_stale = true).await;
    let (socket, id) = gw.connect(None).await;
    drop(socket);
    eventually("the connection is gone", || gw.answers_gone(&id)).await;
    assert!(gw.row(&id).await.is_some(), "the stale row stays");
}

#[tokio::test]
async fn shutdown_closes_every_socket() {
    let gw = TestGateway::start(|_| {}).await;
    let (mut socket, id) = gw.connect(None).await;
    let dynamo = gw.dynamo.clone();
    let table = gw.table.clone();
    gw.shutdown().await;
    assert!(matches!(next_frame(&mut socket).await, Message::Close(_)));
    let row = dynamo
        .get_item()
        .table_name(table)
        .key("connectionId", AttributeValue::S(id))
        .consistent_read(true)
        .send()
        .await
        .expect("get_item");
    assert!(
        row.item.is_none(),
        "$disconnect ran before shutdown returned"
    );
}

#[tokio::test]
async fn throttle_answers_429_past_the_rate() {
    let gw = TestGateway::start(|a| a.throttle_rps = std::num::NonZeroU32::new(5)).await;
    let (_socket, id) = gw.connect(None).await;
    let mut delivered = 0;
    let mut throttled = 0;
    for _ in 0..30 {
        match gw
            .apigw
            .post_to_connection()
            .connection_id(&id)
            .data(Blob::new("x"))
            .send()
            .await
        {
            Ok(_) => delivered += 1,
            Err(e) => {
                assert!(e.into_service_error().is_limit_exceeded_exception());
                throttled += 1;
            }
        }
    }
    // 30 quick calls: the burst of 5, plus what a second at 5/s refills.
    assert!((5..=15).contains(&delivered), "delivered {delivered}");
    let stats = gw.stats().await;
    assert_eq!((stats.delivered, stats.throttled), (delivered, throttled));
}

#[tokio::test]
async fn fail_percent_answers_500_and_delivers_nothing_for_that_share() {
    let gw = TestGateway::start(|a| a.fail_percent = 50).await;
    let (mut socket, id) = gw.connect(None).await;
    let mut ok = Vec::new();
    for n in 0..10 {
        match gw
            .apigw
            .post_to_connection()
            .connection_id(&id)
            .data(Blob::new(n.to_string()))
            .send()
            .await
        {
            Ok(_) => ok.push(n),
            Err(SdkError::ServiceError(ctx)) => assert_eq!(ctx.raw().status().as_u16(), 500),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok.len(), 5);
    for n in ok {
        assert_eq!(next_frame(&mut socket).await, Message::text(n.to_string()));
    }
    // Nothing else was delivered.
    socket
        .send(Message::text(r#"{"action":"whoami"}"#))
        .await
        .expect("whoami");
    assert_eq!(
        next_frame(&mut socket).await,
        Message::text(format!(r#"{{"connectionId":"{id}"}}"#))
    );
}

#[tokio::test]
async fn latency_delays_each_post_and_stats_count_posts_in_flight() {
    let gw = TestGateway::start(|a| a.latency_ms = 300).await;
    let (_socket, id) = gw.connect(None).await;
    let started = Instant::now();
    let posts = (0..8).map(|_| {
        gw.apigw
            .post_to_connection()
            .connection_id(&id)
            .data(Blob::new("x"))
            .send()
    });
    for result in futures::future::join_all(posts).await {
        result.expect("post");
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    let stats = gw.stats().await;
    assert_eq!((stats.posts, stats.delivered, stats.in_flight), (8, 8, 0));
    assert!(
        stats.max_in_flight >= 2 && stats.max_in_flight <= 8,
        "{stats:?}"
    );
}

#[tokio::test]
async fn create_table_makes_a_table_the_worker_can_use() {
    let table = support::unique("created");
    let name = table.clone();
    let gw = TestGateway::start(move |args| {
        args.table = name;
        args.create_table = true;
    })
    .await;
    let (_socket, id) = gw.connect(Some("news")).await;
    let row = gw.row(&id).await.expect("the $connect row");
    assert_eq!(row["channel"], AttributeValue::S("news".into()));
    let described = gw
        .dynamo
        .describe_table()
        .table_name(&table)
        .send()
        .await
        .expect("the table exists");
    let indexes: Vec<_> = described
        .table()
        .map(|t| t.global_secondary_indexes())
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i.index_name())
        .collect();
    assert_eq!(indexes, ["by-channel"]);
}

/// DELETE @connections/{id} answers 410, typed by the SDK as GoneException.
async fn assert_delete_is_gone(gw: &TestGateway, id: &str) {
    let err = gw
        .apigw
        .delete_connection()
        .connection_id(id)
        .send()
        .await
        .expect_err("gone");
    assert!(err.into_service_error().is_gone_exception());
}
