//! What ships outside this machine's tests: the release workflow passes actionlint (with
//! shellcheck on its `run:` scripts) and publishes exactly the image and chart the chart's
//! defaults name, for both architectures; the scripts users and CI run pass shellcheck.

mod support;

use std::process::Command;

use serde_json::Value;
use support::{REPO, tool};

fn yaml(path: &str) -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(format!("{REPO}/{path}")).unwrap()).unwrap()
}

fn shellcheck() -> &'static str {
    let found = Command::new("shellcheck").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "shellcheck is missing (scripts/test.sh installs Debian's shellcheck)"
    );
    "shellcheck"
}

#[test]
fn the_release_workflow_passes_actionlint_with_shellcheck() {
    shellcheck();
    let out = Command::new(tool("actionlint"))
        .arg("-no-color")
        .arg(format!("{REPO}/.github/workflows/release.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "actionlint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_release_publishes_the_image_and_chart_the_chart_defaults_to() {
    let wf = yaml(".github/workflows/release.yml");
    let values = yaml("charts/sluice/values.yaml");
    let chart = yaml("charts/sluice/Chart.yaml");
    // The image: the chart's default repository, tagged with the version the tag names, which
    // must equal appVersion (the chart's default tag).
    assert_eq!(wf["env"]["IMAGE"], values["image"]["repository"]);
    assert_eq!(
        values["image"]["tag"], "",
        "the chart pins a tag instead of appVersion"
    );
    let text = std::fs::read_to_string(format!("{REPO}/.github/workflows/release.yml")).unwrap();
    assert!(
        text.contains(r#"-t "$IMAGE:$VERSION""#),
        "the image is not tagged with the version"
    );
    assert!(
        text.contains("appVersion $app_v"),
        "the tag is not checked against appVersion"
    );
    assert_eq!(chart["version"], chart["appVersion"]);
    // Both architectures, each from the Dockerfile.
    let platforms: Vec<&str> = wf["jobs"]["image"]["strategy"]["matrix"]["include"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["platform"].as_str().unwrap())
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    let build = wf["jobs"]["image"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "build")
        .expect("a build step");
    assert_eq!(build["with"]["context"], ".");
    assert!(
        build["with"].get("file").is_none(),
        "not the repository's Dockerfile"
    );
    // The chart: packaged with the released version as appVersion, pushed after the image.
    assert!(
        text.contains(
            r#"helm package charts/sluice --version "$VERSION" --app-version "$VERSION""#
        )
    );
    let needs = wf["jobs"]["chart"]["needs"].as_array().unwrap();
    assert!(
        needs.iter().any(|n| n == "manifest"),
        "the chart could name an image not pushed yet"
    );
    assert_eq!(wf["on"]["push"]["tags"][0], "v*");
}

#[test]
fn the_scripts_pass_shellcheck() {
    let files = support::files::shell_scripts();
    assert!(files.len() >= 6, "{files:?}");
    let out = Command::new(shellcheck()).args(&files).output().unwrap();
    assert!(
        out.status.success(),
        "shellcheck: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
