//! What removing a gone row costs, by the table's layout, through the real
//! `DynamoStore` on dynalite: a table keyed by the connection id (rows
//! deleted 25 at a time by BatchWriteItem, the key built from the id that
//! answered) and one keyed by user (one conditional DeleteItem a row, on
//! condition that it still holds that id and start). Loading is not
//! measured; the removals are, in wall time and in this process's CPU.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use fanout_aws::{DynamoStore, TableSettings};
use fanout_core::connection::expiry::ExpiryRule;
use fanout_core::connection::{Connection, KeyValue, RowKey};
use fanout_core::store::{ConnectionStore, MAX_REMOVE_BATCH};
use fanout_testkit::support::{IndexSpec, create_table_with_indexes};
use futures::{StreamExt, TryStreamExt, stream};

/// Removals in flight at once, as the engine's remover keeps them.
const CONCURRENT: usize = 4;

/// One layout's figures, as a `kind=removals` line.
pub async fn run(client: &Client, rows: u64) -> anyhow::Result<()> {
    for layout in [Layout::ById, Layout::ByUser] {
        let (table, gone) = load(client, layout, rows).await?;
        let store = Arc::new(
            DynamoStore::connect(client.clone(), settings(&table))
                .await
                .context("the removals table")?,
        );
        let cpu = process_cpu();
        let started = Instant::now();
        let chunks: Vec<Vec<Connection>> = gone
            .chunks(MAX_REMOVE_BATCH)
            .map(<[Connection]>::to_vec)
            .collect();
        stream::iter(chunks)
            .map(|chunk| {
                let store = store.clone();
                async move { store.remove(chunk).await.map_err(anyhow::Error::from) }
            })
            .buffer_unordered(CONCURRENT)
            .try_for_each(|removal| async move {
                anyhow::ensure!(
                    removal.unprocessed.is_empty()
                        && removal.skipped.is_empty()
                        && removal.changed.is_empty(),
                    "rows not removed: {removal:?}"
                );
                Ok(())
            })
            .await?;
        let wall = started.elapsed();
        let cpu = process_cpu() - cpu;
        let left = client
            .scan()
            .table_name(&table)
            .select(aws_sdk_dynamodb::types::Select::Count)
            .send()
            .await?
            .count;
        anyhow::ensure!(left == 0, "{left} rows left in {table}");
        println!(
            "kind=removals layout={} rows={rows} wall_us_per_row={:.1} cpu_us_per_row={:.1}",
            layout.name(),
            wall.as_secs_f64() * 1e6 / rows as f64,
            cpu.as_secs_f64() * 1e6 / rows as f64,
        );
        let _ = client.delete_table().table_name(&table).send().await;
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Layout {
    ById,
    ByUser,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Self::ById => "by-id-batch",
            Self::ByUser => "by-user-conditional",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::ById => "connectionId",
            Self::ByUser => "userId",
        }
    }
}

/// Creates a table of `rows` rows and returns it with each row as the
/// engine hands a gone one to the store.
async fn load(
    client: &Client,
    layout: Layout,
    rows: u64,
) -> anyhow::Result<(String, Vec<Connection>)> {
    let table = create_table_with_indexes(
        client,
        &format!("removals-{}", layout.key()),
        (layout.key(), None),
        &[] as &[IndexSpec<'_>],
    )
    .await;
    let started = crate::table::established_ms();
    let gone: Vec<Connection> = (0..rows)
        .map(|n| {
            let id = format!("conn-{n}");
            let key_value = match layout {
                Layout::ById => id.clone(),
                Layout::ByUser => format!("user-{n}"),
            };
            Connection {
                started_ms: Some(started),
                ..Connection::new(
                    id,
                    Some(RowKey(vec![(
                        layout.key().to_owned(),
                        KeyValue::S(key_value),
                    )])),
                )
            }
        })
        .collect();
    stream::iter(gone.chunks(25))
        .map(|chunk| {
            let table = table.clone();
            let requests = chunk
                .iter()
                .map(|c| {
                    let mut put = PutRequest::builder()
                        .item("connectionId", AttributeValue::S(c.id.to_string()))
                        .item("connectedAt", AttributeValue::N(started.to_string()));
                    if let Some(RowKey(key)) = &c.key
                        && let [(name, KeyValue::S(value))] = &key[..]
                    {
                        put = put.item(name, AttributeValue::S(value.clone()));
                    }
                    Ok(WriteRequest::builder().put_request(put.build()?).build())
                })
                .collect::<anyhow::Result<Vec<_>>>();
            async move {
                client
                    .batch_write_item()
                    .request_items(&table, requests?)
                    .send()
                    .await
                    .context("load the removals table")?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<()>()
        .await?;
    Ok((table, gone))
}

fn settings(table: &str) -> TableSettings {
    TableSettings {
        table: table.to_owned(),
        key_attribute: "connectionId".to_owned(),
        channel_index: None,
        channel_attribute: "channel".to_owned(),
        audiences: Vec::new(),
        connection_index: None,
        page_size: 1000,
        expiry: Some(fanout_aws::AgeSettings {
            attribute: "connectedAt".to_owned(),
            rule: Arc::new(ExpiryRule::new(
                fanout_core::connection::expiry::DEFAULT_MARGIN,
            )),
        }),
    }
}

/// This process's CPU time so far (user and system).
fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes the struct it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}
