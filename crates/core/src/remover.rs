//! Removes gone connections from the table while sending goes on: gone
//! connections are batched by [`MAX_REMOVE_BATCH`] as they arrive, and each
//! batch's unprocessed items are retried with backoff.
//!
//! A failed removal is counted and logged, never fatal to delivery: the row
//! stays, and the next broadcast finds it gone again.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::backoff::Backoff;
use crate::connection::Connection;
use crate::store::{ConnectionStore, MAX_REMOVE_BATCH};
use crate::telemetry::Metrics;

/// Batches in flight at once per job: enough to keep up with a broadcast
/// where many connections are gone, few enough to stay under a table's
/// write capacity.
const CONCURRENT_BATCHES: usize = 4;

/// Gone connections queued before sending waits for removal to catch up.
const QUEUE_DEPTH: usize = MAX_REMOVE_BATCH * 40;

/// How removals are retried: UnprocessedItems and throttling are normal
/// under load, so a few patient attempts.
pub const REMOVE_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(50),
    max: Duration::from_secs(2),
    max_attempts: 8,
};

/// What removal came to for one job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemovalReport {
    /// Rows deleted.
    pub removed: u64,
    /// Rows still there after every retry.
    pub failed: u64,
    /// Connections whose row key is unknown (an explicit list on a table
    /// with a composite key): not removed.
    pub skipped: u64,
}

impl RemovalReport {
    fn add(mut self, other: RemovalReport) -> Self {
        self.removed += other.removed;
        self.failed += other.failed;
        self.skipped += other.skipped;
        self
    }
}

/// The sending side of one job's removal task.
pub struct Remover {
    tx: mpsc::Sender<Connection>,
    task: JoinHandle<RemovalReport>,
}

impl Remover {
    /// Starts removing what [`Remover::remove`] is given.
    pub fn spawn<S: ConnectionStore>(
        store: Arc<S>,
        backoff: Backoff,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let task = tokio::spawn(async move {
            ReceiverStream::new(rx)
                // Whatever is queued, up to a full batch: batches fill up
                // under load and leave at once when gone rows are rare.
                .ready_chunks(MAX_REMOVE_BATCH)
                .map(|batch| remove_batch(&*store, batch, backoff, &metrics))
                .buffer_unordered(CONCURRENT_BATCHES)
                .fold(
                    RemovalReport::default(),
                    |total, r| async move { total.add(r) },
                )
                .await
        });
        Self { tx, task }
    }

    /// Queues a gone connection for removal; waits if removal lags far
    /// behind.
    pub async fn remove(&self, gone: Connection) {
        // The task ends only after `finish` drops the sender.
        let _ = self.tx.send(gone).await;
    }

    /// Waits until everything queued is removed or given up on.
    pub async fn finish(self) -> RemovalReport {
        drop(self.tx);
        match self.task.await {
            Ok(report) => report,
            Err(e) => {
                tracing::error!(error = %e, "the removal task failed; gone rows may remain");
                RemovalReport::default()
            }
        }
    }
}

async fn remove_batch<S: ConnectionStore>(
    store: &S,
    mut pending: Vec<Connection>,
    backoff: Backoff,
    metrics: &Metrics,
) -> RemovalReport {
    let mut report = RemovalReport::default();
    let mut attempt = 1;
    loop {
        let asked = pending.len() as u64;
        match store.remove(pending.clone()).await {
            Ok(removal) => {
                let skipped = removal.skipped.len() as u64;
                let removed = asked - skipped - removal.unprocessed.len() as u64;
                report.removed += removed;
                report.skipped += skipped;
                Metrics::add(&metrics.removed, removed);
                pending = removal.unprocessed;
                if pending.is_empty() {
                    return report;
                }
            }
            Err(e) if e.is_transient() => {
                tracing::debug!(error = %e, attempt, "removal failed; retrying");
            }
            Err(e) => {
                tracing::warn!(error = %e, rows = asked, "gone rows could not be removed");
                break;
            }
        }
        if !backoff.allows_another(attempt) {
            tracing::warn!(
                rows = pending.len(),
                attempts = attempt,
                "gone rows still unprocessed after every retry"
            );
            break;
        }
        tokio::time::sleep(backoff.delay(attempt - 1)).await;
        attempt += 1;
    }
    report.failed += pending.len() as u64;
    Metrics::add(&metrics.remove_failed, pending.len() as u64);
    report
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use futures::stream::BoxStream;

    use super::*;
    use crate::connection::{KeyValue, RowKey};
    use crate::store::{AudienceQuery, Cursor, Page, Removal, StoreError};

    /// A table that leaves the last item of each call unprocessed `stubborn`
    /// times, and records every call's size.
    #[derive(Default)]
    struct FlakyTable {
        rows: Mutex<HashSet<String>>,
        calls: Mutex<Vec<usize>>,
        stubborn: Mutex<u32>,
        fail_hard: bool,
    }

    fn conn(id: &str, keyed: bool) -> Connection {
        Connection {
            id: id.into(),
            key: keyed.then(|| RowKey(vec![("connectionId".into(), KeyValue::S(id.into()))])),
        }
    }

    impl ConnectionStore for FlakyTable {
        fn pages(
            &self,
            _: &AudienceQuery,
            _: Option<Vec<Cursor>>,
        ) -> BoxStream<'static, Result<Page, StoreError>> {
            unimplemented!("not used by the remover")
        }

        async fn remove(&self, gone: Vec<Connection>) -> Result<Removal, StoreError> {
            assert!(gone.len() <= MAX_REMOVE_BATCH, "a batch over the limit");
            self.calls.lock().unwrap().push(gone.len());
            if self.fail_hard {
                return Err(StoreError::Rejected("validation".into()));
            }
            let mut removal = Removal::default();
            let mut gone = gone;
            {
                let mut stubborn = self.stubborn.lock().unwrap();
                if *stubborn > 0 && !gone.is_empty() {
                    *stubborn -= 1;
                    removal.unprocessed.push(gone.pop().unwrap());
                }
            }
            for c in gone {
                if c.key.is_none() {
                    removal.skipped.push(c);
                } else {
                    self.rows.lock().unwrap().remove(c.id.as_str());
                }
            }
            Ok(removal)
        }
    }

    fn fast() -> Backoff {
        Backoff {
            base: Duration::from_millis(1),
            max: Duration::from_millis(2),
            max_attempts: 4,
        }
    }

    #[tokio::test]
    async fn batches_hold_at_most_25_and_unprocessed_items_are_retried() {
        let table = Arc::new(FlakyTable::default());
        *table.stubborn.lock().unwrap() = 3;
        let ids: Vec<String> = (0..60).map(|i| format!("c{i}")).collect();
        table.rows.lock().unwrap().extend(ids.iter().cloned());
        let metrics = Arc::new(Metrics::default());
        let remover = Remover::spawn(table.clone(), fast(), metrics.clone());
        for id in &ids {
            remover.remove(conn(id, true)).await;
        }
        let report = remover.finish().await;
        assert_eq!(
            report,
            RemovalReport {
                removed: 60,
                failed: 0,
                skipped: 0
            }
        );
        assert!(table.rows.lock().unwrap().is_empty());
        let calls = table.calls.lock().unwrap();
        assert!(calls.iter().all(|&n| n <= 25));
        assert_eq!(calls.iter().sum::<usize>(), 60 + 3, "3 retried items");
        assert_eq!(Metrics::get(&metrics.removed), 60);
    }

    #[tokio::test]
    async fn items_unprocessed_after_every_retry_are_reported_failed() {
        let table = Arc::new(FlakyTable::default());
        *table.stubborn.lock().unwrap() = 100;
        let metrics = Arc::new(Metrics::default());
        let remover = Remover::spawn(table.clone(), fast(), metrics.clone());
        remover.remove(conn("a", true)).await;
        let report = remover.finish().await;
        assert_eq!(
            report,
            RemovalReport {
                removed: 0,
                failed: 1,
                skipped: 0
            }
        );
        assert_eq!(table.calls.lock().unwrap().len(), 4, "max_attempts calls");
        assert_eq!(Metrics::get(&metrics.remove_failed), 1);
    }

    #[tokio::test]
    async fn permanent_errors_and_unknown_keys_are_counted_not_fatal() {
        let table = Arc::new(FlakyTable {
            fail_hard: true,
            ..FlakyTable::default()
        });
        let remover = Remover::spawn(table.clone(), fast(), Arc::new(Metrics::default()));
        remover.remove(conn("a", true)).await;
        let report = remover.finish().await;
        assert_eq!(report.failed, 1);
        assert_eq!(
            table.calls.lock().unwrap().len(),
            1,
            "no retry of a permanent error"
        );

        let table = Arc::new(FlakyTable::default());
        let remover = Remover::spawn(table, fast(), Arc::new(Metrics::default()));
        remover.remove(conn("x", false)).await;
        assert_eq!(remover.finish().await.skipped, 1);
    }
}
