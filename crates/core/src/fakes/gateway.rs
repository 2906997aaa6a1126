//! A scripted gateway that records what it delivered.

use super::*;

/// A gateway that answers from a script per connection and records
/// deliveries and the peak of concurrent calls.
#[derive(Default)]
pub struct FakeGateway {
    /// Answers to give, in order, per id; then `Delivered`.
    pub script: Mutex<HashMap<String, Vec<PostOutcome>>>,
    pub gone: HashSet<String>,
    pub delivered: Mutex<Vec<(String, Bytes)>>,
    pub in_flight: AtomicUsize,
    pub peak: AtomicUsize,
    /// Every post waits forever (a stuck endpoint).
    pub stall: bool,
    /// Posts to these ids wait forever.
    pub stall_ids: HashSet<String>,
    /// Posts to these ids panic (a bug in a job).
    pub panic_ids: HashSet<String>,
    /// Posts to these ids wait until [`FakeGateway::release`].
    pub held_ids: HashSet<String>,
    /// Set by [`FakeGateway::release`] (public only so struct update
    /// syntax works outside this module).
    pub released: AtomicBool,
    pub release: tokio::sync::Notify,
}

impl FakeGateway {
    /// Answers each listed id from its script, in order, then delivers;
    /// every other id is delivered to at once.
    pub fn answering<'a>(script: impl IntoIterator<Item = (&'a str, Vec<PostOutcome>)>) -> Self {
        let script = script
            .into_iter()
            .map(|(id, answers)| (id.to_owned(), answers))
            .collect();
        Self {
            script: Mutex::new(script),
            ..Self::default()
        }
    }

    /// The ids delivered to, in order, once per delivery.
    pub fn delivered_ids(&self) -> Vec<String> {
        self.delivered
            .lock()
            .unwrap()
            .iter()
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Answers gone (410) for each of `ids`; every other id takes the
    /// message.
    pub fn answering_gone<'a>(ids: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            gone: ids.into_iter().map(str::to_owned).collect(),
            ..Self::default()
        }
    }

    /// Lets the posts to `held_ids` go on, now and from now on.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.release.notify_waiters();
    }
}

impl Gateway for FakeGateway {
    async fn post(&self, id: &ConnectionId, payload: Bytes) -> PostOutcome {
        if self.stall || self.stall_ids.contains(id.as_str()) {
            return std::future::pending().await;
        }
        if self.held_ids.contains(id.as_str()) {
            loop {
                let released = self.release.notified();
                if self.released.load(Ordering::SeqCst) {
                    break;
                }
                released.await;
            }
        }
        if self.panic_ids.contains(id.as_str()) {
            panic!("posting to {id} panicked");
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::task::yield_now().await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.gone.contains(id.as_str()) {
            return PostOutcome::Gone;
        }
        let scripted = self
            .script
            .lock()
            .unwrap()
            .get_mut(id.as_str())
            .and_then(|answers| (!answers.is_empty()).then(|| answers.remove(0)));
        match scripted {
            Some(answer) => answer,
            None => {
                self.delivered
                    .lock()
                    .unwrap()
                    .push((id.to_string(), payload));
                PostOutcome::Delivered
            }
        }
    }
}
