//! The benchmark's DynamoDB table (on dynalite): created and loaded with
//! `conn-0` … `conn-{n-1}` before the broadcast, so the audience is streamed
//! by the real `DynamoStore` (Scan pages, BatchWriteItem removals) while the
//! clock runs. Loading is not measured.

use anyhow::Context;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use fanout_aws::DynamoStore;
use fanout_core::store::{AudienceQuery, ConnectionStore};
pub use fanout_testkit::support::ID as KEY;
use fanout_testkit::support::{TableKey, create_table_named};
use futures::{StreamExt, TryStreamExt, stream};

use crate::audience::GONE_EVERY;

/// BatchWriteItem's limit.
const BATCH: u64 = 25;

/// Creates `table` keyed by [`KEY`] and writes `rows` connection rows.
pub async fn create_and_load(client: &Client, table: &str, rows: u64) -> anyhow::Result<()> {
    create(client, table).await?;
    load(client, table, rows, false).await
}

/// Creates `table` keyed by [`KEY`], empty, as the tests create theirs.
pub async fn create(client: &Client, table: &str) -> anyhow::Result<()> {
    create_table_named(client, table, TableKey::Id, false)
        .await
        .map_err(anyhow::Error::msg)
        .context("create the benchmark table (is dynalite up and AWS_ENDPOINT_URL_DYNAMODB set?)")
}

/// The connection index of [`create_channels`]: partition key the id, its
/// start projected so the age and evidence rules read it.
pub const CONNECTION_INDEX: &str = "by-connection";

/// Creates `table` keyed by channel, then connection id (a row per
/// subscription), with [`CONNECTION_INDEX`].
pub async fn create_channels(client: &Client, table: &str) -> anyhow::Result<()> {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType,
        Projection, ProjectionType, ScalarAttributeType,
    };
    let attribute = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
    };
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
    };
    client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute("channel")?)
        .attribute_definitions(attribute(KEY)?)
        .key_schema(key("channel", KeyType::Hash)?)
        .key_schema(key(KEY, KeyType::Range)?)
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(CONNECTION_INDEX)
                .key_schema(key(KEY, KeyType::Hash)?)
                .key_schema(key("channel", KeyType::Range)?)
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::Include)
                        .non_key_attributes("connectedAt")
                        .build(),
                )
                .build()?,
        )
        .send()
        .await
        .context("create the channels table (is dynalite up?)")?;
    Ok(())
}

/// Writes `conn-n` in the channels `a` and `b` (two rows a connection), or
/// only the gone ones' rows.
pub async fn load_channels(
    client: &Client,
    table: &str,
    connections: u64,
    only_gone: bool,
) -> anyhow::Result<()> {
    let rows: Vec<(u64, Option<&str>)> = (0..connections)
        .filter(|n| !only_gone || n % GONE_EVERY == 0)
        .flat_map(|n| [(n, Some("a")), (n, Some("b"))])
        .collect();
    write(client, table, &rows).await
}

/// Writes the rows `conn-0` … `conn-{rows-1}`, or only the gone ones among
/// them (a broadcast deleted those: the next run needs them back).
pub async fn load(client: &Client, table: &str, rows: u64, only_gone: bool) -> anyhow::Result<()> {
    let rows: Vec<(u64, Option<&str>)> = (0..rows)
        .filter(|n| !only_gone || n % GONE_EVERY == 0)
        .map(|n| (n, None))
        .collect();
    write(client, table, &rows).await
}

/// Writes a row `conn-n` for each `(n, channel)`, in the channel when
/// given, 16 BatchWriteItems at a time.
async fn write(client: &Client, table: &str, rows: &[(u64, Option<&str>)]) -> anyhow::Result<()> {
    stream::iter(rows.chunks(BATCH as usize))
        .map(|chunk| write_batch(client, table, chunk))
        .buffer_unordered(16)
        .try_collect::<()>()
        .await
}

async fn write_batch(
    client: &Client,
    table: &str,
    rows: &[(u64, Option<&str>)],
) -> anyhow::Result<()> {
    let requests = rows
        .iter()
        .map(|(n, channel)| {
            let mut put = PutRequest::builder()
                .item(KEY, AttributeValue::S(format!("conn-{n}")))
                // Established ten minutes ago: a gone row's first 410 removes
                // it, as in production where the start is read.
                .item(
                    "connectedAt",
                    AttributeValue::N(established_ms().to_string()),
                );
            if let Some(channel) = channel {
                put = put.item("channel", AttributeValue::S((*channel).to_owned()));
            }
            Ok(WriteRequest::builder().put_request(put.build()?).build())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let output = client
        .batch_write_item()
        .request_items(table, requests)
        .send()
        .await
        .context("load the benchmark table")?;
    // dynalite never returns UnprocessedItems: a partial load is a bug here.
    anyhow::ensure!(
        output.unprocessed_items().is_none_or(|u| u.is_empty()),
        "dynalite left items unprocessed"
    );
    Ok(())
}

/// An established start, as a `$connect` ten minutes ago wrote it, in
/// epoch ms.
pub fn established_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
        - 10 * 60 * 1000
}

pub async fn delete(client: &Client, table: &str) {
    // Best effort: dynalite runs in memory and goes away with the benchmark.
    let _ = client.delete_table().table_name(table).send().await;
}

/// Rows per second of a whole-table scan through `store`, nothing sent.
pub async fn scan_rate(store: &DynamoStore) -> anyhow::Result<f64> {
    let started = std::time::Instant::now();
    let mut rows = 0usize;
    let mut pages = store.pages(&AudienceQuery::All { segments: 1 }, None);
    while let Some(page) = pages.next().await {
        rows += page.context("scanning the bench table")?.connections.len();
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}
