//! [`RunTable`] on DynamoDB: one item per run key in the checkpoint table
//! (`FANOUT_CHECKPOINT_TABLE`), read consistently and written on the
//! condition that its version is still the one read.
//!
//! | attribute | type | what |
//! |---|---|---|
//! | `pk` | S | `run#` + the run key (`s{segment}.c{continuation}.{part}:{broadcast}`) |
//! | `sk` | S | `run` |
//! | `fingerprint` | S | SHA-256 of the body's payload and audience |
//! | `owner`, `messageId`, `receipt` | S | who runs it, from which message, its newest receipt |
//! | `leaseUntilMs` | N | until when the owner holds it |
//! | `finishedAtMs` | N | when its message was settled off the queue (absent while it runs) |
//! | `expiresAt` | N | the TTL (epoch seconds): past the dedup window |
//! | `checkpoint` | S | where the run resumes if its task dies: its resume points and the ids still deferred before them, JSON (absent before the first page) |
//! | `version` | N | bumped by every write |
//!
//! The same table holds a cancel's tombstone (a record keyed
//! `cancel:` + the broadcast key) and each broadcast's tally (`tallies`).
//!
//! The `run#` prefix keeps the items apart from the fleet's (`fleet#…`), so
//! one table can serve both.

use std::collections::HashMap;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;

use fanout_core::runs::{DurableError, Piece, RunRecord, RunTable, Tallied};

use crate::dynamo_errors;
use crate::pk_sk::{Item, PK, PkSkTable, SK};

mod tallies;

const SORT: &str = "run";

/// The checkpoint table.
#[derive(Clone, Debug)]
pub struct DynamoRunTable {
    table: PkSkTable,
}

impl DynamoRunTable {
    /// Checks once, at startup, that `table` exists and is keyed `pk` (S) +
    /// `sk` (S): a wrong `FANOUT_CHECKPOINT_TABLE` is named before the
    /// first job.
    pub async fn connect(client: Client, table: impl Into<String>) -> Result<Self, DurableError> {
        let table = PkSkTable::connect(client, table.into(), from_failure, wrong_key).await?;
        Ok(Self { table })
    }

    /// The table, unchecked: for a start while it cannot be reached (each
    /// call then fails, is counted, and delivery goes on without it).
    pub fn unchecked(client: Client, table: impl Into<String>) -> Self {
        Self {
            table: PkSkTable::unchecked(client, table.into()),
        }
    }
}

/// The refusal of a table not keyed `pk` (S) + `sk` (S), named with the
/// key it has.
fn wrong_key(table: &str, found: &str) -> DurableError {
    DurableError::Rejected(format!(
        "the checkpoint table {table} has {found}, not pk (S) and sk (S); \
         point FANOUT_CHECKPOINT_TABLE at a table keyed so (the fleet table is)"
    ))
}

fn key(run: &str) -> Item {
    HashMap::from([
        (PK.to_owned(), AttributeValue::S(format!("run#{run}"))),
        (SK.to_owned(), AttributeValue::S(SORT.to_owned())),
    ])
}

impl RunTable for DynamoRunTable {
    async fn load(&self, run: &str) -> Result<Option<RunRecord>, DurableError> {
        let output = self
            .table
            .client
            .get_item()
            .table_name(&self.table.name)
            .set_key(Some(key(run)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|err| map_error(&self.table.name, err))?;
        output.item.map(|item| from_item(run, &item)).transpose()
    }

    async fn store(&self, record: &RunRecord, read: Option<u64>) -> Result<bool, DurableError> {
        let mut request = self
            .table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(to_item(record)));
        request = match read {
            None => request.condition_expression("attribute_not_exists(pk)"),
            Some(version) => request
                .condition_expression("version = :read")
                .expression_attribute_values(":read", AttributeValue::N(version.to_string())),
        };
        dynamo_errors::written(request.send().await)
            .map_err(|failure| from_failure(&self.table.name, failure))
    }

    async fn tally(&self, broadcast: &str, piece: &Piece) -> Result<Tallied, DurableError> {
        self.add_piece(broadcast, piece).await
    }
}

fn to_item(record: &RunRecord) -> Item {
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let n = |v: i128| AttributeValue::N(v.to_string());
    let mut item = key(&record.key);
    item.insert("fingerprint".into(), s(&record.fingerprint));
    item.insert("owner".into(), s(&record.owner));
    item.insert("messageId".into(), s(&record.message_id));
    item.insert("receipt".into(), s(&record.receipt));
    item.insert("leaseUntilMs".into(), n(record.lease_until_ms.into()));
    if let Some(at) = record.finished_at_ms {
        item.insert("finishedAtMs".into(), n(at.into()));
    }
    item.insert("expiresAt".into(), n(record.expires_at.into()));
    if let Some(checkpoint) = &record.checkpoint {
        item.insert("checkpoint".into(), s(checkpoint));
    }
    item.insert("version".into(), n(record.version.into()));
    item
}

fn from_item(run: &str, item: &Item) -> Result<RunRecord, DurableError> {
    let bad =
        |name: &str| DurableError::Rejected(format!("the record of {run} has no valid {name}"));
    let text = |name: &str| match item.get(name) {
        Some(AttributeValue::S(v)) => Ok(v.clone()),
        _ => Err(bad(name)),
    };
    let number = |name: &str| match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse::<i64>().map_err(|_| bad(name)),
        _ => Err(bad(name)),
    };
    Ok(RunRecord {
        key: run.to_owned(),
        fingerprint: text("fingerprint")?,
        owner: text("owner")?,
        message_id: text("messageId")?,
        receipt: text("receipt")?,
        lease_until_ms: number("leaseUntilMs")?,
        finished_at_ms: item
            .contains_key("finishedAtMs")
            .then(|| number("finishedAtMs"))
            .transpose()?,
        expires_at: number("expiresAt")?,
        checkpoint: item
            .contains_key("checkpoint")
            .then(|| text("checkpoint"))
            .transpose()?,
        version: u64::try_from(number("version")?).map_err(|_| bad("version"))?,
    })
}

crate::dynamo_errors::table_errors!(DurableError);
