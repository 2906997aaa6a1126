//! Deletes finished jobs' messages in batches of up to ten, beside the
//! jobs, and tells the idle check whether one is still under way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::AbortOnDropHandle;

use super::SETTLE_BACKOFF;
use crate::queue::{JobQueue, MAX_BATCH, Receipt};

/// Deletes finished jobs' messages in batches of up to ten, retrying the
/// entries the queue reports failed.
pub(super) struct Deleter {
    pub(super) handle: DeleteHandle,
    /// Dropped (deletions abandoned) if shutdown runs out of time.
    task: AbortOnDropHandle<()>,
}

/// Queues deletions, and counts them so the idle check can tell whether
/// one is still under way.
#[derive(Clone, Debug)]
pub(super) struct DeleteHandle {
    tx: mpsc::Sender<Receipt>,
    /// Receipts queued, and receipts whose deletion is over (done or given
    /// up): equal when nothing is pending.
    queued: Arc<AtomicU64>,
    settled: Arc<AtomicU64>,
}

impl DeleteHandle {
    pub(super) async fn push(&self, receipt: Receipt) {
        self.queued.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(receipt).await.is_err() {
            // The deleter is gone (shutdown): the message reappears after its
            // visibility timeout, a duplicate, never a loss.
            self.settled.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub(super) fn idle(&self) -> bool {
        self.queued.load(Ordering::SeqCst) == self.settled.load(Ordering::SeqCst)
    }
}

impl Deleter {
    pub(super) fn spawn<Q: JobQueue>(queue: Arc<Q>) -> Self {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 10);
        let handle = DeleteHandle {
            tx,
            queued: Arc::new(AtomicU64::new(0)),
            settled: Arc::new(AtomicU64::new(0)),
        };
        let settled = handle.settled.clone();
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            ReceiverStream::new(rx)
                .ready_chunks(MAX_BATCH)
                .for_each(|batch| {
                    let settled = settled.clone();
                    let n = batch.len() as u64;
                    let queue = queue.clone();
                    async move {
                        delete_batch(&*queue, batch).await;
                        settled.fetch_add(n, Ordering::SeqCst);
                    }
                })
                .await;
        }));
        Self { handle, task }
    }

    pub(super) fn handle(&self) -> DeleteHandle {
        self.handle.clone()
    }

    /// Waits until every queued deletion is done or given up on.
    pub(super) async fn finish(self) {
        drop(self.handle);
        let _ = self.task.await;
    }
}

async fn delete_batch<Q: JobQueue>(queue: &Q, mut pending: Vec<Receipt>) {
    for attempt in 1.. {
        match queue.delete(&pending).await {
            Ok(failed) if failed.is_empty() => return,
            Ok(failed) => pending = failed,
            Err(e) => {
                tracing::debug!(error = %e, attempt, "deleting finished jobs failed; retrying")
            }
        }
        if !SETTLE_BACKOFF.allows_another(attempt) {
            tracing::warn!(
                messages = pending.len(),
                "finished jobs could not be deleted; they will be delivered again"
            );
            return;
        }
        tokio::time::sleep(SETTLE_BACKOFF.delay(attempt - 1)).await;
    }
}
