//! FIFO chains: messages of one group that SQS returns together run one
//! after another, in their order; the rest wait hidden behind the first.

use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::AbortOnDropHandle;

use super::{Fate, JobContext};
use crate::gateway::Gateway;
use crate::queue::{JobQueue, Message};
use crate::store::ConnectionStore;

impl<Q: JobQueue, S: ConnectionStore, G: Gateway> JobContext<Q, S, G> {
    /// Runs messages of one FIFO group, received together, one after the
    /// other in their order. The ones still waiting are kept hidden; if one
    /// stays on the queue, the rest are handed back behind it rather than
    /// run ahead of it.
    pub(super) async fn process_in_order(&self, chain: Vec<(Message, OwnedSemaphorePermit)>) {
        let waiting: Vec<AbortOnDropHandle<()>> = chain
            .iter()
            .skip(1)
            .map(|(message, _)| self.heartbeat(message.receipt.clone(), message.id.clone(), None))
            .collect();
        let mut waiting = waiting.into_iter();
        let mut chain = chain.into_iter();
        while let Some((message, permit)) = chain.next() {
            let fate = self.process(&message).await;
            drop(permit);
            drop(waiting.next());
            if fate == Fate::Kept {
                waiting.by_ref().for_each(drop);
                for (rest, permit) in chain.by_ref() {
                    self.hand_back(&rest, Duration::ZERO).await;
                    drop(permit);
                }
            }
        }
    }
}

/// Groups received messages into chains that must run one after another:
/// messages of one FIFO group (SQS may return several at once, in order)
/// form one chain; every other message is a chain of its own.
pub(super) fn in_group_order<P>(
    received: impl IntoIterator<Item = (Message, P)>,
) -> Vec<Vec<(Message, P)>> {
    let mut chains: Vec<Vec<(Message, P)>> = Vec::new();
    for (message, permit) in received {
        let group = message.group_id.clone();
        match chains
            .iter_mut()
            .find(|chain| group.is_some() && chain[0].0.group_id == group)
        {
            Some(chain) => chain.push((message, permit)),
            None => chains.push(vec![(message, permit)]),
        }
    }
    chains
}
