//! The settings a deployment changes that the core's messages point at
//! (the connections table, the channel index, the fleet rate, ...), named
//! as whoever configures fanout names them.
//!
//! The core does not know how it is configured: the binary names each
//! setting once at startup with [`name_settings`] (`FANOUT_CHANNEL_INDEX`,
//! say), and every error and dead-letter reason that points at a setting
//! prints that name. Unnamed (in the core's own tests, or a program that
//! embeds the core), a setting prints as words.

use std::fmt;
use std::sync::OnceLock;

/// A setting a message can point at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Setting {
    /// The connections table.
    Table,
    /// The channel index (a GSI keyed by the channel attribute).
    ChannelIndex,
    /// The named audiences and their indexes.
    AudienceIndexes,
    /// The attribute holding a connection's start.
    ConnectedAtAttribute,
    /// The table of run records and checkpoints.
    CheckpointTable,
    /// This task's send rate.
    RatePerSecond,
    /// The fleet's send rate, shared by its tasks.
    FleetRatePerSecond,
    /// The table of the fleet's leases.
    FleetTable,
}

impl Setting {
    /// Every setting, for a namer's completeness test.
    pub const ALL: [Setting; 8] = [
        Setting::Table,
        Setting::ChannelIndex,
        Setting::AudienceIndexes,
        Setting::ConnectedAtAttribute,
        Setting::CheckpointTable,
        Setting::RatePerSecond,
        Setting::FleetRatePerSecond,
        Setting::FleetTable,
    ];

    /// How a message names it when nothing named the settings.
    fn words(self) -> &'static str {
        match self {
            Setting::Table => "the connections table setting",
            Setting::ChannelIndex => "the channel index setting",
            Setting::AudienceIndexes => "the audience indexes setting",
            Setting::ConnectedAtAttribute => "the connected-at attribute setting",
            Setting::CheckpointTable => "the checkpoint table setting",
            Setting::RatePerSecond => "the per-task rate setting",
            Setting::FleetRatePerSecond => "the fleet rate setting",
            Setting::FleetTable => "the fleet table setting",
        }
    }
}

static NAMES: OnceLock<fn(Setting) -> &'static str> = OnceLock::new();

/// Names every setting for the messages of this process; the first call
/// stays (a process is configured one way).
pub fn name_settings(names: fn(Setting) -> &'static str) {
    let _ = NAMES.set(names);
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match NAMES.get() {
            Some(name) => f.write_str(name(*self)),
            None => f.write_str(self.words()),
        }
    }
}
