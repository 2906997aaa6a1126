//! The connections table as the gateway's `$connect` and `$disconnect`
//! handlers see it: put a row when a client connects, delete it when the
//! client leaves. The only file of the gateway that uses the AWS SDK.

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;

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
