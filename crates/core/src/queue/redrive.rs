//! Replays dead-lettered jobs: moves messages from the dead-letter queue
//! back to the jobs queue, once whatever failed them is fixed.
//!
//! Each message is sent to the jobs queue before it is deleted from the
//! dead-letter queue, so an interruption can duplicate a job, never lose one.

use std::time::Duration;

use crate::queue::{JobQueue, MAX_BATCH, QueueError, SendOptions, producer_attributes};

/// How long a received dead letter stays hidden: ample for sending it on and
/// deleting it, short enough that an interrupted redrive's next run finds it.
const REDRIVE_VISIBILITY: Duration = Duration::from_secs(60);

/// What a redrive did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Redriven {
    /// Messages now on the jobs queue and gone from the dead-letter queue.
    pub moved: u64,
    /// Messages sent again but whose deletion from the dead-letter queue
    /// failed: they are on both queues.
    pub left_behind: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("reading the dead-letter queue failed after {moved} moved: {source}")]
    Receive { moved: u64, source: QueueError },
    #[error(
        "sending to the jobs queue failed after {moved} moved (the message stays in the dead-letter queue): {source}"
    )]
    Send { moved: u64, source: QueueError },
}

/// Empty receives in a row that end a redrive. A short poll asks only some
/// of SQS's servers and can come back empty while messages remain; in a row,
/// the chance that every poll missed them shrinks with each one.
pub const EMPTY_RECEIVES_TO_STOP: u32 = 3;

/// Moves up to `max` messages from `dead_letters` to `jobs`, until
/// [`EMPTY_RECEIVES_TO_STOP`] receives in a row come back empty.
pub async fn redrive<D: JobQueue, J: JobQueue>(
    dead_letters: &D,
    jobs: &J,
    max: u64,
    fifo_group: Option<&str>,
) -> Result<Redriven, RedriveError> {
    let mut done = Redriven::default();
    let mut empty_in_a_row = 0;
    while done.moved + done.left_behind < max {
        let room = (max - done.moved - done.left_behind).min(MAX_BATCH as u64) as usize;
        let batch = dead_letters
            .receive(room, REDRIVE_VISIBILITY)
            .await
            .map_err(|source| RedriveError::Receive {
                moved: done.moved,
                source,
            })?;
        if batch.is_empty() {
            empty_in_a_row += 1;
            if empty_in_a_row >= EMPTY_RECEIVES_TO_STOP {
                break;
            }
            continue;
        }
        empty_in_a_row = 0;
        let mut sent = Vec::with_capacity(batch.len());
        for message in &batch {
            let options = SendOptions {
                group_id: message
                    .group_id
                    .clone()
                    .or_else(|| fifo_group.map(str::to_owned)),
                deduplication_id: fifo_group.map(|_| format!("redrive-{}", message.id)),
                // As SQS's own redrive does: the producer's attributes and
                // trace context go back with the job; fanout's notes on why
                // it was dead-lettered do not.
                attributes: producer_attributes(&message.attributes),
                trace_header: message.trace_header.clone(),
                ..SendOptions::default()
            };
            jobs.send(&message.body, &options)
                .await
                .map_err(|source| RedriveError::Send {
                    moved: done.moved,
                    source,
                })?;
            sent.push(message.receipt.clone());
        }
        let failed = dead_letters.delete(&sent).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "deleting redriven messages failed; they stay in the dead-letter queue too");
            sent.clone()
        });
        done.left_behind += failed.len() as u64;
        done.moved += (sent.len() - failed.len()) as u64;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::FakeQueue;

    #[tokio::test]
    async fn every_dead_letter_moves_once_and_in_batches() {
        let bodies: Vec<String> = (0..23).map(|n| format!(r#"{{"data":"{n}"}}"#)).collect();
        let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
        let dead = FakeQueue::with_jobs(&refs, false);
        let jobs = FakeQueue::default();
        let done = redrive(&dead, &jobs, u64::MAX, None)
            .await
            .expect("redrive");
        assert_eq!(
            done,
            Redriven {
                moved: 23,
                left_behind: 0
            }
        );
        assert_eq!(*jobs.sent.lock().unwrap(), bodies);
        assert_eq!(dead.deleted_ids().len(), 23);
    }

    #[tokio::test]
    async fn an_empty_short_poll_does_not_end_the_move_while_messages_remain() {
        let dead = FakeQueue::with_jobs(&["a", "b", "c"], false);
        // A short poll samples a few servers: it can answer empty twice
        // running while every message is still there.
        dead.empty_receives
            .store(2, std::sync::atomic::Ordering::SeqCst);
        let jobs = FakeQueue::default();
        let done = redrive(&dead, &jobs, u64::MAX, None)
            .await
            .expect("redrive");
        assert_eq!(done.moved, 3);
        assert!(dead.visible.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_producers_attributes_go_back_and_fanouts_are_stripped() {
        use crate::queue::{Attribute, REASON_ATTRIBUTE, SOURCE_MESSAGE_ATTRIBUTE};
        let mut dead = FakeQueue::with_jobs(&["a"], false);
        let letter = &mut dead.visible.get_mut().unwrap()[0];
        for name in ["tenant", REASON_ATTRIBUTE, SOURCE_MESSAGE_ATTRIBUTE] {
            letter.attributes.insert(name.into(), Attribute::text("v"));
        }
        letter.trace_header = Some("Root=1-abc".into());
        let jobs = FakeQueue::default();
        redrive(&dead, &jobs, 10, None).await.expect("redrive");
        let sent = jobs.sent_options.lock().unwrap().clone();
        assert_eq!(
            sent[0].attributes.keys().collect::<Vec<_>>(),
            ["tenant"],
            "{sent:?}"
        );
        assert_eq!(sent[0].trace_header.as_deref(), Some("Root=1-abc"));
    }

    #[tokio::test]
    async fn max_bounds_the_move() {
        let dead = FakeQueue::with_jobs(&["a", "b", "c"], false);
        let jobs = FakeQueue::default();
        let done = redrive(&dead, &jobs, 2, None).await.expect("redrive");
        assert_eq!(done.moved, 2);
        assert_eq!(dead.visible.lock().unwrap().len(), 1, "one left");
    }

    #[tokio::test]
    async fn a_failed_send_keeps_the_message_in_the_dead_letter_queue() {
        let dead = FakeQueue::with_jobs(&["a"], false);
        let jobs = FakeQueue {
            missing: true,
            ..FakeQueue::default()
        };
        let err = redrive(&dead, &jobs, 10, None).await.expect_err("fails");
        assert!(matches!(err, RedriveError::Send { moved: 0, .. }), "{err}");
        assert!(dead.deleted_ids().is_empty());
    }
}
