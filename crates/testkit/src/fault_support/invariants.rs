//! The invariants every scenario checks, printed as a table before they are
//! asserted, so a run with `--nocapture` shows what each fault came to:
//! no live connection removed; every gone connection removed; every job
//! completed, retried or dead-lettered (none lost); duplicate deliveries
//! counted and bounded where the design bounds them.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::time::Duration;

use fanout_dev::clients::{ClientEnd, Swarm};

use super::rig::{Rig, Run};
use crate::support;

/// One row: what was seen, what was expected, and whether it holds.
struct Row {
    name: String,
    observed: String,
    expected: String,
    ok: bool,
}

/// A scenario's table of invariants and figures.
pub struct Table {
    scenario: String,
    rows: Vec<Row>,
}

impl Table {
    pub fn new(scenario: &str) -> Self {
        Self {
            scenario: scenario.to_owned(),
            rows: Vec::new(),
        }
    }

    pub fn equal(&mut self, name: &str, observed: u64, expected: u64) {
        self.push(
            name,
            observed,
            format!("= {expected}"),
            observed == expected,
        );
    }

    pub fn at_most(&mut self, name: &str, observed: u64, bound: u64, why: &str) {
        self.push(
            name,
            observed,
            format!("≤ {bound} ({why})"),
            observed <= bound,
        );
    }

    pub fn at_least(&mut self, name: &str, observed: u64, bound: u64) {
        self.push(name, observed, format!("≥ {bound}"), observed >= bound);
    }

    /// A figure shown for information, not checked.
    pub fn figure(&mut self, name: &str, observed: impl Display) {
        self.push(name, observed, String::new(), true);
    }

    fn push(&mut self, name: &str, observed: impl Display, expected: String, ok: bool) {
        self.rows.push(Row {
            name: name.to_owned(),
            observed: observed.to_string(),
            expected,
            ok,
        });
    }

    /// Prints the table, then fails the test if any row does not hold.
    pub fn print_and_assert(&self) {
        let width = |column: fn(&Row) -> &str| {
            let widths = self.rows.iter().map(|r| column(r).chars().count());
            widths.max().unwrap_or(0)
        };
        let name_w = width(|r| &r.name);
        let obs_w = width(|r| &r.observed);
        let mut out = format!("\n== {} ==\n", self.scenario);
        for row in &self.rows {
            let mark = match (row.ok, row.expected.is_empty()) {
                (false, _) => "FAIL",
                (true, true) => "    ",
                (true, false) => "ok  ",
            };
            out.push_str(&format!(
                "{mark} {:<name_w$}  {:>obs_w$}  {}\n",
                row.name, row.observed, row.expected
            ));
        }
        println!("{out}");
        let failed: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| !r.ok)
            .map(|r| r.name.as_str())
            .collect();
        assert!(
            failed.is_empty(),
            "{}: {failed:?} do not hold{out}",
            self.scenario
        );
    }
}

/// What a scenario expects at its end.
pub struct Expect<'a> {
    /// The clients; those not dropped are live and must get every payload.
    pub clients: &'a Swarm,
    /// Rows of connections that are gone: all must be removed.
    pub gone: &'a BTreeSet<String>,
    /// The payload (text) of each job, by job id.
    pub jobs: &'a [(&'a str, &'a str)],
    /// How many duplicate deliveries the design allows here, and why.
    pub duplicates_at_most: (u64, String),
}

/// Checks the invariants after every worker run of a scenario and adds
/// them (and the scenario's figures) to `table`.
pub async fn check(rig: &Rig, runs: &[Run], expect: Expect<'_>, table: &mut Table) {
    let live: Vec<_> = expect
        .clients
        .clients()
        .iter()
        .filter(|c| c.end() == ClientEnd::Live)
        .collect();
    // Frames may still be on their way from the gateway to the clients.
    let _ = expect
        .clients
        .wait_for_frames(expect.jobs.len() as u64, Duration::from_secs(10))
        .await;
    let rows = rig.rows().await;

    let live_removed = live.iter().filter(|c| !rows.contains(c.id())).count();
    table.equal("live connections removed", live_removed as u64, 0);
    let gone_left = expect.gone.iter().filter(|id| rows.contains(*id)).count();
    table.equal(
        &format!("gone connections left (of {})", expect.gone.len()),
        gone_left as u64,
        0,
    );

    let mut missing = 0u64;
    let mut duplicates = 0u64;
    for client in &live {
        let tally = client.tally();
        for (_, payload) in expect.jobs {
            match tally.text_count(payload) {
                0 => missing += 1,
                n => duplicates += u64::from(n - 1),
            }
        }
    }
    table.equal(
        &format!(
            "live deliveries missing ({} clients × {} jobs)",
            live.len(),
            expect.jobs.len()
        ),
        missing,
        0,
    );
    let (bound, why) = &expect.duplicates_at_most;
    table.at_most("duplicate deliveries", duplicates, *bound, why);

    let reports: Vec<&serde_json::Value> = runs.iter().flat_map(|r| r.reports.iter()).collect();
    let done: BTreeSet<&str> = reports
        .iter()
        .filter(|r| r["status"] == "done")
        .filter_map(|r| r["job_id"].as_str())
        .collect();
    let dead = support::receive_all(&rig.sqs, &rig.dlq.url).await;
    let dead_ids: BTreeSet<String> = dead
        .iter()
        .filter_map(|m| serde_json::from_str::<serde_json::Value>(&m.body).ok())
        .filter_map(|job| job["id"].as_str().map(str::to_owned))
        .collect();
    let (visible, hidden) = support::counts(&rig.sqs, &rig.queue.url).await;
    let accounted = expect
        .jobs
        .iter()
        .filter(|(id, _)| done.contains(id) || dead_ids.contains(*id))
        .count() as u64;
    let pending = visible + hidden;
    let lost = (expect.jobs.len() as u64).saturating_sub(accounted + pending);
    table.figure("jobs enqueued", expect.jobs.len());
    table.figure("jobs completed", done.len());
    table.figure("jobs dead-lettered", dead_ids.len());
    table.figure("jobs still queued (to retry)", pending);
    table.equal("jobs lost", lost, 0);

    let runs_by_status = |status: &str| reports.iter().filter(|r| r["status"] == status).count();
    table.figure(
        "job runs done / interrupted / failed",
        format!(
            "{} / {} / {}",
            runs_by_status("done"),
            runs_by_status("interrupted"),
            runs_by_status("failed")
        ),
    );
    let sum = |key: &str| reports.iter().filter_map(|r| r[key].as_u64()).sum::<u64>();
    table.figure(
        "engine: retries / throttled / failed / remove_failed",
        format!(
            "{} / {} / {} / {}",
            sum("retries"),
            sum("throttled"),
            sum("failed"),
            sum("remove_failed")
        ),
    );
    let stats = rig.gateway.stats().await;
    table.figure(
        "gateway: posts / delivered / gone / 429 / 500",
        format!(
            "{} / {} / {} / {} / {}",
            stats.posts, stats.delivered, stats.gone, stats.throttled, stats.failed
        ),
    );
    let injected = rig.injected();
    if injected.total() > 0 {
        table.figure(
            "proxy: ddb throttled / partial batches (items held)",
            format!(
                "{} / {} ({})",
                injected.ddb_throttled,
                injected.ddb_partial_batches,
                injected.ddb_unprocessed_items
            ),
        );
        table.figure(
            "proxy: sqs 500 / dropped / receive answers lost",
            format!(
                "{} / {} / {}",
                injected.sqs_errors, injected.sqs_dropped, injected.sqs_receives_lost
            ),
        );
        table.figure(
            "proxy: posts dropped unsent / delivered / spiked / 403",
            format!(
                "{} / {} / {} / {}",
                injected.posts_dropped_unsent,
                injected.posts_dropped_delivered,
                injected.posts_spiked,
                injected.posts_forbidden
            ),
        );
    }
}
