//! Receiving: wait for a free job slot, take every other free one up to a
//! receive's worth, and long-poll for that many messages in a task of its
//! own (so shutdown can leave it running, see `wind_down`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::queue::{JobQueue, MAX_BATCH, Message, QueueError};

/// A receive under way. One still open at SQS when receiving stops is
/// finished during the wind-down, and what it brings is handed back.
pub(super) type AbandonedReceive = AbortOnDropHandle<Result<Vec<Message>, QueueError>>;

/// At least one job slot, and as many more as are free now (at most a
/// receive's worth); `None` if shutdown comes first.
pub(super) async fn free_slots(
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let first = tokio::select! {
        biased;
        () = shutdown.cancelled() => return None,
        permit = slots.clone().acquire_owned() => permit.expect("the job semaphore is never closed"),
    };
    let mut permits = vec![first];
    while permits.len() < MAX_BATCH {
        match slots.clone().try_acquire_owned() {
            Ok(permit) => permits.push(permit),
            Err(_) => break,
        }
    }
    Some(permits)
}

/// Starts one receive of up to `max` messages, hidden for `visibility`.
pub(super) fn spawn<Q: JobQueue>(
    queue: &Arc<Q>,
    max: usize,
    visibility: Duration,
) -> AbandonedReceive {
    let queue = queue.clone();
    AbortOnDropHandle::new(tokio::spawn(
        async move { queue.receive(max, visibility).await },
    ))
}
