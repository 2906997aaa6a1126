//! A broadcast's record on DynamoDB: one UpdateItem per settled piece,
//! which ADDs its counts and run keys (numbers and string sets add up
//! atomically) on condition that its run key is not in `settled` yet, and
//! returns the record after. A piece counted before gets the record as it
//! is, read consistently.
//!
//! | attribute | type | what |
//! |---|---|---|
//! | `pk`, `sk` | S | `run#broadcast:` + the broadcast key, `run` |
//! | `settled`, `expected` | SS | run keys of the pieces settled, and of those the broadcast waits for |
//! | `reached`, `unreached` | SS | a `to` broadcast's keys, as its pieces found them |
//! | `audience` … `deadLettered` | N | the counts, summed |
//! | `startedAt` | N | when the first piece to settle started (epoch ms) |
//! | `expiresAt` | N | the TTL: as long as a cancel's tombstone |

use std::collections::{BTreeSet, HashMap};
use std::time::SystemTime;

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};

use fanout_core::connection::expiry::epoch_ms;
use fanout_core::limits::TOMBSTONE_LIFETIME;
use fanout_core::runs::{BroadcastTally, DurableError, Piece, Tallied, Totals, tally_key};

use super::{DynamoRunTable, from_failure, key, map_error};
use crate::dynamo_errors;
use crate::pk_sk::Item;

impl DynamoRunTable {
    pub(super) async fn add_piece(
        &self,
        broadcast: &str,
        piece: &Piece,
    ) -> Result<Tallied, DurableError> {
        let record = tally_key(broadcast);
        let update = Update::of(piece);
        let sent = self
            .table
            .client
            .update_item()
            .table_name(&self.table.name)
            .set_key(Some(key(&record)))
            .update_expression(update.expression)
            .condition_expression("attribute_not_exists(settled) OR NOT contains(settled, :run)")
            .set_expression_attribute_names(Some(update.names))
            .set_expression_attribute_values(Some(update.values))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match sent {
            Ok(output) => Ok(Tallied {
                counted: true,
                tally: from_item(&output.attributes.unwrap_or_default()),
            }),
            Err(err) => match dynamo_errors::written(Err::<(), _>(err)) {
                Ok(_) => self.counted_before(&record).await,
                Err(failure) => Err(from_failure(&self.table.name, failure)),
            },
        }
    }

    /// The record as it is, for a piece counted before.
    async fn counted_before(&self, record: &str) -> Result<Tallied, DurableError> {
        let output = self
            .table
            .client
            .get_item()
            .table_name(&self.table.name)
            .set_key(Some(key(record)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|err| map_error(&self.table.name, err))?;
        Ok(Tallied {
            counted: false,
            tally: from_item(&output.item.unwrap_or_default()),
        })
    }
}

/// One piece's UpdateItem: its expression, names and values.
struct Update {
    expression: String,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Update {
    fn of(piece: &Piece) -> Self {
        let mut adds = vec!["settled :settled".to_owned()];
        let mut names = HashMap::new();
        let mut values = HashMap::from([
            (":run".to_owned(), AttributeValue::S(piece.run.clone())),
            (
                ":settled".to_owned(),
                AttributeValue::Ss(vec![piece.run.clone()]),
            ),
        ]);
        for (name, count) in piece.totals.named() {
            adds.push(format!("#{name} :{name}"));
            names.insert(format!("#{name}"), name.to_owned());
            values.insert(format!(":{name}"), AttributeValue::N(count.to_string()));
        }
        // DynamoDB refuses an empty set: a set with nothing to add is left out.
        for (name, set) in [
            ("expected", &piece.expects),
            ("reached", &piece.reached),
            ("unreached", &piece.unreached),
        ] {
            if !set.is_empty() {
                adds.push(format!("{name} :{name}"));
                values.insert(format!(":{name}"), AttributeValue::Ss(dedup(set)));
            }
        }
        let ttl = (epoch_ms(SystemTime::now()) + TOMBSTONE_LIFETIME.as_millis() as i64) / 1000;
        values.insert(
            ":started".into(),
            AttributeValue::N(piece.started_ms.to_string()),
        );
        values.insert(":ttl".into(), AttributeValue::N(ttl.to_string()));
        Self {
            expression: format!(
                "ADD {} SET startedAt = if_not_exists(startedAt, :started), expiresAt = :ttl",
                adds.join(", ")
            ),
            names,
            values,
        }
    }
}

fn dedup(items: &[String]) -> Vec<String> {
    items
        .iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn from_item(item: &Item) -> BroadcastTally {
    let set = |name: &str| match item.get(name) {
        Some(AttributeValue::Ss(items)) => items.iter().cloned().collect(),
        _ => BTreeSet::new(),
    };
    let number = |name: &str| match item.get(name) {
        Some(AttributeValue::N(n)) => n.parse::<i64>().unwrap_or(0),
        _ => 0,
    };
    BroadcastTally {
        totals: Totals::from_named(|name| u64::try_from(number(name)).unwrap_or(0)),
        settled: set("settled"),
        expected: set("expected"),
        reached: set("reached"),
        unreached: set("unreached"),
        started_ms: number("startedAt"),
    }
}
