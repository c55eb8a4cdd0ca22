//! `make release` refuses bad input with one line, before it builds or pushes anything
//! (scripts/release.sh). Each case runs the script of a fresh `git clone` of this repository,
//! so the tree it checks is clean unless the case makes it otherwise. No cluster needed: the
//! registry it names is never reached, or does not exist.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A clone of the repository's HEAD in a temporary directory, removed on drop.
struct Clone(PathBuf);

impl Clone {
    fn new(case: &str) -> Self {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir =
            std::env::temp_dir().join(format!("graceful-release-{case}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new("git")
            .args(["clone", "-q"])
            .arg(&repo)
            .arg(&dir)
            .output()
            .expect("git");
        assert!(out.status.success(), "git clone: {out:?}");
        Self(dir)
    }

    /// Runs the clone's release script with REGISTRY (unset when None); returns (exit code,
    /// stderr lines).
    fn release(&self, registry: Option<&str>) -> (Option<i32>, Vec<String>) {
        let mut command = Command::new(self.0.join("scripts/release.sh"));
        command.env_remove("REGISTRY").env_remove("FORCE");
        if let Some(r) = registry {
            command.env("REGISTRY", r);
        }
        let out = command.output().expect("scripts/release.sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        (
            out.status.code(),
            stderr.lines().map(str::to_owned).collect(),
        )
    }
}

impl Drop for Clone {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One line, saying `what`, and a failed exit.
fn refused(case: &str, (code, lines): (Option<i32>, Vec<String>), what: &str) {
    eprintln!("{case}: {lines:?}");
    assert_ne!(code, Some(0), "{case}: release.sh succeeded");
    assert_eq!(lines.len(), 1, "{case}: not one line: {lines:#?}");
    assert!(
        lines[0].contains(what),
        "{case}: {:?} lacks {what:?}",
        lines[0]
    );
}

#[test]
fn release_refuses_bad_input_with_one_line_before_anything_is_built() {
    let clean = Clone::new("clean");
    refused(
        "no REGISTRY",
        clean.release(None),
        "make release needs REGISTRY=host[:port][/path]",
    );
    refused(
        "a malformed REGISTRY",
        clean.release(Some("https://127.0.0.1:5000")),
        "REGISTRY=https://127.0.0.1:5000 is not host[:port][/path]",
    );
    // Port 1 on loopback: nothing listens there, and nothing leaves the machine.
    refused(
        "an unreachable registry",
        clean.release(Some("127.0.0.1:1")),
        "no registry answers at http://127.0.0.1:1/v2/",
    );

    let dirty = Clone::new("dirty");
    std::fs::write(dirty.0.join("README.md"), "changed\n").unwrap();
    refused(
        "a dirty tree",
        dirty.release(Some("127.0.0.1:1")),
        "uncommitted changes",
    );

    let mismatch = Clone::new("mismatch");
    let chart = mismatch.0.join("charts/graceful/Chart.yaml");
    let text = std::fs::read_to_string(&chart).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    let changed = text.replace(
        &format!("appVersion: \"{version}\""),
        "appVersion: \"9.9.9\"",
    );
    assert_ne!(text, changed, "Chart.yaml has no appVersion \"{version}\"");
    std::fs::write(&chart, changed).unwrap();
    refused(
        "versions that disagree",
        mismatch.release(Some("127.0.0.1:1")),
        &format!(
            "versions disagree: Cargo.toml {version}, Chart.yaml version {version} and appVersion 9.9.9"
        ),
    );
}
