//! The connections table as the gateway's `$connect` and `$disconnect`
//! handlers see it: put a row when a client connects, delete it when the
//! client leaves. The only file of the gateway that uses the AWS SDK.

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, ScalarAttributeType, TableStatus,
};

/// The channel index `--create-table` adds (the name the worker's
/// `FANOUT_CHANNEL_INDEX` and the deployment template use).
pub const CHANNEL_INDEX: &str = "by-channel";

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
        "could not create table {table}: {message} (is AWS_ENDPOINT_URL_DYNAMODB set to a running DynamoDB?)"
    )]
    Create { table: String, message: String },
}

/// Writes and deletes connection rows, keyed by `connectionId`.
#[derive(Clone, Debug)]
pub struct Rows {
    client: Client,
    table: String,
}

impl Rows {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    /// Creates the table (key `connectionId`, GSI `by-channel` on `channel`,
    /// on demand) unless it exists, and waits until it is active.
    pub async fn create_table_if_missing(&self) -> Result<(), RowError> {
        let failed = |message: String| RowError::Create {
            table: self.table.clone(),
            message,
        };
        if self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        let string = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| failed(e.to_string()))
        };
        let hash = |name: &str| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(KeyType::Hash)
                .build()
                .map_err(|e| failed(e.to_string()))
        };
        let index = GlobalSecondaryIndex::builder()
            .index_name(CHANNEL_INDEX)
            .key_schema(hash("channel")?)
            .projection(
                Projection::builder()
                    .projection_type(ProjectionType::KeysOnly)
                    .build(),
            )
            .build()
            .map_err(|e| failed(e.to_string()))?;
        self.client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(string("connectionId")?)
            .attribute_definitions(string("channel")?)
            .key_schema(hash("connectionId")?)
            .global_secondary_indexes(index)
            .send()
            .await
            .map_err(|e| failed(aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string()))?;
        for _ in 0..100 {
            let described = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await;
            if described.is_ok_and(|d| {
                d.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active)
            }) {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err(failed("it did not become active within 10 s".into()))
    }

    /// The `$connect` row: `connectionId`, `channel` when the client named
    /// one, `connectedAt` in epoch milliseconds (a number, so it sorts).
    pub async fn put(
        &self,
        id: &str,
        channel: Option<&str>,
        connected_at_ms: u64,
    ) -> Result<(), RowError> {
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("connectionId", AttributeValue::S(id.to_owned()))
            .item(
                "connectedAt",
                AttributeValue::N(connected_at_ms.to_string()),
            );
        if let Some(channel) = channel {
            put = put.item("channel", AttributeValue::S(channel.to_owned()));
        }
        put.send().await.map_err(|e| RowError::Put {
            table: self.table.clone(),
            message: aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string(),
        })?;
        Ok(())
    }

    /// The `$disconnect` row removal.
    pub async fn delete(&self, id: &str) -> Result<(), RowError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .key("connectionId", AttributeValue::S(id.to_owned()))
            .send()
            .await
            .map_err(|e| RowError::Delete {
                table: self.table.clone(),
                message: aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string(),
            })?;
        Ok(())
    }
}
