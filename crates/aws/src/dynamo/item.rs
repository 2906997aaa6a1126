//! Keys between fanout's shape and the SDK's, and SDK failures as
//! [`StoreError`]s.

use super::*;

/// As [`key_value`], taking the value.
pub(super) fn into_key_value(value: AttributeValue) -> Option<KeyValue> {
    match value {
        AttributeValue::S(s) => Some(KeyValue::S(s)),
        AttributeValue::N(n) => Some(KeyValue::N(n)),
        AttributeValue::B(b) => Some(KeyValue::B(b.into_inner())),
        _ => None,
    }
}

pub(super) fn key_value(value: &AttributeValue) -> Option<KeyValue> {
    match value {
        AttributeValue::S(s) => Some(KeyValue::S(s.clone())),
        AttributeValue::N(n) => Some(KeyValue::N(n.clone())),
        AttributeValue::B(b) => Some(KeyValue::B(b.as_ref().to_vec())),
        _ => None,
    }
}

/// A key as the SDK wants it.
pub(super) fn to_item(key: &RowKey) -> Item {
    key.0
        .iter()
        .map(|(name, value)| {
            let value = match value {
                KeyValue::S(s) => AttributeValue::S(s.clone()),
                KeyValue::N(n) => AttributeValue::N(n.clone()),
                KeyValue::B(b) => AttributeValue::B(Blob::new(b.clone())),
            };
            (name.clone(), value)
        })
        .collect()
}

/// A key (or LastEvaluatedKey) from the SDK, attributes sorted by name.
pub(super) fn from_item(item: &Item) -> Result<RowKey, StoreError> {
    let mut key = item
        .iter()
        .map(|(name, value)| {
            key_value(value).map(|v| (name.clone(), v)).ok_or_else(|| {
                StoreError::Rejected(format!(
                    "the key attribute {name} is not a string, number or binary"
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    key.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(RowKey(key))
}

/// The same key whatever order its attributes were listed in.
pub(super) fn normalised(key: &RowKey) -> RowKey {
    let mut attributes = key.0.clone();
    attributes.sort_by(|a, b| a.0.cmp(&b.0));
    RowKey(attributes)
}

crate::dynamo_errors::table_errors!(pub(super) StoreError);
