//! `fanout clients` (placeholder while the gateway lands).
