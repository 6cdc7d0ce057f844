//! The scripts a user and CI run on a machine as it comes: none of them dies without saying
//! which command failed, and the real-pods cluster starts from the state a freshly booted
//! machine has (`scripts/fresh-boot.sh`: a new, empty `/run`, so no `/run/netns`).

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::{REPO, TempDir};

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("sluice-scripts-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// The three lines every script starts with: errexit reaching functions and command
/// substitutions, and an ERR trap naming the failing command, file, line and status.
const PROLOGUE: [&str; 3] = [
    "set -Eeuo pipefail",
    "shopt -s inherit_errexit",
    r#"trap 'printf "error: %s:%s: \`%s\` exited with status %s\n" "${BASH_SOURCE[0]}" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR"#,
];

fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

fn require_root() {
    let uid = run(Command::new("id").arg("-u")).0.stdout;
    assert_eq!(
        String::from_utf8_lossy(&uid).trim(),
        "0",
        "these tests need root (a private mount namespace), as scripts/test.sh has in CI"
    );
}

#[test]
fn every_script_has_the_error_trap() {
    let files = support::files::shell_scripts();
    assert!(files.len() >= 8, "{files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for line in PROLOGUE {
            assert!(
                text.lines().any(|l| l == line),
                "{f} lacks `{line}`: a failing command there could exit without a word"
            );
        }
        assert!(
            !text.contains("set -euo pipefail"),
            "{f}: errexit without errtrace leaves failures in functions untrapped"
        );
    }
}

#[test]
fn a_failing_command_names_itself_its_line_and_its_status() {
    // llama.sh's first write is `mkdir -p "$DIR"`; under /dev/null it cannot succeed.
    let (out, stderr) = run(
        Command::new(format!("{REPO}/scripts/llama.sh")).env("SLUICE_CACHE", "/dev/null/cache")
    );
    assert!(!out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(line.contains("scripts/llama.sh:"), "{line}");
    assert!(line.contains("`mkdir -p \"$DIR\"`"), "{line}");
    assert!(line.ends_with("exited with status 1"), "{line}");
}

#[test]
fn a_failure_inside_a_command_substitution_is_not_ignored() {
    // image.sh's `rootfs` finds its packages through `dir=$(debs)`; debs' first command fails
    // here. Without inherit_errexit the function went on and the script died later, elsewhere.
    let target = temp_dir("rootfs");
    let (out, stderr) = run(Command::new(format!("{REPO}/scripts/image.sh"))
        .args(["rootfs", &target.0.join("rootfs").display().to_string()])
        .env("SLUICE_CACHE", "/dev/null/cache"));
    assert!(!out.status.success(), "{stderr}");
    let first = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(first.contains("scripts/image.sh:"), "{first}");
    assert!(first.contains("`mkdir -p \"$dir\"`"), "{first}");
    assert!(
        !target.0.join("rootfs").exists(),
        "the script went on past the failure: {stderr}"
    );
}

#[test]
fn fresh_boot_gives_the_command_an_empty_run_and_leaves_the_hosts_alone() {
    require_root();
    let host_before: Vec<_> = std::fs::read_dir("/run")
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let (out, stderr) = run(Command::new(format!("{REPO}/scripts/fresh-boot.sh")).args([
        "sh",
        "-c",
        "ls -A /run; ip netns add sluice-fresh-boot-test && ls /run/netns",
    ]));
    assert!(out.status.success(), "{stderr}");
    let seen = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        seen.lines().collect::<Vec<_>>(),
        ["lock", "user", "sluice-fresh-boot-test"],
        "{seen}"
    );
    // The namespace pinned inside went away with the mount namespace; the host's /run is as it was.
    assert!(!Path::new("/run/netns/sluice-fresh-boot-test").exists());
    for name in host_before {
        assert!(
            Path::new("/run").join(&name).exists(),
            "{name:?} vanished from the host's /run"
        );
    }
}

#[test]
fn cluster_down_on_a_fresh_boot_with_nothing_started_succeeds() {
    require_root();
    let state = temp_dir("cluster-state");
    let (out, stderr) = run(Command::new(format!("{REPO}/scripts/fresh-boot.sh"))
        .args([format!("{REPO}/scripts/cluster.sh"), "down".into()])
        .env("SLUICE_CLUSTER_STATE", state.0.join("none"))
        .env("SLUICE_NETNS", "sluice-fresh-boot-none"));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("nothing to stop"), "{stderr}");
}

#[test]
fn the_real_pods_step_runs_from_a_fresh_boot() {
    // The step that failed on a freshly booted machine runs, in CI, where that state is real.
    let test_sh = std::fs::read_to_string(format!("{REPO}/scripts/test.sh")).unwrap();
    assert!(
        test_sh.contains("scripts/fresh-boot.sh scripts/cluster.sh run --load"),
        "scripts/test.sh must start the real-pods cluster through scripts/fresh-boot.sh"
    );
}
