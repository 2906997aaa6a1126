//! [`LeaseTable`] on DynamoDB: the fleet's leases as one item per task under
//! one partition key, written with PutItem, read together with one strongly
//! consistent Query, and deleted with DeleteItem on a clean stop.
//!
//! # Item layout
//!
//! | attribute     | type | value                                                    |
//! |---------------|------|----------------------------------------------------------|
//! | `pk`          | S    | `fleet#leases`, the same for every task                  |
//! | `sk`          | S    | the task's id                                            |
//! | `demand`      | N    | sends per second the task can use now                    |
//! | `expiresAtMs` | N    | when the lease stops counting, in epoch ms               |
//! | `expiresAt`   | N    | the same in epoch seconds, rounded up: the table's TTL   |
//!
//! The `fleet#` prefix keeps the leases apart from any other items the table
//! may come to hold (told apart by their own prefixes); `leases` is the only
//! partition the fleet uses. One partition serves thousands of reads and a
//! thousand writes a second, far above one of each per task per second.
//!
//! Expiry is judged by `expiresAtMs` alone (the core reads it): DynamoDB's
//! TTL deletes expired items lazily, hours to days later, so `expiresAt`
//! only keeps the table from filling with the leases of dead tasks.

use std::collections::HashMap;

use aws_sdk_dynamodb::Client;

use aws_sdk_dynamodb::types::AttributeValue;

use crate::pk_sk::{Item, PK, PkSkTable, SK};

use fanout_core::fleet::{FleetError, Lease, LeaseTable};

/// The partition every lease of the fleet is written under.
const PARTITION: &str = "fleet#leases";
const DEMAND: &str = "demand";
const EXPIRES_AT_MS: &str = "expiresAtMs";
/// The table's TTL attribute (the template enables TTL on it).
const EXPIRES_AT: &str = "expiresAt";

/// The fleet's lease table.
#[derive(Clone, Debug)]
pub struct DynamoLeaseTable {
    /// Its client built by [`crate::clients::fleet_dynamodb_client`], whose
    /// timeout keeps a call well inside the coordinator's round.
    table: PkSkTable,
}

impl DynamoLeaseTable {
    /// Checks once, at startup, that `table` exists and is keyed `pk` (S) +
    /// `sk` (S), so a wrong `FANOUT_FLEET_TABLE` is named before the first
    /// round rather than logged as failed renewals twice a second.
    pub async fn connect(client: Client, table: impl Into<String>) -> Result<Self, FleetError> {
        let table = PkSkTable::connect(client, table.into(), from_failure, wrong_key).await?;
        Ok(Self { table })
    }

    /// The table, unchecked: for a start while it cannot be reached (the
    /// coordinator falls back and retries every round).
    pub fn unchecked(client: Client, table: impl Into<String>) -> Self {
        Self {
            table: PkSkTable::unchecked(client, table.into()),
        }
    }
}

impl LeaseTable for DynamoLeaseTable {
    async fn put(&self, lease: &Lease) -> Result<(), FleetError> {
        let item = to_item(lease)?;
        self.table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|err| map_error(&self.table.name, err))?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Lease>, FleetError> {
        let names = HashMap::from([
            ("#pk".to_owned(), PK.to_owned()),
            ("#sk".to_owned(), SK.to_owned()),
            ("#d".to_owned(), DEMAND.to_owned()),
            ("#e".to_owned(), EXPIRES_AT_MS.to_owned()),
        ]);
        let mut leases = Vec::new();
        let mut start = None;
        // A page holds up to 1 MB, thousands of leases: more than one page
        // only if the fleet's items grow, but then every lease must still be
        // counted, or the shares could add up to more than the fleet's rate.
        loop {
            let output = self
                .table
                .client
                .query()
                .table_name(&self.table.name)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_values(":pk", AttributeValue::S(PARTITION.to_owned()))
                .set_expression_attribute_names(Some(names.clone()))
                .projection_expression("#sk, #d, #e")
                // A lease whose PutItem returned must be in the answer.
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|err| map_error(&self.table.name, err))?;
            for item in output.items() {
                leases.push(from_item(item)?);
            }
            match output.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(leases),
            }
        }
    }

    async fn remove(&self, task: &str) -> Result<(), FleetError> {
        self.table
            .client
            .delete_item()
            .table_name(&self.table.name)
            .key(PK, AttributeValue::S(PARTITION.to_owned()))
            .key(SK, AttributeValue::S(task.to_owned()))
            .send()
            .await
            .map_err(|err| map_error(&self.table.name, err))?;
        Ok(())
    }
}

/// The refusal of a table not keyed `pk` (S) + `sk` (S), named with the
/// key it has: most likely the connections table named by mistake, where
/// every PutItem would fail.
fn wrong_key(table: &str, found: &str) -> FleetError {
    FleetError::Rejected(format!(
        "the fleet table {table} has {found}, not pk (S) and sk (S); \
         point FANOUT_FLEET_TABLE at the fleet's own table"
    ))
}

/// A lease as the item that stores it.
fn to_item(lease: &Lease) -> Result<Item, FleetError> {
    // DynamoDB has no NaN or infinity; a bad demand is a bug in the caller,
    // refused here rather than sent.
    if !(lease.demand.is_finite() && lease.demand >= 0.0) {
        return Err(FleetError::Rejected(format!(
            "the lease of {} has a demand of {}, not a finite rate",
            lease.task, lease.demand
        )));
    }
    Ok(Item::from([
        (PK.to_owned(), AttributeValue::S(PARTITION.to_owned())),
        (SK.to_owned(), AttributeValue::S(lease.task.clone())),
        // Display writes the shortest exact decimal, never an exponent.
        (
            DEMAND.to_owned(),
            AttributeValue::N(lease.demand.to_string()),
        ),
        (
            EXPIRES_AT_MS.to_owned(),
            AttributeValue::N(lease.expires_at_ms.to_string()),
        ),
        (
            EXPIRES_AT.to_owned(),
            AttributeValue::N(lease.expires_at_secs().to_string()),
        ),
    ]))
}

/// A lease from its item. An item that does not parse fails the whole read:
/// skipping it would leave its task's demand uncounted.
fn from_item(item: &Item) -> Result<Lease, FleetError> {
    let bad = |attribute: &str| FleetError::BadLease {
        attribute: attribute.to_owned(),
    };
    let number = |attribute: &str| match item.get(attribute) {
        Some(AttributeValue::N(n)) => Ok(n.as_str()),
        _ => Err(bad(attribute)),
    };
    let task = match item.get(SK) {
        Some(AttributeValue::S(task)) => task.clone(),
        _ => return Err(bad(SK)),
    };
    let demand = number(DEMAND)?
        .parse::<f64>()
        .ok()
        .filter(|d| d.is_finite() && *d >= 0.0)
        .ok_or_else(|| bad(DEMAND))?;
    let expires_at_ms = number(EXPIRES_AT_MS)?
        .parse::<u64>()
        .map_err(|_| bad(EXPIRES_AT_MS))?;
    Ok(Lease {
        task,
        demand,
        expires_at_ms,
    })
}

crate::dynamo_errors::table_errors!(FleetError);

#[cfg(test)]
mod tests {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, KeySchemaElement, KeyType, ScalarAttributeType, TableDescription,
    };

    use super::*;
    use crate::pk_sk::pk_sk_key;

    fn lease(task: &str, demand: f64, expires_at_ms: u64) -> Lease {
        Lease {
            task: task.to_owned(),
            demand,
            expires_at_ms,
        }
    }

    fn n(value: &str) -> AttributeValue {
        AttributeValue::N(value.to_owned())
    }

    #[test]
    fn a_lease_survives_the_round_trip_through_its_item() {
        let lease = lease("task-1", 1234.5, 1_700_000_002_001);
        let item = to_item(&lease).expect("a valid lease");
        assert_eq!(item[PK], AttributeValue::S(PARTITION.to_owned()));
        assert_eq!(item[SK], AttributeValue::S("task-1".to_owned()));
        assert_eq!(item[DEMAND], n("1234.5"));
        assert_eq!(item[EXPIRES_AT_MS], n("1700000002001"));
        // The TTL attribute is in seconds, rounded up.
        assert_eq!(item[EXPIRES_AT], n("1700000003"));
        assert_eq!(from_item(&item).expect("its own item"), lease);
    }

    #[test]
    fn demands_are_written_as_plain_decimals() {
        for demand in [0.0, 1e-7, 2000.0, f64::from(u32::MAX)] {
            let item = to_item(&lease("t", demand, 1)).expect("a valid lease");
            let AttributeValue::N(text) = &item[DEMAND] else {
                panic!("a number")
            };
            assert!(!text.contains(['e', 'E']), "{text}");
            assert_eq!(from_item(&item).expect("parses").demand, demand);
        }
    }

    #[test]
    fn a_demand_that_is_no_rate_is_not_written() {
        for demand in [f64::NAN, f64::INFINITY, -1.0] {
            let err = to_item(&lease("t", demand, 1)).expect_err("not a rate");
            assert!(matches!(err, FleetError::Rejected(_)), "{err:?}");
        }
    }

    #[test]
    fn an_item_without_a_usable_attribute_names_it() {
        let good = to_item(&lease("t", 10.0, 1_700_000_000_000)).expect("valid");
        let cases: [(&str, Option<AttributeValue>); 6] = [
            (SK, None),
            (SK, Some(n("1"))),
            (DEMAND, None),
            (DEMAND, Some(AttributeValue::S("10".to_owned()))),
            (DEMAND, Some(n("-5"))),
            (EXPIRES_AT_MS, Some(n("1700000000000.5"))),
        ];
        for (attribute, value) in cases {
            let mut item = good.clone();
            match value.clone() {
                Some(value) => item.insert(attribute.to_owned(), value),
                None => item.remove(attribute),
            };
            match from_item(&item) {
                Err(FleetError::BadLease { attribute: named }) => {
                    assert_eq!(named, attribute, "{value:?}")
                }
                other => panic!("{attribute} = {value:?}: {other:?}"),
            }
        }
        // Attributes the reader does not know are left alone.
        let mut item = good;
        item.insert("note".to_owned(), AttributeValue::Bool(true));
        assert!(from_item(&item).is_ok());
    }

    fn described(keys: &[(&str, KeyType, ScalarAttributeType)]) -> TableDescription {
        let mut table = TableDescription::builder();
        for (name, kind, scalar) in keys {
            table = table
                .key_schema(
                    KeySchemaElement::builder()
                        .attribute_name(*name)
                        .key_type(kind.clone())
                        .build()
                        .expect("key element"),
                )
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(*name)
                        .attribute_type(scalar.clone())
                        .build()
                        .expect("attribute definition"),
                );
        }
        table.build()
    }

    #[test]
    fn only_a_table_keyed_pk_and_sk_as_strings_is_taken() {
        use KeyType::{Hash, Range};
        use ScalarAttributeType::{N, S};
        let fleet = described(&[("pk", Hash, S), ("sk", Range, S)]);
        assert!(pk_sk_key(&fleet).is_ok());
        for wrong in [
            described(&[("connectionId", Hash, S)]),
            described(&[("pk", Hash, S)]),
            described(&[("pk", Hash, S), ("sk", Range, N)]),
            described(&[("sk", Hash, S), ("pk", Range, S)]),
        ] {
            let err = pk_sk_key(&wrong)
                .map_err(|found| wrong_key("connections", &found))
                .expect_err("wrong key");
            let text = err.to_string();
            assert!(matches!(err, FleetError::Rejected(_)), "{text}");
            assert!(
                text.contains(&fanout_core::limits::setting::Setting::FleetTable.to_string()),
                "{text}"
            );
            assert!(text.contains("connections"), "{text}");
        }
    }
}
