//! An in-memory job queue that records what the worker does to each message.

use super::*;

/// An in-memory queue: `visible` messages are handed out by `receive`;
/// everything the worker does to them is recorded.
#[derive(Default)]
pub struct FakeQueue {
    pub visible: Mutex<Vec<Message>>,
    pub deleted: Mutex<Vec<Receipt>>,
    /// (receipt, timeout) per ChangeMessageVisibility.
    pub visibility: Mutex<Vec<(Receipt, Duration)>>,
    /// (message id, reason); `None` here means no dead-letter queue.
    pub dead: Option<Mutex<Vec<(String, String)>>>,
    pub sent: Mutex<Vec<String>>,
    /// The options of each send, in the order of `sent`.
    pub sent_options: Mutex<Vec<SendOptions>>,
    /// The visibility timeout each receive asked for.
    pub receive_visibility: Mutex<Vec<Duration>>,
    /// Receives that fail before the queue answers again.
    pub failing_receives: AtomicUsize,
    pub receives: AtomicUsize,
    /// Every call answers that the queue does not exist.
    pub missing: bool,
    /// How long an empty receive waits (a long poll); at least 5 ms.
    pub poll_wait: Duration,
    /// Receives that answer empty although messages are visible, as an SQS
    /// short poll does when it samples servers that hold none.
    pub empty_receives: AtomicUsize,
    /// How long each send takes.
    pub send_wait: Duration,
    /// Dead-letter copies that fail before the queue takes them.
    pub failing_dead_letters: AtomicUsize,
    /// Visibility changes, deletes and sends never answer (a hung queue).
    pub stall_settles: bool,
    /// How long every call takes before it answers, as an SQS call does.
    pub latency: Duration,
    /// How long a receive's answer takes to come back after the queue
    /// chose what to hand out: a hand-back arriving meanwhile is not in it.
    pub answer_delay: Duration,
    /// Hand-backs with no delay make the message visible again, its
    /// receive count raised, as SQS does; otherwise they are only recorded.
    pub redeliver: bool,
    /// Messages handed out and not yet handed back (kept with `redeliver`).
    pub in_flight: Mutex<Vec<Message>>,
}

impl FakeQueue {
    pub fn with_jobs(bodies: &[&str], dead_letter_queue: bool) -> Self {
        let visible = bodies
            .iter()
            .enumerate()
            .map(|(n, body)| Message {
                id: format!("m{n}"),
                body: body.to_string(),
                receipt: Receipt(format!("r{n}")),
                receive_count: 1,
                group_id: None,
                attributes: Default::default(),
                trace_header: None,
            })
            .collect();
        Self {
            visible: Mutex::new(visible),
            dead: dead_letter_queue.then(|| Mutex::new(Vec::new())),
            ..Self::default()
        }
    }

    async fn answer_after_latency(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    /// A settle (visibility change or delete) answers after the latency, or
    /// never while settles stall.
    async fn settle_after_latency(&self) {
        self.answer_after_latency().await;
        if self.stall_settles {
            std::future::pending::<()>().await;
        }
    }

    fn no_such_queue() -> QueueError {
        QueueError::NoSuchQueue {
            url: "http://127.0.0.1:1/q".into(),
        }
    }

    pub fn deleted_ids(&self) -> Vec<String> {
        let mut ids: Vec<_> = self
            .deleted
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.0.clone())
            .collect();
        ids.sort();
        ids
    }
}

/// Uses up one of the answers `left` counts down; false once none are left.
fn count_down(left: &AtomicUsize) -> bool {
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl JobQueue for FakeQueue {
    async fn receive(&self, max: usize, visibility: Duration) -> Result<Vec<Message>, QueueError> {
        self.answer_after_latency().await;
        self.receives.fetch_add(1, Ordering::SeqCst);
        self.receive_visibility.lock().unwrap().push(visibility);
        if self.missing {
            return Err(Self::no_such_queue());
        }
        if count_down(&self.failing_receives) {
            return Err(QueueError::Unavailable("connection refused".into()));
        }
        if count_down(&self.empty_receives) {
            return Ok(Vec::new());
        }
        let take = || {
            let mut visible = self.visible.lock().unwrap();
            let n = max.min(visible.len());
            visible.drain(..n).collect::<Vec<Message>>()
        };
        let mut batch = take();
        if batch.is_empty() {
            // A long poll that finds nothing waits, then takes what arrived.
            tokio::time::sleep(self.poll_wait.max(Duration::from_millis(5))).await;
            batch = take();
        }
        if self.redeliver {
            self.in_flight.lock().unwrap().extend(batch.iter().cloned());
        }
        if !self.answer_delay.is_zero() {
            tokio::time::sleep(self.answer_delay).await;
        }
        Ok(batch)
    }

    async fn set_visibility(&self, receipt: &Receipt, timeout: Duration) -> Result<(), QueueError> {
        self.settle_after_latency().await;
        self.visibility
            .lock()
            .unwrap()
            .push((receipt.clone(), timeout));
        if self.redeliver && timeout.is_zero() {
            let mut in_flight = self.in_flight.lock().unwrap();
            if let Some(at) = in_flight.iter().position(|m| &m.receipt == receipt) {
                let mut message = in_flight.remove(at);
                message.receive_count += 1;
                self.visible.lock().unwrap().push(message);
            }
        }
        Ok(())
    }

    async fn delete(&self, receipts: &[Receipt]) -> Result<Vec<Receipt>, QueueError> {
        assert!(receipts.len() <= crate::queue::MAX_BATCH);
        self.settle_after_latency().await;
        self.deleted
            .lock()
            .unwrap()
            .extend(receipts.iter().cloned());
        Ok(Vec::new())
    }

    async fn dead_letter(
        &self,
        message: &Message,
        reason: &str,
    ) -> Result<DeadLettered, QueueError> {
        if count_down(&self.failing_dead_letters) {
            return Err(QueueError::Unavailable("connection refused".into()));
        }
        match &self.dead {
            Some(dead) => {
                dead.lock()
                    .unwrap()
                    .push((message.id.clone(), reason.to_owned()));
                Ok(DeadLettered::Sent)
            }
            None => Ok(DeadLettered::NotConfigured),
        }
    }

    async fn send(&self, body: &str, options: &SendOptions) -> Result<String, QueueError> {
        if self.stall_settles {
            return std::future::pending().await;
        }
        if !self.send_wait.is_zero() {
            tokio::time::sleep(self.send_wait).await;
        }
        if self.missing {
            return Err(Self::no_such_queue());
        }
        self.sent_options.lock().unwrap().push(options.clone());
        let mut sent = self.sent.lock().unwrap();
        sent.push(body.to_owned());
        Ok(format!("sent-{}", sent.len()))
    }
}
