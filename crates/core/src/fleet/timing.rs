//! The fleet's timing: how often leases are renewed, how long they count,
//! and the waits that follow from the two. Each wait is derived here, once,
//! with the reason beside it; the compiler checks the bounds at the end.

use std::time::Duration;

/// How often a task renews its lease and reads the others': two writes and
/// two reads per task per second are the whole cost of the fleet. Every
/// wait for a higher claim is this plus a round's timeout ([`JOIN_WAIT`]),
/// and that wait is what a broadcast starting beside small jobs loses
/// before it has its share: half a second keeps it near one second.
pub const RENEW_INTERVAL: Duration = Duration::from_millis(500);

/// A round (the write, then the read) that has not answered within this
/// counts as failed: the task falls back rather than send on a share that
/// the others may no longer count. A PutItem and a Query take milliseconds
/// within a region; 300 ms leaves room for a retry, and keeps a round
/// shorter than the interval, so rounds never overlap. It is also part of
/// every wait for a higher claim ([`JOIN_WAIT`]), so it is kept short.
pub const ROUND_TIMEOUT: Duration = Duration::from_millis(300);

/// The longest a share is in force after the start of the round that
/// computed it: the next round starts one interval later and succeeds or
/// fails within its timeout. So every share in force was computed from a
/// read that started at most this long ago.
pub(super) const SHARE_IN_FORCE: Duration =
    Duration::from_millis(RENEW_INTERVAL.as_millis() as u64 + ROUND_TIMEOUT.as_millis() as u64);

/// Room for a round that starts late (a busy runtime wakes its timers late).
const LATE_START: Duration = Duration::from_millis(250);

/// How long a lease with a higher demand must have been written before the
/// task uses it: by then every other task's share in force was computed from
/// a read that saw it. A joining task (or an idle one that gets work) sends
/// nothing for this long after its first write; with renewals every half
/// second, it takes its share at the round due then, about 1.1 s after it
/// started.
pub const JOIN_WAIT: Duration =
    Duration::from_millis(SHARE_IN_FORCE.as_millis() as u64 + LATE_START.as_millis() as u64);

/// How long a task keeps claiming its demand after its last job ended.
/// Claiming more again counts as a join and waits [`JOIN_WAIT`], so a task
/// that runs one job after another (a gap of milliseconds between them)
/// must not drop its claim in the gap; the cost is a share held for this
/// long after the task's work is really done (a task that stops removes its
/// lease at once).
pub const DEMAND_LINGER: Duration = Duration::from_secs(3);

/// How long a lease counts after the write that renewed it. Long enough
/// that a live task's lease never expires to the others: it renews at
/// least every interval plus a round's timeout, 0.8 s (else it has fallen
/// back), which leaves 2.2 s for clock skew between tasks and a late round.
/// Short enough that a dead task's share is back in use within 4 s (see
/// [`DEAD_SHARE_UNUSED`]).
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// The longest a dead task's share stays unused after its last renewal: its
/// lease expires [`LEASE_TTL`] after that write, and the others see it
/// expired at their next read, at most an interval and a round later.
pub const DEAD_SHARE_UNUSED: Duration = Duration::from_millis(
    LEASE_TTL.as_millis() as u64
        + RENEW_INTERVAL.as_millis() as u64
        + ROUND_TIMEOUT.as_millis() as u64,
);

const _: () = {
    assert!(ROUND_TIMEOUT.as_millis() < RENEW_INTERVAL.as_millis());
    assert!(JOIN_WAIT.as_millis() >= SHARE_IN_FORCE.as_millis());
    // A live task's lease outlives the longest gap between its renewals,
    // with at least a second to spare for skew.
    assert!(LEASE_TTL.as_millis() >= SHARE_IN_FORCE.as_millis() + 1000);
    assert!(DEAD_SHARE_UNUSED.as_millis() <= 4000);
    // A gap between two jobs spans at least one round.
    assert!(DEMAND_LINGER.as_millis() > 2 * RENEW_INTERVAL.as_millis());
};
