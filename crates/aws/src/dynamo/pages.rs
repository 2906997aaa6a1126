//! The audience as pages: a Scan in parallel segments, a Query on an
//! index, or an explicit list, each resumable from its cursor.

use std::collections::HashMap;
use std::sync::Arc;

use super::*;

pub(super) fn pages(
    inner: Arc<Inner>,
    audience: &AudienceQuery,
    from: Option<Vec<Cursor>>,
) -> BoxStream<'static, Result<Page, StoreError>> {
    let whole_table = match (&inner.whole_table, audience) {
        (Err(reason), AudienceQuery::All { .. } | AudienceQuery::Segment { .. }) => {
            let err = StoreError::NeedsConnectionIndex(reason.clone());
            return stream::once(async { Err(err) }).boxed();
        }
        (Ok(index), _) => index.clone(),
        (Err(_), _) => None,
    };
    match audience {
        AudienceQuery::All { segments } => scan(inner, whole_table, *segments, from.as_deref()),
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
            let Some(audience) = inner.settings.audiences.iter().find(|a| a.name == *name) else {
                let err = StoreError::NoAudienceIndex { name: name.clone() };
                return stream::once(async { Err(err) }).boxed();
            };
            let (index, attribute) = (Some(audience.index.clone()), audience.attribute.clone());
            query_pages(inner, index, attribute, value.clone(), from.as_deref())
        }
        AudienceQuery::Explicit(ids) => match explicit_offset(from.as_deref()) {
            Ok(Some(offset)) => explicit_pages(inner, ids.clone(), offset),
            Ok(None) => stream::empty().boxed(),
            Err(err) => stream::once(async { Err(err) }).boxed(),
        },
    }
}

/// A whole-table Scan in `segments` parallel segments, each from its
/// cursor; segments finished before are left out.
fn scan(
    inner: Arc<Inner>,
    index: Option<String>,
    segments: u32,
    from: Option<&[Cursor]>,
) -> BoxStream<'static, Result<Page, StoreError>> {
    let total = segments.clamp(1, MAX_SEGMENTS);
    let mut streams = Vec::new();
    for segment in 0..total {
        let start = match start_of(from, segment) {
            Ok(Some(start)) => start,
            Ok(None) => continue, // finished before
            Err(err) => return stream::once(async { Err(err) }).boxed(),
        };
        let read = Read::Scan {
            index: index.clone(),
            segment,
            total_segments: total,
        };
        streams.push(segment_pages(inner.clone(), read, segment, start));
    }
    stream::select_all(streams).boxed()
}

/// Where an explicit list resumes: `Ok(None)` if it is done.
fn explicit_offset(from: Option<&[Cursor]>) -> Result<Option<usize>, StoreError> {
    match from.and_then(|c| c.iter().find(|c| c.segment == 0)) {
        None => Ok(Some(0)),
        Some(Cursor { position: None, .. }) => Ok(None),
        Some(Cursor {
            position: Some(Position::Offset(offset)),
            ..
        }) => Ok(Some(*offset)),
        Some(other) => Err(StoreError::Rejected(format!(
            "an explicit audience resumes from an offset, not from {other:?}"
        ))),
    }
}

/// Where segment `segment` starts: `Ok(None)` if its cursor says it is done,
/// `Ok(Some(None))` from the beginning, `Ok(Some(Some(key)))` after `key`.
pub(super) fn start_of(
    from: Option<&[Cursor]>,
    segment: u32,
) -> Result<Option<Option<Item>>, StoreError> {
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
pub(super) fn query_pages(
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
pub(super) fn segment_pages(
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
pub(super) fn together(page: &mut Page, before: Option<ConnectionId>) -> Option<ConnectionId> {
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
pub(super) fn explicit_pages(
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
    pub(super) fn page_size(&self) -> u32 {
        self.settings.page_size.clamp(1, MAX_PAGE_SIZE)
    }

    /// One Scan or Query page: its items and LastEvaluatedKey.
    pub(super) async fn read_page(
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
    pub(super) fn page(&self, items: Vec<Item>, next: Cursor) -> Page {
        let rule = self.settings.expiry.as_ref().filter(|age| age.rule.is_on());
        let Some(age) = rule else {
            return Page::new(self.connections(items), next);
        };
        // One reading of the clock for the page: its rows were read at once.
        let now_ms = epoch_ms(SystemTime::now());
        let margin = age.rule.margin();
        let mut page = Page::new(Vec::with_capacity(items.len()), next);
        let mut problems = AgeProblems::default();
        // The start is taken out of each row, unless the id or the key,
        // which the row's connection takes, includes it.
        let start_shared = age.attribute == self.settings.key_attribute
            || self.key.iter().any(|(name, _)| *name == age.attribute);
        for mut item in items {
            let start = if start_shared {
                item.get(&age.attribute).cloned()
            } else {
                item.remove(&age.attribute)
            };
            let started = match start {
                None => None,
                Some(AttributeValue::N(n)) => Some(n),
                // A string or any other type is not a number of ms.
                Some(_) => Some(String::new()),
            };
            let Some(connection) = self.connection_of(item) else {
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
    pub(super) fn connections(&self, items: Vec<Item>) -> Vec<Connection> {
        items
            .into_iter()
            .filter_map(|item| self.connection_of(item))
            .collect()
    }

    /// A row's connection, `None` for a row without a usable id.
    fn connection_of(&self, mut item: Item) -> Option<Connection> {
        let id_attribute = &self.settings.key_attribute;
        let Some(AttributeValue::S(id)) = item.get(id_attribute) else {
            tracing::warn!(
                table = %self.settings.table,
                attribute = %id_attribute,
                "a connection row has no string id attribute; skipped"
            );
            return None;
        };
        let id = ConnectionId::from(id.as_str());
        let key = self.take_row_key(&mut item);
        if key.is_none() {
            tracing::warn!(
                table = %self.settings.table,
                connection = %id,
                "a connection row lacks part of the table key; it will not be removed if gone"
            );
        }
        Some(Connection::new(id, key))
    }

    /// The row's full primary key, in schema order, its values taken out of
    /// the row rather than copied.
    fn take_row_key(&self, item: &mut Item) -> Option<RowKey> {
        self.key
            .iter()
            .map(|(name, _)| Some((name.clone(), into_key_value(item.remove(name)?)?)))
            .collect::<Option<Vec<_>>>()
            .map(RowKey)
    }

    /// The key of an id's row, when the id alone is the table's key.
    pub(super) fn derived_key(&self, id: &ConnectionId) -> Option<RowKey> {
        match self.key.as_slice() {
            [(name, ScalarAttributeType::S)] if *name == self.settings.key_attribute => Some(
                RowKey(vec![(name.clone(), KeyValue::S(id.as_str().to_owned()))]),
            ),
            _ => None,
        }
    }
}
