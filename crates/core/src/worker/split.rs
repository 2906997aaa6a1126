//! Splitting: a whole-table broadcast becomes segment jobs, each scanning a
//! share of the table, so several workers send it side by side.

use super::JobContext;
use crate::gateway::Gateway;
use crate::job::{Job, Target};
use crate::queue::{JobQueue, Message, SendOptions};
use crate::store::ConnectionStore;
use crate::telemetry::Metrics;

impl<Q: JobQueue, S: ConnectionStore, G: Gateway> JobContext<Q, S, G> {
    /// How many segment jobs `job` becomes, if it is to be split. (Not on
    /// FIFO queues: a group runs one job at a time, so shares could not run
    /// side by side, and they would queue behind later broadcasts.)
    pub(super) fn split_of(&self, job: &Job) -> Option<u32> {
        if job.segment.is_some() || job.resume.is_some() || job.target != Target::All {
            return None;
        }
        let total = job.split.unwrap_or(self.settings.split_segments);
        (total > 1).then_some(total)
    }

    /// Puts a broadcast's segment jobs on the queue; then its message goes.
    /// If a send fails (the error is returned), the job is retried whole
    /// later: segments already sent then run twice (duplicates, never a
    /// loss).
    pub(super) async fn split(
        &self,
        message: &Message,
        job: &Job,
        total: u32,
    ) -> Result<(), String> {
        // Up to MAX_SPLIT sends one after another can outlast the visibility
        // timeout; another worker would then split the job again.
        let heartbeat = self.heartbeat(message.receipt.clone(), job.id.clone(), None);
        for (index, part) in job.split_into(total).into_iter().enumerate() {
            let sent = match serde_json::to_string(&part) {
                Ok(body) => self
                    .queue
                    .send(&body, &SendOptions::default())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = sent {
                tracing::error!(job_id = %job.id, index, error = %e, "splitting the job failed; it will be retried");
                drop(heartbeat);
                return Err(format!("splitting the job failed at segment {index}: {e}"));
            }
        }
        drop(heartbeat);
        tracing::info!(job_id = %job.id, segments = total, "job split into segment jobs");
        Metrics::incr(&self.metrics.jobs_split);
        Ok(())
    }
}
