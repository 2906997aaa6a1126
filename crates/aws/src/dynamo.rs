//! [`ConnectionStore`] on DynamoDB: the audience as pages of a Scan (in
//! parallel segments), a Query on the channel index or on a named
//! audience's index, or an explicit list; and gone connections deleted 25 at
//! a time by their full row key.
//!
//! DescribeTable at startup tells the channel layout: a channel index whose
//! sort key is the connection id (one row per (channel, connection)) reads a
//! channel in id order, so several channels merge without repeats
//! ([`ChannelOrder::ById`]); any other index is taken to hold one channel per
//! connection ([`ChannelOrder::Disjoint`]).
//!
//! Reads project only the key attributes and the connection id, so a page of
//! 1,000 rows stays small whatever else the rows carry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

use crate::dynamo_errors::{self, Failure};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeValue, DeleteRequest, KeyType, ScalarAttributeType, WriteRequest,
};
use futures::StreamExt;
use futures::stream::{self, BoxStream};

use fanout_core::connection::expiry::{Age, AgeProblems, Expired, ExpiryRule, classify, epoch_ms};
use fanout_core::connection::{Connection, ConnectionId, KeyValue, RowKey};
use fanout_core::store::{
    AudienceQuery, ChannelOrder, ConnectionStore, Cursor, MAX_REMOVE_BATCH, Page, Position,
    Removal, StoreError,
};

use fanout_core::limits::{MAX_PAGE_SIZE, MAX_SCAN_SEGMENTS as MAX_SEGMENTS};

type Item = HashMap<String, AttributeValue>;

/// Which table to read, and how.
#[derive(Clone, Debug)]
pub struct TableSettings {
    pub table: String,
    /// The attribute holding the connection id.
    pub key_attribute: String,
    /// A GSI whose partition key is `channel_attribute`; needed for
    /// [`AudienceQuery::Channel`].
    pub channel_index: Option<String>,
    pub channel_attribute: String,
    /// Named audiences for `to`, each a GSI and its partition key.
    pub audiences: Vec<AudienceIndex>,
    /// A GSI whose partition key is the id attribute, read for broadcasts
    /// to everyone where a connection can have several rows (a table keyed
    /// by channel, then id): it keeps each connection's rows together, so
    /// each connection is sent to once.
    pub connection_index: Option<String>,
    /// Rows per page (1 to 1,000).
    pub page_size: u32,
    /// The attribute holding each connection's start (epoch ms), and the
    /// rule that reads it: rows certainly gone by age are removed without a
    /// post. `None`: every row is posted to.
    pub expiry: Option<AgeSettings>,
}

/// Where a row's start is, and how old is too old.
#[derive(Clone, Debug)]
pub struct AgeSettings {
    pub attribute: String,
    pub rule: Arc<ExpiryRule>,
}

/// One named audience: `to: {name: value}` reads the rows of `index` whose
/// `attribute` equals `value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AudienceIndex {
    pub name: String,
    /// A GSI of the connections table.
    pub index: String,
    /// That index's partition key.
    pub attribute: String,
}

/// The connections table.
#[derive(Clone, Debug)]
pub struct DynamoStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client,
    settings: TableSettings,
    /// The table's primary key, partition key first, as learned from
    /// DescribeTable: a gone row is deleted by all of it.
    key: Vec<(String, ScalarAttributeType)>,
    /// `#a0, #a1, …`: the key attributes and the id attribute.
    projection: String,
    /// The placeholders of `projection` (attribute names can be reserved
    /// words, `connection` for one).
    projection_names: HashMap<String, String>,
    /// Learned from the key schemas of the table and the channel index.
    channel_order: ChannelOrder,
    /// Where a channel is read: the channel index, or (`None`) the table
    /// itself when its key is the channel, then the id.
    channel_source: Option<String>,
    /// Where a broadcast to everyone reads: the table (`Ok(None)`), the
    /// connection index (`Ok(Some)`), or nowhere, with why.
    whole_table: Result<Option<String>, String>,
}

impl DynamoStore {
    /// Learns the table's key schema and checks the channel index, once.
    pub async fn connect(client: Client, settings: TableSettings) -> Result<Self, StoreError> {
        let output = client
            .describe_table()
            .table_name(&settings.table)
            .send()
            .await
            .map_err(|err| map_error(&settings.table, err))?;
        let table = output.table().ok_or_else(|| {
            StoreError::Rejected(format!(
                "DescribeTable returned nothing for {}",
                settings.table
            ))
        })?;

        let type_of = |name: &str| {
            table
                .attribute_definitions()
                .iter()
                .find(|def| def.attribute_name() == name)
                .map(|def| def.attribute_type().clone())
        };
        let mut key = Vec::new();
        for kind in [KeyType::Hash, KeyType::Range] {
            if let Some(element) = table.key_schema().iter().find(|e| e.key_type() == &kind) {
                let name = element.attribute_name();
                let scalar = type_of(name).ok_or_else(|| {
                    StoreError::Rejected(format!(
                        "the table {} declares no type for its key attribute {name}",
                        settings.table
                    ))
                })?;
                key.push((name.to_owned(), scalar));
            }
        }
        if key.is_empty() {
            return Err(StoreError::Rejected(format!(
                "DescribeTable returned no key schema for {}",
                settings.table
            )));
        }

        // An index's attribute of one key type, if it has the index.
        let index_key = |index: &str, kind: KeyType| {
            table
                .global_secondary_indexes()
                .iter()
                .filter(|gsi| gsi.index_name() == Some(index))
                .flat_map(|gsi| gsi.key_schema())
                .find(|e| e.key_type() == &kind)
                .map(|e| e.attribute_name().to_owned())
        };
        let has_index = |index: &str| {
            table
                .global_secondary_indexes()
                .iter()
                .any(|gsi| gsi.index_name() == Some(index))
        };
        let mut channel_order = ChannelOrder::Disjoint;
        let mut channel_source = settings.channel_index.clone();
        if let Some(index) = &settings.channel_index {
            let id_is_text = type_of(&settings.key_attribute) == Some(ScalarAttributeType::S);
            let index_sorted_by_id = index_key(index, KeyType::Range).as_deref()
                == Some(settings.key_attribute.as_str());
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
            match index_key(index, KeyType::Hash) {
                None => {
                    return Err(StoreError::Rejected(format!(
                        "the table {} has no global secondary index {index}; create one keyed \
                         by {} or fix FANOUT_CHANNEL_INDEX",
                        settings.table, settings.channel_attribute
                    )));
                }
                Some(attr) if attr != settings.channel_attribute => {
                    return Err(StoreError::Rejected(format!(
                        "the index {index} of {} is keyed by {attr}, not by the channel \
                         attribute {}; fix FANOUT_CHANNEL_INDEX or FANOUT_CHANNEL_ATTRIBUTE",
                        settings.table, settings.channel_attribute
                    )));
                }
                Some(_) => {}
            }
        }

        for audience in &settings.audiences {
            let index = &audience.index;
            match index_key(index, KeyType::Hash) {
                None if !has_index(index) => {
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

        let whole_table =
            whole_table_source(&settings, &key, |index| index_key(index, KeyType::Hash))?;

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

        Ok(Self {
            inner: Arc::new(Inner {
                client,
                settings,
                key,
                projection,
                projection_names,
                channel_order,
                channel_source,
                whole_table,
            }),
        })
    }
}

/// Where a broadcast to everyone reads. One row per connection (a table
/// keyed by the id, or by something else alone, such as the user), or a
/// table partitioned by the id: the table, whose Scan keeps a connection's
/// rows together. Otherwise (a table keyed by channel, then id) a
/// connection can have rows far apart in a Scan, so the connection index,
/// checked here, or a refusal for such jobs.
fn whole_table_source(
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

/// How one segment's pages are read.
#[derive(Clone, Debug)]
enum Read {
    Scan {
        /// `None`: the table itself.
        index: Option<String>,
        segment: u32,
        total_segments: u32,
    },
    /// The rows of `index` whose partition key `attribute` is `value`;
    /// with `after`, only those whose sort key (the connection id) is
    /// greater.
    Query {
        /// `None`: the table itself.
        index: Option<String>,
        attribute: String,
        value: String,
        after: Option<String>,
    },
}

impl ConnectionStore for DynamoStore {
    fn pages(
        &self,
        audience: &AudienceQuery,
        from: Option<Vec<Cursor>>,
    ) -> BoxStream<'static, Result<Page, StoreError>> {
        let inner = self.inner.clone();
        let whole_table = match (&inner.whole_table, audience) {
            (Err(reason), AudienceQuery::All { .. } | AudienceQuery::Segment { .. }) => {
                let err = StoreError::NeedsConnectionIndex(reason.clone());
                return stream::once(async { Err(err) }).boxed();
            }
            (Ok(index), _) => index.clone(),
            (Err(_), _) => None,
        };
        match audience {
            AudienceQuery::All { segments } => {
                let total = (*segments).clamp(1, MAX_SEGMENTS);
                let mut streams = Vec::new();
                for segment in 0..total {
                    let start = match start_of(from.as_deref(), segment) {
                        Ok(Some(start)) => start,
                        Ok(None) => continue, // finished before
                        Err(err) => return stream::once(async { Err(err) }).boxed(),
                    };
                    let read = Read::Scan {
                        index: whole_table.clone(),
                        segment,
                        total_segments: total,
                    };
                    streams.push(segment_pages(inner.clone(), read, segment, start));
                }
                stream::select_all(streams).boxed()
            }
            AudienceQuery::Segment { index, total } => {
                let total = (*total).clamp(1, MAX_SEGMENTS);
                let segment = (*index).min(total - 1);
                match start_of(from.as_deref(), segment) {
                    Ok(Some(start)) => {
                        let read = Read::Scan {
                            index: whole_table,
                            segment,
                            total_segments: total,
                        };
                        segment_pages(inner, read, segment, start)
                    }
                    Ok(None) => stream::empty().boxed(),
                    Err(err) => stream::once(async { Err(err) }).boxed(),
                }
            }
            AudienceQuery::Channel(channel) => {
                if inner.settings.channel_index.is_none() {
                    return stream::once(async { Err(StoreError::NoChannelIndex) }).boxed();
                }
                let index = inner.channel_source.clone();
                let attribute = inner.settings.channel_attribute.clone();
                query_pages(inner, index, attribute, channel.clone(), from.as_deref())
            }
            AudienceQuery::Audience { name, value } => {
                let Some(audience) = inner.settings.audiences.iter().find(|a| a.name == *name)
                else {
                    let err = StoreError::NoAudienceIndex { name: name.clone() };
                    return stream::once(async { Err(err) }).boxed();
                };
                let (index, attribute) = (Some(audience.index.clone()), audience.attribute.clone());
                query_pages(inner, index, attribute, value.clone(), from.as_deref())
            }
            AudienceQuery::Explicit(ids) => {
                let offset = match from
                    .as_deref()
                    .and_then(|c| c.iter().find(|c| c.segment == 0))
                {
                    None => 0,
                    Some(Cursor { position: None, .. }) => return stream::empty().boxed(),
                    Some(Cursor {
                        position: Some(Position::Offset(offset)),
                        ..
                    }) => *offset,
                    Some(other) => {
                        let err = StoreError::Rejected(format!(
                            "an explicit audience resumes from an offset, not from {other:?}"
                        ));
                        return stream::once(async { Err(err) }).boxed();
                    }
                };
                explicit_pages(inner, ids.clone(), offset)
            }
        }
    }

    async fn remove_expired(&self, row: Expired) -> Result<bool, StoreError> {
        let inner = &self.inner;
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

    fn channel_order(&self) -> ChannelOrder {
        self.inner.channel_order
    }

    async fn remove(&self, gone: Vec<Connection>) -> Result<Removal, StoreError> {
        if gone.len() > MAX_REMOVE_BATCH {
            return Err(StoreError::Rejected(format!(
                "{} rows in one removal; BatchWriteItem takes at most {MAX_REMOVE_BATCH}, so \
                 split the batch",
                gone.len()
            )));
        }
        let inner = &self.inner;
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
}

/// How one gone connection's row is deleted.
enum RowRemoval {
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
    fn removal_key(&self, connection: &Connection) -> Option<RowRemoval> {
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
    async fn remove_if_same(
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
fn deleted(
    table: &str,
    result: Result<
        aws_sdk_dynamodb::operation::delete_item::DeleteItemOutput,
        SdkError<aws_sdk_dynamodb::operation::delete_item::DeleteItemError, HttpResponse>,
    >,
) -> Result<bool, StoreError> {
    match result {
        Ok(_) => Ok(true),
        Err(err)
            if err
                .as_service_error()
                .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
        {
            Ok(false)
        }
        Err(err) => Err(map_error(table, err)),
    }
}

impl DynamoStore {
    /// The age rule it reads rows with, for the clock check to turn off.
    pub fn age_rule(&self) -> Option<Arc<ExpiryRule>> {
        self.inner.settings.expiry.as_ref().map(|a| a.rule.clone())
    }
}

/// Where segment `segment` starts: `Ok(None)` if its cursor says it is done,
/// `Ok(Some(None))` from the beginning, `Ok(Some(Some(key)))` after `key`.
fn start_of(from: Option<&[Cursor]>, segment: u32) -> Result<Option<Option<Item>>, StoreError> {
    // A segment without a cursor starts over: reading a page twice sends
    // duplicates, skipping one would lose an audience.
    let Some(cursor) = from.and_then(|c| c.iter().find(|c| c.segment == segment)) else {
        return Ok(Some(None));
    };
    match &cursor.position {
        None => Ok(None),
        Some(Position::Key(key)) => Ok(Some(Some(to_item(key)))),
        Some(Position::Offset(_)) => Err(StoreError::Rejected(format!(
            "a table read resumes from a key, not from an offset (segment {segment})"
        ))),
        Some(Position::After { .. }) => Err(StoreError::Rejected(format!(
            "only a Query on an index sorted by the connection id resumes after an id \
             (segment {segment})"
        ))),
    }
}

/// A Query's pages from its cursor: a LastEvaluatedKey, or (in a merge of
/// channels) after a connection id, which the key condition expresses on a
/// sort key that is the id.
fn query_pages(
    inner: Arc<Inner>,
    index: Option<String>,
    attribute: String,
    value: String,
    from: Option<&[Cursor]>,
) -> BoxStream<'static, Result<Page, StoreError>> {
    let after = from
        .and_then(|c| c.iter().find(|c| c.segment == 0))
        .and_then(|c| match &c.position {
            Some(Position::After { after }) => Some(after.to_string()),
            _ => None,
        });
    if after.is_some() && inner.channel_order != ChannelOrder::ById {
        let err = StoreError::Rejected(format!(
            "the index {} is not sorted by {}, so it cannot resume after an id",
            index.as_deref().unwrap_or("(the table)"),
            inner.settings.key_attribute
        ));
        return stream::once(async { Err(err) }).boxed();
    }
    let start = if after.is_some() {
        Ok(Some(None))
    } else {
        start_of(from, 0)
    };
    match start {
        Ok(Some(start)) => {
            let read = Read::Query {
                index,
                attribute,
                value,
                after,
            };
            segment_pages(inner, read, 0, start)
        }
        Ok(None) => stream::empty().boxed(),
        Err(err) => stream::once(async { Err(err) }).boxed(),
    }
}

/// One segment's pages, read one at a time as the consumer asks for them.
fn segment_pages(
    inner: Arc<Inner>,
    read: Read,
    segment: u32,
    start: Option<Item>,
) -> BoxStream<'static, Result<Page, StoreError>> {
    // State: None once the segment is finished (or failed); with the last
    // connection id of the page before, whose rows may go on in this one.
    stream::unfold(Some((start, None)), move |state| {
        let inner = inner.clone();
        let read = read.clone();
        async move {
            let (start, before) = state?;
            match inner.read_page(&read, start).await {
                Ok((items, last)) => {
                    let next_start = last.clone();
                    let position = match last.as_ref().map(from_item).transpose() {
                        Ok(key) => key.map(Position::Key),
                        Err(err) => return Some((Err(err), None)),
                    };
                    let mut page = inner.page(items, Cursor { segment, position });
                    let after = together(&mut page, before);
                    Some((Ok(page), next_start.map(|start| (Some(start), after))))
                }
                Err(err) => Some((Err(err), None)),
            }
        }
    })
    .boxed()
}

/// Sends each connection once where its rows come together (a Scan of a
/// table or index partitioned by the id, a Query sorted by it): a row whose
/// id is the one before it, on this page or at the end of the page
/// `before`, becomes a duplicate, removed with its connection if that is
/// gone. Returns the page's last id, for the next page.
fn together(page: &mut Page, before: Option<ConnectionId>) -> Option<ConnectionId> {
    let mut last = before;
    let rows = std::mem::take(&mut page.connections);
    for row in rows {
        if last.as_ref() == Some(&row.id) {
            page.duplicates.push(row);
        } else {
            last = Some(row.id.clone());
            page.connections.push(row);
        }
    }
    last
}

/// An explicit list in pages of `page_size`, from `offset`.
fn explicit_pages(
    inner: Arc<Inner>,
    ids: Vec<ConnectionId>,
    offset: usize,
) -> BoxStream<'static, Result<Page, StoreError>> {
    let page_size = inner.page_size() as usize;
    let total = ids.len();
    let starts = (offset.min(total)..total).step_by(page_size);
    stream::iter(starts)
        .map(move |start| {
            let end = (start + page_size).min(total);
            let connections = ids[start..end]
                .iter()
                .map(|id| Connection::new(id.clone(), inner.derived_key(id)))
                .collect();
            let position = (end < total).then_some(Position::Offset(end));
            Ok(Page::new(
                connections,
                Cursor {
                    segment: 0,
                    position,
                },
            ))
        })
        .boxed()
}

impl Inner {
    fn page_size(&self) -> u32 {
        self.settings.page_size.clamp(1, MAX_PAGE_SIZE)
    }

    /// One Scan or Query page: its items and LastEvaluatedKey.
    async fn read_page(
        &self,
        read: &Read,
        start: Option<Item>,
    ) -> Result<(Vec<Item>, Option<Item>), StoreError> {
        let table = &self.settings.table;
        let limit = self.page_size() as i32;
        match read {
            Read::Scan {
                index,
                segment,
                total_segments,
            } => {
                let mut request = self
                    .client
                    .scan()
                    .table_name(table)
                    .set_index_name(index.clone())
                    .limit(limit)
                    .projection_expression(&self.projection)
                    .set_expression_attribute_names(Some(self.projection_names.clone()))
                    .set_exclusive_start_key(start);
                if *total_segments > 1 {
                    request = request
                        .segment(*segment as i32)
                        .total_segments(*total_segments as i32);
                }
                let output = request.send().await.map_err(|err| map_error(table, err))?;
                Ok((output.items.unwrap_or_default(), output.last_evaluated_key))
            }
            Read::Query {
                index,
                attribute,
                value,
                after,
            } => {
                let mut names = self.projection_names.clone();
                names.insert("#c".to_owned(), attribute.clone());
                let mut values =
                    HashMap::from([(":c".to_owned(), AttributeValue::S(value.clone()))]);
                let condition = match after {
                    Some(after) => {
                        names.insert("#k".to_owned(), self.settings.key_attribute.clone());
                        values.insert(":k".to_owned(), AttributeValue::S(after.clone()));
                        "#c = :c AND #k > :k"
                    }
                    None => "#c = :c",
                };
                let output = self
                    .client
                    .query()
                    .table_name(table)
                    .set_index_name(index.clone())
                    .key_condition_expression(condition)
                    .set_expression_attribute_values(Some(values))
                    .set_expression_attribute_names(Some(names))
                    .projection_expression(&self.projection)
                    .limit(limit)
                    .set_exclusive_start_key(start)
                    .send()
                    .await
                    .map_err(|err| map_error(table, err))?;
                Ok((output.items.unwrap_or_default(), output.last_evaluated_key))
            }
        }
    }

    /// A page of rows: those certainly gone by age apart, the rest to post
    /// to.
    fn page(&self, items: Vec<Item>, next: Cursor) -> Page {
        let rule = self.settings.expiry.as_ref().filter(|age| age.rule.is_on());
        let Some(age) = rule else {
            return Page::new(self.connections(items), next);
        };
        let mut started = Vec::with_capacity(items.len());
        for item in &items {
            started.push(match item.get(&age.attribute) {
                None => None,
                Some(AttributeValue::N(n)) => Some(n.clone()),
                // A string or any other type is not a number of ms.
                Some(_) => Some(String::new()),
            });
        }
        // One reading of the clock for the page: its rows were read at once.
        let now_ms = epoch_ms(SystemTime::now());
        let margin = age.rule.margin();
        let mut page = Page::new(Vec::new(), next);
        let mut problems = AgeProblems::default();
        for (connection, started) in self.connections_with(items).zip(started) {
            let Some((connection, started)) = connection.map(|c| (c, started)) else {
                continue;
            };
            match classify(started.as_deref(), now_ms, margin) {
                Age::Expired { started_ms } if connection.key.is_some() => {
                    page.expired.push(Expired {
                        connection,
                        started_ms,
                    });
                }
                Age::Unknown(problem) => {
                    problems.add(&connection.id, problem);
                    page.connections.push(connection);
                }
                // A trusted start: the evidence rule can tell an
                // established connection from one still connecting.
                _ => {
                    let started_ms = started.as_deref().and_then(|s| s.trim().parse().ok());
                    page.connections.push(Connection {
                        started_ms,
                        ..connection
                    });
                }
            }
        }
        page.age_problems = problems;
        page
    }

    /// The page's connections; rows without a string id are skipped, as one
    /// bad row must not fail a broadcast to everyone else.
    fn connections(&self, items: Vec<Item>) -> Vec<Connection> {
        self.connections_with(items).flatten().collect()
    }

    /// Each row's connection, `None` for a row without a usable id, in
    /// order.
    fn connections_with(&self, items: Vec<Item>) -> impl Iterator<Item = Option<Connection>> + '_ {
        let id_attribute = &self.settings.key_attribute;
        items.into_iter().map(move |item| {
            let Some(AttributeValue::S(id)) = item.get(id_attribute) else {
                tracing::warn!(
                    table = %self.settings.table,
                    attribute = %id_attribute,
                    "a connection row has no string id attribute; skipped"
                );
                return None;
            };
            let key = self.row_key(&item);
            if key.is_none() {
                tracing::warn!(
                    table = %self.settings.table,
                    connection = %id,
                    "a connection row lacks part of the table key; it will not be removed if gone"
                );
            }
            Some(Connection::new(id.as_str(), key))
        })
    }

    /// The row's full primary key, in schema order.
    fn row_key(&self, item: &Item) -> Option<RowKey> {
        self.key
            .iter()
            .map(|(name, _)| Some((name.clone(), key_value(item.get(name)?)?)))
            .collect::<Option<Vec<_>>>()
            .map(RowKey)
    }

    /// The key of an id's row, when the id alone is the table's key.
    fn derived_key(&self, id: &ConnectionId) -> Option<RowKey> {
        match self.key.as_slice() {
            [(name, ScalarAttributeType::S)] if *name == self.settings.key_attribute => Some(
                RowKey(vec![(name.clone(), KeyValue::S(id.as_str().to_owned()))]),
            ),
            _ => None,
        }
    }
}

fn key_value(value: &AttributeValue) -> Option<KeyValue> {
    match value {
        AttributeValue::S(s) => Some(KeyValue::S(s.clone())),
        AttributeValue::N(n) => Some(KeyValue::N(n.clone())),
        AttributeValue::B(b) => Some(KeyValue::B(b.as_ref().to_vec())),
        _ => None,
    }
}

/// A key as the SDK wants it.
fn to_item(key: &RowKey) -> Item {
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
fn from_item(item: &Item) -> Result<RowKey, StoreError> {
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
fn normalised(key: &RowKey) -> RowKey {
    let mut attributes = key.0.clone();
    attributes.sort_by(|a, b| a.0.cmp(&b.0));
    RowKey(attributes)
}

/// One place that turns SDK failures into [`StoreError`]s.
fn map_error<E>(table: &str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    from_failure(table, dynamo_errors::classify(&err))
}

/// What an error answer from DynamoDB means, by its code and status.
#[cfg(test)]
fn service_error(table: &str, status: u16, code: &str, message: &str) -> StoreError {
    from_failure(table, dynamo_errors::answer(status, code, message))
}

fn from_failure(table: &str, failure: Failure) -> StoreError {
    match failure {
        Failure::NoSuchTable => StoreError::NoSuchTable {
            table: table.to_owned(),
        },
        Failure::Throttled(detail) => StoreError::Throttled(detail),
        Failure::Unavailable(detail) => StoreError::Unavailable(detail),
        Failure::Rejected(detail) => StoreError::Rejected(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pairs: &[(&str, &str)]) -> RowKey {
        RowKey(
            pairs
                .iter()
                .map(|(n, v)| ((*n).to_owned(), KeyValue::S((*v).to_owned())))
                .collect(),
        )
    }

    #[test]
    fn error_answers_map_by_code_then_status() {
        let map = |status, code| service_error("connections", status, code, "message");
        assert!(matches!(
            map(400, "ResourceNotFoundException"),
            StoreError::NoSuchTable { table } if table == "connections"
        ));
        for code in [
            "ProvisionedThroughputExceededException",
            "RequestLimitExceeded",
            "ThrottlingException",
        ] {
            let err = map(400, code);
            assert!(matches!(err, StoreError::Throttled(_)), "{code}: {err:?}");
            assert!(err.is_transient());
        }
        assert!(matches!(
            map(500, "InternalServerError"),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(map(503, ""), StoreError::Unavailable(_)));
        let err = map(400, "ValidationException");
        assert!(matches!(err, StoreError::Rejected(_)), "{err:?}");
        assert!(!err.is_transient());
    }

    #[test]
    fn keys_compare_whatever_their_attribute_order() {
        let a = key(&[("channel", "c"), ("connectionId", "x")]);
        let b = key(&[("connectionId", "x"), ("channel", "c")]);
        assert_ne!(a, b);
        assert_eq!(normalised(&a), normalised(&b));
    }

    #[test]
    fn keys_survive_the_round_trip_through_the_sdk_shape() {
        let key = RowKey(vec![
            ("b".to_owned(), KeyValue::B(vec![0, 255])),
            ("n".to_owned(), KeyValue::N("42".to_owned())),
            ("s".to_owned(), KeyValue::S("x".to_owned())),
        ]);
        assert_eq!(from_item(&to_item(&key)).expect("scalar key"), key);
    }

    #[test]
    fn a_non_scalar_key_attribute_is_refused() {
        let item = Item::from([("k".to_owned(), AttributeValue::Bool(true))]);
        assert!(from_item(&item).is_err());
    }

    #[test]
    fn a_done_cursor_skips_its_segment_and_a_missing_one_starts_over() {
        let cursors = [
            Cursor {
                segment: 0,
                position: None,
            },
            Cursor {
                segment: 1,
                position: Some(Position::Key(key(&[("connectionId", "x")]))),
            },
        ];
        assert_eq!(start_of(Some(&cursors), 0).expect("valid"), None);
        let resumed = start_of(Some(&cursors), 1)
            .expect("valid")
            .expect("not done");
        assert_eq!(
            resumed.expect("a start key")["connectionId"],
            AttributeValue::S("x".to_owned())
        );
        assert_eq!(start_of(Some(&cursors), 2).expect("valid"), Some(None));
        assert_eq!(start_of(None, 0).expect("valid"), Some(None));
    }
}
