//! The workspace's seams, checked: the production binary carries no
//! development tools and no fakes, and the engine's crate no AWS SDK and no
//! HTTP stack.
//! Reads `cargo tree` (offline, from Cargo.lock) and `fanout --help`.

use std::process::Command;

/// `cargo tree` offline, from Cargo.lock, with `args`.
fn cargo_tree(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "--locked"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
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
    let output = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .arg("--help")
        .output()
        .expect("run fanout --help");
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
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
