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
use aws_sdk_dynamodb::error::SdkError;

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

mod item;
mod pages;
mod remove;
mod schema;
#[cfg(test)]
mod tests;

use item::*;

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
        pages::pages(self.inner.clone(), audience, from)
    }

    async fn remove_expired(&self, row: Expired) -> Result<bool, StoreError> {
        remove::remove_expired(&self.inner, row).await
    }

    fn channel_order(&self) -> ChannelOrder {
        self.inner.channel_order
    }

    async fn remove(&self, gone: Vec<Connection>) -> Result<Removal, StoreError> {
        remove::remove(&self.inner, gone).await
    }
}

impl DynamoStore {
    /// The age rule it reads rows with, for the clock check to turn off.
    pub fn age_rule(&self) -> Option<Arc<ExpiryRule>> {
        self.inner.settings.expiry.as_ref().map(|a| a.rule.clone())
    }
}
