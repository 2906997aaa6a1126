//! One scenario's world: jobs queue and dead-letter queue (moto), a
//! connections table with a channel index (dynalite), the local gateway over
//! that table, live WebSocket clients and stale rows, and fault proxies in
//! front of SQS, DynamoDB and the gateway as the scenario asks. The worker
//! is the real `fanout` binary, pointed at the proxies through the standard
//! `AWS_ENDPOINT_URL_*` variables and `FANOUT_GATEWAY_ENDPOINT`.

use std::collections::BTreeSet;
use std::time::Duration;

use fanout_dev::gateway::GatewayArgs;
use tokio::process::Child;

use super::proxy::{FaultProxy, Faults, Injected};
use crate::stack::Stack;
use crate::support;
use crate::support::Queues;
use crate::support::worker::start;

/// How to build a rig.
#[derive(Default)]
pub struct RigSpec {
    /// The jobs queue and its dead-letter queue: FIFO, a redrive, and the
    /// visibility timeout, which is how long a message handed out by a
    /// lost receive stays hidden.
    pub queues: Queues,
    /// Faults in front of SQS, DynamoDB and the gateway (no proxy if `None`).
    pub sqs: Option<Faults>,
    pub dynamodb: Option<Faults>,
    pub gateway: Option<Faults>,
}

/// A [`Stack`] with fault proxies in front of its peers.
pub struct Rig {
    pub stack: Stack,
    pub sqs_proxy: Option<FaultProxy>,
    pub dynamodb_proxy: Option<FaultProxy>,
    pub gateway_proxy: Option<FaultProxy>,
}

crate::on_stack!(Rig, stack);

pub use crate::support::worker::{Run, finish, signal};

impl Rig {
    pub async fn new(spec: RigSpec, configure: impl FnOnce(&mut GatewayArgs)) -> Self {
        let mut stack = Stack::with_queues("faults", spec.queues, configure).await;
        // A failed job comes back within seconds, not SQS's default.
        stack.set("FANOUT_JOB_RETRY_BASE", "1s");
        stack.set("FANOUT_JOB_RETRY_MAX", "2s");
        let env_url = |var: &str| std::env::var(var).unwrap_or_else(|_| panic!("{var} unset"));
        let sqs_proxy = match spec.sqs {
            Some(f) => Some(FaultProxy::start(&env_url("AWS_ENDPOINT_URL_SQS"), f).await),
            None => None,
        };
        let dynamodb_proxy = match spec.dynamodb {
            Some(f) => Some(FaultProxy::start(&env_url("AWS_ENDPOINT_URL_DYNAMODB"), f).await),
            None => None,
        };
        let gateway_proxy = match spec.gateway {
            Some(f) => Some(FaultProxy::start(&format!("http://{}", stack.gateway.addr), f).await),
            None => None,
        };
        Self {
            stack,
            sqs_proxy,
            dynamodb_proxy,
            gateway_proxy,
        }
    }

    /// `fanout run`, with every configured proxy in front of its peer.
    pub fn spawn_worker(&self, exit_when_idle: bool) -> Child {
        let mut args = vec!["run"];
        if exit_when_idle {
            args.push("--exit-when-idle");
        }
        let gateway_base = match &self.gateway_proxy {
            Some(proxy) => proxy.url(),
            None => format!("http://{}", self.gateway.addr),
        };
        let mut command = self.stack.command(&args, []);
        command.env(
            "FANOUT_GATEWAY_ENDPOINT",
            format!("{gateway_base}/{}", self.gateway.stage),
        );
        if let Some(proxy) = &self.sqs_proxy {
            command.env("AWS_ENDPOINT_URL_SQS", proxy.url());
        }
        if let Some(proxy) = &self.dynamodb_proxy {
            command.env("AWS_ENDPOINT_URL_DYNAMODB", proxy.url());
        }
        start(command)
    }

    /// Runs `fanout run --exit-when-idle` to its end.
    pub async fn run_until_idle(&self) -> Run {
        finish(self.spawn_worker(true), Duration::from_secs(90)).await
    }

    /// Runs workers until the jobs queue is empty (visible and in flight):
    /// with faults, a worker may go idle while a job waits out its retry
    /// delay. Returns every run.
    pub async fn run_until_drained(&self) -> Vec<Run> {
        let mut runs = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let run = self.run_until_idle().await;
            assert!(run.status.success(), "{}", run.stdout);
            runs.push(run);
            if support::counts(&self.sqs, &self.queue.url).await == (0, 0) {
                return runs;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the jobs queue never drained"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Rows of `count` connections that no longer exist: they answer 410.
    pub async fn stale_rows(&self, prefix: &str, count: usize) -> BTreeSet<String> {
        let ids = support::ids(prefix, count);
        support::put_connections(&self.dynamo, &self.table, &ids, None).await;
        ids.into_iter().collect()
    }

    /// Every fault the proxies injected, summed.
    pub fn injected(&self) -> Injected {
        let mut sum = Injected::default();
        for proxy in [&self.sqs_proxy, &self.dynamodb_proxy, &self.gateway_proxy]
            .into_iter()
            .flatten()
        {
            sum += proxy.injected();
        }
        sum
    }

    /// Waits until the jobs queue has a visible message (e.g. after a
    /// killed worker's visibility timeout ran out).
    pub async fn wait_until_visible(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while support::counts(&self.sqs, &self.queue.url).await.0 == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no job became visible within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the gateway has delivered at least `n` POSTs.
    pub async fn wait_for_deliveries(&self, n: u64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.gateway.stats().await.delivered < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "fewer than {n} deliveries within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
