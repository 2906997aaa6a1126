//! Settling each connection's answer: gone ones by the evidence their 410
//! gives (see [`super::evidence`]), with the other rows read for them;
//! deferred ones kept for the next pass; the first rejected ones named for
//! the report.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::delivery::Delivery;
use super::evidence::{EndpointWatch, GoneEvidence, Standing, judge_gone};
use super::rechecks::{Recheck, Rechecks};
use super::remover::Remover;
use super::tally::Tally;
use super::{Deferred, FanoutError, MAX_FAILED_IDS, lock};
use crate::connection::expiry::epoch_ms;
use crate::connection::{Connection, ConnectionId};

/// What a run's answers leave to act on later: the deferred connections,
/// for the next pass, and the first rejected ones, for the report.
#[derive(Default)]
pub(super) struct Outstanding {
    pub deferred: Vec<Deferred>,
    pub rejected: Vec<ConnectionId>,
}

/// What a run settles its answers with.
#[derive(Clone, Copy)]
pub(super) struct Settler<'a> {
    pub remover: &'a Remover,
    pub siblings: &'a Siblings,
    pub counts: &'a Tally,
    pub watch: &'a EndpointWatch,
    pub rechecks: &'a Rechecks,
    pub held: &'a Held,
    pub payload: &'a Bytes,
    /// A stream's run: its newest value replaces `payload`.
    pub frontier: Option<&'a super::Frontier>,
    pub window: Duration,
}

/// 410s of established connections that came before the endpoint proved
/// itself: removed once a 2xx proves it, else rechecked at the run's end.
#[derive(Default)]
pub(super) struct Held {
    count: AtomicU64,
    rows: Mutex<Vec<(Connection, Vec<Connection>)>>,
}

/// Rows one run holds at most; past it, a 410 goes to the recheck queue.
const MAX_HELD: usize = 1000;

impl Settler<'_> {
    /// Acts on one connection's outcome: gone ones by the evidence their
    /// 410 gives (see [`crate::engine::evidence`]), with the other rows read for
    /// them; deferred ones kept for the next pass; the first rejected ones
    /// named for the report (the counts were taken where the answer came,
    /// in [`Tally`]).
    pub(super) async fn settle(
        &self,
        outstanding: &mut Outstanding,
        id: ConnectionId,
        delivery: Delivery,
    ) -> Result<(), FanoutError> {
        match delivery {
            Delivery::Delivered => {
                self.siblings.take(&id);
                if self.held.count.load(Ordering::Relaxed) > 0 && self.watch.proven() {
                    self.release_held(Standing::Proven).await;
                }
            }
            Delivery::Rejected(rejected_id) => {
                self.siblings.take(&id);
                if outstanding.rejected.len() < MAX_FAILED_IDS {
                    outstanding.rejected.push(rejected_id);
                }
            }
            Delivery::Deferred(d) => outstanding.deferred.push(d),
            Delivery::Gone(connection) => {
                let rows = self.siblings.take(&id);
                self.gone(connection, rows).await;
            }
            Delivery::Abort(e) => return Err(e),
        }
        Ok(())
    }

    async fn gone(&self, connection: Connection, rows: Vec<Connection>) {
        let now_ms = epoch_ms(SystemTime::now());
        let standing = self.watch.standing();
        match judge_gone(&connection, &standing, now_ms, self.window) {
            // Queued removals complete even if the job stops, so the page
            // may count as finished.
            GoneEvidence::Remove => self.remove(connection, rows).await,
            GoneEvidence::Hold => {
                let mut held = lock(&self.held.rows);
                if held.len() < MAX_HELD {
                    held.push((connection, rows));
                    self.held.count.store(held.len() as u64, Ordering::Relaxed);
                } else {
                    drop(held);
                    self.recheck(connection, rows, self.window);
                }
            }
            GoneEvidence::Recheck { after } => self.recheck(connection, rows, after),
            GoneEvidence::Keep => self.counts.kept(1),
        }
    }

    async fn remove(&self, connection: Connection, rows: Vec<Connection>) {
        self.remover.remove(connection).await;
        for row in rows {
            self.remover.remove(row).await;
        }
    }

    fn recheck(&self, connection: Connection, siblings: Vec<Connection>, after: Duration) {
        let queued = self.rechecks.push(Recheck {
            connection,
            siblings,
            payload: self
                .frontier
                .map_or_else(|| self.payload.clone(), |f| f.value(self.payload, None)),
            after,
        });
        if queued {
            self.counts.rechecking(1);
        } else {
            self.counts.kept(1);
        }
    }

    /// Acts on the held rows as `standing` says: removed once proven,
    /// rechecked while unproven, kept while the endpoint looks wrong.
    pub(super) async fn release_held(&self, standing: Standing) {
        let rows = std::mem::take(&mut *lock(&self.held.rows));
        self.held.count.store(0, Ordering::Relaxed);
        for (connection, siblings) in rows {
            match &standing {
                Standing::Proven => self.remove(connection, siblings).await,
                Standing::Unproven => self.recheck(connection, siblings, self.window),
                Standing::Suspect(_) => self.counts.kept(1),
            }
        }
    }
}

/// The other rows read for connections whose answer is not final yet (a
/// connection in several channels of a merge has one row per channel): a
/// gone connection's rows are all removed, a live one's all kept. Holds
/// entries for the sends in flight and the deferred connections only.
#[derive(Default)]
pub(super) struct Siblings(Mutex<HashMap<ConnectionId, Vec<Connection>>>);

impl Siblings {
    pub(super) fn add(&self, rows: Vec<Connection>) {
        if rows.is_empty() {
            return;
        }
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for row in rows {
            map.entry(row.id.clone()).or_default().push(row);
        }
    }

    /// The other rows of `id`, which has its final answer.
    pub(super) fn take(&self, id: &ConnectionId) -> Vec<Connection> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return Vec::new();
        }
        map.remove(id).unwrap_or_default()
    }
}
