//! One test's stack in one call: the emulators' clients, a jobs queue with
//! its dead-letter queue, a connections table, and the local API Gateway
//! over that table, with `fanout` commands pointed at all of them.

use std::collections::BTreeSet;
use std::time::Duration;

use fanout_dev::clients::Swarm;
use fanout_dev::gateway::GatewayArgs;
use tokio::process::{Child, Command};

use crate::local_support::TestGateway;
pub use crate::support::Queues;
use crate::support::worker::{Run, finish, signal, start};
use crate::support::{self, Received, TableKey, TestQueue};

/// How long a `fanout run --exit-when-idle` of a test may take.
const RUN_BOUND: Duration = Duration::from_secs(120);

/// Lets a test's own rig, built around a [`Stack`] field, be used as the
/// stack: `on_stack!(Rig, stack)`, or `on_stack!(Rig, 0)` for a newtype.
#[macro_export]
macro_rules! on_stack {
    ($rig:ty, $field:tt) => {
        impl std::ops::Deref for $rig {
            type Target = $crate::stack::Stack;

            fn deref(&self) -> &$crate::stack::Stack {
                &self.$field
            }
        }

        impl std::ops::DerefMut for $rig {
            fn deref_mut(&mut self) -> &mut $crate::stack::Stack {
                &mut self.$field
            }
        }
    };
}

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
        Self::with_queues(name, Queues::default(), configure).await
    }

    /// [`Stack::new`] with its queues made as `queues` says.
    pub async fn with_queues(
        name: &str,
        queues: Queues,
        configure: impl FnOnce(&mut GatewayArgs),
    ) -> Self {
        Self::build(
            name,
            queues,
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
        Self::build(name, Queues::default(), create, configure).await
    }

    async fn build(
        name: &str,
        queues: Queues,
        create: impl AsyncFnOnce(&aws_sdk_dynamodb::Client, &str) -> String,
        configure: impl FnOnce(&mut GatewayArgs),
    ) -> Self {
        let sqs = support::sqs().await;
        let dynamo = support::dynamodb().await;
        let (queue, dlq) = support::create_queues(&sqs, name, queues).await;
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

    /// `fanout enqueue ARGS`, which must succeed; returns what it printed
    /// (the message id).
    pub async fn enqueue(&self, args: &[&str]) -> String {
        let mut all = vec!["enqueue"];
        all.extend_from_slice(args);
        support::worker::run_ok(self.command(&all, []), &format!("{all:?}")).await
    }

    /// `fanout run` (with `--exit-when-idle` if asked), its output piped
    /// for [`finish`].
    pub fn spawn_worker(&self, exit_when_idle: bool) -> Child {
        let mut args = vec!["run"];
        if exit_when_idle {
            args.push("--exit-when-idle");
        }
        start(self.command(&args, []))
    }

    /// `fanout run --exit-when-idle` to its end, which must be a success.
    pub async fn run_until_idle(&self) -> Run {
        let run = finish(self.spawn_worker(true), RUN_BOUND).await;
        assert!(run.status.success(), "{}", run.stdout);
        run
    }

    /// Makes a broadcast slow enough to cut short: four posts in flight,
    /// pages of 20, and a grace of 1 s at SIGTERM.
    pub fn slow_to_cut(&mut self) {
        self.set("FANOUT_MAX_IN_FLIGHT", 4);
        self.set("FANOUT_PAGE_SIZE", 20);
        self.set("FANOUT_SHUTDOWN_GRACE", "1s");
    }

    /// `fanout run`, once the gateway has seen `posts` posts (within 30 s):
    /// a broadcast under way.
    pub async fn worker_under_way(&self, posts: u64) -> Child {
        let worker = self.spawn_worker(false);
        let started = tokio::time::Instant::now();
        while self.gateway.stats().await.posts < posts {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the job never started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        worker
    }

    /// Stops `worker` with SIGTERM; it must exit 0 within 15 s.
    pub async fn stop(worker: Child) -> Run {
        signal(&worker, "-TERM");
        let run = finish(worker, Duration::from_secs(15)).await;
        assert!(run.status.success(), "exit 0 after SIGTERM: {}", run.stdout);
        run
    }

    /// [`Stack::stop`], for a worker whose job `id` was under way: its run
    /// reports the job interrupted.
    pub async fn interrupt(worker: Child, id: &str) -> Run {
        let run = Self::stop(worker).await;
        assert_eq!(run.report(id)["status"], "interrupted", "{}", run.stdout);
        run
    }

    /// The one job on the jobs queue (made visible again for the next
    /// worker), as JSON.
    pub async fn the_job_back(&self) -> serde_json::Value {
        let back = self.jobs_on_queue().await;
        assert_eq!(back.len(), 1, "one message visible again");
        serde_json::from_str(&back[0].body).expect("a job")
    }

    /// Every message on the jobs queue, each made visible again at once
    /// for the next worker.
    pub async fn jobs_on_queue(&self) -> Vec<Received> {
        let received = support::receive_all(&self.sqs, &self.queue.url).await;
        for message in &received {
            self.sqs
                .change_message_visibility()
                .queue_url(&self.queue.url)
                .receipt_handle(&message.receipt)
                .visibility_timeout(0)
                .send()
                .await
                .expect("make a job visible again");
        }
        received
    }

    /// The ids of the table's rows now.
    pub async fn rows(&self) -> BTreeSet<String> {
        support::remaining_ids(&self.dynamo, &self.table).await
    }

    /// Closes `clients`, then the gateway.
    pub async fn close(self, clients: Swarm) {
        clients.close(None).await;
        self.gateway.shutdown().await;
    }

    /// `count` live WebSocket clients of the stack's gateway, optionally in
    /// a channel.
    pub async fn connect(&self, count: usize, channel: Option<&str>) -> Swarm {
        Swarm::connect(&self.gateway.ws_url(), count, channel, 32)
            .await
            .expect("open WebSocket clients")
    }
}
