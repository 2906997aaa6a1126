//! An in-memory run table with DynamoDB's conditional write.

use super::*;

/// An in-memory run table with DynamoDB's conditional write.
#[derive(Default)]
pub struct FakeRunTable {
    pub records: Mutex<HashMap<String, crate::runs::RunRecord>>,
    /// Every call fails as a throttled table does, while set.
    pub throttle: AtomicBool,
    /// Writes that were applied.
    pub writes: AtomicU64,
    /// Every call: reads and writes, applied or not.
    pub calls: AtomicU64,
    /// Waited in every call, as a table's round trip takes time.
    pub latency: Duration,
    /// Broadcast records, by broadcast key.
    pub tallies: Mutex<HashMap<String, crate::runs::BroadcastTally>>,
}

impl crate::runs::RunTable for FakeRunTable {
    async fn load(
        &self,
        key: &str,
    ) -> Result<Option<crate::runs::RunRecord>, crate::runs::DurableError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.throttle.load(Ordering::SeqCst) {
            return Err(crate::runs::DurableError::Throttled("fake".into()));
        }
        Ok(self.records.lock().unwrap().get(key).cloned())
    }

    async fn store(
        &self,
        record: &crate::runs::RunRecord,
        read: Option<u64>,
    ) -> Result<bool, crate::runs::DurableError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.throttle.load(Ordering::SeqCst) {
            return Err(crate::runs::DurableError::Throttled("fake".into()));
        }
        let mut records = self.records.lock().unwrap();
        let current = records.get(&record.key).map(|r| r.version);
        if current != read {
            return Ok(false);
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        records.insert(record.key.clone(), record.clone());
        Ok(true)
    }

    async fn tally(
        &self,
        broadcast: &str,
        piece: &crate::runs::Piece,
    ) -> Result<crate::runs::Tallied, crate::runs::DurableError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.throttle.load(Ordering::SeqCst) {
            return Err(crate::runs::DurableError::Throttled("fake".into()));
        }
        let mut tallies = self.tallies.lock().unwrap();
        let tally = tallies.entry(broadcast.to_owned()).or_default();
        if tally.settled.contains(&piece.run) {
            return Ok(crate::runs::Tallied {
                counted: false,
                tally: tally.clone(),
            });
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        tally.settled.insert(piece.run.clone());
        tally.expected.extend(piece.expects.iter().cloned());
        tally.reached.extend(piece.reached.iter().cloned());
        tally.unreached.extend(piece.unreached.iter().cloned());
        tally.totals.add(&piece.totals);
        if tally.started_ms == 0 || piece.started_ms < tally.started_ms {
            tally.started_ms = piece.started_ms;
        }
        Ok(crate::runs::Tallied {
            counted: true,
            tally: tally.clone(),
        })
    }
}

impl crate::runs::RunTable for Arc<FakeRunTable> {
    async fn load(
        &self,
        key: &str,
    ) -> Result<Option<crate::runs::RunRecord>, crate::runs::DurableError> {
        crate::runs::RunTable::load(&**self, key).await
    }

    async fn store(
        &self,
        record: &crate::runs::RunRecord,
        read: Option<u64>,
    ) -> Result<bool, crate::runs::DurableError> {
        crate::runs::RunTable::store(&**self, record, read).await
    }

    async fn tally(
        &self,
        broadcast: &str,
        piece: &crate::runs::Piece,
    ) -> Result<crate::runs::Tallied, crate::runs::DurableError> {
        crate::runs::RunTable::tally(&**self, broadcast, piece).await
    }
}
