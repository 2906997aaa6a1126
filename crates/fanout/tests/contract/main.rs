//! The project's contracts, checked against the code: the workspace's seams
//! (`architecture`), the job schema against the parser (`job_schema`), and
//! the template's task role against every AWS call the adapters make
//! (`task_role`), and the numbers the crates' layout keeps (`layout`).
//!
//! One test binary for the layer: `./scripts/test.sh --test contract`.

mod architecture;
mod job_schema;
mod layout;
mod sources;
mod task_role;
