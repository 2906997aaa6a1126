//! The workspace's seams, checked: the production binary carries no
//! development tools and no fakes, and the engine's crate no AWS SDK and no
//! HTTP stack.
//! Reads `cargo tree` (offline, from Cargo.lock) and `fanout --help`.

use std::process::Command;

use fanout_testkit::support::stdout_of;

/// `cargo tree` offline, from Cargo.lock, with `args`.
fn cargo_tree(args: &[&str]) -> String {
    stdout_of(
        Command::new(env!("CARGO"))
            .args(["tree", "--offline", "--locked"])
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR")),
        "cargo tree",
    )
}

/// The packages `package` is built from (normal dependencies only: what
/// ships, not what its tests use).
fn normal_dependencies(package: &str) -> Vec<String> {
    cargo_tree(&["-e", "normal", "--prefix", "none", "-p", package])
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn the_fanout_binary_carries_no_websocket_stack_and_no_dev_tools() {
    let dependencies = normal_dependencies("fanout");
    for banned in ["tungstenite", "tokio-tungstenite", "fanout-dev", "rlimit"] {
        assert!(
            !dependencies.iter().any(|d| d == banned),
            "the fanout binary depends on {banned}"
        );
    }
    // The binary's own crates are there: the check reads the right tree.
    assert!(dependencies.iter().any(|d| d == "fanout-core"));
    assert!(dependencies.iter().any(|d| d == "fanout-aws"));
}

#[test]
fn the_fakes_stay_out_of_the_fanout_binary() {
    let tree = cargo_tree(&["-e", "normal,features", "-p", "fanout", "-i", "fanout-core"]);
    assert!(tree.contains("fanout-core feature \"default\""), "{tree}");
    assert!(!tree.contains("feature \"fakes\""), "{tree}");
}

#[test]
fn the_engine_and_worker_crate_depends_on_no_aws_crate_and_no_hyper() {
    let dependencies = normal_dependencies("fanout-core");
    let offending: Vec<&String> = dependencies
        .iter()
        .filter(|d| d.starts_with("aws-") || d.starts_with("hyper") || *d == "http")
        .collect();
    assert!(offending.is_empty(), "fanout-core depends on {offending:?}");
    assert!(dependencies.iter().any(|d| d == "tokio"));
}

#[test]
fn fanout_help_lists_no_development_commands() {
    let help = fanout_says("--help");
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(commands.contains(&"run"), "{help}");
    for dev in ["gateway", "clients"] {
        assert!(
            !commands.contains(&dev),
            "fanout --help lists `{dev}`:\n{help}"
        );
    }
}

#[test]
fn fanout_version_names_the_commit_it_was_built_from() {
    let version = fanout_says("--version");
    let prefix = format!("fanout {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(version.starts_with(&prefix), "{version}");
    // Built in a checkout without the image's build variable: git's HEAD.
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim()[..12].to_owned());
    let expected = match (option_env!("FANOUT_DEV_COMMIT"), head) {
        (Some(commit), _) if !commit.trim().is_empty() => commit.trim().chars().take(12).collect(),
        (_, Some(head)) => head,
        _ => "unknown".to_owned(),
    };
    assert_eq!(version.trim(), format!("{prefix}{expected})"));
}

#[test]
fn the_image_build_passes_the_commit_to_the_build() {
    // The image's build context has no .git: the Dockerfile takes the commit
    // as a build argument and hands it to build.rs, and the image script
    // passes it.
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let dockerfile = std::fs::read_to_string(format!("{root}/Dockerfile")).unwrap();
    let build = dockerfile
        .split("\nFROM ")
        .find(|stage| stage.contains("AS build"))
        .expect("a build stage");
    assert!(build.contains("ARG REVISION"), "{build}");
    assert!(
        build.contains("FANOUT_DEV_COMMIT=\"$REVISION\" cargo build --release"),
        "{build}"
    );
    let script = std::fs::read_to_string(format!("{root}/scripts/image.sh")).unwrap();
    assert!(script.contains("--build-arg \"REVISION=$revision\""));
}

/// What `fanout FLAG` prints; it must succeed.
fn fanout_says(flag: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .arg(flag)
        .output()
        .unwrap_or_else(|e| panic!("run fanout {flag}: {e}"));
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap()
}
