//! `DynamoStore` against the DynamoDB emulator (dynalite): pages that cover
//! every row exactly once (whole, resumed, in parallel segments, by channel,
//! explicit), removal by the full row key, and the error mapping.

use fanout_testkit::support;

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use aws_sdk_dynamodb::types::AttributeValue;
use fanout_aws::{DynamoStore, TableSettings};
use fanout_core::connection::{Connection, ConnectionId};
use fanout_core::store::{AudienceQuery, ConnectionStore, Cursor, Page, Position, StoreError};
use futures::StreamExt;
use support::{CHANNEL, CHANNEL_INDEX, ID, TableKey, create_table, ids, put_connections};

fn settings(table: &str, page_size: u32, channel_index: bool) -> TableSettings {
    TableSettings {
        table: table.to_owned(),
        key_attribute: ID.to_owned(),
        channel_index: channel_index.then(|| CHANNEL_INDEX.to_owned()),
        channel_attribute: CHANNEL.to_owned(),
        audiences: Vec::new(),
        connection_index: None,
        page_size,
        expiry: None,
    }
}

async fn store(settings: TableSettings) -> DynamoStore {
    let config = support::sdk_config().await;
    DynamoStore::connect(fanout_aws::clients::dynamodb_client(&config), settings)
        .await
        .expect("connect to the test table")
}

async fn all_pages(
    store: &DynamoStore,
    audience: &AudienceQuery,
    from: Option<Vec<Cursor>>,
) -> Vec<Page> {
    store
        .pages(audience, from)
        .map(|page| page.expect("a page"))
        .collect()
        .await
}

/// The ids of the pages, asserting none appears twice.
fn ids_once(pages: &[Page]) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for connection in pages.iter().flat_map(|p| &p.connections) {
        assert!(
            seen.insert(connection.id.to_string()),
            "{} read twice",
            connection.id
        );
    }
    seen
}

fn set(ids: &[String]) -> BTreeSet<String> {
    ids.iter().cloned().collect()
}

/// The connections of the pages, in order.
fn connections(pages: Vec<Page>) -> Vec<Connection> {
    pages.into_iter().flat_map(|p| p.connections).collect()
}

/// An explicit audience of these ids.
fn listed(rows: &[String]) -> Vec<ConnectionId> {
    rows.iter()
        .map(|id| ConnectionId::from(id.as_str()))
        .collect()
}

/// A new table holding `rows` (in `channel`, if named), and a store that
/// reads it `page_size` rows a page.
struct Filled {
    ddb: aws_sdk_dynamodb::Client,
    table: String,
    rows: Vec<String>,
    store: DynamoStore,
}

impl Filled {
    async fn new(
        name: &str,
        key: TableKey,
        rows: Vec<String>,
        channel: Option<&str>,
        page_size: u32,
    ) -> Self {
        let ddb = support::dynamodb().await;
        let table = create_table(&ddb, name, key, false).await;
        put_connections(&ddb, &table, &rows, channel).await;
        let store = store(settings(&table, page_size, false)).await;
        Self {
            ddb,
            table,
            rows,
            store,
        }
    }
}

#[tokio::test]
async fn small_pages_cover_every_row_exactly_once() {
    let t = Filled::new("pages", TableKey::Id, ids("c", 53), None, 10).await;

    let pages = all_pages(&t.store, &AudienceQuery::All { segments: 1 }, None).await;
    assert_eq!(ids_once(&pages), set(&t.rows));
    assert!(pages.len() >= 6, "{} pages", pages.len());
    assert!(pages.iter().all(|p| p.connections.len() <= 10));
    let (last, rest) = pages.split_last().expect("pages");
    assert_eq!(last.next.position, None);
    assert!(rest.iter().all(|p| p.next.position.is_some()));
    // Read from the table, every connection carries its row key.
    assert!(
        pages
            .iter()
            .flat_map(|p| &p.connections)
            .all(|c| c.key.is_some())
    );
}

#[tokio::test]
async fn a_read_resumes_after_the_last_page_handed_out() {
    let t = Filled::new("resume", TableKey::Id, ids("c", 40), None, 7).await;
    let audience = AudienceQuery::All { segments: 1 };

    let first: Vec<Page> = t
        .store
        .pages(&audience, None)
        .take(2)
        .map(|p| p.expect("a page"))
        .collect()
        .await;
    let cursor = first[1].next.clone();
    assert!(cursor.position.is_some());
    let rest = all_pages(&t.store, &audience, Some(vec![cursor])).await;

    let mut pages = first;
    pages.extend(rest);
    assert_eq!(ids_once(&pages), set(&t.rows));

    // A finished segment's cursor resumes to nothing.
    let done = Cursor {
        segment: 0,
        position: None,
    };
    assert!(
        all_pages(&t.store, &audience, Some(vec![done]))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn the_segments_of_a_split_broadcast_share_the_table_exactly() {
    let t = Filled::new("split", TableKey::Id, ids("s", 150), None, 7).await;

    let mut seen = Vec::new();
    for index in 0..3 {
        let pages = all_pages(&t.store, &AudienceQuery::Segment { index, total: 3 }, None).await;
        assert!(pages.iter().all(|p| p.next.segment == index));
        let share = ids_once(&pages);
        assert!(!share.is_empty(), "segment {index} of 3 holds rows");
        seen.extend(share);
    }
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), t.rows.len(), "no row in two segments");
    assert_eq!(unique, set(&t.rows));
}

#[tokio::test]
async fn four_segments_cover_every_row_exactly_once() {
    let t = Filled::new("segments", TableKey::Id, ids("c", 200), None, 9).await;

    let pages = all_pages(&t.store, &AudienceQuery::All { segments: 4 }, None).await;
    assert_eq!(ids_once(&pages), set(&t.rows));
    let segments: BTreeSet<u32> = pages.iter().map(|p| p.next.segment).collect();
    assert_eq!(segments, BTreeSet::from([0, 1, 2, 3]));
    for segment in 0..4 {
        let last = pages
            .iter()
            .rfind(|p| p.next.segment == segment)
            .expect("a page of the segment");
        assert_eq!(last.next.position, None, "segment {segment} ends");
    }

    // Resuming with segment 1 done and the others from the start reads
    // everything but segment 1's rows.
    let segment_1: BTreeSet<String> = pages
        .iter()
        .filter(|p| p.next.segment == 1)
        .flat_map(|p| p.connections.iter().map(|c| c.id.to_string()))
        .collect();
    let resumed = all_pages(
        &t.store,
        &AudienceQuery::All { segments: 4 },
        Some(vec![Cursor {
            segment: 1,
            position: None,
        }]),
    )
    .await;
    let expected: BTreeSet<String> = set(&t.rows).difference(&segment_1).cloned().collect();
    assert_eq!(ids_once(&resumed), expected);

    // Every segment done: nothing left to read.
    let all_done = (0..4)
        .map(|segment| Cursor {
            segment,
            position: None,
        })
        .collect();
    let none = all_pages(
        &t.store,
        &AudienceQuery::All { segments: 4 },
        Some(all_done),
    )
    .await;
    assert!(none.is_empty());
}

#[tokio::test]
async fn a_channel_audience_reads_only_that_channel() {
    let ddb = support::dynamodb().await;
    let table = create_table(&ddb, "channel", TableKey::Id, true).await;
    let news = ids("news", 30);
    let sport = ids("sport", 20);
    put_connections(&ddb, &table, &news, Some("news")).await;
    put_connections(&ddb, &table, &sport, Some("sport")).await;
    put_connections(&ddb, &table, &ids("none", 5), None).await;
    let store = store(settings(&table, 7, true)).await;
    let audience = AudienceQuery::Channel("news".to_owned());

    let pages = all_pages(&store, &audience, None).await;
    assert_eq!(ids_once(&pages), set(&news));
    assert!(pages.len() >= 5);

    // And it resumes from a cursor inside the index.
    let cursor = pages[1].next.clone();
    let mut resumed: Vec<Page> = pages[..2].to_vec();
    resumed.extend(all_pages(&store, &audience, Some(vec![cursor])).await);
    assert_eq!(ids_once(&resumed), set(&news));
}

#[tokio::test]
async fn channel_audiences_need_an_index_that_exists() {
    let ddb = support::dynamodb().await;
    let table = create_table(&ddb, "no-index", TableKey::Id, false).await;
    let without = store(settings(&table, 10, false)).await;
    let results: Vec<_> = without
        .pages(&AudienceQuery::Channel("news".to_owned()), None)
        .collect()
        .await;
    assert!(
        matches!(results.as_slice(), [Err(StoreError::NoChannelIndex)]),
        "{results:?}"
    );

    let config = support::sdk_config().await;
    let err = DynamoStore::connect(
        fanout_aws::clients::dynamodb_client(&config),
        settings(&table, 10, true),
    )
    .await
    .expect_err("the configured index does not exist");
    assert!(err.to_string().contains(CHANNEL_INDEX), "{err}");
}

/// The first error of an audience's pages, or how many rows it read.
async fn all_pages_result(
    store: &DynamoStore,
    query: &AudienceQuery,
) -> Result<usize, fanout_core::store::StoreError> {
    use futures::TryStreamExt;
    let pages: Vec<_> = store.pages(query, None).try_collect().await?;
    Ok(pages.iter().map(|p| p.connections.len()).sum())
}

#[tokio::test]
async fn removal_on_a_composite_key_deletes_exactly_the_gone_rows() {
    // The same connection ids in two channels: two rows each.
    let t = Filled::new(
        "composite",
        TableKey::ChannelAndId,
        ids("c", 30),
        Some("news"),
        10,
    )
    .await;
    put_connections(&t.ddb, &t.table, &t.rows, Some("sport")).await;

    // A connection has two rows here, so a broadcast to everyone needs a
    // connection index: without one the store refuses to read it.
    let refused = all_pages_result(&t.store, &AudienceQuery::All { segments: 1 }).await;
    assert!(
        matches!(refused, Err(fanout_core::store::StoreError::NeedsConnectionIndex(ref why)) if why.contains("FANOUT_CONNECTION_INDEX")),
        "{refused:?}"
    );
    // The rows as a channel's Query reads them: key and id.
    let connections: Vec<Connection> = support::remaining_rows(&t.ddb, &t.table)
        .await
        .into_iter()
        .map(|(channel, id)| {
            let key = fanout_core::connection::RowKey(vec![
                (
                    CHANNEL.to_owned(),
                    fanout_core::connection::KeyValue::S(channel.unwrap()),
                ),
                (
                    ID.to_owned(),
                    fanout_core::connection::KeyValue::S(id.clone()),
                ),
            ]);
            Connection::new(id, Some(key))
        })
        .collect();
    assert_eq!(connections.len(), 60);
    // Every third row read is gone, whichever channel it sits in.
    let gone: Vec<Connection> = connections.iter().step_by(3).cloned().collect();
    let gone_rows: BTreeSet<(Option<String>, String)> = gone
        .iter()
        .map(|c| {
            let key = c.key.as_ref().expect("a row key");
            let channel = key
                .0
                .iter()
                .find(|(name, _)| name == CHANNEL)
                .map(|(_, value)| match value {
                    fanout_core::connection::KeyValue::S(s) => s.clone(),
                    other => panic!("unexpected channel {other:?}"),
                });
            (channel, c.id.to_string())
        })
        .collect();

    let before = support::remaining_rows(&t.ddb, &t.table).await;
    for batch in gone.chunks(fanout_core::store::MAX_REMOVE_BATCH) {
        let removal = t.store.remove(batch.to_vec()).await.expect("remove");
        assert!(removal.unprocessed.is_empty() && removal.skipped.is_empty());
    }
    let after = support::remaining_rows(&t.ddb, &t.table).await;
    let expected: BTreeSet<_> = before.difference(&gone_rows).cloned().collect();
    assert_eq!(after, expected);
    assert_eq!(after.len(), 60 - gone.len());
}

#[tokio::test]
async fn explicit_lists_page_resume_and_derive_keys() {
    let t = Filled::new("explicit", TableKey::Id, ids("c", 25), None, 10).await;
    let audience = AudienceQuery::Explicit(listed(&t.rows));

    let pages = all_pages(&t.store, &audience, None).await;
    let positions: Vec<_> = pages.iter().map(|p| p.next.position.clone()).collect();
    assert_eq!(
        positions,
        [Some(Position::Offset(10)), Some(Position::Offset(20)), None]
    );
    let read: Vec<String> = pages
        .iter()
        .flat_map(|p| p.connections.iter().map(|c| c.id.to_string()))
        .collect();
    assert_eq!(read, t.rows, "in list order");

    let resumed = all_pages(
        &t.store,
        &audience,
        Some(vec![Cursor {
            segment: 0,
            position: Some(Position::Offset(20)),
        }]),
    )
    .await;
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].connections.len(), 5);

    // The id is the whole key here, so a listed connection can be removed.
    let gone = pages[0].connections[..3].to_vec();
    let removal = t.store.remove(gone).await.expect("remove");
    assert!(removal.skipped.is_empty());
    let remaining = support::remaining_ids(&t.ddb, &t.table).await;
    assert_eq!(remaining, set(&t.rows[3..]));
}

#[tokio::test]
async fn listed_connections_of_a_composite_table_cannot_be_removed() {
    let t = Filled::new(
        "explicit-composite",
        TableKey::ChannelAndId,
        ids("c", 3),
        Some("news"),
        10,
    )
    .await;

    let pages = all_pages(&t.store, &AudienceQuery::Explicit(listed(&t.rows)), None).await;
    let connections = connections(pages);
    assert!(connections.iter().all(|c| c.key.is_none()));
    let removal = t.store.remove(connections.clone()).await.expect("remove");
    assert_eq!(removal.skipped, connections);
    assert_eq!(support::remaining_ids(&t.ddb, &t.table).await, set(&t.rows));
}

#[tokio::test]
async fn more_than_25_removals_in_one_call_are_refused() {
    let t = Filled::new("remove-26", TableKey::Id, ids("c", 26), None, 100).await;
    let connections =
        connections(all_pages(&t.store, &AudienceQuery::All { segments: 1 }, None).await);
    assert_eq!(connections.len(), 26);

    let err = t
        .store
        .remove(connections)
        .await
        .expect_err("26 is too many");
    assert!(matches!(err, StoreError::Rejected(_)), "{err:?}");
    assert!(err.to_string().contains("25"), "{err}");
    assert_eq!(support::remaining_ids(&t.ddb, &t.table).await, set(&t.rows));
}

#[tokio::test]
async fn a_row_without_a_string_id_is_skipped_not_fatal() {
    let ddb = support::dynamodb().await;
    let table = create_table(&ddb, "bad-row", TableKey::Id, false).await;
    // The id lives in `wsId` here; one row has it as a number, one lacks it.
    for (key, ws_id) in [
        ("k1", Some(AttributeValue::S("good-1".to_owned()))),
        ("k2", Some(AttributeValue::N("7".to_owned()))),
        ("k3", None),
        ("k4", Some(AttributeValue::S("good-2".to_owned()))),
    ] {
        let mut item = HashMap::from([(ID.to_owned(), AttributeValue::S(key.to_owned()))]);
        if let Some(value) = ws_id {
            item.insert("wsId".to_owned(), value);
        }
        ddb.put_item()
            .table_name(&table)
            .set_item(Some(item))
            .send()
            .await
            .expect("put a row");
    }
    let store = store(TableSettings {
        key_attribute: "wsId".to_owned(),
        ..settings(&table, 10, false)
    })
    .await;

    let pages = all_pages(&store, &AudienceQuery::All { segments: 1 }, None).await;
    assert_eq!(
        ids_once(&pages),
        BTreeSet::from(["good-1".to_owned(), "good-2".to_owned()])
    );
    // Read from the table, such rows are still removable by their real key.
    let gone = connections(pages);
    store.remove(gone).await.expect("remove");
    assert_eq!(
        support::remaining_ids(&ddb, &table).await,
        BTreeSet::from(["k2".to_owned(), "k3".to_owned()])
    );
}

#[tokio::test]
async fn a_missing_table_is_named() {
    let config = support::sdk_config().await;
    let missing = support::unique("missing");
    let err = DynamoStore::connect(
        fanout_aws::clients::dynamodb_client(&config),
        settings(&missing, 10, false),
    )
    .await
    .expect_err("no such table");
    match err {
        StoreError::NoSuchTable { table } => assert_eq!(table, missing),
        other => panic!("expected NoSuchTable, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_endpoint_is_unavailable_quickly() {
    let config = support::unreachable_config().await;
    let started = Instant::now();
    let err = DynamoStore::connect(
        fanout_aws::clients::dynamodb_client(&config),
        settings("connections", 10, false),
    )
    .await
    .expect_err("nothing listens");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.is_transient());
    assert!(
        started.elapsed() < support::UNREACHABLE_WITHIN,
        "took {:?}",
        started.elapsed()
    );
}

// ------------------------------------------------------------------------
// Answers no emulator gives (UnprocessedItems, throttling, 5xx), from a
// small DynamoDB stand-in on 127.0.0.1 speaking the JSON protocol.

mod stand_in {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use serde_json::{Value, json};

    /// How the stand-in answers BatchWriteItem.
    #[derive(Clone, Copy)]
    pub enum Batch {
        /// Hands back every other delete request as unprocessed.
        HalfUnprocessed,
        /// Throttles every call.
        Throttle,
        /// Fails every call with a 500.
        ServerError,
    }

    #[derive(Clone)]
    struct Peer {
        batch: Batch,
        batch_calls: Arc<AtomicUsize>,
    }

    pub const TABLE: &str = "stand-in";

    async fn answer(State(peer): State<Peer>, headers: HeaderMap, body: String) -> Response {
        let target = headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let json_response = |status: StatusCode, body: Value| {
            (
                status,
                [("content-type", "application/x-amz-json-1.0")],
                body.to_string(),
            )
                .into_response()
        };
        match target {
            "DynamoDB_20120810.DescribeTable" => json_response(
                StatusCode::OK,
                json!({"Table": {
                    "TableName": TABLE,
                    "TableStatus": "ACTIVE",
                    "KeySchema": [
                        {"AttributeName": "channel", "KeyType": "HASH"},
                        {"AttributeName": "connectionId", "KeyType": "RANGE"}
                    ],
                    "AttributeDefinitions": [
                        {"AttributeName": "channel", "AttributeType": "S"},
                        {"AttributeName": "connectionId", "AttributeType": "S"}
                    ]
                }}),
            ),
            "DynamoDB_20120810.BatchWriteItem" => {
                peer.batch_calls.fetch_add(1, Ordering::Relaxed);
                match peer.batch {
                    Batch::HalfUnprocessed => {
                        let request: Value = serde_json::from_str(&body).expect("JSON request");
                        let writes = request["RequestItems"][TABLE]
                            .as_array()
                            .cloned()
                            .unwrap_or_default();
                        let unprocessed: Vec<Value> = writes.into_iter().step_by(2).collect();
                        json_response(
                            StatusCode::OK,
                            json!({"UnprocessedItems": {TABLE: unprocessed}}),
                        )
                    }
                    Batch::Throttle => json_response(
                        StatusCode::BAD_REQUEST,
                        json!({
                            "__type": "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
                            "message": "The level of configured provisioned throughput for the table was exceeded."
                        }),
                    ),
                    Batch::ServerError => json_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        json!({
                            "__type": "com.amazonaws.dynamodb.v20120810#InternalServerError",
                            "message": "Internal server error"
                        }),
                    ),
                }
            }
            other => json_response(
                StatusCode::BAD_REQUEST,
                json!({"__type": "UnknownOperationException", "message": other}),
            ),
        }
    }

    /// Starts the stand-in; returns its endpoint and its BatchWriteItem count.
    pub async fn start(batch: Batch) -> (String, Arc<AtomicUsize>) {
        let batch_calls = Arc::new(AtomicUsize::new(0));
        let app = Router::new().fallback(answer).with_state(Peer {
            batch,
            batch_calls: batch_calls.clone(),
        });
        let addr = crate::serve_on_loopback(app).await;
        (format!("http://{addr}"), batch_calls)
    }
}

async fn stand_in_store(
    batch: stand_in::Batch,
) -> (DynamoStore, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let (endpoint, calls) = stand_in::start(batch).await;
    let config = support::test_config_loader()
        .endpoint_url(endpoint)
        .load()
        .await;
    let store = DynamoStore::connect(
        fanout_aws::clients::dynamodb_client(&config),
        settings(stand_in::TABLE, 10, false),
    )
    .await
    .expect("connect to the stand-in");
    (store, calls)
}

fn composite(channel: &str, id: &str) -> Connection {
    use fanout_core::connection::{KeyValue, RowKey};
    Connection {
        id: ConnectionId::from(id),
        // Deliberately not in schema order: keys match whatever the order.
        key: Some(RowKey(vec![
            (ID.to_owned(), KeyValue::S(id.to_owned())),
            (CHANNEL.to_owned(), KeyValue::S(channel.to_owned())),
        ])),
        started_ms: None,
    }
}

#[tokio::test]
async fn unprocessed_items_map_back_to_their_connections() {
    let (store, calls) = stand_in_store(stand_in::Batch::HalfUnprocessed).await;
    let gone: Vec<Connection> = (0..6)
        .map(|i| composite(if i % 2 == 0 { "news" } else { "sport" }, &format!("c{i}")))
        .collect();
    let unkeyed = Connection {
        id: ConnectionId::from("listed"),
        key: None,
        started_ms: None,
    };
    let mut batch = gone.clone();
    batch.push(unkeyed.clone());

    let removal = store.remove(batch).await.expect("remove");
    // The stand-in hands back requests 0, 2 and 4, in the order sent.
    let mut unprocessed: Vec<String> = removal
        .unprocessed
        .iter()
        .map(|c| c.id.to_string())
        .collect();
    unprocessed.sort();
    assert_eq!(unprocessed, ["c0", "c2", "c4"]);
    assert_eq!(removal.skipped, [unkeyed]);
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// The error one removal meets at a stand-in answering `batch`, and how
/// many BatchWriteItem calls the stand-in saw.
async fn a_refused_removal(batch: stand_in::Batch) -> (StoreError, usize) {
    let (store, calls) = stand_in_store(batch).await;
    let err = store
        .remove(vec![composite("news", "c1")])
        .await
        .expect_err("the stand-in refuses it");
    (err, calls.load(std::sync::atomic::Ordering::Relaxed))
}

#[tokio::test]
async fn throttling_and_server_errors_are_transient() {
    let (err, calls) = a_refused_removal(stand_in::Batch::Throttle).await;
    assert!(matches!(err, StoreError::Throttled(_)), "{err:?}");
    // The SDK's standard retries stay on for DynamoDB.
    assert!(calls > 1);

    let (err, _) = a_refused_removal(stand_in::Batch::ServerError).await;
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.is_transient());
}

/// The delete of a row certainly gone by age holds only while the row has
/// the start it was read with: a row rewritten since is kept.
#[tokio::test]
async fn an_expired_row_is_deleted_only_if_its_start_is_still_the_one_read() {
    use fanout_aws::AgeSettings;
    use fanout_core::connection::expiry::{DEFAULT_MARGIN, Expired, ExpiryRule};
    use std::sync::Arc;

    let ddb = support::dynamodb().await;
    let table = create_table(&ddb, "aged", TableKey::Id, false).await;
    let three_hours_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 3 * 60 * 60 * 1000;
    for id in ["old", "rewritten"] {
        ddb.put_item()
            .table_name(&table)
            .item(ID, AttributeValue::S(id.into()))
            .item(
                "connectedAt",
                AttributeValue::N(three_hours_ago.to_string()),
            )
            .send()
            .await
            .expect("put a row");
    }
    let store = store(TableSettings {
        expiry: Some(AgeSettings {
            attribute: "connectedAt".into(),
            rule: Arc::new(ExpiryRule::new(DEFAULT_MARGIN)),
        }),
        ..settings(&table, 10, false)
    })
    .await;
    let pages = all_pages(&store, &AudienceQuery::All { segments: 1 }, None).await;
    let expired: Vec<Expired> = pages.into_iter().flat_map(|p| p.expired).collect();
    assert_eq!(expired.len(), 2, "both read as expired");
    // A reconnect rewrote one row after the read.
    ddb.put_item()
        .table_name(&table)
        .item(ID, AttributeValue::S("rewritten".into()))
        .item(
            "connectedAt",
            AttributeValue::N((three_hours_ago + 1).to_string()),
        )
        .send()
        .await
        .expect("rewrite a row");
    for row in expired {
        let id = row.connection.id.to_string();
        let deleted = store
            .remove_expired(row)
            .await
            .expect("a conditional delete");
        assert_eq!(deleted, id == "old", "{id}");
    }
    assert_eq!(
        support::remaining_ids(&ddb, &table).await,
        BTreeSet::from(["rewritten".to_owned()])
    );
}
