//! Small in-process fakes behind the crate's seams: for this crate's unit
//! tests, and (feature `fakes`) for other crates' tests, examples and
//! benchmarks.

mod fleet;
mod gateway;
mod generated;
mod queue;
mod random;
mod reports;
mod runs;
mod tables;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream};

use crate::connection::expiry::Expired;
use crate::connection::{Connection, ConnectionId, KeyValue, RowKey};
use crate::fleet::{FleetError, Lease, LeaseTable};
use crate::gateway::{Gateway, PostOutcome};
use crate::queue::{DeadLettered, JobQueue, Message, QueueError, Receipt, SendOptions};
use crate::reports::{BroadcastReport, ReportError, ReportSink};
use crate::store::{
    AudienceQuery, ChannelOrder, ConnectionStore, Cursor, Page, Position, Removal, StoreError,
};

/// Engine settings for tests: delays of milliseconds, so retries and
/// passes over deferred connections take no noticeable time; 4 attempts,
/// 2 deferred passes, 50 ms of 429s per connection, the production
/// connect window.
pub fn engine_settings(max_in_flight: usize) -> crate::engine::EngineSettings {
    crate::engine::EngineSettings {
        send_backoff: crate::Backoff {
            base: Duration::from_millis(1),
            max: Duration::from_millis(4),
            max_attempts: 4,
        },
        throttle_deadline: Duration::from_millis(50),
        deferred_passes: 2,
        pass_pause: Duration::from_millis(1),
        max_in_flight,
        scan_segments: 1,
        progress_interval: Duration::from_secs(3600),
        connect_window: crate::engine::evidence::CONNECT_WINDOW,
    }
}

pub fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("conn-{i}")).collect()
}

pub use fleet::*;
pub use gateway::*;
pub use generated::*;
pub use queue::*;
pub use random::*;
pub use reports::*;
pub use runs::*;
pub use tables::*;
