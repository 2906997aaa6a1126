//! Helpers for the fault-injection suite (tests/faults.rs): a fault proxy
//! ([`proxy`]), a rig that runs the real `fanout` binary with proxies in
//! front of its peers ([`rig`]), and the table of invariants each scenario
//! checks and prints ([`invariants`]).

pub mod invariants;
pub mod proxy;
pub mod rig;
