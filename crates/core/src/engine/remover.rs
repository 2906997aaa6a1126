//! Removes gone connections from the table while sending goes on: gone
//! connections are batched by [`MAX_REMOVE_BATCH`] as they arrive (a batch
//! waits up to [`LINGER`] to fill), and each batch's unprocessed items are
//! retried with backoff.
//!
//! Rows certainly gone by age (see [`crate::connection::expiry`]) go through the same
//! task, each with its own conditional delete: BatchWriteItem takes no
//! condition, and the condition is what keeps a rewritten row.
//!
//! A failed removal is counted and logged, never fatal to delivery: the row
//! stays, and the next broadcast finds it gone again.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::backoff::Backoff;
use crate::connection::Connection;
use crate::connection::expiry::Expired;
use crate::engine::tally::Tally;
use crate::store::{ConnectionStore, MAX_REMOVE_BATCH};

/// Batches in flight at once per job: enough to keep up with a broadcast
/// where many connections are gone, few enough to stay under a table's
/// write capacity.
const CONCURRENT_BATCHES: usize = 4;

/// How long a batch waits to fill once its first row has come. Gone rows
/// trickle in (about 5 % of a broadcast's posts), and a batch sent as soon
/// as anything was queued held two rows on average: a store call (about
/// 120 µs of CPU in the SDK) for every two gone rows, 3 µs a post averaged
/// over a 20,000-row broadcast. At 1,000 gone rows a second a batch fills
/// in 25 ms; when sending ends the stream closes and the last batch leaves
/// at once, so a job never waits for this.
const LINGER: Duration = Duration::from_millis(50);

/// Gone connections queued before sending waits for removal to catch up.
const QUEUE_DEPTH: usize = MAX_REMOVE_BATCH * 40;

/// How removals are retried: UnprocessedItems and throttling are normal
/// under load, so a few patient attempts.
pub const REMOVE_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(50),
    max: Duration::from_secs(2),
    max_attempts: 8,
};

/// A row to delete.
enum Row {
    /// Answered 410.
    Gone(Connection),
    /// Certainly gone by age.
    Expired(Expired),
}

/// The sending side of one job's removal task.
pub struct Remover {
    tx: mpsc::Sender<Row>,
    task: JoinHandle<()>,
    /// Rows queued and not yet removed or given up on.
    outstanding: Arc<AtomicUsize>,
}

impl Remover {
    /// Starts removing what [`Remover::remove`] is given.
    pub fn spawn<S: ConnectionStore>(store: Arc<S>, backoff: Backoff, counts: Arc<Tally>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let outstanding = Arc::new(AtomicUsize::new(0));
        let settled = outstanding.clone();
        let task = tokio::spawn(async move {
            // A full batch, or what came within the linger.
            tokio_stream::StreamExt::chunks_timeout(
                ReceiverStream::new(rx),
                MAX_REMOVE_BATCH,
                LINGER,
            )
            .map(|rows| {
                let n = rows.len();
                let settled = &settled;
                remove_rows(&*store, rows, backoff, &counts)
                    .map(move |()| settled.fetch_sub(n, Ordering::SeqCst))
            })
            .buffer_unordered(CONCURRENT_BATCHES)
            .for_each(|_| async {})
            .await
        });
        Self {
            tx,
            task,
            outstanding,
        }
    }

    /// Queues a gone connection for removal; waits if removal lags far
    /// behind.
    pub async fn remove(&self, gone: Connection) {
        self.queue(Row::Gone(gone)).await;
    }

    /// Queues a row certainly gone by age for its conditional delete.
    pub async fn remove_expired(&self, row: Expired) {
        self.queue(Row::Expired(row)).await;
    }

    async fn queue(&self, row: Row) {
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        // The task ends only after `finish` drops the sender.
        if self.tx.send(row).await.is_err() {
            self.outstanding.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A count of the rows queued and not yet removed or given up on,
    /// readable after the remover has moved into a task: work a batch run
    /// waits for before it ends.
    pub fn outstanding(&self) -> Outstanding {
        Outstanding(self.outstanding.clone())
    }

    /// Waits until everything queued is removed or given up on; the job's
    /// counts then hold every removal.
    pub async fn finish(self) {
        drop(self.tx);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the removal task failed; gone rows may remain");
        }
    }
}

/// See [`Remover::outstanding`].
#[derive(Clone, Debug)]
pub struct Outstanding(Arc<AtomicUsize>);

impl Outstanding {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// One chunk of what was queued: the gone rows in one batch, the expired
/// ones each on its own.
async fn remove_rows<S: ConnectionStore>(
    store: &S,
    rows: Vec<Row>,
    backoff: Backoff,
    counts: &Tally,
) {
    let mut gone = Vec::with_capacity(rows.len());
    for row in rows {
        match row {
            Row::Gone(connection) => gone.push(connection),
            Row::Expired(expired) => remove_expired(store, expired, backoff, counts).await,
        }
    }
    if !gone.is_empty() {
        remove_batch(store, gone, backoff, counts).await;
    }
}

async fn remove_expired<S: ConnectionStore>(
    store: &S,
    row: Expired,
    backoff: Backoff,
    counts: &Tally,
) {
    let mut attempt = 1;
    loop {
        match store.remove_expired(row.clone()).await {
            Ok(true) => return counts.removed(1),
            Ok(false) => {
                tracing::debug!(connection = %row.connection.id, "an expired row changed since it was read; kept");
                return;
            }
            Err(e) if e.is_transient() && backoff.allows_another(attempt) => {
                tracing::debug!(error = %e, attempt, "removal of an expired row failed; retrying");
            }
            Err(e) => {
                tracing::warn!(error = %e, connection = %row.connection.id, "an expired row could not be removed");
                return counts.remove_failed(1);
            }
        }
        tokio::time::sleep(backoff.delay(attempt - 1)).await;
        attempt += 1;
    }
}

async fn remove_batch<S: ConnectionStore>(
    store: &S,
    mut pending: Vec<Connection>,
    backoff: Backoff,
    counts: &Tally,
) {
    let mut attempt = 1;
    loop {
        let asked = pending.len() as u64;
        match store.remove(pending.clone()).await {
            Ok(removal) => {
                let skipped = removal.skipped.len() as u64;
                let changed = removal.changed.len() as u64;
                let removed = asked - skipped - changed - removal.unprocessed.len() as u64;
                counts.removed(removed);
                counts.remove_skipped(skipped);
                if changed > 0 {
                    tracing::debug!(
                        rows = changed,
                        "gone rows rewritten since they were read; kept"
                    );
                }
                pending = removal.unprocessed;
                if pending.is_empty() {
                    return;
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
    counts.remove_failed(pending.len() as u64);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::connection::{KeyValue, RowKey};
    use crate::fakes::FakeTable;
    use crate::telemetry::Metrics;

    fn conn(id: &str, keyed: bool) -> Connection {
        Connection {
            id: id.into(),
            key: keyed.then(|| RowKey(vec![("connectionId".into(), KeyValue::S(id.into()))])),
            started_ms: None,
        }
    }

    fn fast() -> Backoff {
        Backoff {
            base: Duration::from_millis(1),
            max: Duration::from_millis(2),
            max_attempts: 4,
        }
    }

    fn table(ids: &[String]) -> Arc<FakeTable> {
        Arc::new(FakeTable::with(ids, 1000))
    }

    fn job_counts() -> (Arc<Metrics>, Arc<Tally>) {
        let metrics = Arc::new(Metrics::default());
        (metrics.clone(), Arc::new(Tally::new(metrics)))
    }

    #[tokio::test]
    async fn batches_hold_at_most_25_and_unprocessed_items_are_retried() {
        let ids: Vec<String> = (0..60).map(|i| format!("c{i}")).collect();
        let table = table(&ids);
        table.unprocessed_removals.store(3, Ordering::SeqCst);
        let (metrics, counts) = job_counts();
        let remover = Remover::spawn(Arc::new(table.clone()), fast(), counts.clone());
        for id in &ids {
            remover.remove(conn(id, true)).await;
        }
        remover.finish().await;
        assert_eq!(counts.removals(), (60, 0, 0), "removed, failed, skipped");
        assert!(table.remaining().is_empty());
        let calls = table.remove_calls.lock().unwrap();
        assert!(calls.iter().all(|&n| n <= 25));
        assert_eq!(calls.iter().sum::<usize>(), 60 + 3, "3 retried items");
        assert_eq!(Metrics::get(&metrics.removed), 60);
    }

    /// Gone rows that trickle in, a millisecond apart, go out in full
    /// batches rather than a store call for every row or two; a lone row
    /// leaves once the linger has passed, without waiting for the job's end.
    #[tokio::test(start_paused = true)]
    async fn rows_that_trickle_in_share_batches_and_a_lone_row_leaves_after_the_linger() {
        let ids: Vec<String> = (0..51).map(|i| format!("c{i}")).collect();
        let table = table(&ids);
        let (_, counts) = job_counts();
        let remover = Remover::spawn(Arc::new(table.clone()), fast(), counts.clone());
        let calls = || table.remove_calls.lock().unwrap().clone();
        for id in &ids[..50] {
            remover.remove(conn(id, true)).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(calls(), vec![25, 25]);

        remover.remove(conn(&ids[50], true)).await;
        tokio::time::sleep(LINGER / 2).await;
        assert_eq!(calls(), vec![25, 25], "sent before the linger ended");
        tokio::time::sleep(LINGER).await;
        assert_eq!(calls(), vec![25, 25, 1], "held past the linger");
        remover.finish().await;
        assert_eq!(counts.removals(), (51, 0, 0), "removed, failed, skipped");
    }

    #[tokio::test]
    async fn items_unprocessed_after_every_retry_are_reported_failed() {
        let table = table(&["a".to_owned()]);
        table.unprocessed_removals.store(100, Ordering::SeqCst);
        let (metrics, counts) = job_counts();
        let remover = Remover::spawn(Arc::new(table.clone()), fast(), counts.clone());
        remover.remove(conn("a", true)).await;
        remover.finish().await;
        assert_eq!(counts.removals(), (0, 1, 0), "removed, failed, skipped");
        assert_eq!(
            table.remove_calls.lock().unwrap().len(),
            4,
            "max_attempts calls"
        );
        assert_eq!(Metrics::get(&metrics.remove_failed), 1);
    }

    #[tokio::test]
    async fn permanent_errors_and_unknown_keys_are_counted_not_fatal() {
        let table = Arc::new(FakeTable {
            reject_removals: true,
            ..FakeTable::with(&["a".to_owned()], 1000)
        });
        let (_, counts) = job_counts();
        let remover = Remover::spawn(Arc::new(table.clone()), fast(), counts.clone());
        remover.remove(conn("a", true)).await;
        remover.finish().await;
        assert_eq!(counts.removals().1, 1, "failed");
        assert_eq!(
            table.remove_calls.lock().unwrap().len(),
            1,
            "no retry of a permanent error"
        );

        let table = Arc::new(FakeTable {
            composite_key: true,
            ..FakeTable::with(&["x".to_owned()], 1000)
        });
        let (metrics, counts) = job_counts();
        let remover = Remover::spawn(Arc::new(table), fast(), counts.clone());
        remover.remove(conn("x", false)).await;
        remover.finish().await;
        assert_eq!(counts.removals().2, 1, "skipped");
        assert_eq!(Metrics::get(&metrics.remove_failed), 0, "not a failure");
    }
}
