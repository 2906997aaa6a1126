//! The benchmark's audience: the core's generated table
//! (`fanout_core::fakes::GeneratedTable`, ids `conn-0` … `conn-{n-1}`);
//! the sink answers 410 for every id whose number is a multiple of
//! [`GONE_EVERY`].

pub use fanout_core::fakes::GeneratedTable;

/// One in 20 connections is gone (5 %), as in every benchmark case.
pub const GONE_EVERY: u64 = 20;

/// Whether the sink answers 410 for this connection id.
pub fn is_gone(id: &str) -> bool {
    id.strip_prefix("conn-")
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| n % GONE_EVERY == 0)
}
