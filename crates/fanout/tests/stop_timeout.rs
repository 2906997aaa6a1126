//! The deployment template's stop timeout against the worker's shutdown
//! bound: ECS sends SIGKILL `StopTimeout` seconds after SIGTERM, so it must
//! cover `shutdown_grace` plus [`SHUTDOWN_SETTLE_BOUND`] plus a moment for the
//! process to exit, or a stop can end in a SIGKILL mid hand-back.

use std::time::Duration;

use fanout::config::Config;
use fanout_core::worker::SHUTDOWN_SETTLE_BOUND;

const TEMPLATE: &str = include_str!("../../../config/cloudformation.yaml");

/// Time for the process itself to exit after the worker stops (the metrics
/// server's last line, the runtime's shutdown), as docs/how-it-works.md sizes it.
const EXIT_MARGIN: Duration = Duration::from_secs(5);

/// Fargate's ceiling for a container's stop timeout.
const FARGATE_MAX_STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// The value of the only template line whose trimmed text starts with `key`.
fn template_value(key: &str) -> &'static str {
    let mut found = TEMPLATE
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with(key));
    let line = found
        .next()
        .unwrap_or_else(|| panic!("no `{key}` in the template"));
    assert!(found.next().is_none(), "`{key}` set twice in the template");
    line
}

// figment's Jail returns its own large error type; the closure cannot
// shrink it.
#[allow(clippy::result_large_err)]
fn default_grace() -> Duration {
    let mut grace = Duration::ZERO;
    figment::Jail::expect_with(|jail| {
        jail.set_env("FANOUT_QUEUE_URL", "http://127.0.0.1:9/000000000000/jobs");
        grace = Config::load(None)
            .expect("the defaults load")
            .shutdown_grace;
        Ok(())
    });
    grace
}

#[test]
fn the_templates_stop_timeout_covers_the_grace_and_the_settle_bound() {
    let stop: u64 = template_value("StopTimeout:")
        .trim_start_matches("StopTimeout:")
        .trim()
        .parse()
        .expect("StopTimeout is whole seconds");
    let stop = Duration::from_secs(stop);

    // `- { Name: FANOUT_SHUTDOWN_GRACE, Value: 25s }`
    let grace_line = template_value("- { Name: FANOUT_SHUTDOWN_GRACE");
    let value = grace_line
        .split("Value:")
        .nth(1)
        .expect("a Value")
        .trim()
        .trim_end_matches('}')
        .trim();
    let grace = humantime::parse_duration(value).expect("a duration");
    assert_eq!(
        grace,
        default_grace(),
        "the template deploys the default grace period"
    );

    let needed = grace + SHUTDOWN_SETTLE_BOUND + EXIT_MARGIN;
    assert!(
        stop >= needed,
        "StopTimeout {stop:?} < grace {grace:?} + settle bound {SHUTDOWN_SETTLE_BOUND:?} + exit {EXIT_MARGIN:?}"
    );
    assert!(stop <= FARGATE_MAX_STOP_TIMEOUT, "Fargate allows 120 s");
}
