//! Deleting rows: gone connections by the id that answered (batched where
//! the key holds the id, conditional where it does not), and rows
//! certainly gone by age on condition that they still hold their start.

use super::*;
use crate::dynamo_errors;

pub(super) async fn remove_expired(inner: &Inner, row: Expired) -> Result<bool, StoreError> {
    let (Some(age), Some(key)) = (&inner.settings.expiry, &row.connection.key) else {
        return Ok(false);
    };
    let result = inner
        .client
        .delete_item()
        .table_name(&inner.settings.table)
        .set_key(Some(to_item(key)))
        .condition_expression("#started = :started")
        .expression_attribute_names("#started", &age.attribute)
        .expression_attribute_values(":started", AttributeValue::N(row.started_ms.to_string()))
        .send()
        .await;
    deleted(&inner.settings.table, result)
}

pub(super) async fn remove(inner: &Inner, gone: Vec<Connection>) -> Result<Removal, StoreError> {
    if gone.len() > MAX_REMOVE_BATCH {
        return Err(StoreError::Rejected(format!(
            "{} rows in one removal; BatchWriteItem takes at most {MAX_REMOVE_BATCH}, so \
             split the batch",
            gone.len()
        )));
    }
    let mut removal = Removal::default();
    // Keyed by the normalised key: a batch naming one row twice is a
    // validation error in DynamoDB, and UnprocessedItems come back by key.
    let mut by_key: Vec<(RowKey, Vec<Connection>)> = Vec::new();
    let mut conditional = Vec::new();
    for connection in gone {
        match inner.removal_key(&connection) {
            None => removal.skipped.push(connection),
            Some(RowRemoval::Conditional(key)) => conditional.push((key, connection)),
            Some(RowRemoval::Batch(key)) => {
                let key = normalised(&key);
                match by_key.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, same)) => same.push(connection),
                    None => by_key.push((key, vec![connection])),
                }
            }
        }
    }
    for (key, connection) in conditional {
        match inner.remove_if_same(key, &connection).await {
            Ok(true) => {}
            Ok(false) => removal.changed.push(connection),
            Err(e) if e.is_transient() => removal.unprocessed.push(connection),
            Err(e) => return Err(e),
        }
    }
    if by_key.is_empty() {
        return Ok(removal);
    }

    let requests = by_key
        .iter()
        .map(|(key, _)| {
            let delete = DeleteRequest::builder()
                .set_key(Some(to_item(key)))
                .build()
                .map_err(|err| StoreError::Rejected(err.to_string()))?;
            Ok(WriteRequest::builder().delete_request(delete).build())
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let output = inner
        .client
        .batch_write_item()
        .request_items(&inner.settings.table, requests)
        .send()
        .await
        .map_err(|err| map_error(&inner.settings.table, err))?;

    let unprocessed = output
        .unprocessed_items
        .and_then(|mut tables| tables.remove(&inner.settings.table))
        .unwrap_or_default();
    for request in unprocessed {
        let Some(key) = request.delete_request.map(|d| d.key) else {
            continue;
        };
        let key = normalised(&from_item(&key)?);
        if let Some(position) = by_key.iter().position(|(k, _)| *k == key) {
            removal.unprocessed.extend(by_key.swap_remove(position).1);
        }
    }
    Ok(removal)
}

/// How one gone connection's row is deleted.
pub(super) enum RowRemoval {
    /// The table's key holds the connection id, set from the id that
    /// answered 410: whatever else the key says, it names a row of that
    /// connection, so BatchWriteItem (which takes no condition) is safe.
    Batch(RowKey),
    /// The key does not hold the id (a table keyed by user, say, whose row
    /// is rewritten on reconnect): one DeleteItem, on condition that the
    /// row still holds that id (and the start it was read with).
    Conditional(RowKey),
}

impl Inner {
    /// The key to delete a gone connection's row by, built from the id that
    /// answered, never from a key a job carried; `None` when the row cannot
    /// be named.
    pub(super) fn removal_key(&self, connection: &Connection) -> Option<RowRemoval> {
        let id_attribute = &self.settings.key_attribute;
        let id_in_key = self.key.iter().any(|(name, _)| name == id_attribute);
        if !id_in_key {
            return connection.key.clone().map(RowRemoval::Conditional);
        }
        let read = connection
            .key
            .clone()
            .or_else(|| self.derived_key(&connection.id))?;
        let mut key = Vec::with_capacity(self.key.len());
        for (name, _) in &self.key {
            if name == id_attribute {
                key.push((name.clone(), KeyValue::S(connection.id.as_str().to_owned())));
            } else {
                let (_, value) = read.0.iter().find(|(n, _)| n == name)?;
                key.push((name.clone(), value.clone()));
            }
        }
        Some(RowRemoval::Batch(RowKey(key)))
    }

    /// Deletes a row whose key does not hold the connection id, only if it
    /// still holds that id (and, when read with one, that start):
    /// `Ok(false)` if it changed since.
    pub(super) async fn remove_if_same(
        &self,
        key: RowKey,
        connection: &Connection,
    ) -> Result<bool, StoreError> {
        let mut request = self
            .client
            .delete_item()
            .table_name(&self.settings.table)
            .set_key(Some(to_item(&key)))
            .expression_attribute_names("#id", &self.settings.key_attribute)
            .expression_attribute_values(":id", AttributeValue::S(connection.id.to_string()));
        let mut condition = "#id = :id".to_owned();
        if let (Some(age), Some(started)) = (&self.settings.expiry, connection.started_ms) {
            condition.push_str(" AND #started = :started");
            request = request
                .expression_attribute_names("#started", &age.attribute)
                .expression_attribute_values(":started", AttributeValue::N(started.to_string()));
        }
        deleted(
            &self.settings.table,
            request.condition_expression(condition).send().await,
        )
    }
}

/// A conditional DeleteItem's answer: `Ok(false)` when its condition
/// failed (the row changed since it was read, and is kept).
pub(super) fn deleted(
    table: &str,
    result: Result<
        aws_sdk_dynamodb::operation::delete_item::DeleteItemOutput,
        SdkError<aws_sdk_dynamodb::operation::delete_item::DeleteItemError, HttpResponse>,
    >,
) -> Result<bool, StoreError> {
    dynamo_errors::written(result).map_err(|failure| from_failure(table, failure))
}
