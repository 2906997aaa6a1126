//! The layout the fleet's leases and the runs' records share: a DynamoDB
//! table keyed `pk` (S) + `sk` (S), told apart by their partition keys'
//! prefixes, and the startup check that a table named for them is keyed so.

use std::collections::HashMap;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, KeyType, ScalarAttributeType, TableDescription};

use crate::dynamo_errors::{self, Failure};

/// An item of such a table, as the SDK reads and writes it.
pub(crate) type Item = HashMap<String, AttributeValue>;

pub(crate) const PK: &str = "pk";
pub(crate) const SK: &str = "sk";

/// A table keyed `pk` (S) + `sk` (S), the layout the fleet's leases and the
/// runs' records share, with the client that calls it.
#[derive(Clone, Debug)]
pub(crate) struct PkSkTable {
    pub(crate) client: Client,
    pub(crate) name: String,
}

impl PkSkTable {
    /// Checks once, at startup, that `name` exists and is keyed so: a failed
    /// call is `failed`'s, a table keyed otherwise is `unfit`'s (given its
    /// name and the key it has).
    pub(crate) async fn connect<E>(
        client: Client,
        name: String,
        failed: fn(&str, Failure) -> E,
        unfit: fn(&str, &str) -> E,
    ) -> Result<Self, E> {
        check_pk_sk(&client, &name, failed, |found| unfit(&name, &found)).await?;
        Ok(Self { client, name })
    }

    /// The table, unchecked: for a start while it cannot be reached.
    pub(crate) fn unchecked(client: Client, name: String) -> Self {
        Self { client, name }
    }
}

/// Reads `table`'s description and checks that it is keyed as
/// [`pk_sk_key`] says; a failed call is `failed`'s, a table keyed otherwise
/// is `unfit`'s (given the key it has).
async fn check_pk_sk<E>(
    client: &Client,
    table: &str,
    failed: fn(&str, Failure) -> E,
    unfit: impl FnOnce(String) -> E,
) -> Result<(), E> {
    let output = client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|err| failed(table, dynamo_errors::classify(&err)))?;
    let description = output
        .table()
        .ok_or_else(|| failed(table, Failure::NoSuchTable))?;
    pk_sk_key(description).map_err(unfit)
}

/// Whether a table is keyed `pk` (S) + `sk` (S), the layout the fleet's
/// leases and the runs' records share; `Err` names the key it has.
pub(crate) fn pk_sk_key(description: &TableDescription) -> Result<(), String> {
    let key_of = |kind: KeyType| {
        let name = description
            .key_schema()
            .iter()
            .find(|e| e.key_type() == &kind)?
            .attribute_name();
        let scalar = description
            .attribute_definitions()
            .iter()
            .find(|d| d.attribute_name() == name)?
            .attribute_type();
        Some((name, scalar.clone()))
    };
    let string = ScalarAttributeType::S;
    if key_of(KeyType::Hash) == Some((PK, string.clone()))
        && key_of(KeyType::Range) == Some((SK, string))
    {
        return Ok(());
    }
    let shown = |key: Option<(&str, ScalarAttributeType)>| match key {
        Some((name, scalar)) => format!("{name} ({})", scalar.as_str()),
        None => "nothing".to_owned(),
    };
    Err(format!(
        "partition key {} and sort key {}",
        shown(key_of(KeyType::Hash)),
        shown(key_of(KeyType::Range)),
    ))
}
