//! The heartbeat: while a job runs, its message's visibility timeout is
//! renewed so no other worker receives it, and so is its run's lease in the
//! checkpoint table (see [`crate::runs`]), first: the lease's renewal
//! hands back the message's newest receipt, which a redelivery may have
//! changed. Beside it, the checkpoint writer stores the run's resume
//! points as pages are fully delivered.

use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

use super::JobContext;
use crate::gateway::Gateway;
use crate::queue::{JobQueue, Receipt};
use crate::runs::{Checkpoint, RunLease};
use crate::store::ConnectionStore;

impl<Q: JobQueue, S: ConnectionStore, G: Gateway> JobContext<Q, S, G> {
    /// Keeps the message hidden until the handle is dropped. Dropping, not an
    /// explicit abort, ends it: a panic or a dropped job task unwinds past
    /// any abort call, and a detached heartbeat would keep the message
    /// hidden for ever.
    pub(super) fn heartbeat(
        &self,
        receipt: Receipt,
        job_id: String,
        lease: Option<RunLease>,
    ) -> AbortOnDropHandle<()> {
        let queue = self.queue.clone();
        let ledger = self.ledger.clone();
        let (interval, visibility) = (
            self.settings.heartbeat_interval,
            self.settings.visibility_timeout,
        );
        AbortOnDropHandle::new(tokio::spawn(async move {
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            loop {
                ticks.tick().await;
                let receipt = match (&ledger, &lease) {
                    (Some(ledger), Some(lease)) => {
                        if !ledger.renew(lease).await {
                            // Another task runs it now, from this very
                            // message: keeping it hidden is its job.
                            break;
                        }
                        lease.receipt()
                    }
                    _ => receipt.clone(),
                };
                if let Err(e) = queue.set_visibility(&receipt, visibility).await {
                    tracing::warn!(job_id, error = %e, "heartbeat failed; the job may be redelivered while it runs");
                }
            }
        }))
    }

    /// Writes a held run's resume points to the checkpoint table as the
    /// engine publishes them: one write at a time, each of the newest
    /// points (those that came during a write are coalesced), so writing
    /// never holds up a send. Ends when the handle is dropped.
    pub(super) fn checkpoint_writer(
        &self,
        lease: Option<RunLease>,
    ) -> Option<(watch::Sender<Checkpoint>, AbortOnDropHandle<()>)> {
        let (ledger, lease) = (self.ledger.clone()?, lease?);
        let (sender, mut points) = watch::channel(Checkpoint::default());
        let writer = AbortOnDropHandle::new(tokio::spawn(async move {
            while points.changed().await.is_ok() {
                let resume = points.borrow_and_update().clone();
                ledger.save(&lease, &resume).await;
            }
        }));
        Some((sender, writer))
    }
}
