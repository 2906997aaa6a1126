//! Development tools that stand in for AWS on one machine, built as their
//! own binary, `fanout-dev`, so that the production `fanout` binary carries
//! no WebSocket stack. Never on the worker's path: the worker talks to
//! whatever `FANOUT_GATEWAY_ENDPOINT` names.
//!
//! # Layout
//!
//! - [`gateway`]: `fanout-dev gateway`, a local API Gateway WebSocket API:
//!   real WebSocket clients, `$connect`/`$disconnect` rows in DynamoDB, the
//!   `@connections` management API, and fault injection.
//! - [`clients`]: `fanout-dev clients`, N real WebSocket clients that count
//!   what they receive and print a JSON summary.

pub mod clients;
pub mod gateway;

/// Parses `argv` (its first word the command's name, which clap skips) as a
/// command line of `A`'s options alone, once clap's own checks of `A` have
/// passed.
#[cfg(test)]
fn parse_options<A: clap::Args + clap::FromArgMatches>(argv: &[&str]) -> Result<A, clap::Error> {
    let command = A::augment_args(clap::Command::new("fanout-dev"));
    command.clone().debug_assert();
    A::from_arg_matches(&command.try_get_matches_from(argv)?)
}
