//! Names the commit the binary is built from, for `fanout --version`: the
//! `FANOUT_DEV_COMMIT` build variable when set (the image build passes it,
//! since its build context has no `.git`), else git's HEAD when git and a
//! checkout are there, else "unknown".

use std::path::PathBuf;
use std::process::Command;

/// How much of the hash is shown: unique in any repository this size.
const SHORT: usize = 12;

fn main() {
    println!("cargo:rerun-if-env-changed=FANOUT_DEV_COMMIT");
    let commit = std::env::var("FANOUT_DEV_COMMIT")
        .ok()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .or_else(git_head)
        .unwrap_or_else(|| "unknown".to_owned());
    let short: String = commit.chars().take(SHORT).collect();
    // Under the reserved prefix: cargo also sets this variable when it runs
    // the package's tests, and fanout refuses FANOUT_* names it does not know.
    println!("cargo:rustc-env=FANOUT_DEV_BUILD_COMMIT={short}");
}

/// HEAD's hash, and the files whose change means a new one (so a commit
/// rebuilds the version string and nothing else reruns this).
fn git_head() -> Option<String> {
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "HEAD"])?;
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        // Only files that exist: cargo reruns a build script on every build
        // for a watched path that is missing.
        for file in ["HEAD", "logs/HEAD"] {
            let path = PathBuf::from(&dir).join(file);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    Some(head)
}
