//! What DescribeTable says of the table, learned once at start-up: its
//! key, where channels and broadcasts to everyone read, and the
//! projection every read uses.

use std::collections::HashMap;
use std::sync::Arc;

use super::*;

/// The key schema of the table and of its global secondary indexes, as
/// DescribeTable gave them.
pub(super) struct Described {
    /// The table's primary key, partition key first.
    key: Vec<(String, ScalarAttributeType)>,
    /// The declared type of each key attribute of the table and its indexes.
    types: HashMap<String, ScalarAttributeType>,
    /// Each global secondary index: its partition key and its sort key.
    indexes: HashMap<String, (Option<String>, Option<String>)>,
}

impl Described {
    fn hash_of(&self, index: &str) -> Option<String> {
        self.indexes.get(index).and_then(|(hash, _)| hash.clone())
    }

    fn range_of(&self, index: &str) -> Option<String> {
        self.indexes.get(index).and_then(|(_, range)| range.clone())
    }
}

impl DynamoStore {
    /// Learns the table's key schema and checks the indexes the settings
    /// name, once.
    pub async fn connect(client: Client, settings: TableSettings) -> Result<Self, StoreError> {
        let described = describe(&client, &settings.table).await?;
        let (channel_order, channel_source) = channel_layout(&settings, &described)?;
        check_audiences(&settings, &described)?;
        let whole_table =
            whole_table_source(&settings, &described.key, |index| described.hash_of(index))?;
        let (projection, projection_names) = projection(&settings, &described.key);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                settings,
                key: described.key,
                projection,
                projection_names,
                channel_order,
                channel_source,
                whole_table,
            }),
        })
    }
}

/// DescribeTable's answer, in plain terms.
async fn describe(client: &Client, table_name: &str) -> Result<Described, StoreError> {
    let output = client
        .describe_table()
        .table_name(table_name)
        .send()
        .await
        .map_err(|err| map_error(table_name, err))?;
    let table = output.table().ok_or_else(|| {
        StoreError::Rejected(format!("DescribeTable returned nothing for {table_name}"))
    })?;
    let types: HashMap<String, ScalarAttributeType> = table
        .attribute_definitions()
        .iter()
        .map(|def| {
            (
                def.attribute_name().to_owned(),
                def.attribute_type().clone(),
            )
        })
        .collect();
    let mut key = Vec::new();
    for kind in [KeyType::Hash, KeyType::Range] {
        if let Some(element) = table.key_schema().iter().find(|e| e.key_type() == &kind) {
            let name = element.attribute_name();
            let scalar = types.get(name).cloned().ok_or_else(|| {
                StoreError::Rejected(format!(
                    "the table {table_name} declares no type for its key attribute {name}"
                ))
            })?;
            key.push((name.to_owned(), scalar));
        }
    }
    if key.is_empty() {
        return Err(StoreError::Rejected(format!(
            "DescribeTable returned no key schema for {table_name}"
        )));
    }
    let attribute = |schema: &[aws_sdk_dynamodb::types::KeySchemaElement], kind: KeyType| {
        schema
            .iter()
            .find(|e| e.key_type() == &kind)
            .map(|e| e.attribute_name().to_owned())
    };
    let mut indexes = HashMap::new();
    for gsi in table.global_secondary_indexes() {
        if let Some(name) = gsi.index_name() {
            let schema = gsi.key_schema();
            let hash = attribute(schema, KeyType::Hash);
            let range = attribute(schema, KeyType::Range);
            indexes.entry(name.to_owned()).or_insert((hash, range));
        }
    }
    Ok(Described {
        key,
        types,
        indexes,
    })
}

/// How a channel's rows are laid out and where a channel is read: the
/// channel index, or (`None`) the table itself when its key is the
/// channel, then the id.
fn channel_layout(
    settings: &TableSettings,
    described: &Described,
) -> Result<(ChannelOrder, Option<String>), StoreError> {
    let mut channel_order = ChannelOrder::Disjoint;
    let mut channel_source = settings.channel_index.clone();
    let Some(index) = &settings.channel_index else {
        return Ok((channel_order, channel_source));
    };
    let key = &described.key;
    let id_is_text = described.types.get(&settings.key_attribute) == Some(&ScalarAttributeType::S);
    let index_sorted_by_id =
        described.range_of(index).as_deref() == Some(settings.key_attribute.as_str());
    let table_sorted_by_id = matches!(
        key.as_slice(),
        [(hash, _), (range, _)]
            if *hash == settings.channel_attribute && *range == settings.key_attribute
    );
    if id_is_text && index_sorted_by_id {
        channel_order = ChannelOrder::ById;
    } else if id_is_text && table_sorted_by_id {
        channel_order = ChannelOrder::ById;
        channel_source = None;
    } else if key.len() > 1 {
        tracing::warn!(
            table = %settings.table,
            index = %index,
            "the table's key is composite but neither it nor the channel index is sorted \
             by the connection id: jobs with `channels` assume each connection is in one \
             channel, and send twice to one that is in two"
        );
    }
    match described.hash_of(index) {
        None => Err(StoreError::Rejected(format!(
            "the table {} has no global secondary index {index}; create one keyed \
             by {} or fix FANOUT_CHANNEL_INDEX",
            settings.table, settings.channel_attribute
        ))),
        Some(attr) if attr != settings.channel_attribute => Err(StoreError::Rejected(format!(
            "the index {index} of {} is keyed by {attr}, not by the channel \
             attribute {}; fix FANOUT_CHANNEL_INDEX or FANOUT_CHANNEL_ATTRIBUTE",
            settings.table, settings.channel_attribute
        ))),
        Some(_) => Ok((channel_order, channel_source)),
    }
}

/// Each named audience's index exists and is keyed by its attribute.
fn check_audiences(settings: &TableSettings, described: &Described) -> Result<(), StoreError> {
    for audience in &settings.audiences {
        let index = &audience.index;
        match described.hash_of(index) {
            None if !described.indexes.contains_key(index) => {
                return Err(StoreError::Rejected(format!(
                    "the table {} has no global secondary index {index} for the audience \
                     {}; create one keyed by {} or fix FANOUT_AUDIENCE_INDEXES",
                    settings.table, audience.name, audience.attribute
                )));
            }
            Some(attr) if attr == audience.attribute => {}
            other => {
                return Err(StoreError::Rejected(format!(
                    "the index {index} of {} is keyed by {}, not by {} as \
                     FANOUT_AUDIENCE_INDEXES says for the audience {}",
                    settings.table,
                    other.unwrap_or_default(),
                    audience.attribute,
                    audience.name
                )));
            }
        }
    }
    Ok(())
}

/// What every read projects: the key attributes, the connection id and
/// the start attribute, as `#a0, #a1, …` with their names (attribute names
/// can be reserved words, `connection` for one).
fn projection(
    settings: &TableSettings,
    key: &[(String, ScalarAttributeType)],
) -> (String, HashMap<String, String>) {
    let mut projected: Vec<&str> = key.iter().map(|(name, _)| name.as_str()).collect();
    if !projected.contains(&settings.key_attribute.as_str()) {
        projected.push(&settings.key_attribute);
    }
    if let Some(age) = &settings.expiry
        && !projected.contains(&age.attribute.as_str())
    {
        projected.push(&age.attribute);
    }
    let projection_names: HashMap<String, String> = projected
        .iter()
        .enumerate()
        .map(|(i, name)| (format!("#a{i}"), (*name).to_owned()))
        .collect();
    let mut placeholders: Vec<&String> = projection_names.keys().collect();
    placeholders.sort();
    let projection = placeholders
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    (projection, projection_names)
}

/// Where a broadcast to everyone reads. One row per connection (a table
/// keyed by the id, or by something else alone, such as the user), or a
/// table partitioned by the id: the table, whose Scan keeps a connection's
/// rows together. Otherwise (a table keyed by channel, then id) a
/// connection can have rows far apart in a Scan, so the connection index,
/// checked here, or a refusal for such jobs.
pub(super) fn whole_table_source(
    settings: &TableSettings,
    key: &[(String, ScalarAttributeType)],
    index_hash: impl Fn(&str) -> Option<String>,
) -> Result<Result<Option<String>, String>, StoreError> {
    let id = &settings.key_attribute;
    let several_rows = key.len() > 1 && key[0].0 != *id;
    if let Some(index) = &settings.connection_index {
        return match index_hash(index) {
            Some(attr) if attr == *id => {
                tracing::info!(table = %settings.table, index = %index, "broadcasts to everyone read the connection index, keyed by {id}");
                Ok(Ok(Some(index.clone())))
            }
            Some(attr) => Err(StoreError::Rejected(format!(
                "the index {index} of {} is keyed by {attr}, not by the connection id {id}; fix \
                 FANOUT_CONNECTION_INDEX",
                settings.table
            ))),
            None => Err(StoreError::Rejected(format!(
                "the table {} has no global secondary index {index}; create one keyed by {id} \
                 or fix FANOUT_CONNECTION_INDEX",
                settings.table
            ))),
        };
    }
    if !several_rows {
        return Ok(Ok(None));
    }
    let reason = format!(
        "the table {} is keyed by {}, so a connection can have several rows, and a Scan returns \
         them far apart: a broadcast to everyone would reach such a connection once per row. Set \
         FANOUT_CONNECTION_INDEX to a global secondary index keyed by {id}; until then, broadcasts \
         to everyone are refused (channels and named audiences still work)",
        settings.table,
        key.iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" + ")
    );
    tracing::warn!(table = %settings.table, "{reason}");
    Ok(Err(reason))
}
