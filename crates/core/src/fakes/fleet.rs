//! An in-memory fleet table that several tasks share.

use super::*;

/// An in-memory fleet table that several tasks share: each task reaches it
/// through its own [`FakeLeaseTable`], with faults of its own.
#[derive(Debug, Default)]
pub struct FakeLeases {
    pub leases: Mutex<BTreeMap<String, Lease>>,
}

impl FakeLeases {
    /// One task's connection to the table.
    pub fn connect(self: &Arc<Self>) -> FakeLeaseTable {
        FakeLeaseTable {
            leases: Arc::clone(self),
            failing: AtomicUsize::new(0),
            latency: Mutex::new(Duration::ZERO),
            calls: AtomicUsize::new(0),
        }
    }

    /// The tasks with a lease in the table, expired or not.
    pub fn tasks(&self) -> Vec<String> {
        self.leases.lock().unwrap().keys().cloned().collect()
    }
}

/// One task's way to a [`FakeLeases`]: the next `failing` calls fail as an
/// unreachable table does (and change nothing); the others take effect at
/// once and answer after `latency`, so a write whose answer comes too late
/// has landed all the same, and a read answers with what the table held
/// when it was asked.
#[derive(Debug)]
pub struct FakeLeaseTable {
    pub leases: Arc<FakeLeases>,
    pub failing: AtomicUsize,
    pub latency: Mutex<Duration>,
    pub calls: AtomicUsize,
}

impl FakeLeaseTable {
    /// The next `calls` calls fail.
    pub fn fail_next(&self, calls: usize) {
        self.failing.store(calls, Ordering::SeqCst);
    }

    /// Every call from now on takes `latency` to answer.
    pub fn set_latency(&self, latency: Duration) {
        *self.latency.lock().unwrap() = latency;
    }

    /// Fails if a failure is due; else applies `call` to the leases, and
    /// answers after the latency.
    async fn call<R>(
        &self,
        call: impl FnOnce(&mut BTreeMap<String, Lease>) -> R,
    ) -> Result<R, FleetError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let due = self
            .failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if due.is_ok() {
            return Err(FleetError::Unavailable("connection refused".into()));
        }
        let answer = call(&mut self.leases.leases.lock().unwrap());
        let latency = *self.latency.lock().unwrap();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        Ok(answer)
    }
}

impl LeaseTable for FakeLeaseTable {
    async fn put(&self, lease: &Lease) -> Result<(), FleetError> {
        self.call(|leases| {
            leases.insert(lease.task.clone(), lease.clone());
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Lease>, FleetError> {
        self.call(|leases| leases.values().cloned().collect()).await
    }

    async fn remove(&self, task: &str) -> Result<(), FleetError> {
        self.call(|leases| {
            leases.remove(task);
        })
        .await
    }
}
