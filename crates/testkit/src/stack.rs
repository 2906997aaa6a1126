//! One test's stack in one call: the emulators' clients, a jobs queue with
//! its dead-letter queue, a connections table, and the local API Gateway
//! over that table, with `fanout` commands pointed at all of them.

use fanout_dev::gateway::GatewayArgs;
use tokio::process::Command;

use crate::local_support::TestGateway;
use crate::support::{self, TableKey, TestQueue};

/// Everything a pipeline test runs against.
pub struct Stack {
    pub sqs: aws_sdk_sqs::Client,
    pub dynamo: aws_sdk_dynamodb::Client,
    pub queue: TestQueue,
    pub dlq: TestQueue,
    pub table: String,
    pub gateway: TestGateway,
    /// Settings of the test's own, on top of the stack's.
    pub env: Vec<(String, String)>,
}

impl Stack {
    /// A stack whose table is keyed by the connection id, with a channel
    /// index; `name` prefixes its queues and table.
    pub async fn new(name: &str, configure: impl FnOnce(&mut GatewayArgs)) -> Self {
        Self::with_table(
            name,
            async |dynamo, name| support::create_table(dynamo, name, TableKey::Id, true).await,
            configure,
        )
        .await
    }

    /// A stack whose table `create` makes (it returns the table's name).
    pub async fn with_table(
        name: &str,
        create: impl AsyncFnOnce(&aws_sdk_dynamodb::Client, &str) -> String,
        configure: impl FnOnce(&mut GatewayArgs),
    ) -> Self {
        let sqs = support::sqs().await;
        let dynamo = support::dynamodb().await;
        let (queue, dlq) = support::create_queue_with_dlq(&sqs, name, false, None).await;
        let table = create(&dynamo, name).await;
        let gateway = TestGateway::on_table(&table, configure).await;
        Self {
            sqs,
            dynamo,
            queue,
            dlq,
            table,
            gateway,
            env: Vec::new(),
        }
    }

    /// Adds a setting for every `fanout` command of the stack.
    pub fn set(&mut self, key: &str, value: impl ToString) {
        self.env.push((key.to_owned(), value.to_string()));
    }

    /// The gateway's management endpoint, as `FANOUT_GATEWAY_ENDPOINT`
    /// takes it.
    pub fn endpoint(&self) -> String {
        format!("http://{}/{}", self.gateway.addr, self.gateway.stage)
    }

    /// `fanout ARGS` against the stack: its queues, table and gateway,
    /// then `extra`, then the settings added with [`set`](Self::set), which
    /// win over both.
    pub fn command<'a>(
        &self,
        args: &[&str],
        extra: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Command {
        let endpoint = self.endpoint();
        let own = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let extra: Vec<(&str, &str)> = extra.into_iter().collect();
        support::worker::command(
            args,
            &self.queue.url,
            &self.dlq.url,
            &self.table,
            [("FANOUT_GATEWAY_ENDPOINT", endpoint.as_str())]
                .into_iter()
                .chain(extra)
                .chain(own),
        )
    }

    /// Puts a raw body on the jobs queue, as any producer's SDK would.
    pub async fn send_raw(&self, body: &str) {
        support::send_body(&self.sqs, &self.queue.url, body).await;
    }
}
