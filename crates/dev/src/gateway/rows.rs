//! The connections table as the gateway's routes see it: put a row when a
//! client connects, delete it when the client leaves, and, in the
//! memberships layout, a row per channel the client subscribes to. The only
//! file of the gateway that uses the AWS SDK.
//!
//! The memberships layout writes exactly what the request templates of the
//! template's own WebSocket API write (`CreateWebSocketApi`, rendered in
//! `scripts/ws_templates.py`); `crates/fanout/tests/websocket_stack.rs`
//! compares the two.

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableOutput;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, ScalarAttributeType, TableStatus,
};

/// The channel index `--create-table` adds (the name the worker's
/// `FANOUT_CHANNEL_INDEX` and the deployment template use).
pub const CHANNEL_INDEX: &str = "by-channel";

/// The memberships layout's user index (`FANOUT_AUDIENCE_INDEXES`
/// `user=by-user:userId`), on the base rows' `userId`.
pub const USER_INDEX: &str = "by-user";

/// The memberships layout's sort key: `#conn` for a connection's base row,
/// `ch#` + the channel for each channel it subscribed to.
pub const SORT_KEY: &str = "sk";
pub const BASE_ROW: &str = "#conn";
pub const MEMBERSHIP_PREFIX: &str = "ch#";

/// A row's TTL, in epoch seconds, is its connection's start plus this: past
/// API Gateway's 2-hour limit by an hour, as the templates write it.
pub const TTL_AFTER_START_S: u64 = 3 * 3600;

/// How connections are kept in the table.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// One row per connection, keyed by `connectionId`, with `channel` and
    /// `connectedAt` (what a `$connect` handler of one's own writes).
    #[default]
    OneRow,
    /// The template's own WebSocket API: key `connectionId` + `sk`, a base
    /// row (`#conn`: `connectedAt`, `expiresAt`, `userId`, `channel`) and a
    /// row per subscribed channel (`ch#NAME`: `channel`, `connectedAt`,
    /// `expiresAt`).
    Memberships,
}

/// Who the connection is, as the authorizer's context would say.
#[derive(Clone, Debug, Default)]
pub struct Joined<'a> {
    /// The channel of the connect URL (`?channel=`), already allowed.
    pub channel: Option<&'a str>,
    /// The authorizer's `principalId`.
    pub user: Option<&'a str>,
}

/// A failed row write, with what to check next.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error(
        "could not write the connection row to table {table}: {message} \
         (does the table exist, and does AWS_ENDPOINT_URL_DYNAMODB point at it?)"
    )]
    Put { table: String, message: String },
    #[error("could not delete the connection row from table {table}: {message}")]
    Delete { table: String, message: String },
    #[error(
        "the one-row layout has no channel memberships; start the gateway with --layout memberships"
    )]
    NoMemberships,
    #[error(
        "could not create table {table}: {message} (is AWS_ENDPOINT_URL_DYNAMODB set to a running DynamoDB?)"
    )]
    Create { table: String, message: String },
}

/// Writes and deletes connection rows, keyed by `connectionId` (and `sk`
/// in the memberships layout).
#[derive(Clone, Debug)]
pub struct Rows {
    client: Client,
    table: String,
    layout: Layout,
}

impl Rows {
    pub fn new(client: Client, table: impl Into<String>, layout: Layout) -> Self {
        Self {
            client,
            table: table.into(),
            layout,
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Creates the table unless it exists (on demand; one row: key
    /// `connectionId`, GSI `by-channel` on `channel`; memberships: the
    /// template's `WebSocketTable`), and waits until it is active.
    pub async fn create_table_if_missing(&self) -> Result<(), RowError> {
        let failed = |message: String| RowError::Create {
            table: self.table.clone(),
            message,
        };
        if self.describe().await.is_some() {
            return Ok(());
        }
        let string = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| failed(e.to_string()))
        };
        let key = |name: &str, key_type: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(key_type)
                .build()
                .map_err(|e| failed(e.to_string()))
        };
        let hash = |name: &str| key(name, KeyType::Hash);
        let range = |name: &str| key(name, KeyType::Range);
        let create = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(string("connectionId")?)
            .attribute_definitions(string("channel")?)
            .key_schema(hash("connectionId")?);
        let create = match self.layout {
            Layout::OneRow => create.global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(CHANNEL_INDEX)
                    .key_schema(hash("channel")?)
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::KeysOnly)
                            .build(),
                    )
                    .build()
                    .map_err(|e| failed(e.to_string()))?,
            ),
            Layout::Memberships => {
                // As the template's WebSocketTable: the indexes carry the
                // start, for the age rule and the $connect window.
                let with_start = || {
                    Projection::builder()
                        .projection_type(ProjectionType::Include)
                        .non_key_attributes("connectedAt")
                        .build()
                };
                create
                    .attribute_definitions(string(SORT_KEY)?)
                    .attribute_definitions(string("userId")?)
                    .key_schema(range(SORT_KEY)?)
                    .global_secondary_indexes(
                        GlobalSecondaryIndex::builder()
                            .index_name(CHANNEL_INDEX)
                            .key_schema(hash("channel")?)
                            .key_schema(range("connectionId")?)
                            .projection(with_start())
                            .build()
                            .map_err(|e| failed(e.to_string()))?,
                    )
                    .global_secondary_indexes(
                        GlobalSecondaryIndex::builder()
                            .index_name(USER_INDEX)
                            .key_schema(hash("userId")?)
                            .projection(with_start())
                            .build()
                            .map_err(|e| failed(e.to_string()))?,
                    )
            }
        };
        create
            .send()
            .await
            .map_err(|e| failed(aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string()))?;
        for _ in 0..100 {
            if self.describe().await.is_some_and(|d| {
                d.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active)
            }) {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err(failed("it did not become active within 10 s".into()))
    }

    /// The `$connect` row. One row: `connectionId`, `channel` when the
    /// client named one, `connectedAt` in epoch milliseconds (a number, so
    /// it sorts). Memberships: the base row, as the template's `$connect`
    /// integration writes it.
    pub async fn connect(
        &self,
        id: &str,
        joined: &Joined<'_>,
        connected_at_ms: u64,
    ) -> Result<(), RowError> {
        let mut item = vec![
            ("connectionId", AttributeValue::S(id.to_owned())),
            (
                "connectedAt",
                AttributeValue::N(connected_at_ms.to_string()),
            ),
        ];
        if self.layout == Layout::Memberships {
            item.push((SORT_KEY, AttributeValue::S(BASE_ROW.to_owned())));
            item.push(("expiresAt", expires_at(connected_at_ms)));
            if let Some(user) = joined.user {
                item.push(("userId", AttributeValue::S(user.to_owned())));
            }
        }
        if let Some(channel) = joined.channel {
            item.push(("channel", AttributeValue::S(channel.to_owned())));
        }
        self.put(item).await
    }

    /// The subscribe route's row: `ch#NAME` of the connection, with its
    /// start and TTL (the rule has allowed the channel).
    pub async fn subscribe(
        &self,
        id: &str,
        channel: &str,
        connected_at_ms: u64,
    ) -> Result<(), RowError> {
        if self.layout != Layout::Memberships {
            return Err(RowError::NoMemberships);
        }
        self.put(vec![
            ("connectionId", AttributeValue::S(id.to_owned())),
            (
                SORT_KEY,
                AttributeValue::S(format!("{MEMBERSHIP_PREFIX}{channel}")),
            ),
            ("channel", AttributeValue::S(channel.to_owned())),
            (
                "connectedAt",
                AttributeValue::N(connected_at_ms.to_string()),
            ),
            ("expiresAt", expires_at(connected_at_ms)),
        ])
        .await
    }

    /// The unsubscribe route: the connection's `ch#NAME` row.
    pub async fn unsubscribe(&self, id: &str, channel: &str) -> Result<(), RowError> {
        if self.layout != Layout::Memberships {
            return Err(RowError::NoMemberships);
        }
        self.delete_key(id, Some(format!("{MEMBERSHIP_PREFIX}{channel}")))
            .await
    }

    /// The `$disconnect` row removal: the connection's row, or its base row
    /// (membership rows stay, as with the template's API).
    pub async fn delete(&self, id: &str) -> Result<(), RowError> {
        let sort = (self.layout == Layout::Memberships).then(|| BASE_ROW.to_owned());
        self.delete_key(id, sort).await
    }

    /// The table's description; `None` if it cannot be read (it does not
    /// exist, or the endpoint does not answer).
    async fn describe(&self) -> Option<DescribeTableOutput> {
        let described = self.client.describe_table().table_name(&self.table);
        described.send().await.ok()
    }

    async fn put(&self, item: Vec<(&str, AttributeValue)>) -> Result<(), RowError> {
        let mut put = self.client.put_item().table_name(&self.table);
        for (name, value) in item {
            put = put.item(name, value);
        }
        put.send().await.map_err(|e| RowError::Put {
            table: self.table.clone(),
            message: aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string(),
        })?;
        Ok(())
    }

    async fn delete_key(&self, id: &str, sort: Option<String>) -> Result<(), RowError> {
        let mut delete = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("connectionId", AttributeValue::S(id.to_owned()));
        if let Some(sort) = sort {
            delete = delete.key(SORT_KEY, AttributeValue::S(sort));
        }
        delete.send().await.map_err(|e| RowError::Delete {
            table: self.table.clone(),
            message: aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string(),
        })?;
        Ok(())
    }
}

/// The TTL of a row whose connection started at `connected_at_ms`: epoch
/// seconds, a whole number, as the templates' integer division makes it.
pub fn expires_at(connected_at_ms: u64) -> AttributeValue {
    AttributeValue::N((connected_at_ms / 1000 + TTL_AFTER_START_S).to_string())
}
