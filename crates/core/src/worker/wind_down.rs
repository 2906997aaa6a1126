//! Winding down: once receiving stops, running jobs get the grace period;
//! then they stop and hand their messages back, and settling gets
//! [`SHUTDOWN_SETTLE_BOUND`] more before what is left is dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::deleter::Deleter;
use super::receive::AbandonedReceive;
use super::{JobContext, SHUTDOWN_SETTLE_BOUND, Stopped};
use crate::gateway::Gateway;
use crate::queue::JobQueue;
use crate::store::ConnectionStore;

/// What is still running when the receive loop ends.
pub(super) struct Stopping<Q, S, G> {
    pub(super) jobs: TaskTracker,
    /// Cancelled when the grace period is over: running jobs stop and hand
    /// their messages back.
    pub(super) abort: CancellationToken,
    /// Cancelled when the settle bound is over too: what is still running is
    /// dropped.
    pub(super) kill: CancellationToken,
    pub(super) ctx: Arc<JobContext<Q, S, G>>,
    pub(super) deleter: Deleter,
    pub(super) abandoned_receive: Option<AbandonedReceive>,
}

impl<Q: JobQueue, S: ConnectionStore, G: Gateway> Stopping<Q, S, G> {
    /// Waits for running jobs, within `grace` and then the settle bound.
    pub(super) async fn wind_down(self, stopped: &Stopped, grace: Duration) {
        let (jobs, ctx, deleter) = (self.jobs, self.ctx, self.deleter);
        let grace_over = tokio::time::Instant::now() + grace;
        if let Some(receive) = self.abandoned_receive {
            let ctx = ctx.clone();
            jobs.spawn(self.kill.clone().run_until_cancelled_owned(async move {
                if let Ok(Ok(messages)) = receive.await {
                    for message in messages {
                        ctx.hand_back(&message, Duration::ZERO).await;
                    }
                }
            }));
        }
        jobs.close();
        if *stopped != Stopped::Idle && !jobs.is_empty() {
            tracing::info!(
                running = jobs.len(),
                grace_ms = grace.as_millis() as u64,
                "shutting down: waiting for running jobs"
            );
            if tokio::time::timeout_at(grace_over, jobs.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    running = jobs.len(),
                    "grace period over: handing unfinished jobs back to the queue"
                );
                self.abort.cancel();
            }
        }
        let settled = tokio::time::timeout_at(grace_over + SHUTDOWN_SETTLE_BOUND, async {
            jobs.wait().await;
            ctx.engine.finish_rechecks().await;
            drop(ctx);
            deleter.finish().await;
        })
        .await;
        if settled.is_err() {
            tracing::warn!(
                running = jobs.len(),
                bound_ms = SHUTDOWN_SETTLE_BOUND.as_millis() as u64,
                "the queue or the table did not answer in time: exiting with work unsettled; those messages reappear after their visibility timeout"
            );
            self.kill.cancel();
            // Every job task ends at its next poll; waiting for that is quick
            // and leaves nothing of this worker running.
            jobs.wait().await;
        }
    }
}
