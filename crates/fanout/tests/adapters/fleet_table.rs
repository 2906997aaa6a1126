//! `DynamoLeaseTable` against the DynamoDB emulator (dynalite): leases
//! round-trip with their demand and expiry in the documented item layout,
//! a read sees every task's latest write (across pages, expired leases
//! included, other partitions left out), removal, and the startup check and
//! error mapping the binary relies on to name `FANOUT_FLEET_TABLE`.
//!
//! dynalite has no TTL, so the template's TTL on `expiresAt` is not
//! exercised here; the adapter writes the attribute, which is what it owns.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;
use fanout_aws::DynamoLeaseTable;
use fanout_aws::clients::fleet_dynamodb_client;
use fanout_core::fleet::{FleetError, Lease, LeaseTable};
use fanout_testkit::support;

/// The partition the adapter keeps every lease under (its documented layout).
const PARTITION: &str = "fleet#leases";

/// A fleet table as the template makes it (`pk` S + `sk` S), active.
/// A new fleet table, and the adapter on it.
async fn fleet_table() -> (aws_sdk_dynamodb::Client, String, DynamoLeaseTable) {
    let ddb = support::dynamodb().await;
    let name = support::create_lease_table(&ddb, "fleet").await;
    let config = support::sdk_config().await;
    let table = DynamoLeaseTable::connect(fleet_dynamodb_client(&config), &name)
        .await
        .expect("connect to the fleet table");
    (ddb, name, table)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn lease(task: &str, demand: f64, expires_at_ms: u64) -> Lease {
    Lease {
        task: task.to_owned(),
        demand,
        expires_at_ms,
    }
}

/// The leases by task.
async fn listed(table: &DynamoLeaseTable) -> BTreeMap<String, Lease> {
    let leases = table.list().await.expect("list the leases");
    let by_task: BTreeMap<_, _> = leases.iter().map(|l| (l.task.clone(), l.clone())).collect();
    assert_eq!(
        by_task.len(),
        leases.len(),
        "a task listed twice: {leases:?}"
    );
    by_task
}

#[tokio::test]
async fn a_lease_round_trips_its_demand_and_expiry_in_the_documented_layout() {
    let (ddb, name, table) = fleet_table().await;
    let written = lease("task-a", 1234.5, now_ms() + 3001);
    table.put(&written).await.expect("put");
    assert_eq!(table.list().await.expect("list"), vec![written.clone()]);

    // The item as the template's TTL and other readers see it.
    let item = ddb
        .get_item()
        .table_name(&name)
        .key("pk", AttributeValue::S(PARTITION.to_owned()))
        .key("sk", AttributeValue::S("task-a".to_owned()))
        .consistent_read(true)
        .send()
        .await
        .expect("get the item")
        .item
        .expect("the lease's item");
    let number = |attribute: &str| match &item[attribute] {
        AttributeValue::N(n) => n.clone(),
        other => panic!("{attribute} is {other:?}, not a number"),
    };
    assert_eq!(number("demand"), "1234.5");
    assert_eq!(number("expiresAtMs"), written.expires_at_ms.to_string());
    // TTL in epoch seconds, rounded up: never before the lease expires.
    assert_eq!(number("expiresAt"), written.expires_at_secs().to_string());
    assert!(written.expires_at_secs() * 1000 >= written.expires_at_ms);

    // A renewal replaces the lease; it does not add one.
    let renewed = lease("task-a", 0.0, written.expires_at_ms + 1000);
    table.put(&renewed).await.expect("renew");
    assert_eq!(table.list().await.expect("list"), vec![renewed]);
}

#[tokio::test]
async fn a_read_sees_every_tasks_latest_write_expired_ones_included() {
    let (ddb, name, table) = fleet_table().await;
    let now = now_ms();
    let tasks = ["t1", "t2", "t3", "t4", "t5"];
    // Written at once, as a fleet's tasks do; each read right after.
    let writes = tasks
        .iter()
        .enumerate()
        .map(|(i, task)| lease(task, 100.0 * i as f64, now + 3000));
    futures::future::try_join_all(writes.map(|l| {
        let table = &table;
        async move { table.put(&l).await }
    }))
    .await
    .expect("put every lease");
    let stale = lease("dead", 500.0, now - 10_000);
    table.put(&stale).await.expect("put an expired lease");
    // Another feature's item in the same table is not a lease.
    ddb.put_item()
        .table_name(&name)
        .item("pk", AttributeValue::S("other#x".to_owned()))
        .item("sk", AttributeValue::S("t9".to_owned()))
        .send()
        .await
        .expect("put another feature's item");

    let leases = listed(&table).await;
    let mut expected: Vec<&str> = tasks.to_vec();
    expected.push("dead");
    expected.sort();
    assert_eq!(
        leases.keys().map(String::as_str).collect::<Vec<_>>(),
        expected
    );
    assert_eq!(leases["t3"].demand, 200.0);
    // The core judges expiry; the table hands back what is there.
    assert_eq!(leases["dead"], stale);

    // Every write is in the very next read.
    for round in 1..=5u32 {
        let demand = f64::from(round) * 10.0;
        table
            .put(&lease("t2", demand, now + 3000 + u64::from(round)))
            .await
            .expect("renew");
        assert_eq!(listed(&table).await["t2"].demand, demand, "round {round}");
    }
}

#[tokio::test]
async fn a_read_covers_every_page() {
    let (ddb, name, table) = fleet_table().await;
    let now = now_ms();
    // Leases with a large attribute the adapter does not read (as a newer
    // version might add): 12 × 300 KB, beyond a Query page's 1 MB.
    let padding = AttributeValue::S("x".repeat(300_000));
    for i in 0..12 {
        ddb.put_item()
            .table_name(&name)
            .item("pk", AttributeValue::S(PARTITION.to_owned()))
            .item("sk", AttributeValue::S(format!("t{i:02}")))
            .item("demand", AttributeValue::N(i.to_string()))
            .item("expiresAtMs", AttributeValue::N((now + 3000).to_string()))
            .item("padding", padding.clone())
            .send()
            .await
            .expect("put a large lease");
    }
    let first_page = support::first_page_of_partition(&ddb, &name, "pk", PARTITION).await;
    assert!(
        first_page.last_evaluated_key().is_some() && first_page.items().len() < 12,
        "the emulator answered {} items in one page",
        first_page.items().len()
    );

    let leases = listed(&table).await;
    assert_eq!(leases.len(), 12, "{:?}", leases.keys());
    assert_eq!(leases["t07"].demand, 7.0);
}

#[tokio::test]
async fn remove_removes_the_lease_and_forgets_a_missing_one() {
    let (_ddb, _name, table) = fleet_table().await;
    let expiry = now_ms() + 3000;
    for task in ["a", "b"] {
        table.put(&lease(task, 10.0, expiry)).await.expect("put");
    }
    table.remove("a").await.expect("remove");
    let leases = listed(&table).await;
    assert_eq!(leases.keys().collect::<Vec<_>>(), ["b"]);
    // A stop after the lease was already gone (or never written) is fine.
    table.remove("a").await.expect("remove again");
    table.remove("never").await.expect("remove an unknown task");
    assert_eq!(listed(&table).await.len(), 1);
}

#[tokio::test]
async fn an_item_that_is_not_a_lease_is_named() {
    let (ddb, name, table) = fleet_table().await;
    ddb.put_item()
        .table_name(&name)
        .item("pk", AttributeValue::S(PARTITION.to_owned()))
        .item("sk", AttributeValue::S("odd".to_owned()))
        .item("demand", AttributeValue::S("a lot".to_owned()))
        .item("expiresAtMs", AttributeValue::N(now_ms().to_string()))
        .send()
        .await
        .expect("put a bad item");
    match table.list().await {
        Err(FleetError::BadLease { attribute }) => assert_eq!(attribute, "demand"),
        other => panic!("expected BadLease, got {other:?}"),
    }
}

#[tokio::test]
async fn a_missing_table_is_named_at_connect() {
    let config = support::sdk_config().await;
    let missing = support::unique("missing-fleet");
    let err = DynamoLeaseTable::connect(fleet_dynamodb_client(&config), missing.clone())
        .await
        .expect_err("no such table");
    match &err {
        FleetError::NoSuchTable { table } => assert_eq!(*table, missing),
        other => panic!("expected NoSuchTable, got {other:?}"),
    }
    assert!(
        err.to_string()
            .contains(&fanout_core::limits::setting::Setting::FleetTable.to_string()),
        "{err}"
    );
    assert!(!err.is_transient());
}

#[tokio::test]
async fn a_table_with_another_key_is_refused_at_connect() {
    let ddb = support::dynamodb().await;
    let connections = support::create_table(&ddb, "not-fleet", support::TableKey::Id, false).await;
    let config = support::sdk_config().await;
    let err = DynamoLeaseTable::connect(fleet_dynamodb_client(&config), connections.clone())
        .await
        .expect_err("keyed by connectionId");
    let text = err.to_string();
    assert!(matches!(err, FleetError::Rejected(_)), "{err:?}");
    assert!(
        text.contains(&connections) && text.contains("connectionId"),
        "{text}"
    );
    assert!(
        text.contains(&fanout_core::limits::setting::Setting::FleetTable.to_string()),
        "{text}"
    );
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_transient_error_quickly() {
    let config = support::unreachable_config().await;
    let started = Instant::now();
    let err = DynamoLeaseTable::connect(fleet_dynamodb_client(&config), "fleet")
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, FleetError::Unavailable(_)), "{err:?}");
    assert!(err.is_transient());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
